"""The optax wrapper every mask-based method shares.

``sparse_wrapper(inner, topology, seed)`` wraps the user's optimizer so that, after
``optax.apply_updates``, every masked leaf of the params is exactly zero where its
mask is False. A :class:`Topology` says how masks start and how they change; the
wrapper does the rest: masking gradients, the ``lax.cond`` on mask-update steps, and
resetting the inner optimizer state of grown weights.

A mask-update step computes the new masks from the current weights and the step's
dense gradient (the scores of RigL's Algorithm 1). Weights grown by it start from 0
with the inner optimizer's initial state; a weight dropped and regrown in the same
update keeps its value and state (as in google-research/rigl). Then, by default, the
step ends (Algorithm 1, the official RigL code and jaxpruner's default skip the
optimizer step at an update: zero updates, inner state unchanged apart from the
reset); with ``Topology.train_at_update`` the weights active under both masks also
take this step's optimizer update. A mask update is skipped, keeping the old masks,
when a masked leaf's gradient is not finite (``SparseState.nonfinite_updates`` counts
these); without ``train_at_update`` such a step then does nothing at all.

The state also says what the step just taken did, for metrics that must not depend on
a method's name: ``masks_changed``, ``dense_gradient`` (whether the step read the
dense weight gradient: a RigL update step, never SET) and ``ever_active`` (the weights
active at some step so far; None when masks never change). Read them with
``optax.tree_utils.tree_get(state, "dense_gradient")``, or :func:`sparsejax.coverage`.

Every method returns a :class:`SparseTransformation`: an optax transformation that
also answers on the host which steps may change masks (``tx.is_update_step``). A loop
that knows its step on the host can pass ``mask_update=tx.is_update_step(step)`` to
``tx.update`` as a Python bool (a static argument of its jitted step): a step compiled
with False holds no mask-update code at all and costs what a static sparse step costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import is_unmasked, map_masked
from sparsejax.optstate import reset_entries
from sparsejax.scores import ScoreInputs
from sparsejax.selection import count_each


def never(step: int) -> bool:
  """The schedule of a method without mask-update steps: always False."""
  del step
  return False


class SparseTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that also says, on the host, which steps update masks.

  ``tx.is_update_step(step)`` is whether optimizer step ``step`` may change masks by
  the method's schedule, counting steps from 1 (the update taking a state with
  ``state.step == n`` is step ``n + 1``). Its ``update`` takes an optional extra
  argument ``mask_update``, a Python bool known when the step is traced, or None:

  - None (the default) compiles the schedule's check into the step (a ``lax.cond``);
  - True compiles an update step: it updates the masks at every call, with no
    ``lax.cond`` and no selects over the optimizer state;
  - False compiles a step without any mask-update code.

  True and False skip the schedule's check, so take them from ``is_update_step``.
  """

  is_update_step: Callable[[int], bool]

  def __new__(cls, init: Callable[..., Any], update: Callable[..., Any],
              is_update_step: Callable[[int], bool] = never) -> SparseTransformation:
    # Jitted, so that a call outside jit (a notebook, the README's first example) runs
    # one compiled program instead of dispatching hundreds of operations one by one;
    # inside the user's jitted step it is inlined like any nested jit.
    compiled = jax.jit(update, static_argnames="mask_update")

    def update_fn(updates, state, params=None, mask_update=None, **extra_args):
      check_mask_update(mask_update)
      return compiled(updates, state, params, mask_update=mask_update, **extra_args)

    tx = super().__new__(cls, init, update_fn)
    tx.is_update_step = is_update_step
    return tx


def check_mask_update(mask_update: Any) -> None:
  """Raises TypeError unless ``mask_update`` is None or a Python bool."""
  if mask_update is not None and not isinstance(mask_update, bool):
    raise TypeError("mask_update must be None or a Python bool known when the step is traced "
                    f"(a static argument), got {type(mask_update).__name__}")


class SparseState(NamedTuple):
  """State of a sparse-training wrapper around an inner optimizer."""
  step: jax.Array  # optimizer steps taken so far (int32)
  key: jax.Array  # PRNG key, split at every mask update
  masks: Any  # bool array per masked leaf, None for dense leaves
  inner_state: optax.OptState
  extra: Any  # method-specific state, e.g. activity counts; () when unused
  nonfinite_updates: jax.Array  # mask updates skipped for a non-finite gradient (int32)
  masks_changed: jax.Array  # whether the step just taken changed a mask (bool)
  dense_gradient: jax.Array  # whether it read the dense weight gradient (bool)
  ever_active: Any  # masks | all earlier masks; None when masks never change


def no_extra(params: Any, masks: Any) -> tuple[()]:
  """The method state of a method that keeps none: ``()``."""
  del params, masks
  return ()


class Topology(NamedTuple):
  """How a method's masks start and change.

  Attributes:
    init_masks: ``(params, key) -> masks``.
    init_extra: ``(params, masks) -> extra`` method state.
    is_update_step: ``step -> bool``; None for masks that never change.
    update_masks: ``ScoreInputs -> (masks, extra)`` at an update step, from the
      weights before this step's update and this step's dense gradient.
    train_at_update: whether the weights active under both the old and the new
      masks take the optimizer step at a mask-update step (GMP); False skips the
      optimizer step there (the RigL family, as in RigL's Algorithm 1).
    reads_dense_gradient: whether ``update_masks`` reads the dense gradient (RigL's
      growth does, SET's and GMP's do not): such a step costs a dense weight
      gradient in FLOPs accounting.
  """
  init_masks: Callable[[Any, jax.Array], Any]
  init_extra: Callable[[Any, Any], Any] = no_extra
  is_update_step: Callable[[jax.Array], jax.Array] | None = None
  update_masks: Callable[[ScoreInputs], tuple[Any, Any]] | None = None
  train_at_update: bool = True
  reads_dense_gradient: bool = False


def apply_masks(tree: Any, masks: Any) -> Any:
  """Zeros the entries of ``tree`` where ``masks`` is False; dense leaves pass."""
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
                      masks, tree, is_leaf=is_unmasked)


def _masked_updates(updates: Any, masks: Any, params: Any) -> Any:
  """``where(mask, u, -p)``: after ``apply_updates`` masked weights are exactly 0."""
  return jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                      masks, updates, params, is_leaf=is_unmasked)


def all_finite(tree: Any, masks: Any) -> jax.Array:
  """Whether every masked leaf of ``tree`` is finite (a bool scalar), in one pass.

  One count over all leaves (:func:`sparsejax.selection.count_each`): its result is one
  kernel's output, where scalars combined from one reduction per leaf are fused by XLA
  into every consumer.
  """
  flags = [~jnp.isfinite(x) for x in jax.tree.leaves(map_masked(lambda _, x: x, masks, tree))]
  return ~jnp.any(count_each(flags) > 0)


def any_leaf(masks: Any) -> jax.Array:
  """Whether any masked leaf has a True entry (a bool scalar).

  One reduction per leaf, unlike :func:`all_finite`: DST calls it at every step, where
  one layout of all leaves would gather leaves sharded over devices, and its result is
  read once (no consumer per leaf to duplicate it into).
  """
  flags = jax.tree.leaves(map_masked(lambda m: m.any(), masks))
  return jnp.stack(flags).any() if flags else jnp.zeros((), bool)


def require_params(params: Any) -> None:
  """Raises ValueError when ``tx.update`` was called without ``params``."""
  if params is None:
    raise ValueError("sparsejax methods need `params` in tx.update(grads, state, params)")


def sparse_wrapper(inner: optax.GradientTransformation, topology: Topology,
                   seed: int = 0) -> SparseTransformation:
  """Wraps ``inner`` so that the params follow the masks of ``topology``.

  Must be the outermost transformation. ``update`` requires ``params``.

  Args:
    inner: the user's optimizer (any optax transformation).
    topology: how masks start and change.
    seed: seed of the PRNG key carried in the state.

  Returns:
    A :class:`SparseTransformation` with a :class:`SparseState`.

  Examples:
    A method that halves its active weights once, at step 2, by magnitude:

    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> from sparsejax.selection import top_k_mask
    >>> topology = sj.Topology(
    ...     init_masks=lambda params, key: {"w": jnp.ones((2, 4), bool), "b": None},
    ...     is_update_step=lambda step: step == 2,
    ...     update_masks=lambda inputs: ({"w": top_k_mask(jnp.abs(inputs.params["w"]), 4),
    ...                                   "b": None}, inputs.extra))
    >>> tx = sj.sparse_wrapper(optax.sgd(0.0), topology)
    >>> params = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.zeros((2, 4)), "b": jnp.zeros(4)}
    >>> for _ in range(2):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params["w"]
    Array([[0., 0., 0., 0.],
           [4., 5., 6., 7.]], dtype=float32)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    mask_key, key = jax.random.split(jax.random.PRNGKey(seed))
    masks = topology.init_masks(params, mask_key)
    dynamic = topology.update_masks is not None
    return SparseState(step=jnp.zeros((), jnp.int32), key=key, masks=masks,
                       inner_state=inner.init(params),
                       extra=topology.init_extra(params, masks),
                       nonfinite_updates=jnp.zeros((), jnp.int32),
                       masks_changed=jnp.zeros((), bool), dense_gradient=jnp.zeros((), bool),
                       ever_active=jax.tree.map(jnp.copy, masks) if dynamic else None)

  def update_fn(updates, state, params=None, mask_update=None, **extra_args):
    require_params(params)
    check_mask_update(mask_update)
    step = optax.safe_increment(state.step)

    def train(masks, inner_state):
      return inner.update(apply_masks(updates, masks), inner_state, params, **extra_args)

    if topology.update_masks is None or mask_update is False:
      # No mask-update code: the step of a static sparse method.
      inner_updates, inner_state = train(state.masks, state.inner_state)
      no = jnp.zeros((), bool)
      return (_masked_updates(inner_updates, state.masks, params),
              state._replace(step=step, inner_state=inner_state, masks_changed=no,
                             dense_gradient=no))

    def rewire(key, extra):
      """New masks and method state from this step's scores."""
      key, score_key = jax.random.split(key)
      masks, extra = topology.update_masks(
          ScoreInputs(params, updates, state.masks, score_key, step, extra, extra_args))
      return masks, key, extra

    def reset_grown(masks, inner_state):
      """Grown weights get the inner optimizer's initial state; ever-active; changed."""
      grown = map_masked(lambda new, old: new & ~old, masks, state.masks)
      return (reset_entries(inner, inner_state, params, grown),
              map_masked(jnp.logical_or, masks, state.ever_active),
              any_leaf(map_masked(jnp.not_equal, masks, state.masks)))

    if mask_update:
      # The host says this step updates masks: no cond and, below, no selects over the
      # optimizer state (which make XLA copy it).
      is_update = jnp.ones((), bool)
      finite = all_finite(updates, state.masks)
      # `finite` comes out of one reduction over all leaves (count_each), which every
      # leaf's select reads; a scalar combined from one reduction per leaf would be
      # fused into each of them: compiled code quadratic in the number of leaves.
      masks, key, extra = optax.tree.where(finite, rewire(state.key, state.extra),
                                           (state.masks, state.key, state.extra))
      inner_state, ever, changed = reset_grown(masks, state.inner_state)
    else:
      def rewire_and_reset(key, extra, inner_state):
        masks, key, extra = rewire(key, extra)
        return (masks, key, extra, *reset_grown(masks, inner_state))

      def keep(key, extra, inner_state):
        return state.masks, key, extra, inner_state, state.ever_active, jnp.zeros((), bool)

      is_update = topology.is_update_step(step)
      # Reading every gradient for the finiteness check is only needed at update steps.
      finite = jax.lax.cond(is_update, lambda: all_finite(updates, state.masks),
                            lambda: jnp.ones((), bool))
      # Only masks, key, method state and the inner state cross the cond; the weights'
      # update stays outside it, fused with the rest of the step.
      masks, key, extra, inner_state, ever, changed = jax.lax.cond(
          is_update & finite, rewire_and_reset, keep, state.key, state.extra,
          state.inner_state)
    nonfinite = state.nonfinite_updates + (is_update & ~finite).astype(jnp.int32)
    if topology.train_at_update:
      trained = map_masked(jnp.logical_and, masks, state.masks)
      inner_updates, inner_state = train(trained, inner_state)
    elif mask_update:
      # An update step only rewires: zero updates, and the (reset) state.
      trained = masks
      shapes = jax.eval_shape(train, state.masks, inner_state)[0]
      inner_updates = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    else:
      # The same, where the schedule says so (also when a non-finite gradient kept the
      # masks). The selects fuse into the optimizer's own elementwise update.
      trained = masks
      stepped_updates, stepped_state = train(state.masks, inner_state)
      inner_updates = optax.tree.where(is_update, optax.tree.zeros_like(stepped_updates),
                                       stepped_updates)
      inner_state = optax.tree.where(is_update, inner_state, stepped_state)
    # Dropped weights become exactly 0; grown ones were masked, hence 0 already.
    return (_masked_updates(inner_updates, trained, params),
            SparseState(step, key, masks, inner_state, extra, nonfinite, changed,
                        is_update & topology.reads_dense_gradient, ever))

  def is_update_step(step: int) -> bool:
    return topology.is_update_step is not None and bool(topology.is_update_step(step))

  # Jitted: an eager init dispatches (and compiles) dozens of small ops per leaf.
  return SparseTransformation(jax.jit(init_fn), update_fn, is_update_step)
