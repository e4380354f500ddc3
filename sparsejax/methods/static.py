"""Static sparse training: a fixed random mask drawn at ``init``."""

from __future__ import annotations

from collections.abc import Mapping

import optax

from sparsejax import distributions
from sparsejax.masks import DensePredicate, keep_non_kernels_dense
from sparsejax.topology import random_init
from sparsejax.wrapper import SparseTransformation, Topology, sparse_wrapper


def static_sparse(inner: optax.GradientTransformation, *, sparsity: float,
                  distribution: str | Mapping[str, float] = "erk",
                  dense: DensePredicate = keep_non_kernels_dense,
                  seed: int = 0) -> SparseTransformation:
  """Trains with a fixed random mask.

  Args:
    inner: the optimizer to wrap.
    sparsity: fraction of zeros over all masked leaves, in [0, 1).
    distribution: "uniform", "er", "erk", or a mapping from parameter path to
      sparsity (unnamed masked leaves get ``sparsity``).
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the random mask.

  Returns:
    An optax transformation; see :func:`sparsejax.masks` for its masks.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    >>> tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.75, distribution="uniform")
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int((params["w"] != 0).sum()), sj.summary(state)["sparsity"]
    (16, 0.75)

  References:
    Liu et al., `The Unreasonable Effectiveness of Random Pruning: Return of the Most
    Naive Baseline for Sparse Training <https://arxiv.org/abs/2202.02643>`_, ICLR 2022
  """
  distributions.check_sparsity(sparsity)
  distributions.check_distribution(distribution)
  return sparse_wrapper(inner, Topology(random_init(sparsity, distribution, dense)), seed)
