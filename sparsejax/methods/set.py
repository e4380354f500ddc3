"""SET (Mocanu et al. 2018): drop by magnitude, grow at random."""

from __future__ import annotations

from collections.abc import Mapping

import optax

from sparsejax import scores
from sparsejax.masks import DensePredicate, keep_non_kernels_dense
from sparsejax.methods.drop_grow import drop_grow_method
from sparsejax.wrapper import SparseTransformation


def set(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,  # noqa: A001
        distribution: str | Mapping[str, float] = "erk", update_every: int = 100,
        start_step: int = 0, drop_fraction: float | optax.Schedule = 0.3,
        dense: DensePredicate = keep_non_kernels_dense, seed: int = 0,
        train_at_update: bool = False) -> SparseTransformation:
  """Sparse Evolutionary Training: swap the weakest active weights for random ones.

  The update of :func:`sparsejax.rigl` with a uniformly random grow score over all
  weights not kept. google-research/rigl's SET applies the optimizer step before
  the mask update; like jaxpruner we use RigL's order (the step is skipped at an
  update step unless ``train_at_update``).

  Args:
    inner: the optimizer to wrap.
    sparsity: global sparsity in [0, 1).
    end_step: last step at which masks change.
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    update_every: steps between mask updates (ΔT).
    start_step: masks change after this step.
    drop_fraction: initial drop fraction, cosine-decayed to 0, or a schedule.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the initial masks and of the random growth.
    train_at_update: also apply the optimizer step to the weights active before
      and after a mask update, at that step.

  Returns:
    An optax transformation.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.zeros(8)}
    >>> tx = sj.set(optax.sgd(0.1), sparsity=0.75, distribution="uniform", update_every=1,
    ...             end_step=10)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, state, params)
    >>> bool(state.masks_changed), sj.summary(state)["nnz"]
    (True, 16)

  References:
    Mocanu et al., `Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science <https://arxiv.org/abs/1707.04780>`_,
    Nature Communications 2018
  """
  return drop_grow_method(
      inner, scores.random_uniform, sparsity=sparsity, distribution=distribution,
      update_every=update_every, start_step=start_step, end_step=end_step,
      drop_fraction=drop_fraction, dense=dense, seed=seed, train_at_update=train_at_update)
