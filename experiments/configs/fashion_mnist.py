r"""Sparse training of LeNet-300-100 (or LeNet-5-Caffe, or a small ViT) on Fashion-MNIST.

The argument is ``method[,model]``: ``dense``, ``static``, ``set``, ``rigl`` (default),
``dst_ee``, ``gse``, ``gmp``, ``dst`` (or any other sparsejax method); ``lenet300100``
(default), ``lenet5`` or ``vit``.
Run from the repository root:

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl \
      --workdir=runs/fmnist/rigl

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl,lenet5 \
      --config.sparse.sparsity=0.95 --config.num_epochs=2

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --methods=dense,static,set,rigl,gmp --workdir=runs/fmnist

SGD with momentum 0.9, learning rate 0.02, batch 128, 10 epochs, 90 % sparsity (ERK),
masks updated every 100 steps until 75 % of training, drop fraction 0.3 (SET, RigL and
DST-EE alike, so that DST-EE differs from RigL only by its exploration bonus, c = 1e-2
by default: ``--config.sparse.c=0.1``); GSE's growth fraction 0.15 starts its cosine at
the same 0.3 (``--config.sparse.sampling=grabo`` for guided sampling).

``dst`` (Liu et al., ICLR 2020) has no target sparsity: ``sparse.alpha`` sets how hard
its thresholds are pushed up (larger → sparser), and it uses the DST paper's MNIST
settings: SGD 0.9, constant learning rate 0.01, batch 64, 20 epochs, no weight decay.

``always_gse``, ``always_rigl`` and ``always_set`` train always-sparse MLPs
(:mod:`sparsejax.nn`: the params are the active weights only): ``sparse_mlp``
(784-1024-1024-10, 99 % sparse, the default for these methods) or
``wide_sparse_mlp`` (784-32768-32768-10, 99.9 % sparse: 1.1 million of 1.1 billion
weights; its dense training state would take 13 GB), every layer sparse with ER
densities, with the setup's optimizer::

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:always_gse,wide_sparse_mlp \
      --workdir=runs/fmnist/wide

``vit`` (16 patches of 7×7, width 64, 4 blocks of 4 heads) trains every method, DST
included, with SGD 0.9, learning rate 0.05 after a 1-epoch warm-up and cosine-decayed
to 0, batch 128, 10 epochs; DST's α = 1e-3.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common
from sparsejax.train.always_sparse import is_always_sparse

MODELS = ("lenet300100", "lenet5", "vit", "sparse_mlp", "wide_sparse_mlp")
# Always-sparse models (sparsejax.nn layers, the always_* methods): their default sparsity.
ALWAYS_SPARSE_SPARSITY = {"sparse_mlp": 0.99, "wide_sparse_mlp": 0.999}
VIT_LEARNING_RATE = 0.05
VIT_ALPHA = 1e-3  # DST's regulariser for the ViT: about 90 % sparse after 10 epochs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for ``arg = "method[,model]"`` (default "rigl,lenet300100")."""
  method, model = common.parse_arg(arg, MODELS)
  if is_always_sparse(method) and "," not in (arg or ""):
    model = "sparse_mlp"
  if model in ALWAYS_SPARSE_SPARSITY:  # every layer sparse, ER, as GSE
    sparse = common.sparse_config(method, sparsity=ALWAYS_SPARSE_SPARSITY[model],
                                  distribution="er")
    return common.base_config("fashion_mnist", model, augment=False, sparse=sparse,
                              optimizer=common.optimizer_config(0.02), batch_size=128,
                              num_epochs=10)
  if model == "vit":  # every method, DST included: SGD with a warm-up and a cosine decay
    optimizer = common.optimizer_config(VIT_LEARNING_RATE, schedule="cosine", warmup_epochs=1)
    return common.base_config("fashion_mnist", model, augment=False,
                              sparse=common.sparse_config(method, alpha=VIT_ALPHA),
                              optimizer=optimizer, batch_size=128, num_epochs=10)
  if method == "dst":  # the DST paper's MNIST optimisation
    optimizer, batch_size, num_epochs = common.optimizer_config(0.01), 64, 20
  else:
    optimizer, batch_size, num_epochs = common.optimizer_config(0.02), 128, 10
  return common.base_config("fashion_mnist", model, augment=False,
                            sparse=common.sparse_config(method), optimizer=optimizer,
                            batch_size=batch_size, num_epochs=num_epochs)
