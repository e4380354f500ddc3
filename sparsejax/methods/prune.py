"""One-shot pruning of a trained (or freshly initialised) model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.masks import DensePredicate, keep_non_kernels_dense, map_masked, nnz_targets
from sparsejax.selection import top_k_mask
from sparsejax.wrapper import apply_masks

CRITERIA = ("magnitude", "snip")


def prune(params: Any, *, sparsity: float, criterion: str = "magnitude", grads: Any = None,
          distribution: str | Mapping[str, float] = "uniform",
          dense: DensePredicate = keep_non_kernels_dense) -> tuple[Any, Any]:
  """Keeps, per masked leaf, the weights with the highest saliency.

  Args:
    params: the parameter pytree.
    sparsity: fraction of zeros over all masked leaves, in [0, 1).
    criterion: "magnitude" (|w|) or "snip" (|w · ∂L/∂w|, Lee et al. 2019).
    grads: gradients like ``params``; required by "snip".
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.

  Returns:
    ``(pruned_params, masks)``: params with exactly zero pruned weights, and the
    mask pytree (None for dense leaves). Feed the masks to training with
    :func:`sparsejax.static_sparse`-style methods or keep them for analysis.

  Examples:
    >>> import jax.numpy as jnp, sparsejax as sj
    >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones(4)}
    >>> pruned, masks = sj.prune(params, sparsity=0.5)
    >>> pruned["w"]
    Array([[0., 0., 0., 0.],
           [5., 6., 7., 8.]], dtype=float32)

  References:
    Han et al., `Learning both Weights and Connections for Efficient Neural Networks
    <https://arxiv.org/abs/1506.02626>`_, NeurIPS 2015; Lee et al., `SNIP: Single-shot
    Network Pruning based on Connection Sensitivity <https://arxiv.org/abs/1810.02340>`_,
    ICLR 2019
  """
  if criterion not in CRITERIA:
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
  if criterion == "snip" and grads is None:
    raise ValueError("criterion='snip' needs `grads`")
  nnz = nnz_targets(params, sparsity, distribution, dense)
  saliency = params if criterion == "magnitude" else jax.tree.map(jnp.multiply, params, grads)
  masks = map_masked(lambda n, s: top_k_mask(jnp.abs(s), n), nnz, saliency)
  return apply_masks(params, masks), masks
