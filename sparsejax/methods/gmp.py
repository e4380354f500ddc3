"""Gradual magnitude pruning (Zhu & Gupta 2017): start dense, prune on a cubic schedule."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from sparsejax import distributions, schedules
from sparsejax.masks import (
  DensePredicate,
  keep_non_kernels_dense,
  map_masked_together,
  masked_leaves,
  nnz_targets,
)
from sparsejax.scores import ScoreInputs
from sparsejax.selection import count_each, top_k_each
from sparsejax.wrapper import SparseTransformation, Topology, sparse_wrapper


def gmp(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,
        initial_sparsity: float = 0.0, start_step: int = 0, update_every: int = 100,
        distribution: str | Mapping[str, float] = "uniform",
        dense: DensePredicate = keep_non_kernels_dense
        ) -> SparseTransformation:
  """Prunes the smallest-magnitude active weights every ``update_every`` steps.

  Layer l's sparsity follows s_t = s_l + (s_il − s_l)(1 − (t − start)/(end − start))³,
  with s_l its final sparsity from ``distribution`` and s_il = min(s_i, s_l) (a layer
  never starts sparser than it ends); pruned weights never return, and every layer
  ends with exactly its distribution's non-zero count.
  Pruning happens at ``start_step`` (if ≥ 1), every ``update_every`` steps after it
  and at ``end_step``, by the magnitudes before that step's weight update (which
  then trains the remaining weights).

  Args:
    inner: the optimizer to wrap.
    sparsity: final global sparsity in [0, 1).
    end_step: step at which the final sparsity is reached.
    initial_sparsity: sparsity s_i at ``start_step``, at most ``sparsity``.
    start_step: first pruning step (t₀).
    update_every: steps between pruning steps (ΔT).
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.

  Returns:
    An optax transformation.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8), "b": jnp.zeros(8)}
    >>> tx = sj.gmp(optax.sgd(0.0), sparsity=0.75, end_step=1, distribution="uniform")
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, state, params)
    >>> params = optax.apply_updates(params, updates)  # the 16 largest weights remain
    >>> int((params["w"] != 0).sum()), float(params["w"].min(where=params["w"] != 0, initial=99))
    (16, 49.0)

  References:
    Zhu & Gupta, `To prune, or not to prune: exploring the efficacy of pruning for model
    compression <https://arxiv.org/abs/1710.01878>`_, 2017
  """
  distributions.check_sparsity(sparsity)
  distributions.check_sparsity(initial_sparsity, "initial_sparsity")
  distributions.check_distribution(distribution)
  if initial_sparsity > sparsity:
    raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed sparsity "
                     f"({sparsity})")
  periodic = schedules.update_steps(update_every, start_step, end_step)
  remaining = schedules.cubic_sparsity(0.0, 1.0, start_step, end_step)  # (1 − progress)³

  def init_masks(params, key):
    del key
    return jax.tree.map(lambda p, flag: jnp.ones(jnp.shape(p), bool) if flag else None,
                        params, masked_leaves(params, dense))

  def init_extra(params, masks):
    """Final non-zero count of every masked leaf, as int32 scalars."""
    del masks
    return jax.tree.map(lambda n: jnp.asarray(n, jnp.int32),
                        nnz_targets(params, sparsity, distribution, dense))

  def is_update_step(step):
    return periodic(step) | (step == max(start_step, 1)) | (step == end_step)

  def update_masks(inputs: ScoreInputs):
    def prune(masks, final_nnz, params):
      """Every layer's ``nnz`` largest active weights, in one selection."""
      def target(mask, final):
        initial = jnp.maximum(round((1.0 - initial_sparsity) * mask.size), final)
        return (final + jnp.round((initial - final) * remaining(inputs.step))).astype(jnp.int32)

      scheduled = jnp.stack([target(m, n) for m, n in zip(masks, final_nnz)])
      nnz = jnp.minimum(scheduled, count_each(masks))
      return top_k_each([jnp.abs(p) for p in params], nnz, eligible=masks)

    masks = map_masked_together(prune, inputs.masks, inputs.extra, inputs.params)
    return masks, inputs.extra

  topology = Topology(init_masks, init_extra, is_update_step=is_update_step,
                      update_masks=update_masks)
  return sparse_wrapper(inner, topology)
