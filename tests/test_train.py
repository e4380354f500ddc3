"""Tests of the training loop, its configs, metrics rows and exact resume, on synthetic data."""

import errno
import json
from pathlib import Path
import re
import shutil

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments.configs import fashion_mnist
import sparsejax
from sparsejax.data import ArraySource
from sparsejax.train import (
  checkpoints,
  experiment_config,
  flops,
  loop,
  models,
  optimizers,
  sharding,
  steps,
)
from sparsejax.train.logs import read_rows

NUM_TRAIN, NUM_TEST = 256, 70  # NUM_TEST is not a multiple of eval_batch_size: padding is used


def synthetic_data(seed: int = 0) -> tuple[ArraySource, ArraySource]:
  """Images whose brightness encodes the label, so a few steps learn something."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28, 1)) + labels[:, None, None, None] * 20
    return ArraySource(images.astype(np.uint8), labels)

  return split(NUM_TRAIN), split(NUM_TEST)


@pytest.fixture(scope="module")
def data():
  return synthetic_data()


def small_config(arg: str = "rigl", **overrides):
  config = fashion_mnist.get_config(arg)
  config.batch_size = 32
  config.num_steps = 30
  config.eval_batch_size = 32
  config.log_every = 5
  config.eval_every = 10
  config.checkpoint_every = 10
  if "update_every" in config.sparse:
    config.sparse.update_every = 5
  for key, value in overrides.items():
    config[key] = value
  return config


def masks_of(state):
  return jax.tree.leaves(sparsejax.masks(state.opt_state), is_leaf=lambda x: x is None)


def assert_exactly_sparse(state, nnz=None):
  masks, params = masks_of(state), jax.tree.leaves(state.params)
  assert len(masks) == len(params)
  for i, (mask, param) in enumerate(zip(masks, params)):
    if mask is not None:
      chex.assert_equal_shape([mask, param])
      assert not np.any(np.asarray(param)[~np.asarray(mask)])
      if nnz is not None:
        assert int(mask.sum()) == nnz[i]


def final_state(experiment, workdir=None):
  """Runs ``experiment`` and returns its summary and final TrainState (from the checkpoint)."""
  summary = loop.run(experiment, workdir, show_progress=False)
  state = None
  if workdir is not None:
    with loop.Checkpointer(workdir / loop.CHECKPOINT_DIR) as checkpointer:
      state, _ = checkpointer.restore(experiment.state)
  return summary, state


@pytest.mark.parametrize("method", ["static", "set", "rigl", "gmp", "dst"])
def test_sparse_training_is_exactly_sparse(data, method, tmp_path):
  experiment = loop.setup(small_config(method), data)
  initial = [None if m is None else int(m.sum()) for m in masks_of(experiment.state)]
  summary, state = final_state(experiment, tmp_path)
  assert int(state.step) == 30 and summary["steps"] == 30
  if method in ("static", "set", "rigl"):  # constant nnz, exactly the distribution's
    assert_exactly_sparse(state, initial)
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-5)
  else:
    assert_exactly_sparse(state)
  masks = sparsejax.summary(state.opt_state)
  assert summary["sparsity"] == pytest.approx(masks["sparsity"], abs=1e-12)
  assert summary["layers"] == pytest.approx({k: v["sparsity"] for k, v in masks["layers"].items()})
  assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["train_loss"])


def test_dense_learns(data):
  summary = loop.run(loop.setup(small_config("dense", num_steps=60), data), show_progress=False)
  assert summary["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
  assert summary["sparsity"] == 0.0 and summary["train_flops_ratio"] == 1.0
  assert summary["coverage"] is None


class ConvBatchNorm(nn.Module):
  """Conv → BatchNorm → ReLU → Dense: the smallest model with a mutable collection."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def test_batch_norm_model_state_is_trained_and_checkpointed(data, tmp_path, monkeypatch):
  """batch_stats are updated in training, used in evaluation and checkpointed."""
  monkeypatch.setitem(models.MODELS, "conv_bn", ConvBatchNorm)
  config = small_config("static", num_steps=4, eval_every=2, checkpoint_every=2, log_every=1)
  config.model = "conv_bn"
  experiment = loop.setup(config, data)
  assert "batch_stats" in experiment.state.model_state
  _, state = final_state(experiment, tmp_path)
  before = jax.tree.leaves(experiment.state.model_state)
  after = jax.tree.leaves(state.model_state)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert_exactly_sparse(state)


def test_metrics_rows(data, tmp_path):
  config = small_config("set", num_steps=32)  # 32: the last step is neither a log nor eval step
  experiment = loop.setup(config, data)
  summary = loop.run(experiment, tmp_path, show_progress=False)
  rows = read_rows(tmp_path / "metrics.jsonl")
  assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30, 32]
  evals = [row for row in rows if "test_accuracy" in row]
  assert [row["step"] for row in evals] == [10, 20, 30, 32]
  for row in rows:
    assert {"step", "epoch", "train_loss", "learning_rate", "sparsity"} <= set(row)
    assert row["epoch"] == row["step"] / (NUM_TRAIN // 32)
    assert row["learning_rate"] == pytest.approx(0.02)
    assert row["sparsity"] == pytest.approx(0.9, abs=1e-5)
  dense_step = 3 * 32 * 2 * (784 * 300 + 300 * 100 + 100 * 10)  # 3 x forward, batch 32
  for row in evals:
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["test_loss"] > 0
    assert set(row["layers"]) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    assert row["train_flops_dense"] == dense_step * row["step"]
    # SET never needs a dense gradient: 3 sparse passes at the constant density.
    assert row["train_flops"] == pytest.approx(row["train_flops_dense"] * row["inference_flops"]
                                               / row["inference_flops_dense"], rel=1e-6)
    assert 0.1 - 1e-6 <= row["coverage"] <= 1.0 and 0.0 <= row["churn"] <= 1.0
  coverages = [row["coverage"] for row in evals]
  assert coverages == sorted(coverages) and coverages[-1] > 0.1 + 1e-3  # SET explores
  assert evals[1]["churn"] > 0  # masks changed at steps 15 and 20
  assert evals[-1]["churn"] == 0  # no update between steps 30 and 32 (end_step = 24)
  assert summary["test_accuracy"] == evals[-1]["test_accuracy"]
  assert summary["coverage"] == evals[-1]["coverage"]
  written = json.loads((tmp_path / "summary.json").read_text())
  assert written == json.loads(json.dumps(summary))
  assert list((tmp_path / "tensorboard").iterdir())


def test_rigl_flops_count_dense_gradients_at_update_steps(data, tmp_path):
  config = small_config("rigl", num_steps=10, eval_every=10)
  experiment = loop.setup(config, data)
  loop.run(experiment, tmp_path, show_progress=False)
  row = read_rows(tmp_path / "metrics.jsonl")[-1]
  sparse, dense = row["inference_flops"], row["inference_flops_dense"]
  # Steps 5 and 10 are mask updates (update_every=5, end_step=round(0.75*10)=8: only step 5).
  expected = 32 * (9 * 3 * sparse + (2 * sparse + dense))
  assert row["train_flops"] == pytest.approx(expected, rel=1e-6)


def test_kernel_positions_and_flops_by_hand():
  model = sparsejax.train.get_model("lenet5")
  x = np.zeros((1, 28, 28, 1), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  positions = flops.kernel_positions(model, variables, x)
  assert positions == {"Conv_0/kernel": 24 * 24, "Conv_1/kernel": 8 * 8, "Dense_0/kernel": 1,
                       "Dense_1/kernel": 1}
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables["params"])
  masks = jax.tree.map(lambda p: np.arange(p.size).reshape(p.shape) % 4 == 0 if p.ndim > 1
                       else None, params)
  sparse, dense = flops.forward_flops(params, masks, positions)
  sizes = [(576, 5 * 5 * 20), (64, 5 * 5 * 20 * 50), (1, 800 * 500), (1, 500 * 10)]
  assert dense == sum(2 * p * n for p, n in sizes)
  assert float(sparse) == sum(2 * p * ((n + 3) // 4) for p, n in sizes)


def test_learning_rate_schedule_warmup_and_steps():
  opt = fashion_mnist.get_config("rigl").optimizer
  opt.update(learning_rate=0.1, schedule="step", decay_epochs=[2, 3], decay_factor=0.1,
             warmup_epochs=1)
  schedule = optimizers.learning_rate_schedule(opt, 10, 40)
  lrs = [float(schedule(step)) for step in range(40)]
  np.testing.assert_allclose(lrs[:10], 0.01 + 0.09 * np.arange(10) / 10, rtol=1e-5)
  np.testing.assert_allclose(lrs[10:20], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[20:30], 0.01, rtol=1e-5)
  np.testing.assert_allclose(lrs[30:], 0.001, rtol=1e-5)


def test_weight_decay_is_l2_in_the_gradient_for_sgd():
  opt = fashion_mnist.get_config("rigl").optimizer
  opt.update(learning_rate=0.5, momentum=0.0, weight_decay=0.1)
  tx = optimizers.make_optimizer(opt, 10, 100)
  params = {"w": np.array([2.0], np.float32)}
  updates, _ = tx.update({"w": np.array([1.0], np.float32)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 * (1.0 + 0.1 * 2.0))


def test_resolve_sparse_fills_defaults_and_end_step():
  sparse = experiment_config.resolve_sparse({"method": "rigl", "sparsity": 0.8, "end_step": -1},
                                            1000, end_fraction=0.6)
  assert sparse["end_step"] == 600 and sparse["update_every"] == 100
  assert sparse["drop_fraction"] == 0.3 and sparse["distribution"] == "erk"
  assert "dense" not in sparse


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "config.batch_size"),
    ("eval_batch_size", 0, "config.eval_batch_size"),
    ("model", "resnet9000", "config.model"),
    ("log_every", 0, "config.log_every"),
    ("eval_every", -3, "config.eval_every"),
    ("seed", -1, "config.seed"),
    ("sparse_end_fraction", 1.5, "config.sparse_end_fraction"),
])
def test_bad_config_fails_before_training(data, key, value, match):
  config = small_config("static")
  config[key] = value
  with pytest.raises(ValueError, match=match):
    loop.setup(config, data)


@pytest.mark.parametrize("section,key,value,match", [
    ("optimizer", "name", "lion", "config.optimizer.name"),
    ("optimizer", "learning_rate", -1.0, "config.optimizer.learning_rate"),
    ("optimizer", "decay_epochs", [3, 2], "config.optimizer.decay_epochs"),
    ("data", "crop_padding", -1, "config.data.crop_padding"),
    ("data", "dataset", "", "config.data.dataset"),
    ("sparse", "method", "magic", "config.sparse.method"),
    ("sparse", "sparsity", 1.0, "config.sparse: sparsity"),
    ("sparse", "distribution", "zipf", "config.sparse"),
])
def test_bad_section_key_fails_before_training(data, section, key, value, match):
  config = small_config("static")
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    loop.setup(config, data)


def test_batch_larger_than_dataset(data):
  with pytest.raises(ValueError, match="config.batch_size"):
    loop.setup(small_config("static", batch_size=NUM_TRAIN + 1), data)


def test_workdir_of_another_config_is_refused_untouched(data, tmp_path):
  loop.run(loop.setup(small_config("static", num_steps=10), data), tmp_path, show_progress=False)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  other = loop.setup(small_config("static", num_steps=10, seed=1), data)
  with pytest.raises(ValueError, match="config.seed = 0, not 1"):
    loop.run(other, tmp_path, show_progress=False)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def _params_equal(a, b):
  """Whether pytrees ``a`` and ``b`` have the same structure and leaves of equal dtype and value."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("method", ["set", "dst", "always_gse"])
def test_resume_from_an_older_checkpoint_is_bit_identical(data, tmp_path, method):
  """Drop the newest checkpoints and leave a half-written row: the rerun ends identical."""
  config = small_config(method, num_steps=30, checkpoint_every=10)
  config.keep_checkpoints = 5
  reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
  summary_a, state_a = final_state(loop.setup(config, data), reference)
  final_state(loop.setup(config, data), interrupted)
  for step in ("20", "30"):
    shutil.rmtree(interrupted / "checkpoints" / step)
  with (interrupted / "metrics.jsonl").open("a") as f:
    f.write('{"step": 31, "train_lo')  # a row cut by the kill
  (interrupted / "summary.json").unlink()
  summary_b, state_b = final_state(loop.setup(config, data), interrupted)
  assert _params_equal(state_a, state_b)
  chex.assert_trees_all_equal(state_a.opt_state, state_b.opt_state)  # masks or topology too
  assert ((reference / "metrics.jsonl").read_bytes()
          == (interrupted / "metrics.jsonl").read_bytes())
  for key in ("test_accuracy", "test_loss", "train_loss", "sparsity", "coverage", "layers"):
    assert summary_a[key] == summary_b[key], key


def test_partial_checkpoint_does_not_hide_the_previous_one(data, tmp_path):
  """A checkpoint directory left half-written by a kill is ignored (and cleaned up)."""
  config = small_config("rigl", num_steps=20, checkpoint_every=10)
  reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
  _, state_a = final_state(loop.setup(config, data), reference)
  final_state(loop.setup(config, data), interrupted)
  checkpoints = interrupted / "checkpoints"
  shutil.rmtree(checkpoints / "20")
  partial = checkpoints / "20.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(checkpoints / "10", partial)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\0" * 7)  # garbage, as if cut
  _, state_b = final_state(loop.setup(config, data), interrupted)
  assert _params_equal(state_a, state_b)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "20"]


def test_finished_run_is_reported_not_retrained(data, tmp_path):
  config = small_config("static", num_steps=10)
  first = loop.run(loop.setup(config, data), tmp_path, show_progress=False)
  rows = (tmp_path / "metrics.jsonl").read_bytes()
  again = loop.run(loop.setup(config, data), tmp_path, show_progress=False)
  assert (tmp_path / "metrics.jsonl").read_bytes() == rows
  for key in ("test_accuracy", "test_loss", "train_loss", "sparsity", "steps"):
    assert first[key] == again[key], key


def test_checkpoint_survives_donation_after_async_save(data, tmp_path):
  """The train step donates its state right after an asynchronous save started."""
  config = small_config("rigl", num_steps=5)
  experiment = loop.setup(config, data)
  step = steps.make_train_step(experiment)
  state = step(experiment.state, experiment.pipeline.batch(0))
  saved = jax.tree.map(np.array, state)
  with loop.Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, state, {"next_batch": 1})
    for s in range(1, 4):
      state = step(state, experiment.pipeline.batch(s))
    checkpointer.wait()
    restored, record = checkpointer.restore(experiment.state)
  assert record == {"next_batch": 1}
  assert _params_equal(saved, restored)
  chex.assert_trees_all_equal_structs(restored, experiment.state)


def test_dense_optimizer_has_no_masks(data):
  experiment = loop.setup(small_config("dense"), data)
  assert optax.tree_utils.tree_get(experiment.state.opt_state, "masks") is None
  assert experiment.state.tracker.eval_masks is None
  static = loop.setup(small_config("static"), data).state.opt_state
  assert optax.tree_utils.tree_get(static, "ever_active") is None


REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("method", ["rigl", "dst"])
def test_fashion_mnist_batches_are_standardised(method):
  """The model sees standardised inputs (mean ≈ 0, std ≈ 1), for every method."""
  config = fashion_mnist.get_config(method)
  config.data.data_dir = str(REAL_FASHION_MNIST)
  config.num_epochs = 1
  config.batch_size = 1024
  images = loop.setup(config).pipeline.batch(0)["image"]
  assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1.0) < 0.05
  config.data.normalize = False
  raw = loop.setup(config).pipeline.batch(0)["image"]
  assert raw.min() >= 0.0 and raw.max() <= 1.0


def learning_rates(data, tmp_path, **optimizer):
  config = small_config("static", num_steps=16, log_every=1, eval_every=16)
  config.optimizer.update(**optimizer)
  loop.run(loop.setup(config, data), tmp_path, show_progress=False)
  return [row["learning_rate"] for row in read_rows(tmp_path / "metrics.jsonl")]


def test_cosine_schedule_decays_to_zero_at_the_end(data, tmp_path):
  rates = learning_rates(data, tmp_path, schedule="cosine")
  assert len(rates) == 16 and rates[0] == pytest.approx(0.02)
  assert rates[-1] <= 0.01 * 0.02 and all(a > b for a, b in zip(rates, rates[1:]))


def test_step_schedule_drops_by_the_factor_at_its_epoch(data, tmp_path):
  # 256 examples in batches of 32: 8 steps per epoch; step s trains with schedule(s - 1).
  rates = learning_rates(data, tmp_path, schedule="step", decay_epochs=(1,), decay_factor=0.1)
  np.testing.assert_allclose(rates, [0.02] * 8 + [0.002] * 8, rtol=1e-6)


@pytest.mark.parametrize("optimizer,match", [
    ({"decay_epochs": (1,)}, "decay_epochs = \\(1,\\) does nothing with schedule 'constant'"),
    ({"schedule": "cosine", "decay_epochs": (1, 2)}, "at most one entry"),
    ({"schedule": "step"}, "decay_epochs is empty"),
    ({"schedule": "step", "decay_epochs": (1,)}, "decay_factor is needed"),
    ({"decay_factor": 0.5}, "decay_factor = 0.5 does nothing"),
    ({"schedule": "step", "decay_epochs": (1,), "decay_factor": 0.1, "warmup_epochs": 2},
     "inside the warm-up"),
])
def test_schedule_settings_it_would_ignore_are_refused(data, optimizer, match):
  config = small_config("static")
  config.optimizer.update(**optimizer)
  with pytest.raises(ValueError, match=match):
    loop.setup(config, data)


def test_check_builds_a_run_without_data_or_disk(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  resolved = loop.check(fashion_mnist.get_config("rigl"))
  assert resolved.sparse.end_step == round(0.75 * 10 * (60_000 // 128))
  assert list(tmp_path.iterdir()) == []
  config = fashion_mnist.get_config("rigl")
  config.data.dataset = "imagenet2012"
  with pytest.raises(ValueError, match="config.data.dataset: the shape of dataset"):
    loop.check(config)


def test_always_sparse_training_in_the_runner(data, tmp_path):
  """always_gse on sparse_mlp: the params are the 1 % active weights (ER, exact total),
  the topology rides in the optimizer state and changes, FLOPs and sparsity are read
  from the layers' sizes."""
  from sparsejax.nn import growth

  config = small_config("always_gse")
  assert config.model == "sparse_mlp" and config.sparse.sparsity == 0.99
  experiment = loop.setup(config, data)
  assert "topology" not in experiment.state.model_state
  first = jax.tree.map(np.asarray, growth.topology(experiment.state.opt_state))
  summary, state = final_state(experiment, tmp_path)
  shapes = [(784, 1024), (1024, 1024), (1024, 10)]
  counts = sparsejax.distributions.allocate_nnz(shapes, 0.99, "er")
  for i, nnz in enumerate(counts):
    assert state.params[f"SparseDense_{i}"]["values"].shape == (nnz,)
  assert summary["sparsity"] == pytest.approx(0.99, abs=1e-6)
  assert summary["layers"] == pytest.approx(
      {f"SparseDense_{i}/values": 1 - n / (a * b) for i, (n, (a, b)) in enumerate(zip(counts,
                                                                                     shapes))})
  assert summary["train_flops_ratio"] == pytest.approx(0.01, rel=1e-4)
  assert summary["inference_flops_ratio"] == pytest.approx(0.01, rel=1e-4)
  assert summary["coverage"] is None and 0.0 <= summary["test_accuracy"] <= 1.0
  last = growth.topology(state.opt_state)
  assert not np.array_equal(last["SparseDense_1"]["rows"], first["SparseDense_1"]["rows"])
  assert int(state.opt_state.rewired) > 0


@pytest.mark.parametrize("arg,match", [
    ("always_gse,lenet300100", "needs a model with always-sparse layers"),
    ("rigl,sparse_mlp", "has always-sparse layers; train it with always_gse"),
])
def test_always_sparse_models_and_methods_go_together(data, arg, match):
  with pytest.raises(ValueError, match=match) as error:
    loop.setup(small_config(arg), data)
  assert "\n" not in str(error.value)


def _with_a_bad_label(data):
  """The training split with example 7's label out of range: its loss, so the loss of
  every batch holding it, is NaN (its gradient stays finite)."""
  train, test = data
  labels = train.labels.copy()
  labels[7] = 99
  return ArraySource(train.images, labels), test


def test_skip_leaves_the_state_of_a_non_finite_step_unchanged(data, tmp_path):
  """``on_nonfinite="skip"``, one epoch: the one step whose batch holds the bad example
  is a RigL update step; it changes nothing but the step and the counts (params, every
  optimizer state leaf, the masks, which the clean data changes there), the others
  train; the run finishes with a skip counter of 1 and finite losses."""
  bad_data = _with_a_bad_label(data)
  config = small_config("rigl", on_nonfinite="skip", num_steps=NUM_TRAIN // 32)
  pipeline = loop.setup(config, bad_data).pipeline
  bad_step = next(s + 1 for s in range(config.num_steps) if 99 in pipeline.batch(s)["label"])
  config.sparse.update_every, config.sparse.end_step = bad_step, 100 * bad_step
  runs = {name: loop.setup(config, d) for name, d in (("bad", bad_data), ("clean", data))}
  for name, experiment in runs.items():
    step_for, state = steps.train_steps(experiment), experiment.state
    for step in range(1, bad_step + 1):
      before = jax.tree.map(np.asarray, state)
      batch = sharding.shard_batch(experiment.pipeline.batch(step - 1), experiment.mesh)
      state = step_for(step)(jax.tree.map(jax.numpy.asarray, before), batch)
    unchanged = [np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves((before.params, before.opt_state)),
        jax.tree.leaves((state.params, state.opt_state)), strict=True)]
    masks_kept = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(sparsejax.masks(before.opt_state)),
        jax.tree.leaves(sparsejax.masks(state.opt_state)), strict=True))
    assert all(unchanged) == masks_kept == (name == "bad"), name
    assert int(state.tracker.nonfinite_steps) == (name == "bad")
  summary = loop.run(runs["bad"], tmp_path, show_progress=False)
  assert summary["skipped_steps"] == 1 and summary["status"] == "finished"
  rows = read_rows(tmp_path / "metrics.jsonl")
  assert [row["skipped_steps"] for row in rows] == [int(row["step"] >= bad_step) for row in rows]
  assert all(np.isfinite(row["train_loss"]) for row in rows)


def test_a_full_disk_at_orbax_is_one_line_and_the_run_resumes(data, tmp_path, monkeypatch):
  """ENOSPC from orbax's save at step 20 (tensorstore writes from C++, so it is injected
  where the runner calls orbax): one line naming the directory; checkpoint 10 intact; the
  same run resumes from it and ends bit-identical."""
  _, reference = final_state(loop.setup(small_config("rigl"), data), tmp_path / "reference")
  run, experiment = tmp_path / "run", loop.setup(small_config("rigl"), data)
  save = ocp.CheckpointManager.save

  def full_disk(manager, step, *args, **kwargs):
    if step == 20:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  message = (f"cannot write checkpoint 20 in {run / loop.CHECKPOINT_DIR}: "
             "OSError: [Errno 28] No space left on device")
  with pytest.raises(loop.CheckpointError, match=f"^{re.escape(message)}$"):
    loop.run(experiment, run, show_progress=False)
  assert sorted(p.name for p in (run / loop.CHECKPOINT_DIR).iterdir()) == ["10"]
  monkeypatch.undo()
  _, resumed = final_state(experiment, run)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert ((tmp_path / "reference" / "metrics.jsonl").read_bytes()
          == (run / "metrics.jsonl").read_bytes())


def test_stop_raises_at_the_first_non_finite_step_and_checkpoints_nothing_after(data, tmp_path):
  experiment = loop.setup(small_config("rigl"), _with_a_bad_label(data))
  first_bad = next(s + 1 for s in range(experiment.num_steps)
                   if 99 in experiment.pipeline.batch(s)["label"])
  with pytest.raises(loop.Diverged, match=f"non-finite loss at step {first_bad};") as caught:
    loop.run(experiment, tmp_path, show_progress=False)
  assert caught.value.step == first_bad
  kept = sorted(int(p.name) for p in (tmp_path / loop.CHECKPOINT_DIR).iterdir()
                if p.name.isdigit())
  assert all(step < first_bad for step in kept) and caught.value.last_checkpoint == max(
      kept, default=None)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["failed_at_step"] == first_bad
  assert all(row["step"] < first_bad for row in read_rows(tmp_path / "metrics.jsonl"))


def test_checksums_change_with_any_bit_and_only_for_that_array():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(33, 7)).astype(np.float32), "m": rng.random((5, 9)) < 0.5,
          "k": jax.random.PRNGKey(3), "n": np.arange(6, dtype=np.int32),
          "h": rng.normal(size=10).astype(jax.numpy.bfloat16)}
  base = checkpoints.checksums(tree)
  assert base == checkpoints.checksums(jax.tree.map(np.copy, tree)) and len(set(base)) == 5
  for index, name in enumerate(sorted(tree)):
    changed = jax.tree.map(np.array, tree)
    flat = changed[name].view(np.uint8).reshape(-1) if name != "m" else changed[name].reshape(-1)
    position = len(flat) // 2
    flat[position] = ~flat[position] if name == "m" else flat[position] ^ 1
    after = checkpoints.checksums(changed)
    assert after[index] != base[index], name
    assert after[:index] + after[index + 1:] == base[:index] + base[index + 1:], name
  swapped = dict(tree, n=tree["n"][::-1].copy())  # the same words in another order
  assert checkpoints.checksums(swapped)[sorted(tree).index("n")] != base[sorted(tree).index("n")]
