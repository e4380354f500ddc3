"""Pieces shared by the experiment configs: the argument, the sparse section, the defaults.

A config file's ``get_config(arg)`` takes ``arg = "method[,model]"``: ``method`` is
"dense" or any registered sparsejax method (:data:`sparsejax.METHODS`), ``model`` one
of the setup's models. Every key, its type and meaning is declared once in
:func:`sparsejax.train.schema.experiment_schema`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

import sparsejax
from sparsejax.train import experiment_config, schema

# A setup's choices for the methods' keywords; each method takes the ones it has.
# GSE's growth fraction 0.15 starts its cosine at 0.3, RigL's drop fraction.
SPARSE_DEFAULTS = {"sparsity": 0.9, "distribution": "erk", "update_every": 100,
                   "drop_fraction": 0.3, "growth_fraction": 0.15, "alpha": 5e-4}


def methods() -> tuple[str, ...]:
  """"dense" and every registered method."""
  return ("dense", *sorted(sparsejax.METHODS))


def parse_arg(arg: str | None, models: Sequence[str], default_method: str = "rigl"
              ) -> tuple[str, str]:
  """``"method[,model]"`` → ``(method, model)``; the first model is the default.

  Raises:
    ValueError: for an unknown method or model (one line, listing the choices).
  """
  method, _, model = (arg or default_method).partition(",")
  model = model or models[0]
  if method not in methods():
    raise ValueError(f"unknown method {method!r} in the config argument; expected one of "
                     f"{list(methods())}")
  if model not in models:
    raise ValueError(f"unknown model {model!r} in the config argument; expected one of "
                     f"{list(models)}")
  return method, model


def sparse_config(method: str, **choices) -> ml_collections.ConfigDict:
  """The ``sparse`` section of ``method``: its keywords, with the setup's choices.

  Args:
    method: "dense" or a registered method.
    **choices: values overriding :data:`SPARSE_DEFAULTS`; a method takes those of its
      keywords (DST has no target sparsity: its ``alpha`` decides it).

  Returns:
    The method's locked section; ``end_step = -1`` stands for
    ``config.sparse_end_fraction`` of training.
  """
  return experiment_config.method_section(method, {**SPARSE_DEFAULTS, **choices})


def optimizer_config(learning_rate: float, **keys) -> ml_collections.ConfigDict:
  """The ``optimizer`` section: the schema's defaults (SGD, momentum 0.9), ``keys`` set."""
  optimizer = schema.experiment_schema().optimizer
  optimizer.update(learning_rate=learning_rate, **keys)
  return optimizer


def base_config(dataset: str, model: str, *, augment: bool,
                sparse: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict,
                batch_size: int, num_epochs: int, normalize: bool = True
                ) -> ml_collections.ConfigDict:
  """A whole experiment config: the schema with this setup's values.

  Inputs are standardised per channel unless ``normalize=False``, augmented or not.
  """
  config = schema.experiment_schema(sparse)
  config.data.update(dataset=dataset, crop_padding=4 if augment else 0, flip=augment,
                     normalize=normalize)
  config.model = model
  config.optimizer = optimizer
  config.num_epochs = num_epochs
  config.batch_size = batch_size
  return config
