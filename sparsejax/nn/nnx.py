"""Always-sparse flax.nnx layers: :class:`SparseLinear` and :class:`SparseConv`.

As the linen layers of :mod:`sparsejax.nn.layers`, with the connections in
:class:`Topology` variables::

  model = MLP(rngs=nnx.Rngs(0))                      # uses sjnn.nnx.SparseLinear
  tx = sjnn.gse(optax.sgd(0.1, 0.9), topology=nnx.state(model, sjnn.nnx.Topology), ...)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # in the step, after optimizer.update(model, grads):
  nnx.update(model, sjnn.topology(optimizer.opt_state))
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from sparsejax.nn import connections
from sparsejax.nn.layers import (
  TOPOLOGY_FIELDS,
  candidate_count,
  initial_params,
  initial_topology,
  sparse_rows,
)
from sparsejax.statistics import conv_patches


class Topology(nnx.Variable):
  """flax.nnx variable type of an always-sparse layer's connections (not a param)."""


class SparseLinear(nnx.Module):
  """A Linear layer of ``nnz`` connections (flax.nnx); arguments as :class:`sparsejax.nn.SparseDense`."""

  def __init__(self, in_features: int, out_features: int, *, sparsity: float | None = None,
               fan_in: int | None = None, candidates: float = 1.0, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self._create(in_features, out_features, sparsity, fan_in, candidates, use_bias, dtype,
                 param_dtype, rngs)

  def _create(self, in_features, out_features, sparsity, fan_in, candidates, use_bias, dtype,
              param_dtype, rngs):
    nnz = connections.connection_count(in_features, out_features, sparsity, fan_in)
    topology = initial_topology(rngs.params(), nnz, in_features, out_features,
                                candidate_count(candidates, nnz))
    params = initial_params(rngs.params(), topology, in_features, out_features, param_dtype)
    for name, value in topology.items():
      setattr(self, name, Topology(value))
    for name, value in params.items():
      setattr(self, name, nnx.Param(value))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.out_features, self.dtype, self.param_dtype = out_features, dtype, param_dtype

  def _rows(self, x: jax.Array) -> jax.Array:
    """The layer on ``x`` ``[rows, fan_in]``."""
    topology = {name: getattr(self, name)[...] for name in TOPOLOGY_FIELDS}
    params = {name: getattr(self, name)[...] for name in (
        "values", "probe_candidates", "probe_inputs", "probe_outputs")}
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    y = sparse_rows(x.astype(dtype), params, topology, self.out_features)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y

  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = self._rows(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*inputs.shape[:-1], self.out_features)


class SparseConv(SparseLinear):
  """A convolution of ``nnz`` connections over unfolded patches (flax.nnx).

  Arguments as ``nnx.Conv`` (no feature groups) plus those of :class:`sparsejax.nn.SparseDense`;
  the fan-in order is the linen :class:`sparsejax.nn.SparseConv`'s.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
               strides: int | Sequence[int] = 1, padding: Any = "SAME",
               input_dilation: int | Sequence[int] = 1, kernel_dilation: int | Sequence[int] = 1,
               sparsity: float | None = None, fan_in: int | None = None,
               candidates: float = 1.0, use_bias: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.kernel_size, self.strides, self.padding = tuple(kernel_size), strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.feature_group_count = 1
    self._create(in_features * math.prod(self.kernel_size), out_features, sparsity, fan_in,
                 candidates, use_bias, dtype, param_dtype, rngs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    patches = conv_patches(self, inputs)
    y = self._rows(patches.reshape(-1, patches.shape[-1]))
    lead = inputs.shape[:-(len(self.kernel_size) + 1)]
    return y.reshape(*lead, *patches.shape[1:-1], self.out_features)
