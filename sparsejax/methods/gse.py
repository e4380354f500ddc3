"""GSE (Heddes et al. 2024): guided stochastic exploration, in masked mode.

At a mask update, every masked leaf is seen as the [fan_in, fan_out] matrix its layer
multiplies by (:func:`sparsejax.distributions.matrix_shape`). A leaf sparser than 50 %
samples ``⌊subset_factor · nnz⌋`` (input, output) pairs with replacement, the input
from f and the output from g (:mod:`sparsejax.sampling`: uniform, GraBo or GraEst),
and keeps the inactive ones (a pair drawn twice counts once); a denser leaf takes all
its inactive weights. The ``k = int(α_t · nnz)`` candidates with the largest |∂L/∂w|
(read at the candidates only; ties to the first drawn) are grown at 0 with a fresh
optimizer state, then the active weights are pruned by magnitude back to the target
count, never a weight grown in this update. With ``scope="global"`` both choices run across all
masked leaves together, as in the official code (per-layer densities drift, the
total is exact); with ``scope="layer"`` each leaf keeps its count.

Following github.com/mikeheddes/guided-stochastic-exploration, with these choices:

- α_t = growth_fraction · (1 + cos(π (t − start_step) / (end_step − start_step)))
  (the code's ``cosine_annealing(t, T, 0.2)`` with growth_fraction = 0.1).
- The sample count follows the current nnz; its static capacity is
  ``⌊subset_factor · nnz_0⌋`` (layer scope) or ``⌊subset_factor · min(2 nnz_0, size)⌋``
  (global scope: a leaf whose density more than doubles samples that many), with
  ``nnz_0`` the leaf's count from ``distribution``. Whether a leaf samples (sparsity
  above 0.5) is decided on that initial count.
- The statistics and gradient come from the step's own batch (the official code draws
  a fresh batch for them), and the step's optimizer update is then applied to the
  weights active before and after the update (the official code also trains the
  grown weights in that step); grown weights start at exactly 0.
- GraEst's signs are random per row (example, token or conv patch) instead of a
  4-wise independent hash; the official conv backward hook's signed sum over the
  first spatial row only is not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import distributions, schedules
from sparsejax.masks import (
  DensePredicate,
  is_unmasked,
  keep_non_kernels_dense,
  nnz_targets,
  path_name,
)
from sparsejax.sampling import (
  LayerStatistics,
  check_sampling,
  distinct,
  sample_pairs,
)
from sparsejax.scores import ScoreInputs
from sparsejax.selection import count_each, top_k_each, top_k_masks
from sparsejax.topology import random_init, swap_count
from sparsejax.wrapper import SparseTransformation, Topology, sparse_wrapper

SCOPES = ("global", "layer")
STATISTICS_ARG = "layer_statistics"  # tx.update's keyword argument for GraBo/GraEst
HELPER = "sparsejax.value_grad_and_statistics"


class GSEState(NamedTuple):
  """GSE's state: mask updates skipped because ``layer_statistics=None`` was passed."""
  skipped_updates: jax.Array  # int32


class _Candidates(NamedTuple):
  """One leaf's growth candidates: flat indices (None: every entry), scores, eligibility."""
  flat: jax.Array | None
  scores: jax.Array
  eligible: jax.Array


def growth_schedule(growth_fraction: float, start_step: int, end_step: int) -> optax.Schedule:
  """α_t = growth_fraction · (1 + cos(π · progress)), 0 after ``end_step``."""
  def schedule(step):
    progress = jnp.clip((step - start_step) / (end_step - start_step), 0.0, 1.0)
    return growth_fraction * (1.0 + jnp.cos(jnp.pi * progress))
  return schedule


def _scatter(chosen: jax.Array, flat: jax.Array | None, size: int) -> jax.Array:
  """A flat bool mask of ``size`` with the chosen candidates set.

  A max-scatter of bytes (a logical or, whatever the order of repeated candidates): a
  byte per weight of scratch, not an int32.
  """
  if flat is None:
    return chosen
  return jnp.zeros((size,), jnp.uint8).at[flat].max(chosen.astype(jnp.uint8)) > 0


def gse_init(key: jax.Array, params: Any, masks: Any) -> Any:
  """GSE's initialisation of the active weights: U(−1, 1) · √3 / √(active fan-in).

  Each output unit's active weights are drawn with the bound √3/√n, n its number of
  active inputs (so their variance is 1/n); inactive weights are 0, dense leaves
  (biases, norms) keep their values. Call it once after ``tx.init``, with the
  masks of that state; optimizers whose state holds the params (e.g. schedule-free)
  should be initialised again with the result.

  Args:
    key: PRNG key.
    params: the params.
    masks: ``sparsejax.masks(state)``.

  Returns:
    The params with every masked leaf re-initialised.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((100, 4)), "b": jnp.ones(4)}
    >>> state = sj.gse(optax.sgd(0.1), sparsity=0.75, end_step=10,
    ...                distribution="uniform").init(params)
    >>> masks = sj.masks(state)
    >>> params = sj.gse_init(jax.random.PRNGKey(0), params, masks)
    >>> bound = jnp.sqrt(3 / masks["w"].sum(0))  # per output unit
    >>> bool(jnp.all(jnp.abs(params["w"]) <= bound)), int((params["w"] != 0).sum())
    (True, 100)
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unmasked)
  leaves = treedef.flatten_up_to(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, mask), leaf, leaf_key in zip(flat, leaves, keys):
    if mask is None:
      out.append(leaf)
      continue
    fan_in, fan_out = distributions.matrix_shape(path_name(path), mask.shape)
    active = mask.reshape(fan_in, fan_out)
    bound = jnp.sqrt(3.0) / jnp.sqrt(jnp.maximum(active.sum(0), 1).astype(jnp.float32))
    values = jax.random.uniform(leaf_key, active.shape, jnp.float32, -1.0, 1.0) * bound
    out.append(jnp.where(active, values, 0.0).reshape(mask.shape).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def gse(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,
        sampling: str = "uniform", subset_factor: float = 1.0, scope: str = "global",
        growth_fraction: float = 0.1, update_every: int = 1000, start_step: int = 0,
        distribution: str | Mapping[str, float] = "er",
        dense: DensePredicate = keep_non_kernels_dense, seed: int = 0
        ) -> SparseTransformation:
  """Guided stochastic exploration: grow the best of a sampled subset, prune by magnitude.

  Every ``update_every`` steps until ``end_step``: sample candidate connections
  (uniformly, or guided by GraBo's or GraEst's per-layer statistics), grow the
  ``int(α_t · nnz)`` candidates with the largest gradient magnitude, then prune
  the smallest active weights back to the target count (the module docstring has
  the details). Only the sampled candidates' gradients are read.

  GraBo and GraEst need the layers' statistics at a mask-update step:
  ``tx.update(grads, state, params, layer_statistics=stats)`` with ``stats`` from
  :func:`sparsejax.value_grad_and_statistics`; on other steps pass
  ``layer_statistics=None`` (an update step given None keeps its masks and counts
  in ``state.extra.skipped_updates``).

  Args:
    inner: the optimizer to wrap.
    sparsity: global sparsity in [0, 1).
    end_step: last step at which masks change (GSE: epoch 120 of 200).
    sampling: "uniform", "grabo" or "graest".
    subset_factor: γ > 0, candidates sampled per active weight.
    scope: "global" (one growth and one pruning over all masked leaves) or
      "layer" (each leaf keeps its count).
    growth_fraction: half the initial growth fraction, in (0, 0.5].
    update_every: steps between mask updates (ΔT).
    start_step: masks change after this step.
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the initial masks and of the sampling.

  Returns:
    An optax transformation whose state's ``extra`` is a :class:`GSEState`.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((16, 16)), "b": jnp.zeros(16)}
    >>> tx = sj.gse(optax.sgd(0.1), sparsity=0.9, distribution="uniform", update_every=1,
    ...             end_step=10)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((16, 16)), "b": jnp.ones(16)}
    >>> updates, state = tx.update(grads, state, params)  # a mask update
    >>> bool(state.masks_changed), sj.summary(state)["nnz"]
    (True, 26)

  References:
    Heddes et al., `Always-Sparse Training by Growing Connections with Guided
    Stochastic Exploration <https://arxiv.org/abs/2401.06898>`_, 2024
  """
  distributions.check_sparsity(sparsity)
  distributions.check_distribution(distribution)
  check_sampling(sampling)
  if scope not in SCOPES:
    raise ValueError(f"unknown scope {scope!r}; expected one of {list(SCOPES)}")
  if not subset_factor > 0:
    raise ValueError(f"subset_factor must be > 0, got {subset_factor!r}")
  if not 0 < growth_fraction <= 0.5:
    raise ValueError(f"growth_fraction must be in (0, 0.5], got {growth_fraction!r}")
  schedules.check_steps(update_every, start_step, end_step)
  growth = growth_schedule(growth_fraction, start_step, end_step)

  def statistics(inputs: ScoreInputs) -> Mapping[str, LayerStatistics] | None:
    if sampling == "uniform":
      return {}
    if STATISTICS_ARG not in inputs.extra_args:
      raise ValueError(f"gse(sampling={sampling!r}) needs the layers' statistics: "
                       f"tx.update(grads, state, params, {STATISTICS_ARG}=...) with them from "
                       f"{HELPER}, or {STATISTICS_ARG}=None on steps without a mask update")
    return inputs.extra_args[STATISTICS_ARG]

  def candidates(key, name, mask, grad, target, stats) -> _Candidates:
    """The leaf's sampled inactive pairs (sparser than 50 %) or all its inactive weights."""
    active, magnitude = mask.reshape(-1), jnp.abs(grad.reshape(-1))
    capacity = math.floor(subset_factor * (target if scope == "layer"
                                           else min(2 * target, mask.size)))
    if target / mask.size >= 0.5 or capacity == 0:
      return _Candidates(None, magnitude, ~active)
    if stats is None and sampling != "uniform":
      raise ValueError(f"no statistics for {name!r} in {STATISTICS_ARG}: {HELPER} records "
                       "linen Dense/DenseGeneral/Conv and nnx Linear/LinearGeneral/Conv calls")
    fan_in, fan_out = distributions.matrix_shape(name, mask.shape)
    if stats is not None and (stats.inputs.size, stats.outputs.size) != (fan_in, fan_out):
      fan_in, fan_out = stats.inputs.size, stats.outputs.size  # e.g. a DenseGeneral
    rows, cols = sample_pairs(key, capacity, fan_in, fan_out, stats)
    flat = rows * fan_out + cols
    count = jnp.minimum(jnp.floor(subset_factor * active.sum()), capacity)
    flat, eligible = distinct(flat, (jnp.arange(capacity) < count) & ~active[flat], mask.size)
    return _Candidates(flat, magnitude[flat], eligible)

  def update_masks(inputs: ScoreInputs):
    stats = statistics(inputs)
    if stats is None:  # an update step given layer_statistics=None
      return inputs.masks, GSEState(inputs.extra.skipped_updates + 1)
    flat, treedef = jax.tree_util.tree_flatten_with_path(inputs.masks, is_leaf=is_unmasked)
    names = [path_name(path) for path, _ in flat]
    masks = [mask for _, mask in flat]
    params, grads = treedef.flatten_up_to(inputs.params), treedef.flatten_up_to(inputs.grads)
    targets = treedef.flatten_up_to(
        nnz_targets(inputs.params, sparsity, distribution, dense))
    chosen = [i for i, mask in enumerate(masks) if mask is not None]
    found = [candidates(jax.random.fold_in(inputs.key, i), names[i], masks[i], grads[i],
                        targets[i], stats.get(names[i])) for i in chosen]
    active = [masks[i].reshape(-1) for i in chosen]
    weights = [jnp.abs(params[i].reshape(-1)) for i in chosen]
    nnz = count_each(active)
    rate = growth(inputs.step)
    if scope == "layer":
      picks = top_k_each([c.scores for c in found], swap_count(rate, nnz),
                         [c.eligible for c in found])
      grown = [_scatter(p, c.flat, a.size) for p, c, a in zip(picks, found, active)]
      kept = top_k_each(weights, nnz - count_each(grown), active)
    else:
      total = nnz.sum()
      picks = top_k_masks([c.scores for c in found], swap_count(rate, total),
                          [c.eligible for c in found])
      grown = [_scatter(p, c.flat, a.size) for p, c, a in zip(picks, found, active)]
      kept = top_k_masks(weights, total - count_each(grown).sum(), active)
    new = list(masks)
    for i, k, g in zip(chosen, kept, grown):
      new[i] = (k | g).reshape(masks[i].shape)
    return jax.tree.unflatten(treedef, new), inputs.extra

  topology = Topology(
      init_masks=random_init(sparsity, distribution, dense),
      init_extra=lambda params, masks: GSEState(jnp.zeros((), jnp.int32)),
      is_update_step=schedules.update_steps(update_every, start_step, end_step),
      update_masks=update_masks, train_at_update=True)
  return sparse_wrapper(inner, topology, seed)

