"""Guided stochastic exploration's candidate sampling, independent of how weights are stored.

GSE (Heddes et al. 2024) never scores every inactive weight: it samples (input,
output) pairs of a layer seen as a [fan_in, fan_out] matrix, the input index from a
distribution f over its inputs and the output index from g over its outputs,
independently and with replacement, and grows the sampled inactive pairs with the
largest gradient. This module holds what both the masked mode (:func:`sparsejax.gse`)
and an always-sparse layer need: the per-layer statistics f and g, the sampling, and
the choice among candidates. Nothing here reads a dense weight or gradient array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SAMPLINGS = ("uniform", "grabo", "graest")


class LayerStatistics(NamedTuple):
  """The sampling weights of one layer: f over its inputs, g over its outputs."""
  inputs: jax.Array  # f, shape [fan_in], non-negative
  outputs: jax.Array  # g, shape [fan_out], non-negative


def check_sampling(sampling: str) -> None:
  """Raises ValueError for an unknown sampling."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {list(SAMPLINGS)}")


def side_statistic(rows: jax.Array, signs: jax.Array | None = None) -> jax.Array:
  """One side's statistic: Σ_rows |x| (GraBo, no signs) or |Σ_rows s·x| (GraEst).

  Args:
    rows: the layer's inputs h as ``[rows, fan_in]`` or the loss gradient at its
      outputs δ as ``[rows, fan_out]`` (rows: examples, tokens or conv patches).
    signs: GraEst's ±1 per row, the same for h and δ; None for GraBo.

  Returns:
    A non-negative vector over the side's units.
  """
  if signs is None:
    return jnp.abs(rows).sum(0)
  return jnp.abs(signs.astype(rows.dtype) @ rows)


def grabo(inputs: jax.Array, output_grads: jax.Array) -> LayerStatistics:
  """GraBo's upper bound: f = Σ_rows |h|, g = Σ_rows |δ|.

  Since |Σ_b h_a δ_b| ≤ (Σ_b |h_a|)(Σ_b |δ_b|), sampling a ∝ f and b ∝ g favours the
  pairs whose gradient can be large.
  """
  return LayerStatistics(side_statistic(inputs), side_statistic(output_grads))


def graest(inputs: jax.Array, output_grads: jax.Array, signs: jax.Array) -> LayerStatistics:
  """GraEst's AMS sketch: f = |Σ_rows s·h|, g = |Σ_rows s·δ| with one random sign per row.

  f_a · g_b estimates |Σ_rows h_a δ_b|, the gradient's magnitude.
  """
  return LayerStatistics(side_statistic(inputs, signs), side_statistic(output_grads, signs))


def random_signs(key: jax.Array, rows: int) -> jax.Array:
  """±1 with equal probability, one per row (float32)."""
  return jnp.where(jax.random.bernoulli(key, shape=(rows,)), 1.0, -1.0)


def _draw(key: jax.Array, weights: jax.Array | None, size: int, count: int) -> jax.Array:
  """``count`` indices in [0, size) with replacement, ∝ ``weights`` (uniform if None or all 0)."""
  if weights is None:
    return jax.random.randint(key, (count,), 0, size, jnp.int32)
  weights = weights.reshape(-1).astype(jnp.float32)
  total = weights.sum()
  usable = (total > 0) & jnp.isfinite(total)
  cumulative = jnp.cumsum(jnp.where(usable, weights, 1.0))
  u = jax.random.uniform(key, (count,)) * cumulative[-1]
  # The first index whose cumulative weight exceeds u: never an index of weight 0.
  index = jnp.searchsorted(cumulative, u, side="right").astype(jnp.int32)
  return jnp.minimum(index, size - 1)


def sample_pairs(key: jax.Array, count: int, fan_in: int, fan_out: int,
                 statistics: LayerStatistics | None = None) -> tuple[jax.Array, jax.Array]:
  """Draws ``count`` (input, output) pairs with replacement.

  Args:
    key: PRNG key.
    count: number of pairs (static).
    fan_in: number of inputs of the layer.
    fan_out: number of outputs.
    statistics: f and g to sample from (∝); None samples uniformly. A side whose
      weights are all 0 (or not finite) is sampled uniformly.

  Returns:
    ``(rows, cols)``: int32 arrays of shape [count], input and output indices.
  """
  input_key, output_key = jax.random.split(key)
  inputs = None if statistics is None else statistics.inputs
  outputs = None if statistics is None else statistics.outputs
  return (_draw(input_key, inputs, fan_in, count), _draw(output_key, outputs, fan_out, count))


def distinct(flat: jax.Array, valid: jax.Array, size: int | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Each distinct valid value of ``flat`` once: sampling with replacement repeats pairs.

  Without ``size``, one sort of ``flat`` (no payload; memory O(m), for layers that
  never hold a dense array). With ``size`` (the number of possible values), one
  scatter into a scratch of ``size`` entries and one gather instead: ~15× faster on
  a CPU, for the masked mode, whose layers are dense arrays anyway.

  Args:
    flat: int32 indices in [0, size), shape [m].
    valid: bool, shape [m].
    size: optional number of possible values.

  Returns:
    ``(values, first)``: without ``size``, ``flat``'s valid values in increasing
    order padded with int32's maximum; with ``size``, ``flat`` itself. ``first`` is
    True at exactly one copy of each distinct valid value (the first in that order).
  """
  if size is not None:
    position = jnp.arange(flat.size, dtype=jnp.int32)
    claimed = jnp.full((size,), flat.size, jnp.int32).at[flat].min(
        jnp.where(valid, position, flat.size))
    return flat, valid & (claimed[flat] == position)
  padding = jnp.iinfo(jnp.int32).max
  values = jnp.sort(jnp.where(valid, flat, padding))
  first = jnp.concatenate([jnp.ones((1,), bool), values[1:] != values[:-1]])
  return values, first & (values != padding)
