"""Exact top-k selection with a traced k, without sorting.

A mask update must keep exactly ``k`` entries per leaf, where ``k`` depends on the
step (a traced value) and leaves can hold millions of scores. A full sort costs
``O(n log n)`` and ``lax.top_k`` needs a static ``k``; instead we search for a
threshold on an order-preserving uint32 key of the scores with exactly ``k`` keys at
or above it: every step is one pass that counts ``key >= candidate``. The search
starts from a bracket read off a sample of every 17th row, then interpolates the
counts at the bracket's ends (regula falsi), with bisection as the fallback that
bounds the worst case: about 10 passes on the scores of a mask update, where a
bisection over the 32 bits takes 32. Where the k-th key is tied, a second search
over positions takes the tied keys in row-major order. On 1M scores this takes a
few ms on a CPU core, against ~60 ms for ``lax.top_k`` and ~250 ms for a sort
(``python benchmarks/topk.py``).

All arrays of a selection are laid out as one ``[rows, 128]`` key array, each
array's rows tagged with its *segment*; one search finds every segment's threshold
at once (counts per row, summed per segment). A mask update of every layer is then
two selections whatever the number of layers, so its compiled code does not grow
with the model's depth.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_SIGN_BIT = np.uint32(0x80000000)  # numpy: importing must not start a JAX backend
_COLUMNS = 128  # counts run over a [rows, 128] layout
_ROW_GROUP = 8  # every array's rows padded to a multiple: counts sum 8 rows as uint8 first
_SAMPLE_STRIDE = 17  # the k-th key's bracket comes from every 17th row of a segment ...
_SAMPLE_ALL = 8 * _SAMPLE_STRIDE  # ... or from all its rows, when it has at most this many
_SAMPLE_BITS = 20  # ... found to this many top bits of the key ...
_SAMPLE_UNIT = np.uint32(1 << (32 - _SAMPLE_BITS))
_SAMPLE_Z = 4.0  # the bracket's half-width, in standard deviations of the sample quantile
_SLACK = 4  # passes a segment may take beyond a bisection of its bracket


def _layout_rows(n: int) -> int:
  """Layout rows of an array of ``n`` entries: a positive multiple of ``_ROW_GROUP``."""
  group = _ROW_GROUP * _COLUMNS
  return max(-(-n // group), 1) * _ROW_GROUP


def sortable_key(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (scores must not be NaN).

  Args:
    scores: a float array.

  Returns:
    A uint32 array of the same shape; ``a < b`` iff ``key(a) < key(b)``.
  """
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  negative = (bits & _SIGN_BIT) != 0
  return jnp.where(negative, ~bits, bits | _SIGN_BIT)


def _as_rows(values: jax.Array, rows: int) -> jax.Array:
  """``values`` flattened and padded with zeros (False, key 0) to ``[rows, _COLUMNS]``."""
  flat = values.reshape(-1)
  return jnp.pad(flat, (0, rows * _COLUMNS - flat.size)).reshape(rows, _COLUMNS)


def _layout(scores: list[jax.Array], eligible: list[jax.Array | None], segments: list[int]
            ) -> tuple[jax.Array, jax.Array, dict[int, int]]:
  """All arrays as one ``[rows, _COLUMNS]`` layout, ordered by segment then position.

  Returns:
    ``(key, row_segment, starts)``: order-preserving keys, 0 exactly where not
    eligible or padding (a non-NaN score's key is never 0), the segment of every row,
    and where each array's entries start in the flattened layout.
  """
  order = sorted(range(len(scores)), key=lambda i: (segments[i], i))
  keys, row_segments, starts = [], [], {}
  start = 0
  for i in order:
    n = scores[i].size
    rows = _layout_rows(n)
    starts[i], start = start, start + rows * _COLUMNS
    ok = jnp.ones((n,), bool) if eligible[i] is None else eligible[i].reshape(-1)
    key = jnp.where(ok, sortable_key(scores[i].reshape(-1)), jnp.uint32(0))
    keys.append(_as_rows(key, rows))  # padded entries: key 0, never chosen
    row_segments.append(np.full((rows,), segments[i], np.int32))  # static
  sizes: dict[int, int] = {}
  for i in order:
    sizes[segments[i]] = sizes.get(segments[i], 0) + scores[i].size
  if max(sizes.values()) >= 2**31 - len(scores) * _ROW_GROUP * _COLUMNS:  # int32, padded
    raise ValueError(f"top_k_masks supports under 2**31 entries per segment, got "
                     f"{max(sizes.values())}")
  return jnp.concatenate(keys), np.concatenate(row_segments), starts


def _per_segment(flags: jax.Array, row_segment: np.ndarray, count: int) -> jax.Array:
  """Number of True entries of ``flags [rows, _COLUMNS]`` in every segment, as int32.

  ``row_segment`` (static) is the segment of every row, the same within every group of
  ``_ROW_GROUP`` rows. Summing the
  rows of a group first, as uint8 (at most 8), reads the flags once in vector-wide
  adds and leaves an array 8 times smaller to reduce (XLA:CPU does not fuse a
  reduction into its producer, so the flags are materialised either way: 2.3 times
  faster than float32 row sums on 2.9M entries).
  """
  per_group = jnp.sum(flags.reshape(-1, _ROW_GROUP, _COLUMNS), axis=1, dtype=jnp.uint8)
  per_group = jnp.sum(per_group, axis=1, dtype=jnp.int32)
  return jax.ops.segment_sum(per_group, jnp.asarray(row_segment[::_ROW_GROUP]),
                             num_segments=count, indices_are_sorted=True)


def count_true(flags: jax.Array) -> jax.Array:
  """Number of True entries of a bool array, as an int32 scalar.

  Sums groups of 8 as uint8 first: a plain int32 sum makes XLA:CPU materialise a
  4-byte copy of every flag before reducing.
  """
  flat = flags.reshape(-1)
  if flat.size % _ROW_GROUP:
    return jnp.sum(flat, dtype=jnp.int32)
  return jnp.sum(jnp.sum(flat.reshape(-1, _ROW_GROUP), axis=1, dtype=jnp.uint8),
                 dtype=jnp.int32)


def count_each(flags: list[jax.Array]) -> jax.Array:
  """Number of True entries of every bool array, in one pass over all of them.

  The arrays are laid out together as in a selection and counted per segment: one
  kernel whatever their number, where a count per array compiles one reduction each
  (and XLA duplicates scalars combined from many of them into every consumer).

  Args:
    flags: bool arrays of any shapes.

  Returns:
    ``[len(flags)]`` int32 counts.
  """
  if not flags:
    return jnp.zeros((0,), jnp.int32)
  rows = [_layout_rows(f.size) for f in flags]
  layout = jnp.concatenate([_as_rows(f, r) for f, r in zip(flags, rows, strict=True)])
  row_segment = np.repeat(np.arange(len(flags), dtype=np.int32), rows)
  return _per_segment(layout, row_segment, len(flags))


def top_k_masks(scores: list[jax.Array], k: jax.Array | int,
                eligible: list[jax.Array | None] | None = None,
                segments: list[int] | None = None) -> list[jax.Array]:
  """Marks, in every segment of arrays, the ``k`` eligible entries with the highest scores.

  A segment is a group of arrays selected from together, as if concatenated (without
  forming the concatenation): by default all arrays form one segment and ``k`` is a
  scalar; with ``segments`` (one segment index per array, ``0 .. count - 1``) ``k``
  holds one count per segment. Every segment gets exactly ``min(k[s], eligible in s)``
  entries, and among equal scores an earlier array, then a lower flat index, wins.
  All segments share one search: the compiled code does not grow with their number.

  Args:
    scores: float arrays of any shapes (no NaN).
    k: entries to select per segment: a scalar, or ``[count]`` with ``segments``
      (may be traced).
    eligible: optional bool arrays like ``scores`` (None entries: all eligible).
    segments: optional segment index of every array.

  Returns:
    Bool arrays like ``scores``.
  """
  eligible = eligible or [None] * len(scores)
  segments = [0] * len(scores) if segments is None else list(segments)
  count = max(segments) + 1
  key, row_segment, starts = _layout(scores, eligible, segments)
  chosen = _select(key, row_segment, count, k).reshape(-1)
  return [chosen[starts[i]:starts[i] + s.size].reshape(s.shape) for i, s in enumerate(scores)]


def random_subsets(key: jax.Array, sizes: list[int], k: jax.Array | list[int]
                   ) -> list[jax.Array]:
  """Uniformly random subsets of ``k[i]`` of ``sizes[i]`` entries, for every ``i``.

  The keys of every array are drawn at once, directly in the selection's layout (31
  random bits plus 1; padding 0, never chosen), and one selection keeps
  the ``k[i]`` largest of every array: the compiled code holds one random draw and one
  selection whatever the number of arrays. Equal keys, rare with 31 bits, go to the
  lower index.

  Args:
    key: a PRNG key.
    sizes: number of entries of every array.
    k: entries to choose per array, ``[len(sizes)]`` (may be traced).

  Returns:
    Flat bool arrays of ``sizes``.
  """
  if not sizes:
    return []
  rows = [_layout_rows(n) for n in sizes]
  valid = np.concatenate([np.minimum(np.maximum(n - _COLUMNS * np.arange(r), 0), _COLUMNS)
                          for n, r in zip(sizes, rows)])  # valid columns of every row
  row_segment = np.repeat(np.arange(len(sizes), dtype=np.int32), rows)
  bits = (jax.random.bits(key, (sum(rows), _COLUMNS), jnp.uint32) >> 1) + jnp.uint32(1)
  column = jax.lax.broadcasted_iota(jnp.int32, bits.shape, 1)
  keys = jnp.where(column < jnp.asarray(valid, jnp.int32)[:, None], bits, jnp.uint32(0))
  chosen = _select(keys, row_segment, len(sizes), k, _uniform_bracket)
  starts = np.cumsum([0] + rows)
  return [chosen[a:b].reshape(-1)[:n] for a, b, n in zip(starts[:-1], starts[1:], sizes)]


def _sample_rows(row_segment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Static rows of a layout that sample every segment, and the segment of each.

  Every ``_SAMPLE_STRIDE``-th row of a segment, counted from its first row (an odd
  stride, so that it cycles through the row patterns of any power-of-two layer width),
  and all rows of a segment of at most ``_SAMPLE_ALL`` rows. Each segment's sample is
  padded to a multiple of ``_ROW_GROUP`` rows with the index ``rows`` (read as zeros:
  not eligible).
  """
  rows = row_segment.size
  starts = np.flatnonzero(np.r_[True, row_segment[1:] != row_segment[:-1]])
  ends = np.r_[starts[1:], rows]
  picked, segments = [], []
  for start, end in zip(starts, ends):
    stride = 1 if end - start <= _SAMPLE_ALL else _SAMPLE_STRIDE
    taken = np.arange(start, end, stride)
    padded = -(-taken.size // _ROW_GROUP) * _ROW_GROUP
    picked.append(np.pad(taken, (0, padded - taken.size), constant_values=rows))
    segments.append(np.full((padded,), row_segment[start], np.int32))
  return np.concatenate(picked), np.concatenate(segments)


def _kth_in_sample(sample: jax.Array, row_segment: np.ndarray, count: int,
                   ranks: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Per segment, the keys of the given ranks (1 = largest) of a small layout, rounded down.

  A bisection on the top ``_SAMPLE_BITS`` bits, both ranks in the same passes: every
  result is the k-th key with its lower bits cleared. A rank above the eligible count
  gives 0.
  """
  segment = jnp.asarray(row_segment)

  def add_bit(bit, thresholds):
    one = jnp.uint32(1) << jnp.asarray(31 - bit, jnp.uint32)
    out = []
    for threshold, rank in zip(thresholds, ranks):
      candidate = threshold | one
      at_candidate = _per_segment(sample >= candidate[segment][:, None], row_segment, count)
      out.append(jnp.where(at_candidate >= rank, candidate, threshold))
    return tuple(out)

  zeros = jnp.zeros((count,), jnp.uint32)
  return jax.lax.fori_loop(0, _SAMPLE_BITS, add_bit, (zeros, zeros))


def _bracket(key: jax.Array, row_segment: np.ndarray, count: int, k: jax.Array,
             eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per segment, keys ``lo < hi`` that likely hold the k-th key: ``[lo, hi)``.

  The ranks of the k-th key's quantile in a sample of rows, widened by
  ``_SAMPLE_Z`` standard deviations of a sample quantile (with the finite-population
  correction, so a segment sampled whole gets a bracket of a few keys). The search
  counts all keys at both ends first, so a bracket that misses costs two passes.
  """
  rows, segments = _sample_rows(row_segment)
  sample = jnp.take(key, jnp.asarray(rows), axis=0, mode="fill", fill_value=0)
  in_sample = _per_segment(sample != 0, segments, count)
  in_sample = in_sample.astype(jnp.float32)
  total = jnp.maximum(eligible, 1).astype(jnp.float32)
  p = k.astype(jnp.float32) / total
  expected = p * in_sample
  spread = _SAMPLE_Z * jnp.sqrt(jnp.maximum(expected * (1 - p) * (1 - in_sample / total), 0))
  high_rank = jnp.floor(expected - spread - 1).astype(jnp.int32)
  low_rank = jnp.ceil(expected + spread + 1).astype(jnp.int32)
  high, low = _kth_in_sample(sample, segments, count, (high_rank, low_rank))
  # Fewer than high_rank sample keys are at or above the next multiple (keys < 0xFFFFFFFF).
  high = jnp.where(high_rank >= 1, high + _SAMPLE_UNIT, jnp.uint32(0xFFFFFFFF))
  low = jnp.where(low_rank <= in_sample, jnp.maximum(low, 1), jnp.uint32(1))
  return low, jnp.maximum(high, low + 1)


def _narrow(count_at: Callable[[jax.Array], jax.Array], k: jax.Array, low: jax.Array,
            high: jax.Array, at_low: jax.Array, at_high: jax.Array,
            guesses: tuple[jax.Array, ...] = (), interpolate: bool = True
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per segment, a point where a non-increasing count falls to ``k``.

  Narrows a bracket with ``count_at(low) >= k > count_at(high)`` by one pass over all
  keys per step (``count_at``: one uint32 point per segment, the counts as int32). The
  first candidates are the ``guesses``; the next ones interpolate the counts at both
  ends linearly (regula falsi, with the Illinois halving against one-sided steps), or
  bisect whenever the passes left would not otherwise suffice: at most ``_SLACK``
  passes more than the guesses and a bisection. A segment stops when its lower end
  counts exactly ``k``, or when the bracket is one point wide. Without ``interpolate``,
  every step bisects: a smaller program, for searches that rarely run.

  Returns:
    ``(low, at_low, passes)``: per segment, the point and its count (``> k`` only when
    the count falls past ``k`` between ``low`` and ``low + 1``); the passes taken.
  """
  def passes_needed(low, high):  # bisection passes to a one-point bracket
    return 32 - jax.lax.clz(jnp.maximum(high - low, 1) - 1).astype(jnp.int32)

  def searching(state):
    low, high, at_low, *_ = state
    return jnp.any((at_low != k) & (high - low > 1))

  def narrow(state):
    low, high, at_low, at_high, f_low, f_high, moved, left, step = state
    width = high - low
    if interpolate:
      offset = jnp.round(width.astype(jnp.float32) * (f_low / (f_low - f_high)))
      offset = jnp.where(passes_needed(low, high) >= left, width // 2,
                         offset.astype(jnp.uint32))
    else:
      offset = width // 2
    candidate = low + offset
    for i, guess in enumerate(guesses):
      candidate = jnp.where(step == i, guess, candidate)
    candidate = jnp.clip(candidate, low + 1, jnp.maximum(high, low + 2) - 1)
    at_candidate = count_at(candidate)
    active = (at_low != k) & (width > 1)
    raise_low = active & (at_candidate >= k)
    lower_high = active & (at_candidate < k)
    if interpolate:
      f_candidate = (at_candidate - k).astype(jnp.float32) + 0.5
      # Illinois: an end kept twice in a row counts half, so the next point moves past it.
      f_low = jnp.where(raise_low, f_candidate,
                        jnp.where(lower_high & (moved < 0), f_low / 2, f_low))
      f_high = jnp.where(lower_high, f_candidate,
                         jnp.where(raise_low & (moved > 0), f_high / 2, f_high))
      moved = jnp.where(raise_low, 1, jnp.where(lower_high, -1, moved))
    return (jnp.where(raise_low, candidate, low), jnp.where(lower_high, candidate, high),
            jnp.where(raise_low, at_candidate, at_low),
            jnp.where(lower_high, at_candidate, at_high), f_low, f_high, moved, left - 1,
            step + 1)

  state = (low, high, at_low, at_high, (at_low - k).astype(jnp.float32) + 0.5,
           (at_high - k).astype(jnp.float32) + 0.5, jnp.zeros_like(k),
           passes_needed(low, high) + len(guesses) + _SLACK, jnp.int32(0))
  low, _, at_low, *_, passes = jax.lax.while_loop(searching, narrow, state)
  return low, at_low, passes


def _uniform_bracket(k: jax.Array, eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per segment, a likely bracket of the k-th largest of ``eligible`` uniform keys.

  The keys of :func:`random_subsets`, uniform on ``[1, 2**31]``: the k-th largest lies
  near the ``1 - k / n`` quantile, within ``_SAMPLE_Z`` standard deviations of its rank.
  """
  n = jnp.maximum(eligible, 1).astype(jnp.float32)
  p = k.astype(jnp.float32) / n
  spacing = 2.0**31 / n  # between neighbouring keys, on average
  center = 2.0**31 * (1 - p)
  spread = (_SAMPLE_Z * jnp.sqrt(k.astype(jnp.float32) * (1 - p)) + 1) * spacing + 256
  low = jnp.clip(center - spread, 1, 2.0**31).astype(jnp.uint32)
  high = jnp.clip(center + spread, 2, 2.0**31 + 1).astype(jnp.uint32)
  return low, jnp.maximum(high, low + 1)


def _threshold(key: jax.Array, row_segment: np.ndarray, count: int, k: jax.Array | int,
               guesses: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]] | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per segment, a threshold with exactly ``k`` keys at or above it, or the k-th key.

  Args: as :func:`_select`.

  Returns:
    ``(k, threshold, at_threshold, passes)``: per segment, ``k`` capped at the eligible
    count, the uint32 threshold and the keys at or above it (``> k`` only when the
    k-th key is tied; the threshold is then the k-th key); the search's passes.
  """
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (count,))
  segment = jnp.asarray(row_segment)

  def counts(flags):  # per segment
    return _per_segment(flags, row_segment, count)

  eligible = counts(key != 0)
  k = jnp.minimum(k, eligible)
  # Keys are below 0xFFFFFFFF; with k = 0 nothing is at or above the threshold 0xFFFFFFFF.
  kth, at_kth, passes = _narrow(
      lambda threshold: counts(key >= threshold[segment][:, None]), k,
      low=jnp.where(k == 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(1)),
      high=jnp.full((count,), 0xFFFFFFFF, jnp.uint32), at_low=jnp.where(k == 0, 0, eligible),
      at_high=jnp.zeros((count,), jnp.int32),
      guesses=(guesses(k, eligible) if guesses is not None
               else _bracket(key, row_segment, count, k, eligible)))
  return k, kth, at_kth, passes


def _select(key: jax.Array, row_segment: np.ndarray, count: int, k: jax.Array | int,
            guesses: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]] | None = None
            ) -> jax.Array:
  """The ``k[s]`` largest non-zero keys of every segment ``s`` of a layout (ties: row-major).

  First a threshold per segment with exactly ``k`` keys at or above it, or else the
  k-th key itself (:func:`_threshold`). Where the k-th key is tied, a second search
  over positions (:func:`_narrow`) takes its first entries in row-major order.

  Args:
    key: ``[rows, _COLUMNS]`` uint32 keys, 0 where not eligible, below ``0xFFFFFFFF``.
    row_segment: ``[rows]`` segment of every row, sorted (static).
    count: number of segments.
    k: scalar or ``[count]`` entries to select per segment.
    guesses: optional ``(k, eligible) -> (low, high)``, a likely bracket of the k-th key
      per segment, when the keys' distribution is known (default: :func:`_bracket`).

  Returns:
    ``[rows, _COLUMNS]`` bool.
  """
  k, kth, at_kth, _ = _threshold(key, row_segment, count, k, guesses)
  segment = jnp.asarray(row_segment)
  kth = kth[segment][:, None]

  def counts(flags):  # per segment
    return _per_segment(flags, row_segment, count)

  def break_ties(key):
    """Keys above the k-th, and the tied ones before a position found per segment."""
    ends = np.searchsorted(row_segment, np.arange(count), side="right") * _COLUMNS
    row_start = jnp.arange(row_segment.size, dtype=jnp.int32) * _COLUMNS
    column = jax.lax.broadcasted_iota(jnp.int32, (1, _COLUMNS), 1)

    def chosen(back):  # back: per segment, how far before its end the tied keys stop
      stop = (jnp.asarray(ends, jnp.int32) - back.astype(jnp.int32))[segment]  # flat position
      columns_before = jnp.clip(stop - row_start, 0, _COLUMNS)  # per row: no array of positions
      return (key > kth) | ((key == kth) & (column < columns_before[:, None]))

    sizes = np.bincount(row_segment, minlength=count) * _COLUMNS
    back, *_ = _narrow(lambda back: counts(chosen(back)), k, low=jnp.zeros((count,), jnp.uint32),
                       high=jnp.asarray(sizes, jnp.uint32), at_low=at_kth,
                       at_high=counts(key > kth), interpolate=False)
    return chosen(back)

  def take_all(key):
    return key >= kth

  # More keys than k at the threshold means ties at the k-th key: rare for continuous
  # scores, so broken only when needed. The selection leaves the cond materialised, so
  # a later selection's layout cannot fuse this one's keys in: one layout alive at a time.
  return jax.lax.cond(jnp.any(at_kth > k), break_ties, take_all, key)


def top_k_each(scores: list[jax.Array], k: jax.Array | list[int],
               eligible: list[jax.Array | None] | None = None) -> list[jax.Array]:
  """Marks the ``k[i]`` eligible entries with the highest scores of every array ``i``.

  The same as :func:`top_k_mask` per array, in one selection for all of them.

  Args:
    scores: float arrays of any shapes (no NaN).
    k: ``[len(scores)]`` counts (may be traced).
    eligible: optional bool arrays like ``scores``.

  Returns:
    Bool arrays like ``scores``.
  """
  return top_k_masks(scores, jnp.asarray(k, jnp.int32), eligible, list(range(len(scores))))


def top_k_mask(scores: jax.Array, k: jax.Array | int, eligible: jax.Array | None = None) -> jax.Array:
  """Marks the ``k`` eligible entries with the highest scores.

  Exactly ``min(k, eligible.sum())`` entries are marked; among equal scores the
  lower flat index wins, so the result is deterministic.

  Args:
    scores: float array of any shape (no NaN).
    k: number of entries to select (may be a traced integer scalar).
    eligible: optional bool array like ``scores``; only these may be selected.

  Returns:
    A bool array like ``scores``.
  """
  return top_k_masks([scores], k, [eligible])[0]
