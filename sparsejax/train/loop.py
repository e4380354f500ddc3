"""The training loop of the experiments: a Flax model, an optax optimizer, a sparsejax method.

::

  experiment = setup(config)                # every config error is raised here
  summary = run(experiment, workdir="DIR")  # trains (or resumes), evaluates, writes DIR

With a ``workdir``, the run writes ``config.json``, ``metrics.jsonl`` (one row every
``log_every`` steps; evaluation rows every ``eval_every`` steps and at the end),
TensorBoard event files, orbax checkpoints in ``checkpoints/`` (every
``checkpoint_every`` steps and at the end) and ``summary.json``. Starting again with
the same workdir resumes from the newest checkpoint; a run killed at any point and
restarted ends with the same params and the same ``metrics.jsonl``, bit for bit.

Everything a step changes lives in one :class:`TrainState` pytree, running metrics
included, and the batch of step ``s`` is a pure function of the seed and ``s``: this
is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import contextlib
import functools
import os
from pathlib import Path
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import sparsejax
from sparsejax import metrics
from sparsejax.data import NORMALIZATION, TrainPipeline, eval_batches, load_source, num_classes
from sparsejax.train import experiment_config as cfg
from sparsejax.train.checkpoints import Checkpointer
from sparsejax.train.logs import MetricsWriter, Progress
from sparsejax.train.models import get_model
from sparsejax.train.workdir import CHECKPOINT_DIR, check_workdir, write_config, write_summary


class Tracker(NamedTuple):
  """Running metrics kept on the device (and in checkpoints) between logged rows."""
  loss_sum: jax.Array  # training loss summed since the last logged row
  loss_count: jax.Array  # steps since the last logged row
  flops: jax.Array  # sparse training FLOPs per example since the last host flush
  ever_active: Any  # masks of the weights active so far (None unless the masks change)
  eval_masks: Any  # masks at the last evaluation row, for churn (None when dense)


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""
  step: jax.Array  # int32, steps taken
  params: Any
  model_state: Any  # mutable collections, e.g. {"batch_stats": ...}; {} if none
  opt_state: optax.OptState
  tracker: Tracker


class Experiment(NamedTuple):
  """Everything built from a config before training; building it validates the config."""
  config: ml_collections.ConfigDict  # with ``sparse`` resolved (defaults, end_step)
  model: nn.Module
  tx: optax.GradientTransformation
  state: TrainState  # the initial state
  pipeline: TrainPipeline
  test: Any  # the test source
  num_steps: int
  steps_per_epoch: int
  positions: Mapping[str, int]  # kernel output positions per example (FLOPs)
  dense_flops: float  # forward FLOPs per example of the dense model
  learning_rate: optax.Schedule

  @property
  def method(self) -> str:
    return self.config.sparse.method

  @property
  def is_dense(self) -> bool:
    return self.method == "dense"


def load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The train and test sources of ``config.data``.

  Raises:
    FileNotFoundError, ValueError: when the data cannot be found or read (one line).
  """
  data = config.data
  return tuple(load_source(data.dataset, split, data.data_dir, data.download)
               for split in ("train", "test"))


def build_optimizer(config: ml_collections.ConfigDict, num_train: int
                    ) -> tuple[optax.GradientTransformation, dict[str, Any], int, int]:
  """The optimizer of ``config``: the inner optimizer wrapped by ``config.sparse``.

  Args:
    config: a validated experiment config.
    num_train: training examples (for the step counts).

  Returns:
    ``(tx, sparse, num_steps, steps_per_epoch)``: ``sparse`` is the resolved section.

  Raises:
    ValueError: for a bad ``batch_size`` or ``sparse`` section.
  """
  per_epoch = cfg.steps_per_epoch(config, num_train)
  num_steps = cfg.total_steps(config, num_train)
  sparse = cfg.resolve_sparse(config.sparse, num_steps,
                              config.get("sparse_end_fraction", cfg.END_STEP_FRACTION))
  try:
    tx = sparsejax.from_config(sparse, cfg.make_optimizer(config.optimizer, per_epoch))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  return tx, sparse, num_steps, per_epoch


def _masks(opt_state: optax.OptState) -> Any:
  """The masks of a sparsejax state; None for a dense optimizer."""
  return optax.tree_utils.tree_get(opt_state, "masks")


def initial_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                  sample: jax.Array, track_coverage: bool) -> TrainState:
  """Initialises the model (from ``seed``), the optimizer and the running metrics
  (the ever-active masks only with ``track_coverage``)."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), sample)
  params = variables.pop("params")
  # Jitted: an eager init dispatches hundreds of small ops (seconds on CPU).
  opt_state = jax.jit(tx.init)(params)
  masks = _masks(opt_state)
  copy = functools.partial(jax.tree.map, jnp.copy)  # own buffers: the train step donates
  tracker = Tracker(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.float32), copy(masks) if track_coverage else None,
                    copy(masks))
  return TrainState(jnp.zeros((), jnp.int32), params, dict(variables), opt_state, tracker)


def setup(config: ml_collections.ConfigDict, data: tuple[Any, Any] | None = None) -> Experiment:
  """Validates ``config``, loads the data and builds the model, optimizer and initial state.

  Args:
    config: the experiment config.
    data: ``(train_source, test_source)``; None to load ``config.data``.

  Returns:
    An :class:`Experiment` ready for :func:`run`.

  Raises:
    ValueError: for a bad config, naming the key (sparsejax's own errors come with
      a ``config.sparse`` prefix).
    FileNotFoundError: when the dataset is not found.
  """
  cfg.validate_config(config)
  train_source, test_source = data if data is not None else load_data(config)
  tx, sparse, num_steps, per_epoch = build_optimizer(config, len(train_source))
  dataset = config.data.dataset
  mean, std = NORMALIZATION.get(dataset, (None, None)) if config.data.normalize else (None, None)
  if config.data.normalize and mean is None:
    raise ValueError(f"config.data.normalize: no per-channel statistics for {dataset!r}")
  pipeline = TrainPipeline(train_source, batch_size=config.batch_size, seed=config.seed,
                           crop_padding=config.data.crop_padding, flip=config.data.flip,
                           mean=mean, std=std)
  model = get_model(config.model, num_classes(dataset, config.data.data_dir))
  sample = pipeline.batch(0)["image"][:1]
  try:
    state = initial_state(model, tx, config.seed, sample,
                          track_coverage=sparse["method"] in metrics.DYNAMIC_METHODS)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  positions = metrics.kernel_positions(
      model, {"params": state.params, **state.model_state}, sample, train=False)
  _, dense_flops = metrics.forward_flops(state.params, None, positions)
  config = config.copy_and_resolve_references()
  config.sparse = ml_collections.ConfigDict(sparse)
  return Experiment(config, model, tx, state, pipeline, test_source, num_steps, per_epoch,
                    positions, dense_flops, cfg.learning_rate_schedule(config.optimizer,
                                                                       per_epoch))


def _apply(model: nn.Module, params: Any, model_state: Any, images: jax.Array, train: bool):
  """Logits and the new model state (unchanged when not training or stateless)."""
  variables = {"params": params, **model_state}
  if train and model_state:
    logits, new_state = model.apply(variables, images, train=True, mutable=list(model_state))
    return logits, dict(new_state)
  return model.apply(variables, images, train=train), model_state


def make_train_step(experiment: Experiment) -> Callable[[TrainState, Any], TrainState]:
  """The jitted ``(state, batch) -> state`` of ``experiment`` (state donated)."""
  model, tx = experiment.model, experiment.tx
  dense_gradient = (metrics.dense_gradient_steps(experiment.config.sparse)
                    if not experiment.is_dense else None)

  def loss_fn(params, model_state, batch):
    logits, model_state = _apply(model, params, model_state, batch["image"], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, model_state

  def train_step(state: TrainState, batch) -> TrainState:
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tracker = state.tracker._replace(loss_sum=state.tracker.loss_sum + loss,
                                     loss_count=state.tracker.loss_count + 1)
    if dense_gradient is not None:  # FLOPs with the masks this step's forward pass used
      sparse, dense = metrics.forward_flops(state.params, _masks(state.opt_state),
                                            experiment.positions)
      step_flops = metrics.training_flops(sparse, dense, dense_gradient(state.step + 1))
      tracker = tracker._replace(flops=tracker.flops + step_flops)
      if tracker.ever_active is not None:
        tracker = tracker._replace(
            ever_active=metrics.ever_active(tracker.ever_active, _masks(opt_state)))
    return TrainState(state.step + 1, params, model_state, opt_state, tracker)

  return jax.jit(train_step, donate_argnums=0)


def make_evaluate(experiment: Experiment) -> Callable[[TrainState], tuple[float, float]]:
  """``state -> (test_loss, test_accuracy)`` over the whole test split."""
  model = experiment.model

  @jax.jit
  def batch_sums(state, images, labels, valid):
    logits, _ = _apply(model, state.params, state.model_state, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(correct & valid)

  pipeline, size = experiment.pipeline, experiment.config.eval_batch_size

  def evaluate(state: TrainState) -> tuple[float, float]:
    loss, correct, count = jnp.zeros(()), jnp.zeros((), jnp.int32), 0
    for images, labels, valid in eval_batches(experiment.test, size, pipeline.mean,
                                              pipeline.std):
      batch_loss, batch_correct = batch_sums(state, images, labels, valid)
      loss, correct, count = loss + batch_loss, correct + batch_correct, count + int(valid.sum())
    return float(loss) / count, int(correct) / count

  return evaluate


class Totals(NamedTuple):
  """Host-side running totals, saved in each checkpoint's record (exact in JSON)."""
  train_flops: float = 0.0  # sparse training FLOPs so far (whole batches)


def _row(experiment: Experiment, state: TrainState, totals: Totals,
         evaluation: tuple[float, float] | None) -> dict[str, Any]:
  """The ``metrics.jsonl`` row of ``state`` (an evaluation row when ``evaluation`` is given)."""
  step = int(state.step)
  tracker = state.tracker
  row = {"step": step, "epoch": step / experiment.steps_per_epoch,
         "train_loss": float(tracker.loss_sum) / max(int(tracker.loss_count), 1),
         "learning_rate": float(experiment.learning_rate(step - 1)), "sparsity": 0.0}
  masks = _masks(state.opt_state)
  stats = None if experiment.is_dense else metrics.mask_statistics(
      masks, tracker.ever_active, tracker.eval_masks)
  if stats is not None:
    row["sparsity"] = stats["sparsity"]
  if evaluation is None:
    return row
  batch = experiment.config.batch_size
  dense_per_step = 3.0 * experiment.dense_flops * batch
  sparse_forward, _ = metrics.forward_flops(state.params, masks, experiment.positions)
  row.update(test_loss=evaluation[0], test_accuracy=evaluation[1],
             layers=stats["layers"] if stats is not None else {},
             train_flops=totals.train_flops if stats is not None else dense_per_step * step,
             train_flops_dense=dense_per_step * step,
             inference_flops=float(sparse_forward), inference_flops_dense=experiment.dense_flops)
  if experiment.method in metrics.DYNAMIC_METHODS:
    row.update(coverage=stats["coverage"], churn=stats["churn"])
  return row


def _flush(state: TrainState, totals: Totals, batch_size: int) -> tuple[TrainState, Totals]:
  """Moves the device FLOPs accumulator into the host totals (float64)."""
  totals = Totals(totals.train_flops + float(state.tracker.flops) * batch_size)
  return state._replace(tracker=state.tracker._replace(
      flops=jnp.zeros((), jnp.float32))), totals


def run(experiment: Experiment, workdir: str | os.PathLike[str] | None = None,
        show_progress: bool = True) -> dict[str, Any]:
  """Trains ``experiment`` (resuming from ``workdir`` if it holds a checkpoint) and evaluates it.

  Args:
    experiment: from :func:`setup`.
    workdir: the run directory, or None to keep nothing on disk.
    show_progress: draw a progress bar (on a terminal) or log evaluation rows.

  Returns:
    The run's summary (also written to ``workdir/summary.json``): method, dataset,
    model, seed, target and measured sparsity, test accuracy and loss, final train
    loss, steps, seconds, FLOPs ratios, coverage and per-layer sparsity.

  Raises:
    ValueError: when ``workdir`` holds a run of another config.
  """
  start_time = time.perf_counter()
  config = experiment.config
  # A copy: the train step donates its input, and the experiment may be run again.
  state, totals = jax.tree.map(jnp.copy, experiment.state), Totals()
  checkpointer = writer = None
  if workdir is not None:
    check_workdir(workdir, config)
    write_config(workdir, config)
    checkpointer = Checkpointer(Path(workdir) / CHECKPOINT_DIR, config.keep_checkpoints)
    restored = checkpointer.restore(state)
    if restored is not None:
      state, record = restored
      totals = Totals(**record["totals"])
    writer = MetricsWriter(workdir, resume_step=int(state.step))
  try:
    state, totals, last_row = _train(experiment, state, totals, checkpointer, writer,
                                     show_progress)
  finally:
    if writer is not None:
      writer.close()
    if checkpointer is not None:
      checkpointer.close()
  summary = _summary(experiment, state, totals, last_row, time.perf_counter() - start_time)
  if workdir is not None:
    write_summary(workdir, summary)
  return summary


def _train(experiment: Experiment, state: TrainState, totals: Totals,
           checkpointer: Checkpointer | None, writer: MetricsWriter | None,
           show_progress: bool) -> tuple[TrainState, Totals, dict[str, Any]]:
  """The loop from ``state.step`` to the end; returns the final state, totals and last row."""
  config = experiment.config
  per_epoch, num_steps = experiment.steps_per_epoch, experiment.num_steps
  eval_every = cfg.every(config.eval_every, per_epoch)
  checkpoint_every = cfg.every(config.checkpoint_every, per_epoch)
  train_step, evaluate = make_train_step(experiment), make_evaluate(experiment)
  step, last_row = int(state.step), None
  with (contextlib.closing(experiment.pipeline.iterate(step)) as batches,
        Progress(num_steps, step, experiment.method, enabled=show_progress) as progress):
    while step < num_steps:
      state = train_step(state, next(batches))
      step += 1
      is_eval = step == num_steps or step % eval_every == 0
      is_log = is_eval or step % config.log_every == 0
      is_checkpoint = step == num_steps or step % checkpoint_every == 0
      if is_log or is_checkpoint:
        state, totals = _flush(state, totals, config.batch_size)
      if is_log:
        last_row = _row(experiment, state, totals, evaluate(state) if is_eval else None)
        state = _start_next_row(state, is_eval)
        if writer is not None:
          writer.write(last_row)
        progress.show(last_row)
      if checkpointer is not None and is_checkpoint:
        checkpointer.save(step, state, {"next_batch": step, "totals": totals._asdict()})
      progress.advance(step)
  if last_row is None and writer is not None:  # resumed after the end: report the last row
    last_row = writer.last_row()
  if last_row is None or last_row.get("test_accuracy") is None:
    last_row = _row(experiment, state, totals, evaluate(state))
  return state, totals, last_row


def _start_next_row(state: TrainState, evaluated: bool) -> TrainState:
  """Resets the running loss after a logged row (and the churn reference after an evaluation)."""
  tracker = state.tracker._replace(loss_sum=jnp.zeros((), jnp.float32),
                                   loss_count=jnp.zeros((), jnp.int32))
  if evaluated:
    tracker = tracker._replace(eval_masks=jax.tree.map(jnp.copy, _masks(state.opt_state)))
  return state._replace(tracker=tracker)


def _summary(experiment: Experiment, state: TrainState, totals: Totals,
             last_row: dict[str, Any], seconds: float) -> dict[str, Any]:
  config = experiment.config
  return {
      "method": experiment.method, "dataset": config.data.dataset, "model": config.model,
      "seed": config.seed, "target_sparsity": config.sparse.get("sparsity"),
      # What sets the sparsity of a method without a target (DST): part of its group.
      "variant": f"alpha={config.sparse.alpha:g}" if "alpha" in config.sparse else None,
      "sparsity": last_row["sparsity"], "test_accuracy": last_row["test_accuracy"],
      "test_loss": last_row["test_loss"], "train_loss": last_row["train_loss"],
      "steps": int(state.step), "seconds": seconds,
      "train_flops_ratio": last_row["train_flops"] / last_row["train_flops_dense"],
      "inference_flops_ratio": last_row["inference_flops"] / last_row["inference_flops_dense"],
      "coverage": last_row.get("coverage"), "layers": last_row["layers"],
  }

