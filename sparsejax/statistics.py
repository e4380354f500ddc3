"""Per-layer statistics for GSE's guided sampling, from an unchanged Flax model.

GraBo and GraEst (:mod:`sparsejax.sampling`) sample a layer's connections from
statistics of its inputs h and of the loss gradient at its outputs δ. The model does
not have to expose them: :func:`value_grad_and_statistics` runs the user's loss with
every ``Dense``, ``DenseGeneral`` and ``Conv`` call intercepted (linen's
``nn.intercept_methods``; for ``flax.nnx``, ``Linear``, ``LinearGeneral`` and
``Conv``), records h (a convolution's input as its unfolded patches, so the layer is
an MLP over patches) and adds a zero perturbation to the output, whose gradient is
δ. It returns what ``jax.value_and_grad`` would, plus the statistics to pass on::

  loss, grads, stats = sj.value_grad_and_statistics(loss_fn, params, batch,
                                                    sampling="grabo", key=key)
  updates, state = tx.update(grads, state, params, layer_statistics=stats)

Only mask-update steps need them; elsewhere pass ``layer_statistics=None``.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.sampling import LayerStatistics, check_sampling, random_signs, side_statistic

Statistics = dict[str, LayerStatistics]


def conv_patches(layer: Any, x: jax.Array) -> jax.Array:
  """A convolution's input unfolded: ``[batch, *output spatial, kh·kw·c_in]``.

  The patch features come in the order of the layer's kernel flattened to
  ``[kh·kw·c_in, c_out]``, so ``conv(x) = conv_patches(x) @ kernel.reshape(-1, c_out)``.

  Args:
    layer: anything with a linen/nnx ``Conv``'s ``kernel_size``, ``strides``,
      ``padding``, ``input_dilation``, ``kernel_dilation`` and ``feature_group_count``.
    x: the input ``[..., *spatial, c_in]`` (leading axes are flattened into one).

  Returns:
    The patches.
  """
  from flax.linen.linear import canonicalize_padding  # pylint: disable=g-import-not-at-top

  sizes = tuple(layer.kernel_size)
  spatial = len(sizes)
  if layer.feature_group_count != 1:
    raise NotImplementedError("GSE statistics of grouped convolutions are not supported")
  padding = canonicalize_padding(layer.padding, spatial)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise NotImplementedError(f"GSE statistics of {padding} padding are not supported")

  def per_axis(value):
    return (1,) * spatial if value is None else (
        (value,) * spatial if isinstance(value, int) else tuple(value))

  x = x.reshape(-1, *x.shape[-(spatial + 1):])  # one batch axis
  image, kernel = "N" + "HWD"[:spatial] + "C", "HWD"[:spatial] + "IO"
  patches = jax.lax.conv_general_dilated_patches(
      x, sizes, per_axis(layer.strides), padding, lhs_dilation=per_axis(layer.input_dilation),
      rhs_dilation=per_axis(layer.kernel_dilation), dimension_numbers=(image, kernel, image))
  # Patch features come in (c_in, *window) order; the kernel flattens as (*window, c_in).
  channels = x.shape[-1]
  patches = patches.reshape(*patches.shape[:-1], channels, math.prod(sizes))
  return jnp.swapaxes(patches, -1, -2).reshape(*patches.shape[:-2], -1)


def _input_rows(layer: Any, x: jax.Array) -> jax.Array:
  """The layer's input as ``[rows, fan_in]``, rows in the order of its output rows."""
  if hasattr(layer, "kernel_size"):
    patches = conv_patches(layer, x)
    return patches.reshape(-1, patches.shape[-1])
  axis = getattr(layer, "axis", -1)
  contracted = len(axis) if isinstance(axis, (tuple, list)) else 1
  return x.reshape(-1, math.prod(x.shape[x.ndim - contracted:]))


class _Recorder:
  """Sees each intercepted kernel-layer call: records its name, output shape and input
  statistic, and adds its zero perturbation to the output. ``sampling=None`` does nothing."""

  def __init__(self, sampling: str | None = None, key: jax.Array | None = None,
               perturbations: list[jax.Array] | None = None):
    self.sampling, self.key, self.perturbations = sampling, key, perturbations
    self.names: list[str] = []
    self.outputs: list[jax.ShapeDtypeStruct] = []
    self.rows: list[int] = []
    self.inputs: list[jax.Array] = []  # f of each call, reduced here: no patches kept

  def signs(self, index: int, rows: int) -> jax.Array | None:
    """GraEst's signs of call ``index`` (None for GraBo), shared by its h and δ."""
    if self.sampling != "graest":
      return None
    return random_signs(jax.random.fold_in(self.key, index), rows)

  def __call__(self, name: str, layer: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.sampling is None:
      return y
    if getattr(layer, "batch_dims", ()) or getattr(layer, "batch_axis", {}):
      raise NotImplementedError(f"{name}: GSE statistics of batched DenseGeneral kernels are "
                                "not supported")
    index = len(self.names)
    rows = _input_rows(layer, x)
    self.names.append(name)
    self.outputs.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
    self.rows.append(rows.shape[0])
    self.inputs.append(side_statistic(rows, self.signs(index, rows.shape[0])))
    if self.perturbations is not None:
      y = y + self.perturbations[index].astype(y.dtype)
    return y


def _linen_call(loss_fn: Callable[..., Any], recorder: _Recorder, params: Any, args: tuple):
  """``loss_fn(params, *args)`` with every linen Dense, DenseGeneral and Conv call recorded."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def intercept(next_fun, call_args, call_kwargs, context):
    y = next_fun(*call_args, **call_kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral,
                                                                 nn.Conv)):
      y = recorder("/".join((*module.path, "kernel")), module, call_args[0], y)
    return y

  with nn.intercept_methods(intercept):
    return loss_fn(params, *args)


@contextlib.contextmanager
def observe_nnx_layers(model: Any, layers: tuple[type, ...],
                       observe: Callable[[str, Any, jax.Array, jax.Array], jax.Array]):
  """While active, every call ``y = layer(x, ...)`` of an instance of ``layers`` in
  ``model`` returns ``observe(kernel_path, layer, x, y)`` instead of ``y``.

  flax.nnx has no method interception (linen's ``nn.intercept_methods``), so the
  layer classes' ``__call__`` are replaced for the duration and restored after.
  ``kernel_path`` is the layer's ``kernel`` param path, as
  :func:`sparsejax.masks.path_name` writes it for ``nnx.state(model, nnx.Param)``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  names = {id(node): "/".join((*map(str, path), "kernel"))
           for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
  originals = {layer: layer.__call__ for layer in layers}

  def observed(original):
    def call(self, x, *call_args, **call_kwargs):
      y = original(self, x, *call_args, **call_kwargs)
      return observe(names.get(id(self), "kernel"), self, x, y)
    return call

  try:
    for layer, original in originals.items():
      layer.__call__ = observed(original)
    yield
  finally:
    for layer, original in originals.items():
      layer.__call__ = original


def _nnx_call(loss_fn: Callable[..., Any], recorder: _Recorder, model: Any, args: tuple):
  """``loss_fn(model, *args)`` with every nnx Linear, LinearGeneral and Conv call recorded."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  with observe_nnx_layers(model, (nnx.Linear, nnx.LinearGeneral, nnx.Conv), recorder):
    return loss_fn(model, *args)


def _collect(recorder: _Recorder, inputs: list[jax.Array], output_grads: list[jax.Array]
             ) -> Statistics:
  """f (computed in the call) and g of every call the recorder saw, summed per layer."""
  statistics: Statistics = {}
  for index, (name, f, rows, delta) in enumerate(zip(recorder.names, inputs, recorder.rows,
                                                     output_grads)):
    g = side_statistic(delta.reshape(rows, -1), recorder.signs(index, rows))
    stats = LayerStatistics(f, g)
    if name in statistics:  # a layer applied more than once
      stats = jax.tree.map(jnp.add, statistics[name], stats)
    statistics[name] = stats
  return statistics


def value_grad_and_statistics(loss_fn: Callable[..., Any], params: Any, *args: Any,
                              sampling: str, key: jax.Array | None = None,
                              has_aux: bool = False) -> tuple[Any, Any, Statistics]:
  """``jax.value_and_grad(loss_fn)(params, *args)`` and GSE's per-layer statistics.

  The model is not changed: its kernel layers are intercepted while ``loss_fn``
  runs. A layer applied several times (shared weights) sums its statistics.

  Args:
    loss_fn: ``loss_fn(params, *args)`` that applies a ``flax.linen`` model with
      ``params`` (e.g. ``model.apply({"params": params}, x)``), or, when ``params`` is
      a ``flax.nnx.Module``, ``loss_fn(model, *args)``.
    params: the params of a linen model, or an nnx model.
    *args: the other arguments of ``loss_fn`` (e.g. the batch).
    sampling: "grabo" (f = Σ|h|, g = Σ|δ|), "graest" (f = |Σ s·h|, g = |Σ s·δ|, one
      random sign s per row: example, token or conv patch) or "uniform" (no
      statistics: ``{}``).
    key: PRNG key of GraEst's signs.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(value, grads, statistics)``: ``value`` and ``grads`` as ``jax.value_and_grad``
    (for an nnx model, ``grads`` is the ``nnx.State`` of its ``nnx.Param``s, as
    ``nnx.grad``; other state the loss changes, e.g. batch statistics, is written
    back to the model), and ``{kernel path: LayerStatistics}`` keyed like
    :func:`sparsejax.masks.path_name` of the params, for
    ``tx.update(..., layer_statistics=statistics)``.

  Raises:
    ValueError: for an unknown sampling, or GraEst without a key.
  """
  check_sampling(sampling)
  if sampling == "graest" and key is None:
    raise ValueError("sampling='graest' needs a PRNG key for its random signs")
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if isinstance(params, nnx.Module):
    model = params
    graphdef, boxed, rest = nnx.split(model, nnx.Param, ...)
    # Pure arrays in and out: Variables made outside the trace cannot be mutated inside.
    params, rest = nnx.as_pure(boxed), nnx.as_pure(rest)

    def call(recorder, params, rest):
      """``(value, (aux, the model's other state after the call))``."""
      merged = nnx.merge(graphdef, params, rest)
      out = _nnx_call(loss_fn, recorder, merged, args)
      value, aux = out if has_aux else (out, None)
      return value, (aux, nnx.as_pure(nnx.state(merged, nnx.Not(nnx.Param))))
  else:
    model, rest = None, None

    def call(recorder, params, rest):
      del rest
      out = _linen_call(loss_fn, recorder, params, args)
      value, aux = out if has_aux else (out, None)
      return value, (aux, None)

  if sampling == "uniform":
    (value, (aux, rest_out)), grads = jax.value_and_grad(
        lambda p, r: call(_Recorder(), p, r), has_aux=True)(params, rest)
    statistics: Statistics = {}
  else:
    shapes = _Recorder(sampling, key)
    jax.eval_shape(lambda p, r: call(shapes, p, r), params, rest)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes.outputs]

    def perturbed(params, perturbations, rest):
      recorder = _Recorder(sampling, key, perturbations)
      value, extra = call(recorder, params, rest)
      return value, (extra, recorder.inputs)

    (value, ((aux, rest_out), inputs)), (grads, output_grads) = jax.value_and_grad(
        perturbed, argnums=(0, 1), has_aux=True)(params, zeros, rest)
    statistics = _collect(shapes, inputs, output_grads)
  if model is not None:  # the other state (e.g. batch statistics) back; grads as nnx.grad's
    nnx.update(model, rest_out)
    grads = jax.tree.map(lambda variable, grad: variable.replace(grad), boxed, grads,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  return ((value, aux) if has_aux else value), grads, statistics

