"""flax.nnx models on compact kernels: the same graph with sparse layers in place.

:func:`sparsify` replaces every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Conv``
whose kernel was compacted (``sj.compact``) by a :class:`SlotLayer` that holds the
kernel's runtime form (:class:`sparsejax.nn.inference.SlotKernel`) and computes like
the layer it replaces; every other module is kept. Example::

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
from sparsejax.nn.inference import SlotKernel, _in_ndim, _slots, check_supported, compute

LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)


class SlotIndices(nnx.Variable):
  """The input positions of a slot kernel (int32; not a parameter)."""


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


class SlotLayer(nnx.Module):
  """A sparse stand-in for a ``Linear``, ``LinearGeneral`` or ``Conv``."""

  def __init__(self, layer: nnx.Module, kernel: SlotKernel):
    self.spec = LayerSpec.of(layer)
    self.indices = SlotIndices(jnp.asarray(kernel.indices))
    self.values = nnx.Param(jnp.asarray(kernel.values))
    self.bias = nnx.Param(jnp.asarray(layer.bias[...])) if layer.bias is not None else None
    self.in_shape, self.out_shape, self.padding = kernel.in_shape, kernel.out_shape, kernel.padding

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    del out_sharding  # what nnx layers accept; the output follows x's sharding here
    kernel = SlotKernel(self.indices[...], self.values[...], self.in_shape, self.out_shape,
                        self.padding)
    return compute(_Attributes(self.spec), x, kernel,
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


def sparsify(model: nnx.Module, compact: Any) -> nnx.Module:
  """A copy of ``model`` with each compacted ``Linear``/``LinearGeneral``/``Conv``
  replaced by a :class:`SlotLayer` (the original model is unchanged).

  Args:
    model: the trained nnx model.
    compact: ``sj.compact(nnx.state(model, nnx.Param), masks)``.

  Returns:
    The sparse model; call it like ``model``.

  Raises:
    ValueError: one line, for a compact kernel that is not a supported layer's.
  """
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
    sparse = SlotLayer(layer, _slots(kernels[key], _in_ndim(layer)))
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
