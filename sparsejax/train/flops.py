"""Training and inference FLOPs of a Flax model with masked kernels.

The accounting of the RigL paper (Evci et al. 2020, appendix H): only the
multiply-adds of kernels (``Dense``, ``DenseGeneral`` and attention projections,
``Conv``; linen or nnx) count (not attention's own dot products), one multiply-add is 2
FLOPs, and elementwise work (biases, activations, normalisation) is ignored. A kernel
applied at ``P`` output positions per example (1 for a ``Dense`` on a flat input,
H'·W' for a convolution) costs ``2·P·nnz`` FLOPs forward. A training step costs the
forward pass, the gradient with respect to the activations (both sparse), and the
gradient with respect to the weights, which is sparse too unless the method read the
dense gradient at that step (its state's ``dense_gradient``: RigL at a mask update,
DST at every step)::

  positions = kernel_positions(model, variables, images[:1])
  sparse, dense = forward_flops(params, masks, positions)       # per example
  step = training_flops(sparse, dense, dense_gradient=tree_get(opt_state, "dense_gradient"))

Every function taking masks is traceable, so the runner accumulates these inside its
jitted step.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.masks import is_unmasked, path_name
import sparsejax.nn as sjnn
from sparsejax.statistics import observe_nnx_layers


def _units(features: Any) -> int:
  """Output units of a layer's ``features`` (an int, or a tuple for DenseGeneral)."""
  return math.prod(features) if isinstance(features, (tuple, list)) else int(features)


def kernel_positions(model: nn.Module, variables: Any, *args: Any, **kwargs: Any
                     ) -> dict[str, int]:
  """Output positions per example of every kernel of a ``flax.linen`` model.

  Every layer with ``features`` and a ``kernel`` param counts: ``Dense``,
  ``DenseGeneral`` (attention projections included), ``Conv``, ``ConvTranspose``;
  and the always-sparse ``SparseDense`` and ``SparseConv`` (their ``values``). A
  layer applied several times (shared weights) adds its positions up. Traced
  abstractly with :func:`jax.eval_shape`: nothing is computed.

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
    features = getattr(module, "features", None)
    weights = next((w for w in ("kernel", sjnn.layers.VALUES)
                    if module.has_variable("params", w)), None)
    if context.method_name == "__call__" and features is not None and weights is not None:
      name = "/".join((*module.path, weights))
      positions[name] = positions.get(name, 0) + out.size // (out.shape[0] * _units(features))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
  return positions


def nnx_kernel_positions(model: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
  """:func:`kernel_positions` of a ``flax.nnx`` model: its ``Linear``, ``LinearGeneral``
  (attention projections included), ``Conv`` and ``ConvTranspose`` layers.

  Args:
    model: a ``flax.nnx`` module.
    *args: its inputs, batch first.
    **kwargs: its keyword arguments.

  Returns:
    ``{"blocks/0/attention/query/kernel": positions, ...}`` keyed like the paths of
    ``nnx.state(model, nnx.Param)``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  positions: dict[str, int] = {}

  def count(name, layer, x, out):
    del x
    positions[name] = (positions.get(name, 0)
                       + out.size // (out.shape[0] * _units(layer.out_features)))
    return out

  layers = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose)
  with observe_nnx_layers(model, layers, count):
    jax.eval_shape(lambda *a: model(*a, **kwargs), *args)
  return positions


def _kernel_leaves(params: Any, masks: Any, positions: Mapping[str, int]):
  """``(positions, dense size, nnz)`` of every kernel of ``positions`` in ``params``."""
  mask_leaves = jax.tree.leaves(masks, is_leaf=is_unmasked) if masks is not None else None
  always_sparse = sjnn.summary(params)["layers"]
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    name = path_name(path)
    if name in always_sparse:
      yield positions[name], always_sparse[name]["size"], always_sparse[name]["nnz"]
    elif name in positions:
      size = math.prod(jnp.shape(leaf))
      mask = mask_leaves[i] if mask_leaves is not None else None
      yield positions[name], size, size if mask is None else jnp.sum(mask, dtype=jnp.float32)


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
  for count, size, nnz in _kernel_leaves(params, masks, positions):
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
