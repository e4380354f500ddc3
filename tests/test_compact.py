"""Compact kernels (sj.compact) and the unchanged linen model run on them (sjnn.sparse_apply)."""

import dataclasses
import json
import re
import subprocess
import sys

from flax import nnx
import flax.linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_cli import CONFIG, ROOT, SHORT, cli_env, run_cli

import sparsejax as sj
from sparsejax.compact import is_compact
import sparsejax.nn as sjnn
from sparsejax.nn import inference


class ConvAttentionNet(nn.Module):
  """Conv, BatchNorm, attention (DenseGeneral q/k/v/out) and Dense: every kind compacts."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def trained(method: str, steps: int = 6):
  """The net trained a few real steps with ``method``: (model, variables, masks, x)."""
  model = ConvAttentionNet()
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x, y = jax.random.normal(kx, (16, 6, 6, 3)), jax.random.randint(ky, (16,), 0, 10)
  variables = model.init(jax.random.PRNGKey(0), x)
  if method == "dst":
    tx = sj.dst(optax.sgd(0.1, momentum=0.9), alpha=1e-3)
  else:
    tx = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=100)
  params, stats, state = variables["params"], variables["batch_stats"], None
  state = tx.init(params)

  @jax.jit
  def step(params, stats, state):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    grads, new = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], state

  for _ in range(steps):
    params, stats, state = step(params, stats, state)
  return model, {"params": params, "batch_stats": stats}, sj.masks(state), x


def is_runtime_kernel(leaf) -> bool:
  return isinstance(leaf, (sjnn.RowKernel, sjnn.SlotKernel))


def assert_same_predictions(logits, reference):
  logits, reference = np.asarray(logits), np.asarray(reference)
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
  top2 = np.sort(reference, -1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-5
  assert clear.any()
  np.testing.assert_array_equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.mark.parametrize("method,runtime", [("rigl", "rows"), ("rigl", "slots"),
                                            ("dst", "rows"), ("dst", "slots")])
def test_sparse_apply_equals_the_masked_model(method, runtime):
  """After real training: every masked kernel compacts, the unchanged model run on them
  (eagerly and under jit, on either runtime form) gives the masked dense model's logits
  and predictions."""
  model, variables, masks, x = trained(method)
  stored = {**variables, "params": sj.compact(variables["params"], masks)}
  kernels = [leaf for leaf in jax.tree.leaves(stored, is_leaf=is_compact)
             if isinstance(leaf, sj.CompactKernel)]
  assert len(kernels) == 7  # conv, q, k, v, out, two dense
  for kernel, mask in zip(kernels, jax.tree.leaves(masks), strict=True):
    assert kernel.nnz == int(np.asarray(mask).sum())
  reference = model.apply(variables, x)
  assert_same_predictions(sjnn.sparse_apply(model, stored, x), reference)  # "auto"
  prepared = sjnn.prepare(model, stored, x, runtime=runtime)
  kinds = [type(leaf) for leaf in jax.tree.leaves(prepared, is_leaf=is_runtime_kernel)
           if is_runtime_kernel(leaf)]
  assert kinds == [sjnn.RowKernel if runtime == "rows" else sjnn.SlotKernel] * 7
  # on the device: a jitted forward given host arrays would copy them at every call
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(prepared["params"]))
  jitted = jax.jit(lambda v, x: sjnn.sparse_apply(model, v, x))(prepared, x)
  assert_same_predictions(jitted, reference)


def test_the_slot_loop_equals_the_one_gather_path(monkeypatch):
  model, variables, masks, x = trained("rigl", steps=2)
  runtime = sjnn.prepare(model, {**variables, "params": sj.compact(variables["params"], masks)},
                         x, runtime="slots")
  gathered = sjnn.sparse_apply(model, runtime, x)
  monkeypatch.setattr(inference, "ONE_GATHER_LIMIT", 0)
  np.testing.assert_allclose(sjnn.sparse_apply(model, runtime, x), gathered, rtol=1e-5,
                             atol=1e-6)


def test_auto_runs_a_mostly_active_kernel_densely():
  """With "auto", a kernel with more than DENSE_ABOVE of its weights active runs as its
  dense (masked) kernel, in linen and nnx; a sparser one gets the row kernel."""
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(0)
  masks = {"layers_0": {"kernel": rng.random((32, 64)) < 0.1, "bias": None},
           "layers_2": {"kernel": rng.random((64, 10)) < 0.9, "bias": None}}
  params = jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                        is_leaf=lambda m: m is None)
  runtime = sjnn.prepare(model, {"params": sj.compact(params, masks)}, x)
  assert isinstance(runtime["params"]["layers_0"]["kernel"], sjnn.RowKernel)
  np.testing.assert_array_equal(runtime["params"]["layers_2"]["kernel"],
                                params["layers_2"]["kernel"])
  np.testing.assert_allclose(sjnn.sparse_apply(model, runtime, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)

  net = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
                       nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
  nnx_masks = {"layers": {0: {"kernel": masks["layers_0"]["kernel"], "bias": None},
                          2: {"kernel": masks["layers_2"]["kernel"], "bias": None}}}
  state = nnx.state(net, nnx.Param)
  nnx_params = jax.tree.map(lambda p, m: p if m is None else p * m, nnx.to_pure_dict(state),
                            nnx_masks, is_leaf=lambda m: m is None)
  nnx.update(net, nnx_params)
  sparse = sjnn.sparsify(net, sj.compact(nnx_params, nnx_masks))
  assert isinstance(sparse.layers[0], sjnn.CompactLayer)
  assert isinstance(sparse.layers[2], nnx.Linear)
  np.testing.assert_allclose(sparse(x), net(x), rtol=1e-5, atol=1e-5)


def test_stored_bytes_grow_with_nnz_not_with_the_layer_or_its_densest_unit():
  """8 bytes per float32 weight and 4 per output unit: the same nnz in a 4× larger layer,
  or all in one output unit, stores the same values and indices; only the runtime
  form pads (and says so)."""
  rng = np.random.default_rng(0)

  def stored(shape, mask):
    params = {"kernel": rng.normal(size=shape).astype(np.float32)}
    return sj.compact_bytes(sj.compact(params, {"kernel": mask}))

  small, large, skewed = np.zeros((64, 32), bool), np.zeros((256, 32), bool), np.zeros(
      (64, 32), bool)
  small.reshape(-1)[rng.choice(small.size, 200, replace=False)] = True
  large.reshape(-1)[rng.choice(large.size, 200, replace=False)] = True
  skewed[:, 0], skewed[:72, 1] = True, True  # output 0 has fan-in 64 (the mean is 6.25)
  for bytes_ in (stored((64, 32), small), stored((256, 32), large)):
    assert (bytes_["values"], bytes_["indices"], bytes_["offsets"]) == (800, 800, 132)
  skewed_bytes = stored((64, 32), skewed)
  assert skewed_bytes["values"] == 4 * skewed.sum() and skewed_bytes["offsets"] == 132
  assert skewed_bytes["total"] <= 1.25 * 8 * skewed.sum()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 7), extra=st.integers(1, 3),
       density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_a_compact_kernel_holds_exactly_the_active_weights(rows, cols, extra, density, seed):
  rng = np.random.default_rng(seed)
  shape = (extra, rows, cols)
  mask = rng.random(shape) < density
  kernel = np.where(mask, rng.normal(size=shape), 0).astype(np.float32)
  compact = sj.compact({"k": kernel}, {"k": mask})["k"]
  assert compact.nnz == mask.sum() and compact.offsets[-1] == mask.sum()
  assert np.all(np.diff(compact.offsets) >= 0)
  np.testing.assert_array_equal(compact.dense(), kernel)


def test_orbax_round_trip_in_another_process(tmp_path):
  """A compact pytree saved by another process restores here (into the same structure)
  and runs like the one that was saved."""
  model, variables, masks, x = trained("rigl", steps=2)
  stored = {**variables, "params": sj.compact(variables["params"], masks)}
  path = tmp_path / "compact"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, stored)
  script = (
      "import orbax.checkpoint as ocp\n"
      "with ocp.StandardCheckpointer() as c:\n"
      f"  restored = c.restore({str(path)!r})\n"
      "print(sorted(restored['params']['Dense_0']['kernel']))\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "['indices', 'offsets', 'values']"
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, jax.tree.map(np.asarray, stored))
  assert isinstance(restored["params"]["Dense_0"]["kernel"], sj.CompactKernel)
  np.testing.assert_array_equal(sjnn.sparse_apply(model, restored, x),
                                sjnn.sparse_apply(model, stored, x))


def test_bad_input_is_one_line():
  params = {"Dense_0": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  good = {"Dense_0": {"kernel": np.ones((4, 3), bool), "bias": None}}
  with pytest.raises(ValueError, match=r"^Dense_0/kernel: mask shape \[3, 4\] does not match "
                     r"the kernel's \[4, 3\]$"):
    sj.compact(params, {"Dense_0": {"kernel": np.ones((3, 4), bool), "bias": None}})
  with pytest.raises(ValueError, match=r"^masks do not match params: different leaves"):
    sj.compact(params, {"Dense_0": {"kernel": np.ones((4, 3), bool)}})
  with pytest.raises(ValueError, match=r"^Dense_0/bias: only kernels with two or more axes"):
    sj.compact(params, {"Dense_0": {"kernel": None, "bias": np.ones(3, bool)}})
  class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  extra = {**params, "extra": {"kernel": np.ones((4, 3), np.float32)}}
  stored = {"params": sj.compact(extra, {**good, "extra": {"kernel": np.ones((4, 3), bool)}})}
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match=r"^params/extra/kernel: no Dense, DenseGeneral or "
                     r"Conv of the model reads this compact kernel$"):
    sjnn.prepare(OneDense(), stored, x)
  with pytest.raises(ValueError, match=r"^sparse_apply under jit needs the runtime form"):
    jax.jit(lambda v: sjnn.sparse_apply(OneDense(), v, x))({"params": sj.compact(params, good)})
  compact = {"params": sj.compact(params, good)}
  with pytest.raises(ValueError, match=r"^runtime must be one of auto, rows, slots; got 'fast'$"):
    sjnn.prepare(OneDense(), compact, x, runtime="fast")
  kernel = compact["params"]["Dense_0"]["kernel"]
  corrupt = {  # what a damaged checkpoint could hold: positions past the fan-in, bad rows
      "an index outside [0, 4)": dataclasses.replace(kernel, indices=kernel.indices + 3),
      "its offsets do not split the values into rows": dataclasses.replace(
          kernel, offsets=kernel.offsets[::-1].copy()),
      "4 offsets and 12 indices expected, got 3 and 12": dataclasses.replace(
          kernel, offsets=kernel.offsets[:3]),
  }
  for problem, bad in corrupt.items():
    for runtime in ("rows", "slots"):
      with pytest.raises(ValueError, match=re.escape(
          f"params/Dense_0/kernel: not a compact kernel of shape [4, 3]: {problem}")):
        sjnn.prepare(OneDense(), {"params": {"Dense_0": {**compact["params"]["Dense_0"],
                                                         "kernel": bad}}}, x, runtime=runtime)


class NnxNet(nnx.Module):
  """The same kinds in flax.nnx: Conv, BatchNorm, MultiHeadAttention (LinearGeneral), Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                            decode=False, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(288, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x)))
    x = x.reshape(x.shape[0], -1, 8)
    x = x + self.attention(x)
    return self.layers[1](nnx.relu(self.layers[0](x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("method", ["rigl", "dst"])
def test_nnx_sparsify_equals_the_masked_model(method):
  """nnx.Optimizer training, then sparsify: every Linear, LinearGeneral and Conv is a
  CompactLayer computing the masked model's logits (eagerly and under nnx.jit, on either
  runtime form); the original model is unchanged."""
  model = NnxNet(nnx.Rngs(0))
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x, y = jax.random.normal(kx, (16, 6, 6, 3)), jax.random.randint(ky, (16,), 0, 10)
  tx = (sj.dst(optax.sgd(0.1, momentum=0.9), alpha=1e-3) if method == "dst"
        else sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=100))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(6):
    step(model, optimizer)
  model.eval()
  stored = sj.compact(nnx.state(model, nnx.Param), sj.masks(optimizer.opt_state))
  reference = model(x)
  for runtime in ("rows", "slots"):
    sparse = sjnn.sparsify(model, stored, runtime=runtime)
    layers = (sparse.conv, sparse.attention.query, sparse.attention.out, *sparse.layers)
    assert all(isinstance(layer, sjnn.CompactLayer) for layer in layers)
    assert all((layer.offsets is not None) == (runtime == "rows") for layer in layers)
    assert_same_predictions(sparse(x), reference)
    assert_same_predictions(nnx.jit(lambda m, x: m(x))(sparse, x), reference)
  assert isinstance(model.layers[0], nnx.Linear)
  assert_same_predictions(sjnn.sparsify(model, stored)(x), reference)  # "auto"


def test_the_export_command_compacts_a_finished_run(data_dir, tmp_path):
  """A RigL run of the real CLI exported: one table with both models' accuracy, 100 %
  identical predictions and ~8 bytes per non-zero; the compact checkpoint restores in
  this process and holds the run's nnz. A dense run or an existing --out is one line."""
  run = tmp_path / "rigl"
  trained_run = run_cli(f"{CONFIG}:rigl", f"--workdir={run}", *SHORT, data_dir=data_dir)
  assert trained_run.returncode == 0, trained_run.stderr
  command = [sys.executable, "-m", "experiments.export", str(run)]
  result = subprocess.run(command, cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()[2:]]
  dense, compact = ([cell.strip() for cell in row] for row in rows)
  assert dense[0] == "rigl, masked dense" and compact[0] == "rigl, compact"
  assert dense[1] == compact[1] and compact[2] == "100.00"
  assert 8.0 <= float(compact[4]) <= 1.25 * 8
  assert dense[5] == "dense" and compact[5] in ("3 rows", "2 rows, 1 dense")  # ERK at 90 %
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore((run / "compact").absolute())
  nnz = {f"{name}/kernel": len(layer["kernel"]["values"])
         for name, layer in restored["params"].items()}
  sizes = {"Dense_0/kernel": 784 * 300, "Dense_1/kernel": 300 * 100, "Dense_2/kernel": 100 * 10}
  layers = json.loads((run / "summary.json").read_text())["layers"]
  assert nnz == {name: round(sizes[name] * (1 - sparsity)) for name, sparsity in layers.items()}
  again = subprocess.run(command, cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                         text=True, timeout=300, check=False)
  assert again.returncode == 2
  assert again.stderr.strip().endswith("exists; give another directory")
  dense_run = tmp_path / "dense"
  assert run_cli(f"{CONFIG}:dense", f"--workdir={dense_run}", *SHORT,
                 data_dir=data_dir).returncode == 0
  refused = subprocess.run([sys.executable, "-m", "experiments.export", str(dense_run)],
                           cwd=ROOT, env=cli_env(data_dir), capture_output=True, text=True,
                           timeout=300, check=False)
  assert refused.returncode == 2
  assert refused.stderr.strip() == (
      f"error: {dense_run}: a dense run has no masked kernels to compact")
