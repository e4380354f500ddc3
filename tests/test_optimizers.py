"""Every method around the optimizers people use: no exception, exact nnz, exact zeros,
and on a step without a mask change the inner optimizer's own update."""

from conftest import assert_exactly_sparse, mask_leaves, nnz_per_leaf
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.masks import nnz_targets
from sparsejax.wrapper import apply_masks


class Net(nn.Module):
  """128 → 128 → LayerNorm → 4: adafactor factors the 128×128 kernel."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.LayerNorm()(nn.Dense(128)(x))))


def batch(seed):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((16, 128), dtype=np.float32),
          rng.integers(0, 4, 16).astype(np.int32))


@pytest.fixture(scope="module")
def net():
  model = Net()
  params = model.init(jax.random.PRNGKey(0), batch(0)[0])["params"]

  def loss(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b[0]),
                                                           b[1]).mean()

  return params, loss


def is_kernel(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def labels(params):
  return jax.tree.map(lambda k: "kernels" if k else "others", is_kernel(params))


OPTIMIZERS = {
    "sgd+momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw(mask=tree)": lambda: optax.adamw(1e-2, weight_decay=0.1, mask=is_kernel),
    "chain(masked(decay), adam)": lambda: optax.chain(
        optax.masked(optax.add_decayed_weights(0.1), is_kernel), optax.adam(1e-2)),
    "multi_transform": lambda: optax.multi_transform(
        {"kernels": optax.adam(1e-2), "others": optax.sgd(0.05)}, labels),
    "adafactor": lambda: optax.adafactor(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "muon": lambda: optax.contrib.muon(1e-2),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(1e-2),
    "MultiSteps(adam)": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "apply_if_finite(adam)": lambda: optax.apply_if_finite(optax.adam(1e-2), 3),
}

UPDATE = dict(sparsity=0.8, update_every=2, end_step=6, drop_fraction=lambda step: 0.5)
METHODS = {
    "static": lambda inner: sj.static_sparse(inner, sparsity=0.8),
    "set": lambda inner: sj.set(inner, **UPDATE),
    "rigl": lambda inner: sj.rigl(inner, **UPDATE),
    "dst_ee": lambda inner: sj.dst_ee(inner, c=0.1, **UPDATE),
    "gse": lambda inner: sj.gse(inner, sparsity=0.8, update_every=2, end_step=6,
                                scope="layer"),
    "gmp": lambda inner: sj.gmp(inner, sparsity=0.8, update_every=2, end_step=6,
                                distribution="erk", initial_sparsity=0.3),
    "dst": lambda inner: sj.dst(inner, alpha=1e-2),
}
# Mask-wrapping methods; their train_at_update variants: tests/test_methods.py.
WRAPPED = ("static", "set", "rigl", "dst_ee", "gse", "gmp")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_around_optimizer(net, method, optimizer):
  params, loss = net
  inner = OPTIMIZERS[optimizer]()
  tx = METHODS[method](inner)
  state = tx.init(params)
  targets = nnz_per_leaf(sj.masks(state))

  @jax.jit
  def step(params, state, b):
    grads = jax.grad(loss)(params, b)
    updates, new_state = tx.update(grads, state, params)
    reference = None
    if method in WRAPPED:  # what the inner optimizer alone does with the masked gradient
      reference, _ = inner.update(apply_masks(grads, state.masks), state.inner_state, params)
    return optax.apply_updates(params, updates), new_state, updates, reference

  compared = 0
  for i in range(1, 9):
    old_masks = sj.masks(state)
    params, state, updates, reference = step(params, state, batch(i))
    masks = sj.masks(state)
    assert_exactly_sparse(params, masks)
    if method in ("static", "set", "rigl", "dst_ee", "gse"):
      assert nnz_per_leaf(masks) == targets
    unchanged = all(m is None or np.array_equal(m, o) for m, o in
                    zip(mask_leaves(masks), mask_leaves(old_masks), strict=True))
    if method in WRAPPED and unchanged:
      for u, r, m in zip(jax.tree.leaves(updates), jax.tree.leaves(reference),
                         mask_leaves(masks), strict=True):
        active = np.ones(u.shape, bool) if m is None else np.asarray(m)
        np.testing.assert_allclose(np.asarray(u)[active], np.asarray(r)[active],
                                   rtol=1e-5, atol=1e-7)
      compared += 1
    if method == "dst":  # masks and thresholds agree with the latent weights
      for t, w, m in zip(mask_leaves(sj.thresholds(state)), mask_leaves(state.weights),
                         mask_leaves(masks), strict=True):
        if m is not None:
          np.testing.assert_array_equal(m, np.abs(w) - np.asarray(t) > 0)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  if method in WRAPPED:
    assert compared >= 4
  if method == "gmp":  # every layer ends at exactly its distribution's count
    assert nnz_per_leaf(masks) == mask_leaves(nnz_targets(params, 0.8, "erk"))
