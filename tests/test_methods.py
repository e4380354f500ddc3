"""Method semantics: when masks change, what is dropped and grown, resets, GMP's schedule."""

import chex
from conftest import (
  assert_exactly_sparse,
  loop_count,
  make_batch,
  make_step,
  mask_leaves,
  nnz_per_leaf,
  reference_update,
  run,
)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.masks import nnz_targets, random_masks
from sparsejax.schedules import cosine_drop_fraction, update_steps
from sparsejax.selection import top_k_mask
from sparsejax.wrapper import apply_masks


def test_update_steps_schedule():
  is_update = update_steps(update_every=3, start_step=2, end_step=11)
  assert [t for t in range(1, 20) if is_update(t)] == [5, 8, 11]
  is_update = update_steps(update_every=100, start_step=0, end_step=300)
  assert [t for t in range(0, 501, 50) if is_update(t)] == [100, 200, 300]


def test_cosine_drop_fraction():
  schedule = cosine_drop_fraction(0.3, 100, 300)
  np.testing.assert_allclose([schedule(100), schedule(200), schedule(300), schedule(400)],
                             [0.3, 0.15, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("method", [sj.set, sj.rigl])
def test_masks_change_only_at_update_steps_inside_the_window(mlp, method):
  params, loss = mlp
  tx = method(optax.sgd(0.1, momentum=0.9), sparsity=0.7, update_every=3, start_step=2,
              end_step=11, drop_fraction=lambda step: 0.5)  # constant: the cosine ends at 0
  targets = None
  changed_at = []
  for t, _, new_params, before, after, _ in run(tx, params, loss, 16):
    old, new = sj.masks(before), sj.masks(after)
    targets = targets or nnz_per_leaf(old)
    assert nnz_per_leaf(new) == targets
    if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))):
      changed_at.append(t)
    assert_exactly_sparse(new_params, new)
  assert changed_at == [5, 8, 11]


@pytest.mark.parametrize("train_at_update", [False, True])
def test_rigl_update_matches_the_official_rule(mlp, train_at_update):
  """One mask update against a NumPy port of google-research/rigl's update."""
  params, loss = mlp
  tx = sj.rigl(optax.sgd(0.1), sparsity=0.8, distribution="uniform", update_every=4,
               end_step=100, drop_fraction=lambda step: 0.37, train_at_update=train_at_update)
  *_, (t, p, new_p, before, after, grads) = run(tx, params, loss, 4)
  fraction = 0.37  # 64 · 0.37 = 23.68: truncated to 23 (not rounded to 24)
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    w, g = np.asarray(p[name]["kernel"]).ravel(), np.asarray(grads[name]["kernel"]).ravel()
    old = np.asarray(sj.masks(before)[name]["kernel"]).ravel()
    new = np.asarray(sj.masks(after)[name]["kernel"]).ravel()
    expected, n_prune = reference_update(old, np.abs(w), np.abs(g), fraction)
    np.testing.assert_array_equal(new, expected)
    assert n_prune > 0 and (n_prune != round(fraction * old.sum()) or name != "Dense_0")
    kept, grown = old & new, new & ~old
    after_w = np.asarray(new_p[name]["kernel"]).ravel()
    # Algorithm 1 skips the optimizer step at an update step; optionally kept weights train.
    np.testing.assert_allclose(after_w[kept], (w - 0.1 * g if train_at_update else w)[kept],
                               rtol=1e-6)
    np.testing.assert_array_equal(after_w[~new], 0.0)
    np.testing.assert_array_equal(after_w[grown], 0.0)
    bias_step = 0.1 * np.asarray(grads[name]["bias"]) if train_at_update else 0.0
    np.testing.assert_allclose(new_p[name]["bias"], p[name]["bias"] - bias_step, rtol=1e-6,
                               atol=1e-9)


def buffers(state):
  """The param-shaped buffers of an optax state, by their optax names (momenta, moments)."""
  found = []
  for name in ("mu", "nu", "trace"):
    found += [tree for _, tree in optax.tree_utils.tree_get_all_with_path(state, name)]
  return found


@pytest.mark.parametrize("train_at_update", [False, True])
@pytest.mark.parametrize("inner", [
    optax.adam(1e-2),
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)),
    optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
], ids=["adam", "clip+momentum", "inject(adamw)"])
def test_grown_weights_start_at_zero_with_fresh_optimizer_state(mlp, inner, train_at_update):
  params, loss = mlp
  tx = sj.rigl(inner, sparsity=0.7, update_every=3, end_step=100, drop_fraction=0.5,
               train_at_update=train_at_update)
  *_, (t, p, new_p, before, after, grads) = run(tx, params, loss, 3)
  old_m, new_m = sj.masks(before), sj.masks(after)
  grown = [None if n is None else np.asarray(n & ~o)
           for n, o in zip(mask_leaves(new_m), mask_leaves(old_m), strict=True)]
  assert sum(int(g.sum()) for g in grown if g is not None) > 0
  if train_at_update:  # weights active before and after take the step; grown ones get 0
    kept = jax.tree.map(lambda n, o: None if n is None else n & o, new_m, old_m,
                        is_leaf=lambda x: x is None)
    _, expected = inner.update(apply_masks(grads, kept), before.inner_state, p)
  else:  # the optimizer step is skipped: the state is the one before, but for the reset
    expected = before.inner_state
  expected_buffers, new_buffers = buffers(expected), buffers(after.inner_state)
  assert new_buffers and len(expected_buffers) == len(new_buffers)
  for expected_tree, new_tree in zip(expected_buffers, new_buffers, strict=True):
    for e_leaf, n_leaf, g in zip(jax.tree.leaves(expected_tree), jax.tree.leaves(new_tree),
                                 grown, strict=True):
      if g is None:
        continue
      e_leaf, n_leaf = np.asarray(e_leaf), np.asarray(n_leaf)
      np.testing.assert_array_equal(n_leaf[g], 0.0)  # grown: the initial state (zeros)
      np.testing.assert_allclose(n_leaf[~g], e_leaf[~g], rtol=1e-6, atol=1e-9)
  # The buffers of active weights were non-zero before: the reset is observable.
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(buffers(before.inner_state)))
  # Grown weights are exactly 0 in params after the update.
  for q, g in zip(jax.tree.leaves(new_p), grown, strict=True):
    if g is not None:
      np.testing.assert_array_equal(np.asarray(q)[g], 0.0)


def test_gmp_follows_the_cubic_schedule_and_never_regrows(mlp):
  params, loss = mlp
  start, end, every, final, initial = 2, 14, 3, 0.9, 0.2
  tx = sj.gmp(optax.sgd(0.1), sparsity=final, initial_sparsity=initial, start_step=start,
              end_step=end, update_every=every, distribution="uniform")
  sizes = [320, 192, 48]
  previous = None
  for t, _, new_p, _, after, _ in run(tx, params, loss, 18):
    masks = sj.masks(after)
    nnz = [n for n in nnz_per_leaf(masks) if n is not None]
    if t < start:
      assert nnz == sizes  # dense before pruning starts
    if t == start or (t > start and (t - start) % every == 0 and t <= end):
      progress = min(max((t - start) / (end - start), 0), 1)
      expected = []
      for size in sizes:
        f_nnz, i_nnz = round((1 - final) * size), round((1 - initial) * size)
        expected.append(f_nnz + round((i_nnz - f_nnz) * (1 - progress) ** 3))
      assert nnz == expected, t
    if previous is not None:  # pruned weights never come back
      for a, b in zip(previous, mask_leaves(masks), strict=True):
        if a is not None:
          assert not np.any(np.asarray(b) & ~np.asarray(a))
    previous = mask_leaves(masks)
    assert_exactly_sparse(new_p, masks)
  assert nnz == [round((1 - final) * s) for s in sizes]


def test_gmp_prunes_the_smallest_weights_then_trains_the_rest(mlp):
  params, loss = mlp
  sgd = optax.sgd(0.1)
  tx = sj.gmp(sgd, sparsity=0.5, start_step=1, end_step=2, update_every=1,
              distribution="uniform")
  step = make_step(tx, loss)
  p1, state, _ = step(params, tx.init(params), make_batch(1))
  assert all(m is None or bool(m.all()) for m in mask_leaves(sj.masks(state)))  # s_i = 0
  p2, state, grads = step(p1, state, make_batch(2))
  for name, size in (("Dense_0", 320), ("Dense_1", 192), ("Dense_2", 48)):
    w = np.asarray(p1[name]["kernel"]).ravel()
    expected = np.zeros(size, bool)
    expected[np.argsort(-np.abs(w), kind="stable")[:size // 2]] = True
    np.testing.assert_array_equal(np.asarray(sj.masks(state)[name]["kernel"]).ravel(), expected)
    trained = w - 0.1 * np.asarray(grads[name]["kernel"]).ravel()
    np.testing.assert_allclose(np.asarray(p2[name]["kernel"]).ravel(),
                               np.where(expected, trained, 0.0), rtol=1e-6)


def test_one_shot_prune_magnitude_and_snip(mlp):
  params, loss = mlp
  pruned, masks = sj.prune(params, sparsity=0.75)
  assert nnz_per_leaf(masks) == [None, 80, None, 48, None, 12]
  w = np.abs(np.asarray(params["Dense_0"]["kernel"]))
  m = np.asarray(masks["Dense_0"]["kernel"])
  assert w[m].min() >= w[~m].max()
  assert_exactly_sparse(pruned, masks)
  grads = jax.grad(loss)(params)
  _, snip = sj.prune(params, sparsity=0.75, criterion="snip", grads=grads)
  s = np.abs(np.asarray(params["Dense_0"]["kernel"] * grads["Dense_0"]["kernel"]))
  m = np.asarray(snip["Dense_0"]["kernel"])
  assert s[m].min() >= s[~m].max()
  with pytest.raises(ValueError, match="needs `grads`"):
    sj.prune(params, sparsity=0.5, criterion="snip")
  with pytest.raises(ValueError, match="unknown criterion"):
    sj.prune(params, sparsity=0.5, criterion="random")


def test_from_config_builds_each_method_and_rejects_bad_keys(mlp):
  import ml_collections

  params, _ = mlp
  inner = optax.sgd(0.1)
  cfg = ml_collections.ConfigDict(dict(method="rigl", sparsity=0.9, distribution="erk",
                                       update_every=10, end_step=100, drop_fraction=0.3, seed=0))
  state = sj.from_config(cfg, inner).init(params)
  assert abs(sj.summary(state)["sparsity"] - 0.9) < 1e-3
  assert sj.from_config({"method": "dense"}, inner) is inner
  for method in ("static", "set", "rigl", "gmp", "dst"):
    kwargs = {"static": {"sparsity": 0.5}, "dst": {"alpha": 1e-3}}.get(
        method, {"sparsity": 0.5, "end_step": 10})
    sj.from_config({"method": method, **kwargs}, inner).init(params)
  with pytest.raises(ValueError, match="unknown method 'rigel'"):
    sj.from_config({"method": "rigel", "sparsity": 0.5}, inner)
  with pytest.raises(ValueError, match="takes no config key 'update_every'"):
    sj.from_config({"method": "static", "sparsity": 0.5, "update_every": 3}, inner)


def test_static_masks_never_change(mlp):
  params, loss = mlp
  tx = sj.static_sparse(optax.adam(1e-2), sparsity=0.8)
  initial = sj.masks(tx.init(params))
  for *_, after, _ in run(tx, params, loss, 5):
    chex.assert_trees_all_equal(initial, sj.masks(after))


def test_gmp_reaches_final_sparsity_when_end_step_is_off_the_grid(mlp):
  params, loss = mlp
  tx = sj.gmp(optax.sgd(0.1), sparsity=0.9, end_step=7, update_every=3, distribution="uniform")
  *_, (_, _, _, _, after, _) = run(tx, params, loss, 7)
  assert sj.summary(after)["nnz"] == round(0.1 * 320) + round(0.1 * 192) + round(0.1 * 48)


def test_from_config_accepts_nested_config_dicts_and_numpy_numbers(mlp):
  import ml_collections

  params, _ = mlp
  cfg = ml_collections.ConfigDict(
      dict(method="static", sparsity=np.float32(0.5), distribution={"Dense_0/kernel": 0.75}))
  layers = sj.summary(sj.from_config(cfg, optax.sgd(0.1)).init(params))["layers"]
  assert layers["Dense_0/kernel"]["nnz"] == 80 and layers["Dense_1/kernel"]["nnz"] == 96


def test_a_weight_dropped_and_regrown_keeps_its_value_and_state(mlp):
  params, loss = mlp
  # Drop fraction 1: every active weight is dropped, and the largest gradients over all
  # weights are grown, so some just-dropped weights are regrown (as in the official code).
  inner = optax.sgd(0.1, momentum=0.9)
  tx = sj.rigl(inner, sparsity=0.7, distribution="uniform", update_every=2, end_step=10,
               drop_fraction=lambda step: 1.0)
  *_, (_, p, new_p, before, after, _) = run(tx, params, loss, 2)
  old_masks, new_masks = mask_leaves(sj.masks(before)), mask_leaves(sj.masks(after))
  old_trace = jax.tree.leaves(buffers(before.inner_state))
  new_trace = jax.tree.leaves(buffers(after.inner_state))
  regrown_total = 0
  for i, (old, new) in enumerate(zip(old_masks, new_masks, strict=True)):
    if old is None:
      continue
    old, new = np.asarray(old), np.asarray(new)
    assert old.sum() == new.sum()
    regrown, grown = old & new, new & ~old
    regrown_total += int(regrown.sum())
    w, q = np.asarray(jax.tree.leaves(p)[i]), np.asarray(jax.tree.leaves(new_p)[i])
    np.testing.assert_array_equal(q[regrown], w[regrown])  # value kept (step skipped)
    np.testing.assert_array_equal(np.asarray(new_trace[i])[regrown],
                                  np.asarray(old_trace[i])[regrown])  # momentum kept
    np.testing.assert_array_equal(q[grown], 0.0)
    np.testing.assert_array_equal(np.asarray(new_trace[i])[grown], 0.0)
  assert regrown_total > 0
  assert_exactly_sparse(new_p, sj.masks(after))


def test_gmp_layers_start_at_their_own_density_and_end_at_their_count(mlp):
  """ERK gives some layers more than the initial density: they never drop below their
  final count (initial sparsity 0.3, ERK 0.6: Dense_2 keeps its 45 of 48 weights)."""
  params, loss = mlp
  tx = sj.gmp(optax.sgd(0.1), sparsity=0.6, initial_sparsity=0.3, start_step=1, end_step=7,
              update_every=2, distribution="erk")
  final = mask_leaves(nnz_targets(params, 0.6, "erk"))
  sizes = [None if n is None else p.size for n, p in zip(final, jax.tree.leaves(params))]
  for t, _, _, _, after, _ in run(tx, params, loss, 8):
    nnz = nnz_per_leaf(sj.masks(after))
    assert all(n is None or n >= f for n, f in zip(nnz, final, strict=True))
    if t == 1:
      assert nnz == [None if s is None else max(round(0.7 * s), f)
                     for s, f in zip(sizes, final, strict=True)]
  assert nnz == final
  assert any(f is not None and f > round(0.7 * s) for s, f in zip(sizes, final, strict=True))


STATE_METHODS = {
    "static": lambda: sj.static_sparse(optax.sgd(0.1), sparsity=0.7),
    "set": lambda: sj.set(optax.sgd(0.1), sparsity=0.7, update_every=3, end_step=9),
    "rigl": lambda: sj.rigl(optax.sgd(0.1), sparsity=0.7, update_every=3, end_step=9),
    "gmp": lambda: sj.gmp(optax.sgd(0.1), sparsity=0.7, update_every=3, end_step=9),
    "dst": lambda: sj.dst(optax.sgd(0.5), alpha=1e-2),
    "dst_ee": lambda: sj.dst_ee(optax.sgd(0.1), sparsity=0.7, update_every=3, end_step=9, c=0.1),
    "gse": lambda: sj.gse(optax.sgd(0.1), sparsity=0.7, update_every=3, end_step=9),
}
# Which steps read the dense weight gradient: RigL's updates, every DST step.
DENSE_GRADIENT_STEPS = {"static": [], "set": [], "rigl": [3, 6, 9], "gmp": [],
                        "dst": list(range(1, 13)), "dst_ee": [3, 6, 9], "gse": []}


@pytest.mark.parametrize("method", list(STATE_METHODS))
def test_state_says_what_the_step_did(mlp, method):
  """masks_changed, dense_gradient and ever_active, checked against the masks themselves."""
  params, loss = mlp
  tx = STATE_METHODS[method]()
  get = optax.tree_utils.tree_get
  ever = None
  read_dense, changed = [], []
  for t, _, _, before, after, _ in run(tx, params, loss, 12):
    old, new = mask_leaves(sj.masks(before)), mask_leaves(sj.masks(after))
    differs = any(o is not None and not np.array_equal(o, n) for o, n in zip(old, new))
    assert bool(get(after, "masks_changed")) == differs, t
    changed += [t] if differs else []
    read_dense += [t] if bool(get(after, "dense_gradient")) else []
    ever = [None if n is None else np.asarray(n) | (np.asarray(o) if ever is None else e)
            for o, n, e in zip(old, new, ever or old)]
    if method == "static":
      assert get(after, "ever_active") is None
    else:
      for e, a in zip(ever, mask_leaves(get(after, "ever_active"))):
        np.testing.assert_array_equal(e, a)
  assert read_dense == DENSE_GRADIENT_STEPS[method]
  if method != "dst":  # the cosine drop fraction is 0 at end_step: step 9 changes nothing
    assert changed == {"static": [], "set": [3, 6], "rigl": [3, 6], "gmp": [1, 3, 6, 9],
                       "dst_ee": [3, 6], "gse": [3, 6]}[method]
  expected = sum(int(e.sum()) for e in ever if e is not None) / sum(
      e.size for e in ever if e is not None)
  assert sj.coverage(after)["global"] == pytest.approx(expected, abs=1e-12)


def test_coverage_grows_with_exploration_and_is_per_layer(mlp):
  params, loss = mlp
  tx = sj.set(optax.sgd(0.1), sparsity=0.8, update_every=2, end_step=20, drop_fraction=0.5)
  state = tx.init(params)
  start = sj.coverage(state)
  assert start["global"] == pytest.approx(0.2, abs=0.01)
  *_, (_, _, _, _, state, _) = run(tx, params, loss, 20)
  end = sj.coverage(state)
  assert end["global"] > start["global"] + 0.1
  assert set(end["layers"]) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
  sizes = [m.size for m in mask_leaves(sj.masks(state)) if m is not None]
  weighted = sum(f * n for f, n in zip(end["layers"].values(), sizes)) / sum(sizes)
  assert end["global"] == pytest.approx(weighted)
  with pytest.raises(ValueError, match="no sparsejax method state"):
    sj.coverage(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("method", ["rigl", "set", "dst_ee", "gmp"])
def test_the_compiled_update_does_not_grow_with_the_number_of_layers(method):
  """One selection serves every layer: 3 or 12 layers of assorted shapes, the same loops."""
  def loops(layers):
    params = {f"layer_{i}": {"kernel": jax.numpy.ones((4 + i, 6)), "bias": jax.numpy.zeros(6)}
              for i in range(layers)}
    if method == "gmp":
      tx = sj.gmp(optax.sgd(0.1), sparsity=0.5, update_every=1, start_step=0, end_step=10)
    else:
      factory = {"rigl": sj.rigl, "set": sj.set, "dst_ee": sj.dst_ee}[method]
      tx = factory(optax.sgd(0.1), sparsity=0.5, distribution="uniform", update_every=1,
                   end_step=10)
    state = tx.init(params)
    return loop_count(jax.make_jaxpr(tx.update)(params, state, params).jaxpr)

  assert loops(3) == loops(12)


def test_random_masks_have_the_counts_of_every_leaf_and_depend_on_the_seed():
  params = {"a": np.ones((8, 8)), "b": np.ones((8, 8)), "c": np.ones((4, 6)), "d": np.ones(3)}
  nnz = {"a": 10, "b": 20, "c": 5, "d": None}
  masks = random_masks(jax.random.PRNGKey(3), params, nnz)
  assert masks["d"] is None
  assert {name: int(masks[name].sum()) for name in "abc"} == {"a": 10, "b": 20, "c": 5}
  assert masks["a"].shape == (8, 8) and masks["c"].shape == (4, 6)
  other = random_masks(jax.random.PRNGKey(4), params, nnz)
  assert not np.array_equal(masks["a"], other["a"])
  assert random_masks(jax.random.PRNGKey(3), {"d": np.ones(3)}, {"d": None}) == {"d": None}


def test_random_masks_are_uniform():
  """Over many seeds every entry is active with probability nnz / size."""
  params, nnz = {"w": np.ones((6, 5))}, {"w": 7}
  draw = jax.jit(jax.vmap(lambda key: random_masks(key, params, nnz)["w"]))
  draws = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 600)))
  assert (draws.sum(axis=(1, 2)) == 7).all()
  frequency = draws.mean(0)  # binomial(600, 7/30): std ≈ 0.017
  assert np.abs(frequency - 7 / 30).max() < 0.08


def test_set_grow_scores_are_uniform_and_independent():
  """SET's hashed U(0, 1) scores: top 5 of 40 weights over 3000 seeds pick every weight
  and every pair of weights as often as uniform sampling without replacement would."""
  top5 = jax.jit(jax.vmap(lambda seed: top_k_mask(sj.scores.hashed_uniform(seed, (40,)), 5)))
  picks = np.asarray(top5(jnp.arange(3000, dtype=jnp.uint32) * 7919))
  assert (picks.sum(1) == 5).all()
  frequency = picks.mean(0)  # binomial(3000, 1/8): std ≈ 0.006
  assert np.abs(frequency - 5 / 40).max() < 0.03
  pairs = (picks[:, :, None] & picks[:, None, :]).mean(0)[np.triu_indices(40, 1)]
  assert np.abs(pairs.mean() - 5 / 40 * 4 / 39) < 0.002 and pairs.max() < 0.03
  scores = np.asarray(sj.scores.hashed_uniform(jnp.uint32(3), (4, 1000)))
  assert scores.min() >= 0.0 and scores.max() < 1.0 and abs(scores.mean() - 0.5) < 0.02
  assert not np.array_equal(scores, sj.scores.hashed_uniform(jnp.uint32(4), (4, 1000)))
