"""A built-in reader for MNIST-format IDX files (MNIST, Fashion-MNIST).

The IDX format is a 4-byte magic number ``00 00 <dtype> <ndim>``, ``ndim``
big-endian int32 dimensions, then the values in C order. Files may be gzipped
(detected from their first bytes, whatever their name). No TensorFlow needed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

ENV_VAR = "SPARSEJAX_DATA_DIR"

# name -> (default directory, sub-directory name tried under any root, help on getting the files).
DATASETS = {
    "fashion_mnist": (
        "/usr/share/datasets/fashion-mnist", "fashion-mnist",
        "install them with `apt-get install -y dataset-fashion-mnist` (Debian) or download the "
        "IDX files from https://github.com/zalandoresearch/fashion-mnist"),
    "mnist": (
        "/usr/share/datasets/mnist", "mnist",
        "download the four MNIST IDX files (yann.lecun.com/exdb/mnist or a mirror)"),
}

SPLITS = {"train": "train", "test": "t10k"}

# IDX type code -> numpy dtype (big-endian).
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_GZIP_MAGIC = b"\x1f\x8b"


def _file_names(split_prefix: str) -> tuple[str, str]:
  return f"{split_prefix}-images-idx3-ubyte", f"{split_prefix}-labels-idx1-ubyte"


def _expected_names() -> list[str]:
  return [name for prefix in SPLITS.values() for name in _file_names(prefix)]


def _read_bytes(path: Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise ValueError(f"corrupt gzip IDX file {path}: {e}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file, gzipped or raw.

  Args:
    path: the file.

  Returns:
    A numpy array with the file's shape and dtype (native byte order).

  Raises:
    ValueError: for a bad magic number or a size that does not match the header.
  """
  path = Path(path)
  data = _read_bytes(path)
  if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _DTYPES or data[3] == 0:
    raise ValueError(f"not an IDX file (bad magic number {data[:4].hex() or 'empty'}): {path}")
  dtype, ndim = _DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"truncated IDX header in {path}")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f"IDX file {path} holds {len(data) - header} data bytes but its header "
                     f"{shape} needs {expected}")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``.

  Args:
    path: destination file.
    array: any array whose dtype IDX supports (uint8, int8, int16, int32, float32, float64).
  """
  array = np.asarray(array)
  codes = {dtype.newbyteorder("="): code for code, dtype in _DTYPES.items()}
  code = codes.get(array.dtype.newbyteorder("="))
  if code is None:
    raise ValueError(f"IDX cannot store dtype {array.dtype}")
  big_endian = array.astype(_DTYPES[code], copy=False)
  data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
          + big_endian.tobytes())
  path = Path(path)
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_idx_dataset(directory: str | os.PathLike, dataset: dict[str, dict[str, np.ndarray]],
                      compress: bool = True) -> None:
  """Writes a dataset in the layout :func:`load_idx_dataset` reads (e.g. small test data).

  Args:
    directory: destination, created if needed.
    dataset: ``{"train": split, "test": split}`` with ``split = {"image": [N, 28, 28(, 1)]
      uint8, or float in [0, 1], "label": [N] ints in [0, 9]}``.
    compress: write ``.gz`` files if True, raw IDX files otherwise.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  suffix = ".gz" if compress else ""
  for split, prefix in SPLITS.items():
    images = np.asarray(dataset[split]["image"])
    if images.dtype != np.uint8:
      images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    images = images.reshape(images.shape[:3])
    image_name, label_name = _file_names(prefix)
    write_idx(directory / f"{image_name}{suffix}", images)
    write_idx(directory / f"{label_name}{suffix}",
              np.asarray(dataset[split]["label"]).astype(np.uint8))


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
  default, subdir, _ = DATASETS[name]
  root = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or default
  root = Path(root).expanduser()
  return [root, root / subdir]


def _find(directory: Path, base: str) -> Path | None:
  for candidate in (directory / f"{base}.gz", directory / base):
    if candidate.is_file():
      return candidate
  return None


def _read_split(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """Validated ``(uint8 [N, 28, 28], uint8 [N])`` arrays of one split."""
  image_path, label_path = (_find(directory, base) for base in _file_names(prefix))
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise ValueError(f"{image_path}: expected uint8 images of shape [N, 28, 28], "
                     f"got {images.dtype} {list(images.shape)}")
  if labels.ndim != 1 or labels.dtype != np.uint8:
    raise ValueError(f"{label_path}: expected uint8 labels of shape [N], "
                     f"got {labels.dtype} {list(labels.shape)}")
  if len(labels) != len(images):
    raise ValueError(f"{image_path} has {len(images)} images but {label_path} has "
                     f"{len(labels)} labels")
  if labels.size and labels.max() > 9:
    raise ValueError(f"{label_path}: labels must be in [0, 9], found {labels.max()}")
  return images, labels


def _load_split(directory: Path, prefix: str) -> dict[str, np.ndarray]:
  images, labels = _read_split(directory, prefix)
  return {"image": (images.astype(np.float32) / 255.0)[..., None],
          "label": labels.astype(np.int32)}


def _dataset_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
  """The first searched directory holding all four files of ``name``."""
  if name not in DATASETS:
    raise ValueError(f"unknown IDX dataset {name!r}; expected one of {sorted(DATASETS)}")
  dirs = _search_dirs(name, data_dir)
  for directory in dirs:
    if all(_find(directory, base) for base in _expected_names()):
      return directory
  how = DATASETS[name][2]
  raise FileNotFoundError(
      f"{name} IDX files not found in {', '.join(map(str, dirs))} (expected "
      f"{', '.join(n + '[.gz]' for n in _expected_names())}); {how} and set {ENV_VAR} to "
      "their directory (or pass data_dir)")


def load_idx_dataset(name: str = "fashion_mnist",
                     data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Loads the train and test splits of MNIST or Fashion-MNIST from IDX files.

  The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped with a
  ``.gz`` suffix or raw) are looked for in ``data_dir``, else in
  ``$SPARSEJAX_DATA_DIR``, else in ``/usr/share/datasets/fashion-mnist`` (or
  ``/usr/share/datasets/mnist``), and in that directory's ``fashion-mnist`` (or
  ``mnist``) sub-directory.

  Args:
    name: "fashion_mnist" or "mnist".
    data_dir: directory holding the files; None to use the defaults above.

  Returns:
    ``{"train": split, "test": split}`` with ``split = {"image": float32 [N, 28, 28, 1]
    in [0, 1], "label": int32 [N]}``.

  Raises:
    ValueError: for an unknown name or a corrupt file.
    FileNotFoundError: when no searched directory holds all four files.
  """
  directory = _dataset_dir(name, data_dir)
  return {split: _load_split(directory, prefix) for split, prefix in SPLITS.items()}


def load_idx_split(name: str, split: str,
                   data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """Loads one split of MNIST or Fashion-MNIST as raw bytes (no float conversion).

  The files are looked for as in :func:`load_idx_dataset`.

  Args:
    name: "fashion_mnist" or "mnist".
    split: "train" or "test".
    data_dir: directory holding the files; None to use the defaults.

  Returns:
    ``{"image": uint8 [N, 28, 28, 1], "label": int32 [N]}``.

  Raises:
    ValueError: for an unknown name or split, or a corrupt file.
    FileNotFoundError: when no searched directory holds all four files.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of {name}; expected one of {sorted(SPLITS)}")
  images, labels = _read_split(_dataset_dir(name, data_dir), SPLITS[split])
  return {"image": images[..., None], "label": labels.astype(np.int32)}

