"""The initial topology of an always-sparse layer: how many connections, which, what values.

A layer of ``fan_in`` inputs and ``fan_out`` outputs holds ``nnz`` distinct
(input, output) pairs drawn uniformly without replacement (an Erdős–Rényi graph
with exactly ``nnz`` edges) without forming the ``fan_in · fan_out`` grid: pairs
are drawn with replacement, duplicates removed by one sort, and ``nnz`` of the
distinct ones kept at random, which is a uniform subset of that size.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sparsejax import distributions

MAX_PAIRS = 2**31 - 1  # pairs are int32 flat indices input · fan_out + output


def connection_count(fan_in: int, fan_out: int, sparsity: float | None = None,
                     fan_in_per_output: int | None = None) -> int:
  """The number of connections of a layer, from its sparsity or its mean fan-in.

  Args:
    fan_in: inputs of the layer.
    fan_out: outputs.
    sparsity: fraction of the ``fan_in · fan_out`` weights that are zero, in [0, 1).
    fan_in_per_output: instead of ``sparsity``, connections per output on average.

  Returns:
    ``round((1 − sparsity) · fan_in · fan_out)`` (at least 1) or
    ``fan_in_per_output · fan_out``.
  """
  if (sparsity is None) == (fan_in_per_output is None):
    raise ValueError("give exactly one of sparsity and fan_in")
  if fan_in * fan_out > MAX_PAIRS:
    raise ValueError(f"a sparse layer of {fan_in} x {fan_out} has more than 2**31 - 1 pairs")
  if sparsity is not None:
    distributions.check_sparsity(sparsity)
    return max(1, round((1.0 - sparsity) * fan_in * fan_out))
  if not 1 <= fan_in_per_output <= fan_in:
    raise ValueError(f"fan_in must be in [1, {fan_in}], got {fan_in_per_output}")
  return fan_in_per_output * fan_out


def _draw_distinct(key: jax.Array, nnz: int, size: int) -> jax.Array:
  """``nnz`` distinct flat indices in [0, size), a uniform random subset, sorted."""
  if 4 * nnz >= size:  # dense enough that O(size) is O(nnz)
    return jnp.sort(jax.random.choice(key, size, (nnz,), replace=False).astype(jnp.int32))
  # Expected duplicates among m draws are below m² / (2 size) ≤ m / 8: draw a margin
  # above that and redraw in the (vanishingly rare) case of too few distinct values.
  draws = nnz + nnz * nnz // (2 * size) + 8 * math.isqrt(nnz) + 16
  padding = jnp.iinfo(jnp.int32).max

  def attempt(key):
    draw_key, order_key = jax.random.split(key)
    flat = jnp.sort(jax.random.randint(draw_key, (draws,), 0, size, jnp.int32))
    first = jnp.concatenate([jnp.ones((1,), bool), flat[1:] != flat[:-1]])
    # A random priority per distinct value; the nnz highest are a uniform subset.
    priority = jnp.where(first, jax.random.uniform(order_key, (draws,)), -1.0)
    _, chosen = jax.lax.top_k(priority, nnz)
    return jnp.sort(jnp.where(priority[chosen] >= 0, flat[chosen], padding))

  def too_few(carry):
    return carry[1][-1] == padding

  def again(carry):
    key, _ = carry
    key, sub = jax.random.split(key)
    return key, attempt(sub)

  key, first_key = jax.random.split(key)
  return jax.lax.while_loop(too_few, again, (key, attempt(first_key)))[1]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_connections(key: jax.Array, nnz: int, fan_in: int, fan_out: int
                       ) -> tuple[jax.Array, jax.Array]:
  """``nnz`` distinct (input, output) pairs, uniformly at random, sorted by input then output.

  Args:
    key: PRNG key.
    nnz: number of pairs (static), at most ``fan_in · fan_out``.
    fan_in: number of inputs.
    fan_out: number of outputs.

  Returns:
    ``(rows, cols)``: int32 ``[nnz]`` input and output indices.
  """
  flat = _draw_distinct(key, nnz, fan_in * fan_out)
  return flat // fan_out, flat % fan_out


ORDER_TILE = 2048  # outputs per tile of the walking order


def connection_order(rows: jax.Array, cols: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  """The order in which the kernels walk a layer's (distinct) connections.

  By tiles of :data:`ORDER_TILE` outputs, within a tile by input, then output: a
  chunk's scatter-adds stay in one tile of the outputs (2048 rows of a batch of 128
  floats: 1 MiB, in cache) while its gathers read the inputs in order. Measured
  here (forward and backward, batch 128; ``benchmarks/always_sparse.py
  --part=order``), it is the fastest order or within 8 % of it on every layer
  tried: 32768² at fan-in 32 234 ms (by input 264, by output 294, random order,
  where rewiring leaves the slots, 530); 8192² at 99 % 76 ms (87, 125, 228);
  784 → 32768 at fan-in 32 157 ms (316, 146, 381).

  Args:
    rows, cols: the connections ``[nnz]``, no pair twice.
    fan_in, fan_out: the layer's inputs and outputs.

  Returns:
    int32 ``[nnz]``: connection indices in walking order.
  """
  tile = min(ORDER_TILE, fan_out)
  # Below 2 · fan_in · fan_out < 2**32: uint32 holds it.
  key = ((cols // tile).astype(jnp.uint32) * jnp.uint32(fan_in * tile)
         + rows.astype(jnp.uint32) * jnp.uint32(tile) + (cols % tile).astype(jnp.uint32))
  # Distinct keys: each one's place in sorted order, without an argsort (~8× slower).
  place = jnp.searchsorted(jnp.sort(key), key)
  return jnp.zeros(key.shape, jnp.int32).at[place].set(jnp.arange(key.shape[0], dtype=jnp.int32))


def fan_in_counts(cols: jax.Array, fan_out: int) -> jax.Array:
  """The number of connections of each output, ``[fan_out]`` int32."""
  return jnp.zeros((fan_out,), jnp.int32).at[cols].add(1)


def gse_values(key: jax.Array, cols: jax.Array, fan_out: int, dtype=jnp.float32) -> jax.Array:
  """GSE's initial weights: U(−1, 1) · √3 / √(number of inputs of the connection's output).

  The same rule as :func:`sparsejax.gse_init` for masked layers: each output's
  weights have variance 1 / (its fan-in).
  """
  fan_in = jnp.maximum(fan_in_counts(cols, fan_out), 1).astype(jnp.float32)
  bound = jnp.sqrt(3.0) / jnp.sqrt(fan_in[cols])
  return (jax.random.uniform(key, cols.shape, jnp.float32, -1.0, 1.0) * bound).astype(dtype)
