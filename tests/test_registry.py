"""The method registry: config sections from signatures, and a new method in the runner.

The acceptance test defines a method with the public building blocks only, registers
it, and trains it in the experiment runner, whose FLOPs, coverage and sparsity rows
must be right without any change to the package.
"""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from test_train import synthetic_data

from experiments.configs import fashion_mnist
import sparsejax as sj
from sparsejax import registry
from sparsejax.train import experiment_config, loop, steps
from sparsejax.train.logs import read_rows


def toy(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,
        update_every: int = 3, seed: int = 0, dense=sj.keep_non_kernels_dense):
  """Drop by magnitude, grow at random, every ``update_every`` steps (half the weights)."""
  topology = sj.Topology(
      init_masks=sj.random_init(sparsity, "uniform", dense),
      is_update_step=sj.schedules.update_steps(update_every, 0, end_step),
      update_masks=sj.drop_and_grow(sj.scores.magnitude, sj.scores.random_uniform,
                                    lambda step: 0.5),
      train_at_update=True)
  return sj.sparse_wrapper(inner, topology, seed)


@pytest.fixture
def registered():
  """Registers ``toy`` for one test (the registry is global)."""
  sj.register_method("toy", toy)
  yield "toy"
  del registry._REGISTRY["toy"], registry.METHODS["toy"]  # noqa: SLF001


def test_method_config_is_read_off_the_signature(registered):
  section = sj.method_config(registered)
  assert section.to_dict() == {"method": "toy", "sparsity": None, "end_step": None,
                               "update_every": 3, "seed": 0}
  with pytest.raises(AttributeError):
    section.nokey = 1  # locked: unknown keys are refused
  with pytest.raises(TypeError):
    section.update_every = "often"  # typed
  section.sparsity = 1  # an int is a float here
  assert section.sparsity == 1.0 and isinstance(section.sparsity, float)


def test_register_method_refuses_bad_entries(registered):
  with pytest.raises(ValueError, match="'toy' is taken"):
    sj.register_method("toy", toy)
  with pytest.raises(ValueError, match="'dense' is reserved"):
    sj.register_method("dense", toy)
  with pytest.raises(ValueError, match="required keyword 'schedule' has no scalar type"):
    sj.register_method("bad", lambda inner, *, schedule: inner)
  with pytest.raises(ValueError, match="variant key 'beta'"):
    sj.register_method("bad", toy, variant_keys=("beta",))
  assert "bad" not in sj.METHODS


def test_from_config_needs_the_required_keywords(registered):
  with pytest.raises(ValueError, match="method 'toy' needs 'end_step'"):
    sj.from_config({"method": "toy", "sparsity": 0.5}, optax.sgd(0.1))
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    sj.method_config("nope")


def test_variant_names_what_stands_in_for_a_target_sparsity():
  assert sj.variant({"method": "dst", "alpha": 5e-4, "recovery_density": 0.01}) == "alpha=0.0005"
  assert sj.variant({"method": "rigl", "sparsity": 0.9}) is None
  assert sj.variant({"method": "dense"}) is None


def test_with_method_keeps_shared_keys_and_takes_the_new_methods_defaults():
  config = fashion_mnist.get_config("rigl")
  config.sparse.update_every = 7
  gmp = experiment_config.with_method(config, "gmp").sparse
  assert gmp.method == "gmp" and gmp.update_every == 7 and gmp.end_step == -1
  assert gmp.initial_sparsity == 0.0 and "drop_fraction" not in gmp
  dst = experiment_config.with_method(config, "dst").sparse
  assert dst.to_dict() == {"method": "dst", "alpha": 5e-4, "recovery_density": 0.01}


def test_a_registered_method_trains_in_the_runner_with_correct_rows(registered, tmp_path):
  data = synthetic_data()
  config = fashion_mnist.get_config(registered)
  config.sparse.update(sparsity=0.8, update_every=3)
  config.update(num_steps=12, batch_size=32, eval_batch_size=64, log_every=4, eval_every=12)
  experiment = loop.setup(config, data)
  assert experiment.config.sparse.end_step == 9  # 0.75 of training: updates at 3, 6, 9

  # The same steps by hand: the masks of every step, and the weights ever active.
  step, state = steps.make_train_step(experiment), jax.tree.map(np.copy, experiment.state)
  ever = [np.asarray(m) for m in jax.tree.leaves(sj.masks(state.opt_state))]
  changes = 0
  for s in range(12):
    before = jax.tree.leaves(sj.masks(state.opt_state))
    state = step(state, experiment.pipeline.batch(s))
    after = [np.asarray(m) for m in jax.tree.leaves(sj.masks(state.opt_state))]
    changes += any(not np.array_equal(a, b) for a, b in zip(after, before))
    ever = [e | a for e, a in zip(ever, after)]
  assert changes == 3
  coverage = sum(int(e.sum()) for e in ever) / sum(e.size for e in ever)

  summary = loop.run(experiment, tmp_path, show_progress=False)
  row = read_rows(tmp_path / "metrics.jsonl")[-1]
  assert row["coverage"] == pytest.approx(coverage, abs=1e-12) and coverage > 0.25
  assert summary["coverage"] == row["coverage"]
  assert row["sparsity"] == pytest.approx(sj.summary(state.opt_state)["sparsity"], abs=1e-12)
  assert row["sparsity"] == pytest.approx(0.8, abs=1e-3)
  # Random growth never reads the dense gradient: every step costs 3 sparse passes.
  assert row["train_flops"] == pytest.approx(12 * 32 * 3 * row["inference_flops"], rel=1e-6)
  assert row["train_flops_dense"] == pytest.approx(12 * 32 * 3 * row["inference_flops_dense"])
  assert summary["method"] == "toy" and summary["variant"] is None


def _config_with(change):
  """The Fashion-MNIST RigL config as plain dicts, changed by ``change(dict)``."""
  values = fashion_mnist.get_config("rigl").to_dict()
  change(values)
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["data"].update(shuffle=True), "config.data.shuffle is not a key"),
    (lambda c: c["optimizer"].pop("momentum"), "config.optimizer.momentum is missing"),
    (lambda c: c.update(num_epochs="ten"), "config.num_epochs must be of type int"),
    (lambda c: c["sparse"].update(update_every=2.5), "config.sparse.update_every must be of type"),
    (lambda c: c["sparse"].update(beta=1.0), "config.sparse.beta is not a key"),
    (lambda c: c.update(optimizer=3), "config.optimizer must be a section"),
])
def test_config_schema_refuses_unknown_missing_and_mistyped_keys(change, message):
  experiment_config.validate_config(_config_with(lambda c: None))
  with pytest.raises(ValueError, match=message):
    experiment_config.validate_config(_config_with(change))


def test_with_method_names_a_needed_keyword_the_section_lacks():
  with pytest.raises(ValueError, match="config.sparse.sparsity is needed by method 'rigl'"):
    experiment_config.with_method(fashion_mnist.get_config("dense"), "rigl")
  assert sj.registry.required_keywords("rigl") == ("sparsity", "end_step")
