"""Tracing per distinct shape, not per leaf: leaves of equal shapes are stacked and vmapped.

Code written leaf by leaf compiles one copy per leaf, so a 24-block transformer (145
masked leaves) would compile 145 random permutations for its initial masks. Its
leaves come in a handful of shapes (attention and MLP kernels repeat in every
block): stacking the leaves of each shape and mapping the per-leaf function with
``jax.vmap`` compiles it once per shape. The results equal the leaf-by-leaf ones
for functions that treat every leaf on its own (``jax.random`` functions included:
vmap changes how they are computed, not what).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def shape_groups(*columns: Sequence[Any]) -> list[list[int]]:
  """Indices grouped by the shapes and dtypes of every column, in order of first appearance.

  Args:
    *columns: equally long sequences of arrays (or pytrees of arrays); indices where
      the first column is None are skipped.

  Returns:
    A list of index lists covering every other index once.
  """
  groups: dict[Any, list[int]] = {}
  for i, first in enumerate(columns[0]):
    if first is not None:
      signature = tuple((jnp.shape(x), jnp.result_type(x))
                        for column in columns for x in jax.tree.leaves(column[i]))
      groups.setdefault(signature, []).append(i)
  return list(groups.values())


def map_stacked(fn: Callable[..., Any], groups: Sequence[Sequence[int]],
                *columns: Sequence[Any]) -> list[Any]:
  """``[fn(*(c[i] for c in columns)) for i in ...]``, traced once per group.

  Args:
    fn: a function of one entry of every column; it must treat each call on its own
      (it is vmapped over the members of a group).
    groups: index groups whose members have equal shapes in every column
      (:func:`shape_groups`).
    *columns: equally long sequences of arrays (or pytrees of arrays).

  Returns:
    A list as long as the columns: ``fn``'s result at every grouped index, None elsewhere.
  """
  out: list[Any] = [None] * len(columns[0])
  for group in groups:
    if len(group) == 1:
      out[group[0]] = fn(*(column[group[0]] for column in columns))
      continue
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *(column[i] for i in group))
               for column in columns]
    results = jax.vmap(fn)(*stacked)
    for position, i in enumerate(group):
      out[i] = jax.tree.map(lambda r, position=position: r[position], results)
  return out
