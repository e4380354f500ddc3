"""Experiment configs: validation, step counts, the sparse section and the optimizer.

An experiment config (see ``experiments/configs/``) is a ``ConfigDict`` with

- ``data``: ``dataset`` ("fashion_mnist", "mnist" from IDX files; any other name
  through tensorflow-datasets), ``data_dir``, ``crop_padding`` (pad-and-crop
  augmentation, 0 = off), ``flip`` (random horizontal flips), ``normalize``
  (per-channel mean/std), ``download`` (let tfds download and prepare the data);
- ``model``: a name of :data:`sparsejax.train.models.MODELS`;
- ``optimizer``: ``name`` ("sgd" or "adam"), ``learning_rate``, ``momentum``,
  ``nesterov``, ``weight_decay`` (L2 added to the gradient for SGD, decoupled for
  Adam), ``schedule`` ("constant", "step" or "cosine"), ``decay_epochs`` and
  ``decay_factor`` (step schedule), ``warmup_epochs`` (linear warm-up);
- ``sparse``: ``method`` ("dense" or a name of :data:`sparsejax.METHODS`) and that
  method's keywords; ``end_step = -1`` stands for ``sparse_end_fraction`` of training
  (optional, default 0.75: RigL's choice; GSE stops at 0.6);
- ``num_epochs``, ``num_steps`` (> 0 overrides ``num_epochs``), ``batch_size``,
  ``eval_batch_size``, ``seed``, ``log_every``, ``eval_every`` and
  ``checkpoint_every`` (steps; -1 = once per epoch), ``keep_checkpoints``.
"""

from __future__ import annotations

from collections.abc import Mapping
import inspect
from typing import Any

import ml_collections
import numpy as np
import optax

import sparsejax
from sparsejax.train.models import MODELS

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
END_STEP_PLACEHOLDER = -1
END_STEP_FRACTION = 0.75
PER_EPOCH = -1  # eval_every / checkpoint_every placeholder
TOP_LEVEL_KEYS = ("data", "model", "optimizer", "sparse", "num_epochs", "num_steps", "batch_size",
                  "eval_batch_size", "seed", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints")
DATA_KEYS = ("dataset", "data_dir", "crop_padding", "flip", "normalize", "download")
OPTIMIZER_KEYS = ("name", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule",
                  "decay_epochs", "decay_factor", "warmup_epochs")


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ValueError(f"config.{key} {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(config: Any, key: str, prefix: str = "", minimum: int = 0) -> None:
  value = config[key]
  _check(_is_int(value) and value >= minimum, prefix + key,
         f"must be an integer >= {minimum}, got {value!r}")


def _check_section(config: ml_collections.ConfigDict, name: str, keys: tuple[str, ...]) -> None:
  _check(isinstance(config[name], (ml_collections.ConfigDict, Mapping)), name,
         "must be a section")
  for key in keys:
    _check(key in config[name], f"{name}.{key}", "is missing")


def _validate_data(data: ml_collections.ConfigDict) -> None:
  _check(isinstance(data.dataset, str) and data.dataset, "data.dataset",
         f"must be a dataset name, got {data.dataset!r}")
  _check_int(data, "crop_padding", "data.")
  for key in ("flip", "normalize", "download"):
    _check(isinstance(data[key], bool), f"data.{key}", f"must be true or false, got {data[key]!r}")


def _validate_optimizer(opt: ml_collections.ConfigDict) -> None:
  _check(opt.name in OPTIMIZERS, "optimizer.name",
         f"must be one of {list(OPTIMIZERS)}, got {opt.name!r}")
  _check(_is_number(opt.learning_rate) and opt.learning_rate > 0, "optimizer.learning_rate",
         f"must be > 0, got {opt.learning_rate!r}")
  _check(_is_number(opt.momentum) and 0 <= opt.momentum < 1, "optimizer.momentum",
         f"must be in [0, 1), got {opt.momentum!r}")
  _check(isinstance(opt.nesterov, bool), "optimizer.nesterov", "must be true or false")
  _check(_is_number(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay",
         f"must be >= 0, got {opt.weight_decay!r}")
  _check(opt.schedule in SCHEDULES, "optimizer.schedule",
         f"must be one of {list(SCHEDULES)}, got {opt.schedule!r}")
  epochs = list(opt.decay_epochs or ())
  _check(all(_is_number(e) and e > 0 for e in epochs) and epochs == sorted(epochs),
         "optimizer.decay_epochs", f"must be increasing positive numbers, got {epochs!r}")
  _check(_is_number(opt.decay_factor) and 0 < opt.decay_factor <= 1, "optimizer.decay_factor",
         f"must be in (0, 1], got {opt.decay_factor!r}")
  _check(_is_number(opt.warmup_epochs) and opt.warmup_epochs >= 0, "optimizer.warmup_epochs",
         f"must be >= 0, got {opt.warmup_epochs!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the training keys of ``config``; sparsejax checks ``config.sparse`` itself.

  Args:
    config: the experiment config.

  Raises:
    ValueError: naming the first bad or missing key.
  """
  for key in TOP_LEVEL_KEYS:
    _check(key in config, key, "is missing")
  _check_section(config, "data", DATA_KEYS)
  _check_section(config, "optimizer", OPTIMIZER_KEYS)
  _check_section(config, "sparse", ("method",))
  _validate_data(config.data)
  _validate_optimizer(config.optimizer)
  _check(config.model in MODELS, "model", f"must be one of {sorted(MODELS)}, got {config.model!r}")
  methods = ["dense", *sorted(sparsejax.METHODS)]
  _check(config.sparse.method in methods, "sparse.method",
         f"must be one of {methods}, got {config.sparse.method!r}")
  for key in ("batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
    _check_int(config, key, minimum=1)
  _check(_is_int(config.num_steps), "num_steps", f"must be an integer, got {config.num_steps!r}")
  if config.num_steps <= 0:
    _check_int(config, "num_epochs", minimum=1)
  _check_int(config, "seed")
  fraction = config.get("sparse_end_fraction", END_STEP_FRACTION)
  _check(_is_number(fraction) and 0 < fraction <= 1, "sparse_end_fraction",
         f"must be in (0, 1], got {fraction!r}")
  for key in ("eval_every", "checkpoint_every"):
    _check(_is_int(config[key]) and (config[key] >= 1 or config[key] == PER_EPOCH), key,
           f"must be an integer >= 1 or {PER_EPOCH} (once per epoch), got {config[key]!r}")


def steps_per_epoch(config: ml_collections.ConfigDict, num_train: int) -> int:
  """Full batches in one pass over ``num_train`` examples (the last partial batch is dropped)."""
  _check(config.batch_size <= num_train, "batch_size",
         f"({config.batch_size}) exceeds the {num_train} training examples")
  return num_train // config.batch_size


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """``num_steps`` if > 0, else ``num_epochs`` epochs of full batches."""
  per_epoch = steps_per_epoch(config, num_train)
  if config.num_steps > 0:
    return int(config.num_steps)
  return int(config.num_epochs * per_epoch)


def every(value: int, per_epoch: int) -> int:
  """``eval_every``/``checkpoint_every`` in steps: the -1 placeholder is one epoch."""
  return per_epoch if value == PER_EPOCH else int(value)


def resolve_sparse(sparse: Mapping[str, Any], num_steps: int,
                   end_fraction: float = END_STEP_FRACTION) -> dict[str, Any]:
  """The ``sparse`` keywords with the method's defaults filled in and ``end_step`` resolved.

  Args:
    sparse: the ``config.sparse`` section.
    num_steps: total training steps.
    end_fraction: the fraction of ``num_steps`` that ``end_step = -1`` stands for.

  Returns:
    A plain dict for :func:`sparsejax.from_config`; every keyword the method takes
    (except ``dense``) is present, so the runner and the run record see the values used.
  """
  resolved = sparse.to_dict() if isinstance(sparse, ml_collections.ConfigDict) else dict(sparse)
  factory = sparsejax.METHODS.get(resolved["method"])
  if factory is not None:
    for name, parameter in inspect.signature(factory).parameters.items():
      if name not in ("inner", "dense") and parameter.default is not inspect.Parameter.empty:
        resolved.setdefault(name, parameter.default)
  if resolved.get("end_step") == END_STEP_PLACEHOLDER:
    resolved["end_step"] = round(end_fraction * num_steps)
  return resolved


def with_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``sparse`` section runs ``method``.

  Keeps the keys of ``config.sparse`` that ``method`` accepts; a missing ``end_step``
  becomes the -1 placeholder. Other missing required keywords raise.

  Args:
    config: an experiment config.
    method: "dense" or a name in :data:`sparsejax.METHODS`.

  Returns:
    The new config.

  Raises:
    ValueError: for an unknown method or a keyword it needs that ``config.sparse`` lacks.
  """
  config = config.copy_and_resolve_references()
  if method == "dense":
    config.sparse = ml_collections.ConfigDict({"method": "dense"})
    return config
  if method not in sparsejax.METHODS:
    raise ValueError(f"unknown method {method!r}; expected 'dense' or one of "
                     f"{sorted(sparsejax.METHODS)}")
  parameters = inspect.signature(sparsejax.METHODS[method]).parameters
  base = config.sparse.to_dict()
  sparse = {"method": method}
  for name, parameter in parameters.items():
    if name == "inner":
      continue
    if name in base:
      sparse[name] = base[name]
    elif name == "end_step":
      sparse[name] = END_STEP_PLACEHOLDER
    elif parameter.default is inspect.Parameter.empty:
      raise ValueError(f"config.sparse.{name} is needed by method {method!r}")
  config.sparse = ml_collections.ConfigDict(sparse)
  return config


def learning_rate_schedule(opt: ml_collections.ConfigDict, per_epoch: int) -> optax.Schedule:
  """The learning rate of each step: linear warm-up, then constant, step or cosine decay.

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch (epochs in the config become steps).
    (The cosine decay reaches 0 at ``decay_epochs[-1]``, or never without it.)

  Returns:
    An optax schedule of the 0-based step count, as the optimizer sees it.
  """
  base = float(opt.learning_rate)
  warmup = round(opt.warmup_epochs * per_epoch)
  boundaries = [round(e * per_epoch) for e in (opt.decay_epochs or ())]
  if opt.schedule == "step":
    after = optax.piecewise_constant_schedule(
        base, {b - warmup: float(opt.decay_factor) for b in boundaries if b > warmup})
  elif opt.schedule == "cosine" and boundaries:
    after = optax.cosine_decay_schedule(base, max(boundaries[-1] - warmup, 1))
  else:
    after = optax.constant_schedule(base)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(base / warmup, base, warmup), after],
                              [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, per_epoch: int) -> optax.GradientTransformation:
  """The inner optimizer of the ``optimizer`` section (see the module docstring).

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch, for the schedule.

  Returns:
    An optax transformation.
  """
  schedule = learning_rate_schedule(opt, per_epoch)
  if opt.name == "adam":
    return optax.adamw(schedule, weight_decay=opt.weight_decay)
  sgd = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
  if not opt.weight_decay:
    return sgd
  return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
