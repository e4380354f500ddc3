"""The experiment config, declared once: every key, its type and its default.

:func:`experiment_schema` is both the documentation of the keys and what configs are
checked against (:func:`check_schema`): a config file builds on it (see
``experiments/configs/common.py``), and a config with a missing key, an unknown key
or a value of another type is refused before training. The ``sparse`` section is the
method's own, :func:`sparsejax.method_config`. Range checks live in
:mod:`sparsejax.train.experiment_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

import sparsejax

PER_EPOCH = -1  # eval_every / checkpoint_every: once per epoch
END_STEP_PLACEHOLDER = -1  # sparse.end_step: config.sparse_end_fraction of training


def experiment_schema(sparse: ml_collections.ConfigDict | None = None
                      ) -> ml_collections.ConfigDict:
  """Every key of an experiment config with its type and default (placeholders: None).

  Args:
    sparse: the ``sparse`` section; None for ``sparsejax.method_config("dense")``.

  Returns:
    An unlocked ``ConfigDict`` (lock it once filled in).
  """
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict({
      # "fashion_mnist", "mnist" (IDX files) or any tensorflow-datasets name.
      "dataset": config_dict.placeholder(str),
      "data_dir": config_dict.placeholder(str),  # else $SPARSEJAX_DATA_DIR, tfds' default
      "crop_padding": 0,  # pad-and-random-crop augmentation by this many pixels; 0 = off
      "flip": False,  # random horizontal flips
      "normalize": True,  # per-channel standardisation with the dataset's mean and std
      "download": False,  # let tensorflow-datasets download and prepare the data
  })
  config.model = config_dict.placeholder(str)  # a name of sparsejax.train.models.MODELS
  config.optimizer = ml_collections.ConfigDict({
      "name": "sgd",  # "sgd" or "adam" (adamw)
      "learning_rate": config_dict.placeholder(float),  # the base (peak) rate
      "momentum": 0.9,  # SGD momentum; 0 = none
      "nesterov": False,
      "weight_decay": 0.0,  # L2 added to the gradient for SGD, decoupled for Adam
      "schedule": "constant",  # "constant", "step" or "cosine"
      # step: epochs at which the rate is multiplied by decay_factor; cosine: at most
      # one entry, the epoch where it reaches 0 (default: the end of training).
      "decay_epochs": (),
      "decay_factor": config_dict.placeholder(float),  # step: the factor (e.g. 0.1)
      "warmup_epochs": 0.0,  # linear warm-up from base/warmup_steps to the base rate
  })
  config.sparse = sparse if sparse is not None else sparsejax.method_config("dense")
  config.sparse_end_fraction = 0.75  # sparse.end_step = -1 stands for this fraction of training
  config.num_epochs = config_dict.placeholder(int)
  config.num_steps = -1  # > 0 overrides num_epochs
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.seed = 0  # model init and data order (the method's own seed is sparse.seed)
  config.log_every = 100  # steps between metrics rows
  config.eval_every = PER_EPOCH  # steps between evaluations; -1 = once per epoch
  config.checkpoint_every = PER_EPOCH  # steps between checkpoints; -1 = once per epoch
  config.keep_checkpoints = 3
  # A non-finite loss (or gradient, with "skip"): "stop" the run at once (non-zero exit,
  # nothing after the last checkpoint kept), or "skip" the step (optax.apply_if_finite).
  config.on_nonfinite = "stop"
  # Where the state lives (not what is trained: a run may resume on another mesh).
  config.mesh = ml_collections.ConfigDict({
      "model": 1,  # devices along the ``model`` axis; > 1 splits large state arrays (FSDP)
      "min_shard_size": 2**16,  # arrays with fewer elements stay replicated
  })
  return config


def _field_type(section: ml_collections.ConfigDict, key: str) -> type:
  return section.get_ref(key).get_type()


def _type_ok(value: Any, expected: type) -> bool:
  if value is None:
    return True  # a placeholder not set; range checks say whether it is required
  if expected is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, expected)


def _check_keys(config: Mapping[str, Any], schema: ml_collections.ConfigDict,
                prefix: str) -> None:
  for key in schema:
    if key not in config:
      raise ValueError(f"config.{prefix}{key} is missing")
  for key, value in config.items():
    if key not in schema:
      raise ValueError(f"config.{prefix}{key} is not a key of the experiment config")
    expected = schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
        raise ValueError(f"config.{prefix}{key} must be a section")
      _check_keys(value, expected, f"{prefix}{key}.")
    elif not _type_ok(value, _field_type(schema, key)):
      raise ValueError(f"config.{prefix}{key} must be of type "
                       f"{_field_type(schema, key).__name__}, got {value!r}")


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Checks that ``config`` has exactly the keys of the schema, with values of their types.

  The ``sparse`` section is checked against its method's section; keys it leaves out
  take the method's defaults.

  Args:
    config: the experiment config.

  Raises:
    ValueError: naming the first missing, unknown or mistyped key.
  """
  schema = experiment_schema()
  del schema.sparse
  _check_keys({k: v for k, v in config.items() if k != "sparse"}, schema, "")
  sparse = config.get("sparse")
  if not isinstance(sparse, (ml_collections.ConfigDict, Mapping)) or "method" not in sparse:
    raise ValueError("config.sparse must be a section with a `method`")
  try:
    method_schema = sparsejax.method_config(sparse["method"])
  except ValueError as e:
    raise ValueError(f"config.sparse.method: {e}") from e
  section = dict(method_schema.items())
  section.update(sparse.items())
  _check_keys(section, method_schema, "sparse.")
