"""Small Flax models of the sparse-training literature (LeNet-300-100, LeNet-5-Caffe)."""

from __future__ import annotations

import flax.linen as nn
import jax


class LeNet300100(nn.Module):
  """LeNet-300-100: a 300-100-10 MLP with ReLUs on the flattened input."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5Caffe(nn.Module):
  """LeNet-5 as in Caffe: conv 20 5x5, max-pool 2, conv 50 5x5, max-pool 2, dense 500, dense 10.

  No activation after the convolutions, as in Caffe's ``lenet.prototxt``.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(20, (5, 5), padding="VALID")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(50, (5, 5), padding="VALID")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500)(x))
    return nn.Dense(self.num_classes)(x)


MODELS = {"lenet300100": LeNet300100, "lenet5": LeNet5Caffe}


def get_model(name: str, num_classes: int = 10) -> nn.Module:
  """The model called ``name``.

  Args:
    name: one of ``MODELS``: "lenet300100" or "lenet5".
    num_classes: size of the output layer.

  Returns:
    An unbound ``flax.linen`` module mapping [N, 28, 28, 1] images to [N, num_classes] logits.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes)
