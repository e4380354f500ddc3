"""The runner's bookkeeping: running metrics on the device, ``metrics.jsonl`` rows, the summary.

Everything a row reports about the sparse method is read from the optimizer state
(masks, ``dense_gradient``, ``ever_active``; see :mod:`sparsejax.wrapper`), never from
the method's name, so a newly registered method is measured like the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping
import copy
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax import metrics
import sparsejax.nn as sjnn
from sparsejax.train import flops, sharding

if TYPE_CHECKING:
  from sparsejax.train.loop import Experiment
  from sparsejax.train.steps import TrainState


# Keys that do not change what a run trains: runs differing only here are one group.
NOT_GROUPED = (("seed",), ("sparse", "seed"), ("data", "data_dir"), ("data", "download"),
               ("log_every",), ("eval_every",), ("checkpoint_every",), ("keep_checkpoints",),
               ("eval_batch_size",), ("mesh",))


def group_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config without its seeds and bookkeeping keys: runs with equal ones are repeats.

  Args:
    config: a resolved experiment config as a dict (as in ``config.json``).

  Returns:
    A copy without the keys of :data:`NOT_GROUPED`.
  """
  out = copy.deepcopy(dict(config))
  for path in NOT_GROUPED:
    section = out
    for key in path[:-1]:
      section = section.get(key) if isinstance(section, Mapping) else None
    if isinstance(section, dict):
      section.pop(path[-1], None)
  return out


class Tracker(NamedTuple):
  """Running metrics kept on the device (and in checkpoints) between logged rows."""
  loss_sum: jax.Array  # training loss summed since the last logged row
  loss_count: jax.Array  # steps since the last logged row
  flops: jax.Array  # sparse training FLOPs per example since the last host flush
  eval_masks: Any  # masks at the last evaluation row, for churn (None when dense)
  first_nonfinite: jax.Array  # int32: the first step with a non-finite loss; 0 = none
  nonfinite_steps: jax.Array  # int32: steps with a non-finite loss (skipped under "skip")


FINISHED = "finished"  # summary.json's status of a run that reached its last step


class Totals(NamedTuple):
  """Host-side running totals, saved in each checkpoint's record (exact in JSON)."""
  train_flops: float = 0.0  # sparse training FLOPs so far (whole batches)


def state_masks(opt_state: optax.OptState) -> Any:
  """The masks of a sparsejax state; None for a dense optimizer."""
  return optax.tree_utils.tree_get(opt_state, "masks")


def keeps_topology(opt_state: optax.OptState) -> bool:
  """Whether the state is an always-sparse method's (:mod:`sparsejax.nn`)."""
  return optax.tree_utils.tree_get(opt_state, "topology") is not None


def always_sparse_statistics(params: Any) -> dict[str, Any]:
  """``{"sparsity", "layers": {path: sparsity}}`` of a model's always-sparse layers
  (:func:`sparsejax.nn.summary`; constant: rewiring keeps every layer's count)."""
  counts = sjnn.summary(params)
  return {"sparsity": counts["sparsity"],
          "layers": {path: layer["sparsity"] for path, layer in counts["layers"].items()}}


def masks_can_change(opt_state: optax.OptState) -> bool:
  """Whether the method's masks change during training (it keeps ``ever_active``)."""
  return optax.tree_utils.tree_get(opt_state, "ever_active") is not None


def new_tracker(opt_state: optax.OptState) -> Tracker:
  """A tracker with nothing counted yet (own copies of the masks: the step donates)."""
  masks = state_masks(opt_state)
  return Tracker(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.float32), jax.tree.map(jnp.copy, masks),
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def track_step(tracker: Tracker, step: jax.Array, loss: jax.Array, finite: jax.Array,
               old_opt_state: optax.OptState, new_opt_state: optax.OptState, params: Any,
               positions: Any) -> Tracker:
  """Adds one training step (traceable): its loss and, for a sparse method, its FLOPs.

  Args:
    tracker: the running metrics.
    step: the step's number (from 1).
    loss: the step's training loss.
    finite: whether the step counts (its loss is finite; with ``on_nonfinite="skip"``
      its gradients too): a step that does not adds nothing to the running loss.
    old_opt_state: the optimizer state the step's forward pass used.
    new_opt_state: the state after the step (says whether it read the dense gradient).
    params: the params before the step (shapes only).
    positions: kernel output positions (:func:`sparsejax.train.flops.kernel_positions`).

  Returns:
    The updated tracker.
  """
  first = jnp.where((tracker.first_nonfinite == 0) & ~finite, step, tracker.first_nonfinite)
  tracker = tracker._replace(loss_sum=tracker.loss_sum + jnp.where(finite, loss, 0.0),
                             loss_count=tracker.loss_count + finite.astype(jnp.int32),
                             first_nonfinite=first.astype(jnp.int32),
                             nonfinite_steps=tracker.nonfinite_steps + (~finite).astype(jnp.int32))
  masks = state_masks(old_opt_state)
  if masks is None and not keeps_topology(old_opt_state):
    return tracker
  sparse, dense = flops.forward_flops(params, masks, positions)
  dense_gradient = optax.tree_utils.tree_get(new_opt_state, "dense_gradient", False)
  return tracker._replace(
      flops=tracker.flops + flops.training_flops(sparse, dense, dense_gradient))


def flush(state: TrainState, totals: Totals, batch_size: int) -> tuple[TrainState, Totals]:
  """Moves the device FLOPs accumulator into the host totals (float64)."""
  totals = Totals(totals.train_flops + float(state.tracker.flops) * batch_size)
  # ``zeros_like``: keeps the array's (global) sharding, as a checkpoint of several hosts needs.
  return state._replace(tracker=state.tracker._replace(
      flops=jnp.zeros_like(state.tracker.flops))), totals


def start_next_row(state: TrainState, evaluated: bool) -> TrainState:
  """Resets the running loss after a logged row (and the churn reference after an evaluation)."""
  tracker = state.tracker._replace(loss_sum=jnp.zeros_like(state.tracker.loss_sum),
                                   loss_count=jnp.zeros_like(state.tracker.loss_count))
  if evaluated:
    tracker = tracker._replace(eval_masks=jax.tree.map(jnp.copy, state_masks(state.opt_state)))
  return state._replace(tracker=tracker)


def row(experiment: Experiment, state: TrainState, totals: Totals,
        evaluation: tuple[float, float] | None) -> dict[str, Any]:
  """The ``metrics.jsonl`` row of ``state`` (an evaluation row when ``evaluation`` is given)."""
  step = int(state.step)
  tracker = state.tracker
  out = {"step": step, "epoch": step / experiment.steps_per_epoch,
         "train_loss": float(tracker.loss_sum) / max(int(tracker.loss_count), 1),
         "learning_rate": float(experiment.learning_rate(step - 1)), "sparsity": 0.0}
  if experiment.config.on_nonfinite == "skip":
    out["skipped_steps"] = int(tracker.nonfinite_steps)
  masks = state_masks(state.opt_state)
  stats = None if masks is None else metrics.mask_statistics(masks, tracker.eval_masks)
  if keeps_topology(state.opt_state):
    stats = always_sparse_statistics(state.params)
  if stats is not None:
    out["sparsity"] = stats["sparsity"]
  if evaluation is None:
    return out
  dense_per_step = 3.0 * experiment.dense_flops * experiment.config.batch_size
  sparse_forward, _ = flops.forward_flops(state.params, masks, experiment.positions)
  out.update(test_loss=evaluation[0], test_accuracy=evaluation[1],
             layers=stats["layers"] if stats is not None else {},
             train_flops=totals.train_flops if stats is not None else dense_per_step * step,
             train_flops_dense=dense_per_step * step,
             inference_flops=float(sparse_forward), inference_flops_dense=experiment.dense_flops)
  if masks is not None and masks_can_change(state.opt_state):
    out.update(coverage=sparsejax.coverage(state.opt_state)["global"], churn=stats["churn"])
  return out


def summary(experiment: Experiment, state: TrainState, last_row: dict[str, Any],
            seconds: float) -> dict[str, Any]:
  """The run's ``summary.json``: what it was, what it reached, what it cost."""
  return {
      **_identity(experiment), "status": FINISHED,
      "sparsity": last_row["sparsity"], "test_accuracy": last_row["test_accuracy"],
      "test_loss": last_row["test_loss"], "train_loss": last_row["train_loss"],
      "steps": int(state.step), "seconds": seconds,
      "train_flops_ratio": last_row["train_flops"] / last_row["train_flops_dense"],
      "inference_flops_ratio": last_row["inference_flops"] / last_row["inference_flops_dense"],
      "coverage": last_row.get("coverage"), "layers": last_row["layers"],
      **sharding.describe(experiment.mesh, (state.params, state.model_state, state.opt_state)),
      "skipped_steps": last_row.get("skipped_steps", 0),
  }


def failure(experiment: Experiment, error: str, step: int, seconds: float) -> dict[str, Any]:
  """The ``summary.json`` of a run that stopped at a failure (``status`` is not
  :data:`FINISHED`): what it was, where it failed and why."""
  return {**_identity(experiment), "status": "diverged", "error": error, "failed_at_step": step,
          "seconds": seconds}


def _identity(experiment: Experiment) -> dict[str, Any]:
  """What a run is: method, data, model, seed, target, and the group of its repeats."""
  config = experiment.config
  return {
      "method": experiment.method, "dataset": config.data.dataset, "model": config.model,
      "seed": config.seed, "target_sparsity": config.sparse.get("sparsity"),
      # What sets the sparsity of a method without a target (DST): part of its group.
      "variant": sparsejax.variant(config.sparse),
      # Runs with the same group are repeats of one experiment (seeds aside).
      "group": group_config(config.to_dict()),
  }
