"""How a global sparsity is split over the masked leaves: uniform, ER, ERK or custom.

Every function here works on static shapes (Python ints) and runs once, at ``init``.
Per-leaf non-zero counts are integers whose sum is exactly ``round((1 - s) * total)``
for the built-in distributions (largest-remainder rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import numbers

DISTRIBUTIONS = ("uniform", "er", "erk")


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
  """Raises ValueError unless ``0 <= sparsity < 1``."""
  if not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")


def check_distribution(distribution) -> None:
  """Raises ValueError for an unknown distribution name or a bad mapping."""
  if isinstance(distribution, Mapping):
    for name, value in distribution.items():
      check_sparsity(value, f"sparsity of {name!r} in the distribution mapping")
  elif distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS} or a "
        "mapping from parameter path to sparsity")


# Flax's attention projections (linen MultiHeadDotProductAttention, nnx MultiHeadAttention):
# query/key/value kernels are [d_model, heads, head_dim], the out kernel [heads, head_dim, d_model].
ATTENTION_INPUT_PROJECTIONS = ("query", "key", "value")
ATTENTION_OUTPUT_PROJECTION = "out"


def attention_split(path: str, shape: Sequence[int]) -> int | None:
  """How many leading axes of a Flax attention projection kernel index its inputs.

  Args:
    path: the leaf's path, e.g. ``"block_0/attention/query/kernel"``.
    shape: its shape.

  Returns:
    1 for a 3-D ``query``/``key``/``value`` kernel, 2 for a 3-D ``out`` kernel, None
    for any other leaf (the module is the path's second-to-last entry).
  """
  parts = path.split("/")
  module = parts[-2] if len(parts) > 1 else ""
  if len(shape) != 3:
    return None
  if module in ATTENTION_INPUT_PROJECTIONS:
    return 1
  return 2 if module == ATTENTION_OUTPUT_PROJECTION else None


def matrix_shape(path: str, shape: Sequence[int]) -> tuple[int, int]:
  """A kernel as the ``(fan_in, fan_out)`` matrix its layer multiplies by.

  The output axes are the last one (Dense, Conv: a conv kernel is an MLP over its
  unfolded patches, [kh·kw·c_in, c_out]), or heads × head_dim of a Flax attention
  query/key/value kernel; a 1-D leaf is ``(1, n)``.
  """
  split = attention_split(path, shape)
  split = max(len(shape) - 1, 0) if split is None else split
  return math.prod(shape[:split]), math.prod(shape[split:])


def _as_kernel(path: str, shape: Sequence[int]) -> tuple[int, ...]:
  """An attention projection as the [fan_in, fan_out] matrix it is; other shapes unchanged."""
  split = attention_split(path, shape)
  if split is None:
    return tuple(shape)
  return (math.prod(shape[:split]), math.prod(shape[split:]))


def _raw_density(shape: Sequence[int], distribution: str) -> float:
  """Unscaled ER/ERK density of a leaf (RigL's ``sparse_utils``).

  A leaf with fewer than two axes counts as a ``[1, n]`` kernel (one input, ``n``
  outputs); an empty leaf has density 0.
  """
  shape = (1,) * (2 - len(shape)) + tuple(shape)
  if math.prod(shape) == 0:
    return 0.0
  if distribution == "erk":
    return sum(shape) / math.prod(shape)
  n_in, n_out = shape[-2:]
  return (n_in + n_out) / (n_in * n_out)


def _scaled_densities(shapes: Sequence[Sequence[int]], density: float,
                      distribution: str) -> list[float]:
  """Densities ε·raw_l with one ε, capping layers at 1 as in the RigL paper."""
  sizes = [math.prod(s) for s in shapes]
  raw = [_raw_density(s, distribution) for s in shapes]
  budget = density * sum(sizes)
  dense: set[int] = set()
  while True:
    rest = [i for i in range(len(shapes)) if i not in dense]
    if not rest:
      return [1.0] * len(shapes)
    kept_dense = sum(sizes[i] for i in dense)
    weighted = sum(raw[i] * sizes[i] for i in rest)
    if weighted == 0:  # only empty leaves are left
      return [1.0 if i in dense else 0.0 for i in range(len(shapes))]
    epsilon = (budget - kept_dense) / weighted
    newly_dense = {i for i in rest if epsilon * raw[i] > 1.0}
    if not newly_dense:
      return [1.0 if i in dense else epsilon * raw[i] for i in range(len(shapes))]
    dense |= newly_dense


def _largest_remainder(exact: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
  """Rounds ``exact`` to integers that sum to ``total`` and stay within ``[0, caps]``."""
  counts = [min(cap, math.floor(x)) for x, cap in zip(exact, caps)]
  order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
  for i in order:
    if sum(counts) >= total:
      break
    if counts[i] < caps[i]:
      counts[i] += 1
  return counts


def allocate_nnz(shapes: Sequence[Sequence[int]], sparsity: float,
                 distribution: str = "uniform") -> list[int]:
  """Number of non-zeros per leaf for a global sparsity.

  Args:
    shapes: shapes of the masked leaves.
    sparsity: fraction of zeros over all of them, in [0, 1).
    distribution: "uniform", "er" or "erk".

  Returns:
    One count per leaf; they sum to ``round((1 - sparsity) * total)``.
  """
  check_sparsity(sparsity)
  check_distribution(distribution)
  sizes = [math.prod(s) for s in shapes]
  density = 1.0 - sparsity
  if distribution == "uniform":
    densities = [density] * len(shapes)
  else:
    densities = _scaled_densities(shapes, density, distribution)
  total = round(density * sum(sizes))
  return _largest_remainder([d * n for d, n in zip(densities, sizes)], total, sizes)


def allocate_nnz_by_name(names: Sequence[str], shapes: Sequence[Sequence[int]],
                         sparsity: float, distribution) -> list[int]:
  """Like :func:`allocate_nnz`, also accepting a mapping ``{path: sparsity}``.

  With a mapping, each named leaf gets its own sparsity and every unnamed masked
  leaf gets ``sparsity``. ER and ERK treat Flax's 3-D attention projection kernels
  (:func:`attention_split`) as the [fan_in, fan_out] matrices they are, so a
  [d_model, heads, head_dim] query kernel gets the density of a [d_model, d_model]
  Dense kernel.

  Args:
    names: path of each masked leaf, e.g. ``"Dense_0/kernel"``.
    shapes: shape of each masked leaf.
    sparsity: global sparsity, or the default sparsity with a mapping.
    distribution: a name in ``DISTRIBUTIONS`` or a mapping from path to sparsity.

  Returns:
    One non-zero count per leaf.
  """
  check_sparsity(sparsity)
  check_distribution(distribution)
  if not isinstance(distribution, Mapping):
    if distribution == "uniform":
      return allocate_nnz(shapes, sparsity, distribution)
    # ER/ERK see an attention projection as the [fan_in, fan_out] matrix it is.
    kernels = [_as_kernel(name, shape) for name, shape in zip(names, shapes)]
    return allocate_nnz(kernels, sparsity, distribution)
  unknown = sorted(set(distribution) - set(names))
  if unknown:
    raise ValueError(f"distribution names {unknown} that are not masked parameters; "
                     f"masked parameters are {list(names)}")
  return [round((1.0 - distribution.get(name, sparsity)) * math.prod(shape))
          for name, shape in zip(names, shapes)]
