r"""CIFAR-10 with the DST and GSE papers' models and settings (see ``cifar.py``).

  python -m experiments.train --config=experiments/configs/cifar10.py:rigl,wrn16_8 \
      --workdir=runs/cifar10/rigl

Models: vgg16, wrn16_8, wrn28_8 (DST), resnet56, vgg16_quarter (GSE); data through
tensorflow-datasets (``pip install 'sparsejax[tfds]'``; prepared data is read with
``tfds.data_source``, ``--config.data.download=true`` lets tfds fetch it).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.cifar import cifar_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"`` (default "rigl,vgg16")."""
  return cifar_config(arg, "cifar10")
