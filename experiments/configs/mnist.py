r"""The DST paper's MNIST setting (Liu et al., ICLR 2020) for every method.

LeNet-300-100 (default) or LeNet-5-Caffe; SGD with momentum 0.9, constant learning
rate 0.01, batch 64, 20 epochs, no weight decay, no augmentation. DST's α = 5e-4.
Inputs are [0, 1] pixels, not standardised: the DST code feeds ``transforms.ToTensor()``
alone (``mnist/train.py``), and its thresholds are tuned for weights trained on them.
The MNIST IDX files are read from ``--config.data.data_dir`` or ``$SPARSEJAX_DATA_DIR``.

  python -m experiments.train --config=experiments/configs/mnist.py:dst \
      --config.data.data_dir=/path/to/mnist --workdir=runs/mnist/dst

  python -m experiments.train --config=experiments/configs/mnist.py:rigl,lenet5
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

MODELS = ("lenet300100", "lenet5")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"`` (default "dst,lenet300100")."""
  method, model = common.parse_arg(arg, MODELS, default_method="dst")
  return common.base_config("mnist", model, augment=False,
                            sparse=common.sparse_config(method, alpha=5e-4),
                            optimizer=common.optimizer_config(0.01), batch_size=64,
                            num_epochs=20, normalize=False)
