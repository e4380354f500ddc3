r"""CIFAR-10/100 settings of the DST and GSE papers; ``cifar10.py`` and ``cifar100.py`` use it.

Models and their paper's optimisation (pad-4 random crop + horizontal flip and
per-channel normalisation for all):

- ``vgg16``, ``wrn16_8``, ``wrn28_8`` — DST (Liu et al. 2020): SGD 0.9, learning rate
  0.1 divided by 10 at epochs 80 and 120, 160 epochs, batch 64, weight decay 1e-4;
  DST's α = 5e-6. The RigL-family methods use RigL's schedule (ΔT = 100, drop
  fraction 0.3, masks fixed after 75 % of training, ERK).
- ``resnet56``, ``vgg16_quarter``, ``vit_tiny`` — GSE (Heddes et al. 2024): SGD 0.9,
  learning rate 0.1 (0.01 for ``vit_tiny``, GSE's "CNNs: 0.1, ViT: 0.01") with a 5-epoch
  linear warm-up, divided by 10 at epochs 80 and 120, 200 epochs, batch 128, weight
  decay 1e-4; masks updated every 1,000 steps until epoch 120 with a drop fraction 0.2
  cosine-decayed (``gse``: growth fraction 0.1·(1 + cos), the paper's; its sampling is
  ``--config.sparse.sampling=uniform|grabo|graest``), ER distribution, all kernels
  sparse.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DST_MODELS = ("vgg16", "wrn16_8", "wrn28_8")
GSE_MODELS = ("resnet56", "vgg16_quarter", "vit_tiny")
MODELS = DST_MODELS + GSE_MODELS


def cifar_config(arg: str | None, dataset: str) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"`` (default "rigl,vgg16") on ``dataset``."""
  method, model = common.parse_arg(arg, MODELS)
  if model in DST_MODELS:
    config = common.base_config(
        dataset, model, augment=True, sparse=common.sparse_config(method, alpha=5e-6),
        optimizer=common.optimizer_config(0.1, weight_decay=1e-4, schedule="step",
                                          decay_epochs=(80, 120), decay_factor=0.1),
        batch_size=64, num_epochs=160)
  else:
    config = common.base_config(
        dataset, model, augment=True,
        sparse=common.sparse_config(method, distribution="er", update_every=1000,
                                    drop_fraction=0.2, growth_fraction=0.1, alpha=5e-6),
        optimizer=common.optimizer_config(0.01 if model == "vit_tiny" else 0.1,
                                          weight_decay=1e-4, schedule="step",
                                          decay_epochs=(80, 120), decay_factor=0.1,
                                          warmup_epochs=5),
        batch_size=128, num_epochs=200)
    config.sparse_end_fraction = 120 / 200
  return config
