"""The per-weight buffers of any optax state, found by key path, and resetting entries of them.

An optax state stores per-weight buffers (momenta, Adam moments, accumulated
gradients, schedule-free's ``z``, ...) in subtrees that mirror the params, at any depth
and behind any wrapper (``chain``, ``masked``, ``multi_transform``, ``MultiSteps``,
``inject_hyperparams``, ``apply_if_finite``, ...). Such a buffer's key path ends with
its param's key path, and its shape is the param's shape. That is the rule used here:
it needs no ``init`` on placeholder params (which ``optax.tree_utils.tree_map_params``
does, and which label functions, ``optax.masked`` and adafactor's shape logic reject)
and it skips everything else: counts, hyper-parameters, ``optax.MaskedNode`` entries
and buffers of another shape, such as adafactor's factored row and column statistics
of a layer, which are averages over a whole row or column and are kept as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import is_unmasked, key_name


def _plain_path(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(name for name in map(key_name, path) if name is not None)


def param_of_state_leaves(state: optax.OptState, params: Any) -> list[int | None]:
  """For each leaf of ``state``, the index of the param leaf it is a per-weight buffer of.

  A state leaf belongs to the param whose key path is the longest suffix of the
  leaf's key path, provided the two shapes are equal.

  Args:
    state: an optax state (any nesting).
    params: the params it was initialised from.

  Returns:
    One entry per leaf of ``state`` (``jax.tree.leaves`` order): an index into
    ``jax.tree.leaves(params)``, or None for leaves that are not per-weight buffers.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  by_path = {_plain_path(path): (i, jnp.shape(leaf)) for i, (path, leaf) in enumerate(flat_params)}
  depths = sorted({len(path) for path in by_path}, reverse=True)
  owners: list[int | None] = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    path = _plain_path(path)
    owner = None
    for depth in depths:
      if depth <= len(path) and path[len(path) - depth:] in by_path:
        index, shape = by_path[path[len(path) - depth:]]
        owner = index if jnp.shape(leaf) == shape else None
        break
    owners.append(owner)
  return owners


def reset_entries(inner: optax.GradientTransformation, inner_state: optax.OptState,
                  params: Any, where: Any) -> optax.OptState:
  """Resets entries of the per-weight buffers of ``inner_state`` to their initial value.

  The initial value is ``inner.init(params)``'s (zeros for momenta and moments; the
  current weight for buffers initialised from the params, like schedule-free's
  ``z``). Leaves that are not per-weight buffers (see :func:`param_of_state_leaves`)
  are returned unchanged.

  Args:
    inner: the optimizer whose state this is.
    inner_state: its state.
    params: current params.
    where: mask pytree like ``params``: True where the state must be reset; None for
      leaves to leave untouched.

  Returns:
    The state with the selected entries reset.
  """
  flags = jax.tree.leaves(where, is_leaf=is_unmasked)
  owners = param_of_state_leaves(inner_state, params)
  if all(owner is None or flags[owner] is None for owner in owners):
    return inner_state
  fresh = jax.tree.leaves(inner.init(params))
  leaves, treedef = jax.tree.flatten(inner_state)
  out = [leaf if owner is None or flags[owner] is None
         else jnp.where(flags[owner], new, leaf).astype(leaf.dtype)
         for leaf, new, owner in zip(leaves, fresh, owners, strict=True)]
  return jax.tree.unflatten(treedef, out)
