"""Exact top-k selection with a traced k, without sorting.

A mask update must keep exactly ``k`` entries per leaf, where ``k`` depends on the
step (a traced value) and leaves can hold millions of scores. A full sort costs
``O(n log n)`` and ``lax.top_k`` needs a static ``k``; instead we find the k-th
largest score by a 32-step bisection over the bits of an order-preserving integer
key (each step counts ``key >= candidate``), then break ties by index. On 1M scores
this takes a few ms on a CPU core, against ~60 ms for ``lax.top_k`` and ~250 ms for a
sort (``python benchmarks/topk.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SIGN_BIT = jnp.uint32(0x80000000)
_COLUMNS = 128  # counts run over a [rows, 128] layout


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


def _count(flags: jax.Array) -> jax.Array:
  """Number of True entries of a ``[rows, _COLUMNS]`` array.

  Column sums in float32 vectorise better on CPU than one int32 reduction and are
  exact while ``rows <= 2**24``.
  """
  return jnp.sum(flags, axis=0, dtype=jnp.float32).astype(jnp.int32).sum()


def _first_in_order(flags: jax.Array, room: jax.Array) -> jax.Array:
  """The first ``room`` True entries of ``flags`` in row-major order.

  Same as ``flags & (cumsum(flags) <= room)`` but with per-row counts and a single
  row's cumsum instead of a full one.
  """
  per_row = flags.sum(axis=1, dtype=jnp.int32)
  through_row = jnp.cumsum(per_row)  # True entries up to and including each row
  crossing = jnp.minimum(jnp.sum(through_row <= room, dtype=jnp.int32), flags.shape[0] - 1)
  in_row = jnp.cumsum(jax.lax.dynamic_index_in_dim(flags, crossing, 0, keepdims=False),
                      dtype=jnp.int32)
  room_in_row = room - (through_row - per_row)[crossing]
  partial = (jnp.arange(flags.shape[0])[:, None] == crossing) & (in_row[None, :] <= room_in_row)
  return flags & ((through_row <= room)[:, None] | partial)


def _layout(scores: jax.Array, eligible: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """``(key, ok)`` as ``[rows, _COLUMNS]``: order-preserving keys, 0 where not eligible."""
  n = scores.size
  rows = max(-(-n // _COLUMNS), 1)
  if rows > 2**24:
    raise ValueError(f"top_k_mask supports up to 2**31 entries per array, got {n}")
  ok = jnp.ones((n,), bool) if eligible is None else eligible.reshape(-1)
  key = jnp.where(ok, sortable_key(scores.reshape(-1)), jnp.uint32(0))
  padding = rows * _COLUMNS - n  # padded entries: key 0 and not eligible, never chosen
  return (jnp.pad(key, (0, padding)).reshape(rows, _COLUMNS),
          jnp.pad(ok, (0, padding)).reshape(rows, _COLUMNS))


def top_k_masks(scores: list[jax.Array], k: jax.Array | int,
                eligible: list[jax.Array | None] | None = None) -> list[jax.Array]:
  """Marks the ``k`` eligible entries with the highest scores across several arrays.

  One selection over all of them, as if they were concatenated (without forming
  the concatenation): exactly ``min(k, number eligible)`` entries are marked, and
  among equal scores an earlier array, then a lower flat index, wins.

  Args:
    scores: float arrays of any shapes (no NaN).
    k: number of entries to select in total (may be a traced integer scalar).
    eligible: optional bool arrays like ``scores`` (None entries: all eligible).

  Returns:
    Bool arrays like ``scores``.
  """
  eligible = eligible or [None] * len(scores)
  layouts = [_layout(s, e) for s, e in zip(scores, eligible)]

  def count(flags):
    return sum(_count(f) for f in flags)

  k = jnp.minimum(jnp.asarray(k, jnp.int32), count(ok for _, ok in layouts))

  def add_bit(bit, threshold):
    candidate = threshold | (jnp.uint32(1) << jnp.asarray(31 - bit, jnp.uint32))
    # Ineligible keys are 0 < candidate, so they are never counted.
    return jnp.where(count(key >= candidate for key, _ in layouts) >= k, candidate, threshold)

  # The largest threshold with at least k eligible keys at or above it: the k-th key.
  kth = jax.lax.fori_loop(0, 32, add_bit, jnp.uint32(0))
  room = k - count(key > kth for key, _ in layouts)
  out = []
  for (key, ok), s in zip(layouts, scores):
    tied = ok & (key == kth)
    ties = _count(tied)
    # Ties at the k-th key are rare for continuous scores: break them only when needed.
    chosen = jax.lax.cond(ties > room, _first_in_order, lambda t, r: t, tied,
                          jnp.maximum(room, 0))
    room = room - jnp.minimum(ties, jnp.maximum(room, 0))
    out.append(((key > kth) | chosen).reshape(-1)[:s.size].reshape(s.shape))
  return out


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
