"""A trained masked model's kernels stored as their active weights alone.

Every masked-mode method ends training with dense kernels that are mostly zeros.
:func:`compact` turns each masked kernel into a :class:`CompactKernel`: compressed rows
over the kernel's last axis (its output units for ``Dense``, ``Conv`` and an attention
output projection). Row ``j`` holds the values of the active weights ``kernel[..., j]``
in order of their flat position over the other axes, with those positions as int32.
Nothing is padded, so the stored bytes are the values', 4 per index and 4 per row:
about 8 bytes per active float32 weight. Dense leaves (biases, norms, embeddings the
method kept dense) stay as they are. The result is a pytree of arrays: orbax saves
and restores it like params.

Example::

  stored = sj.compact(params, sj.masks(state))
  sj.compact_bytes(stored)   # {"values": ..., "indices": ..., "offsets": ..., ...}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from sparsejax.masks import is_unmasked, path_name, unbox


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompactKernel:
  """One masked kernel, stored as compressed rows over its last axis.

  Attributes:
    values: ``[nnz]`` the active weights, row by row.
    indices: int32 ``[nnz]``: each value's flat position in ``kernel[..., j]``.
    offsets: int32 ``[shape[-1] + 1]``: row ``j`` is ``values[offsets[j]:offsets[j+1]]``.
    shape: the dense kernel's shape (static).
  """
  values: jax.Array
  indices: jax.Array
  offsets: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

  @property
  def nnz(self) -> int:
    return int(self.values.shape[0])

  def dense(self) -> np.ndarray:
    """The dense kernel (zeros where the mask was False), on the host."""
    rows = self.shape[-1]
    fan = math.prod(self.shape[:-1])
    out = np.zeros((rows, fan), np.asarray(self.values).dtype)
    offsets = np.asarray(self.offsets)
    row_of = np.repeat(np.arange(rows), np.diff(offsets))
    out[row_of, np.asarray(self.indices)] = np.asarray(self.values)
    return out.T.reshape(self.shape)

  def check(self, name: str) -> None:
    """Raises ValueError (one line, naming ``name``) unless the arrays describe a kernel
    of ``shape``: rows that cover the values in order, positions inside a row. A kernel
    restored from disk passes through here before anything reads by its positions."""
    offsets, indices = np.asarray(self.offsets), np.asarray(self.indices)
    fan, rows = math.prod(self.shape[:-1]), self.shape[-1]
    problem = None
    if offsets.shape != (rows + 1,) or indices.shape != (self.nnz,):
      problem = (f"{rows + 1} offsets and {self.nnz} indices expected, got "
                 f"{offsets.size} and {indices.size}")
    elif offsets[0] != 0 or offsets[-1] != self.nnz or np.any(np.diff(offsets) < 0):
      problem = "its offsets do not split the values into rows"
    elif self.nnz and (indices.min() < 0 or indices.max() >= fan):
      problem = f"an index outside [0, {fan})"
    if problem is not None:
      raise ValueError(f"{name}: not a compact kernel of shape {list(self.shape)}: {problem}")


def _compact_leaf(path: str, param: Any, mask: Any) -> CompactKernel:
  param, mask = np.asarray(param), np.asarray(mask)
  if mask.shape != param.shape:
    raise ValueError(f"{path}: mask shape {list(mask.shape)} does not match the kernel's "
                     f"{list(param.shape)}")
  if mask.dtype != np.bool_:
    raise ValueError(f"{path}: a mask must be boolean, got {mask.dtype}")
  if param.ndim < 2:
    raise ValueError(f"{path}: only kernels with two or more axes compact, got shape "
                     f"{list(param.shape)}")
  rows = param.shape[-1]
  by_row = mask.reshape(-1, rows).T  # [rows, fan]: row-major nonzero order is row by row
  row, index = np.nonzero(by_row)
  counts = np.bincount(row, minlength=rows)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  values = param.reshape(-1, rows).T[row, index]
  return CompactKernel(values, index.astype(np.int32), offsets, tuple(param.shape))


def compact(params: Any, masks: Any) -> Any:
  """Every masked kernel of ``params`` as a :class:`CompactKernel`; dense leaves as they are.

  Args:
    params: the trained params (their masked weights are 0); an ``nnx.State`` too.
    masks: ``sj.masks(state)``: a pytree like ``params`` with a bool array per masked
      leaf and None for dense leaves.

  Returns:
    A pytree like ``params`` (numpy arrays in the compact kernels).

  Raises:
    ValueError: one line, when the masks do not match the params (structure, a shape,
      a dtype) or a masked leaf is not a kernel (fewer than two axes).
  """
  params, masks = unbox(params), unbox(masks)  # an nnx.State as the plain pytree it holds
  flat_masks, mask_tree = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)
  flat_params, param_tree = jax.tree_util.tree_flatten_with_path(params)
  if len(flat_masks) != len(flat_params) or [p for p, _ in flat_masks] != [
      p for p, _ in flat_params]:
    missing = sorted({path_name(p) for p, _ in flat_params} ^ {path_name(p) for p, _ in flat_masks})
    raise ValueError("masks do not match params: different leaves"
                     + (f" ({', '.join(missing[:3])})" if missing else ""))
  del mask_tree
  leaves = [leaf if mask is None else _compact_leaf(path_name(path), leaf, mask)
            for (path, leaf), (_, mask) in zip(flat_params, flat_masks)]
  return jax.tree_util.tree_unflatten(param_tree, leaves)


def is_compact(x: Any) -> bool:
  """``is_leaf`` for compact pytrees: a :class:`CompactKernel` is one leaf."""
  return isinstance(x, CompactKernel)


def compact_bytes(tree: Any) -> dict[str, int]:
  """What a compact pytree stores, in bytes.

  Returns:
    ``{"values", "indices", "offsets"}`` over the compact kernels, ``"dense_leaves"``
    (everything else), ``"total"``, ``"nnz"``, ``"kernels"`` (how many compact
    kernels) and ``"dense_total"``: the bytes of the same params with dense kernels.
  """
  out = dict.fromkeys(("values", "indices", "offsets", "dense_leaves", "nnz", "kernels",
                       "dense_total"), 0)
  for leaf in jax.tree.leaves(tree, is_leaf=is_compact):
    if isinstance(leaf, CompactKernel):
      values = np.asarray(leaf.values)
      out["values"] += values.nbytes
      out["indices"] += np.asarray(leaf.indices).nbytes
      out["offsets"] += np.asarray(leaf.offsets).nbytes
      out["nnz"] += leaf.nnz
      out["kernels"] += 1
      out["dense_total"] += math.prod(leaf.shape) * values.dtype.itemsize
    else:
      size = np.asarray(leaf).nbytes
      out["dense_leaves"] += size
      out["dense_total"] += size
  out["total"] = out["values"] + out["indices"] + out["offsets"] + out["dense_leaves"]
  return out
