"""Every experiment config builds, and every (setup, model) trains a few steps on the CPU.

CIFAR data comes from ``tfds.testing.mock_data`` (random images read through
``tfds.data_source``, no TensorFlow, no download); MNIST from tiny IDX files.
Every method × model pair of every setup is built abstractly (``jax.eval_shape``: no
compilation); each model family trains for real once (a deep CIFAR model compiles for
20–40 s on 2 cores: VGG-16 and WRN-28-8 are the code of vgg16_quarter and WRN-16-8 at
another width and depth), and every method trains on Fashion-MNIST in ``test_train.py``.
"""

import jax
import numpy as np
import pytest

from experiments.configs import cifar, cifar10, cifar100, common, fashion_mnist, mnist
from sparsejax.train import get_model, loop, validate_config
from sparsejax.train.always_sparse import is_always_sparse
from sparsejax.train.models import ALWAYS_SPARSE_MODELS

tfds = pytest.importorskip("tensorflow_datasets")

SETUPS = {"fashion_mnist": (fashion_mnist, fashion_mnist.MODELS),
          "mnist": (mnist, mnist.MODELS),
          "cifar10": (cifar10, cifar.MODELS),
          "cifar100": (cifar100, cifar.MODELS)}


def tiny(config, mnist_dir):
  """The config, trained for 2 steps of batch 4 (and evaluated) on tiny or mock data."""
  config.num_steps = 2
  config.batch_size = config.eval_batch_size = 4
  config.log_every = config.eval_every = config.checkpoint_every = 1
  if config.data.dataset == "mnist":
    config.data.data_dir = str(mnist_dir)
  return config


def mock_cifar():
  return tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("method", common.methods())
def test_every_method_and_model_builds(setup, method, mnist_dir):
  module, models = SETUPS[setup]
  for model in models:
    if (model in ALWAYS_SPARSE_MODELS) != is_always_sparse(method):
      continue  # refused in one line: test_train
    config = tiny(module.get_config(f"{method},{model}"), mnist_dir)
    validate_config(config)
    if is_always_sparse(method):  # its optimizer needs the model's topology
      assert loop.check(config).model == model
      continue
    tx, sparse, _, _ = loop.build_optimizer(config, 50_000)
    assert sparse["method"] == method
    net = get_model(model, 100 if setup == "cifar100" else 10)
    shape = (1, 28, 28, 1) if setup.endswith("mnist") else (1, 32, 32, 3)
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), np.zeros(shape, np.float32))
    jax.eval_shape(tx.init, variables["params"])


@pytest.mark.parametrize("setup,model,method", [
    ("fashion_mnist", "lenet5", "rigl"),
    ("fashion_mnist", "lenet300100", "dst_ee"),
    ("fashion_mnist", "vit", "dst"),
    ("mnist", "lenet300100", "dst"),
    ("mnist", "lenet5", "set"),
    ("cifar10", "wrn16_8", "gmp"),
    ("cifar10", "vgg16_quarter", "rigl"),
    ("cifar100", "resnet56", "dense"),
])
def test_config_trains_a_few_steps(setup, model, method, mnist_dir, tmp_path):
  module, _ = SETUPS[setup]
  config = tiny(module.get_config(f"{method},{model}"), mnist_dir)
  with mock_cifar():
    summary = loop.run(loop.setup(config), tmp_path, show_progress=False)
  assert summary["steps"] == 2 and summary["model"] == model and summary["method"] == method
  assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["test_loss"])


def test_paper_settings():
  dst = fashion_mnist.get_config("dst")
  assert (dst.optimizer.learning_rate, dst.batch_size, dst.num_epochs) == (0.01, 64, 20)
  assert dst.optimizer.momentum == 0.9 and dst.optimizer.weight_decay == 0
  dst_mnist = mnist.get_config("dst,lenet5")
  assert dst_mnist.sparse.alpha == 5e-4 and dst_mnist.batch_size == 64
  vgg = cifar10.get_config("dst,vgg16")
  assert (vgg.batch_size, vgg.num_epochs, vgg.sparse.alpha) == (64, 160, 5e-6)
  assert list(vgg.optimizer.decay_epochs) == [80, 120] and vgg.optimizer.weight_decay == 1e-4
  assert (vgg.data.crop_padding, vgg.data.flip, vgg.data.normalize) == (4, True, True)
  gse = cifar100.get_config("rigl,resnet56")
  assert (gse.batch_size, gse.num_epochs, gse.optimizer.warmup_epochs) == (128, 200, 5)
  assert (gse.sparse.update_every, gse.sparse.distribution, gse.sparse_end_fraction) == (
      1000, "er", 0.6)
  assert gse.data.dataset == "cifar100"


def test_config_argument_errors():
  with pytest.raises(ValueError, match="unknown method 'foo'"):
    cifar10.get_config("foo")
  with pytest.raises(ValueError, match="unknown model 'resnet9'"):
    cifar10.get_config("rigl,resnet9")


def test_cifar_batches_are_standardised_per_channel():
  """(x / 255 − mean) / std per channel, after the crop and flip of the same step."""
  from sparsejax.data import NORMALIZATION, crop_and_flip

  config = cifar10.get_config("static,vgg16")
  config.batch_size = 4
  with mock_cifar():
    pipeline = loop.setup(config).pipeline
  assert pipeline.crop_padding == 4 and pipeline.flip
  raw = pipeline.source.gather(pipeline.indices(3))["image"]
  offsets, flips = pipeline.augmentation(3)
  x = crop_and_flip(raw, offsets, flips, 4).astype(np.float32) / 255.0
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION["cifar10"])
  np.testing.assert_allclose(pipeline.batch(3)["image"], (x - mean) / std, rtol=1e-6, atol=1e-6)
