"""Flax models of sparse training: LeNets and a ViT (MNIST), VGG / ResNet / WRN / ViT (CIFAR).

Every model is called as ``model.apply(variables, x, train=False)``. The CIFAR models have
BatchNorm (PyTorch's defaults: momentum 0.1, i.e. Flax ``momentum=0.9``, epsilon 1e-5), so a train
step calls ``model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])``.
All weights are ``kernel`` leaves (``nn.Conv`` [kh, kw, c_in, c_out], ``nn.Dense`` [n_in, n_out],
the ViT's attention projections), which sparsejax masks by default. A convolution or dense
layer followed by BatchNorm has no bias: BatchNorm subtracts it again, so its gradient is
exactly 0 in training.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import distributions
import sparsejax.nn as sjnn

# PyTorch's ``kaiming_normal_`` (untruncated normal, gain sqrt(2)), in the two modes the papers use.
_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""VGG-16's conv widths as in DST's code; "M" is a 2x2 max-pool."""


def _batch_norm(train: bool, scale: float = 1.0) -> nn.BatchNorm:
  """A BatchNorm layer with PyTorch's defaults and initial scale ``scale``."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.constant(scale))


def _conv3x3(features: int, strides: int = 1, **kwargs) -> nn.Conv:
  """A bias-free 3x3 convolution padded by 1 on each side, as PyTorch's ``padding=1``.

  Unlike ``"SAME"``, this keeps PyTorch's alignment for stride 2 (outputs at even positions).
  """
  return nn.Conv(features, (3, 3), strides=strides, padding=1, use_bias=False, **kwargs)


class LeNet300100(nn.Module):
  """LeNet-300-100: a 300-100-10 MLP with ReLUs on the flattened input."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
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
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    x = nn.Conv(20, (5, 5), padding="VALID")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(50, (5, 5), padding="VALID")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500)(x))
    return nn.Dense(self.num_classes)(x)


class VGG(nn.Module):
  """VGG for CIFAR: 3x3 conv-BN-ReLU layers and 2x2 max-pools, global average pool, MLP head.

  The defaults are DST's VGG-16 (``cifar/models/vgg.py`` and ``masked_vgg.py`` of
  github.com/junjieliu2910/DynamicSparseTraining): no max-pool after the last block but a 2x2
  average pool, head dense 512-BN-ReLU-dense, conv BatchNorm scales initialised to 0.5. Its
  dense layer before BatchNorm has no bias here (the official code has one, 512 dead parameters):
  14,987,210 parameters for 10 classes. Kernels keep Flax's default (fan-in) init, like the
  PyTorch default of DST's masked layers.

  Attributes:
    num_classes: size of the output layer.
    cfg: conv widths in order, "M" for a 2x2 max-pool.
    width_divisor: every conv width in ``cfg`` is divided by it.
    head: widths of the hidden dense layers, each followed by (BatchNorm and) ReLU.
    head_batch_norm: whether a BatchNorm follows each hidden dense layer.
    conv_bn_scale: initial scale of the BatchNorm layers after the convolutions.
  """
  num_classes: int = 10
  cfg: tuple[int | str, ...] = VGG16_CFG
  width_divisor: int = 1
  head: tuple[int, ...] = (512,)
  head_batch_norm: bool = True
  conv_bn_scale: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for v in self.cfg:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = _conv3x3(v // self.width_divisor)(x)
        x = nn.relu(_batch_norm(train, self.conv_bn_scale)(x))
    x = jnp.mean(x, axis=(1, 2))
    for features in self.head:
      x = nn.Dense(features, use_bias=not self.head_batch_norm)(x)
      x = nn.relu(_batch_norm(train)(x) if self.head_batch_norm else x)
    return nn.Dense(self.num_classes)(x)


def _stages(x: jax.Array, block: Callable[..., nn.Module], widths: tuple[int, ...],
            num_blocks: int, train: bool) -> jax.Array:
  """``num_blocks`` blocks per width; each stage after the first starts with stride 2."""
  for i, features in enumerate(widths):
    for j in range(num_blocks):
      x = block(features, strides=2 if i > 0 and j == 0 else 1)(x, train)
  return x


class _BasicBlock(nn.Module):
  """He et al.'s post-activation basic block with the option-A (zero-padding) shortcut."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv3x3(self.features, self.strides, kernel_init=_kaiming_fan_in)(x)
    y = nn.relu(_batch_norm(train)(y))
    y = _batch_norm(train)(_conv3x3(self.features, kernel_init=_kaiming_fan_in)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = x[:, ::self.strides, ::self.strides]
      pad = self.features - x.shape[-1]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet-(6n+2) of He et al. (2016): 3 stages of n basic blocks, 16/32/64 channels.

  As in GSE's code (``models/resnet_cifar.py`` of github.com/mikeheddes/guided-stochastic-
  exploration, from akamaster/pytorch_resnet_cifar10): option-A identity shortcuts (strided,
  zero-padded channels, no parameters) and PyTorch ``kaiming_normal_`` (fan_in) for conv and dense
  kernels.
  ResNet-56 has 853,018 parameters for 10 classes.

  Attributes:
    num_classes: size of the output layer.
    depth: 6n + 2 layers.
  """
  num_classes: int = 10
  depth: int = 56

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6:
      raise ValueError(f"ResNet depth must be 6n + 2, got {self.depth}")
    x = nn.relu(_batch_norm(train)(_conv3x3(16, kernel_init=_kaiming_fan_in)(x)))
    x = _stages(x, _BasicBlock, (16, 32, 64), (self.depth - 2) // 6, train)
    return nn.Dense(self.num_classes, kernel_init=_kaiming_fan_in)(jnp.mean(x, axis=(1, 2)))


class _WideBlock(nn.Module):
  """Pre-activation (BN-ReLU-conv) wide block; a 1x1 conv shortcut when the shape changes."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(_batch_norm(train)(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False,
                  kernel_init=_kaiming_fan_out, name="shortcut")(y)
    y = _conv3x3(self.features, self.strides, kernel_init=_kaiming_fan_out)(y)
    y = nn.relu(_batch_norm(train)(y))
    return x + _conv3x3(self.features, kernel_init=_kaiming_fan_out)(y)


class WideResNet(nn.Module):
  """WRN-depth-width of Zagoruyko & Komodakis (2016) for CIFAR, without dropout.

  As in DST's code (``cifar/models/wideresnet.py`` of github.com/junjieliu2910/
  DynamicSparseTraining): conv 16, 3 stages of (depth - 4) / 6 pre-activation blocks with
  16k/32k/64k channels, BN-ReLU, global average pool, dense; PyTorch ``kaiming_normal_`` (fan_out)
  for conv kernels. WRN-16-8 has 10,961,370 and WRN-28-8 23,354,842 parameters for 10 classes.

  Attributes:
    num_classes: size of the output layer.
    depth: 6n + 4 layers.
    width: the widening factor k.
  """
  num_classes: int = 10
  depth: int = 28
  width: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
    x = _conv3x3(16, kernel_init=_kaiming_fan_out)(x)
    widths = (16 * self.width, 32 * self.width, 64 * self.width)
    x = _stages(x, _WideBlock, widths, (self.depth - 4) // 6, train)
    x = nn.relu(_batch_norm(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class _EncoderBlock(nn.Module):
  """A pre-LayerNorm transformer block: self-attention, then a GELU MLP, each residual."""
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(
        nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1], name="mlp_out")(h)


class ViT(nn.Module):
  """A Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned
  positional embedding, pre-LayerNorm blocks, a linear head on the class token.

  The patch embedding is a ``patch × patch`` convolution with stride ``patch``; no
  dropout.
  """
  num_classes: int = 10
  patch: int = 7
  width: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="patch_embedding")(x)
    x = x.reshape((x.shape[0], -1, self.width))
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    for i in range(self.depth):
      x = _EncoderBlock(self.heads, self.mlp_dim, name=f"block_{i}")(x)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm()(x[:, 0]))


def _layer_norm() -> nn.LayerNorm:
  """A LayerNorm with PyTorch's epsilon."""
  return nn.LayerNorm(epsilon=1e-5)


def _posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """lucidrains' fixed 2-D sin-cos position embedding of an h × w token grid: [h * w, dim]."""
  y, x = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  omega = 1.0 / temperature ** (jnp.arange(dim // 4) / (dim // 4 - 1))
  y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class _SimpleViTBlock(nn.Module):
  """SimpleViT's block: x + attention (bias-free ``to_qkv``, ``to_out``), x + GELU MLP."""
  heads: int
  dim_head: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    qkv = nn.Dense(3 * self.heads * self.dim_head, use_bias=False, name="to_qkv")(
        _layer_norm()(x))
    q, k, v = (t.reshape(*t.shape[:-1], self.heads, self.dim_head)
               for t in jnp.split(qkv, 3, axis=-1))
    out = nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
    out = out.reshape(*x.shape[:-1], -1)  # heads merged: [..., heads * dim_head]
    x = x + nn.Dense(x.shape[-1], use_bias=False, name="to_out")(out)
    h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(_layer_norm()(x)), approximate=False)
    return x + nn.Dense(x.shape[-1], name="mlp_out")(h)


class SimpleViT(nn.Module):
  """lucidrains' SimpleViT (Beyer et al. 2022), by default GSE's "simple-vit-tiny" for CIFAR.

  As in GSE's code (``models/simple_vit.py`` of the repository above): 4 × 4 patches (64 for
  32 × 32 images) flattened in (row, column, channel) order, LayerNorm-dense-LayerNorm patch
  embedding plus a fixed 2-D sin-cos position embedding (not a parameter), 4 pre-LayerNorm
  blocks of width 512 with 6 heads of 64 and an MLP of 256, mean pooling, then LayerNorm and a
  dense head (GSE's copy normalises the pooled vector, not the tokens before pooling as later
  SimpleViTs do); LayerNorm epsilon 1e-5, exact GELU, no class token or dropout. Kernels keep
  Flax's default init. 4,237,930 parameters for 10 classes.

  Attributes:
    num_classes: size of the output layer.
    patch: patch side.
    width: token width.
    depth: number of blocks.
    heads: attention heads.
    dim_head: width of each head.
    mlp_dim: hidden width of the MLPs.
  """
  num_classes: int = 10
  patch: int = 4
  width: int = 512
  depth: int = 4
  heads: int = 6
  dim_head: int = 64
  mlp_dim: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    b, p, c = x.shape[0], self.patch, x.shape[-1]
    h, w = x.shape[1] // p, x.shape[2] // p
    x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
    x = nn.Dense(self.width, name="patch_embedding")(_layer_norm()(x))
    x = _layer_norm()(x)
    x = x + _posemb_sincos_2d(h, w, self.width).astype(x.dtype)
    for i in range(self.depth):
      x = _SimpleViTBlock(self.heads, self.dim_head, self.mlp_dim, name=f"block_{i}")(x)
    return nn.Dense(self.num_classes, name="head")(_layer_norm()(jnp.mean(x, axis=1)))


class SparseMLP(nn.Module):
  """An MLP of always-sparse layers (:class:`sparsejax.nn.SparseDense`), ReLUs between them.

  Every layer is sparse, the first and last included (GSE's rule); ``sparsity`` is
  the fraction of absent weights over all of them, split between layers by
  ``distribution`` (ER by default) with the exact total count.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (1024, 1024)
  sparsity: float = 0.99
  distribution: str = "er"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    x = x.reshape((x.shape[0], -1))
    sizes = (x.shape[-1], *self.widths, self.num_classes)
    shapes = list(zip(sizes[:-1], sizes[1:]))
    counts = distributions.allocate_nnz(shapes, self.sparsity, self.distribution)
    for i, ((fan_in, fan_out), nnz) in enumerate(zip(shapes, counts)):
      x = sjnn.SparseDense(fan_out, sparsity=1.0 - nnz / (fan_in * fan_out))(x)
      if i < len(shapes) - 1:
        x = nn.relu(x)
    return x


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300100": LeNet300100,
    "lenet5": LeNet5Caffe,
    "vgg16": VGG,
    # GSE's "vgg16-small" (models/vgg_cifar.py of the repository above): conv widths / 4, a
    # max-pool after the last block, head 512-ReLU-512-ReLU, BN scale 1. Its conv biases before
    # BatchNorm (1,056 dead parameters) and its head dropout (p=0.5) are left out.
    "vgg16_quarter": functools.partial(VGG, cfg=VGG16_CFG + ("M",), width_divisor=4,
                                       head=(512, 512), head_batch_norm=False, conv_bn_scale=1.0),
    "resnet56": functools.partial(ResNet, depth=56),
    "wrn16_8": functools.partial(WideResNet, depth=16, width=8),
    "wrn28_8": functools.partial(WideResNet, depth=28, width=8),
    # For [N, 28, 28, 1] images: 16 patches of 7×7, width 64, 4 blocks of 4 heads.
    "vit": ViT,
    # For [N, 32, 32, 3] images: GSE's simple-vit-tiny, the defaults of SimpleViT.
    "vit_tiny": SimpleViT,
    # Always-sparse MLPs (sparsejax.nn), for the always_* methods; sparsity from config.sparse.
    "sparse_mlp": SparseMLP,
    # Two hidden layers of 32,768: 1.10e9 weights, whose dense training state (weights,
    # gradients and momenta in float32) is 13 GB.
    "wide_sparse_mlp": functools.partial(SparseMLP, widths=(32768, 32768)),
}
ALWAYS_SPARSE_MODELS = ("sparse_mlp", "wide_sparse_mlp")


def get_model(name: str, num_classes: int = 10, sparse: Any = None) -> nn.Module:
  """The model called ``name``.

  Args:
    name: one of ``MODELS``: "lenet300100", "lenet5" and "vit" for [N, 28, 28, 1] images; "vgg16",
      "vgg16_quarter", "resnet56", "wrn16_8", "wrn28_8" and "vit_tiny" for [N, 32, 32, 3] images;
      "sparse_mlp" and "wide_sparse_mlp" (always-sparse layers) for any images.
    num_classes: size of the output layer.
    sparse: the ``config.sparse`` section; the always-sparse models take its
      ``sparsity`` and ``distribution``.

  Returns:
    An unbound ``flax.linen`` module mapping images to [N, num_classes] logits, called as
    ``model.apply(variables, x, train=False)``.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
  if name in ALWAYS_SPARSE_MODELS:
    if not sparse or sparse.get("sparsity") is None:
      raise ValueError(f"model {name!r} has always-sparse layers: use an always-sparse method "
                       f"(always_gse, always_rigl, always_set) with a sparsity")
    return MODELS[name](num_classes=num_classes, sparsity=sparse["sparsity"],
                        distribution=sparse.get("distribution", "er"))
  return MODELS[name](num_classes=num_classes)
