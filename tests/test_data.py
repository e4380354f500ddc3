"""Tests of the IDX reader and the batch iterator."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from sparsejax.data import idx, load_idx_dataset, read_idx, write_idx, write_idx_dataset

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def synthetic(num_train: int = 12, num_test: int = 5, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {split: {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  "label": rng.integers(0, 10, n).astype(np.uint8)}
          for split, n in (("train", num_train), ("test", num_test))}


def assert_matches(loaded: dict, raw: dict) -> None:
  for split in ("train", "test"):
    image, label = loaded[split]["image"], loaded[split]["label"]
    assert image.dtype == np.float32 and image.shape == (*raw[split]["image"].shape, 1)
    assert label.dtype == np.int32
    np.testing.assert_allclose(image[..., 0] * 255.0, raw[split]["image"], atol=1e-3)
    np.testing.assert_array_equal(label, raw[split]["label"])


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"Fashion-MNIST not installed in {REAL_DIR} "
                    "(apt-get install -y dataset-fashion-mnist)")
def test_reads_real_fashion_mnist():
  data = load_idx_dataset("fashion_mnist", REAL_DIR)
  assert data["train"]["image"].shape == (60000, 28, 28, 1)
  assert data["test"]["image"].shape == (10000, 28, 28, 1)
  for split in data.values():
    assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
    assert 0.0 <= split["image"].min() and split["image"].max() <= 1.0
    np.testing.assert_array_equal(np.unique(split["label"]), np.arange(10))


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(tmp_path, compress):
  raw = synthetic()
  write_idx_dataset(tmp_path, raw, compress=compress)
  suffix = ".gz" if compress else ""
  assert (tmp_path / f"train-images-idx3-ubyte{suffix}").is_file()
  assert_matches(load_idx_dataset("fashion_mnist", tmp_path), raw)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_write_idx_dtypes(tmp_path, dtype):
  array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
  write_idx(tmp_path / "a.idx", array)
  back = read_idx(tmp_path / "a.idx")
  assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
  np.testing.assert_array_equal(back, array)


def test_gzip_detected_by_content_not_name(tmp_path):
  write_idx(tmp_path / "labels.gz", np.arange(7, dtype=np.uint8))
  (tmp_path / "labels").write_bytes((tmp_path / "labels.gz").read_bytes())
  np.testing.assert_array_equal(read_idx(tmp_path / "labels"), np.arange(7))


def test_finds_dataset_subdirectory(tmp_path):
  raw = synthetic()
  write_idx_dataset(tmp_path / "fashion-mnist", raw)
  assert_matches(load_idx_dataset("fashion_mnist", tmp_path), raw)


def test_env_var_is_honoured(tmp_path, monkeypatch):
  raw = synthetic(seed=1)
  write_idx_dataset(tmp_path, raw)
  monkeypatch.setenv(idx.ENV_VAR, str(tmp_path))
  assert_matches(load_idx_dataset(), raw)


def test_data_dir_argument_beats_env_var(tmp_path, monkeypatch):
  raw = synthetic(seed=2)
  write_idx_dataset(tmp_path / "a", raw)
  monkeypatch.setenv(idx.ENV_VAR, str(tmp_path / "empty"))
  assert_matches(load_idx_dataset("fashion_mnist", tmp_path / "a"), raw)


def test_missing_files_error_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setenv(idx.ENV_VAR, str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    load_idx_dataset()
  message = str(error.value)
  assert "\n" not in message
  for part in (str(tmp_path), "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
               "apt-get install -y dataset-fashion-mnist",
               "https://github.com/zalandoresearch/fashion-mnist", "SPARSEJAX_DATA_DIR"):
    assert part in message


def test_partial_dataset_is_missing(tmp_path):
  write_idx_dataset(tmp_path, synthetic())
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="not found"):
    load_idx_dataset("fashion_mnist", tmp_path)


def test_mnist_default_directory(monkeypatch):
  monkeypatch.delenv(idx.ENV_VAR, raising=False)
  if Path("/usr/share/datasets/mnist").is_dir():
    pytest.skip("MNIST is installed")
  with pytest.raises(FileNotFoundError, match="/usr/share/datasets/mnist"):
    load_idx_dataset("mnist")


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown IDX dataset"):
    load_idx_dataset("cifar10")


def test_bad_magic_number(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
  with pytest.raises(ValueError, match="bad magic number"):
    read_idx(tmp_path / "bad")


def test_truncated_file(tmp_path):
  write_idx(tmp_path / "a", np.zeros((4, 28, 28), np.uint8))
  (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-10])
  with pytest.raises(ValueError, match="data bytes"):
    read_idx(tmp_path / "b")


def test_corrupt_gzip(tmp_path):
  data = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04" + bytes(4))
  (tmp_path / "a.gz").write_bytes(data[:-12])
  with pytest.raises(ValueError, match="corrupt gzip"):
    read_idx(tmp_path / "a.gz")


def test_wrong_shapes_are_rejected(tmp_path):
  write_idx_dataset(tmp_path, synthetic())
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 32, 32), np.uint8))
  with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
    load_idx_dataset("fashion_mnist", tmp_path)


def test_label_count_mismatch(tmp_path):
  write_idx_dataset(tmp_path, synthetic())
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((11,), np.uint8))
  with pytest.raises(ValueError, match="12 images but"):
    load_idx_dataset("fashion_mnist", tmp_path)
