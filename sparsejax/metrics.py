"""What the masks of a run say: per-layer sparsity, coverage and churn.

Everything is read from the optimizer state and the masks, never from a method's name:
every method's state exposes its ``masks`` and, when they can change, ``ever_active``
(the weights active at some step so far).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import is_unmasked, map_masked, path_name, unbox


def layer_counts(masks: Any) -> dict[str, jax.Array]:
  """``{path: number of True entries}`` of every masked leaf, as int32 scalars (traceable)."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)[0]
  return {path_name(path): jnp.sum(mask, dtype=jnp.int32)
          for path, mask in flat if mask is not None}


def layer_sizes(masks: Any) -> dict[str, int]:
  """``{path: number of entries}`` of every masked leaf."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)[0]
  return {path: math.prod(mask.shape) for path, mask in
          ((path_name(p), m) for p, m in flat if m is not None)}


def regrown_count(masks: Any, previous: Any) -> jax.Array:
  """How many entries are True in ``masks`` but were False in ``previous`` (int32)."""
  grown = jax.tree.leaves(map_masked(lambda m, p: m & ~p, masks, previous))
  return sum((jnp.sum(leaf, dtype=jnp.int32) for leaf in grown), jnp.zeros((), jnp.int32))


def _fractions(counts: dict[str, Any], sizes: dict[str, int]) -> tuple[float, dict[str, float]]:
  """Global and per-layer ``count / size`` (exact integer sums, one division each)."""
  total = sum(sizes.values())
  overall = sum(int(n) for n in counts.values()) / total if total else 0.0
  return overall, {path: int(n) / sizes[path] if sizes[path] else 0.0
                   for path, n in counts.items()}


def coverage(opt_state: optax.OptState) -> dict[str, Any]:
  """The fraction of the masked weights that have been active at some step so far.

  This is the in-time over-parameterisation rate of Liu et al. (2021). A method
  whose masks never change (static sparse) covers just its active weights.

  Args:
    opt_state: the state of a sparsejax method, possibly nested or boxed by
      ``flax.nnx.Optimizer``.

  Returns:
    ``{"global": float, "layers": {path: float}}`` over the masked leaves.

  Raises:
    ValueError: when ``opt_state`` holds no sparsejax method state.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
    >>> tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.75, distribution="uniform")
    >>> sj.coverage(tx.init(params))
    {'global': 0.25, 'layers': {'w': 0.25}}
  """
  state = unbox(opt_state)
  masks = optax.tree_utils.tree_get(state, "masks")
  if masks is None:
    raise ValueError("opt_state holds no sparsejax method state (no `masks` field)")
  ever = optax.tree_utils.tree_get(state, "ever_active")
  ever = masks if ever is None else ever
  overall, layers = _fractions(jax.device_get(_layer_counts(ever)), layer_sizes(ever))
  return {"global": overall, "layers": layers}


def mask_statistics(masks: Any, previous: Any) -> dict[str, Any]:
  """Sparsity and churn of ``masks``, exact (counted on the device, divided here).

  Args:
    masks: the current mask pytree.
    previous: the masks at an earlier point (e.g. the last evaluation).

  Returns:
    ``{"sparsity", "layers": {path: sparsity}, "churn"}`` as Python floats: the
    fraction of zeros over all masked leaves and per leaf, and the fraction of the
    active weights that were inactive in ``previous``.
  """
  counts = jax.device_get(_counts(masks, previous))
  density, layers = _fractions(counts["layers"], layer_sizes(masks))
  nnz = sum(int(n) for n in counts["layers"].values())
  return {"sparsity": 1.0 - density if layers else 0.0,
          "layers": {path: 1.0 - value for path, value in layers.items()},
          "churn": int(counts["regrown"]) / nnz if nnz else 0.0}


_layer_counts = jax.jit(layer_counts)


@jax.jit
def _counts(masks: Any, previous: Any) -> dict[str, Any]:
  return {"layers": layer_counts(masks), "regrown": regrown_count(masks, previous)}
