"""Always-sparse Flax layers: the parameters are the active weights only.

A layer keeps ``nnz`` connections as (input, output) pairs, int32 arrays in the
``"topology"`` collection (never params, never differentiated), and their weights
as the param ``values`` ``[nnz]``. Three zero-valued probe params carry what
growth needs through the ordinary gradient (:func:`sparsejax.nn.kernels.growth_probe`):
``probe_candidates`` (``⌊candidates · nnz⌋`` candidate connections' gradients),
``probe_inputs`` ``[fan_in]`` and ``probe_outputs`` ``[fan_out]`` (GraBo/GraEst
statistics). The optimizer transformations of :mod:`sparsejax.nn.growth` never
move them from 0.

Nothing of shape ``[fan_in, fan_out]`` exists in the forward or backward pass:
memory and time are linear in ``nnz`` and in the activations.

linen::

  model = MLP(...)                                   # uses sjnn.SparseDense
  variables = model.init(key, x)                     # {"params", "topology"}
  tx = sjnn.gse(optax.sgd(0.1, 0.9), topology=variables["topology"], end_step=...)
  state = tx.init(variables["params"])
  # in the step: the topology the method keeps
  logits = model.apply({"params": params, "topology": sjnn.topology(state)}, x)

flax.nnx (:mod:`sparsejax.nn.nnx`): ``nnx.state(model, sjnn.nnx.Topology)`` is the
initial topology and ``nnx.update(model, sjnn.topology(state))`` sets the current one.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.masks import path_name
from sparsejax.nn import connections, kernels
from sparsejax.statistics import conv_patches

TOPOLOGY = "topology"
TOPOLOGY_FIELDS = ("rows", "cols", "order", "candidate_rows", "candidate_cols", "grow", "observe",
                   "key")
MISSING_TOPOLOGY = ("always-sparse layers need the topology the method keeps: "
                    "model.apply({'params': params, 'topology': sparsejax.nn.topology(opt_state)}, x)")


VALUES = "values"  # the param of an always-sparse layer's active weights
PROBES = ("probe_candidates", "probe_inputs", "probe_outputs")


def initial_topology(key: jax.Array, nnz: int, fan_in: int, fan_out: int,
                     candidates: int) -> dict[str, jax.Array]:
  """A layer's topology at initialisation: random connections, no growth instructions."""
  rows, cols = connections.random_connections(key, nnz, fan_in, fan_out)
  return {"rows": rows, "cols": cols,
          "order": connections.connection_order(rows, cols, fan_in, fan_out),
          "candidate_rows": jnp.zeros((candidates,), jnp.int32),
          "candidate_cols": jnp.zeros((candidates,), jnp.int32),
          "grow": jnp.zeros((), bool), "observe": jnp.zeros((), jnp.int32),
          "key": jax.random.key_data(jax.random.PRNGKey(0))}


def probe_shapes(candidates: int, fan_in: int, fan_out: int) -> dict[str, tuple[int]]:
  """The shapes of a layer's three zero-valued probe params (the names of ``PROBES``)."""
  return {"probe_candidates": (candidates,), "probe_inputs": (fan_in,),
          "probe_outputs": (fan_out,)}


def initial_params(key: jax.Array, topology: dict[str, jax.Array], fan_in: int, fan_out: int,
                   dtype: Any) -> dict[str, jax.Array]:
  """``values`` as GSE initialises them and the three zero probes."""
  shapes = probe_shapes(topology["candidate_rows"].shape[0], fan_in, fan_out)
  return {VALUES: connections.gse_values(key, topology["cols"], fan_out, dtype),
          **{name: jnp.zeros(shape, dtype) for name, shape in shapes.items()}}


def sparse_rows(x: jax.Array, params: dict[str, jax.Array], topology: dict[str, jax.Array],
                fan_out: int) -> jax.Array:
  """The sparse product of ``x`` ``[rows, fan_in]`` with its growth probe, ``[rows, fan_out]``."""
  order = topology["order"]  # the connections in a cache-friendly order (connection_order)
  y = kernels.sparse_matmul(x, params["values"][order], topology["rows"][order],
                            topology["cols"][order], fan_out)
  return kernels.growth_probe(
      y, x, params["probe_candidates"], jnp.concatenate([params["probe_inputs"],
                                                         params["probe_outputs"]]),
      topology["candidate_rows"], topology["candidate_cols"], topology["grow"],
      topology["observe"], jax.random.wrap_key_data(topology["key"], impl="threefry2x32"))


def summary(params: Any) -> dict[str, Any]:
  """Per-layer and overall connections, dense sizes and sparsities of always-sparse layers.

  Read from the params' shapes alone: a layer's ``values`` hold its nnz weights, and
  its dense size ``fan_in · fan_out`` is the product of its ``probe_inputs`` and
  ``probe_outputs`` sizes. The format of :func:`sparsejax.summary`.

  Args:
    params: a model's params (or their shapes).

  Returns:
    ``{"layers": {values path: {"nnz", "size", "sparsity"}}, "nnz", "size", "sparsity"}``.

  Examples:
    >>> import jax, jax.numpy as jnp, sparsejax.nn as sjnn
    >>> variables = sjnn.SparseDense(8, sparsity=0.75).init(jax.random.PRNGKey(0),
    ...                                                      jnp.ones((1, 4)))
    >>> sjnn.summary(variables["params"])
    {'layers': {'values': {'nnz': 8, 'size': 32, 'sparsity': 0.75}}, 'nnz': 8, 'size': 32, 'sparsity': 0.75}
  """
  sizes = {path_name(path): math.prod(jnp.shape(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  layers = {}
  for name, nnz in sizes.items():
    prefix = name[:-len(VALUES)]
    if name.split("/")[-1] == VALUES and prefix + "probe_inputs" in sizes:
      size = sizes[prefix + "probe_inputs"] * sizes[prefix + "probe_outputs"]
      layers[name] = {"nnz": nnz, "size": size, "sparsity": 1.0 - nnz / size}
  nnz = sum(layer["nnz"] for layer in layers.values())
  size = sum(layer["size"] for layer in layers.values())
  return {"layers": layers, "nnz": nnz, "size": size,
          "sparsity": 1.0 - nnz / size if size else 0.0}


def candidate_count(candidates: float, nnz: int) -> int:
  """⌊candidates · nnz⌋ candidate slots; ValueError for a negative factor."""
  if candidates < 0:
    raise ValueError(f"candidates must be >= 0, got {candidates!r}")
  return math.floor(candidates * nnz)


class _LinenSparse(nn.Module):
  """What SparseDense and SparseConv share: variables, product and bias over rows."""

  def sparse(self, x: jax.Array, features: int) -> jax.Array:
    fan_in = x.shape[-1]
    nnz = connections.connection_count(fan_in, features, self.sparsity, self.fan_in)
    m = candidate_count(self.candidates, nnz)
    if not self.is_initializing() and not self.has_variable(TOPOLOGY, "rows"):
      raise ValueError(MISSING_TOPOLOGY)
    fresh = (initial_topology(self.make_rng("params"), nnz, fan_in, features, m)
             if self.is_initializing() else None)
    topology = {name: self.variable(TOPOLOGY, name, lambda n=name: fresh[n]).value
                for name in TOPOLOGY_FIELDS}
    params = {VALUES: self.param(VALUES, lambda key: connections.gse_values(
        key, topology["cols"], features, self.param_dtype))}
    params.update({name: self.param(name, nn.initializers.zeros_init(), shape, self.param_dtype)
                   for name, shape in probe_shapes(m, fan_in, features).items()})
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    y = sparse_rows(x.reshape(-1, fan_in).astype(dtype), params, topology, features)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (features,), self.param_dtype).astype(dtype)
    return y


class SparseDense(_LinenSparse):
  """A Dense layer of ``nnz`` connections (linen).

  Attributes:
    features: number of outputs.
    sparsity: fraction of the ``fan_in · features`` weights that are absent, in
      [0, 1); or give ``fan_in`` instead.
    fan_in: connections per output on average (``nnz = fan_in · features``).
    candidates: γ, candidate connections scored at a growth step per active one
      (GSE's subset factor; 0 for methods that do not score candidates).
    use_bias: whether to add a (dense) bias.
    dtype: computation dtype (default: promoted from input and params).
    param_dtype: dtype of the params.
    bias_init: initializer of the bias.
  """
  features: int
  sparsity: float | None = None
  fan_in: int | None = None
  candidates: float = 1.0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self.sparse(inputs, self.features).reshape(*inputs.shape[:-1], self.features)


class SparseConv(_LinenSparse):
  """A convolution of ``nnz`` connections over unfolded patches (linen).

  The fan-in is ``kh · kw · c_in`` in the order of ``nn.Conv``'s kernel flattened
  to ``[kh · kw · c_in, features]``, so a connection (a, b) is that kernel's entry
  ``a`` of output channel ``b``. Attributes as :class:`SparseDense`, plus
  ``kernel_size``, ``strides``, ``padding``, ``input_dilation`` and
  ``kernel_dilation`` as in ``nn.Conv`` (no feature groups).
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  sparsity: float | None = None
  fan_in: int | None = None
  candidates: float = 1.0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    patches = conv_patches(self, inputs)
    y = self.sparse(patches, self.features)
    lead = inputs.shape[:-(len(self.kernel_size) + 1)]
    return y.reshape(*lead, *patches.shape[1:-1], self.features)
