"""The models the benchmarks time: fully connected ReLU networks and a GPT-style decoder.

Shared by ``overhead.py`` (step time against dense), ``compile.py`` (time to the first
step against the leaf count) and ``scaling.py`` (data-parallel step time).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB, D_MODEL, HEADS, MLP_WIDTH = 512, 128, 4, 512
SEQ = 64


class MLP(nn.Module):
  """Fully connected ReLU network; the last entry of ``features`` is the logits width."""
  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a gelu MLP."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D_MODEL)(h, mask=mask)
    h = nn.Dense(MLP_WIDTH)(nn.LayerNorm()(x))
    return x + nn.Dense(D_MODEL)(nn.gelu(h))


class GPT(nn.Module):
  """Decoder-only transformer mapping tokens ``[batch, seq]`` to logits ``[batch, seq, vocab]``.

  Token embedding (vocab 512), a learned positional embedding, ``blocks`` pre-LayerNorm
  blocks (causal 4-head attention with d_model 128, then an MLP 128-512-128 with gelu),
  a final LayerNorm and a Dense head to the vocab. A block has 16 leaves, 6 of them
  kernels.
  """
  blocks: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (SEQ, D_MODEL))
    x = nn.Embed(VOCAB, D_MODEL)(tokens) + pos[:tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.blocks):
      x = Block()(x, mask)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def next_token_batch(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """One random batch of ``batch`` sequences of :data:`SEQ` tokens and their next tokens.

  Returns:
    ``(inputs, targets)``, both int32 ``[batch, SEQ]``.
  """
  tokens = jax.random.randint(key, (batch, SEQ + 1), 0, VOCAB, jnp.int32)
  return tokens[:, :-1], tokens[:, 1:]
