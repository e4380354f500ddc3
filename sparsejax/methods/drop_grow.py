"""The RigL family in one function: magnitude drop, any grow score, cosine drop fraction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

from sparsejax import distributions, schedules, scores
from sparsejax.masks import DensePredicate
from sparsejax.topology import drop_and_grow, random_init
from sparsejax.wrapper import SparseTransformation, Topology, no_extra, sparse_wrapper


def drop_grow_method(inner: optax.GradientTransformation, grow_score: scores.ScoreFn, *,
                     sparsity: float, distribution: str | Mapping[str, float],
                     update_every: int, start_step: int, end_step: int,
                     drop_fraction: float | optax.Schedule, dense: DensePredicate,
                     seed: int, train_at_update: bool = False,
                     reads_dense_gradient: bool = False,
                     init_extra: Callable[[Any, Any], Any] = no_extra,
                     update_extra: Callable[[scores.ScoreInputs], Any] | None = None
                     ) -> SparseTransformation:
  """A RigL-family method: magnitude drop, the given grow score, cosine drop fraction.

  Args:
    inner: the optimizer to wrap.
    grow_score: score of inactive weights, higher = grow first.
    sparsity: global sparsity in [0, 1).
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    update_every: steps between mask updates (ΔT).
    start_step: masks change after this step.
    end_step: masks stop changing after this step.
    drop_fraction: initial drop fraction (cosine-decayed to 0 at ``end_step``) or
      an optax schedule of the step.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the initial masks and of random scores.
    train_at_update: False (RigL's Algorithm 1): a mask-update step only rewires;
      True: the weights active before and after it also take the optimizer step.
    reads_dense_gradient: whether ``grow_score`` reads the dense gradient.
    init_extra: ``(params, masks) -> extra``, the method's own state (none by default).
    update_extra: optional ``ScoreInputs -> extra`` run at each mask update before
      the scores (see :func:`sparsejax.drop_and_grow`).

  Returns:
    An optax transformation.
  """
  distributions.check_sparsity(sparsity)
  distributions.check_distribution(distribution)
  topology = Topology(
      init_masks=random_init(sparsity, distribution, dense),
      init_extra=init_extra,
      is_update_step=schedules.update_steps(update_every, start_step, end_step),
      update_masks=drop_and_grow(
          scores.magnitude, grow_score,
          schedules.as_drop_fraction(drop_fraction, start_step, end_step), update_extra),
      train_at_update=train_at_update, reads_dense_gradient=reads_dense_gradient)
  return sparse_wrapper(inner, topology, seed)
