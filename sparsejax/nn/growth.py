"""Optimizer transformations that train always-sparse layers and rewire them.

:func:`gse`, :func:`rigl` and :func:`set` wrap the user's optimizer like the masked
methods do, but their state keeps each always-sparse layer's topology (its
connections) instead of a mask. The user's step stays ``grad → tx.update →
apply_updates``; the one addition is passing :func:`topology` to ``apply``.

Every ``update_every`` steps until ``end_step`` each layer, on its own (its
number of connections never changes, so shapes stay fixed):

1. takes the candidate connections sampled at the step before (``⌊γ · nnz⌋``
   (input, output) pairs, drawn with replacement uniformly, or by GSE's GraBo or
   GraEst from that step's statistics; a pair drawn twice or already active
   counts once or not at all);
2. grows the ``k = int(fraction(t) · nnz)`` best of them: the largest |∂L/∂w|
   (GSE, RigL; the gradients come from the layer's backward pass, Σ_rows h_a δ_b,
   O(rows · candidates)), or random ones (SET);
3. drops the same number of active connections, the smallest |w| (ties: the lower
   flat index input · fan_out + output, as the masked methods), and gives each
   dropped slot to a grown connection: weight exactly 0, optimizer state reset.

This is the masked methods' rule on the same candidates (GSE grows then prunes
protecting the grown weights; grown weights are 0, so that equals dropping the
``k`` smallest first). Deliberate differences from the masked mode:

- each layer keeps its count (GSE's ``scope="layer"``; the official code's
  global selection would change the shapes);
- candidates (and GraBo/GraEst's statistics) come from the step *before* the
  update, whose backward pass computes the statistics; the gradients of the
  candidates come from the update step itself. The official code samples and
  scores on a separate batch too;
- RigL and SET choose among ``⌊γ · nnz⌋`` uniformly sampled candidates instead of
  all inactive weights (which would be ``fan_in · fan_out`` of them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import schedules
from sparsejax.masks import path_name, unbox
from sparsejax.methods.gse import growth_schedule
from sparsejax.nn import connections, kernels
from sparsejax.nn.layers import PROBES
from sparsejax.optstate import reset_entries
from sparsejax.sampling import LayerStatistics, check_sampling, distinct, sample_pairs
from sparsejax.selection import top_k_mask
from sparsejax.topology import swap_count
from sparsejax.wrapper import SparseTransformation, check_mask_update, require_params

OBSERVE = {"uniform": kernels.OBSERVE_NONE, "grabo": kernels.OBSERVE_GRABO,
           "graest": kernels.OBSERVE_GRAEST}


class AlwaysSparseState(NamedTuple):
  """The layers' topology, the inner optimizer's state and growth bookkeeping."""
  count: jax.Array  # int32, steps taken
  key: jax.Array  # PRNG key of the sampling
  topology: Any  # like the model's "topology" collection
  inner_state: optax.OptState
  rewired: jax.Array  # int32, connections moved at the last update, all layers
  nonfinite_updates: jax.Array  # int32, updates skipped for a non-finite gradient


class _Layer(NamedTuple):
  """Where one always-sparse layer lives in the flattened params and topology."""
  name: str
  fan_in: int
  fan_out: int
  params: dict[str, int]  # "values" and the probes → index into the params' leaves
  topology: dict[str, int]  # field → index into the topology's leaves


def _index(tree: Any) -> dict[str, int]:
  return {path_name(path): i for i, (path, _) in
          enumerate(jax.tree_util.tree_flatten_with_path(tree)[0])}


def find_layers(topology: Any, params: Any) -> list[_Layer]:
  """The always-sparse layers of ``topology`` and their params.

  Raises:
    ValueError: when the topology has no layer, or a layer's params are missing.
  """
  fields, leaves = _index(topology), _index(params)
  shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]
  layers = []
  for name in sorted(f[:-len("/rows")] if f != "rows" else "" for f in fields
                     if f == "rows" or f.endswith("/rows")):
    prefix = f"{name}/" if name else ""
    wanted = {p: f"{prefix}{p}" for p in ("values", *PROBES)}
    missing = [path for path in wanted.values() if path not in leaves]
    if missing:
      raise ValueError(f"the topology has layer {name or '(root)'!r} but the params have no "
                       f"{missing[0]!r}: pass the model's params and 'topology' collection")
    index = {p: leaves[path] for p, path in wanted.items()}
    topo = {f[len(prefix):]: i for f, i in fields.items()
            if f.startswith(prefix) and "/" not in f[len(prefix):]}
    layers.append(_Layer(name, shapes[index["probe_inputs"]][0],
                         shapes[index["probe_outputs"]][0], index, topo))
  if not layers:
    raise ValueError("the topology holds no always-sparse layer (sparsejax.nn.SparseDense, "
                     "SparseConv or SparseLinear)")
  return layers


class _Rewired(NamedTuple):
  rows: jax.Array
  cols: jax.Array
  moved: jax.Array  # bool [nnz]: slots given to a grown connection


def rewire_layer(values: jax.Array, rows: jax.Array, cols: jax.Array, candidate_rows: jax.Array,
                 candidate_cols: jax.Array, grow_scores: jax.Array, k: jax.Array, fan_out: int,
                 max_moves: int) -> _Rewired:
  """One layer's drop-and-grow on its connection list (see the module docstring).

  Every order is by flat index ``input · fan_out + output``, taken from one-operand
  sorts and ``searchsorted`` (an argsort, a sort carrying a payload, is ~8× slower
  on XLA:CPU).

  Args:
    values: the weights ``[nnz]``.
    rows, cols: the active connections ``[nnz]`` (distinct pairs).
    candidate_rows, candidate_cols: the sampled pairs ``[m]``.
    grow_scores: higher is grown first, ``[m]``, ≥ 0; a pair drawn more than once
      has its largest score (its gradient is the same at every draw), and among
      equal scores the lower flat index is grown.
    k: number of connections to grow (traced).
    fan_out: the layer's outputs.
    max_moves: static bound of ``k``.

  Returns:
    The new connections and the slots that changed hands.
  """
  nnz = values.shape[0]
  flat = rows * fan_out + cols
  active = jnp.sort(flat)
  rank = jnp.searchsorted(active, flat).astype(jnp.int32)  # slot → place in flat order
  drawn = candidate_rows * fan_out + candidate_cols
  candidates, first = distinct(drawn, jnp.ones(drawn.shape, bool))
  inactive = active[jnp.minimum(jnp.searchsorted(active, candidates), nnz - 1)] != candidates
  scores = jnp.full(drawn.shape, -1.0, jnp.float32).at[
      jnp.searchsorted(candidates, drawn)].max(grow_scores.astype(jnp.float32))
  grown = top_k_mask(scores, k, eligible=first & inactive)
  n_grown = grown.sum(dtype=jnp.int32)
  kept = top_k_mask(jnp.zeros((nnz,), jnp.float32).at[rank].set(jnp.abs(values)),
                    nnz - n_grown)
  moved = ~kept[rank]
  slots = jnp.nonzero(moved, size=max_moves, fill_value=nnz)[0]
  chosen = candidates[jnp.nonzero(grown, size=max_moves, fill_value=0)[0]]
  return _Rewired(rows.at[slots].set(chosen // fan_out, mode="drop"),
                  cols.at[slots].set(chosen % fan_out, mode="drop"), moved)


def always_sparse(inner: optax.GradientTransformation, *, topology: Any, end_step: int,
                  fraction: optax.Schedule, max_fraction: float, grow_by: str = "gradient",
                  sampling: str = "uniform", update_every: int = 100, start_step: int = 0,
                  seed: int = 0) -> SparseTransformation:
  """The shared core of :func:`gse`, :func:`rigl` and :func:`set`.

  Args:
    inner: the user's optimizer.
    topology: the model's initial ``"topology"`` collection (linen) or
      ``nnx.state(model, sparsejax.nn.nnx.Topology)``.
    end_step: last step at which connections change.
    fraction: schedule of the fraction of each layer's connections moved.
    max_fraction: its largest value (static bound of the moves).
    grow_by: "gradient" (largest |∂L/∂w| among candidates) or "random".
    sampling: "uniform", "grabo" or "graest" (how candidates are drawn).
    update_every: steps between updates.
    start_step: connections change after this step.
    seed: seed of the sampling.

  Returns:
    An optax transformation with an :class:`AlwaysSparseState`.
  """
  check_sampling(sampling)
  if grow_by not in ("gradient", "random"):
    raise ValueError(f"grow_by must be 'gradient' or 'random', got {grow_by!r}")
  schedules.check_steps(update_every, start_step, end_step)
  is_update = schedules.update_steps(update_every, start_step, end_step)
  inner = optax.with_extra_args_support(inner)
  initial_topology = jax.tree.map(jnp.asarray, unbox(topology))
  guided = sampling != "uniform"

  def sample_candidates(key, layers, topo, grads, step):
    """Candidates for the update at ``step + 1`` (kept as they are otherwise)."""
    def sample(topo):
      topo = list(topo)
      for i, layer in enumerate(layers):
        m = jnp.shape(topo[layer.topology["candidate_rows"]])[0]
        stats = (LayerStatistics(grads[layer.params["probe_inputs"]],
                                 grads[layer.params["probe_outputs"]]) if guided else None)
        rows, cols = sample_pairs(jax.random.fold_in(key, i), m, layer.fan_in, layer.fan_out,
                                  stats)
        topo[layer.topology["candidate_rows"]] = rows
        topo[layer.topology["candidate_cols"]] = cols
      return topo
    return jax.lax.cond(is_update(step + 1), sample, lambda t: list(t), topo)

  def instruct(key, layers, topo, step):
    """What each layer's backward computes at ``step + 1``."""
    topo = list(topo)
    grow = is_update(step + 1) & (grow_by == "gradient")
    observe = jnp.where(is_update(step + 2), OBSERVE[sampling], kernels.OBSERVE_NONE)
    for i, layer in enumerate(layers):
      topo[layer.topology["grow"]] = grow
      topo[layer.topology["observe"]] = observe.astype(jnp.int32)
      topo[layer.topology["key"]] = jax.random.key_data(jax.random.fold_in(key, i))
    return topo

  def init_fn(params):
    layers = find_layers(initial_topology, params)
    key, sample_key = jax.random.split(jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(initial_topology)
    zeros = [jnp.zeros_like(g) for g in jax.tree.leaves(params)]
    count = jnp.zeros((), jnp.int32)
    leaves = sample_candidates(sample_key, layers, leaves, zeros, count)
    leaves = instruct(sample_key, layers, leaves, count)
    return AlwaysSparseState(count, key, jax.tree.unflatten(treedef, leaves),
                             inner.init(params), jnp.zeros((), jnp.int32),
                             jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, mask_update=None, **extra_args):
    # The step decides in the compiled code (it also prepares the next update's candidates).
    require_params(params)
    check_mask_update(mask_update)
    layers = find_layers(state.topology, params)
    step = optax.safe_increment(state.count)
    grads, grads_def = jax.tree.flatten(updates)
    weights = jax.tree.leaves(params)
    topo, topo_def = jax.tree.flatten(state.topology)
    key, rewire_key, sample_key = jax.random.split(state.key, 3)
    fraction_now = fraction(step)
    finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in grads]))
    rewiring = is_update(step) & finite

    def rewire(topo, inner_state):
      topo, moved = list(topo), [None] * len(weights)
      for i, layer in enumerate(layers):
        values = weights[layer.params["values"]]
        nnz = values.shape[0]
        candidates = topo[layer.topology["candidate_rows"]].shape[0]
        if grow_by == "gradient":
          scores = jnp.abs(grads[layer.params["probe_candidates"]]).astype(jnp.float32)
        else:
          scores = jax.random.uniform(jax.random.fold_in(rewire_key, i), (candidates,))
        max_moves = min(nnz, candidates, int(max_fraction * nnz))
        if max_moves == 0:
          moved[layer.params["values"]] = jnp.zeros((nnz,), bool)
          continue
        out = rewire_layer(values, topo[layer.topology["rows"]], topo[layer.topology["cols"]],
                           topo[layer.topology["candidate_rows"]],
                           topo[layer.topology["candidate_cols"]], scores,
                           jnp.minimum(swap_count(fraction_now, jnp.int32(nnz)), max_moves),
                           layer.fan_out, max_moves)
        topo[layer.topology["rows"]], topo[layer.topology["cols"]] = out.rows, out.cols
        topo[layer.topology["order"]] = connections.connection_order(
            out.rows, out.cols, layer.fan_in, layer.fan_out)
        moved[layer.params["values"]] = out.moved
      where = jax.tree.unflatten(grads_def, moved)
      total = sum(m.sum(dtype=jnp.int32) for m in moved if m is not None)
      return topo, reset_entries(inner, inner_state, params, where), moved, total

    def keep(topo, inner_state):
      moved = [None] * len(weights)
      for layer in layers:
        moved[layer.params["values"]] = jnp.zeros(weights[layer.params["values"]].shape, bool)
      return list(topo), inner_state, moved, state.rewired

    topo, inner_state, moved, rewired = jax.lax.cond(rewiring, rewire, keep, topo,
                                                     state.inner_state)
    probes = {layer.params[p] for layer in layers for p in PROBES}
    trained = [jnp.zeros_like(g) if i in probes else
               (jnp.where(moved[i], 0, g) if moved[i] is not None else g)
               for i, g in enumerate(grads)]
    inner_updates, inner_state = inner.update(jax.tree.unflatten(grads_def, trained),
                                              inner_state, params, **extra_args)
    out = jax.tree.leaves(inner_updates)
    out = [jnp.zeros_like(u) if i in probes else
           (jnp.where(moved[i], -weights[i], u).astype(u.dtype) if moved[i] is not None else u)
           for i, u in enumerate(out)]
    topo = sample_candidates(sample_key, layers, topo, grads, step)
    topo = instruct(jax.random.fold_in(sample_key, 1), layers, topo, step)
    nonfinite = state.nonfinite_updates + (is_update(step) & ~finite).astype(jnp.int32)
    return (jax.tree.unflatten(grads_def, out),
            AlwaysSparseState(step, key, jax.tree.unflatten(topo_def, topo), inner_state,
                              rewired, nonfinite))

  return SparseTransformation(init_fn, update_fn, lambda step: bool(is_update(step)))


def gse(inner: optax.GradientTransformation, *, topology: Any, end_step: int,
        sampling: str = "uniform", growth_fraction: float = 0.1, update_every: int = 1000,
        start_step: int = 0, seed: int = 0) -> SparseTransformation:
  """GSE on always-sparse layers: grow the best sampled candidates, prune by magnitude.

  α_t = growth_fraction · (1 + cos(π (t − start_step) / (end_step − start_step))) of
  each layer's connections move at every update (:func:`sparsejax.gse`'s schedule).

  Args:
    inner: the optimizer to wrap.
    topology: the model's initial topology (see :func:`always_sparse`).
    end_step: last step at which connections change.
    sampling: "uniform", "grabo" or "graest".
    growth_fraction: half the initial growth fraction, in (0, 0.5].
    update_every: steps between updates (ΔT).
    start_step: connections change after this step.
    seed: seed of the sampling.

  Returns:
    An optax transformation with an :class:`AlwaysSparseState`.

  References:
    Heddes et al., `Always-Sparse Training by Growing Connections with Guided
    Stochastic Exploration <https://arxiv.org/abs/2401.06898>`_, 2024
  """
  if not 0 < growth_fraction <= 0.5:
    raise ValueError(f"growth_fraction must be in (0, 0.5], got {growth_fraction!r}")
  return always_sparse(inner, topology=topology, end_step=end_step,
                       fraction=growth_schedule(growth_fraction, start_step, end_step),
                       max_fraction=2 * growth_fraction, grow_by="gradient", sampling=sampling,
                       update_every=update_every, start_step=start_step, seed=seed)


def rigl(inner: optax.GradientTransformation, *, topology: Any, end_step: int,
         drop_fraction: float = 0.3, update_every: int = 100, start_step: int = 0,
         seed: int = 0) -> SparseTransformation:
  """RigL on always-sparse layers: gradient growth among uniformly sampled candidates.

  The drop fraction decays as RigL's cosine (:func:`sparsejax.rigl`); arguments as
  :func:`gse`.
  """
  return always_sparse(inner, topology=topology, end_step=end_step,
                       fraction=schedules.cosine_drop_fraction(drop_fraction, start_step,
                                                               end_step),
                       max_fraction=drop_fraction, grow_by="gradient", update_every=update_every,
                       start_step=start_step, seed=seed)


def set(inner: optax.GradientTransformation, *, topology: Any, end_step: int,  # noqa: A001
        drop_fraction: float = 0.3, update_every: int = 100, start_step: int = 0,
        seed: int = 0) -> SparseTransformation:
  """SET on always-sparse layers: random growth among uniformly sampled candidates.

  The drop fraction decays as in :func:`sparsejax.set`; arguments as :func:`gse`.
  """
  return always_sparse(inner, topology=topology, end_step=end_step,
                       fraction=schedules.cosine_drop_fraction(drop_fraction, start_step,
                                                               end_step),
                       max_fraction=drop_fraction, grow_by="random", update_every=update_every,
                       start_step=start_step, seed=seed)


def topology(opt_state: optax.OptState) -> Any:
  """The current topology kept in ``opt_state``: pass it to ``apply`` as ``"topology"``.

  Args:
    opt_state: the state of :func:`gse`, :func:`rigl` or :func:`set`, possibly nested
      or boxed by ``flax.nnx.Optimizer``.

  Returns:
    A pytree like the model's ``"topology"`` collection.
  """
  return optax.tree_utils.tree_get(unbox(opt_state), "topology")
