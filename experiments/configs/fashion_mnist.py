r"""Sparse training of LeNet-300-100 (or LeNet-5-Caffe) on Fashion-MNIST.

The argument is a method, optionally followed by a model: ``dense``, ``static``,
``set``, ``rigl`` (default) or ``gmp``; ``lenet300100`` (default) or ``lenet5``.

Run from the repository root:

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl,lenet5 \
      --config.sparse.sparsity=0.95 --config.num_epochs=2

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --methods=dense,static,set,rigl,gmp

``sparse.end_step = -1`` stands for 75 % of the training steps.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

METHODS = ("dense", "static", "set", "rigl", "gmp")
MODELS = ("lenet300100", "lenet5")


def sparse_config(method: str) -> ml_collections.ConfigDict:
  """The ``sparse`` section of ``method``, with exactly the keywords it takes."""
  if method == "dense":
    return ml_collections.ConfigDict({"method": "dense"})
  sparse = ml_collections.ConfigDict({"method": method, "sparsity": 0.9, "distribution": "erk",
                                      "seed": 0})
  if method in ("set", "rigl"):
    sparse.update_every = 100
    sparse.start_step = 0
    sparse.end_step = -1  # 75 % of the training steps
    sparse.drop_fraction = 0.3
  elif method == "gmp":
    sparse.initial_sparsity = 0.0
    sparse.update_every = 100
    sparse.start_step = 0
    sparse.end_step = -1  # 75 % of training, rounded down to a pruning step
  return sparse


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"``.

  Args:
    arg: e.g. "rigl", "gmp,lenet5"; None means "rigl".

  Returns:
    A ``ml_collections.ConfigDict``.
  """
  method, _, model = (arg or "rigl").partition(",")
  model = model or "lenet300100"
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r} in the config argument; expected one of "
                     f"{list(METHODS)}")
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r} in the config argument; expected one of "
                     f"{list(MODELS)}")

  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)  # None: $SPARSEJAX_DATA_DIR or the default
  config.model = model
  config.optimizer = "sgd"
  config.learning_rate = 0.02
  config.momentum = 0.9
  config.batch_size = 128
  config.num_epochs = 10
  config.num_steps = -1  # > 0 overrides num_epochs
  config.eval_batch_size = 1000
  config.seed = 0
  config.sparse = sparse_config(method)
  return config
