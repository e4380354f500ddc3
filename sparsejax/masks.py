"""Mask pytrees: which leaves are masked, random initial masks, and reading masks back.

A mask pytree is shaped like the params: a bool array for every masked leaf and
``None`` for a leaf kept dense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import distributions
from sparsejax.selection import random_subsets

DensePredicate = Callable[[str, Any], bool]


def is_unmasked(x: Any) -> bool:
  """``is_leaf`` for mask pytrees: None marks a leaf kept dense."""
  return x is None


def map_masked(fn: Callable[..., Any], masks: Any, *trees: Any) -> Any:
  """``fn(*leaves)`` on every masked leaf; None (a dense leaf) stays None.

  Args:
    fn: function of one leaf of ``masks`` and the matching leaves of ``trees``.
    masks: a pytree whose None leaves mark dense leaves (masks, thresholds, counts).
    *trees: pytrees with the structure of the params (or of ``masks``).

  Returns:
    A pytree like ``masks``.
  """
  return jax.tree.map(lambda m, *xs: None if m is None else fn(m, *xs), masks, *trees,
                      is_leaf=is_unmasked)


def map_masked_together(fn: Callable[..., list[Any]], masks: Any, *trees: Any) -> Any:
  """``fn`` on all masked leaves at once: lists of leaves in, a list out; None stays None.

  For functions that treat every leaf in one computation (one selection over all
  layers) rather than leaf by leaf.

  Args:
    fn: function of the list of masked leaves of ``masks`` and the matching lists of
      ``trees``, returning one result per masked leaf.
    masks: a pytree whose None leaves mark dense leaves.
    *trees: pytrees with the structure of the params (or of ``masks``).

  Returns:
    A pytree like ``masks``.
  """
  leaves, treedef = jax.tree.flatten(masks, is_leaf=is_unmasked)
  chosen = [i for i, leaf in enumerate(leaves) if leaf is not None]
  columns = [[column[i] for i in chosen]
             for column in [leaves] + [treedef.flatten_up_to(tree) for tree in trees]]
  out: list[Any] = [None] * len(leaves)
  for i, result in zip(chosen, fn(*columns), strict=True):
    out[i] = result
  return jax.tree.unflatten(treedef, out)


# Last key-path entries of weight matrices: Flax's (linen and nnx), Haiku's, PyTorch-style.
KERNEL_NAMES = ("kernel", "w", "weight")
# Last key-path entries of embedding tables (Flax's nn.Embed and nnx.Embed: "embedding").
EMBEDDING_NAMES = ("embedding", "embeddings")


def _is_float_matrix(leaf: Any) -> bool:
  """Two or more axes, floating point, not empty."""
  return (jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
          and math.prod(jnp.shape(leaf)) > 0)


def _last_name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def keep_non_kernels_dense(path: str, leaf: Any) -> bool:
  """The default ``dense`` predicate: only weight matrices are sparse.

  A leaf is masked when its name (the last entry of its path) is ``kernel`` (Flax:
  ``Dense``, ``DenseGeneral``, ``Conv``, attention projections, nnx ``Linear``...),
  ``w`` (Haiku) or ``weight`` and it is a floating-point array with two or more axes.
  Everything else stays dense whatever its rank: biases (a Flax attention bias is
  [heads, head_dim]), norm scales, embedding tables (see
  :func:`keep_non_weights_dense`), positional embeddings, integer tables.

  Examples:
    >>> import jax.numpy as jnp, sparsejax as sj
    >>> sj.keep_non_kernels_dense("attention/query/bias", jnp.zeros((4, 16)))
    True
    >>> sj.keep_non_kernels_dense("attention/query/kernel", jnp.zeros((64, 4, 16)))
    False
    >>> sj.keep_non_kernels_dense("Embed_0/embedding", jnp.zeros((1000, 64)))
    True
  """
  return not (_last_name(path) in KERNEL_NAMES and _is_float_matrix(leaf))


def keep_non_weights_dense(path: str, leaf: Any) -> bool:
  """Like :func:`keep_non_kernels_dense`, but embedding tables (``embedding``) are sparse too.

  Examples:
    >>> import jax.numpy as jnp, sparsejax as sj
    >>> sj.keep_non_weights_dense("Embed_0/embedding", jnp.zeros((1000, 64)))
    False
  """
  return not (_last_name(path) in KERNEL_NAMES + EMBEDDING_NAMES and _is_float_matrix(leaf))


def keep_small_leaves_dense(path: str, leaf: Any) -> bool:
  """A ``dense`` predicate by shape alone, for params without Flax's names: every
  floating-point leaf with two or more axes is masked, whatever its name.

  Examples:
    >>> import jax.numpy as jnp, sparsejax as sj
    >>> sj.keep_small_leaves_dense("layer/b", jnp.zeros(8))
    True
    >>> sj.keep_small_leaves_dense("layer/anything", jnp.zeros((4, 8)))
    False
  """
  del path
  return not _is_float_matrix(leaf)


def key_name(key: Any) -> str | None:
  """One key-path entry as a string; None for flax.nnx's ``value`` boxes."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == "value" else key.name  # flax.nnx Variable boxes
  return str(getattr(key, "key", key))


def path_name(path: tuple[Any, ...]) -> str:
  """Joins a pytree key path into ``"Dense_0/kernel"`` form."""
  return "/".join(name for name in map(key_name, path) if name is not None)


def leaf_names(tree: Any) -> list[str]:
  """Path names of all leaves of ``tree``, in ``jax.tree.leaves`` order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def masked_leaves(params: Any, dense: DensePredicate = keep_non_kernels_dense) -> Any:
  """Pytree like ``params``: True where a leaf is masked, False where it stays dense.

  Raises:
    ValueError: when ``dense`` keeps every leaf dense.
  """
  flags = jax.tree_util.tree_map_with_path(lambda p, x: not dense(path_name(p), x), params)
  if not any(jax.tree.leaves(flags)):
    raise ValueError("the `dense` predicate keeps every parameter dense: nothing to sparsify "
                     "(by default only leaves named kernel, w or weight with 2+ axes are "
                     "masked; dense=sparsejax.keep_small_leaves_dense masks any 2+-D leaf)")
  return flags


def nnz_targets(params: Any, sparsity: float, distribution: str | Mapping[str, float],
                dense: DensePredicate = keep_non_kernels_dense) -> Any:
  """Target non-zero count of every masked leaf (None for dense leaves).

  Args:
    params: the parameter pytree.
    sparsity: fraction of zeros over all masked leaves, in [0, 1).
    distribution: "uniform", "er", "erk", or a mapping from path to sparsity.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.

  Returns:
    A pytree like ``params`` of Python ints and Nones.

  Raises:
    ValueError: for a bad sparsity or distribution, or when no leaf is masked.
  """
  flags, treedef = jax.tree.flatten(masked_leaves(params, dense))
  leaves = jax.tree.leaves(params)
  names = leaf_names(params)
  chosen = [i for i, flag in enumerate(flags) if flag]
  counts = distributions.allocate_nnz_by_name(
      [names[i] for i in chosen], [jnp.shape(leaves[i]) for i in chosen], sparsity,
      distribution)
  out: list[int | None] = [None] * len(leaves)
  for i, count in zip(chosen, counts):
    out[i] = count
  return jax.tree.unflatten(treedef, out)


def random_masks(key: jax.Array, params: Any, nnz: Any) -> Any:
  """Uniformly random masks with exactly ``nnz`` True entries per masked leaf.

  Args:
    key: a PRNG key.
    params: the parameter pytree (only shapes are used).
    nnz: pytree like ``params`` of counts, None for dense leaves.

  Returns:
    A mask pytree (bool arrays, None for dense leaves).
  """
  counts, treedef = jax.tree.flatten(nnz, is_leaf=is_unmasked)
  leaves = treedef.flatten_up_to(params)
  masked = [i for i, n in enumerate(counts) if n is not None]
  chosen = random_subsets(key, [math.prod(jnp.shape(leaves[i])) for i in masked],
                          jnp.asarray([counts[i] for i in masked], jnp.int32))
  out: list[jax.Array | None] = [None] * len(leaves)
  for i, subset in zip(masked, chosen):
    out[i] = subset.reshape(jnp.shape(leaves[i]))
  return jax.tree.unflatten(treedef, out)


def unbox(tree: Any) -> Any:
  """Strips flax.nnx Variable boxes (as in ``nnx.Optimizer.opt_state``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.as_pure(tree)


def masks(opt_state: optax.OptState) -> Any:
  """The mask pytree of the sparse wrapper found anywhere in ``opt_state``.

  Args:
    opt_state: the state of a sparsejax method, possibly nested (e.g. in a chain)
      or boxed by ``flax.nnx.Optimizer``.

  Returns:
    A pytree like the params: bool arrays for masked leaves, None for dense ones.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> tx = sj.static_sparse(tx, sparsity=0.5, distribution="uniform")
    >>> masks = sj.masks(tx.init({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}))
    >>> masks["b"], int(masks["w"].sum())
    (None, 2)
  """
  return optax.tree_utils.tree_get(unbox(opt_state), "masks")


def summary(opt_state: optax.OptState, params: Any = None) -> dict[str, Any]:
  """Per-leaf and global non-zeros, sizes and sparsities, counted from the masks.

  With ``params``, also counts the non-zeros actually present in every masked leaf:
  a leaf whose masked-out weights are not all 0 (the method was not the outermost
  transformation, or params were changed outside the optimizer) is listed under
  ``"violations"``.

  Args:
    opt_state: the state of a sparsejax method (see :func:`masks`).
    params: optional params to check against the masks.

  Returns:
    ``{"layers": {path: {"nnz", "size", "sparsity"}}, "nnz", "size", "sparsity"}``
    over masked leaves (dense leaves are not listed); with ``params`` each layer
    also has ``"nonzero"`` (non-zeros present) and ``"nonzero_masked"`` (non-zeros
    where the mask is False), and the result has ``"violations"``: the paths with
    ``nonzero_masked > 0``.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
    >>> state = sj.static_sparse(optax.sgd(0.1), sparsity=0.75, distribution="uniform").init(params)
    >>> sj.summary(state)
    {'layers': {'w': {'nnz': 8, 'size': 32, 'sparsity': 0.75}}, 'nnz': 8, 'size': 32, 'sparsity': 0.75}
    >>> sj.summary(state, params)["violations"]  # params were not masked yet
    ['w']
  """
  tree = masks(opt_state)
  values = None
  if params is not None:
    values = jax.tree.leaves(jax.tree.map(lambda m, p: None if m is None else p, tree,
                                          unbox(params), is_leaf=is_unmasked))
  layers = {}
  for i, (path, mask) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    nnz, size = int(jnp.sum(mask)), math.prod(mask.shape)
    layer = {"nnz": nnz, "size": size, "sparsity": 1.0 - nnz / size if size else 0.0}
    if values is not None:
      present = jnp.asarray(values[i]) != 0
      layer["nonzero"] = int(jnp.sum(present))
      layer["nonzero_masked"] = int(jnp.sum(present & ~mask))
    layers[path_name(path)] = layer
  nnz = sum(layer["nnz"] for layer in layers.values())
  size = sum(layer["size"] for layer in layers.values())
  out = {"layers": layers, "nnz": nnz, "size": size,
         "sparsity": 1.0 - nnz / size if size else 0.0}
  if values is not None:
    out["violations"] = [path for path, layer in layers.items() if layer["nonzero_masked"]]
  return out
