"""The optax wrapper every mask-based method shares.

``sparse_wrapper(inner, topology, seed)`` wraps the user's optimizer so that, after
``optax.apply_updates``, every masked leaf of the params is exactly zero where its
mask is False. A :class:`Topology` says how masks start and how they change; the
wrapper does the rest: masking gradients, the ``lax.cond`` on mask-update steps, and
resetting the inner optimizer state of weights whose mask changed.

A mask-update step computes the new masks from the current weights and the step's
dense gradient (the scores of RigL's Algorithm 1), then trains the weights active
under both the old and the new mask. Grown weights receive no gradient in that step,
so they end it at exactly 0 with a fresh inner-optimizer state. (The official RigL
code skips the whole optimizer step at an update; like jaxpruner and the PyTorch
ports we do not waste that step.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import is_unmasked, map_masked
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
    update_masks: ``ScoreInputs -> (masks, extra)`` at an update step, from the
      weights before this step's update and this step's dense gradient.
  """
  init_masks: Callable[[Any, jax.Array], Any]
  init_extra: Callable[[Any, Any], Any] = lambda params, masks: ()
  is_update_step: Callable[[jax.Array], jax.Array] | None = None
  update_masks: Callable[[ScoreInputs], tuple[Any, Any]] | None = None


def apply_masks(tree: Any, masks: Any) -> Any:
  """Zeros the entries of ``tree`` where ``masks`` is False; dense leaves pass."""
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
                      masks, tree, is_leaf=is_unmasked)


def _masked_updates(updates: Any, masks: Any, params: Any) -> Any:
  """``where(mask, u, -p)``: after ``apply_updates`` masked weights are exactly 0."""
  return jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                      masks, updates, params, is_leaf=is_unmasked)


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
                       is_leaf=is_unmasked)
  no_reset = jnp.zeros((), bool)
  reset_here = optax.tree_utils.tree_map_params(
      inner, lambda _, flag: flag, inner_state, flags,
      transform_non_params=lambda _: no_reset)
  fresh = inner.init(params)
  return jax.tree.map(lambda s, f, r: jnp.where(r, f, s), inner_state, fresh, reset_here)


def require_params(params: Any) -> None:
  """Raises ValueError when ``tx.update`` was called without ``params``."""
  if params is None:
    raise ValueError("sparsejax methods need `params` in tx.update(grads, state, params)")


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

  def update_fn(updates, state, params=None, **extra_args):
    require_params(params)
    step = state.step + 1
    if topology.update_masks is None:
      inner_updates, inner_state = inner.update(
          apply_masks(updates, state.masks), state.inner_state, params, **extra_args)
      return (_masked_updates(inner_updates, state.masks, params),
              state._replace(step=step, inner_state=inner_state))

    def rewire(key, extra):
      key, score_key = jax.random.split(key)
      masks, extra = topology.update_masks(
          ScoreInputs(params, updates, state.masks, score_key, step, extra))
      return masks, key, extra

    # The cond reads arrays the step has anyway (params, gradients) and returns only
    # masks, key and method state, so a step that does not rewire costs what a
    # static-mask step costs: the weights' update stays fused outside it.
    masks, key, extra = jax.lax.cond(topology.is_update_step(step), rewire,
                                     lambda key, extra: (state.masks, key, extra),
                                     state.key, state.extra)
    kept = map_masked(jnp.logical_and, masks, state.masks)
    changed = map_masked(jnp.not_equal, masks, state.masks)
    # Weights whose mask changed restart from the inner optimizer's initial state;
    # only weights active before and after the update receive gradient.
    inner_updates, inner_state = inner.update(
        apply_masks(updates, kept), reset_inner_state(inner, state.inner_state, params, changed),
        params, **extra_args)
    # Dropped weights become exactly 0; grown ones were masked, hence 0 already.
    return (_masked_updates(inner_updates, kept, params),
            SparseState(step, key, masks, inner_state, extra))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
