r"""Sparse training of LeNet-300-100 (or LeNet-5-Caffe) on Fashion-MNIST.

The argument is ``method[,model]``: ``dense``, ``static``, ``set``, ``rigl`` (default),
``gmp``, ``dst`` (or any other sparsejax method); ``lenet300100`` (default) or ``lenet5``.
Run from the repository root:

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl \
      --workdir=runs/fmnist/rigl

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl,lenet5 \
      --config.sparse.sparsity=0.95 --config.num_epochs=2

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --methods=dense,static,set,rigl,gmp --workdir=runs/fmnist

SGD with momentum 0.9, learning rate 0.02, batch 128, 10 epochs, 90 % sparsity (ERK),
masks updated every 100 steps until 75 % of training.

``dst`` (Liu et al., ICLR 2020) has no target sparsity: ``sparse.alpha`` sets how hard
its thresholds are pushed up (larger → sparser), and it uses the DST paper's MNIST
settings: SGD 0.9, constant learning rate 0.01, batch 64, 20 epochs, no weight decay.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

MODELS = ("lenet300100", "lenet5")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"`` (default "rigl,lenet300100")."""
  method, model = common.parse_arg(arg, MODELS)
  if method == "dst":  # the DST paper's MNIST optimisation
    optimizer, batch_size, num_epochs = common.optimizer_config(0.01), 64, 20
  else:
    optimizer, batch_size, num_epochs = common.optimizer_config(0.02), 128, 10
  return common.base_config("fashion_mnist", model, augment=False,
                            sparse=common.sparse_config(method), optimizer=optimizer,
                            batch_size=batch_size, num_epochs=num_epochs)
