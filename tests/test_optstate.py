"""Per-weight buffers of optax states found by key path, and their entry-wise reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.masks import leaf_names
from sparsejax.optstate import param_of_state_leaves, reset_entries

PARAMS = {"a": {"kernel": jnp.ones((128, 128)), "bias": jnp.ones(128)},
          "b": {"kernel": jnp.ones((128, 128)), "bias": jnp.ones(128)}}


def owners_by_path(inner, params=PARAMS):
  state = inner.init(params)
  params_names = leaf_names(params)
  return {name: None if owner is None else params_names[owner]
          for name, owner in zip(leaf_names(state), param_of_state_leaves(state, params),
                                 strict=True)}


def test_same_shaped_layers_map_to_their_own_buffers():
  owners = owners_by_path(optax.adam(1e-3))
  assert owners["0/mu/a/kernel"] == "a/kernel" and owners["0/mu/b/kernel"] == "b/kernel"
  assert owners["0/nu/b/bias"] == "b/bias"
  assert owners["0/count"] is None


def test_multi_transform_and_masked_states():
  labels = {"a": {"kernel": "k", "bias": "o"}, "b": {"kernel": "k", "bias": "o"}}
  inner = optax.multi_transform({"k": optax.adam(1e-3), "o": optax.sgd(0.1, momentum=0.9)},
                                labels)
  owners = owners_by_path(inner)
  mapped = {name: owner for name, owner in owners.items() if owner is not None}
  # Adam's two moments for the two kernels, the momentum of the two biases.
  assert sorted(mapped.values()) == sorted(["a/kernel", "b/kernel"] * 2 + ["a/bias", "b/bias"])


def test_adafactor_factored_statistics_are_not_per_weight():
  owners = owners_by_path(optax.adafactor(1e-2))
  kernel_buffers = [n for n, o in owners.items() if o == "a/kernel"]
  assert kernel_buffers == []  # v_row [128] and v_col [128] are not shaped like the kernel
  assert any(o == "a/bias" for o in owners.values())  # the bias is unfactored: v is per weight


def test_reset_restores_the_initial_value_only_where_asked():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  inner = optax.contrib.schedule_free_sgd(0.1)
  state = inner.init(params)
  state = jax.tree.map(lambda x: x + 7 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  where = {"w": jnp.array([[True, False, False], [False, False, True]])}
  reset = reset_entries(inner, state, params, where)
  z = optax.tree_utils.tree_get(reset, "z")["w"]
  # schedule-free's z starts at the params: the reset entries are the current weights.
  np.testing.assert_array_equal(z, jnp.where(where["w"], params["w"], params["w"] + 7))


def test_reset_with_nothing_masked_is_the_identity():
  inner = optax.adam(1e-3)
  state = inner.init(PARAMS)
  assert reset_entries(inner, state, PARAMS, {"a": {"kernel": None, "bias": None},
                                              "b": {"kernel": None, "bias": None}}) is state
