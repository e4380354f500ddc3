"""Any Flax model, unchanged: linen with BatchNorm and convs, and flax.nnx's Optimizer."""

from conftest import assert_exactly_sparse, mask_leaves, nnz_per_leaf
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj


class ConvBN(nn.Module):
  """A conv, BatchNorm (its batch_stats are not params) and a dense head."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(3)(x)


def test_linen_model_with_batch_norm_and_conv():
  model = ConvBN()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 2))
  y = jnp.arange(8) % 3
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = sj.rigl(optax.sgd(0.05, momentum=0.9), sparsity=0.8, distribution="erk",
               update_every=2, end_step=10)
  state = tx.init(params)
  targets = nnz_per_leaf(sj.masks(state))
  # The conv kernel [3, 3, 2, 6] and the dense kernel are masked; BN scale/bias are not.
  layers = sj.summary(state)["layers"]
  assert set(layers) == {"Conv_0/kernel", "Dense_0/kernel"}

  @jax.jit
  def step(params, batch_stats, state):
    def loss(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), updates["batch_stats"], state

  for _ in range(5):
    params, batch_stats, state = step(params, batch_stats, state)
    assert_exactly_sparse(params, sj.masks(state))
    assert nnz_per_leaf(sj.masks(state)) == targets
  assert not np.allclose(batch_stats["BatchNorm_0"]["mean"], 0.0)


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(10, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_nnx_optimizer():
  model = NnxMLP(nnx.Rngs(0))
  tx = sj.set(optax.adam(1e-2), sparsity=0.75, distribution="uniform", update_every=2,
              end_step=10)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  y = jnp.arange(16) % 3

  @nnx.jit
  def train_step(model, optimizer):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  summary = sj.summary(optimizer.opt_state)
  assert set(summary["layers"]) == {"hidden/kernel", "out/kernel"}
  assert summary["layers"]["hidden/kernel"]["nnz"] == 40
  before = np.asarray(sj.masks(optimizer.opt_state)["hidden"]["kernel"])
  for _ in range(4):
    train_step(model, optimizer)
    masks = sj.masks(optimizer.opt_state)
    kernel = np.asarray(model.hidden.kernel[...])
    m = np.asarray(masks["hidden"]["kernel"])
    np.testing.assert_array_equal(kernel[~m], 0.0)
    assert m.sum() == 40 and np.asarray(masks["out"]["kernel"]).sum() == 12
    assert masks["norm"]["scale"] is None
  assert not np.array_equal(before, m)  # SET rewired at steps 2 and 4
  assert [x is None for x in mask_leaves(masks)].count(False) == 2
