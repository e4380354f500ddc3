"""flax.nnx models on compact kernels: the same graph with sparse layers in place.

:func:`sparsify` replaces every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Conv``
whose kernel was compacted (``sj.compact``) by a :class:`CompactLayer` that holds the
kernel's runtime form (:class:`sparsejax.nn.inference.RowKernel` or
:class:`~sparsejax.nn.inference.SlotKernel`) and computes like the layer it replaces;
every other module is kept (with ``runtime="auto"``, a layer whose kernel is mostly
active keeps its dense kernel: see :data:`sparsejax.nn.inference.DENSE_ABOVE`). Example::

  params = nnx.state(model, nnx.Param)
  sparse_model = sjnn.sparsify(model, sj.compact(params, sj.masks(optimizer.opt_state)))
  logits = sparse_model(x)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from sparsejax.compact import CompactKernel, is_compact
from sparsejax.masks import unbox
from sparsejax.nn.inference import (
    RowKernel,
    SlotKernel,
    _in_ndim,
    check_supported,
    compute,
    runtime_form,
    runtime_kernel,
)

LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)


class KernelIndex(nnx.Variable):
  """A runtime kernel's integer arrays: input positions, row offsets (not a parameter)."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What :func:`sparsejax.nn.inference.compute` reads of the replaced layer."""
  kind: str  # "linear", "general" (has ``axis``) or "conv" (has ``kernel_size``, ...)
  use_bias: bool
  dtype: Any
  axis: Any = None
  kernel_size: Any = None
  strides: Any = None
  padding: Any = None
  input_dilation: Any = None
  kernel_dilation: Any = None
  feature_group_count: int = 1

  @classmethod
  def of(cls, layer: nnx.Module) -> LayerSpec:
    def frozen(value):
      return tuple(map(frozen, value)) if isinstance(value, (list, tuple)) else value
    kind = "conv" if hasattr(layer, "kernel_size") else (
        "general" if hasattr(layer, "axis") else "linear")
    fields = {f.name: frozen(getattr(layer, f.name)) for f in dataclasses.fields(cls)
              if hasattr(layer, f.name)}
    return cls(kind=kind, **fields)


class CompactLayer(nnx.Module):
  """A sparse stand-in for a ``Linear``, ``LinearGeneral`` or ``Conv`` on a runtime kernel.

  ``values`` is the layer's ``nnx.Param``; the positions (and a row kernel's offsets)
  are :class:`KernelIndex` variables.
  """

  def __init__(self, layer: nnx.Module, kernel: RowKernel | SlotKernel):
    self.spec = LayerSpec.of(layer)
    self.values = nnx.Param(jnp.asarray(kernel.values))
    rows = isinstance(kernel, RowKernel)
    self.indices = KernelIndex(jnp.asarray(kernel.positions if rows else kernel.indices))
    self.offsets = KernelIndex(jnp.asarray(kernel.offsets)) if rows else None
    self.bias = nnx.Param(jnp.asarray(layer.bias[...])) if layer.bias is not None else None
    self.in_shape, self.out_shape, self.padding = kernel.in_shape, kernel.out_shape, kernel.padding

  def kernel(self) -> RowKernel | SlotKernel:
    """The runtime kernel this layer holds."""
    if self.offsets is not None:
      return RowKernel(self.values[...], self.indices[...], self.offsets[...], self.in_shape,
                       self.out_shape)
    return SlotKernel(self.indices[...], self.values[...], self.in_shape, self.out_shape,
                      self.padding)

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    del out_sharding  # what nnx layers accept; the output follows x's sharding here
    return compute(_Attributes(self.spec), x, self.kernel(),
                   None if self.bias is None else self.bias[...])


class _Attributes:
  """A LayerSpec seen as a layer of its kind: the attributes such a layer has."""

  CONV = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation",
          "feature_group_count")

  def __init__(self, spec: LayerSpec):
    names = ["use_bias", "dtype"] + {"conv": list(self.CONV), "general": ["axis"]}.get(
        spec.kind, [])
    for name in names:
      setattr(self, name, getattr(spec, name))


def sparsify(model: nnx.Module, compact: Any, runtime: str = "auto") -> nnx.Module:
  """A copy of ``model`` with each compacted ``Linear``/``LinearGeneral``/``Conv``
  replaced by a :class:`CompactLayer` (the original model is unchanged).

  Args:
    model: the trained nnx model.
    compact: ``sj.compact(nnx.state(model, nnx.Param), masks)``.
    runtime: ``"auto"``, ``"rows"`` or ``"slots"``, as for
      :func:`sparsejax.nn.prepare`.

  Returns:
    The sparse model; call it like ``model``.

  Raises:
    ValueError: one line, for a compact kernel that is not a supported layer's, one whose
      arrays are inconsistent, or a bad ``runtime``.
  """
  runtime_form(runtime)  # a bad runtime is refused before the model is copied
  model = nnx.clone(model)
  kernels = {tuple(str(getattr(k, "key", k)) for k in path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(unbox(compact),
                                                                     is_leaf=is_compact)[0]
             if isinstance(leaf, CompactKernel)}
  used = set()
  for path, layer in list(nnx.iter_graph(model)):
    if not isinstance(layer, LAYERS):
      continue
    key = (*map(str, path), "kernel")
    if key not in kernels:
      continue
    name = "/".join(map(str, path))
    check_supported(layer, name)
    used.add(key)
    kernel = runtime_kernel(kernels[key], _in_ndim(layer), name, runtime)
    if not isinstance(kernel, (RowKernel, SlotKernel)):  # "auto" runs it densely
      layer.kernel[...] = jnp.asarray(kernel, layer.kernel.dtype)
      continue
    sparse = CompactLayer(layer, kernel)
    parent = model
    for part in path[:-1]:
      parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    if isinstance(path[-1], int):
      parent[path[-1]] = sparse
    else:
      setattr(parent, path[-1], sparse)
  unused = sorted("/".join(key) for key in set(kernels) - used)
  if unused:
    raise ValueError(f"{unused[0]}: no Linear, LinearGeneral or Conv of the model holds this "
                     "compact kernel")
  return model
