"""Experiment configs: validation, the step count, the sparse section and the optimizer.

Config keys (see ``experiments/configs/fashion_mnist.py``): ``model``, ``optimizer``
("sgd" or "adam"), ``learning_rate``, ``momentum``, ``batch_size``, ``num_epochs``,
``num_steps`` (> 0 overrides ``num_epochs``), ``seed``, ``eval_batch_size``,
``data_dir``, optional ``dataset`` ("fashion_mnist" or "mnist"), and ``sparse``: the
sparsejax method name under ``method`` plus its keywords.

``sparse.end_step = -1`` is a placeholder for 75 % of the total steps (RigL's
choice).
"""

from __future__ import annotations

from collections.abc import Mapping
import inspect
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import optax

import sparsejax
from sparsejax.train.models import MODELS

OPTIMIZERS = ("sgd", "adam")
END_STEP_PLACEHOLDER = -1
END_STEP_FRACTION = 0.75
REQUIRED_KEYS = ("model", "optimizer", "learning_rate", "momentum", "batch_size", "num_epochs",
                 "num_steps", "seed", "eval_batch_size", "sparse")


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ValueError(f"config.{key} {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the training keys of ``config``; sparsejax checks ``config.sparse`` itself.

  Args:
    config: the experiment config.

  Raises:
    ValueError: naming the first bad or missing key.
  """
  for key in REQUIRED_KEYS:
    _check(key in config, key, "is missing")
  _check(config.model in MODELS, "model", f"must be one of {sorted(MODELS)}, got {config.model!r}")
  _check(config.optimizer in OPTIMIZERS, "optimizer",
         f"must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")
  _check(_is_number(config.learning_rate) and config.learning_rate > 0, "learning_rate",
         f"must be > 0, got {config.learning_rate!r}")
  _check(_is_number(config.momentum) and 0 <= config.momentum < 1, "momentum",
         f"must be in [0, 1), got {config.momentum!r}")
  for key in ("batch_size", "eval_batch_size"):
    _check(_is_int(config[key]) and config[key] > 0, key, f"must be an integer > 0, got "
           f"{config[key]!r}")
  _check(_is_int(config.num_steps), "num_steps", f"must be an integer, got {config.num_steps!r}")
  if config.num_steps <= 0:
    _check(_is_int(config.num_epochs) and config.num_epochs > 0, "num_epochs",
           f"must be an integer > 0 when num_steps <= 0, got {config.num_epochs!r}")
  _check(_is_int(config.seed) and config.seed >= 0, "seed",
         f"must be an integer >= 0, got {config.seed!r}")
  _check(isinstance(config.sparse, (ml_collections.ConfigDict, Mapping)), "sparse",
         "must be a section with a `method` key")
  _check("method" in config.sparse, "sparse.method", "is missing")


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """``num_steps`` if > 0, else ``num_epochs * (num_train // batch_size)``."""
  _check(config.batch_size <= num_train, "batch_size", f"({config.batch_size}) exceeds the "
         f"{num_train} training examples")
  if config.num_steps > 0:
    return int(config.num_steps)
  return int(config.num_epochs * (num_train // config.batch_size))


def resolve_sparse(sparse: Mapping[str, Any], num_steps: int) -> dict[str, Any]:
  """A plain-dict copy of ``sparse`` with the ``end_step = -1`` placeholder resolved.

  Args:
    sparse: the ``config.sparse`` section.
    num_steps: total training steps.

  Returns:
    The keywords for :func:`sparsejax.from_config`.
  """
  resolved = sparse.to_dict() if isinstance(sparse, ml_collections.ConfigDict) else dict(sparse)
  if resolved.get("end_step") == END_STEP_PLACEHOLDER:
    resolved["end_step"] = round(END_STEP_FRACTION * num_steps)
  return resolved


def warn_if_static(sparse: Mapping[str, Any]) -> None:
  """Logs a warning when a dynamic method's window holds no mask update."""
  if "end_step" not in sparse or sparse["method"] == "gmp":  # gmp also prunes at step 1
    return
  first = sparse.get("start_step", 0) + sparse.get("update_every", 100)
  if sparse["end_step"] < first:
    logging.warning("%s: end_step %d comes before the first mask update (step %d): the masks "
                    "will not change", sparse["method"], sparse["end_step"], first)


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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The inner optimizer: ``optax.sgd`` with momentum, or ``optax.adam``."""
  if config.optimizer == "adam":
    return optax.adam(config.learning_rate)
  return optax.sgd(config.learning_rate, momentum=config.momentum or None)
