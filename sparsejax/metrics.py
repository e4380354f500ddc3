"""What a sparse run is measured by: FLOPs, coverage and mask churn.

FLOPs follow the accounting of the RigL paper (Evci et al. 2020, appendix H): only
the multiply-adds of kernels (``nn.Dense``, ``nn.Conv``) count, one multiply-add is
2 FLOPs, and elementwise work (biases, activations, normalisation) is ignored. A
kernel applied at ``P`` output positions per example (1 for a ``Dense`` on a flat
input, H'·W' for a convolution) costs ``2·P·nnz`` FLOPs forward. A training step
costs the forward pass, the gradient with respect to the activations (both sparse),
and the gradient with respect to the weights, which is sparse too unless the method
needs the dense gradient at that step (RigL at a mask update, DST at every step)::

  positions = kernel_positions(model, variables, images[:1])
  sparse, dense = forward_flops(params, masks, positions)       # per example
  step = training_flops(sparse, dense, dense_gradient=is_update)  # per example

Every function taking masks is traceable, so the runner accumulates these inside its
jitted step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import schedules
from sparsejax.masks import is_unmasked, map_masked, path_name

# Methods whose masks change during training: their coverage and churn are reported.
DYNAMIC_METHODS = frozenset({"set", "rigl", "dst"})


def kernel_positions(model: nn.Module, variables: Any, *args: Any, **kwargs: Any
                     ) -> dict[str, int]:
  """Output positions per example of every ``Dense``/``Conv`` kernel of ``model``.

  Traced abstractly with :func:`jax.eval_shape`: nothing is computed.

  Args:
    model: a ``flax.linen`` module.
    variables: its variables (or their shapes), e.g. ``{"params": params}``.
    *args: inputs of ``model.apply``, batch first (one example is enough).
    **kwargs: keyword arguments of ``model.apply``, e.g. ``train=False``.

  Returns:
    ``{"Conv_0/kernel": H'·W', "Dense_0/kernel": 1, ...}`` keyed like
    :func:`sparsejax.masks.path_name` of the params.
  """
  positions: dict[str, int] = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      batch, features = out.shape[0], out.shape[-1]
      positions["/".join(module.path) + "/kernel"] = out.size // (batch * features)
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
  return positions


def _kernel_leaves(params: Any, masks: Any, positions: Mapping[str, int]):
  """``(positions, size, mask or None)`` of every kernel of ``positions`` in ``params``."""
  mask_leaves = jax.tree.leaves(masks, is_leaf=is_unmasked) if masks is not None else None
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for i, (path, leaf) in enumerate(flat):
    name = path_name(path)
    if name in positions:
      mask = mask_leaves[i] if mask_leaves is not None else None
      yield positions[name], math.prod(jnp.shape(leaf)), mask


def forward_flops(params: Any, masks: Any, positions: Mapping[str, int]
                  ) -> tuple[jax.Array, float]:
  """Forward FLOPs per example with the active weights only, and with all weights.

  Args:
    params: the parameter pytree (only shapes are read).
    masks: a mask pytree like ``params`` (None leaves are dense), or None for dense.
    positions: from :func:`kernel_positions`.

  Returns:
    ``(sparse, dense)``: a float32 scalar array and a Python float.
  """
  sparse, dense = jnp.zeros((), jnp.float32), 0.0
  for count, size, mask in _kernel_leaves(params, masks, positions):
    nnz = size if mask is None else jnp.sum(mask, dtype=jnp.float32)
    sparse = sparse + 2.0 * count * nnz
    dense += 2.0 * count * size
  return sparse, dense


def training_flops(sparse: jax.Array, dense: float, dense_gradient: jax.Array | bool
                   ) -> jax.Array:
  """FLOPs per example of one training step (RigL appendix H).

  Args:
    sparse: forward FLOPs per example with the active weights.
    dense: forward FLOPs per example of the dense model.
    dense_gradient: whether this step computes the dense weight gradient.

  Returns:
    forward + activation gradient (both ``sparse``) + weight gradient (``dense``
    when ``dense_gradient``, else ``sparse``).
  """
  return 2.0 * sparse + jnp.where(dense_gradient, dense, sparse)


def dense_gradient_steps(sparse: Mapping[str, Any]) -> Callable[[jax.Array], jax.Array]:
  """The steps at which a method reads the dense gradient.

  Args:
    sparse: the resolved ``sparse`` config section (``method`` and its keywords).

  Returns:
    A traceable predicate of the 1-based step: RigL's mask-update steps, every
    step for DST, no step for the others (dense training needs no distinction).
  """
  method = sparse["method"]
  if method == "dst":
    return lambda step: jnp.ones((), bool)
  if method == "rigl":
    return schedules.update_steps(sparse["update_every"], sparse["start_step"],
                                  sparse["end_step"])
  return lambda step: jnp.zeros((), bool)


def ever_active(previous: Any, masks: Any) -> Any:
  """``previous | masks`` leaf by leaf: the weights active at some step so far."""
  return map_masked(jnp.logical_or, masks, previous)


def layer_counts(masks: Any) -> dict[str, jax.Array]:
  """``{path: number of True entries}`` of every masked leaf, as int32 scalars (traceable)."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)[0]
  return {path_name(path): jnp.sum(mask, dtype=jnp.int32)
          for path, mask in flat if mask is not None}


def regrown_count(masks: Any, previous: Any) -> jax.Array:
  """How many entries are True in ``masks`` but were False in ``previous`` (int32)."""
  grown = jax.tree.leaves(map_masked(lambda m, p: m & ~p, masks, previous))
  return sum((jnp.sum(leaf, dtype=jnp.int32) for leaf in grown), jnp.zeros((), jnp.int32))


def layer_sizes(masks: Any) -> dict[str, int]:
  """``{path: number of entries}`` of every masked leaf."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)[0]
  return {path_name(path): math.prod(mask.shape) for path, mask in flat if mask is not None}


def mask_statistics(masks: Any, ever: Any, previous: Any) -> dict[str, Any]:
  """Sparsity, coverage and churn of ``masks``, exact (counted on the device, divided here).

  Args:
    masks: the current mask pytree.
    ever: masks of the weights ever active (:func:`ever_active`); None for ``masks``.
    previous: the masks at an earlier point (e.g. the last evaluation).

  Returns:
    ``{"sparsity", "layers": {path: sparsity}, "coverage", "churn"}`` as Python floats:
    the fraction of zeros over all masked leaves and per leaf, the fraction of masked
    weights ever active (the ITOP rate of Liu et al. 2021), and the fraction of the
    active weights that were inactive in ``previous``.
  """
  counts = jax.device_get(_counts(masks, masks if ever is None else ever, previous))
  sizes = layer_sizes(masks)
  total, nnz = sum(sizes.values()), sum(int(n) for n in counts["layers"].values())
  return {"sparsity": 1.0 - nnz / total if total else 0.0,
          "layers": {path: 1.0 - int(n) / sizes[path] for path, n in counts["layers"].items()},
          "coverage": int(counts["ever"]) / total if total else 0.0,
          "churn": int(counts["regrown"]) / nnz if nnz else 0.0}


@jax.jit
def _counts(masks: Any, ever: Any, previous: Any) -> dict[str, Any]:
  return {"layers": layer_counts(masks), "ever": sum(layer_counts(ever).values()),
          "regrown": regrown_count(masks, previous)}
