"""RigL (Evci et al. 2020): drop by magnitude, grow by dense-gradient magnitude."""

from __future__ import annotations

from collections.abc import Mapping

import optax

from sparsejax import scores
from sparsejax.masks import DensePredicate, keep_non_kernels_dense
from sparsejax.methods.drop_grow import drop_grow_method
from sparsejax.wrapper import SparseTransformation


def rigl(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,
         distribution: str | Mapping[str, float] = "erk", update_every: int = 100,
         start_step: int = 0, drop_fraction: float | optax.Schedule = 0.3,
         dense: DensePredicate = keep_non_kernels_dense, seed: int = 0,
         train_at_update: bool = False) -> SparseTransformation:
  """Rigged Lottery: every ``update_every`` steps, swap the weakest active weights
  for the inactive ones with the largest dense gradient.

  A mask-update step drops by the current weights' magnitude and grows by that
  step's dense gradient among all weights not kept (Algorithm 1's scores, and the
  candidates and truncated swap count of google-research/rigl's ``_get_update_op``).
  Grown weights start at exactly 0 with a fresh inner-optimizer state; a weight
  dropped and regrown in the same update keeps its value and state. As in
  Algorithm 1 and the official code, the optimizer step is skipped at an update
  step unless ``train_at_update``.

  Args:
    inner: the optimizer to wrap.
    sparsity: global sparsity in [0, 1).
    end_step: last step at which masks change (RigL: 75 % of training).
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    update_every: steps between mask updates (ΔT).
    start_step: masks change after this step.
    drop_fraction: initial drop fraction, cosine-decayed to 0, or a schedule.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the initial masks.
    train_at_update: also apply the optimizer step to the weights active before
      and after a mask update, at that step.

  Returns:
    An optax transformation.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    >>> tx = sj.rigl(optax.sgd(0.1), sparsity=0.75, distribution="uniform", update_every=1,
    ...              end_step=10)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(8)}
    >>> updates, state = tx.update(grads, state, params)  # step 1: a mask update
    >>> bool(state.dense_gradient), sj.summary(state)["nnz"]
    (True, 16)

  References:
    Evci et al., `Rigging the Lottery: Making All Tickets Winners
    <https://arxiv.org/abs/1911.11134>`_, ICML 2020
  """
  return drop_grow_method(
      inner, scores.gradient_magnitude, sparsity=sparsity, distribution=distribution,
      update_every=update_every, start_step=start_step, end_step=end_step,
      drop_fraction=drop_fraction, dense=dense, seed=seed, train_at_update=train_at_update,
      reads_dense_gradient=True)
