"""Exact top-k selection with a traced k, without sorting.

A mask update must keep exactly ``k`` entries per leaf, where ``k`` depends on the
step (a traced value) and leaves can hold millions of scores. A full sort costs
``O(n log n)`` and ``lax.top_k`` needs a static ``k``; instead we find the k-th
largest score by a 32-step bisection over the bits of an order-preserving integer
key (each step counts ``key >= candidate``), then break ties by index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SIGN_BIT = jnp.uint32(0x80000000)


def sortable_key(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (NaN sorts highest).

  Args:
    scores: a float array.

  Returns:
    A uint32 array of the same shape; ``a < b`` iff ``key(a) < key(b)``.
  """
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  negative = (bits & _SIGN_BIT) != 0
  return jnp.where(negative, ~bits, bits | _SIGN_BIT)


def top_k_mask(scores: jax.Array, k: jax.Array | int, eligible: jax.Array | None = None) -> jax.Array:
  """Marks the ``k`` eligible entries with the highest scores.

  Exactly ``min(k, eligible.sum())`` entries are marked; among equal scores the
  lower flat index wins, so the result is deterministic.

  Args:
    scores: float array of any shape.
    k: number of entries to select (may be a traced integer scalar).
    eligible: optional bool array like ``scores``; only these may be selected.

  Returns:
    A bool array like ``scores``.
  """
  flat = scores.reshape(-1)
  ok = jnp.ones(flat.shape, bool) if eligible is None else eligible.reshape(-1)
  k = jnp.minimum(jnp.asarray(k, jnp.int32), ok.sum(dtype=jnp.int32))
  key = jnp.where(ok, sortable_key(flat), jnp.uint32(0))

  def add_bit(bit, threshold):
    candidate = threshold | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
    count = jnp.sum(ok & (key >= candidate), dtype=jnp.int32)
    return jnp.where(count >= k, candidate, threshold)

  # The largest threshold with at least k eligible keys at or above it: the k-th key.
  kth = jax.lax.fori_loop(0, 32, add_bit, jnp.uint32(0))
  above = ok & (key > kth)
  tied = ok & (key == kth)
  room = k - above.sum(dtype=jnp.int32)
  chosen = above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= room))
  return chosen.reshape(scores.shape)
