"""Building blocks of :class:`~sparsejax.wrapper.Topology`: initial masks and updates.

A dynamic method is ``drop score × grow score × schedule × distribution``:
:func:`drop_and_grow` turns two score functions and a drop-fraction schedule into
a mask update that keeps every layer's non-zero count fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import DensePredicate, map_masked_together, nnz_targets, random_masks
from sparsejax.scores import ScoreFn, ScoreInputs
from sparsejax.selection import count_each, top_k_each


def random_init(sparsity: float, distribution: str | Mapping[str, float],
                dense: DensePredicate):
  """``init_masks`` drawing exactly the distribution's non-zero count per leaf at random.

  Args:
    sparsity: global sparsity in [0, 1).
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.

  Returns:
    A function ``(params, key) -> masks``.

  Examples:
    >>> import jax, jax.numpy as jnp, sparsejax as sj
    >>> init = sj.random_init(0.75, "uniform", sj.keep_non_kernels_dense)
    >>> masks = init({"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}, jax.random.PRNGKey(0))
    >>> masks["b"], int(masks["w"].sum())
    (None, 8)
  """
  def init_masks(params, key):
    nnz = nnz_targets(params, sparsity, distribution, dense)
    return random_masks(key, params, nnz)

  return init_masks


def swap_count(fraction: jax.Array, nnz: jax.Array) -> jax.Array:
  """``int(fraction · nnz)``, truncated as in google-research/rigl (int32, elementwise)."""
  return (nnz.astype(jnp.float32) * fraction).astype(jnp.int32)


def drop_and_grow_leaves(masks: list[jax.Array], drop_scores: list[jax.Array],
                         grow_scores: list[jax.Array], fraction: jax.Array) -> list[jax.Array]:
  """Every layer's update: drop its k weakest active weights, grow the k best of the rest.

  As ``_get_update_op`` of google-research/rigl, per layer: ``k = int(fraction · nnz)``
  (truncated), the ``nnz − k`` active weights with the highest drop score are kept,
  and the ``k`` weights with the highest grow score among all the others, the ones
  dropped just now included, are grown; nnz is unchanged. Two selections
  (:func:`sparsejax.selection.top_k_each`) serve all layers at once, so the compiled
  update does not grow with the number of layers.

  Args:
    masks: bool mask of every layer.
    drop_scores: higher = keep, one array per layer.
    grow_scores: higher = grow first, one array per layer.
    fraction: fraction of active weights to swap.

  Returns:
    The new bool masks.
  """
  nnz = count_each(masks)
  k = swap_count(fraction, nnz)
  kept = top_k_each(drop_scores, nnz - k, eligible=masks)
  grown = top_k_each(grow_scores, k, eligible=[~m for m in kept])
  return [a | b for a, b in zip(kept, grown)]


def drop_and_grow(drop_score: ScoreFn, grow_score: ScoreFn, drop_fraction: optax.Schedule,
                  update_extra: Callable[[ScoreInputs], Any] | None = None):
  """``update_masks`` of the RigL family.

  Args:
    drop_score: score function, higher = keep (e.g. magnitude).
    grow_score: score function, higher = grow first (e.g. gradient magnitude).
    drop_fraction: schedule of the fraction of active weights swapped at a step.
    update_extra: optional ``ScoreInputs -> extra``, run at each mask update before
      the scores: the method state they see and the state keeps (DST-EE counts the
      weights active at this update there). By default ``extra`` passes through.

  Returns:
    A function ``ScoreInputs -> (masks, extra)``.

  Examples:
    SET's update, half of the active weights swapped at every update:

    >>> import sparsejax as sj
    >>> update = sj.drop_and_grow(sj.scores.magnitude, sj.scores.random_uniform,
    ...                           lambda step: 0.5)
    >>> topology = sj.Topology(sj.random_init(0.9, "erk", sj.keep_non_kernels_dense),
    ...                        is_update_step=sj.schedules.update_steps(100, 0, 1000),
    ...                        update_masks=update)
  """
  def update_masks(inputs: ScoreInputs):
    if update_extra is not None:
      inputs = inputs._replace(extra=update_extra(inputs))
    fraction = drop_fraction(inputs.step)
    masks = map_masked_together(
        lambda m, d, g: drop_and_grow_leaves(m, d, g, fraction),
        inputs.masks, drop_score(inputs), grow_score(inputs))
    return masks, inputs.extra

  return update_masks
