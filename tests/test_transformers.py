"""Transformers: default masking by Flax's leaf names, DST per output unit, FLOPs of every kernel.

A two-block-style Flax transformer (``nn.Embed``, ``nn.MultiHeadDotProductAttention``,
``nn.LayerNorm``, ``nn.Dense``) in linen and in nnx.
"""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.masks import leaf_names
from sparsejax.methods.dst import threshold_grad
from sparsejax.train import flops

VOCAB, D, HEADS, MLP, SEQ = 11, 16, 2, 32, 5


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(nn.LayerNorm()(x))
    h = nn.Dense(MLP)(nn.LayerNorm()(x))
    return x + nn.Dense(D)(nn.gelu(h))


class LinenTransformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    x = LinenBlock(name="block_0")(x)
    x = LinenBlock(name="block_1")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm1, self.norm2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.up, self.down = nnx.Linear(D, MLP, rngs=rngs), nnx.Linear(MLP, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NnxTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


TOKENS = jnp.arange(2 * SEQ).reshape(2, SEQ) % VOCAB


@pytest.fixture(scope="module")
def linen_params():
  return LinenTransformer().init(jax.random.PRNGKey(0), TOKENS)["params"]


@pytest.fixture(scope="module")
def nnx_model():
  return NnxTransformer(nnx.Rngs(0))


def assert_only_kernels_masked(params, masks):
  names = leaf_names(params)
  flags = [m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)]
  assert len(names) == len(flags)
  for name, masked in zip(names, flags):
    assert masked == name.endswith("/kernel"), name
  assert sum(flags) == 2 * 6 + 1  # per block q, k, v, out, two MLP kernels; the head


def test_linen_transformer_masks_kernels_only(linen_params):
  tx = sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=100)
  state = tx.init(linen_params)
  assert_only_kernels_masked(linen_params, sj.masks(state))
  assert sj.masks(state)["block_0"]["attention"]["query"]["bias"] is None  # [heads, head_dim]
  assert sj.masks(state)["Embed_0"]["embedding"] is None
  flipped = sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=100,
                    dense=sj.keep_non_weights_dense).init(linen_params)
  assert sj.masks(flipped)["Embed_0"]["embedding"] is not None


def test_nnx_transformer_masks_kernels_only(nnx_model):
  params = nnx.state(nnx_model, nnx.Param)
  optimizer = nnx.Optimizer(nnx_model, sj.static_sparse(optax.adam(1e-3), sparsity=0.9),
                            wrt=nnx.Param)
  assert_only_kernels_masked(nnx.to_pure_dict(params), sj.masks(optimizer.opt_state))


def test_dst_thresholds_per_output_unit_of_attention_kernels(linen_params, nnx_model):
  for params in (linen_params, nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))):
    thresholds = sj.thresholds(sj.dst(optax.sgd(0.1)).init(params))
    attention = (thresholds["block_0"] if "block_0" in thresholds
                 else thresholds["blocks"][0])["attention"]
    for name in ("query", "key", "value"):
      assert attention[name]["kernel"].shape == (HEADS, D // HEADS)
      assert attention[name]["bias"] is None
    assert attention["out"]["kernel"].shape == (D,)
  custom = sj.dst(optax.sgd(0.1), output_axes=lambda path, leaf: leaf.ndim - 1)
  assert sj.thresholds(custom.init(linen_params))["block_0"]["attention"]["out"][
      "kernel"].shape == (D // HEADS, D)
  with pytest.raises(ValueError, match="output_axes of"):
    sj.dst(optax.sgd(0.1), output_axes=lambda path, leaf: leaf.ndim).init(linen_params)


def test_threshold_gradient_of_a_3d_kernel_by_hand():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 2, 4)).astype(np.float32)
  g = rng.normal(size=(3, 2, 4)).astype(np.float32)
  t = np.full((2, 4), 0.5, np.float32)
  expected = np.zeros((2, 4), np.float64)
  for h in range(2):
    for d in range(4):
      for i in range(3):
        x = abs(w[i, h, d]) - t[h, d]
        estimator = 2 - 4 * abs(x) if abs(x) <= 0.4 else (0.4 if abs(x) <= 1 else 0.0)
        expected[h, d] -= g[i, h, d] * w[i, h, d] * estimator
      expected[h, d] -= 1e-2 * np.exp(-t[h, d])
  np.testing.assert_allclose(threshold_grad(g, w, t, 1e-2), expected, rtol=1e-5, atol=1e-6)


def test_dst_keeps_a_zero_initialised_attention_bias_trainable(linen_params):
  tx = sj.dst(optax.sgd(0.1), alpha=1e-2)
  state = tx.init(linen_params)
  grads = jax.tree.map(jnp.ones_like, linen_params)
  updates, state = tx.update(grads, state, linen_params)
  params = optax.apply_updates(linen_params, updates)
  bias = params["block_0"]["attention"]["query"]["bias"]
  np.testing.assert_allclose(bias, -0.1)  # trained like any dense leaf, never masked
  assert sj.masks(state)["block_0"]["attention"]["query"]["bias"] is None


def one_block_forward_flops():
  """Per example, by hand: every kernel's multiply-adds at its SEQ positions, × 2."""
  per_token = 4 * D * D + D * MLP + MLP * D  # q, k, v, out; the MLP
  return 2 * SEQ * per_token


class OneBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return LinenBlock(name="block")(x)


def test_flops_of_a_one_block_transformer_by_hand(nnx_model):
  x = jnp.ones((1, SEQ, D))
  model = OneBlock()
  variables = model.init(jax.random.PRNGKey(0), x)
  positions = flops.kernel_positions(model, variables, x)
  assert set(positions) == {f"block/attention/{n}/kernel" for n in ("query", "key", "value",
                                                                   "out")} | {
      "block/Dense_0/kernel", "block/Dense_1/kernel"}
  assert set(positions.values()) == {SEQ}
  _, dense = flops.forward_flops(variables["params"], None, positions)
  assert dense == one_block_forward_flops()
  block = NnxBlock(nnx.Rngs(0))
  nnx_positions = flops.nnx_kernel_positions(block, x)
  params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
  assert set(nnx_positions) == {f"attention/{n}/kernel" for n in ("query", "key", "value",
                                                                 "out")} | {
      "up/kernel", "down/kernel"}
  _, nnx_dense = flops.forward_flops(params, None, nnx_positions)
  assert nnx_dense == one_block_forward_flops()
  # Sparse: half of every kernel's weights.
  masks = jax.tree.map(lambda p: np.arange(p.size).reshape(p.shape) % 2 == 0 if p.ndim > 1
                       else None, variables["params"])
  sparse, _ = flops.forward_flops(variables["params"], masks, positions)
  assert float(sparse) == one_block_forward_flops() / 2


@pytest.mark.parametrize("distribution", ["er", "erk"])
def test_er_and_erk_see_attention_projections_as_matrices(distribution):
  from sparsejax.distributions import allocate_nnz_by_name

  names = ["attention/query/kernel", "attention/out/kernel", "Dense_0/kernel", "conv/kernel"]
  shapes = [(64, 4, 16), (4, 16, 64), (64, 64), (3, 3, 64)]
  counts = allocate_nnz_by_name(names, shapes, 0.9, distribution)
  # All three are 64 × 64 matrices: equal shares, up to the largest-remainder rounding.
  assert max(counts[:3]) - min(counts[:3]) <= 1
  assert sum(counts) == round(0.1 * sum(np.prod(s) for s in shapes))
  # Unsplit, the query kernel would count as [4, 16] (ER) or a 3-D conv (ERK).
  unsplit = allocate_nnz_by_name(["q", "Dense_0/kernel"], [(64, 4, 16), (64, 64)], 0.9,
                                 distribution)
  assert abs(unsplit[0] - unsplit[1]) > 1
