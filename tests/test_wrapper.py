"""The core contract: params exactly sparse after apply_updates alone, with any inner optimizer."""

import functools

import chex
from conftest import (
  assert_exactly_sparse,
  make_batch,
  make_step,
  mask_leaves,
  nnz_per_leaf,
  primitive_names,
)
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.masks import leaf_names
from sparsejax.wrapper import apply_masks

INNER = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "clip+adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    "inject(adam)": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
}


def methods(inner):
  kw = dict(sparsity=0.8, update_every=2, end_step=6, seed=3)
  return {
      "static": sj.static_sparse(inner, sparsity=0.8, seed=3),
      "set": sj.set(inner, **kw),
      "rigl": sj.rigl(inner, **kw),
      "gmp": sj.gmp(inner, sparsity=0.8, update_every=2, end_step=6),
  }


@pytest.mark.parametrize("inner_name", list(INNER))
@pytest.mark.parametrize("method", ["static", "set", "rigl", "gmp"])
def test_exact_nnz_and_zeros_after_every_step(mlp, method, inner_name):
  params, loss = mlp
  tx = methods(INNER[inner_name]())[method]
  state = tx.init(params)
  targets = nnz_per_leaf(sj.masks(state))
  step = make_step(tx, loss)
  for i in range(8):
    before = params
    params, state, _ = step(params, state, make_batch(i))
    masks = sj.masks(state)
    assert_exactly_sparse(params, masks)
    if method != "gmp":
      assert nnz_per_leaf(masks) == targets
    # Exactly the kernels are masked; biases stay dense.
    assert [m is None for m in mask_leaves(masks)] == [p.ndim < 2 for p in
                                                         jax.tree.leaves(params)]
  chex.assert_trees_all_equal_shapes(params, before)


@settings(max_examples=8, deadline=None)  # every example compiles a new init and update
@given(st.floats(0.0, 0.95), st.sampled_from(["uniform", "er", "erk"]), st.integers(0, 99))
def test_first_update_applies_the_initial_mask(mlp, sparsity, distribution, seed):
  params, loss = mlp
  tx = sj.static_sparse(optax.sgd(0.0), sparsity=sparsity, distribution=distribution, seed=seed)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  masks = sj.masks(state)
  # lr 0: active weights keep their value, inactive ones are exactly 0.
  for p, q, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), mask_leaves(masks),
                     strict=True):
    expected = p if m is None else jnp.where(m, p, 0.0)
    np.testing.assert_array_equal(q, expected)
  summary = sj.summary(state)
  assert summary["nnz"] == round((1 - sparsity) * summary["size"])


def test_dense_leaves_follow_the_inner_optimizer_exactly(mlp):
  params, loss = mlp
  inner = optax.adam(1e-2)
  tx = sj.static_sparse(inner, sparsity=0.5)
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  reference, _ = jax.jit(inner.update)(grads, inner.init(params), params)  # tx.update is jitted
  np.testing.assert_array_equal(updates["Dense_1"]["bias"], reference["Dense_1"]["bias"])


def test_gradients_of_inactive_weights_do_not_reach_the_inner_optimizer(mlp):
  params, loss = mlp
  tx = sj.static_sparse(optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)),
                        sparsity=0.9)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  masked = jax.tree.map(lambda g, m: g if m is None else jnp.where(m, g, 0.0), grads,
                        sj.masks(state), is_leaf=lambda x: x is None)
  norm = optax.tree.norm(masked)
  updates, _ = tx.update(grads, state, params)
  # The global norm is computed over active gradients only.
  active = jax.tree.map(lambda u, m: u if m is None else u[m], updates, sj.masks(state),
                        is_leaf=lambda x: x is None)
  np.testing.assert_allclose(optax.tree.norm(active), min(float(norm), 1e-3), rtol=1e-5)


def test_masks_found_when_nested_in_a_chain(mlp):
  params, _ = mlp
  tx = optax.chain(optax.identity(), sj.static_sparse(optax.sgd(0.1), sparsity=0.5))
  masks = sj.masks(tx.init(params))
  assert masks["Dense_0"]["bias"] is None
  chex.assert_shape(masks["Dense_0"]["kernel"], params["Dense_0"]["kernel"].shape)
  assert masks["Dense_0"]["kernel"].dtype == jnp.bool_


def test_summary_counts_masks_not_zero_values(mlp):
  params, loss = mlp
  tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.75, distribution="uniform")
  state = tx.init(params)
  summary = sj.summary(state)  # params are still dense here: counted from masks
  assert summary["layers"]["Dense_0/kernel"] == {"nnz": 80, "size": 320, "sparsity": 0.75}
  assert summary["size"] == 320 + 192 + 48
  assert summary["nnz"] == 140


def test_seed_reproducible_and_seeds_differ(mlp):
  params, loss = mlp
  def run(seed):
    tx = sj.set(optax.sgd(0.1), sparsity=0.8, update_every=1, end_step=4, seed=seed)
    state = tx.init(params)
    step, p = make_step(tx, loss), params
    for i in range(4):
      p, state, _ = step(p, state, make_batch(i))
    return sj.masks(state), p
  (m1, p1), (m2, p2), (m3, _) = run(0), run(0), run(1)
  chex.assert_trees_all_equal(m1, m2)
  chex.assert_trees_all_equal(p1, p2)
  assert not np.array_equal(m1["Dense_0"]["kernel"], m3["Dense_0"]["kernel"])


def test_jit_and_eager_agree(mlp):
  """At every step of a trajectory (update steps included), eager and jitted
  ``tx.update`` agree on the same inputs: masks exactly, updates to float tolerance."""
  params, loss = mlp
  tx = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=8)
  state = tx.init(params)
  jitted = jax.jit(tx.update)
  for i in range(4):
    grads = jax.jit(jax.grad(loss))(params, make_batch(i))
    updates, new_state = jitted(grads, state, params)
    eager_updates, eager_state = tx.update(grads, state, params)
    chex.assert_trees_all_equal(sj.masks(new_state), sj.masks(eager_state))
    chex.assert_trees_all_close(updates, eager_updates, atol=1e-6)
    params, state = optax.apply_updates(params, updates), new_state


def test_update_without_params_is_a_clear_error(mlp):
  params, loss = mlp
  tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.5)
  with pytest.raises(ValueError, match="need `params`"):
    tx.update(jax.grad(loss)(params), tx.init(params))


@pytest.mark.parametrize("build,match", [
    (lambda: sj.rigl(optax.sgd(1), sparsity=1.0, end_step=10), r"sparsity must be in \[0, 1\)"),
    (lambda: sj.set(optax.sgd(1), sparsity=-0.1, end_step=10), r"sparsity must be in \[0, 1\)"),
    (lambda: sj.static_sparse(optax.sgd(1), sparsity=0.5, distribution="erdos"),
     "unknown distribution 'erdos'"),
    (lambda: sj.rigl(optax.sgd(1), sparsity=0.5, start_step=10, end_step=10),
     r"end_step \(10\) must be greater than start_step \(10\)"),
    (lambda: sj.gmp(optax.sgd(1), sparsity=0.5, end_step=0), "end_step"),
    (lambda: sj.rigl(optax.sgd(1), sparsity=0.5, end_step=10, update_every=0), "update_every"),
    (lambda: sj.gmp(optax.sgd(1), sparsity=0.5, initial_sparsity=0.6, end_step=10),
     r"initial_sparsity \(0.6\) must not exceed sparsity \(0.5\)"),
])
def test_bad_arguments_fail_at_construction_with_one_line(build, match):
  with pytest.raises(ValueError, match=match) as info:
    build()
  assert "\n" not in str(info.value)


def test_unknown_path_in_mapping_fails_at_init(mlp):
  params, _ = mlp
  tx = sj.static_sparse(optax.sgd(1), sparsity=0.5, distribution={"Dense_9/kernel": 0.5})
  with pytest.raises(ValueError, match=r"\['Dense_9/kernel'\]") as info:
    tx.init(params)
  assert "\n" not in str(info.value)


def test_dense_predicate_and_mapping_by_path(mlp):
  params, _ = mlp
  tx = sj.static_sparse(optax.sgd(1), sparsity=0.5, distribution={"Dense_1/kernel": 0.25},
                        dense=lambda path, leaf: leaf.ndim < 2 or path.startswith("Dense_2"))
  layers = sj.summary(tx.init(params))["layers"]
  assert set(layers) == {"Dense_0/kernel", "Dense_1/kernel"}
  assert layers["Dense_1/kernel"]["nnz"] == 144 and layers["Dense_0/kernel"]["nnz"] == 160
  with pytest.raises(ValueError, match="nothing to sparsify"):
    sj.static_sparse(optax.sgd(1), sparsity=0.5, dense=lambda p, x: True).init(params)


def test_path_names():
  tree = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}, "list": [jnp.ones(3)]}
  assert leaf_names(tree) == ["list/0", "params/Dense_0/kernel"]


def test_integer_and_empty_leaves_stay_dense_and_masked_1d_leaves_work():
  params = {"table": jnp.arange(16, dtype=jnp.int32).reshape(4, 4),
            "empty": jnp.zeros((0, 8)), "w": jnp.ones((8, 8)), "b": jnp.ones(8)}
  grads = {**jax.tree.map(jnp.ones_like, params), "table": jnp.zeros((4, 4), jnp.int32)}
  for tx in (sj.static_sparse(optax.sgd(0.1), sparsity=0.5),
             sj.rigl(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=5)):
    state = tx.init(params)
    masks = sj.masks(state)
    assert masks["table"] is None and masks["empty"] is None and masks["b"] is None
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["table"], params["table"])  # not zeroed
    assert int(jnp.sum(sj.masks(state)["w"])) == 32
  # A user may mask 1-D and empty leaves: ER/ERK count them, summary never divides by 0.
  everything = lambda path, leaf: not jnp.issubdtype(leaf.dtype, jnp.floating)  # noqa: E731
  for distribution in ("er", "erk"):
    state = sj.static_sparse(optax.sgd(0.1), sparsity=0.5, distribution=distribution,
                             dense=everything).init(params)
    summary = sj.summary(state)
    assert summary["layers"]["empty"] == {"nnz": 0, "size": 0, "sparsity": 0.0}
    assert summary["nnz"] == 36 and set(summary["layers"]) == {"empty", "w", "b"}


def test_summary_with_params_reports_weights_the_masks_do_not_explain(mlp):
  params, loss = mlp
  # Wrong: a transformation after the method rescales its `-p` updates of masked weights.
  wrong = optax.chain(sj.rigl(optax.adam(1e-2), sparsity=0.8, end_step=10), optax.scale(0.5))
  right = sj.rigl(optax.chain(optax.adam(1e-2), optax.scale(0.5)), sparsity=0.8, end_step=10)
  for tx, violations in ((wrong, ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]),
                         (right, [])):
    state = tx.init(params)
    p, s = make_step(tx, loss)(params, state, make_batch(0))[:2]
    summary = sj.summary(s, p)
    assert summary["violations"] == violations
    layer = summary["layers"]["Dense_0/kernel"]
    assert layer["nonzero"] - layer["nonzero_masked"] <= layer["nnz"]
    assert (layer["nonzero_masked"] > 0) == bool(violations)


@pytest.mark.parametrize("mask_update", [None, True], ids=["checked", "host-scheduled"])
@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.apply_if_finite(optax.sgd(0.1), 5)],
                         ids=["sgd", "apply_if_finite"])
def test_a_non_finite_gradient_never_changes_the_masks(mlp, inner, mask_update):
  params, loss = mlp
  tx = sj.rigl(inner, sparsity=0.7, update_every=1, end_step=10)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[3].set(jnp.nan)  # a NaN row
  updates, new_state = jax.jit(functools.partial(tx.update, mask_update=mask_update))(
      grads, state, params)
  chex.assert_trees_all_equal(sj.masks(new_state), sj.masks(state))
  assert int(new_state.nonfinite_updates) == 1
  # The scheduled update step only rewires: no optimizer step, no NaN in the weights.
  chex.assert_trees_all_equal(optax.apply_updates(params, updates),
                              apply_masks(params, sj.masks(state)))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  finite = jax.grad(loss)(params)
  _, after = jax.jit(tx.update)(finite, new_state, params)
  assert int(after.nonfinite_updates) == 1
  assert not np.array_equal(sj.masks(after)["Dense_0"]["kernel"],
                            sj.masks(state)["Dense_0"]["kernel"])
  new = optax.apply_updates(params, updates)
  assert_exactly_sparse(new, sj.masks(new_state))


def test_bf16_params_stay_bf16_and_exactly_sparse(mlp):
  params, loss = mlp
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  tx = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=8)
  state = tx.init(params)
  targets = nnz_per_leaf(sj.masks(state))
  step = make_step(tx, lambda p, b: loss(jax.tree.map(lambda x: x.astype(jnp.float32), p), b))
  for i in range(6):
    params, state, _ = step(params, state, make_batch(i))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    assert_exactly_sparse(params, sj.masks(state))
    assert nnz_per_leaf(sj.masks(state)) == targets


def test_multisteps_outside_counts_real_updates(mlp):
  params, loss = mlp
  tx = optax.MultiSteps(sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2, end_step=10),
                        every_k_schedule=3)
  state = tx.init(params)
  step = make_step(tx, loss)
  initial = sj.masks(state)
  for i in range(12):  # 12 micro-batches: 4 real updates, masks change at the 2nd and 4th
    params, state, _ = step(params, state, make_batch(i))
    # Params are dense until the first real update applies the initial masks.
    assert (sj.summary(state, params)["violations"] == []) == (i >= 2)
    if i == 4:  # after 5 micro-batches: one real update, no mask change yet
      chex.assert_trees_all_equal(sj.masks(state), initial)
  assert int(optax.tree_utils.tree_get(state, "step")) == 4
  assert not np.array_equal(sj.masks(state)["Dense_0"]["kernel"], initial["Dense_0"]["kernel"])


def _host_scheduled_step(tx, loss):
  """``make_step`` with ``mask_update`` a static argument, as a loop that knows its step."""

  def step(params, state, batch, mask_update):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, mask_update=mask_update)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, static_argnames="mask_update")


@pytest.mark.parametrize("method", ["static", "set", "rigl", "dst_ee", "gmp", "gse", "dst"])
def test_steps_scheduled_on_the_host_equal_the_checked_step(mlp, method):
  """``mask_update=tx.is_update_step(t)`` (two compiled steps) gives the masks of the
  step that checks the schedule itself, changing at the schedule's steps, and its params
  and state to float rounding (two programs, fused differently)."""
  params, loss = mlp
  kw = dict(sparsity=0.8, update_every=3, start_step=1, end_step=13)
  tx = {"static": lambda: sj.static_sparse(optax.adam(1e-2), sparsity=0.8),
        "set": lambda: sj.set(optax.adam(1e-2), **kw),
        "rigl": lambda: sj.rigl(optax.adam(1e-2), **kw),
        "dst_ee": lambda: sj.dst_ee(optax.adam(1e-2), c=0.1, **kw),
        "gmp": lambda: sj.gmp(optax.adam(1e-2), **kw),
        "gse": lambda: sj.gse(optax.adam(1e-2), growth_fraction=0.3, **kw),
        "dst": lambda: sj.dst(optax.adam(1e-2), alpha=1.0)}[method]()
  assert isinstance(tx, sj.SparseTransformation)
  checked, scheduled = make_step(tx, loss), _host_scheduled_step(tx, loss)
  state = hosted_state = tx.init(params)
  hosted_params, changed_at = params, []
  for t in range(1, 12):
    params, state, _ = checked(params, state, make_batch(t))
    hosted_params, hosted_state = scheduled(hosted_params, hosted_state, make_batch(t),
                                            mask_update=tx.is_update_step(t))
    chex.assert_trees_all_equal(sj.masks(hosted_state), sj.masks(state))
    chex.assert_trees_all_close((hosted_params, hosted_state), (params, state), atol=1e-6)
    if bool(optax.tree_utils.tree_get(state, "masks_changed")) and method != "dst":
      changed_at.append(t)
  expected = [] if method in ("static", "dst") else [4, 7, 10]
  # GMP's schedule also has its start step, where the dense start leaves nothing to prune.
  scheduled = [1] + expected if method == "gmp" else expected
  assert [t for t in range(1, 12) if tx.is_update_step(t)] == scheduled
  assert changed_at == expected


def test_a_step_without_mask_updates_compiles_no_mask_update_code(mlp):
  """``mask_update=False`` traces RigL's step to a static sparse step: no cond, no loop."""
  params, loss = mlp

  grads = jax.grad(loss)(params)
  rigl = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=3, end_step=10)
  static = sj.static_sparse(optax.adam(1e-2), sparsity=0.8)
  plain = jax.make_jaxpr(lambda g, s, p: rigl.update(g, s, p, mask_update=False))(
      grads, rigl.init(params), params).jaxpr
  checked = jax.make_jaxpr(rigl.update)(grads, rigl.init(params), params).jaxpr
  reference = jax.make_jaxpr(static.update)(grads, static.init(params), params).jaxpr
  assert "cond" in primitive_names(checked)
  assert not {"cond", "while", "scan", "sort"} & set(primitive_names(plain))
  assert sorted(primitive_names(plain)) == sorted(primitive_names(reference))


def test_mask_update_must_be_known_when_tracing(mlp):
  params, loss = mlp
  tx = sj.rigl(optax.adam(1e-2), sparsity=0.8, update_every=3, end_step=10)
  grads, state = jax.grad(loss)(params), tx.init(params)
  with pytest.raises(TypeError, match="mask_update must be None or a Python bool"):
    jax.jit(lambda flag: tx.update(grads, state, params, mask_update=flag))(True)
  with pytest.raises(TypeError, match="got int"):
    tx.update(grads, state, params, mask_update=1)
