"""Pieces shared by the experiment configs: the argument, the sparse section, the defaults.

A config file's ``get_config(arg)`` takes ``arg = "method[,model]"``: ``method`` is
"dense" or any sparsejax method (:data:`METHODS`), ``model`` one of the setup's models.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

import sparsejax

METHODS = ("dense", *sorted(sparsejax.METHODS))


def parse_arg(arg: str | None, models: Sequence[str], default_method: str = "rigl"
              ) -> tuple[str, str]:
  """``"method[,model]"`` → ``(method, model)``; the first model is the default.

  Raises:
    ValueError: for an unknown method or model (one line, listing the choices).
  """
  method, _, model = (arg or default_method).partition(",")
  model = model or models[0]
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r} in the config argument; expected one of "
                     f"{list(METHODS)}")
  if model not in models:
    raise ValueError(f"unknown model {model!r} in the config argument; expected one of "
                     f"{list(models)}")
  return method, model


def sparse_config(method: str, *, sparsity: float = 0.9, distribution: str = "erk",
                  update_every: int = 100, drop_fraction: float = 0.3,
                  alpha: float = 5e-4) -> ml_collections.ConfigDict:
  """The ``sparse`` section of ``method`` with exactly the keywords it takes.

  ``end_step = -1`` stands for ``config.sparse_end_fraction`` of training. DST has
  no target sparsity: ``alpha`` (its regulariser) decides it.
  """
  if method == "dense":
    return ml_collections.ConfigDict({"method": "dense"})
  if method == "dst":
    return ml_collections.ConfigDict({"method": "dst", "alpha": alpha, "recovery_density": 0.01})
  sparse = ml_collections.ConfigDict({"method": method, "sparsity": sparsity,
                                      "distribution": distribution, "seed": 0})
  if method in ("set", "rigl"):
    sparse.update(update_every=update_every, start_step=0, end_step=-1,
                  drop_fraction=drop_fraction, train_at_update=False)
  elif method == "gmp":
    sparse.update(distribution="uniform", initial_sparsity=0.0, update_every=update_every,
                  start_step=0, end_step=-1)
  return sparse


def optimizer_config(learning_rate: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                     schedule: str = "constant", decay_epochs: Sequence[float] = (),
                     decay_factor: float = 0.1, warmup_epochs: float = 0.0
                     ) -> ml_collections.ConfigDict:
  """An SGD-with-momentum ``optimizer`` section (``name="adam"`` is the alternative)."""
  return ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": learning_rate, "momentum": momentum, "nesterov": False,
      "weight_decay": weight_decay, "schedule": schedule, "decay_epochs": list(decay_epochs),
      "decay_factor": decay_factor, "warmup_epochs": warmup_epochs})


def base_config(dataset: str, model: str, *, augment: bool,
                sparse: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict,
                batch_size: int, num_epochs: int) -> ml_collections.ConfigDict:
  """A whole experiment config; the keys are described in
  :mod:`sparsejax.train.experiment_config`."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict({
      "dataset": dataset, "data_dir": config_dict.placeholder(str),
      "crop_padding": 4 if augment else 0, "flip": augment, "normalize": augment,
      "download": False})
  config.model = model
  config.optimizer = optimizer
  config.sparse = sparse
  config.sparse_end_fraction = 0.75
  config.num_epochs = num_epochs
  config.num_steps = -1  # > 0 overrides num_epochs
  config.batch_size = batch_size
  config.eval_batch_size = 1000
  config.seed = 0
  config.log_every = 100
  config.eval_every = -1  # once per epoch
  config.checkpoint_every = -1  # once per epoch
  config.keep_checkpoints = 3
  return config
