"""Exact top-k selection with a traced k."""

from conftest import loop_count
from hypothesis import given, settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.selection import (
  count_each,
  count_true,
  random_subsets,
  sortable_key,
  top_k_each,
  top_k_mask,
  top_k_masks,
)

jitted = jax.jit(top_k_mask)


def test_sortable_key_preserves_order():
  x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
  keys = np.asarray(sortable_key(jnp.asarray(x))).astype(np.int64)
  assert np.all(np.diff(keys) > 0)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.sampled_from([1, 2, 5, 17, 40]),  # a compilation per size
                  elements=st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, 7.25])),
       st.data())
def test_selects_exactly_k_of_the_best_eligible(scores, data):
  eligible = data.draw(hnp.arrays(np.bool_, scores.shape))
  k = data.draw(st.integers(0, scores.size))
  chosen = np.asarray(jitted(jnp.asarray(scores), k, jnp.asarray(eligible)))
  assert chosen.sum() == min(k, eligible.sum())
  assert not np.any(chosen & ~eligible)
  rest = eligible & ~chosen
  if chosen.any() and rest.any():
    assert scores[chosen].min() >= scores[rest].max()
  # Ties are broken by index: among equal scores, lower indices win.
  if chosen.any() and rest.any():
    boundary = scores[chosen].min()
    tied_chosen = np.flatnonzero(chosen & (scores == boundary))
    tied_rest = np.flatnonzero(rest & (scores == boundary))
    if tied_rest.size:
      assert tied_chosen.max() < tied_rest.min()


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 127, 129, 300, 700]), st.integers(0, 700), st.integers(0, 2**31 - 1))
def test_tie_break_across_rows_of_the_counting_layout(n, k, seed):
  """Heavily tied scores over several 128-wide rows: exactly k, lowest indices first."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 3, n).astype(np.float32)
  eligible = rng.random(n) < 0.8
  chosen = np.asarray(jitted(jnp.asarray(scores), k, jnp.asarray(eligible)))
  order = sorted(np.flatnonzero(eligible), key=lambda i: (-scores[i], i))
  expected = np.zeros(n, bool)
  expected[order[:k]] = True
  np.testing.assert_array_equal(chosen, expected)


def test_matches_argsort_on_distinct_scores():
  scores = jax.random.normal(jax.random.PRNGKey(0), (37, 11))
  for k in (0, 1, 13, 200, 407):
    expected = np.zeros(scores.size, bool)
    expected[np.argsort(-np.asarray(scores).ravel())[:k]] = True
    np.testing.assert_array_equal(np.asarray(jitted(scores, k)).ravel(), expected)


def test_traced_k_and_jit_agree_with_eager():
  scores = jax.random.normal(jax.random.PRNGKey(1), (100,))
  eligible = scores > -0.5
  for k in (5, 50):
    np.testing.assert_array_equal(top_k_mask(scores, k, eligible), jitted(scores, k, eligible))


SIZES = (130, 7, 300)  # fixed shapes: one compilation; 300 spans three counting rows
across = jax.jit(top_k_masks)


def _tied_arrays(data) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Scores of SIZES drawn from a few values (many ties), and eligibility flags."""
  values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0])
  arrays = [data.draw(hnp.arrays(np.float32, n, elements=values)) for n in SIZES]
  return arrays, [data.draw(hnp.arrays(np.bool_, n)) for n in SIZES]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_selection_across_arrays_equals_selection_of_their_concatenation(data):
  """top_k_masks = top_k_mask of the concatenation, ties included (earlier array first)."""
  arrays, eligible = _tied_arrays(data)
  k = data.draw(st.integers(0, sum(SIZES)))
  together = np.asarray(jitted(jnp.asarray(np.concatenate(arrays)), k,
                               jnp.asarray(np.concatenate(eligible))))
  apart = across([jnp.asarray(a) for a in arrays], k, [jnp.asarray(e) for e in eligible])
  np.testing.assert_array_equal(np.concatenate([np.asarray(m) for m in apart]), together)


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_counts_of_many_arrays_in_one_pass_equal_numpy(data):
  """count_each (one layout for all arrays, padding never counted) and count_true."""
  shapes = [(1,), (7, 3), (8,), (129, 9), (2, 4, 128), (1025,)]  # padded or not to 8 × 128
  flags = [data.draw(hnp.arrays(np.bool_, shape)) for shape in shapes]
  counts = jax.jit(count_each)([jnp.asarray(f) for f in flags])
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, [f.sum() for f in flags])
  assert [int(count_true(jnp.asarray(f))) for f in flags] == [f.sum() for f in flags]
  assert count_each([]).shape == (0,)


each = jax.jit(top_k_each)
by_segment = jax.jit(top_k_masks, static_argnames="segments")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_one_selection_per_array_equals_separate_selections(data):
  """top_k_each = top_k_mask of every array on its own, ties included."""
  arrays, eligible = _tied_arrays(data)
  ks = [data.draw(st.integers(0, n)) for n in SIZES]
  together = each([jnp.asarray(a) for a in arrays], jnp.asarray(ks),
                  [jnp.asarray(e) for e in eligible])
  for a, e, k, mask in zip(arrays, eligible, ks, together, strict=True):
    np.testing.assert_array_equal(mask, jitted(jnp.asarray(a), k, jnp.asarray(e)))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_segments_of_several_arrays_select_as_their_concatenations(data):
  """Arrays 0 and 2 form segment 1, array 1 segment 0: each as its own concatenation."""
  values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0])
  arrays = [data.draw(hnp.arrays(np.float32, n, elements=values)) for n in SIZES]
  k0 = data.draw(st.integers(0, SIZES[1]))
  k1 = data.draw(st.integers(0, SIZES[0] + SIZES[2]))
  out = by_segment([jnp.asarray(a) for a in arrays], jnp.asarray([k0, k1]), None,
                   segments=(1, 0, 1))
  np.testing.assert_array_equal(out[1], jitted(jnp.asarray(arrays[1]), k0))
  joint = jitted(jnp.asarray(np.concatenate([arrays[0], arrays[2]])), k1)
  np.testing.assert_array_equal(np.concatenate([out[0], out[2]]), joint)


def test_random_subsets_have_exact_sizes_and_are_uniform():
  """k of n entries of every array, every entry equally likely and every pair as often
  as in uniform sampling without replacement; arrays of one size are independent."""
  sizes, ks = [5, 130, 1, 40, 40], [2, 64, 1, 5, 5]
  draw = jax.jit(jax.vmap(lambda key: random_subsets(key, sizes, jnp.asarray(ks))))
  subsets = [np.asarray(s) for s in draw(jax.random.split(jax.random.PRNGKey(0), 3000))]
  for subset, n, k in zip(subsets, sizes, ks, strict=True):
    assert subset.shape == (3000, n) and (subset.sum(1) == k).all()
    assert np.abs(subset.mean(0) - k / n).max() < 0.04  # binomial std ≤ 0.009
  pairs = (subsets[3][:, :, None] & subsets[3][:, None, :]).mean(0)[np.triu_indices(40, 1)]
  assert np.abs(pairs.mean() - 5 / 40 * 4 / 39) < 0.002 and pairs.max() < 0.03
  both = (subsets[3] & subsets[4]).mean(0)  # independent: (5/40)² per entry
  assert np.abs(both.mean() - (5 / 40) ** 2) < 0.003
  again = random_subsets(jax.random.PRNGKey(7), sizes, jnp.asarray(ks))
  for a, b in zip(again, random_subsets(jax.random.PRNGKey(7), sizes, jnp.asarray(ks))):
    np.testing.assert_array_equal(a, b)


def test_the_selection_code_does_not_grow_with_the_number_of_arrays():
  """Two or twenty arrays of different shapes: the same loops."""
  def loops(n):
    scores = [jnp.ones((i + 1, 3)) for i in range(n)]
    return loop_count(jax.make_jaxpr(top_k_each)(scores, jnp.ones(n, jnp.int32)).jaxpr)

  assert loops(2) == loops(20) > 0


LARGE = 40_000  # 320 counting rows: the k-th key's bracket comes from a sample of rows


def _reference(scores: np.ndarray, k: int, eligible: np.ndarray) -> np.ndarray:
  """The k best eligible entries, ties to the lower index, by a stable sort."""
  order = np.flatnonzero(eligible)
  order = order[np.argsort(-scores[order], kind="stable")]
  expected = np.zeros(scores.size, bool)
  expected[order[:k]] = True
  return expected


def _large_scores(kind: str, rng: np.random.Generator) -> np.ndarray:
  if kind == "normal":
    return rng.normal(size=LARGE).astype(np.float32)
  if kind == "heavy tail, zeros":  # like gradients: many exact zeros, a Cauchy tail
    return np.where(rng.random(LARGE) < 0.4, 0, np.abs(rng.standard_cauchy(LARGE))
                    ).astype(np.float32)
  if kind == "few values":
    return rng.integers(0, 4, LARGE).astype(np.float32)
  if kind == "wide":  # magnitudes over 30 orders
    return np.exp(rng.normal(0, 16, LARGE)).astype(np.float32)
  # "sample misleads": the sampled rows (every 17th of 128 entries) hold the largest
  # scores, so the sample's bracket misses the k-th key and the search starts over.
  scores = rng.random(LARGE).astype(np.float32)
  rows = np.arange(LARGE) // 128
  return np.where(rows % 17 == 0, scores + 10, scores)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["normal", "heavy tail, zeros", "few values", "wide", "sample misleads"]),
       st.floats(0, 1), st.floats(0.5, 1), st.integers(0, 2**31 - 1))
def test_large_arrays_select_exactly_the_sorted_k(kind, fraction, eligible_share, seed):
  rng = np.random.default_rng(seed)
  scores = _large_scores(kind, rng)
  eligible = rng.random(LARGE) < eligible_share
  k = int(fraction * eligible.sum())
  chosen = np.asarray(jitted(jnp.asarray(scores), k, jnp.asarray(eligible)))
  np.testing.assert_array_equal(chosen, _reference(scores, k, eligible))


def test_a_misleading_sample_is_caught_and_the_selection_stays_exact():
  """The sampled rows' bracket does not hold the k-th key: the search covers all keys."""
  from sparsejax import selection

  scores = _large_scores("sample misleads", np.random.default_rng(0))
  key, row_segment, _ = selection._layout([jnp.asarray(scores)], [None], [0])
  k = jnp.asarray([LARGE // 2])
  low, high = selection._bracket(key, row_segment, 1, k, jnp.asarray([LARGE]))
  at_low = int(jnp.sum(key >= low[0]))
  at_high = int(jnp.sum(key >= high[0]))
  assert not at_low >= LARGE // 2 > at_high  # the bracket misses
  chosen = np.asarray(jitted(jnp.asarray(scores), LARGE // 2))
  np.testing.assert_array_equal(chosen, _reference(scores, LARGE // 2, np.ones(LARGE, bool)))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["normal", "heavy tail, zeros", "wide", "sample misleads"]),
       st.floats(0.01, 0.99), st.integers(0, 2**31 - 1))
def test_the_threshold_search_takes_few_passes_and_never_many(kind, fraction, seed):
  """Scores with a smooth distribution: a sample's bracket and interpolation find the
  threshold in far fewer passes than the 32 of a bisection; whatever the scores, the
  bisection fallback bounds the search (two guesses, 32 halvings, _SLACK more)."""
  from sparsejax import selection

  scores = _large_scores(kind, np.random.default_rng(seed))
  key, row_segment, _ = selection._layout([jnp.asarray(scores)], [None], [0])
  k, threshold, at_threshold, passes = jax.jit(
      lambda key, k: selection._threshold(key, row_segment, 1, k))(key, int(fraction * LARGE))
  assert int(at_threshold[0]) == int(jnp.sum(key >= threshold[0])) >= int(k[0])
  assert int(passes) <= 2 + 32 + selection._SLACK
  if kind in ("normal", "wide"):  # 4-17 passes measured; a bisection of the bracket: ~22
    assert int(passes) <= 20
