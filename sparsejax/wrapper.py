"""The optax wrapper every mask-based method shares.

``sparse_wrapper(inner, topology, seed)`` wraps the user's optimizer so that, after
``optax.apply_updates``, every masked leaf of the params is exactly zero where its
mask is False. A :class:`Topology` says how masks start and how they change; the
wrapper does the rest: masking gradients, the ``lax.cond`` on mask-update steps, and
resetting the inner optimizer state of weights whose mask changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.scores import ScoreInputs


class SparseState(NamedTuple):
  """State of a sparse-training wrapper around an inner optimizer."""
  step: jax.Array  # optimizer steps taken so far (int32)
  key: jax.Array  # PRNG key, split at every mask update
  masks: Any  # bool array per masked leaf, None for dense leaves
  inner_state: optax.OptState
  extra: Any  # method-specific state, e.g. activity counts; () when unused


class Topology(NamedTuple):
  """How a method's masks start and change.

  Attributes:
    init_masks: ``(params, key) -> masks``.
    init_extra: ``(params, masks) -> extra`` method state.
    is_update_step: ``step -> bool``; None for masks that never change.
    update_masks: ``ScoreInputs -> (masks, extra)`` at an update step.
    train_at_update: if False (RigL's Algorithm 1) an update step only rewires;
      if True (gradual pruning) the weights are trained first and the new masks
      are computed from the trained weights.
  """
  init_masks: Callable[[Any, jax.Array], Any]
  init_extra: Callable[[Any, Any], Any] = lambda params, masks: ()
  is_update_step: Callable[[jax.Array], jax.Array] | None = None
  update_masks: Callable[[ScoreInputs], tuple[Any, Any]] | None = None
  train_at_update: bool = False


def _is_none(x: Any) -> bool:
  return x is None


def apply_masks(tree: Any, masks: Any) -> Any:
  """Zeros the entries of ``tree`` where ``masks`` is False; dense leaves pass."""
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
                      masks, tree, is_leaf=_is_none)


def _masked_updates(updates: Any, masks: Any, params: Any) -> Any:
  """``where(mask, u, -p)``: after ``apply_updates`` masked weights are exactly 0."""
  return jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                      masks, updates, params, is_leaf=_is_none)


def reset_inner_state(inner: optax.GradientTransformation, inner_state: optax.OptState,
                      params: Any, where: Any) -> optax.OptState:
  """Resets the entries of every param-shaped buffer of ``inner_state`` to their init value.

  Generic over optax states: ``optax.tree_utils.tree_map_params`` finds the
  buffers shaped like the params (momenta, Adam moments, ...).

  Args:
    inner: the inner optimizer.
    inner_state: its state.
    params: current params (only used to compute the initial state).
    where: mask pytree like ``params``: True where the state must be reset;
      None for leaves to leave untouched.

  Returns:
    The state with the selected entries reset.
  """
  flags = jax.tree.map(lambda w: jnp.zeros((), bool) if w is None else w, where,
                       is_leaf=_is_none)
  no_reset = jnp.zeros((), bool)
  reset_here = optax.tree_utils.tree_map_params(
      inner, lambda _, flag: flag, inner_state, flags,
      transform_non_params=lambda _: no_reset)
  fresh = inner.init(params)
  return jax.tree.map(lambda s, f, r: jnp.where(r, f, s), inner_state, fresh, reset_here)


def sparse_wrapper(inner: optax.GradientTransformation, topology: Topology,
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that the params follow the masks of ``topology``.

  Must be the outermost transformation. ``update`` requires ``params``.

  Args:
    inner: the user's optimizer (any optax transformation).
    topology: how masks start and change.
    seed: seed of the PRNG key carried in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SparseState`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    mask_key, key = jax.random.split(jax.random.PRNGKey(seed))
    masks = topology.init_masks(params, mask_key)
    return SparseState(step=jnp.zeros((), jnp.int32), key=key, masks=masks,
                       inner_state=inner.init(params),
                       extra=topology.init_extra(params, masks))

  def train(grads, state, params, step, extra_args):
    inner_updates, inner_state = inner.update(
        apply_masks(grads, state.masks), state.inner_state, params, **extra_args)
    return inner_updates, state._replace(step=step, inner_state=inner_state)

  def rewire(grads, state, params, step, extra_args):
    if topology.train_at_update:
      inner_updates, state = train(grads, state, params, step, extra_args)
      scored_params = optax.apply_updates(params, inner_updates)
    else:
      inner_updates = jax.tree.map(jnp.zeros_like, params)
      scored_params = params
    key, score_key = jax.random.split(state.key)
    masks, extra = topology.update_masks(
        ScoreInputs(scored_params, grads, state.masks, score_key, step, state.extra))
    # Kept weights move by the inner update; dropped and grown ones become exactly 0.
    kept = jax.tree.map(lambda new, old: None if new is None else new & old,
                        masks, state.masks, is_leaf=_is_none)
    changed = jax.tree.map(lambda new, old: None if new is None else new != old,
                           masks, state.masks, is_leaf=_is_none)
    inner_state = reset_inner_state(inner, state.inner_state, params, changed)
    new_state = SparseState(step, key, masks, inner_state, extra)
    return _masked_updates(inner_updates, kept, params), new_state

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sparsejax methods need `params` in tx.update(grads, state, params)")
    step = state.step + 1
    if topology.update_masks is None:
      inner_updates, new_state = train(updates, state, params, step, extra_args)
      return _masked_updates(inner_updates, state.masks, params), new_state

    def train_only(operands):
      inner_updates, new_state = train(*operands, step, extra_args)
      return _masked_updates(inner_updates, state.masks, params), new_state

    def update_masks(operands):
      return rewire(*operands, step, extra_args)

    return jax.lax.cond(topology.is_update_step(step), update_masks, train_only,
                        (updates, state, params))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
