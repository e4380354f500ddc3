"""Tests of the models and the training loop, on small synthetic data."""

import jax
import numpy as np
import pytest

from experiments.configs import fashion_mnist
import sparsejax
from sparsejax.train import experiment_config, get_model, loop, plots

NUM_TRAIN, NUM_TEST = 256, 70  # NUM_TEST is not a multiple of eval_batch_size: padding is used


def synthetic_data(seed: int = 0) -> dict:
  """Images whose mean brightness encodes the label, so a few steps learn something."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.uniform(0, 0.2, (n, 28, 28, 1)) + labels[:, None, None, None] / 12.0
    return {"image": images.astype(np.float32), "label": labels}

  return {"train": split(NUM_TRAIN), "test": split(NUM_TEST)}


@pytest.fixture(scope="module")
def data():
  return synthetic_data()


def small_config(arg: str = "rigl", **overrides):
  config = fashion_mnist.get_config(arg)
  config.batch_size = 32
  config.num_steps = 30
  config.eval_batch_size = 32
  if "update_every" in config.sparse:
    config.sparse.update_every = 5
  for key, value in overrides.items():
    config[key] = value
  return config


def assert_exactly_sparse(params, opt_state):
  masks = sparsejax.masks(opt_state)
  flat_masks = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
  flat_params = jax.tree.leaves(params)
  assert len(flat_masks) == len(flat_params)
  for mask, param in zip(flat_masks, flat_params):
    if mask is not None:
      assert mask.shape == param.shape
      assert not np.any(np.asarray(param)[~np.asarray(mask)])


def test_models_shapes():
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), np.float32)
  key = jax.random.PRNGKey(0)
  for name, kernels in [("lenet300100", [(784, 300), (300, 100), (100, 10)]),
                        ("lenet5", [(5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10)])]:
    model = get_model(name)
    params = jax.eval_shape(model.init, key, x)["params"]
    assert [p["kernel"].shape for p in params.values()] == kernels
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (2, 10)
  with pytest.raises(ValueError, match="unknown model"):
    get_model("resnet")


@pytest.mark.parametrize("method", ["rigl", "gmp"])
def test_sparse_training_is_exactly_sparse(data, method):
  experiment = loop.setup(small_config(method, num_steps=40), data)
  end_step = experiment.config.sparse.end_step
  assert end_step == 30  # 75 % of 40 steps
  result = loop.train(experiment)
  assert result.steps == 40 and np.isfinite(result.train_loss)
  assert_exactly_sparse(result.params, result.opt_state)
  assert sparsejax.summary(result.opt_state)["sparsity"] == pytest.approx(0.9, abs=1e-4)
  accuracy = loop.evaluate(experiment, result.params)
  assert 0.0 <= accuracy <= 1.0
  # 8 steps per epoch: a record after init and after each of the 5 epochs.
  assert [(r["step"], r["epoch"]) for r in result.history] == [(8 * e, e) for e in range(6)]
  initial = 0.1 if method == "rigl" else 1.0  # gmp starts dense
  assert result.history[0]["density"] == pytest.approx(initial, abs=1e-4)
  assert result.history[-1]["density"] == pytest.approx(0.1, abs=1e-4)
  for record in result.history:
    assert set(record["layers"]) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}


def test_train_and_evaluate_dense_learns(data):
  result = loop.train_and_evaluate(small_config("dense", num_steps=-1, num_epochs=3), data)
  assert set(result) == {"method", "sparsity", "layers", "test_accuracy", "train_loss", "steps",
                         "seconds", "history"}
  assert result["method"] == "dense" and result["sparsity"] == 0.0
  assert result["layers"] == {} and result["history"] == []  # no masks to read
  assert result["steps"] == 3 * (NUM_TRAIN // 32) and np.isfinite(result["train_loss"])
  assert result["test_accuracy"] > 0.2  # chance is 0.1


def test_dst_history_matches_summary(data):
  """12 steps of 8 per epoch: records at steps 0, 8 and 12 (the cut-short last epoch)."""
  experiment = loop.setup(small_config("dst", num_steps=12), data)
  trained = loop.train(experiment)
  assert_exactly_sparse(trained.params, trained.opt_state)
  history = trained.history
  assert [(r["step"], r["epoch"]) for r in history] == [(0, 0), (8, 1), (12, 2)]
  assert history[0]["density"] == 1.0  # thresholds start at 0: dense
  assert all(d == 1.0 for d in history[0]["layers"].values())
  assert history[-1]["density"] < 1.0  # the thresholds moved
  stats = sparsejax.summary(trained.opt_state)
  assert history[-1]["density"] == pytest.approx(1.0 - stats["sparsity"], abs=1e-12)
  for path, layer in stats["layers"].items():
    assert history[-1]["layers"][path] == pytest.approx(1.0 - layer["sparsity"], abs=1e-12)
  for record in history:  # the global density weighs the layers by size
    nnz = sum(record["layers"][p] * layer["size"] for p, layer in stats["layers"].items())
    assert record["density"] == pytest.approx(nnz / stats["size"])
  result = loop.run(experiment)  # the same seed: the same run
  assert result["history"] == history
  assert result["sparsity"] == pytest.approx(stats["sparsity"], abs=1e-12)
  assert result["layers"] == pytest.approx(
      {path: layer["sparsity"] for path, layer in stats["layers"].items()}, abs=1e-12)


def test_plot_density(tmp_path):
  history = [{"step": 10 * e, "epoch": e, "density": d,
              "layers": {"Dense_0/kernel": d / 2, "Dense_1/kernel": d}}
             for e, d in enumerate([1.0, 0.3, 0.1])]
  series = plots.density_series(history)
  assert series == {"Dense_0/kernel": [50.0, 15.0, 5.0], "Dense_1/kernel": [100.0, 30.0, 10.0],
                    "global": [100.0, 30.0, 10.0]}
  assert plots.use_log_scale(series) and not plots.use_log_scale({"global": [100.0, 40.0]})
  path = tmp_path / "density.png"
  plots.plot_density(history, path, title="dst: test accuracy 88.00 %")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="at least one"):
    plots.plot_density([], tmp_path / "empty.png")


def test_dst_config_uses_the_paper_settings():
  for arg, model in [("dst", "lenet300100"), ("dst,lenet5", "lenet5")]:
    config = fashion_mnist.get_config(arg)
    assert config.model == model
    assert config.sparse.to_dict() == {"method": "dst", "alpha": 5e-4, "recovery_density": 0.01}
    assert (config.optimizer, config.momentum, config.learning_rate) == ("sgd", 0.9, 0.01)
    assert (config.batch_size, config.num_epochs, config.num_steps) == (64, 20, -1)
    assert "weight_decay" not in config
  assert experiment_config.total_steps(fashion_mnist.get_config("dst"), 60_000) == 20 * 937
  dense = experiment_config.with_method(fashion_mnist.get_config("dst"), "dense")  # the baseline's settings
  assert (dense.learning_rate, dense.batch_size, dense.num_epochs) == (0.01, 64, 20)


def test_lenet5_static_adam(data):
  config = small_config("static,lenet5", num_steps=2, batch_size=8, optimizer="adam")
  result = loop.train_and_evaluate(config, data)
  assert result["method"] == "static" and result["steps"] == 2
  assert result["sparsity"] == pytest.approx(0.9, abs=1e-4)
  assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize("key,value,match", [
    ("model", "vgg", "config.model"),
    ("batch_size", 0, "config.batch_size"),
    ("batch_size", 10_000, "config.batch_size"),
    ("eval_batch_size", -1, "config.eval_batch_size"),
    ("optimizer", "lamb", "config.optimizer"),
    ("learning_rate", 0.0, "config.learning_rate"),
    ("momentum", 1.0, "config.momentum"),
])
def test_bad_config_fails_before_training(data, monkeypatch, key, value, match):
  monkeypatch.setattr(loop, "train", lambda *a: pytest.fail("training started"))
  config = small_config()
  config.unlock()
  config[key] = value
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(config, data)


@pytest.mark.parametrize("key,value,match", [
    ("sparsity", 1.5, "sparsity must be in"),
    ("distribution", "xx", "unknown distribution"),
    ("method", "magic", "unknown method"),
    ("nonsense", 1, "takes no config key"),
])
def test_bad_sparse_config_fails_before_training(data, monkeypatch, key, value, match):
  monkeypatch.setattr(loop, "train", lambda *a: pytest.fail("training started"))
  config = small_config()
  config.sparse[key] = value
  with pytest.raises(ValueError, match=f"config.sparse: .*{match}"):
    loop.train_and_evaluate(config, data)


def test_missing_key():
  config = small_config()
  del config["num_steps"]
  with pytest.raises(ValueError, match="config.num_steps is missing"):
    experiment_config.validate_config(config)


def test_resolve_sparse_end_step():
  rigl = fashion_mnist.get_config("rigl").sparse
  assert experiment_config.resolve_sparse(rigl, 4680)["end_step"] == 3510
  gmp = fashion_mnist.get_config("gmp").sparse
  assert experiment_config.resolve_sparse(gmp, 4680)["end_step"] == 3510
  gmp.end_step = 1234
  assert experiment_config.resolve_sparse(gmp, 4680)["end_step"] == 1234  # explicit values are kept


def test_with_method_keeps_accepted_keys():
  config = fashion_mnist.get_config("rigl")
  config.sparse.sparsity = 0.8
  static = experiment_config.with_method(config, "static").sparse.to_dict()
  assert static == {"method": "static", "sparsity": 0.8, "distribution": "erk", "seed": 0}
  gmp = experiment_config.with_method(config, "gmp").sparse
  assert gmp.end_step == -1 and gmp.update_every == 100 and "drop_fraction" not in gmp
  rigl = experiment_config.with_method(experiment_config.with_method(config, "static"), "rigl").sparse
  assert rigl.end_step == -1 and rigl.sparsity == 0.8
  assert experiment_config.with_method(config, "dense").sparse.to_dict() == {"method": "dense"}
  assert config.sparse.method == "rigl"  # the input is not modified
  with pytest.raises(ValueError, match="sparsity"):
    experiment_config.with_method(fashion_mnist.get_config("dense"), "rigl")


@pytest.mark.parametrize("arg", [*fashion_mnist.METHODS, "dst,lenet5"])
def test_configs_build(arg):
  """Every config's sparse section matches its method's signature."""
  config = fashion_mnist.get_config(arg)
  experiment_config.validate_config(config)
  sparse = experiment_config.resolve_sparse(config.sparse, 1000)
  assert sparsejax.from_config(sparse, experiment_config.make_optimizer(config)) is not None


def test_config_argument_errors():
  assert fashion_mnist.get_config().sparse.method == "rigl"
  assert fashion_mnist.get_config("gmp,lenet5").model == "lenet5"
  with pytest.raises(ValueError, match="unknown method"):
    fashion_mnist.get_config("foo")
  with pytest.raises(ValueError, match="unknown model"):
    fashion_mnist.get_config("rigl,vgg")
