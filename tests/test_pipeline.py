"""Tests of the random-access sources and the training / evaluation pipelines."""

import gc
import itertools
from pathlib import Path
import subprocess
import sys
import threading

import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from sparsejax.data import (
    NORMALIZATION,
    ArraySource,
    RandomAccessSource,
    TrainPipeline,
    crop_and_flip,
    eval_batches,
    load_idx_dataset,
    load_source,
    num_classes,
    preprocess,
    sources,
    write_idx_dataset,
)

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10"]


def make_source(n: int = 40, shape: tuple = (6, 5, 3), seed: int = 0,
                low: int = 0) -> ArraySource:
  """Random images; example i has label i, so labels identify examples."""
  rng = np.random.default_rng(seed)
  return ArraySource(rng.integers(low, 256, (n, *shape), dtype=np.uint8), np.arange(n))


def take(iterator, count: int) -> list:
  return list(itertools.islice(iterator, count))


def assert_batches_equal(actual: list, expected: list) -> None:
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    np.testing.assert_array_equal(a["image"], e["image"])
    np.testing.assert_array_equal(a["label"], e["label"])


def reference_crop_flip(images, offsets, flips, padding):
  """A naive per-example implementation of pad, crop and mirror."""
  out = []
  for i, image in enumerate(images):
    h, w, c = image.shape
    padded = np.zeros((h + 2 * padding, w + 2 * padding, c), image.dtype)
    padded[padding:padding + h, padding:padding + w] = image
    top, left = offsets[i] if offsets is not None else (padding, padding)
    crop = padded[top:top + h, left:left + w]
    out.append(crop[:, ::-1] if flips is not None and flips[i] else crop)
  return np.stack(out)


def prefetch_threads() -> list:
  return [t for t in threading.enumerate() if t.name == "sparsejax-prefetch" and t.is_alive()]


# Sources.


def test_array_source_basics():
  source = make_source(10)
  assert len(source) == 10
  example = source[3]
  chex.assert_shape(example["image"], (6, 5, 3))
  assert example["label"] == 3 and isinstance(example["label"], int)
  batch = source.gather(np.array([4, 1, 4]))
  chex.assert_shape(batch["image"], (3, 6, 5, 3))
  chex.assert_type(batch["image"], np.uint8)
  chex.assert_type(batch["label"], np.int32)
  np.testing.assert_array_equal(batch["label"], [4, 1, 4])
  np.testing.assert_array_equal(batch["image"][1], source.images[1])


def test_array_source_adds_channel_axis_and_validates():
  source = ArraySource(np.zeros((4, 7, 7), np.uint8), np.zeros(4, np.int64))
  chex.assert_shape(source.images, (4, 7, 7, 1))
  with pytest.raises(ValueError, match="uint8"):
    ArraySource(np.zeros((4, 7, 7, 1), np.float32), np.zeros(4))
  with pytest.raises(ValueError, match=r"shape \[4\]"):
    ArraySource(np.zeros((4, 7, 7, 1), np.uint8), np.zeros(3, np.int32))


def test_load_source_reads_idx_as_uint8(tmp_path):
  rng = np.random.default_rng(0)
  raw = {split: {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                 "label": rng.integers(0, 10, n).astype(np.uint8)}
         for split, n in (("train", 9), ("test", 4))}
  write_idx_dataset(tmp_path, raw)
  for split in ("train", "test"):
    source = load_source("fashion_mnist", split, str(tmp_path))
    assert isinstance(source, ArraySource)
    chex.assert_shape(source.images, (len(raw[split]["label"]), 28, 28, 1))
    chex.assert_type(source.images, np.uint8)
    np.testing.assert_array_equal(source.images[..., 0], raw[split]["image"])
    np.testing.assert_array_equal(source.labels, raw[split]["label"])
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    load_source("fashion_mnist", "validation", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="mnist IDX files not found"):
    load_source("mnist", "train", str(tmp_path / "missing"))


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"Fashion-MNIST not installed in {REAL_DIR}")
def test_real_fashion_mnist_source_and_normalisation():
  source = load_source("fashion_mnist", "train", str(REAL_DIR))
  chex.assert_shape(source.images, (60000, 28, 28, 1))
  chex.assert_type(source.images, np.uint8)
  floats = load_idx_dataset("fashion_mnist", REAL_DIR)["train"]
  np.testing.assert_array_equal(source.labels, floats["label"])
  np.testing.assert_array_equal(preprocess(source.images[:500]), floats["image"][:500])
  mean, std = NORMALIZATION["fashion_mnist"]
  pipeline = TrainPipeline(source, batch_size=8192, seed=0, mean=mean, std=std)
  images = pipeline.batch(0)["image"]
  assert abs(images.mean()) < 0.02 and abs(images.std() - 1.0) < 0.02
  assert num_classes("fashion_mnist") == 10


# Training batches: determinism, resumption, coverage.


def augmented(source, seed=0, batch_size=8, **kwargs) -> TrainPipeline:
  return TrainPipeline(source, batch_size=batch_size, seed=seed, crop_padding=2, flip=True,
                       mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs)


def test_batch_shapes_and_dtypes():
  batch = augmented(make_source()).batch(0)
  chex.assert_shape(batch["image"], (8, 6, 5, 3))
  chex.assert_type(batch["image"], np.float32)
  chex.assert_shape(batch["label"], (8,))
  chex.assert_type(batch["label"], np.int32)
  assert batch["image"].flags.c_contiguous


def test_same_seed_same_batches_different_seed_differs():
  source = make_source()
  first = [augmented(source, seed=3).batch(s) for s in range(7)]
  assert_batches_equal([augmented(source, seed=3).batch(s) for s in range(7)], first)
  other = [augmented(source, seed=4).batch(s) for s in range(7)]
  assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iterate_yields_batch_of_each_step(prefetch):
  pipeline = augmented(make_source(), batch_size=16)  # 2 steps per epoch
  expected = [pipeline.batch(s) for s in range(7)]
  iterator = pipeline.iterate(prefetch=prefetch)
  assert_batches_equal(take(iterator, 7), expected)
  iterator.close()


@pytest.mark.parametrize("start", [1, 2, 5])
def test_resume_equals_tail_across_epochs(start):
  pipeline = augmented(make_source(), batch_size=16)
  full = take(pipeline.iterate(0, prefetch=2), 8)
  assert_batches_equal(take(pipeline.iterate(start, prefetch=2), 8 - start), full[start:])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 30), batch_size=st.integers(1, 8), start=st.integers(0, 40),
       seed=st.integers(0, 2**32 - 1), prefetch=st.integers(0, 2), crop=st.integers(0, 3),
       flip=st.booleans())
def test_resume_anywhere_gives_the_same_batches(n, batch_size, start, seed, prefetch, crop, flip):
  batch_size = min(batch_size, n)
  pipeline = TrainPipeline(make_source(n, (4, 3, 2)), batch_size, seed, crop_padding=crop,
                           flip=flip)
  full = take(pipeline.iterate(0, prefetch=0), start + 3)
  resumed = pipeline.iterate(start, prefetch=prefetch)
  assert_batches_equal(take(resumed, 3), full[start:])
  resumed.close()


def test_every_example_once_per_epoch_and_epochs_differ():
  source = make_source(43)
  pipeline = augmented(source, batch_size=5)
  assert pipeline.steps_per_epoch == 8
  orders = []
  for epoch in range(3):
    steps = range(epoch * 8, (epoch + 1) * 8)
    labels = np.concatenate([pipeline.batch(s)["label"] for s in steps])
    assert len(np.unique(labels)) == 40  # 3 examples dropped: the partial batch
    orders.append(labels.tolist())
  assert orders[0] != orders[1] != orders[2]


def test_plain_batches_are_the_scaled_examples():
  source = make_source()
  pipeline = TrainPipeline(source, batch_size=8, seed=1)
  batch = pipeline.batch(3)
  np.testing.assert_array_equal(batch["image"], source.images[batch["label"]] / np.float32(255))


# Augmentation.


@pytest.mark.parametrize("crop,flip", [(2, True), (3, False), (0, True), (1, True)])
def test_augmentation_matches_naive_reference(crop, flip):
  source = make_source(60, (7, 9, 3), low=1)
  pipeline = TrainPipeline(source, batch_size=20, seed=5, crop_padding=crop, flip=flip)
  for step in range(6):
    offsets, flips = pipeline.augmentation(step)
    raw = source.gather(pipeline.indices(step))["image"]
    expected = reference_crop_flip(raw, offsets, flips, crop)
    np.testing.assert_array_equal(pipeline.batch(step)["image"], preprocess(expected))
    np.testing.assert_array_equal(crop_and_flip(raw, offsets, flips, crop), expected)


def test_crop_offsets_span_the_range_and_pad_with_zeros():
  padding = 3
  source = make_source(64, (8, 8, 1), low=1)  # no zero pixel in the data
  pipeline = TrainPipeline(source, batch_size=64, seed=0, crop_padding=padding)
  offsets = np.concatenate([pipeline.augmentation(s)[0] for s in range(10)])
  assert offsets.min() == 0 and offsets.max() == 2 * padding
  assert set(np.unique(offsets)) == set(range(2 * padding + 1))
  images = pipeline.batch(0)["image"]
  offsets, _ = pipeline.augmentation(0)
  for image, (top, left) in zip(images, offsets):
    zero_rows = np.all(image == 0, axis=(1, 2))
    zero_cols = np.all(image == 0, axis=(0, 2))
    assert zero_rows.sum() == abs(top - padding) and zero_cols.sum() == abs(left - padding)
    assert np.count_nonzero(image) == (8 - abs(top - padding)) * (8 - abs(left - padding))


def test_flip_is_a_horizontal_mirror_half_the_time():
  source = make_source(200, (4, 6, 3))
  pipeline = TrainPipeline(source, batch_size=200, seed=2, flip=True)
  _, flips = pipeline.augmentation(0)
  assert 70 < flips.sum() < 130
  batch = pipeline.batch(0)
  raw = source.images[batch["label"]] / np.float32(255)
  np.testing.assert_array_equal(batch["image"][flips], raw[flips][:, :, ::-1])
  np.testing.assert_array_equal(batch["image"][~flips], raw[~flips])


def test_crop_and_flip_rejects_bad_offsets():
  with pytest.raises(ValueError, match="offsets"):
    crop_and_flip(np.zeros((2, 4, 4, 1), np.uint8), np.array([[0, 5], [1, 1]]), None, 2)


def test_crop_and_flip_does_not_modify_its_input():
  images = make_source(4).images.copy()
  before = images.copy()
  crop_and_flip(images, None, np.ones(4, bool))
  np.testing.assert_array_equal(images, before)


# Normalisation and sharding.


def test_normalisation():
  images = make_source(5).images
  expected = (images / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
  np.testing.assert_allclose(preprocess(images, CIFAR_MEAN, CIFAR_STD), expected, atol=1e-5)
  np.testing.assert_allclose(preprocess(images, (0.5,), (0.25,)), (images / 255 - 0.5) / 0.25,
                             atol=1e-5)
  chex.assert_type(preprocess(images), np.float32)
  np.testing.assert_array_equal(preprocess(images), images / np.float32(255))
  pipeline = TrainPipeline(make_source(5), 5, 0, mean=CIFAR_MEAN, std=CIFAR_STD)
  batch = pipeline.batch(0)
  np.testing.assert_allclose(batch["image"], expected[batch["label"]], atol=1e-5)
  assert [len(NORMALIZATION[k][0]) for k in ("cifar10", "cifar100", "mnist", "fashion_mnist")] \
      == [3, 3, 1, 1]


def test_normalisation_errors():
  images = make_source(2).images
  with pytest.raises(ValueError, match="1 or 3 values"):
    preprocess(images, (0.1, 0.2), (0.3, 0.4))
  with pytest.raises(ValueError, match="both mean and std"):
    preprocess(images, CIFAR_MEAN)
  with pytest.raises(ValueError, match="positive"):
    preprocess(images, (0.5,), (0.0,))


@pytest.mark.parametrize("count", [2, 4])
def test_shards_partition_the_global_batch(count):
  source = make_source()
  whole = augmented(source, batch_size=8)
  shards = [augmented(source, batch_size=8, shard_index=i, shard_count=count)
            for i in range(count)]
  for step in (0, 4, 9):
    parts = [shard.batch(step) for shard in shards]
    for part in parts:
      chex.assert_shape(part["image"], (8 // count, 6, 5, 3))
    expected = whole.batch(step)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), expected["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), expected["label"])


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 6, "shard_count": 4}, "multiple of shard_count"),
    ({"shard_index": 2, "shard_count": 2}, "shard_index"),
    ({"batch_size": 41}, "exceeds the 40 examples"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"crop_padding": -1}, "crop_padding"),
    ({"mean": (0.5,)}, "both mean and std"),
])
def test_pipeline_rejects_bad_arguments(kwargs, match):
  arguments = {"source": make_source(), "batch_size": 8, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    TrainPipeline(**arguments)


def test_bad_steps_are_rejected():
  pipeline = TrainPipeline(make_source(), 8, 0)
  with pytest.raises(ValueError, match="step must be >= 0"):
    pipeline.batch(-1)
  with pytest.raises(ValueError, match="prefetch"):
    pipeline.iterate(0, prefetch=-1)


# The prefetch thread.


def test_prefetch_thread_stops_on_close_and_garbage_collection():
  pipeline = augmented(make_source())
  assert not prefetch_threads()
  iterator = pipeline.iterate(prefetch=2)
  assert not prefetch_threads()  # nothing starts before the first batch is asked for
  next(iterator)
  assert len(prefetch_threads()) == 1
  iterator.close()
  assert not prefetch_threads()
  iterator = pipeline.iterate(prefetch=2)
  next(iterator)
  del iterator
  gc.collect()
  assert not prefetch_threads()


def test_prefetch_thread_errors_reach_the_consumer():

  class Failing(ArraySource):

    def gather(self, indices):
      if 0 in indices:
        raise RuntimeError("broken example")
      return super().gather(indices)

  source = make_source()
  pipeline = TrainPipeline(Failing(source.images, source.labels), batch_size=40, seed=0)
  with pytest.raises(RuntimeError, match="broken example"):
    next(pipeline.iterate(prefetch=2))
  assert not prefetch_threads()


def test_interpreter_exits_with_an_open_iterator():
  code = ("import numpy as np\n"
          "from sparsejax.data import ArraySource, TrainPipeline\n"
          "source = ArraySource(np.zeros((64, 8, 8, 3), np.uint8), np.arange(64))\n"
          "iterator = TrainPipeline(source, 8, 0, crop_padding=2).iterate(prefetch=2)\n"
          "next(iterator)\n"
          "print('done')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "done"


# Evaluation batches.


@pytest.mark.parametrize("n,batch_size", [(23, 5), (20, 5), (3, 8)])
def test_eval_batches_cover_every_example_once(n, batch_size):
  source = make_source(n)
  seen = []
  for images, labels, valid in eval_batches(source, batch_size, CIFAR_MEAN, CIFAR_STD):
    chex.assert_shape(images, (batch_size, 6, 5, 3))
    chex.assert_type(images, np.float32)
    chex.assert_shape([labels, valid], (batch_size,))
    chex.assert_type([labels, valid], [np.int32, bool])
    np.testing.assert_array_equal(images[valid],
                                  preprocess(source.images[labels[valid]], CIFAR_MEAN, CIFAR_STD))
    assert np.all(images[~valid] == 0) and np.all(labels[~valid] == 0)
    assert valid.tolist() == sorted(valid.tolist(), reverse=True)  # padding only at the end
    seen.extend(labels[valid].tolist())
  assert seen == list(range(n))


# tensorflow-datasets.


@pytest.fixture
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_cifar10_reads_into_memory(tfds):
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    source = load_source("cifar10", "train")
    lazy = load_source("cifar10", "train", in_memory_limit=0)
    indices = np.array([6, 0, 3])
    got = lazy.gather(indices)
    assert lazy[2]["label"] == source[2]["label"]
  assert isinstance(source, ArraySource) and len(source) == 7
  chex.assert_shape(source.images, (7, 32, 32, 3))
  chex.assert_type([source.images, source.labels], [np.uint8, np.int32])
  assert np.all((0 <= source.labels) & (source.labels < 10))
  assert isinstance(lazy, RandomAccessSource) and len(lazy) == 7
  chex.assert_type([got["image"], got["label"]], [np.uint8, np.int32])
  expected = source.gather(indices)
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["label"], expected["label"])
  batch = TrainPipeline(source, 4, 0, crop_padding=4, flip=True).batch(1)
  chex.assert_shape(batch["image"], (4, 32, 32, 3))


def test_tfds_num_classes(tfds):
  assert num_classes("cifar10") == 10
  assert num_classes("cifar100") == 100


def assert_one_line(error, *parts):
  message = str(error.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, message


def test_tfds_missing_dataset_is_one_line(tfds, tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    load_source("cifar10", "train", str(tmp_path))
  assert_one_line(error, "cifar10", str(tmp_path), "tfds build cifar10", "array_record",
                  "download=True")


def test_tfds_failed_download_is_one_line(tfds, tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("no network\nsecond line")

  monkeypatch.setattr(tfds, "data_source", offline)
  with pytest.raises(FileNotFoundError) as error:
    load_source("cifar10", "train", str(tmp_path), download=True)
  assert_one_line(error, "cifar10", str(tmp_path), "download failed: no network")


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "cifar_10"])
def test_tfds_unknown_name_is_one_line(tfds, tmp_path, name):
  with pytest.raises(ValueError) as error:
    load_source(name, "train", str(tmp_path))
  assert_one_line(error, f"unknown dataset {name!r}", "fashion_mnist")
  with pytest.raises(ValueError, match="unknown dataset"):
    num_classes(name)


def test_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ValueError) as error:
    load_source("cifar10", "train")
  assert_one_line(error, "'cifar10' needs tensorflow-datasets",
                  "pip install 'sparsejax[tfds]'")


def test_variable_size_images_are_rejected():
  records = [{"image": np.zeros((4, 4, 3), np.uint8), "label": 0},
             {"image": np.zeros((5, 4, 3), np.uint8), "label": 1}]
  with pytest.raises(ValueError, match="varying size"):
    sources.read_into_memory(records, "toy")
  with pytest.raises(ValueError, match="'image' and 'label'"):
    sources.read_into_memory([{"img": 0}], "toy")
