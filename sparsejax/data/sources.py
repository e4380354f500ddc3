"""Random-access sources of image classification examples.

A source holds examples ``{"image": uint8 [H, W, C], "label": int}`` and offers
``len(source)``, ``source[i]`` and a vectorised ``source.gather(indices)`` that
returns a whole batch ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``.

MNIST and Fashion-MNIST are read by the built-in IDX reader (no TensorFlow);
any other dataset comes from ``tfds.data_source`` (tensorflow-datasets, an
optional extra: ``pip install 'sparsejax[tfds]'``), which reads datasets
prepared in the ``array_record`` format without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from sparsejax.data import idx

# Datasets of at most this many image bytes are read into memory once.
IN_MEMORY_LIMIT = 1 << 30

_TFDS_HINT = "pip install 'sparsejax[tfds]'"


class DatasetShape(NamedTuple):
  """What a config needs to know of a dataset before reading it."""
  num_train: int  # training examples
  image_shape: tuple[int, int, int]  # H, W, C
  num_classes: int


KNOWN_SHAPES = {
    "mnist": DatasetShape(60_000, (28, 28, 1), 10),
    "fashion_mnist": DatasetShape(60_000, (28, 28, 1), 10),
    "cifar10": DatasetShape(50_000, (32, 32, 3), 10),
    "cifar100": DatasetShape(50_000, (32, 32, 3), 100),
}


def dataset_shape(name: str) -> DatasetShape:
  """The size, image shape and class count of a known dataset, without reading it.

  Raises:
    ValueError: for a dataset not in :data:`KNOWN_SHAPES`.
  """
  if name not in KNOWN_SHAPES:
    raise ValueError(f"the shape of dataset {name!r} is not known without its data; "
                     f"known: {sorted(KNOWN_SHAPES)}")
  return KNOWN_SHAPES[name]


class Source(Protocol):
  """What the pipelines need of a dataset split."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> dict[str, Any]:
    ...

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    ...


class ArraySource:
  """An in-memory source over ``images`` uint8 [N, H, W, C] and ``labels`` [N].

  Attributes:
    images: uint8 [N, H, W, C] (a [N, H, W] input gets a channel axis).
    labels: int32 [N].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                       f"{list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f"labels must have shape [{len(images)}] like the images, "
                       f"got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got {labels.dtype}")
    self.images = images
    self.labels = labels.astype(np.int32, copy=False)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}

  def __repr__(self) -> str:
    return f"ArraySource({len(self)} x {list(self.images.shape[1:])})"

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``.

    Args:
      indices: int [B] example indices.

    Returns:
      ``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` (copies).
    """
    indices = np.asarray(indices, dtype=np.intp)
    return {"image": self.images[indices], "label": self.labels[indices]}


def _example(record: Mapping[str, Any], where: str) -> tuple[np.ndarray, int]:
  """``(image uint8 [H, W, C], label)`` of a record with "image" and "label" keys."""
  if "image" not in record or "label" not in record:
    raise ValueError(f"{where}: expected 'image' and 'label' features, got {sorted(record)}")
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"{where}: expected uint8 [H, W, C] images, got {image.dtype} "
                     f"{list(image.shape)}")
  return image, int(record["label"])


class RandomAccessSource:
  """A source over any random-access sequence of records, read on demand.

  Used for datasets too large for memory, e.g. a ``tfds.data_source``.
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "dataset"):
    self.records = records
    self.name = name

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    image, label = _example(self.records[int(i)], f"{self.name}[{i}]")
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return f"RandomAccessSource({self.name}, {len(self)} examples)"

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``, read one by one.

    Args:
      indices: int [B] example indices.

    Returns:
      ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``.
    """
    examples = [self[i] for i in np.asarray(indices).tolist()]
    return {"image": np.stack([e["image"] for e in examples]),
            "label": np.asarray([e["label"] for e in examples], np.int32)}


def read_into_memory(records: Sequence[Mapping[str, Any]], name: str = "dataset") -> ArraySource:
  """Reads every record of a random-access sequence into an :class:`ArraySource`.

  Args:
    records: records with "image" (uint8 [H, W, C]) and "label" features, e.g. a
      ``tfds.data_source``.
    name: used in error messages.

  Returns:
    The in-memory source.

  Raises:
    ValueError: for missing features, non-uint8 images or images of different shapes.
  """
  if not len(records):
    raise ValueError(f"{name} is empty")
  first, _ = _example(records[0], f"{name}[0]")
  images = np.empty((len(records), *first.shape), np.uint8)
  labels = np.empty(len(records), np.int64)
  for i in range(len(records)):
    image, labels[i] = _example(records[i], f"{name}[{i}]")
    if image.shape != first.shape:
      raise ValueError(f"{name}[{i}] has an image of shape {list(image.shape)} but the first "
                       f"has {list(first.shape)}; images of varying size are not supported")
    images[i] = image
  return ArraySource(images, labels)


def _import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds  # optional and slow to import: only when needed
  except ImportError:
    raise ValueError(f"dataset {name!r} needs tensorflow-datasets: {_TFDS_HINT}") from None
  return tfds


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _unknown_dataset(name: str, error: BaseException) -> ValueError:
  hint = next((line.strip() for line in str(error).splitlines() if "Did you mean" in line), "")
  return ValueError(f"unknown dataset {name!r}: neither a built-in IDX dataset "
                    f"({', '.join(sorted(idx.DATASETS))}) nor a tfds dataset" +
                    (f" ({hint})" if hint else ""))


def _open_error(name: str, split: str, builder, data_dir: str | None, download: bool,
                error: BaseException) -> Exception:
  """The one-line error for a tfds dataset that could not be opened."""
  if builder is None or builder.is_prepared():
    return ValueError(f"cannot read split {split!r} of tfds dataset {name!r}: "
                      f"{_first_line(error)}")
  option = f" --data_dir={data_dir}" if data_dir is not None else ""
  failed = f"; download failed: {_first_line(error)}" if download else ""
  return FileNotFoundError(
      f"tfds dataset {name!r} is not prepared in {builder.data_dir}; "
      f"prepare it in the array_record format with `tfds build {name}{option} "
      f"--file_format=array_record` or pass download=True{failed}")


def _tfds_source(name: str, split: str, data_dir: str | None, download: bool,
                 in_memory_limit: int) -> Source:
  tfds = _import_tfds(name)
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _unknown_dataset(name, e) from e
  except Exception as e:  # tfds raises many types here; each becomes one line
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception:
      builder = None
    raise _open_error(name, split, builder, data_dir, download, e) from e
  where = f"{name}/{split}"
  if not len(records):
    raise ValueError(f"split {split!r} of tfds dataset {name!r} is empty")
  first, _ = _example(records[0], f"{where}[0]")
  if len(records) * first.nbytes <= in_memory_limit:
    return read_into_memory(records, where)
  return RandomAccessSource(records, where)


def load_source(name: str, split: str, data_dir: str | None = None, download: bool = False, *,
                in_memory_limit: int = IN_MEMORY_LIMIT) -> Source:
  """Opens one split of a dataset as a random-access source.

  Args:
    name: "mnist" or "fashion_mnist" (built-in IDX reader, see
      :func:`sparsejax.data.load_idx_dataset` for where the files are looked for), or
      any tfds dataset name with "image" and "label" features, e.g. "cifar10".
    split: "train" or "test" (IDX); any tfds split, e.g. "train[:90%]".
    data_dir: directory holding the data; None for the defaults ($SPARSEJAX_DATA_DIR
      or /usr/share/datasets/... for IDX, ~/tensorflow_datasets for tfds).
    download: tfds only: download and prepare the dataset if it is missing.
    in_memory_limit: tfds only: a split whose images take at most this many bytes
      (estimated from its first example) is read into memory once; a larger one is
      read on demand.

  Returns:
    An :class:`ArraySource` (IDX data and small tfds datasets) or a
    :class:`RandomAccessSource`.

  Raises:
    ValueError: unknown dataset or split, tensorflow-datasets missing, bad data.
    FileNotFoundError: the data is not there (the message says how to get it).
  """
  if name in idx.DATASETS:
    data = idx.load_idx_split(name, split, data_dir)
    return ArraySource(data["image"], data["label"])
  return _tfds_source(name, split, data_dir, download, in_memory_limit)


def num_classes(name: str, data_dir: str | None = None) -> int:
  """The number of classes of a dataset (from the tfds metadata for tfds datasets).

  Args:
    name: a dataset name as for :func:`load_source`.
    data_dir: tfds data directory; None for the default.

  Returns:
    The number of label values.

  Raises:
    ValueError: unknown dataset, no "label" class feature, tensorflow-datasets missing.
  """
  if name in idx.DATASETS:
    return 10
  tfds = _import_tfds(name)
  try:
    info = tfds.builder(name, data_dir=data_dir).info
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _unknown_dataset(name, e) from e
  label = info.features["label"] if "label" in info.features else None
  if not hasattr(label, "num_classes"):
    raise ValueError(f"tfds dataset {name!r} has no 'label' class feature")
  return int(label.num_classes)
