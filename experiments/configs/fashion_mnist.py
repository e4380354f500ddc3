r"""Sparse training of LeNet-300-100 (or LeNet-5-Caffe) on Fashion-MNIST.

The argument is a method, optionally followed by a model: ``dense``, ``static``,
``set``, ``rigl`` (default), ``gmp`` or ``dst``; ``lenet300100`` (default) or ``lenet5``.

Run from the repository root:

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl,lenet5 \
      --config.sparse.sparsity=0.95 --config.num_epochs=2

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --methods=dense,static,set,rigl,gmp

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:dst \
      --config.sparse.alpha=1e-3 --workdir=/tmp/dst

``sparse.end_step = -1`` stands for 75 % of the training steps.

``dst`` (Liu et al., ICLR 2020) has no target sparsity: its thresholds are trained and
``sparse.alpha`` sets how hard they are pushed up (larger → sparser). It uses the DST
paper's MNIST settings for the whole run: SGD with momentum 0.9, constant learning rate
0.01, batch size 64, 20 epochs, no weight decay; the dense baseline that
``experiments.train`` adds runs with the same settings. The paper needs ~60 epochs
(``--config.num_epochs=60``) to reach its ~2.5 % remaining weights on MNIST.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

METHODS = ("dense", "static", "set", "rigl", "gmp", "dst")
MODELS = ("lenet300100", "lenet5")


def sparse_config(method: str) -> ml_collections.ConfigDict:
  """The ``sparse`` section of ``method``, with exactly the keywords it takes."""
  if method == "dense":
    return ml_collections.ConfigDict({"method": "dense"})
  if method == "dst":  # no target sparsity: the trained thresholds decide it
    return ml_collections.ConfigDict({"method": "dst", "alpha": 5e-4, "recovery_density": 0.01})
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


def use_dst_paper_settings(config: ml_collections.ConfigDict) -> None:
  """Sets the DST paper's MNIST optimisation: SGD 0.9, lr 0.01 constant, batch 64, 20 epochs.

  Args:
    config: the config to modify in place (no weight decay: the runner has none).
  """
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.01
  config.batch_size = 64
  config.num_epochs = 20


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"``.

  Args:
    arg: e.g. "rigl", "gmp,lenet5", "dst"; None means "rigl".

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
  if method == "dst":
    use_dst_paper_settings(config)
  return config
