"""DST (Liu et al., ICLR 2020): trainable per-neuron thresholds, long-tailed estimator.

Each masked leaf W has one threshold per output unit: t covers W's trailing output
axes (the last axis of a Dense or Conv kernel; heads × head_dim of an attention
query/key/value kernel) and is broadcast over its input axes in M = 1[|W| − t > 0].
The latent dense W and t live in the optimizer state; the params hold W ⊙ M. From
g = ∂L/∂(W ⊙ M) the step's estimator gives

  ∂L/∂W = g ⊙ M + g ⊙ W ⊙ H(|W| − t) ⊙ sign(W)
  ∂L/∂t = −Σ_{input axes} g ⊙ W ⊙ H(|W| − t) − α·exp(−t)

(the last term is the gradient of the regulariser α·Σ exp(−t)). The inner optimizer
updates W (and the dense leaves), a second instance of it (or ``threshold_optimizer``)
updates t. A leaf whose density falls to ``recovery_density`` or below has its
thresholds reset to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.distributions import attention_split
from sparsejax.masks import (
  DensePredicate,
  is_unmasked,
  keep_non_kernels_dense,
  map_masked,
  masked_leaves,
  path_name,
  unbox,
)
from sparsejax.selection import count_true
from sparsejax.wrapper import (
  SparseTransformation,
  all_finite,
  any_leaf,
  check_mask_update,
  require_params,
)


class DSTState(NamedTuple):
  """State of :func:`dst`: latent weights, thresholds, masks and the optimizers' states."""
  step: jax.Array  # optimizer steps taken so far (int32)
  weights: Any  # latent dense W per masked leaf (float32 or wider), None for dense leaves
  thresholds: Any  # one threshold per output unit of each masked leaf, None for dense
  masks: Any  # 1[|W| − t > 0] per masked leaf, None for dense leaves
  inner_state: optax.OptState  # of the inner optimizer, over a params-shaped tree
  threshold_state: optax.OptState  # of the threshold optimizer
  nonfinite_updates: jax.Array  # steps whose masks were kept for a non-finite gradient
  masks_changed: jax.Array  # whether the step just taken changed a mask (bool)
  dense_gradient: jax.Array  # whether it read the dense weight gradient: every step
  ever_active: Any  # masks | all earlier masks, per masked leaf


def long_tailed_estimator(x: jax.Array) -> jax.Array:
  """H(x): 2 − 4|x| for |x| ≤ 0.4, 0.4 for 0.4 < |x| ≤ 1, 0 beyond."""
  a = jnp.abs(x)
  return jnp.where(a <= 0.4, 2.0 - 4.0 * a, jnp.where(a <= 1.0, 0.4, 0.0)).astype(x.dtype)


def threshold_masks(weights: Any, thresholds: Any) -> Any:
  """M = 1[|W| − t > 0] per masked leaf (t broadcast over the input axes)."""
  return map_masked(lambda t, w: jnp.abs(w) - t > 0, thresholds, weights)


def _weighted_estimator(w: jax.Array, t: jax.Array) -> jax.Array:
  """W ⊙ H(|W| − t): the one array both gradients read.

  Sharing it (XLA merges the two identical expressions) means neither gradient reads
  the latent weights themselves, so the optimizer can overwrite them in place; reading
  them after that write would make XLA copy every latent weight at every step.
  """
  return w * long_tailed_estimator(jnp.abs(w) - t)


def weight_grad(g: jax.Array, w: jax.Array, t: jax.Array, m: jax.Array) -> jax.Array:
  """∂L/∂W = g ⊙ M + g ⊙ W ⊙ H(|W| − t) ⊙ sign(W), from g = ∂L/∂(W ⊙ M).

  Computed as g ⊙ |W ⊙ H(|W| − t)|, equal since H ≥ 0.
  """
  return jnp.where(m, g, 0.0) + g * jnp.abs(_weighted_estimator(w, t))


def threshold_grad(g: jax.Array, w: jax.Array, t: jax.Array, alpha: float) -> jax.Array:
  """∂L/∂t = −Σ_{input axes} g ⊙ W ⊙ H(|W| − t) − α·exp(−t).

  ``t`` spans the last ``t.ndim`` axes of ``w`` (its output units); the others are inputs.
  """
  return (-jnp.sum(g * _weighted_estimator(w, t), axis=tuple(range(w.ndim - t.ndim)))
          - alpha * jnp.exp(-t))


def flax_output_axes(path: str, leaf: Any) -> int:
  """How many trailing axes of a kernel index its output units (the default of :func:`dst`).

  2 for a 3-D kernel of a module named ``query``, ``key`` or ``value`` (Flax's
  attention projections, [d_model, heads, head_dim]: one threshold per head and
  feature; see :func:`sparsejax.distributions.attention_split`), else 1 (Dense
  [in, out], Conv [..., in, out], the attention ``out`` projection
  [heads, head_dim, d_model]).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sparsejax.methods.dst import flax_output_axes
    >>> flax_output_axes("block/attention/query/kernel", jnp.zeros((64, 4, 16)))
    2
    >>> flax_output_axes("block/attention/out/kernel", jnp.zeros((4, 16, 64)))
    1
  """
  split = attention_split(path, jnp.shape(leaf))
  return 1 if split is None else jnp.ndim(leaf) - split


def _latent_dtype(dtype: Any) -> Any:
  """float32, or the param's own dtype when it is wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _params_shaped(tree: Any, params: Any) -> Any:
  """``tree`` (None for dense leaves) with the dense leaves taken from ``params``."""
  return jax.tree.map(lambda x, p: p if x is None else x, tree, params, is_leaf=is_unmasked)


def _with_placeholders(thresholds: Any) -> Any:
  """The thresholds with a placeholder ``zeros((1,))`` for every dense leaf.

  This tree has the params' structure, so label and mask trees written for the
  params (``optax.multi_transform``, ``optax.masked``, ``adamw(mask=...)``) apply to
  it: a kernel's thresholds get the kernel's label. (Not an empty array: orbax cannot
  checkpoint those.) A placeholder's gradient is 0, and it is never read.
  """
  return jax.tree.map(lambda t: jnp.zeros((1,), jnp.float32) if t is None else t, thresholds,
                      is_leaf=is_unmasked)


def dst(inner: optax.GradientTransformation, *, alpha: float = 5e-4,
        recovery_density: float = 0.01,
        dense: DensePredicate = keep_non_kernels_dense,
        threshold_optimizer: optax.GradientTransformation | None = None,
        output_axes: Callable[[str, Any], int] = flax_output_axes
        ) -> SparseTransformation:
  """Dynamic Sparse Training with trainable masked layers.

  Thresholds start at 0, so the model starts dense; the regulariser
  ``alpha · Σ exp(−t)`` pushes them up (larger alpha → sparser).

  The inner optimizer updates a params-shaped tree (latent weights for masked
  leaves, the params for dense ones), so label and mask trees written for the params
  work. The thresholds are updated by ``threshold_optimizer`` (by default a second
  instance of ``inner``, with its own state) on a tree of the params' structure whose
  masked leaves are the threshold vectors (dense leaves get placeholders): a kernel's
  label or weight-decay flag applies to its thresholds, as in the official code,
  where thresholds are parameters of the same optimizer. Pass e.g.
  ``threshold_optimizer=optax.sgd(lr)`` to optimise them differently. Latent weights,
  thresholds and their optimizer states are float32 (or wider) whatever the params'
  dtype; params keep their dtype.

  Args:
    inner: the optimizer of the latent weights and dense leaves.
    alpha: strength of the threshold regulariser (5e-4 for MNIST LeNets).
    recovery_density: a leaf at or below this density gets its thresholds reset to 0.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    threshold_optimizer: the optimizer of the thresholds; None for ``inner``.
    output_axes: ``(path, leaf) -> n``: the last ``n`` axes of a masked leaf index its
      output units and get one threshold each (:func:`flax_output_axes`: Flax's
      attention query/key/value kernels 2, every other kernel 1).

  Returns:
    An optax transformation with a :class:`DSTState`; ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8), "b": jnp.zeros(8)}
    >>> tx = sj.dst(optax.sgd(0.1), alpha=5.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}, state, params)
    >>> sj.thresholds(state)["w"].round(2)  # pushed up by the regulariser: 0.1 · 5 · e⁰
    Array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=float32)
    >>> sj.summary(state)["sparsity"]  # |w| ≤ 0.5 is masked
    0.5

  References:
    Liu et al., `Dynamic Sparse Training: Find Efficient Sparse Network From Scratch With
    Trainable Masked Layers <https://arxiv.org/abs/2005.06870>`_, ICLR 2020
  """
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha!r}")
  if not 0.0 <= recovery_density < 1.0:
    raise ValueError(f"recovery_density must be in [0, 1), got {recovery_density!r}")
  inner = optax.with_extra_args_support(inner)
  threshold_tx = inner if threshold_optimizer is None else optax.with_extra_args_support(
      threshold_optimizer)

  def init_fn(params):
    flags = masked_leaves(params, dense)
    # A copy, not the params' own buffers: a train step may donate params and state.
    weights = jax.tree.map(
        lambda p, f: jnp.array(p, _latent_dtype(jnp.result_type(p)), copy=True) if f else None,
        params, flags)
    thresholds = jax.tree_util.tree_map_with_path(
        lambda path, p, f: jnp.zeros(_output_shape(path_name(path), p), jnp.float32)
        if f else None, params, flags)
    masks = threshold_masks(weights, thresholds)
    return DSTState(step=jnp.zeros((), jnp.int32), weights=weights, thresholds=thresholds,
                    masks=masks, inner_state=inner.init(_params_shaped(weights, params)),
                    threshold_state=threshold_tx.init(_with_placeholders(thresholds)),
                    nonfinite_updates=jnp.zeros((), jnp.int32),
                    masks_changed=jnp.zeros((), bool), dense_gradient=jnp.zeros((), bool),
                    ever_active=jax.tree.map(jnp.copy, masks))

  def update_fn(updates, state, params=None, mask_update=None, **extra_args):
    # Masks follow the thresholds at every step: there is no mask-update code to leave out.
    require_params(params)
    check_mask_update(mask_update)
    weights = _params_shaped(state.weights, params)
    grad_w = jax.tree.map(
        lambda t, g, w, m: g if t is None else weight_grad(g.astype(w.dtype), w, t, m),
        state.thresholds, updates, weights, state.masks, is_leaf=is_unmasked)
    grad_t = map_masked(lambda t, g, w: threshold_grad(g.astype(w.dtype), w, t, alpha),
                        state.thresholds, updates, weights)
    upd_w, inner_state = inner.update(grad_w, state.inner_state, weights, **extra_args)
    upd_t, threshold_state = threshold_tx.update(
        _with_placeholders(grad_t), state.threshold_state,
        _with_placeholders(state.thresholds), **extra_args)
    new_w = optax.apply_updates(weights, upd_w)
    new_t = map_masked(lambda t, u, w: _recover(optax.apply_updates(t, u), w),
                       state.thresholds, upd_t, new_w)
    # A non-finite gradient never changes the masks (the weights follow the optimizer).
    # Every masked gradient entry enters a threshold gradient's sum, multiplied by a
    # finite W ⊙ H (inf · 0 is NaN): the sums are finite iff the gradients are, and
    # checking them saves a pass over every gradient.
    finite = all_finite(grad_t, state.thresholds)
    new_masks = map_masked(lambda new, old: jnp.where(finite, new, old),
                           threshold_masks(new_w, new_t), state.masks)

    def param_update(m_old, m_new, u, w, p):
      if m_new is None:
        return u
      # Active before and after: p + u equals the latent W + u; otherwise jump.
      return jnp.where(m_old & m_new, u, jnp.where(m_new, w, 0.0) - p).astype(p.dtype)

    out = jax.tree.map(param_update, state.masks, new_masks, upd_w, new_w, params,
                       is_leaf=is_unmasked)
    latent = map_masked(lambda t, w: w, new_t, new_w)
    nonfinite = state.nonfinite_updates + (~finite).astype(jnp.int32)
    changed = any_leaf(map_masked(jnp.not_equal, new_masks, state.masks))
    ever = map_masked(jnp.logical_or, new_masks, state.ever_active)
    return out, DSTState(optax.safe_increment(state.step), latent, new_t, new_masks,
                         inner_state, threshold_state, nonfinite, changed,
                         jnp.ones((), bool), ever)

  def _output_shape(path, p):
    n = output_axes(path, p)
    if not 1 <= n < jnp.ndim(p):
      raise ValueError(f"output_axes of {path!r} (shape {jnp.shape(p)}) must be in "
                       f"[1, {jnp.ndim(p) - 1}], got {n}")
    return jnp.shape(p)[-n:]

  def _recover(t, w):
    density = count_true(jnp.abs(w) - t > 0) / w.size
    return jnp.where(density <= recovery_density, jnp.zeros_like(t), t)

  # Jitted: an eager init dispatches (and compiles) dozens of small ops per leaf.
  return SparseTransformation(jax.jit(init_fn), update_fn)


def thresholds(opt_state: optax.OptState) -> Any:
  """The threshold pytree of the :func:`dst` state found anywhere in ``opt_state``.

  Args:
    opt_state: a DST state, possibly nested or boxed by ``flax.nnx.Optimizer``.

  Returns:
    A pytree like the params: an array per masked leaf (one entry per output unit),
    None for dense leaves.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> state = sj.dst(optax.sgd(0.1)).init({"w": jnp.ones((4, 3)), "b": jnp.zeros(3)})
    >>> sj.thresholds(state)
    {'b': None, 'w': Array([0., 0., 0.], dtype=float32)}
  """
  return optax.tree_utils.tree_get(unbox(opt_state), "thresholds")
