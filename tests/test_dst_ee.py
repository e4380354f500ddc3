"""DST-EE: RigL at c = 0, the acquisition score against NumPy, exact activity counts."""

import chex
from conftest import (
  assert_exactly_sparse,
  make_batch,
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
from sparsejax.methods.dst_ee import ActivityCounts, count_activity, count_dtype
from sparsejax.scores import ScoreInputs

KERNELS = ("Dense_0", "Dense_1", "Dense_2")
SETTINGS = dict(sparsity=0.7, update_every=2, end_step=16, drop_fraction=0.5)


def leaves(tree):
  return [None if x is None else np.asarray(x) for x in mask_leaves(tree)]


def test_c_zero_is_rigl_bit_for_bit(mlp):
  """Masks, params and optimizer state equal sj.rigl's at every step of 8 updates."""
  params, loss = mlp
  inner = optax.sgd(0.1, momentum=0.9)
  rigl = run(sj.rigl(inner, **SETTINGS), params, loss, 18)
  dst_ee = run(sj.dst_ee(inner, c=0.0, **SETTINGS), params, loss, 18)
  changes = 0
  for (t, _, p_rigl, _, s_rigl, _), (_, _, p_ee, _, s_ee, _) in zip(rigl, dst_ee):
    for a, b in zip(leaves(sj.masks(s_rigl)), leaves(sj.masks(s_ee))):
      assert (a is None and b is None) or np.array_equal(a, b), t
    chex.assert_trees_all_equal(p_rigl, p_ee)
    chex.assert_trees_all_equal(s_rigl.inner_state, s_ee.inner_state)
    changes += bool(s_ee.masks_changed)
  assert changes >= 6
  assert int(s_ee.extra.updates) == 8


@pytest.mark.parametrize("c,c_decay", [(0.05, 1.0), (0.05, 0.5)])
def test_each_update_grows_by_the_acquisition_score(mlp, c, c_decay):
  """Every update against google-research/rigl's rule with the score computed in NumPy
  from the recorded counts: |g| + c·decay^⌊step/3⌋·√(ln t / (N + ε))."""
  params, loss = mlp
  eps = 0.5
  tx = sj.dst_ee(optax.adam(1e-2), c=c, eps=eps, c_decay=c_decay, c_decay_every=3,
                 **SETTINGS)
  fraction = optax.cosine_decay_schedule(0.5, 16)
  counts = [np.zeros(p.shape, np.int64) for p in (params[k]["kernel"] for k in KERNELS)]
  updates = 0
  for t, p, new_p, before, after, grads in run(tx, params, loss, 16):
    old = [np.asarray(sj.masks(before)[k]["kernel"]) for k in KERNELS]
    if t % 2:
      continue
    updates += 1
    counts = [n + m for n, m in zip(counts, old)]
    c_t = c * c_decay ** (t // 3)
    for i, name in enumerate(KERNELS):
      g = np.asarray(grads[name]["kernel"], np.float32)
      score = np.abs(g) + np.float32(c_t) * np.sqrt(np.log(np.float32(updates)) / (counts[i] + eps),
                                                  dtype=np.float32)
      expected, _ = reference_update(old[i].ravel(), np.abs(np.asarray(p[name]["kernel"])).ravel(),
                                     score.ravel(), fraction(t))
      np.testing.assert_array_equal(np.asarray(sj.masks(after)[name]["kernel"]).ravel(), expected,
                                    err_msg=f"step {t}, {name}")
      np.testing.assert_array_equal(np.asarray(after.extra.counts[name]["kernel"]), counts[i])
    assert int(after.extra.updates) == updates
    assert_exactly_sparse(new_p, sj.masks(after))


def test_counts_follow_a_hand_built_sequence_of_masks():
  """N += the replaced mask at each update, a weight dropped and later regrown included."""
  sequence = [np.array([[1, 1, 0, 0]]), np.array([[0, 1, 1, 0]]),  # w[0] dropped
              np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 1]])]  # w[0] regrown
  extra = ActivityCounts(jnp.zeros((), jnp.int32),
                         {"w": jnp.zeros((1, 4), jnp.uint8), "b": None})
  expected = np.zeros((1, 4), int)
  for t, mask in enumerate(sequence, start=1):
    masks = {"w": jnp.asarray(mask, bool), "b": None}
    extra = count_activity(ScoreInputs(None, None, masks, None, None, extra))
    expected += mask
    assert int(extra.updates) == t and extra.counts["b"] is None
    np.testing.assert_array_equal(extra.counts["w"], expected)
  np.testing.assert_array_equal(expected, [[3, 3, 1, 1]])
  assert extra.counts["w"].dtype == jnp.uint8


def test_counts_over_a_run_and_grown_weights_start_fresh(mlp):
  """N equals a hand count of the masks each update replaced; a weight dropped and
  regrown keeps its count; grown weights are 0 with zero momentum; exact nnz."""
  params, loss = mlp
  tx = sj.dst_ee(optax.sgd(0.1, momentum=0.9), c=0.1, **SETTINGS)
  counts, targets, history = None, None, []
  for t, _, new_p, before, after, _ in run(tx, params, loss, 16):
    old, new = leaves(sj.masks(before)), leaves(sj.masks(after))
    targets = targets or nnz_per_leaf(sj.masks(before))
    assert nnz_per_leaf(sj.masks(after)) == targets
    assert_exactly_sparse(new_p, sj.masks(after))
    if t % 2 == 0:
      counts = [None if m is None else m.astype(int) + (0 if counts is None else n)
                for m, n in zip(old, counts or old)]
      history.append(new)
      momentum = leaves(after.inner_state[0].trace)
      for o, n, w, mu in zip(old, new, jax.tree.leaves(new_p), momentum):
        if o is not None:
          np.testing.assert_array_equal(np.asarray(w)[n & ~o], 0.0)
          np.testing.assert_array_equal(mu[n & ~o], 0.0)
    for n, got in zip(counts or [], leaves(after.extra.counts)):
      if n is not None:
        np.testing.assert_array_equal(got, n)
  # Some weight was active, then inactive at a later update, then active again.
  returned = 0
  for leaf in range(len(history[0])):
    if history[0][leaf] is not None:
      stacked = np.stack([h[leaf] for h in history])
      returned += sum(int((stacked[:i].any(0) & ~stacked[i] & stacked[i + 1:].any(0)).sum())
                      for i in range(1, len(history) - 1))
  assert returned > 0


def test_jit_equals_eager(mlp):
  """On the same inputs, jitted and eager ``tx.update`` agree at every step of a
  trajectory with 3 updates: masks and counts exactly, updates to float tolerance."""
  params, loss = mlp
  tx = sj.dst_ee(optax.adam(1e-2), c=0.1, **SETTINGS)
  state = tx.init(params)
  jitted = jax.jit(tx.update)
  for i in range(1, 7):
    grads = jax.jit(jax.grad(loss))(params, make_batch(i))
    updates, new_state = jitted(grads, state, params)
    eager_updates, eager_state = tx.update(grads, state, params)
    chex.assert_trees_all_equal(sj.masks(new_state), sj.masks(eager_state))
    chex.assert_trees_all_equal(new_state.extra, eager_state.extra)
    chex.assert_trees_all_close(updates, eager_updates, atol=1e-6)
    params, state = optax.apply_updates(params, updates), new_state
  assert int(state.extra.updates) == 3


def test_coverage_grows_with_c_and_exceeds_rigl(mlp):
  params, loss = mlp
  settings = dict(SETTINGS, sparsity=0.9, end_step=40)

  def final_coverage(tx):
    *_, (_, _, _, _, state, _) = run(tx, params, loss, 40)
    return sj.coverage(state)["global"]

  rigl = final_coverage(sj.rigl(optax.sgd(0.1), **settings))
  by_c = [final_coverage(sj.dst_ee(optax.sgd(0.1), c=c, **settings))
          for c in (0.0, 0.001, 0.003, 0.1)]
  assert by_c[0] == rigl
  # Strictly more exploration up to c = 0.003; from c ≈ 0.01 on, this tiny model's
  # coverage is at its ceiling (every update grows only never-active weights).
  assert by_c[0] < by_c[1] < by_c[2] <= by_c[3]


def test_counts_use_the_smallest_dtype_that_holds_the_run():
  assert count_dtype(255) == np.uint8 and count_dtype(256) == np.uint16
  assert count_dtype(70_000) == np.uint32
  params = {"w": jnp.ones((4, 8))}
  for end_step, dtype in ((25_500, jnp.uint8), (25_600, jnp.uint16)):
    state = sj.dst_ee(optax.sgd(0.1), sparsity=0.5, end_step=end_step).init(params)
    assert state.extra.counts["w"].dtype == dtype


@pytest.mark.parametrize("keywords,message", [
    (dict(c=-0.1), "c must be >= 0"), (dict(eps=0.0), "eps must be > 0"),
    (dict(c_decay=0.0), r"c_decay must be in \(0, 1\]"), (dict(c_decay=1.5), "c_decay"),
    (dict(c_decay_every=0), "c_decay_every must be >= 1"),
    (dict(sparsity=1.0), "sparsity"), (dict(distribution="nope"), "distribution"),
])
def test_bad_arguments_are_one_line_errors(keywords, message):
  with pytest.raises(ValueError, match=message) as error:
    sj.dst_ee(optax.sgd(0.1), **{"sparsity": 0.9, "end_step": 100, **keywords})
  assert "\n" not in str(error.value)
