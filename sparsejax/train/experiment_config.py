"""Experiment configs: range checks, step counts and the resolved ``sparse`` section.

The keys, their types and defaults are declared once in :mod:`sparsejax.train.schema`;
:func:`validate_config` checks a config against it, then checks the values' ranges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

import sparsejax
from sparsejax.train.models import MODELS
from sparsejax.train.optimizers import OPTIMIZERS, SCHEDULES
from sparsejax.train.schema import END_STEP_PLACEHOLDER, PER_EPOCH, check_schema

END_STEP_FRACTION = 0.75
NONFINITE_POLICIES = ("stop", "skip")  # config.on_nonfinite


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ValueError(f"config.{key} {message}")


def _check_at_least(config: Any, key: str, minimum: int, prefix: str = "") -> None:
  value = config[key]
  _check(value is not None and value >= minimum, prefix + key,
         f"must be an integer >= {minimum}, got {value!r}")


def _validate_optimizer(opt: ml_collections.ConfigDict) -> None:
  _check(opt.name in OPTIMIZERS, "optimizer.name",
         f"must be one of {list(OPTIMIZERS)}, got {opt.name!r}")
  _check(opt.learning_rate is not None and opt.learning_rate > 0, "optimizer.learning_rate",
         f"must be > 0, got {opt.learning_rate!r}")
  _check(0 <= opt.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {opt.momentum!r}")
  _check(opt.weight_decay >= 0, "optimizer.weight_decay",
         f"must be >= 0, got {opt.weight_decay!r}")
  _check(opt.schedule in SCHEDULES, "optimizer.schedule",
         f"must be one of {list(SCHEDULES)}, got {opt.schedule!r}")
  epochs = list(opt.decay_epochs)
  _check(all(isinstance(e, (int, float)) and e > 0 for e in epochs) and epochs == sorted(epochs),
         "optimizer.decay_epochs", f"must be increasing positive numbers, got {epochs!r}")
  _check(opt.decay_factor is None or 0 < opt.decay_factor <= 1, "optimizer.decay_factor",
         f"must be in (0, 1], got {opt.decay_factor!r}")
  _check(opt.warmup_epochs >= 0, "optimizer.warmup_epochs",
         f"must be >= 0, got {opt.warmup_epochs!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks ``config`` against the schema, then the training keys' ranges.

  The method's own keywords (sparsity, distribution, ...) are checked by sparsejax
  when the method is built.

  Args:
    config: the experiment config.

  Raises:
    ValueError: naming the first bad, missing or unknown key.
  """
  check_schema(config)
  _check(bool(config.data.dataset), "data.dataset",
         f"must be a dataset name, got {config.data.dataset!r}")
  _check_at_least(config.data, "crop_padding", 0, "data.")
  _validate_optimizer(config.optimizer)
  _check(config.model in MODELS, "model", f"must be one of {sorted(MODELS)}, got {config.model!r}")
  for key in ("batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
    _check_at_least(config, key, 1)
  if config.num_steps <= 0:
    _check_at_least(config, "num_epochs", 1)
  _check_at_least(config, "seed", 0)
  _check(config.on_nonfinite in NONFINITE_POLICIES, "on_nonfinite",
         f"must be one of {list(NONFINITE_POLICIES)}, got {config.on_nonfinite!r}")
  _check_at_least(config.mesh, "model", 1, "mesh.")
  _check_at_least(config.mesh, "min_shard_size", 1, "mesh.")
  fraction = config.sparse_end_fraction
  _check(0 < fraction <= 1, "sparse_end_fraction", f"must be in (0, 1], got {fraction!r}")
  for key in ("eval_every", "checkpoint_every"):
    _check(config[key] >= 1 or config[key] == PER_EPOCH, key,
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
    A plain dict for :func:`sparsejax.from_config` with every config keyword of the
    method, so the runner and the run record see the values used.
  """
  resolved = sparsejax.method_config(sparse["method"]).to_dict()
  resolved.update(sparse.to_dict() if isinstance(sparse, ml_collections.ConfigDict)
                  else dict(sparse))
  if resolved.get("end_step") == END_STEP_PLACEHOLDER:
    resolved["end_step"] = round(end_fraction * num_steps)
  return resolved


def method_section(method: str, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """``sparsejax.method_config(method)`` with the keys it shares with ``values`` taken from them.

  ``end_step``, when the method takes it and ``values`` does not give it, becomes the
  -1 placeholder (``config.sparse_end_fraction`` of training).

  Args:
    method: "dense" or a registered method.
    values: keyword values, e.g. another method's section or a setup's choices.

  Returns:
    The locked section.

  Raises:
    ValueError: for an unknown method.
  """
  section = sparsejax.method_config(method)
  for key in section:
    if key != "method" and values.get(key) is not None:
      section[key] = values[key]
  if "end_step" in section and section.end_step is None:
    section.end_step = END_STEP_PLACEHOLDER
  return section


def with_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``sparse`` section runs ``method``.

  Keeps the values of ``config.sparse`` that ``method`` also takes; its other keys
  get the method's defaults.

  Args:
    config: an experiment config.
    method: "dense" or a registered method.

  Returns:
    The new config.

  Raises:
    ValueError: for an unknown method, or a keyword it needs that ``config.sparse``
      does not give.
  """
  sparse = method_section(method, config.sparse)
  missing = [] if method == "dense" else [
      key for key in sparsejax.registry.required_keywords(method) if sparse[key] is None]
  if missing:
    raise ValueError(f"config.sparse.{missing[0]} is needed by method {method!r}, and the "
                     f"config's {config.sparse.method!r} section has none: start from a "
                     f"config of a method that takes it (e.g. :{method})")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sparse = sparse
  return config
