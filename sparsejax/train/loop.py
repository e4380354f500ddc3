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
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import sparsejax
from sparsejax.data import (
  NORMALIZATION,
  TrainPipeline,
  dataset_shape,
  load_source,
  num_classes,
)
from sparsejax.train import experiment_config as cfg
from sparsejax.train import flops, records, sharding
from sparsejax.train.always_sparse import is_always_sparse, method_variables
from sparsejax.train.checkpoints import Checkpointer, CheckpointError, per_leaf_or_whole
from sparsejax.train.logs import MetricsWriter, Progress
from sparsejax.train.models import ALWAYS_SPARSE_MODELS, get_model
from sparsejax.train.optimizers import learning_rate_schedule, make_optimizer
from sparsejax.train.steps import TrainState, make_evaluate, train_steps
from sparsejax.train.stopping import Diverged, Preempted, StopRequests
from sparsejax.train.workdir import CHECKPOINT_DIR, check_workdir, write_config, write_summary


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
  mesh: jax.sharding.Mesh  # every device, ``data`` × ``model`` (:mod:`.sharding`)

  @property
  def method(self) -> str:
    return self.config.sparse.method

  @property
  def statistics(self) -> str | None:
    """The per-layer statistics the method needs at its mask updates (GSE's sampling)."""
    entry = _entry(self.method)
    if entry is None or entry.statistics is None:
      return None
    return entry.statistics(self.config.sparse)


def _entry(method: str) -> sparsejax.registry.MethodEntry | None:
  """The registry entry of ``method``; None for dense training."""
  return None if method == sparsejax.registry.DENSE else sparsejax.registry.entry(method)


def load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The train and test sources of ``config.data``.

  Raises:
    FileNotFoundError, ValueError: when the data cannot be found or read (one line).
  """
  data = config.data
  return tuple(load_source(data.dataset, split, data.data_dir, data.download)
               for split in ("train", "test"))


def build_optimizer(config: ml_collections.ConfigDict, num_train: int,
                    collections: Mapping[str, Any] | None = None
                    ) -> tuple[optax.GradientTransformation, dict[str, Any], int, int]:
  """The optimizer of ``config``: the inner optimizer wrapped by ``config.sparse``.

  Args:
    config: a validated experiment config.
    num_train: training examples (for the step counts).
    collections: the model's variable collections the method takes (the
      always-sparse methods' ``topology``).

  Returns:
    ``(tx, sparse, num_steps, steps_per_epoch)``: ``sparse`` is the resolved section.

  Raises:
    ValueError: for a bad ``batch_size``, schedule or ``sparse`` section.
  """
  per_epoch = cfg.steps_per_epoch(config, num_train)
  num_steps = cfg.total_steps(config, num_train)
  sparse = cfg.resolve_sparse(config.sparse, num_steps,
                              config.get("sparse_end_fraction", cfg.END_STEP_FRACTION))
  inner = make_optimizer(config.optimizer, per_epoch, num_steps)
  try:
    tx = sparsejax.from_config(sparse, inner, **(collections or {}))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  return tx, sparse, num_steps, per_epoch


def init_variables(model: nn.Module, seed: int, sample: jax.Array) -> dict[str, Any]:
  """The model's variables from ``seed`` (jitted: an eager init dispatches many small ops)."""
  return dict(jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), sample))


def initial_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                  sample: jax.Array, init_params: sparsejax.registry.InitParams | None = None,
                  kept_by_method: tuple[str, ...] = (), variables: dict[str, Any] | None = None
                  ) -> TrainState:
  """Initialises the model (from ``seed``), the optimizer and the running metrics.

  ``init_params`` (a method's own initialisation, e.g. GSE's) re-initialises the
  params from the masks of ``tx.init``; the optimizer is then initialised again.
  Collections in ``kept_by_method`` (an always-sparse topology) live in the
  optimizer state only, not in the model state. ``variables``: the model's, if
  already initialised from ``seed``.
  """
  variables = dict(variables or init_variables(model, seed, sample))
  params = variables.pop("params")
  for name in kept_by_method:
    variables.pop(name)
  # Jitted: an eager init dispatches hundreds of small ops (seconds on CPU).
  opt_state = jax.jit(tx.init)(params)
  if init_params is not None:
    params_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    params = jax.jit(init_params)(params_key, params, sparsejax.masks(opt_state))
    opt_state = jax.jit(tx.init)(params)
  return TrainState(jnp.zeros((), jnp.int32), params, dict(variables), opt_state,
                    records.new_tracker(opt_state))


def _normalization(data: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The per-channel ``(mean, std)`` of ``data.normalize``, or ``(None, None)``."""
  if not data.normalize:
    return None, None
  if data.dataset not in NORMALIZATION:
    raise ValueError(f"config.data.normalize: no per-channel statistics for {data.dataset!r}")
  return NORMALIZATION[data.dataset]


def _start(config: ml_collections.ConfigDict, model: nn.Module, num_train: int, sample: Any
           ) -> tuple[optax.GradientTransformation, dict[str, Any], int, int, TrainState]:
  """The optimizer and the initial state: :func:`build_optimizer` (given the model's
  collections the method takes) and :func:`initial_state`, errors as config errors."""
  entry = _entry(config.sparse.method)
  wanted = entry.collections if entry else ()
  collections, variables = {}, None
  if wanted:
    variables = init_variables(model, config.seed, sample)
    missing = [name for name in wanted if name not in variables]
    if missing:
      raise ValueError(f"config.model: method {config.sparse.method!r} needs a model with "
                       f"always-sparse layers ({', '.join(ALWAYS_SPARSE_MODELS)}), "
                       f"{config.model!r} has no {missing[0]!r} collection")
    collections = {name: variables[name] for name in wanted}
  tx, sparse, num_steps, per_epoch = build_optimizer(config, num_train, collections)
  try:
    state = initial_state(model, tx, config.seed, sample, entry and entry.init_params, wanted,
                          variables)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  return tx, sparse, num_steps, per_epoch, state


def _resolved(config: ml_collections.ConfigDict, sparse: dict[str, Any]
              ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the resolved ``sparse`` section (what a run records)."""
  config = config.copy_and_resolve_references()
  config.sparse = ml_collections.ConfigDict(sparse)
  return config


def _placeholders(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Stand-ins for the model's collections a method takes, to validate its section early."""
  entry = _entry(config.sparse.method)
  return {name: {} for name in (entry.collections if entry else ())}


def _model(config: ml_collections.ConfigDict, classes: int) -> nn.Module:
  """The model of ``config``; an always-sparse model only with an always-sparse method."""
  if config.model in ALWAYS_SPARSE_MODELS and not is_always_sparse(config.sparse.method):
    raise ValueError(f"config.model: {config.model!r} has always-sparse layers; train it with "
                     "always_gse, always_rigl or always_set")
  try:
    return get_model(config.model, classes, config.sparse)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates ``config`` and builds its model and optimizer, without data or disk.

  The dataset's size and image shape come from :func:`sparsejax.data.dataset_shape`;
  the model and optimizer state are built abstractly (:func:`jax.eval_shape`), so
  this takes seconds even for large models.

  Args:
    config: the experiment config.

  Returns:
    The resolved config, as :func:`setup` would record it.

  Raises:
    ValueError: for a bad config (as :func:`setup`), or a dataset of unknown shape.
  """
  cfg.validate_config(config)
  try:
    shape = dataset_shape(config.data.dataset)
  except ValueError as e:
    raise ValueError(f"config.data.dataset: {e}") from e
  _, sparse, _, _ = build_optimizer(config, shape.num_train, _placeholders(config))
  _normalization(config.data)
  model = _model(config, shape.num_classes)
  sample = jax.ShapeDtypeStruct((1, *shape.image_shape), jnp.float32)
  jax.eval_shape(lambda x: _start(config, model, shape.num_train, x)[4], sample)
  return _resolved(config, sparse)


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
  mesh = sharding.make_mesh(config.mesh.model)
  sharding.check_divisible("batch_size", config.batch_size, mesh)
  sharding.check_divisible("eval_batch_size", config.eval_batch_size, mesh)
  train_source, test_source = data if data is not None else load_data(config)
  _, sparse, _, _ = build_optimizer(config, len(train_source), _placeholders(config))
  dataset = config.data.dataset
  mean, std = _normalization(config.data)
  pipeline = TrainPipeline(train_source, batch_size=config.batch_size, seed=config.seed,
                           crop_padding=config.data.crop_padding, flip=config.data.flip,
                           mean=mean, std=std, shard_index=jax.process_index(),
                           shard_count=jax.process_count())
  model = _model(config, num_classes(dataset, config.data.data_dir))
  sample = pipeline.batch(0)["image"][:1]
  tx, sparse, num_steps, per_epoch, state = _start(config, model, len(train_source), sample)
  positions = flops.kernel_positions(
      model, {"params": state.params, **state.model_state,
              **method_variables(sparse["method"], state.opt_state)}, sample, train=False)
  _, dense_flops = flops.forward_flops(state.params, None, positions)
  schedule = learning_rate_schedule(config.optimizer, per_epoch, num_steps)
  state = sharding.place(state, sharding.state_shardings(state, mesh, config.mesh.min_shard_size))
  return Experiment(_resolved(config, sparse), model, tx, state, pipeline, test_source,
                    num_steps, per_epoch, positions, dense_flops, schedule, mesh)


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

  With several processes (``jax.distributed``) every process calls this with the same
  ``workdir``: all take part in the checkpoints, only process 0 writes the other files.
  A checkpoint that does not restore intact is reported on stderr and the one before
  it is used.

  Raises:
    ValueError: when ``workdir`` holds a run of another config.
    Preempted: after saving the step at which a stop was requested (SIGTERM, SIGINT).
    Diverged: at a non-finite loss (``config.on_nonfinite="stop"``) or state; the
      summary then records the failure.
    CheckpointError: when checkpoints exist but none restores, or one cannot be written.
  """
  start_time = time.perf_counter()
  config = experiment.config
  # A copy: the train step donates its input, and the experiment may be run again.
  state, totals = jax.tree.map(jnp.copy, experiment.state), records.Totals()
  checkpointer = writer = None
  primary = sharding.is_primary()  # the process that writes files (orbax: all of them)
  if workdir is not None:
    check_workdir(workdir, config)
    if primary:
      write_config(workdir, config)
    checkpointer = Checkpointer(Path(workdir) / CHECKPOINT_DIR, config.keep_checkpoints)
    try:
      restored = checkpointer.restore(state, warn=_warn if primary else None)
    except CheckpointError:
      checkpointer.close()
      raise
    if restored is not None:
      state, record = restored
      totals = records.Totals(**record["totals"])
    writer = MetricsWriter(workdir, resume_step=int(state.step), write=primary)
  try:
    with contextlib.ExitStack() as closing:
      if writer is not None:
        closing.push(_closing_after(writer.close))
      if checkpointer is not None:
        closing.push(_closing_after(checkpointer.close))
      state, totals, last_row = _train(experiment, state, totals, checkpointer, writer,
                                       show_progress and primary)
  except Diverged as e:
    if workdir is not None and primary:
      write_summary(workdir, records.failure(experiment, str(e), e.step,
                                             time.perf_counter() - start_time))
    raise
  summary = records.summary(experiment, state, last_row, time.perf_counter() - start_time)
  if workdir is not None and primary:
    write_summary(workdir, summary)
  return summary


def _closing_after(close: Callable[[], None]) -> Callable[..., bool]:
  """An ``ExitStack`` exit callback that runs ``close``, letting the first error win.

  When an error is already on its way out, an error of ``close`` is dropped: a full disk
  fails the checkpoint first and then the metrics' flush, and the one to report is the
  first (the process is failing either way).
  """

  def exit_callback(kind, error, traceback) -> bool:
    del kind, traceback
    try:
      close()
    except Exception:  # noqa: BLE001 - only when another error is already propagating
      if error is None:
        raise
    return False

  return exit_callback


def _warn(line: str) -> None:
  print(f"warning: {line}", file=sys.stderr, flush=True)


_finite_leaves = per_leaf_or_whole(lambda leaf: jnp.isfinite(leaf).all())


def _state_is_finite(state: TrainState) -> bool:
  """Whether every inexact array of the params, model state and optimizer state is finite."""
  leaves = [x for x in jax.tree.leaves((state.params, state.model_state, state.opt_state))
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return all(jax.device_get(_finite_leaves(leaves)))


def _check_finite(experiment: Experiment, state: TrainState, step: int,
                  checkpointer: Checkpointer | None) -> None:
  """Raises Diverged after a non-finite loss (``on_nonfinite="stop"``) or with a
  non-finite state, so that no such state is logged or checkpointed."""
  first = int(state.tracker.first_nonfinite)
  what = None
  if experiment.config.on_nonfinite == "stop" and first:
    what, step = "loss", first
  elif not _state_is_finite(state):
    what = "params or optimizer state"
  if what is not None:
    if checkpointer is not None:
      checkpointer.wait()
    raise Diverged(step, what, checkpointer.latest_step() if checkpointer else None)


def _train(experiment: Experiment, state: TrainState, totals: records.Totals,
           checkpointer: Checkpointer | None, writer: MetricsWriter | None,
           show_progress: bool) -> tuple[TrainState, records.Totals, dict[str, Any]]:
  """The loop from ``state.step`` to the end; returns the final state, totals and last row."""
  config = experiment.config
  per_epoch, num_steps = experiment.steps_per_epoch, experiment.num_steps
  eval_every = cfg.every(config.eval_every, per_epoch)
  checkpoint_every = cfg.every(config.checkpoint_every, per_epoch)
  train_step, evaluate = train_steps(experiment), make_evaluate(experiment)
  step, last_row = int(state.step), None
  with (contextlib.closing(experiment.pipeline.iterate(step)) as batches,
        Progress(num_steps, step, experiment.method, enabled=show_progress) as progress,
        StopRequests() as stop_requests):
    while step < num_steps:
      state = train_step(step + 1)(state, sharding.shard_batch(next(batches), experiment.mesh))
      step += 1
      is_eval = step == num_steps or step % eval_every == 0
      is_log = is_eval or step % config.log_every == 0
      is_checkpoint = step == num_steps or step % checkpoint_every == 0
      stop = stop_requests.reached(step)
      if is_log or is_checkpoint or stop:
        _check_finite(experiment, state, step, checkpointer)
      if is_log or is_checkpoint:
        state, totals = records.flush(state, totals, config.batch_size)
      if is_log:
        last_row = records.row(experiment, state, totals, evaluate(state) if is_eval else None)
        state = records.start_next_row(state, is_eval)
        if writer is not None:
          writer.write(last_row)
        progress.show(last_row)
      if checkpointer is not None and (is_checkpoint or stop):
        checkpointer.save(step, state, {"next_batch": step, "totals": totals._asdict()})
      if stop:
        if checkpointer is not None:
          checkpointer.wait()
        raise Preempted(step, saved=checkpointer is not None)
      progress.advance(step)
  if last_row is None and writer is not None:  # resumed after the end: report the last row
    last_row = writer.last_row()
  if last_row is None or last_row.get("test_accuracy") is None:
    last_row = records.row(experiment, state, totals, evaluate(state))
  return state, totals, last_row
