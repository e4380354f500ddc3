"""Drop and grow scores: higher means "keep" (drop) or "grow first" (grow).

A score function maps a :class:`ScoreInputs` to a pytree of float arrays shaped like
the params (only masked leaves are read). Methods differ by the functions they pick.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.masks import is_unmasked, map_masked


class ScoreInputs(NamedTuple):
  """What a score may look at during a mask update."""
  params: Any
  grads: Any
  masks: Any
  key: jax.Array
  step: jax.Array
  extra: Any  # method-specific state, e.g. DST-EE activity counts


ScoreFn = Callable[[ScoreInputs], Any]


def magnitude(inputs: ScoreInputs) -> Any:
  """|w|: the drop score of SET, RigL and their relatives."""
  return map_masked(lambda _, p: jnp.abs(p), inputs.masks, inputs.params)


def gradient_magnitude(inputs: ScoreInputs) -> Any:
  """|∂L/∂w| of the dense gradient: RigL's grow score."""
  return map_masked(lambda _, g: jnp.abs(g), inputs.masks, inputs.grads)


def random_uniform(inputs: ScoreInputs) -> Any:
  """Independent U(0, 1) per weight: SET's grow score."""
  leaves, treedef = jax.tree.flatten(inputs.masks, is_leaf=is_unmasked)
  keys = jax.random.split(inputs.key, len(leaves))
  scores = [None if m is None else jax.random.uniform(k, m.shape) for k, m in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, scores)
