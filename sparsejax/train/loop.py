"""The training loop of the experiments: a Flax model, an optax optimizer, a sparsejax wrapper.

``train_and_evaluate(config)`` validates the config, builds the optimizer and its
state (so that every config error is raised before the first step), trains with a
jitted step and evaluates on the whole test set. The steps are split so that a
runner can build several experiments first and train them afterwards::

  experiment = setup(config)          # raises ValueError for a bad config
  result = train(experiment)          # params, opt_state, train loss, steps, density history
  accuracy = evaluate(experiment, result.params)

For a sparse method, ``train`` also records the global and per-layer density of the
masks after initialisation and at the end of every epoch (:func:`density_record`):
one host read of the masks per epoch, outside the jitted step.

The config keys are described in :mod:`sparsejax.train.experiment_config`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import functools
import itertools
import time
from typing import Any, NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import sparsejax
from sparsejax.data import batches, load_idx_dataset
from sparsejax.train.experiment_config import (
  make_optimizer,
  resolve_sparse,
  total_steps,
  validate_config,
  warn_if_static,
)
from sparsejax.train.models import get_model

Data = Mapping[str, Mapping[str, np.ndarray]]


class Experiment(NamedTuple):
  """Everything built from a config before training; its construction validates the config."""
  config: ml_collections.ConfigDict  # with ``sparse.end_step`` resolved
  model: nn.Module
  tx: optax.GradientTransformation
  params: Any
  opt_state: optax.OptState
  data: Data
  num_steps: int


class TrainResult(NamedTuple):
  """The outcome of :func:`train`."""
  params: Any
  opt_state: optax.OptState
  train_loss: float  # mean loss over the last epoch's worth of steps
  steps: int
  history: Sequence[dict[str, Any]] = ()  # density records (density_record); empty for dense


@functools.cache
def _init_fn(model_name: str):
  """A jitted ``model.init``, shared by the experiments of a process (compiled once)."""
  return jax.jit(get_model(model_name).init)


@functools.cache
def _correct_fn(model_name: str):
  """A jitted count of correct predictions among the valid examples of a batch."""
  model = get_model(model_name)

  @jax.jit
  def correct(params, images, labels, valid):
    predictions = jnp.argmax(model.apply({"params": params}, images), axis=-1)
    return jnp.sum((predictions == labels) & valid)

  return correct


def build_optimizer(config: ml_collections.ConfigDict, num_train: int
                    ) -> tuple[optax.GradientTransformation, dict[str, Any], int]:
  """Builds the optimizer of ``config`` without compiling anything (a cheap config check).

  Args:
    config: a config that passed :func:`validate_config`.
    num_train: number of training examples.

  Returns:
    ``(tx, sparse, num_steps)``: the optimizer, the resolved ``sparse`` keywords and
    the total number of training steps.

  Raises:
    ValueError: for a bad ``batch_size`` or ``sparse`` section.
  """
  num_steps = total_steps(config, num_train)
  sparse = resolve_sparse(config.sparse, num_steps)
  try:
    tx = sparsejax.from_config(sparse, make_optimizer(config))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  return tx, sparse, num_steps


def setup(config: ml_collections.ConfigDict, data: Data | None = None) -> Experiment:
  """Validates ``config``, loads the data, and builds the model, optimizer and states.

  Args:
    config: the experiment config.
    data: ``{"train": {"image", "label"}, "test": {...}}``; None to load the IDX
      dataset named by ``config.dataset`` (default "fashion_mnist") from ``config.data_dir``.

  Returns:
    An :class:`Experiment` ready for :func:`train`.

  Raises:
    ValueError: for a bad config, including the ``sparse`` section (sparsejax's errors
      are re-raised with a ``config.sparse`` prefix).
    FileNotFoundError: when the dataset is not found.
  """
  validate_config(config)
  if data is None:
    data = load_idx_dataset(config.get("dataset", "fashion_mnist"), config.get("data_dir"))
  tx, sparse, num_steps = build_optimizer(config, len(data["train"]["label"]))
  warn_if_static(sparse)
  model = get_model(config.model)
  params = _init_fn(config.model)(jax.random.PRNGKey(config.seed),
                                  data["train"]["image"][:1])["params"]
  try:
    # Jitted: eager initialisation dispatches hundreds of small ops (seconds on CPU).
    opt_state = jax.jit(tx.init)(params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sparse: {e}") from e
  config = config.copy_and_resolve_references()
  config.sparse = ml_collections.ConfigDict(sparse)
  return Experiment(config, model, tx, params, opt_state, data, num_steps)


def _loss(model: nn.Module, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits = model.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """A jitted ``(params, opt_state, images, labels) -> (params, opt_state, loss)``."""
  @jax.jit
  def train_step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, images, labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def is_dense(experiment: Experiment) -> bool:
  """Whether ``experiment`` trains without a sparsejax method (no masks to read)."""
  return experiment.config.sparse.method == "dense"


def density_record(opt_state: optax.OptState, step: int, epoch: int) -> dict[str, Any]:
  """The global and per-layer density (1 − sparsity) of the masks in ``opt_state``.

  Reads the masks on the host (:func:`sparsejax.summary`); call it between steps.

  Args:
    opt_state: the state of a sparsejax method.
    step: optimizer steps taken so far.
    epoch: epochs started so far (0 after initialisation).

  Returns:
    ``{"step", "epoch", "density", "layers": {path: density}}``, densities as nnz / size.
  """
  stats = sparsejax.summary(opt_state)
  layers = {path: layer["nnz"] / layer["size"] for path, layer in stats["layers"].items()}
  density = stats["nnz"] / stats["size"] if stats["size"] else 1.0
  return {"step": step, "epoch": epoch, "density": density, "layers": layers}


def train(experiment: Experiment) -> TrainResult:
  """Trains for ``experiment.num_steps`` steps over shuffled epochs of the train split.

  For a sparse method, the density of the masks is recorded after initialisation
  (step 0, epoch 0) and at the end of every epoch; a last epoch cut short by
  ``num_steps`` is recorded at the final step.

  Args:
    experiment: from :func:`setup`.

  Returns:
    The trained params and optimizer state, the mean loss of the last epoch's worth
    of steps, the number of steps and the density history (empty for dense).
  """
  config, train_split = experiment.config, experiment.data["train"]
  steps_per_epoch = len(train_split["label"]) // config.batch_size
  train_step = make_train_step(experiment.model, experiment.tx)
  params, opt_state = experiment.params, experiment.opt_state
  recent = collections.deque(maxlen=max(1, min(steps_per_epoch, experiment.num_steps)))
  track = not is_dense(experiment)
  history = [density_record(opt_state, 0, 0)] if track else []
  step = 0
  for epoch in itertools.count():
    for images, labels in batches(train_split["image"], train_split["label"], config.batch_size,
                                  seed=config.seed, epoch=epoch):
      params, opt_state, loss = train_step(params, opt_state, images, labels)
      recent.append(loss)
      step += 1
      if step == experiment.num_steps:
        break
    if track:
      history.append(density_record(opt_state, step, epoch + 1))
    _log_epoch(config.sparse.method, epoch + 1, step, float(recent[-1]),
               history[-1] if track else None)
    if step == experiment.num_steps:
      break
  train_loss = float(jnp.mean(jnp.stack(list(recent))))
  return TrainResult(params, opt_state, train_loss, step, history)


def _log_epoch(method: str, epoch: int, step: int, loss: float,
               record: dict[str, Any] | None) -> None:
  if record is None:
    logging.info("%s: epoch %d, step %d, loss %.4f", method, epoch, step, loss)
  else:
    logging.info("%s: epoch %d, step %d, loss %.4f, density %.4f", method, epoch, step, loss,
                 record["density"])


def evaluate(experiment: Experiment, params: Any) -> float:
  """Accuracy on the whole test split, in batches of ``eval_batch_size`` (the last one padded).

  Args:
    experiment: from :func:`setup`.
    params: the params to evaluate.

  Returns:
    The fraction of correctly classified test examples.
  """
  size = experiment.config.eval_batch_size
  images, labels = experiment.data["test"]["image"], experiment.data["test"]["label"]
  correct = _correct_fn(experiment.config.model)
  total = jnp.zeros((), jnp.int32)
  for start in range(0, len(labels), size):
    batch_images, batch_labels = images[start:start + size], labels[start:start + size]
    pad = size - len(batch_labels)
    valid = np.arange(size) < len(batch_labels)
    if pad:
      batch_images = np.concatenate([batch_images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      batch_labels = np.concatenate([batch_labels, np.zeros((pad,), labels.dtype)])
    total = total + correct(params, batch_images, batch_labels, valid)
  return int(total) / len(labels)


def measured_sparsity(experiment: Experiment, opt_state: optax.OptState
                      ) -> tuple[float, dict[str, float]]:
  """Global sparsity and ``{path: sparsity}`` of the masked leaves, from one
  :func:`sparsejax.summary`; ``(0.0, {})`` for dense."""
  if is_dense(experiment):
    return 0.0, {}
  stats = sparsejax.summary(opt_state)
  return float(stats["sparsity"]), {path: float(layer["sparsity"])
                                    for path, layer in stats["layers"].items()}


def run(experiment: Experiment) -> dict[str, Any]:
  """Trains and evaluates an experiment built by :func:`setup`.

  Args:
    experiment: from :func:`setup`.

  Returns:
    ``{"method", "sparsity", "layers", "test_accuracy", "train_loss", "steps", "seconds",
    "history"}``; ``layers`` maps each masked leaf to its final sparsity, ``history``
    lists the density records of :func:`train`, ``seconds`` is the wall time of
    training and evaluation, compilation included.
  """
  start = time.perf_counter()
  result = train(experiment)
  accuracy = evaluate(experiment, result.params)
  seconds = time.perf_counter() - start
  sparsity, layers = measured_sparsity(experiment, result.opt_state)
  return {"method": experiment.config.sparse.method, "sparsity": sparsity, "layers": layers,
          "test_accuracy": accuracy, "train_loss": result.train_loss, "steps": result.steps,
          "seconds": seconds, "history": list(result.history)}


def train_and_evaluate(config: ml_collections.ConfigDict, data: Data | None = None
                       ) -> dict[str, Any]:
  """Trains the configured model and method, then evaluates it on the test split.

  The config is validated and the optimizer built and initialised before any
  training step, so a bad config fails fast.

  Args:
    config: the experiment config (see the module docstring).
    data: optional in-memory dataset, as returned by :func:`sparsejax.data.load_idx_dataset`.

  Returns:
    ``{"method", "sparsity", "layers", "test_accuracy", "train_loss", "steps", "seconds",
    "history"}``: the measured global sparsity of the masks (0.0 for dense) and
    ``{path: sparsity}`` per masked leaf ({} for dense), the test accuracy as a
    fraction in [0, 1], the mean training loss over the last epoch's worth of steps,
    the number of steps, the wall time of training and evaluation, and the density
    history ``[{"step", "epoch", "density", "layers": {path: density}}, ...]``
    recorded after initialisation and at the end of every epoch ([] for dense).

  Raises:
    ValueError: for a bad config.
    FileNotFoundError: when the dataset is not found.
  """
  return run(setup(config, data))
