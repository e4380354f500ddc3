"""Running an unchanged linen model with compact kernels (:mod:`sparsejax.compact`).

:func:`prepare` turns the stored compressed rows into a runtime form, one of two:

* :class:`RowKernel`, for the compiled CPU kernel (:mod:`sparsejax.nn.native`): the
  weights as compressed rows per output unit, unpadded, with uint16 positions when the
  fan-in allows. The default wherever that kernel runs.
* :class:`SlotKernel`, pure JAX, for every backend: for every output unit of its layer
  a fixed number of slots (the layer's largest fan-in) holding input positions and
  values, padding slots holding value 0. A layer's product gathers, for each slot, one
  input position per output unit: ``y[:, n] += x[:, indices[n, s]] * values[n, s]``.
  Small problems gather all slots at once (``[batch, units, slots]``); larger ones walk
  the slot axis with a ``fori_loop`` over rows of ``xᵀ`` so that the temporaries stay
  ``[units, batch]``.

With ``runtime="auto"`` a kernel with more than :data:`DENSE_ABOVE` of its weights
active runs as a plain dense kernel (``CompactKernel.dense()``), which is faster there.
Padding lives only in the runtime form, never in what is stored, and
:func:`runtime_bytes` reports it. :func:`sparse_apply` runs the model's ``apply`` with
``Dense``, ``DenseGeneral`` and ``Conv`` computing from their runtime kernels
(``nn.intercept_methods``) and every other module as usual.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.compact import CompactKernel, is_compact
from sparsejax.masks import path_name
from sparsejax.nn import native

ONE_GATHER_LIMIT = 2**21  # batch · units · slots up to which all slots are gathered at once
LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)
RUNTIMES = ("auto", "rows", "slots")
# "auto" runs a kernel with more than this fraction of its weights active as a plain dense
# kernel: on the CPU measured, the row kernel costs 0.5–1 ns per non-zero on one thread and
# XLA's dense matvec ~0.25 ns per weight. ERK keeps small layers (a classifier's last) dense.
DENSE_ABOVE = 0.25


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotKernel:
  """A layer's runtime sparse kernel: ``slots`` input positions per output unit.

  Attributes:
    indices: int32 ``[units, slots]``: flat positions over the kernel's input axes.
    values: ``[units, slots]``; 0 in padding slots.
    in_shape: the kernel's input axes (static).
    out_shape: the kernel's output axes (static).
    padding: slots holding no weight (static; counted by :func:`runtime_bytes`).
  """
  indices: jax.Array
  values: jax.Array
  in_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  out_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  padding: int = dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowKernel:
  """A layer's runtime sparse kernel for the compiled CPU kernel: rows per output unit.

  Attributes:
    values: float32 ``[nnz]``: unit ``u``'s weights are ``values[offsets[u]:offsets[u+1]]``.
    positions: ``[nnz]`` their flat positions over the kernel's input axes, uint16 when
      the fan-in is at most 65,536, else int32.
    offsets: int32 ``[units + 1]``.
    in_shape: the kernel's input axes (static).
    out_shape: the kernel's output axes (static).
  """
  values: jax.Array
  positions: jax.Array
  offsets: jax.Array
  in_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  out_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

  padding = 0  # nothing is padded


RUNTIME_KERNELS = (SlotKernel, RowKernel)


def _unit_lists(kernel: CompactKernel, in_ndim: int) -> tuple[np.ndarray, ...]:
  """``(source, unit, values)`` of every weight, by unit then source (host numpy); the
  kernel's first ``in_ndim`` axes are its inputs."""
  shape = kernel.shape
  rows, offsets = shape[-1], np.asarray(kernel.offsets)
  row = np.repeat(np.arange(rows), np.diff(offsets))
  position = np.asarray(kernel.indices).astype(np.int64) * rows + row  # flat in the kernel
  source, unit = np.divmod(position, math.prod(shape[in_ndim:]))
  order = np.lexsort((source, unit))
  return source[order], unit[order], np.asarray(kernel.values)[order]


def _slots(kernel: CompactKernel, in_ndim: int) -> SlotKernel:
  """The slot form of ``kernel`` whose first ``in_ndim`` axes are inputs (host numpy)."""
  source, unit, values = _unit_lists(kernel, in_ndim)
  units = math.prod(kernel.shape[in_ndim:])
  counts = np.bincount(unit, minlength=units)
  slots = int(counts.max(initial=0))
  slot = np.arange(len(unit)) - np.repeat(np.cumsum(counts) - counts, counts)
  indices = np.zeros((units, slots), np.int32)
  padded = np.zeros((units, slots), values.dtype)
  indices[unit, slot], padded[unit, slot] = source, values
  return SlotKernel(indices, padded, tuple(kernel.shape[:in_ndim]),
                    tuple(kernel.shape[in_ndim:]), units * slots - len(values))


def _rows(kernel: CompactKernel, in_ndim: int) -> RowKernel:
  """The row form of ``kernel`` whose first ``in_ndim`` axes are inputs (host numpy)."""
  source, unit, values = _unit_lists(kernel, in_ndim)
  fan_in, units = math.prod(kernel.shape[:in_ndim]), math.prod(kernel.shape[in_ndim:])
  offsets = np.concatenate([[0], np.cumsum(np.bincount(unit, minlength=units))])
  return RowKernel(values.astype(np.float32), source.astype(native.position_dtype(fan_in)),
                   offsets.astype(np.int32), tuple(kernel.shape[:in_ndim]),
                   tuple(kernel.shape[in_ndim:]))


def slot_product(x: jax.Array, kernel: SlotKernel) -> jax.Array:
  """``x @ W`` for ``x`` ``[batch, fan_in]`` and W given as slots: ``[batch, units]``."""
  units, slots = kernel.indices.shape
  batch = x.shape[0]
  indices, values = jnp.asarray(kernel.indices), jnp.asarray(kernel.values, x.dtype)
  if slots == 0:
    return jnp.zeros((batch, units), x.dtype)
  if batch * units * slots <= ONE_GATHER_LIMIT:
    return jnp.einsum("bus,us->bu", x[:, indices], values)
  x_t = x.T  # [fan_in, batch]: every gather reads whole rows

  def body(s, y_t):
    return y_t + x_t[indices[:, s]] * values[:, s][:, None]

  return jax.lax.fori_loop(0, slots, body, jnp.zeros((units, batch), x.dtype)).T


def product(x: jax.Array, kernel: SlotKernel | RowKernel) -> jax.Array:
  """``x @ W`` for ``x`` ``[batch, fan_in]`` and either runtime form: ``[batch, units]``."""
  if isinstance(kernel, RowKernel):
    y = native.rows_product(x.astype(jnp.float32), kernel.values, kernel.positions,
                            kernel.offsets)
    return y.astype(x.dtype)
  return slot_product(x, kernel)


def runtime_form(runtime: str = "auto") -> str:
  """Which runtime form :func:`prepare` builds for ``runtime``: ``"rows"`` or ``"slots"``.

  Args:
    runtime: ``"auto"`` (rows where the compiled kernel runs, else slots), ``"rows"`` or
      ``"slots"``.

  Raises:
    ValueError: one line, for another value, or for ``"rows"`` where the compiled kernel
      cannot run (the reason is in the message).
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
  if runtime == "slots":
    return "slots"
  reason = native.unavailable()
  if reason is not None and runtime == "rows":
    raise ValueError(f"runtime='rows' needs the compiled sparse kernel: {reason}")
  return "slots" if reason is not None else "rows"


def runtime_kernel(kernel: CompactKernel, in_ndim: int, name: str, runtime: str = "auto"
                   ) -> SlotKernel | RowKernel | jax.Array:
  """``kernel`` in its runtime form for ``runtime`` (see :func:`runtime_form`).

  Args:
    kernel: a compact kernel; its first ``in_ndim`` axes are the layer's inputs.
    in_ndim: how many.
    name: its path, for errors.
    runtime: ``"auto"``, ``"rows"`` or ``"slots"``.

  Returns:
    A :class:`RowKernel` or :class:`SlotKernel`; with ``"auto"``, the dense kernel when
    more than :data:`DENSE_ABOVE` of its weights are active. Its arrays are on the
    default device: a jitted forward given host arrays would copy them on every call.
  """
  form = runtime_form(runtime)
  kernel.check(name)
  if runtime == "auto" and kernel.nnz > DENSE_ABOVE * math.prod(kernel.shape):
    return jnp.asarray(kernel.dense())
  return jax.tree.map(jnp.asarray, (_rows if form == "rows" else _slots)(kernel, in_ndim))


def _in_ndim(layer: Any) -> int:
  """How many leading kernel axes are inputs, for a linen or nnx dense/general/conv layer."""
  if hasattr(layer, "kernel_size"):  # Conv: spatial axes and input channels
    return len(layer.kernel_size) + 1
  if hasattr(layer, "axis"):  # DenseGeneral, LinearGeneral: the contracted axes
    return len(layer.axis) if isinstance(layer.axis, (tuple, list)) else 1
  return 1


def prepare(model: nn.Module, variables: dict[str, Any], *args: Any, runtime: str = "auto",
            **kwargs: Any) -> dict[str, Any]:
  """``variables`` with every compact kernel in its runtime form, for :func:`sparse_apply`.

  The model is traced once (abstractly, nothing computed) with ``args``/``kwargs`` as
  in ``model.apply`` to learn, for each compact kernel, which of its axes are the
  layer's inputs.

  Args:
    model: the linen model.
    variables: its variables, with compact kernels (``sj.compact``) in ``params``.
    *args: example inputs, as for ``model.apply``.
    runtime: ``"auto"``, ``"rows"`` (:class:`RowKernel`) or ``"slots"``
      (:class:`SlotKernel`); see :func:`runtime_form`.
    **kwargs: as for ``model.apply``.

  Returns:
    ``variables`` with runtime kernels in place of the compact ones.

  Raises:
    ValueError: one line, for a compact kernel that no ``Dense``, ``DenseGeneral`` or
      ``Conv`` of the model reads, one whose arrays are inconsistent, or a bad ``runtime``.
  """
  runtime_form(runtime)  # a bad runtime is refused before the model is traced
  found: dict[str, int] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, LAYERS):
      kernel = module.variables.get("params", {}).get("kernel")
      if isinstance(kernel, CompactKernel):
        found["/".join(module.path)] = _in_ndim(module)
        check_supported(module, "/".join(module.path))
        return compute(module, call_args[0], _placeholder(kernel, _in_ndim(module)),
                       module.variables["params"].get("bias"))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)

  def convert(path, leaf):
    if not isinstance(leaf, CompactKernel):
      return leaf
    layer = "/".join(path_name(path).split("/")[1:-1])  # params/<layer path>/kernel
    if layer not in found:
      raise ValueError(f"{path_name(path)}: no Dense, DenseGeneral or Conv of the model reads "
                       "this compact kernel")
    return runtime_kernel(leaf, found[layer], path_name(path), runtime)

  return jax.tree_util.tree_map_with_path(convert, variables, is_leaf=is_compact)


def check_supported(layer: Any, name: str) -> None:
  """Raises ValueError (one line) for a layer the slot kernels cannot compute."""
  problem = None
  if getattr(layer, "batch_dims", ()) or getattr(layer, "batch_axis", None):
    problem = "batch axes"
  elif getattr(layer, "feature_group_count", 1) != 1:
    problem = "grouped convolutions"
  elif isinstance(getattr(layer, "padding", None), str) and layer.padding.upper() not in (
      "SAME", "VALID"):
    problem = f"{layer.padding} padding"
  if problem is not None:
    raise ValueError(f"{name}: sparse inference does not support {problem}; keep its kernel "
                     "dense (a None mask) when compacting")


def _placeholder(kernel: CompactKernel, in_ndim: int) -> SlotKernel:
  """A slot kernel of the right shapes (one empty slot per unit), to trace a model."""
  units = math.prod(kernel.shape[in_ndim:])
  return SlotKernel(jnp.zeros((units, 1), jnp.int32), jnp.zeros((units, 1), kernel.values.dtype),
                    kernel.shape[:in_ndim], kernel.shape[in_ndim:], units)


def compute(layer: Any, x: jax.Array, kernel: SlotKernel | RowKernel, bias: Any) -> jax.Array:
  """What a dense, general or conv layer (linen or nnx, by its attributes) outputs for
  ``x`` with ``kernel`` in runtime form and ``bias`` (None for none)."""
  dtype = jnp.result_type(x, kernel.values) if layer.dtype is None else layer.dtype
  x = jnp.asarray(x, dtype)
  fan_in = math.prod(kernel.in_shape)
  if hasattr(layer, "kernel_size"):
    from sparsejax.statistics import conv_patches  # pylint: disable=g-import-not-at-top
    patches = conv_patches(layer, x)  # [batch, *spatial, fan_in]
    y = product(patches.reshape(-1, fan_in), kernel)
    y = y.reshape(*x.shape[:-(len(layer.kernel_size) + 1)], *patches.shape[1:-1],
                  *kernel.out_shape)
  else:
    if hasattr(layer, "axis"):
      axis = layer.axis if isinstance(layer.axis, (tuple, list)) else (layer.axis,)
      axis = tuple(a % x.ndim for a in axis)
      x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    lead = x.shape[:x.ndim - len(kernel.in_shape)]
    y = product(x.reshape(-1, fan_in), kernel).reshape(*lead, *kernel.out_shape)
  if bias is not None and layer.use_bias:
    y = y + jnp.asarray(bias, dtype)
  return y


def sparse_apply(model: nn.Module, variables: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
  """``model.apply(variables, *args, **kwargs)`` on sparse kernels.

  ``Dense``, ``DenseGeneral`` and ``Conv`` whose kernel is a :class:`RowKernel` or
  :class:`SlotKernel` compute sparsely, every other module as usual. Compact kernels (``sj.compact``)
  are first put in their runtime form by :func:`prepare`; under ``jax.jit`` pass the
  runtime form (prepare once, outside), as the conversion reads the fan-ins.

  Raises:
    ValueError: one line, for compact kernels under a transformation.
  """
  compact_leaves = [leaf for leaf in jax.tree.leaves(variables, is_leaf=is_compact)
                    if isinstance(leaf, CompactKernel)]
  if compact_leaves:
    if any(isinstance(leaf.values, jax.core.Tracer) for leaf in compact_leaves):
      raise ValueError("sparse_apply under jit needs the runtime form: call "
                       "sparsejax.nn.prepare(model, variables, *args) once, outside jit")
    variables = prepare(model, variables, *args, **kwargs)

  def intercept(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, LAYERS) and isinstance(
        module.variables.get("params", {}).get("kernel"), RUNTIME_KERNELS):
      params = module.variables["params"]
      return compute(module, call_args[0], params["kernel"], params.get("bias"))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(intercept):
    return model.apply(variables, *args, **kwargs)


def runtime_bytes(variables: Any) -> dict[str, int]:
  """The runtime form's bytes.

  Returns:
    ``{"slots", "padding_slots", "padding_bytes", "total", "row_kernels",
    "slot_kernels"}``: ``slots`` counts the weight entries of the runtime kernels (a
    :class:`RowKernel` has one per non-zero and no padding), ``total`` every byte
    including the other leaves, and the last two how many kernels have each form.
  """
  out = dict.fromkeys(("slots", "padding_slots", "padding_bytes", "total", "row_kernels",
                       "slot_kernels"), 0)
  for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, RUNTIME_KERNELS)):
    if isinstance(leaf, SlotKernel):
      per_slot = np.asarray(leaf.values).dtype.itemsize + 4
      out["slots"] += int(np.asarray(leaf.indices).size)
      out["padding_slots"] += leaf.padding
      out["padding_bytes"] += leaf.padding * per_slot
      out["total"] += int(np.asarray(leaf.indices).size) * per_slot
      out["slot_kernels"] += 1
    elif isinstance(leaf, RowKernel):
      out["slots"] += int(np.asarray(leaf.values).size)
      out["total"] += sum(int(np.asarray(a).nbytes) for a in (leaf.values, leaf.positions,
                                                               leaf.offsets))
      out["row_kernels"] += 1
    else:
      out["total"] += int(np.asarray(leaf).nbytes)
  return out
