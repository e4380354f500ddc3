"""Always-sparse GSE / RigL / SET: every rewiring against a NumPy port of the rule."""

import chex
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.nn import growth, layers
from sparsejax.nn import nnx as sjnnx

LAYERS = ("SparseDense_0", "SparseDense_1")


class SparseMLP(nn.Module):
  """20 → 32 → 4, both layers always-sparse."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.SparseDense(32, sparsity=0.8)(x))
    return layers.SparseDense(4, sparsity=0.5)(x)


def batch(seed, n=16, dead_inputs=0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, 20))
  x = x.at[:, :dead_inputs].set(0.0)
  return x, jax.random.randint(ky, (n,), 0, 4)


def train(make_tx, steps, jit=True, seed=0, dead_inputs=0):
  """Runs ``steps`` steps; returns the list of (params, state, grads) before each step
  and the final (params, state)."""
  model = SparseMLP()
  variables = model.init(jax.random.PRNGKey(seed), batch(0)[0])
  tx = make_tx(variables["topology"])
  params, state = variables["params"], tx.init(variables["params"])

  def step(params, state, data):
    def loss(params):
      logits = model.apply({"params": params, "topology": growth.topology(state)}, data[0])
      return optax.softmax_cross_entropy_with_integer_labels(logits, data[1]).mean()
    grads = jax.grad(loss)(params)
    updates, new_state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new_state, grads

  step = jax.jit(step) if jit else step
  history = []
  for t in range(1, steps + 1):
    new_params, new_state, grads = step(params, state, batch(t, dead_inputs=dead_inputs))
    history.append((params, state, grads))
    params, state = new_params, new_state
  return history, (params, state)


def reference_rewire(values, rows, cols, candidate_rows, candidate_cols, scores, k, fan_out):
  """The rule in plain NumPy: grow the k best distinct inactive candidates (ties: lower
  flat index), drop as many smallest |w| (ties: the higher flat index goes first), the
  dropped slots in increasing order take the grown pairs in increasing flat order."""
  flat = rows * fan_out + cols
  active = set(flat.tolist())
  candidates = candidate_rows * fan_out + candidate_cols
  best = {}
  for i, c in enumerate(candidates.tolist()):
    if c not in active and c not in best:
      best[c] = scores[i]
  grown = sorted(sorted(best, key=lambda c: (-best[c], c))[:k])
  dropped = sorted(sorted(range(len(flat)), key=lambda s: (abs(values[s]), -flat[s]))[:len(grown)])
  rows, cols = rows.copy(), cols.copy()
  for slot, c in zip(dropped, grown):
    rows[slot], cols[slot] = divmod(c, fan_out)
  return rows, cols, np.isin(np.arange(len(flat)), dropped)


def leaf(tree, layer, name):
  return np.asarray(tree[layer][name])


def check_every_update(history, final, fraction, fan_outs, grow_by="gradient"):
  """Each update step's new topology, zeroed weights and reset momenta, against NumPy."""
  states = [s for _, s, _ in history[1:]] + [final[1]]
  params_after = [p for p, _, _ in history[1:]] + [final[0]]
  updates = 0
  for t, ((params, state, grads), new_state, new_params) in enumerate(
      zip(history, states, params_after), start=1):
    topology, new_topology = growth.topology(state), growth.topology(new_state)
    for layer, fan_out in zip(LAYERS, fan_outs):
      values, rows, cols = (leaf(params, layer, "values"), leaf(topology, layer, "rows"),
                            leaf(topology, layer, "cols"))
      if not bool(topology[layer]["grow"]) and grow_by == "gradient":
        np.testing.assert_array_equal(leaf(new_topology, layer, "rows"), rows)
        np.testing.assert_array_equal(leaf(grads, layer, "probe_candidates"), 0)
        continue
      k = int(np.float32(values.size) * np.float32(fraction(t)))
      if k == 0 or grow_by != "gradient":
        continue
      updates += 1
      want_rows, want_cols, moved = reference_rewire(
          values, rows, cols, leaf(topology, layer, "candidate_rows"),
          leaf(topology, layer, "candidate_cols"),
          np.abs(leaf(grads, layer, "probe_candidates")), k, fan_out)
      assert moved.sum() > 0, t
      np.testing.assert_array_equal(leaf(new_topology, layer, "rows"), want_rows)
      np.testing.assert_array_equal(leaf(new_topology, layer, "cols"), want_cols)
      new_values = leaf(new_params, layer, "values")
      np.testing.assert_array_equal(new_values[moved], 0)
      assert np.all(new_values[~moved] != 0)
      momentum = leaf(new_state.inner_state[0].trace, layer, "values")
      np.testing.assert_array_equal(momentum[moved], 0)
      assert int(new_state.rewired) >= moved.sum()
  return updates


def test_gse_rewires_every_layer_as_the_reference():
  """Uniform GSE, every other step, 12 steps: each update equals the NumPy rule on the
  recorded candidates and gradients; grown weights are 0 with a fresh momentum."""
  schedule = growth.growth_schedule(0.1, 0, 12)
  history, final = train(lambda t: growth.gse(optax.sgd(0.1, momentum=0.9), topology=t,
                                              end_step=12, update_every=2), 12)
  assert check_every_update(history, final, schedule, (32, 4)) >= 8


def test_rigl_rewires_as_the_reference_with_its_cosine_drop_fraction():
  from sparsejax import schedules
  history, final = train(lambda t: growth.rigl(optax.sgd(0.1, momentum=0.9), topology=t,
                                               end_step=12, update_every=3), 12)
  assert check_every_update(history, final, schedules.cosine_drop_fraction(0.3, 0, 12),
                            (32, 4)) >= 4


@pytest.mark.parametrize("method", ["gse", "rigl", "set"])
def test_connections_stay_distinct_and_exactly_nnz(method):
  make = {"gse": lambda t: growth.gse(optax.adam(1e-2), topology=t, end_step=8,
                                      update_every=1, sampling="grabo"),
          "rigl": lambda t: growth.rigl(optax.adam(1e-2), topology=t, end_step=8,
                                        update_every=1),
          "set": lambda t: growth.set(optax.adam(1e-2), topology=t, end_step=8,
                                      update_every=1)}[method]
  history, (params, state) = train(make, 8)
  first = growth.topology(history[0][1])
  moved = 0
  for _, state_t, _ in history[1:] + [(params, state, None)]:
    topology = growth.topology(state_t)
    for layer, fan_out in zip(LAYERS, (32, 4)):
      flat = leaf(topology, layer, "rows") * fan_out + leaf(topology, layer, "cols")
      assert len(np.unique(flat)) == flat.size == leaf(first, layer, "rows").size
      order = leaf(topology, layer, "order")  # the kernels' order stays sorted (one tile)
      assert np.all(np.diff(flat[order]) > 0)
      chex.assert_shape(params[layer]["values"], flat.shape)
    moved += int(state_t.rewired)
  assert moved > 0
  for name in growth.PROBES:  # the probes never move from 0
    np.testing.assert_array_equal(params["SparseDense_0"][name], 0)


def test_set_grows_only_sampled_candidates_and_ignores_gradients():
  history, (_, state) = train(lambda t: growth.set(optax.sgd(0.1), topology=t, end_step=8,
                                                   update_every=2), 4)
  before, after = growth.topology(history[1][1]), growth.topology(history[2][1])
  assert not bool(before["SparseDense_0"]["grow"])  # SET asks no candidate gradient
  fan_out = 32
  old = set((leaf(before, "SparseDense_0", "rows") * fan_out
             + leaf(before, "SparseDense_0", "cols")).tolist())
  new = set((leaf(after, "SparseDense_0", "rows") * fan_out
             + leaf(after, "SparseDense_0", "cols")).tolist())
  sampled = set((leaf(before, "SparseDense_0", "candidate_rows") * fan_out
                 + leaf(before, "SparseDense_0", "candidate_cols")).tolist())
  assert new - old and new - old <= sampled


@pytest.mark.parametrize("sampling", ["grabo", "graest"])
def test_guided_sampling_never_picks_an_input_that_is_always_zero(sampling):
  """Inputs 0–9 are 0 in every batch: GraBo's and GraEst's f is 0 there, so no candidate
  of the first layer reads them, while uniform sampling does."""
  def candidates(sampling):
    history, _ = train(lambda t: growth.gse(optax.sgd(0.1), topology=t, end_step=20,
                                            update_every=3, sampling=sampling),
                       3, dead_inputs=10)
    # Sampled at step 2 from step 2's statistics, for the update at step 3.
    return leaf(growth.topology(history[2][1]), "SparseDense_0", "candidate_rows")
  assert candidates(sampling).min() >= 10
  assert candidates("uniform").min() < 10


def test_jit_and_eager_agree_and_the_seed_decides():
  def make(seed):
    return lambda t: growth.gse(optax.sgd(0.1, momentum=0.9), topology=t, end_step=8,
                                update_every=2, sampling="graest", seed=seed)
  _, (p_jit, s_jit) = train(make(0), 3)
  _, (p_eager, s_eager) = train(make(0), 3, jit=False)
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(growth.topology(s_jit), growth.topology(s_eager))
  _, (_, s_other) = train(make(1), 3)
  assert not np.array_equal(leaf(growth.topology(s_jit), "SparseDense_0", "rows"),
                            leaf(growth.topology(s_other), "SparseDense_0", "rows"))


def test_a_nonfinite_gradient_skips_the_rewiring():
  model = SparseMLP()
  variables = model.init(jax.random.PRNGKey(0), batch(0)[0])
  tx = growth.gse(optax.sgd(0.1), topology=variables["topology"], end_step=8, update_every=1)
  params = variables["params"]
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["SparseDense_1"]["bias"] = grads["SparseDense_1"]["bias"].at[0].set(jnp.nan)
  _, new_state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(growth.topology(new_state)["SparseDense_0"]["rows"],
                              growth.topology(state)["SparseDense_0"]["rows"])
  assert int(new_state.nonfinite_updates) == 1 and int(new_state.rewired) == 0


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = sjnnx.SparseLinear(20, 32, sparsity=0.8, rngs=rngs)
    self.out = sjnnx.SparseLinear(32, 4, sparsity=0.5, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_nnx_optimizer_trains_and_rewires():
  """nnx.Optimizer over nnx.Param: the topology comes from nnx.state(model, Topology)
  and goes back with nnx.update after each step."""
  model = NnxMLP(nnx.Rngs(0))
  tx = growth.gse(optax.sgd(0.1, momentum=0.9), topology=nnx.state(model, sjnnx.Topology),
                  end_step=8, update_every=2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  first = np.asarray(model.hidden.rows[...])

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    nnx.update(model, growth.topology(optimizer.opt_state))
    return value

  losses = [float(step(model, optimizer, *batch(1))) for _ in range(8)]
  assert losses[-1] < losses[0]
  rows = np.asarray(model.hidden.rows[...])
  assert rows.shape == first.shape and not np.array_equal(rows, first)
  np.testing.assert_array_equal(rows, growth.topology(optimizer.opt_state)["hidden"]["rows"])


def test_bad_arguments_are_one_line_errors():
  model = SparseMLP()
  variables = model.init(jax.random.PRNGKey(0), batch(0)[0])
  for make, message in [
      (lambda: growth.gse(optax.sgd(0.1), topology=variables["topology"], end_step=8,
                          sampling="best"), "unknown sampling"),
      (lambda: growth.gse(optax.sgd(0.1), topology=variables["topology"], end_step=8,
                          growth_fraction=0.7), "growth_fraction"),
      (lambda: growth.gse(optax.sgd(0.1), topology={}, end_step=8).init(variables["params"]),
       "holds no always-sparse layer"),
      (lambda: growth.gse(optax.sgd(0.1), topology=variables["topology"], end_step=8).init(
          {"SparseDense_1": variables["params"]["SparseDense_1"]}), "have no 'SparseDense_0/"),
  ]:
    with pytest.raises(ValueError, match=message) as error:
      make()
    assert "\n" not in str(error.value)


def test_gse_uniform_with_rigls_fraction_is_rigl_exactly():
  """GSE's 0.15 · (1 + cos) equals RigL's 0.3 cosine: with uniform candidates and the
  same seed both grow and drop the same connections (the README's Fashion-MNIST note)."""
  def make(method):
    if method == "gse":
      return lambda t: growth.gse(optax.sgd(0.1, momentum=0.9), topology=t, end_step=12,
                                  update_every=2, growth_fraction=0.15)
    return lambda t: growth.rigl(optax.sgd(0.1, momentum=0.9), topology=t, end_step=12,
                                 update_every=2, drop_fraction=0.3)
  _, (p_gse, s_gse) = train(make("gse"), 6)
  _, (p_rigl, s_rigl) = train(make("rigl"), 6)
  chex.assert_trees_all_equal(growth.topology(s_gse), growth.topology(s_rigl))
  chex.assert_trees_all_close(p_gse, p_rigl, rtol=1e-6, atol=1e-7)
  assert int(s_gse.rewired) > 0
