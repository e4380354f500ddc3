"""Always-sparse layers: equal to masked dense layers, exact probes, no dense-sized array."""

import math

import chex
from flax import nnx
import flax.linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import sampling
from sparsejax.nn import connections, growth, kernels, layers
from sparsejax.nn import nnx as sjnnx


def dense_kernel(topology, values, fan_in, fan_out):
  return jnp.zeros((fan_in, fan_out), values.dtype).at[topology["rows"],
                                                        topology["cols"]].set(values)


@pytest.mark.parametrize("chunk", [kernels.CHUNK, 7])
def test_sparse_dense_equals_a_masked_dense_layer(chunk, monkeypatch):
  """Forward, ∂/∂x and ∂/∂values equal nn.Dense's with the kernel zero off the topology,
  for one chunk and for many (a partial last chunk), with two leading batch axes."""
  monkeypatch.setattr(kernels, "CHUNK", chunk)
  layer = layers.SparseDense(9, sparsity=0.7)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 13))
  variables = layer.init(jax.random.PRNGKey(0), x)
  params, topology = variables["params"], variables["topology"]
  kernel = dense_kernel(topology, params["values"], 13, 9)
  params = {**params, "bias": jax.random.normal(jax.random.PRNGKey(2), (9,))}

  def sparse_loss(values, x):
    y = layer.apply({"params": {**params, "values": values}, "topology": topology}, x)
    return jnp.sum(jnp.sin(y)), y

  def dense_loss(kernel, x):
    y = nn.Dense(9).apply({"params": {"kernel": kernel, "bias": params["bias"]}}, x)
    return jnp.sum(jnp.sin(y)), y

  (_, y), (g_values, g_x) = jax.value_and_grad(sparse_loss, (0, 1), has_aux=True)(
      params["values"], x)
  (_, y_dense), (g_kernel, g_x_dense) = jax.value_and_grad(dense_loss, (0, 1), has_aux=True)(
      kernel, x)
  chex.assert_shape(y, (2, 3, 9))
  np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x_dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_values, g_kernel[topology["rows"], topology["cols"]], rtol=1e-5,
                             atol=1e-5)


def test_nnx_sparse_linear_equals_a_masked_linear():
  layer = sjnnx.SparseLinear(13, 9, fan_in=4, rngs=nnx.Rngs(0))
  topology = {"rows": layer.rows[...], "cols": layer.cols[...]}
  assert layer.values[...].shape == (36,)  # fan_in · out_features
  kernel = dense_kernel(topology, layer.values[...], 13, 9)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 13))

  def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))

  g_model, g_x = nnx.grad(loss, argnums=(0, 1))(layer, x)
  g_kernel, g_x_dense = jax.grad(lambda k, x: jnp.sum(jnp.sin(x @ k)), (0, 1))(kernel, x)
  np.testing.assert_allclose(layer(x), x @ kernel, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x_dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_model["values"][...], g_kernel[topology["rows"], topology["cols"]],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "VALID")])
def test_sparse_conv_equals_a_masked_conv(strides, padding):
  conv = layers.SparseConv(6, (3, 3), strides=strides, padding=padding, sparsity=0.8)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 4))
  variables = conv.init(jax.random.PRNGKey(0), x)
  params, topology = variables["params"], variables["topology"]
  kernel = dense_kernel(topology, params["values"], 36, 6).reshape(3, 3, 4, 6)
  reference = nn.Conv(6, (3, 3), strides=strides, padding=padding)

  def sparse_loss(values, x):
    return jnp.sum(jnp.sin(conv.apply({"params": {**params, "values": values},
                                       "topology": topology}, x)))

  def dense_loss(kernel, x):
    return jnp.sum(jnp.sin(reference.apply({"params": {"kernel": kernel,
                                                       "bias": params["bias"]}}, x)))

  y = conv.apply(variables, x)
  np.testing.assert_allclose(y, reference.apply({"params": {"kernel": kernel,
                                                            "bias": params["bias"]}}, x),
                             rtol=1e-5, atol=1e-5)
  g_values, g_x = jax.grad(sparse_loss, (0, 1))(params["values"], x)
  g_kernel, g_x_dense = jax.grad(dense_loss, (0, 1))(kernel, x)
  np.testing.assert_allclose(g_x, g_x_dense, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_values, g_kernel.reshape(36, 6)[topology["rows"],
                                                                 topology["cols"]],
                             rtol=1e-4, atol=1e-5)


def probed(observe, grow, candidate_rows, candidate_cols):
  """A SparseDense(7) on 11 inputs, its dense kernel and the grads of a loss, with the
  growth probe told to compute candidate gradients and/or statistics."""
  layer = layers.SparseDense(7, sparsity=0.6, use_bias=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 11))
  variables = layer.init(jax.random.PRNGKey(0), x)
  m = variables["topology"]["candidate_rows"].size  # ⌊1.0 · nnz⌋ = 31: repeat the given pairs
  topology = {**variables["topology"], "grow": jnp.asarray(grow),
              "observe": jnp.asarray(observe, jnp.int32),
              "candidate_rows": jnp.asarray(np.resize(candidate_rows, m), jnp.int32),
              "candidate_cols": jnp.asarray(np.resize(candidate_cols, m), jnp.int32)}
  params = variables["params"]
  kernel = dense_kernel(topology, params["values"], 11, 7)

  def loss(params):
    return jnp.sum(jnp.sin(layer.apply({"params": params, "topology": topology}, x)) ** 2)

  def dense_loss(kernel, y_shift):
    return jnp.sum(jnp.sin(x @ kernel + y_shift) ** 2)

  grads = jax.grad(loss)(params)
  g_kernel, delta = jax.grad(dense_loss, (0, 1))(kernel, jnp.zeros((5, 7)))
  return x, topology, grads, g_kernel, delta


def test_candidate_gradients_equal_the_dense_gradient_at_those_pairs():
  rows, cols = np.array([0, 3, 10, 3, 5]), np.array([6, 2, 0, 2, 4])
  _, _, grads, g_kernel, _ = probed(observe=0, grow=True, candidate_rows=rows,
                                    candidate_cols=cols)
  m = grads["probe_candidates"].size
  np.testing.assert_allclose(grads["probe_candidates"],
                             g_kernel[np.resize(rows, m), np.resize(cols, m)], rtol=1e-5,
                             atol=1e-6)
  assert float(jnp.abs(grads["probe_candidates"]).min()) > 0
  np.testing.assert_array_equal(grads["probe_inputs"], 0)  # not observing


@pytest.mark.parametrize("observe", ["grabo", "graest"])
def test_statistics_equal_grabo_and_graest_of_h_and_delta(observe):
  code = growth.OBSERVE[observe]
  x, topology, grads, _, delta = probed(observe=code, grow=False, candidate_rows=[1],
                                        candidate_cols=[1])
  if observe == "grabo":
    expected = sampling.grabo(x, delta)
  else:
    key = jax.random.wrap_key_data(topology["key"], impl="threefry2x32")
    expected = sampling.graest(x, delta, sampling.random_signs(key, x.shape[0]))
  np.testing.assert_allclose(grads["probe_inputs"], expected.inputs, rtol=1e-5)
  np.testing.assert_allclose(grads["probe_outputs"], expected.outputs, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads["probe_candidates"], 0)  # not growing


@settings(max_examples=15, deadline=None)
@given(fan_in=st.integers(1, 60), fan_out=st.integers(1, 60),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_connections_are_distinct_sorted_and_exactly_nnz(fan_in, fan_out, density, seed):
  nnz = max(1, math.floor(density * fan_in * fan_out))
  rows, cols = connections.random_connections(jax.random.PRNGKey(seed), nnz, fan_in, fan_out)
  flat = np.asarray(rows) * fan_out + np.asarray(cols)
  assert flat.shape == (nnz,) and len(np.unique(flat)) == nnz
  assert np.all(np.diff(flat) > 0) and rows.dtype == jnp.int32
  assert 0 <= rows.min() and rows.max() < fan_in and 0 <= cols.min() and cols.max() < fan_out


@pytest.mark.parametrize("fan_in,fan_out,tile", [(6, 40, 16), (40, 6, 16), (7, 9, 2048)])
def test_connection_order_walks_output_tiles_by_input(fan_in, fan_out, tile, monkeypatch):
  monkeypatch.setattr(connections, "ORDER_TILE", tile)
  rows, cols = connections.random_connections(jax.random.PRNGKey(3), 50, fan_in, fan_out)
  permuted = jax.random.permutation(jax.random.PRNGKey(4), 50)
  rows, cols = np.asarray(rows[permuted]), np.asarray(cols[permuted])
  order = np.asarray(connections.connection_order(rows, cols, fan_in, fan_out))
  assert sorted(order) == list(range(50))
  walked = list(zip(cols[order] // tile, rows[order], cols[order]))
  assert walked == sorted(walked)


def test_random_connections_are_uniform():
  """Each of the 40 pairs of a 5 × 8 layer is chosen ~ nnz/40 of the time."""
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  rows, cols = jax.vmap(lambda key: connections.random_connections(key, 4, 5, 8))(keys)
  hits = np.bincount(np.asarray(rows * 8 + cols).reshape(-1), minlength=40)
  expected = 400 * 4 / 40
  chi2 = ((hits - expected) ** 2 / expected).sum()
  assert chi2 < 80  # 39 degrees of freedom: p ≈ 1e-4


def test_values_are_initialised_as_gse():
  layer = layers.SparseDense(50, sparsity=0.9)
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 100)))
  cols, values = variables["topology"]["cols"], variables["params"]["values"]
  fan_in = connections.fan_in_counts(cols, 50)
  assert int(fan_in.sum()) == 500 == values.size
  assert bool(jnp.all(jnp.abs(values) <= jnp.sqrt(3.0 / fan_in[cols])))
  assert float(jnp.abs(values).min()) > 0
  for name in growth.PROBES:
    np.testing.assert_array_equal(variables["params"][name], 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(), "exactly one of sparsity and fan_in"),
    (dict(sparsity=0.9, fan_in=3), "exactly one of sparsity and fan_in"),
    (dict(fan_in=0), r"fan_in must be in \[1, 10\]"),
    (dict(sparsity=0.5, candidates=-1.0), "candidates must be >= 0"),
])
def test_bad_layer_arguments_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message) as error:
    layers.SparseDense(4, **kwargs).init(jax.random.PRNGKey(0), jnp.ones((1, 10)))
  assert "\n" not in str(error.value)


def test_apply_without_the_topology_says_how_to_pass_it():
  layer = layers.SparseDense(4, sparsity=0.5)
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 10)))
  with pytest.raises(ValueError, match=r"'topology': sparsejax.nn.topology\(opt_state\)"):
    layer.apply({"params": variables["params"]}, jnp.ones((1, 10)))


class Wide(nn.Module):
  """Two SparseDense(8192) layers at 99.9 %."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.SparseDense(8192, sparsity=0.999)(x))
    return layers.SparseDense(8192, sparsity=0.999)(x)


def largest_intermediates(jaxpr, found=None):
  """Sizes of every value a jaxpr (and its sub-jaxprs: loops, conds, custom VJPs) makes."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    found.extend((math.prod(v.aval.shape), str(eqn.primitive)) for v in eqn.outvars
                 if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          largest_intermediates(sub.jaxpr, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          largest_intermediates(sub, found)
  return found


@pytest.mark.parametrize("update_every", [10**6, 1], ids=["train step", "growth step"])
def test_no_array_of_a_tenth_of_the_dense_layer_exists(update_every):
  """Walks the jaxpr of init, of a whole training step and of a growth step (GraEst:
  statistics, candidates, rewiring) of two 8192 × 8192 layers at 99.9 %, batch 64:
  every intermediate is below 8192² / 10 elements (the layers hold 67,109 weights each)."""
  model = Wide()
  x = jnp.ones((64, 8192))
  limit = 8192 * 8192 // 10
  init_jaxpr = jax.make_jaxpr(model.init)(jax.random.PRNGKey(0), x)
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = growth.gse(optax.sgd(0.1, momentum=0.9), topology=variables["topology"],
                  end_step=10**7, update_every=update_every, sampling="graest")
  state = tx.init(variables["params"])
  if update_every == 1:
    assert bool(growth.topology(state)["SparseDense_0"]["grow"])

  def step(params, state, x):
    def loss(params):
      return jnp.mean(model.apply({"params": params, "topology": growth.topology(state)},
                                  x) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  step_jaxpr = jax.make_jaxpr(step)(variables["params"], state, x)
  for jaxpr in (init_jaxpr, step_jaxpr):
    sizes = largest_intermediates(jaxpr.jaxpr)
    assert len(sizes) > 50
    largest = max(sizes)
    assert largest[0] < limit, largest


def test_nnx_sparse_conv_equals_a_masked_conv():
  conv = sjnnx.SparseConv(4, 6, (3, 3), strides=2, padding="SAME", sparsity=0.8,
                          rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 4))
  topology = {"rows": conv.rows[...], "cols": conv.cols[...]}
  kernel = dense_kernel(topology, conv.values[...], 36, 6).reshape(3, 3, 4, 6)
  reference = nnx.Conv(4, 6, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
  reference.kernel[...] = kernel
  np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
  assert conv(x).shape == (2, 5, 5, 6)
