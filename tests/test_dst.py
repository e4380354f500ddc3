"""DST: the estimator against an independent custom_vjp reference, recovery, flax, convs."""

import functools

import chex
from conftest import make_batch
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.methods.dst import long_tailed_estimator


def test_long_tailed_estimator_values():
  x = jnp.array([0.0, 0.1, -0.4, 0.41, -1.0, 1.01, -3.0])
  np.testing.assert_allclose(long_tailed_estimator(x), [2.0, 1.6, 0.4, 0.4, 0.4, 0.0, 0.0],
                             atol=1e-6)


@jax.custom_vjp
def unit_step(q):
  return (q > 0).astype(q.dtype)


def _step_fwd(q):
  return unit_step(q), q


def _step_bwd(q, g):
  a = jnp.abs(q)
  return (g * jnp.where(a <= 0.4, 2 - 4 * a, jnp.where(a <= 1, 0.4, 0.0)),)


unit_step.defvjp(_step_fwd, _step_bwd)


def mlp_apply(params, x):
  h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def reference_loss(variables, batch, alpha):
  """The DST model written directly: W ⊙ S(|W| − t) in the forward pass, plus α Σ exp(−t)."""
  weights, thresholds = variables
  effective = {
      name: {"kernel": w["kernel"] * unit_step(jnp.abs(w["kernel"]) - thresholds[name]),
             "bias": w["bias"]}
      for name, w in weights.items()}
  logits = mlp_apply(effective, batch[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
  return loss + alpha * sum(jnp.sum(jnp.exp(-t)) for t in thresholds.values())


def effective_weights(weights, thresholds):
  return {name: {"kernel": w["kernel"] * (jnp.abs(w["kernel"]) - thresholds[name] > 0),
                 "bias": w["bias"]} for name, w in weights.items()}


def test_matches_a_custom_vjp_reference_step_by_step():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"l1": {"kernel": 0.5 * jax.random.normal(key1, (20, 16)), "bias": jnp.zeros(16)},
            "l2": {"kernel": 0.5 * jax.random.normal(key2, (16, 4)), "bias": jnp.zeros(4)}}
  lr, alpha = 0.5, 0.1  # large enough that masks change at most steps, no layer collapses
  tx = sj.dst(optax.sgd(lr), alpha=alpha, recovery_density=0.05)
  state = tx.init(params)
  reference = (params, {"l1": jnp.zeros(16), "l2": jnp.zeros(4)})

  def recover(variables):
    """The paper's mask recovery: a layer at ≤ 5 % density gets its thresholds reset to 0."""
    weights, thresholds = variables
    for name, t in thresholds.items():
      density = jnp.mean(jnp.abs(weights[name]["kernel"]) - t > 0)
      thresholds[name] = jnp.where(density <= 0.05, 0.0, t)
    return weights, thresholds

  def loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, batch[0]), batch[1]).mean()

  @jax.jit
  def step(params, state, reference, batch):
    updates, state = tx.update(jax.grad(loss)(params, batch), state, params)
    ref_grads = jax.grad(reference_loss)(reference, batch, alpha)
    reference = recover(jax.tree.map(lambda v, g: v - lr * g, reference, ref_grads))
    return optax.apply_updates(params, updates), state, reference

  mask_changes = 0
  previous = sj.masks(state)
  for i in range(12):
    params, state, reference = step(params, state, reference, make_batch(i))
    expected = effective_weights(*reference)
    chex.assert_trees_all_close(params, expected, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close({k: v["kernel"] for k, v in sj.thresholds(state).items()},
                                reference[1], atol=1e-5, rtol=1e-5)
    masks = sj.masks(state)
    for name in ("l1", "l2"):
      np.testing.assert_array_equal(masks[name]["kernel"], expected[name]["kernel"] != 0)
      np.testing.assert_array_equal(np.asarray(params[name]["kernel"])[~masks[name]["kernel"]], 0)
      mask_changes += int(np.sum(masks[name]["kernel"] != previous[name]["kernel"]))
    previous = masks
  assert mask_changes > 20


def test_gradients_match_a_hand_computation():
  w = jnp.array([[0.5, -0.2], [0.05, 1.5]])
  t = jnp.array([0.1, 0.3])
  g = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
  from sparsejax.methods.dst import threshold_grad, weight_grad

  m = jnp.abs(w) - t > 0  # [[T, F], [F, T]]
  # q = |w| − t = [[0.4, −0.1], [−0.05, 1.2]] → H = [[0.4, 1.6], [1.8, 0]]
  expected_w = np.array([[1.0 + 1.0 * 0.5 * 0.4, 0.0 + 2.0 * 0.2 * 1.6],
                         [0.0 + -1.0 * 0.05 * 1.8, 0.5 + 0.0]])
  np.testing.assert_allclose(weight_grad(g, w, t, m), expected_w, rtol=1e-6)
  alpha = 0.1
  expected_t = np.array([-(1.0 * 0.5 * 0.4 + -1.0 * 0.05 * 1.8) - alpha * np.exp(-0.1),
                         -(2.0 * -0.2 * 1.6 + 0.0) - alpha * np.exp(-0.3)])
  np.testing.assert_allclose(threshold_grad(g, w, t, alpha), expected_t, rtol=1e-6)


def test_starts_dense_and_params_hold_effective_weights(mlp):
  params, loss = mlp
  tx = sj.dst(optax.sgd(0.1, momentum=0.9), alpha=1e-2)
  state = tx.init(params)
  assert sj.summary(state)["sparsity"] == 0.0
  chex.assert_trees_all_equal(sj.thresholds(state)["Dense_0"]["kernel"], jnp.zeros(16))
  assert sj.thresholds(state)["Dense_0"]["bias"] is None


def test_recovery_resets_thresholds_of_a_collapsed_layer(mlp):
  params, loss = mlp
  grads = jax.grad(loss)(params)

  def one_step(recovery_density):
    tx = sj.dst(optax.sgd(1.0), alpha=0.2, recovery_density=recovery_density)
    updates, state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), state

  # One large step pushes the thresholds past most weights.
  _, state = one_step(0.01)
  layers = sj.summary(state)["layers"]
  assert all(0.01 < 1 - layer["sparsity"] < 0.5 for layer in layers.values())
  # With a recovery density above that, every layer's thresholds are reset: dense again.
  new_params, state = one_step(0.6)
  assert sj.summary(state)["sparsity"] == 0.0
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    np.testing.assert_array_equal(sj.thresholds(state)[name]["kernel"], 0.0)
    np.testing.assert_array_equal(new_params[name]["kernel"], state.weights[name]["kernel"])


def _run_dst(tx, params, loss, jit, steps=3):
  p, state = params, tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for i in range(steps):
    u, state = update(jax.grad(loss)(p, make_batch(i)), state, p)
    p = optax.apply_updates(p, u)
  return p, state


def test_jit_and_eager_agree_and_weight_decay_reaches_thresholds(mlp):
  params, loss = mlp
  tx = sj.dst(optax.adamw(0.05, weight_decay=0.1), alpha=0.05)
  (p_eager, s_eager), (p_jit, s_jit) = (_run_dst(tx, params, loss, jit) for jit in (False, True))
  chex.assert_trees_all_close(p_eager, p_jit, atol=1e-6)
  chex.assert_trees_all_equal(sj.masks(s_eager), sj.masks(s_jit))
  chex.assert_trees_all_close(sj.thresholds(s_eager), sj.thresholds(s_jit), atol=1e-6)
  decayed = sj.thresholds(s_jit)
  # Without weight decay the thresholds end elsewhere: adamw's decay reached them ...
  _, plain = _run_dst(sj.dst(optax.adamw(0.05, weight_decay=0.0), alpha=0.05), params, loss,
                      jit=True)
  for a, b in zip(jax.tree.leaves(decayed), jax.tree.leaves(sj.thresholds(plain)), strict=True):
    assert not np.allclose(a, b, rtol=0, atol=1e-7)
  # ... and `threshold_optimizer` alone moves the thresholds (here: not at all).
  p_frozen, frozen = _run_dst(sj.dst(optax.adamw(0.05, weight_decay=0.1), alpha=0.05,
                                     threshold_optimizer=optax.sgd(0.0)), params, loss, jit=True)
  for t in jax.tree.leaves(sj.thresholds(frozen)):
    np.testing.assert_array_equal(t, 0.0)
  assert not np.allclose(p_frozen["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_thresholds_follow_the_label_of_their_kernel(mlp):
  params, loss = mlp
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "first" if path[0].key == "Dense_0" else "rest", params)
  tx = sj.dst(optax.multi_transform({"first": optax.sgd(0.0), "rest": optax.sgd(0.5)}, labels),
              alpha=0.1)
  _, state = _run_dst(tx, params, loss, jit=True)
  thresholds = sj.thresholds(state)
  np.testing.assert_array_equal(thresholds["Dense_0"]["kernel"], 0.0)  # learning rate 0
  assert float(jnp.abs(thresholds["Dense_1"]["kernel"]).max()) > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_keep_float32_thresholds_and_latent_weights(mlp, dtype):
  """Under the regulariser alone (zero gradients) thresholds move as in float32."""
  params, _ = mlp
  tx = sj.dst(optax.sgd(0.05), alpha=5e-4)

  @jax.jit
  def thresholds_after(params):
    def body(_, carry):
      p, state = carry
      updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
      return optax.apply_updates(p, updates), state
    p, state = jax.lax.fori_loop(0, 800, body, (params, tx.init(params)))
    return p, state

  low = jax.tree.map(lambda p: p.astype(dtype), params)
  p_low, s_low = thresholds_after(low)
  _, s_32 = thresholds_after(params)
  t_low = sj.thresholds(s_low)["Dense_0"]["kernel"]
  np.testing.assert_allclose(t_low, sj.thresholds(s_32)["Dense_0"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(t_low, 800 * 0.05 * 5e-4 * np.exp(-t_low / 2), rtol=0.02)
  assert t_low.dtype == jnp.float32 and s_low.weights["Dense_0"]["kernel"].dtype == jnp.float32
  assert all(p.dtype == dtype for p in jax.tree.leaves(p_low))


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="VALID")(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_conv_kernel_has_one_threshold_per_output_channel():
  model = Conv()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 2))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  tx = sj.dst(optax.sgd(0.5), alpha=0.5)
  state = tx.init(params)
  chex.assert_shape(sj.thresholds(state)["Conv_0"]["kernel"], (4,))

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                           jnp.arange(4) % 3).mean()

  for _ in range(3):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
  kernel, t = params["Conv_0"]["kernel"], sj.thresholds(state)["Conv_0"]["kernel"]
  latent = state.weights["Conv_0"]["kernel"]
  np.testing.assert_array_equal(kernel, jnp.where(jnp.abs(latent) - t > 0, latent, 0.0))
  assert float(jnp.max(t)) > 0


def test_nnx_optimizer():
  model = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sj.dst(optax.sgd(0.5), alpha=0.5), wrt=nnx.Param)
  x, y = jax.random.normal(jax.random.PRNGKey(0), (8, 6)), jnp.arange(8) % 3

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(
        model)
    optimizer.update(model, grads)

  for _ in range(3):
    train_step(model, optimizer)
  m = np.asarray(sj.masks(optimizer.opt_state)["kernel"])
  np.testing.assert_array_equal(np.asarray(model.kernel[...])[~m], 0.0)
  assert sj.thresholds(optimizer.opt_state)["kernel"].shape == (3,)
  assert sj.thresholds(optimizer.opt_state)["bias"] is None


@pytest.mark.parametrize("kwargs,match", [({"alpha": -1.0}, "alpha"),
                                          ({"recovery_density": 1.0}, "recovery_density")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sj.dst(optax.sgd(0.1), **kwargs)


def test_state_does_not_alias_params_so_both_can_be_donated(mlp):
  params, loss = mlp
  tx = sj.dst(optax.sgd(0.1), alpha=1e-3)
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  for _ in range(2):
    params, state = step(params, state)
  assert sj.summary(state)["size"] == 320 + 192 + 48


@pytest.mark.parametrize("weight", [None, 5.0], ids=["small-weight", "weight-beyond-H"])
@pytest.mark.parametrize("value", [jnp.inf, -jnp.inf, jnp.nan])
def test_a_non_finite_gradient_never_changes_the_masks(mlp, value, weight):
  """Also where H(|W| − t) = 0 (|W| − t > 1), whose gradient entry the threshold
  gradient multiplies by 0: the finiteness check reads the threshold gradients."""
  params, loss = mlp
  if weight is not None:
    params = {**params, "Dense_1": {**params["Dense_1"],
                                    "kernel": params["Dense_1"]["kernel"].at[0, 0].set(weight)}}
  tx = sj.dst(optax.apply_if_finite(optax.sgd(1.0), 5), alpha=0.2)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  bad = {**grads, "Dense_1": {**grads["Dense_1"],
                              "kernel": grads["Dense_1"]["kernel"].at[0, 0].set(value)}}
  updates, after = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(sj.masks(after), sj.masks(state))
  assert int(after.nonfinite_updates) == 1
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  _, good = jax.jit(tx.update)(grads, state, params)
  assert sj.summary(good)["sparsity"] > 0  # the same step with a finite gradient prunes
