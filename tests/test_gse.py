"""GSE: sampled candidates only, guided sampling statistics, exact counts, linen and nnx."""

import chex
from conftest import assert_exactly_sparse, mask_leaves, nnz_per_leaf
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax import sampling
from sparsejax.methods import gse as gse_module


class Mixed(nn.Module):
  """Conv → self-attention (DenseGeneral projections) → Dense: every kernel kind."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))  # [b, 4, 4, 8]
    tokens = x.reshape(x.shape[0], 16, 8)
    tokens = tokens + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(tokens)
    return nn.Dense(3)(tokens.reshape(x.shape[0], -1))


class NnxMixed(nnx.Module):
  """The nnx counterpart: Conv, MultiHeadAttention (LinearGeneral) and Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), strides=2, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                            decode=False, rngs=rngs)
    self.head = nnx.Linear(128, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    tokens = x.reshape(x.shape[0], 16, 8)
    tokens = tokens + self.attention(tokens)
    return self.head(tokens.reshape(x.shape[0], -1))


def data(seed=0, n=6):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, (n, 8, 8, 2)), jax.random.randint(ky, (n,), 0, 3)


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Each sampling × scope pair once, each sampling and each scope in both APIs: the scope
# is the optimizer's alone, the API only meets the sampling (how statistics are taken),
# and every case compiles a GSE step (most of the suite's time).
LINEN_CASES = [("uniform", "global"), ("grabo", "layer"), ("graest", "global")]
NNX_CASES = [("uniform", "layer"), ("grabo", "global"), ("graest", "layer")]


@pytest.mark.parametrize("kind,scope", LINEN_CASES)
def test_linen_every_kernel_kind_jitted(kind, scope):
  model = Mixed()
  params = model.init(jax.random.PRNGKey(0), data()[0])["params"]
  tx = sj.gse(optax.sgd(0.05, momentum=0.9), sparsity=0.8, sampling=kind, scope=scope,
              update_every=2, end_step=20, distribution="uniform")
  state = tx.init(params)
  layers = sj.summary(state)["layers"]
  assert {"Conv_0/kernel", "Dense_0/kernel", "MultiHeadDotProductAttention_0/query/kernel",
          "MultiHeadDotProductAttention_0/out/kernel"} <= set(layers)
  total = sj.summary(state)["nnz"]
  targets = nnz_per_leaf(sj.masks(state))

  def loss(p, x, y):
    return cross_entropy(model.apply({"params": p}, x), y)

  @jax.jit
  def step(params, state, key, x, y):
    _, grads, stats = sj.value_grad_and_statistics(loss, params, x, y, sampling=kind, key=key)
    updates, state = tx.update(grads, state, params, layer_statistics=stats)
    return optax.apply_updates(params, updates), state

  changed = 0
  for t in range(1, 7):
    old = sj.masks(state)
    params, state = step(params, state, jax.random.PRNGKey(t), *data(t))
    masks = sj.masks(state)
    assert_exactly_sparse(params, masks)
    assert sj.summary(state)["nnz"] == total
    if scope == "layer":
      assert nnz_per_leaf(masks) == targets
    changed += any(o is not None and not np.array_equal(o, m)
                   for o, m in zip(mask_leaves(old), mask_leaves(masks)))
  assert changed == 3 and int(state.extra.skipped_updates) == 0


@pytest.mark.parametrize("kind,scope", NNX_CASES)
def test_nnx_every_kernel_kind_jitted(kind, scope):
  model = NnxMixed(nnx.Rngs(0))
  tx = sj.gse(optax.adam(1e-2), sparsity=0.8, sampling=kind, scope=scope, update_every=2,
              end_step=20, distribution="uniform")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  targets = nnz_per_leaf(sj.masks(optimizer.opt_state))
  total = sj.summary(optimizer.opt_state)["nnz"]
  assert {"conv/kernel", "attention/query/kernel", "attention/out/kernel", "head/kernel"} <= set(
      sj.summary(optimizer.opt_state)["layers"])

  @nnx.jit
  def step(model, optimizer, key, x, y):
    def loss(model, x, y):
      return cross_entropy(model(x), y)
    _, grads, stats = sj.value_grad_and_statistics(loss, model, x, y, sampling=kind, key=key)
    optimizer.update(model, grads, layer_statistics=stats)

  before = sj.masks(optimizer.opt_state)
  for t in range(1, 5):
    step(model, optimizer, jax.random.PRNGKey(t), *data(t))
    masks = sj.masks(optimizer.opt_state)
    assert sj.summary(optimizer.opt_state)["nnz"] == total
    if scope == "layer":
      assert nnz_per_leaf(masks) == targets
    kernel = np.asarray(model.head.kernel[...])
    np.testing.assert_array_equal(kernel[~np.asarray(masks["head"]["kernel"])], 0.0)
  assert not np.array_equal(before["head"]["kernel"], masks["head"]["kernel"])


def test_statistics_of_nnx_and_linen_agree_with_their_gradients():
  """|∂L/∂W_ab| ≤ f_a g_b (GraBo's bound) for every kernel; nnx grads are nnx.grad's."""
  model = NnxMixed(nnx.Rngs(0))
  x, y = data()

  def loss(model, x, y):
    return cross_entropy(model(x), y)

  value, grads, stats = sj.value_grad_and_statistics(loss, model, x, y, sampling="grabo")
  reference = nnx.grad(loss)(model, x, y)
  chex.assert_trees_all_close(nnx.as_pure(grads), nnx.as_pure(reference), atol=1e-6)
  assert value == pytest.approx(float(loss(model, x, y)), rel=1e-6)
  for name in ("conv/kernel", "attention/query/kernel", "attention/out/kernel", "head/kernel"):
    module = name.split("/")[:-1]
    g = nnx.as_pure(grads)
    for part in module:
      g = g[part]
    g = np.asarray(g["kernel"]).reshape(stats[name].inputs.size, -1)
    bound = np.outer(stats[name].inputs, stats[name].outputs)
    assert np.all(np.abs(g) <= bound + 1e-6), name


def test_graest_matches_a_hand_computation():
  """f = |Σ s·h| and g = |Σ s·δ| with the helper's signs, for a Dense and a Conv kernel."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(3, (2, 2), padding="VALID")(x))  # [b, 3, 3, 3]
      return nn.Dense(4)(h.reshape(h.shape[0], -1)), h

  model, x = Net(), jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 2))
  y = jnp.arange(5) % 4
  params = model.init(jax.random.PRNGKey(1), x)["params"]

  def loss(p, x, y):
    return cross_entropy(model.apply({"params": p}, x)[0], y)

  key = jax.random.PRNGKey(7)
  _, _, stats = sj.value_grad_and_statistics(loss, params, x, y, sampling="graest", key=key)
  logits, h = model.apply({"params": params}, x)
  delta = (jax.nn.softmax(logits) - jax.nn.one_hot(y, 4)) / 5  # ∂L/∂logits
  # Calls are numbered in order: the conv (0), then the dense layer (1).
  signs = sampling.random_signs(jax.random.fold_in(key, 1), 5)
  np.testing.assert_allclose(stats["Dense_0/kernel"].inputs,
                             np.abs(signs @ np.asarray(h).reshape(5, -1)), rtol=1e-5)
  np.testing.assert_allclose(stats["Dense_0/kernel"].outputs, np.abs(signs @ delta), rtol=1e-5)
  # The conv as an MLP over its 2x2 patches, rows = (example, position).
  xs = np.asarray(x)
  patches = np.stack([xs[:, i:i + 2, j:j + 2, :].reshape(5, -1)
                      for i in range(3) for j in range(3)], axis=1).reshape(45, 8)
  conv_signs = np.asarray(sampling.random_signs(jax.random.fold_in(key, 0), 45))
  np.testing.assert_allclose(stats["Conv_0/kernel"].inputs, np.abs(conv_signs @ patches),
                             rtol=1e-5, atol=1e-6)
  # δ at the conv's outputs, by the chain rule through the ReLU and the dense kernel.
  dense = np.asarray(params["Dense_0"]["kernel"])
  delta_h = (np.asarray(delta) @ dense.T).reshape(5, 3, 3, 3) * (np.asarray(h) > 0)
  np.testing.assert_allclose(stats["Conv_0/kernel"].outputs,
                             np.abs(conv_signs @ delta_h.reshape(45, 3)), rtol=1e-4, atol=1e-7)
  # And the formulas themselves, with fixed signs.
  rows = np.arange(12.0).reshape(4, 3)
  fixed = sampling.graest(jnp.asarray(rows), jnp.asarray(-rows[:, :2]), jnp.asarray([1, -1, 1, 1]))
  np.testing.assert_array_equal(fixed.inputs, np.abs([1, -1, 1, 1] @ rows))
  np.testing.assert_array_equal(fixed.outputs, np.abs([1, -1, 1, 1] @ rows[:, :2]))


def dense_net(n_in=20, n_out=8):
  model = nn.Dense(n_out)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, n_in)))["params"]
  return model, params


def test_grabo_with_one_live_input_grows_only_from_it():
  model, params = dense_net()
  x = jnp.zeros((16, 20)).at[:, 3].set(jax.random.normal(jax.random.PRNGKey(1), (16,)))
  y = jnp.arange(16) % 8
  tx = sj.gse(optax.sgd(0.1), sparsity=0.9, sampling="grabo", scope="layer", update_every=1,
              end_step=10, distribution="uniform", growth_fraction=0.5)
  state = tx.init(params)

  def loss(p, x, y):
    return cross_entropy(model.apply({"params": p}, x), y)

  _, grads, stats = sj.value_grad_and_statistics(loss, params, x, y, sampling="grabo")
  assert np.count_nonzero(stats["kernel"].inputs) == 1
  _, after = tx.update(grads, state, params, layer_statistics=stats)
  grown = np.asarray(sj.masks(after)["kernel"] & ~sj.masks(state)["kernel"])
  assert grown.any() and not grown[np.arange(20) != 3].any()


def test_masks_ignore_the_gradient_outside_the_sampled_pairs(monkeypatch):
  """Uniform sampling: randomising every gradient entry that was not sampled (active
  weights' included) leaves the new masks unchanged; changing a sampled one does not."""
  model, params = dense_net(64, 32)
  tx = sj.gse(optax.sgd(0.1), sparsity=0.95, scope="layer", update_every=1, end_step=10,
              distribution="uniform")
  state = tx.init(params)
  sampled = []
  original = gse_module.sample_pairs

  def spy(*args, **kwargs):
    rows, cols = original(*args, **kwargs)
    sampled.append((np.asarray(rows), np.asarray(cols)))
    return rows, cols

  monkeypatch.setattr(gse_module, "sample_pairs", spy)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  with jax.disable_jit():
    _, reference = tx.update(grads, state, params)
  (rows, cols), = sampled
  seen = np.zeros((64, 32), bool)
  seen[rows, cols] = True
  noise = jax.random.normal(jax.random.PRNGKey(3), (64, 32)) * 100
  changed = {**grads, "kernel": jnp.where(seen, grads["kernel"], noise)}
  with jax.disable_jit():
    _, after = tx.update(changed, state, params)
  np.testing.assert_array_equal(sj.masks(after)["kernel"], sj.masks(reference)["kernel"])
  assert (seen & ~np.asarray(sj.masks(state)["kernel"])).sum() > 10
  # A sampled inactive pair whose gradient becomes the largest is grown.
  inactive = np.argwhere(seen & ~np.asarray(sj.masks(state)["kernel"])
                         & ~np.asarray(sj.masks(reference)["kernel"]))[0]
  boosted = {**grads, "kernel": grads["kernel"].at[tuple(inactive)].set(1e6)}
  with jax.disable_jit():
    _, after = tx.update(boosted, state, params)
  assert bool(sj.masks(after)["kernel"][tuple(inactive)])


def test_grown_weights_are_zero_with_fresh_momentum(mlp):
  params, loss = mlp
  tx = sj.gse(optax.sgd(0.1, momentum=0.9), sparsity=0.8, scope="global", update_every=3,
              end_step=30, distribution="uniform", growth_fraction=0.5)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for _ in range(3):  # the third step is a mask update
    old = sj.masks(state)
    updates, state = step(params, state, jax.grad(loss)(params))
    params = optax.apply_updates(params, updates)
  trace = mask_leaves(state.inner_state[0].trace)
  grown_total = 0
  for o, n, w, mu in zip(mask_leaves(old), mask_leaves(sj.masks(state)),
                         jax.tree.leaves(params), trace):
    if o is not None:
      grown = np.asarray(n & ~o)
      grown_total += grown.sum()
      np.testing.assert_array_equal(np.asarray(w)[grown], 0.0)
      np.testing.assert_array_equal(np.asarray(mu)[grown], 0.0)
  assert grown_total > 0


def test_same_seed_same_masks_other_seed_other_masks(mlp):
  params, loss = mlp

  def final_masks(seed):
    tx = sj.gse(optax.sgd(0.1), sparsity=0.8, update_every=2, end_step=20, seed=seed,
                distribution="uniform")
    state = tx.init(params)
    p = params
    for _ in range(4):
      updates, state = jax.jit(tx.update)(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return sj.masks(state)

  chex.assert_trees_all_equal(final_masks(0), final_masks(0))
  assert not np.array_equal(final_masks(0)["Dense_0"]["kernel"],
                            final_masks(1)["Dense_0"]["kernel"])


def test_statistics_are_required_and_none_skips_an_update(mlp):
  params, loss = mlp
  tx = sj.gse(optax.sgd(0.1), sparsity=0.8, sampling="grabo", update_every=1, end_step=10)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  with pytest.raises(ValueError, match="value_grad_and_statistics") as error:
    tx.update(grads, state, params)
  assert "\n" not in str(error.value)
  _, after = tx.update(grads, state, params, layer_statistics=None)
  assert int(after.extra.skipped_updates) == 1 and not bool(after.masks_changed)
  with pytest.raises(ValueError, match="no statistics for 'Dense_0/kernel'"):
    tx.update(grads, state, params, layer_statistics={})


def test_gse_init_bounds_by_active_fan_in(mlp):
  params, _ = mlp
  state = sj.gse(optax.sgd(0.1), sparsity=0.8, end_step=10).init(params)
  masks = sj.masks(state)
  new = sj.gse_init(jax.random.PRNGKey(0), params, masks)
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    w, m = np.asarray(new[name]["kernel"]), np.asarray(masks[name]["kernel"])
    bound = np.sqrt(3.0) / np.sqrt(np.maximum(m.sum(0), 1))
    assert np.all(np.abs(w) <= bound) and np.all(w[~m] == 0) and np.all(w[m] != 0)
    # The variance of U(−b, b) is b²/3 = 1/fan-in: over all units, about 1.
    assert np.mean((w * np.sqrt(np.maximum(m.sum(0), 1))) [m] ** 2) == pytest.approx(1.0, abs=0.35)
    np.testing.assert_array_equal(new[name]["bias"], params[name]["bias"])


def test_growth_fraction_follows_the_papers_cosine():
  schedule = gse_module.growth_schedule(0.1, 0, 1000)
  np.testing.assert_allclose([schedule(0), schedule(500), schedule(1000), schedule(2000)],
                             [0.2, 0.1, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("keywords,message", [
    (dict(sampling="rigl"), "unknown sampling 'rigl'"), (dict(scope="local"), "unknown scope"),
    (dict(subset_factor=0.0), "subset_factor must be > 0"),
    (dict(growth_fraction=0.6), r"growth_fraction must be in \(0, 0.5\]"),
    (dict(sparsity=1.0), "sparsity"), (dict(end_step=0), "end_step"),
])
def test_bad_arguments_are_one_line_errors(keywords, message):
  with pytest.raises(ValueError, match=message) as error:
    sj.gse(optax.sgd(0.1), **{"sparsity": 0.9, "end_step": 100, **keywords})
  assert "\n" not in str(error.value)


def test_distinct_keeps_each_valid_pair_once():
  flat = jnp.asarray([5, 3, 5, 7, 3, 5, 9])
  valid = jnp.asarray([False, True, True, True, True, True, False])
  values, first = sampling.distinct(flat, valid)
  np.testing.assert_array_equal(values[first], [3, 5, 7])
  assert int(first.sum()) == 3 and values.shape == (7,)
  values, first = sampling.distinct(flat, valid, size=10)  # the masked mode's scatter
  np.testing.assert_array_equal(values, flat)
  np.testing.assert_array_equal(first, [False, True, True, True, False, False, False])

def test_the_runner_computes_statistics_at_update_steps_only(mnist_dir, monkeypatch):
  """:gse with GraEst on LeNet-5 (conv and dense kernels): the statistics step runs at
  the mask updates (steps 2 and 4), the plain step elsewhere, and no update is skipped."""
  from experiments.configs import mnist
  from sparsejax.train import loop, steps

  config = mnist.get_config("gse,lenet5")
  config.num_steps, config.batch_size, config.eval_batch_size = 5, 4, 4
  config.log_every = config.eval_every = config.checkpoint_every = 5
  config.data.data_dir = str(mnist_dir)
  config.sparse.update(sampling="graest", update_every=2, end_step=4, growth_fraction=0.5)
  calls = []
  make = steps.make_train_step

  def counting(experiment, with_statistics=False, mask_update=None):
    step = make(experiment, with_statistics, mask_update)

    def counted(state, batch):
      calls.append(with_statistics)
      return step(state, batch)
    return counted

  monkeypatch.setattr(steps, "make_train_step", counting)
  experiment = loop.setup(config)
  summary = loop.run(experiment, show_progress=False)
  assert calls == [False, True, False, True, False]
  assert summary["coverage"] > 1 - summary["sparsity"] + 0.01  # both updates grew weights
  # GSE's initialisation: every active weight within √3/√(active fan-in of its unit).
  params, masks = experiment.state.params, sj.masks(experiment.state.opt_state)
  kernel, mask = np.asarray(params["Dense_0"]["kernel"]), np.asarray(masks["Dense_0"]["kernel"])
  assert np.all(np.abs(kernel) <= np.sqrt(3.0 / np.maximum(mask.sum(0), 1)))
  assert np.all(kernel[mask] != 0) and np.all(kernel[~mask] == 0)
