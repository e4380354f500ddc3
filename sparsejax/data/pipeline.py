"""Input pipelines: deterministic, resumable training batches and padded eval batches.

A training batch is a pure function of ``(seed, step)``: the epoch's order comes
from ``np.random.default_rng([seed, epoch])`` (the order of
:func:`sparsejax.data.batches`) and the augmentation from generators seeded with
``[seed, step, 1]`` (crop offsets) and ``[seed, step, 2]`` (flips), drawn for the
whole global batch. So a run resumes exactly at any step, and the shards of a
multi-host run partition the single-host batch exactly::

  pipeline = TrainPipeline(source, batch_size=128, seed=0, crop_padding=4, flip=True,
                           mean=NORMALIZATION["cifar10"][0], std=NORMALIZATION["cifar10"][1])
  for step, batch in enumerate(pipeline.iterate(start_step), start_step):
    ...  # batch["image"]: float32 [128, 32, 32, 3], batch["label"]: int32 [128]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import operator
import queue
import threading
from typing import Any, TypeVar

import numpy as np

from sparsejax.data.sources import Source

T = TypeVar("T")

# Per-channel (mean, std) of the training images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# How often (seconds) a blocked prefetch thread checks whether it should stop.
_POLL_SECONDS = 0.05


def _channel_constants(mean: Sequence[float], std: Sequence[float],
                       channels: int) -> tuple[np.ndarray, np.ndarray]:
  mean, std = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
  for name, value in (("mean", mean), ("std", std)):
    if len(value) not in (1, channels):
      raise ValueError(f"{name} needs 1 or {channels} values (one per channel), got {len(value)}")
  if np.any(std <= 0):
    raise ValueError(f"std must be positive, got {std.tolist()}")
  return mean, std


def preprocess(images: np.ndarray, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
  """Scales uint8 images to [0, 1], then normalises each channel if asked.

  Args:
    images: uint8 [..., C].
    mean: per-channel mean (1 or C values) of the scaled images; None for no normalisation.
    std: per-channel standard deviation, given together with ``mean``.

  Returns:
    A new C-contiguous float32 array ``(images / 255 - mean) / std``.
  """
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std, or neither")
  out = np.asarray(images).astype(np.float32, order="C")
  out /= np.float32(255.0)
  if mean is not None:
    channels = out.shape[-1]
    mean, std = _channel_constants(mean, std, channels)
    # Broadcasting over rows of W * C values is ~5x faster than over a last axis of C.
    row = out.shape[-2] * channels if out.ndim >= 2 else channels
    rows = out.reshape(-1, row)
    rows -= np.tile(np.broadcast_to(mean, channels), row // channels)
    rows /= np.tile(np.broadcast_to(std, channels), row // channels)
  return out


def crop_and_flip(images: np.ndarray, offsets: np.ndarray | None = None,
                  flips: np.ndarray | None = None, padding: int = 0) -> np.ndarray:
  """Random-crop and horizontal-flip augmentation with given draws, vectorised.

  Each image is zero-padded by ``padding`` pixels on every side, cropped back to
  its size at ``offsets[i] = (top, left)`` of the padded image, then mirrored
  left-right where ``flips[i]``.

  Args:
    images: [B, H, W, C].
    offsets: int [B, 2] in [0, 2 * padding]; None for no crop.
    flips: bool [B]; None for no flip.
    padding: pixels of zero padding on each side.

  Returns:
    A new C-contiguous [B, H, W, C] array of the input's dtype.
  """
  images = np.asarray(images)
  b, h, w, _ = images.shape
  if offsets is not None and padding > 0:
    offsets = np.asarray(offsets)
    if offsets.shape != (b, 2) or offsets.min() < 0 or offsets.max() > 2 * padding:
      raise ValueError(f"offsets must be [{b}, 2] in [0, {2 * padding}]")
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(images, pads), (h, w), axis=(1, 2))
    # windows: [B, 2p + 1, 2p + 1, C, H, W]; advanced indexing copies one window per image.
    images = windows[np.arange(b), offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1)
  else:
    images = images.copy()
  if flips is not None:
    flips = np.asarray(flips, bool)
    images[flips] = images[flips, :, ::-1]
  return np.ascontiguousarray(images)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(size)
  order.flags.writeable = False
  return order


def _check_int(name: str, value: Any, minimum: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an int, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


@dataclasses.dataclass(frozen=True, eq=False)
class TrainPipeline:
  """Shuffled, augmented training batches; batch ``step`` depends only on (seed, step).

  Attributes:
    source: the training examples (see :mod:`sparsejax.data.sources`).
    batch_size: the global batch size (all processes together).
    seed: a non-negative shuffling and augmentation seed.
    crop_padding: random crop after zero-padding each side by this many pixels (0: none).
    flip: random horizontal flips with probability 1/2.
    mean: per-channel normalisation mean, e.g. ``NORMALIZATION["cifar10"][0]``; None: none.
    std: per-channel normalisation standard deviation, given with ``mean``.
    shard_index: this process's index (e.g. ``jax.process_index()``).
    shard_count: the number of processes; each gets a contiguous slice of every global
      batch, so ``batch_size`` must be a multiple of it.
  """

  source: Source
  batch_size: int
  seed: int
  crop_padding: int = 0
  flip: bool = False
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  shard_index: int = 0
  shard_count: int = 1

  def __post_init__(self):
    _check_int("seed", self.seed, 0)
    _check_int("crop_padding", self.crop_padding, 0)
    _check_int("shard_count", self.shard_count, 1)
    if not 0 <= _check_int("shard_index", self.shard_index, 0) < self.shard_count:
      raise ValueError(f"shard_index must be in [0, {self.shard_count}), got {self.shard_index}")
    if _check_int("batch_size", self.batch_size, 1) % self.shard_count:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of shard_count "
                       f"{self.shard_count}")
    if len(self.source) < self.batch_size:
      raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.source)} examples")
    if (self.mean is None) != (self.std is None):
      raise ValueError("give both mean and std, or neither")
    if self.mean is not None:
      object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
      object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    return len(self.source) // self.batch_size

  @property
  def local_batch_size(self) -> int:
    """Examples per batch in this process."""
    return self.batch_size // self.shard_count

  def _local(self) -> slice:
    start = self.shard_index * self.local_batch_size
    return slice(start, start + self.local_batch_size)

  def indices(self, step: int) -> np.ndarray:
    """Source indices of this process's part of batch ``step``.

    Args:
      step: 0-based global step.

    Returns:
      int [local_batch_size].
    """
    epoch, position = divmod(_check_int("step", step, 0), self.steps_per_epoch)
    order = _epoch_order(self.seed, epoch, len(self.source))
    return order[position * self.batch_size:][self._local()]

  def augmentation(self, step: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The random draws of batch ``step`` for this process's examples.

    Args:
      step: 0-based global step.

    Returns:
      ``(offsets, flips)``: crop offsets int [local_batch_size, 2] in [0, 2 * crop_padding]
      (None without cropping) and flips bool [local_batch_size] (None without flips).
    """
    step = _check_int("step", step, 0)
    offsets = flips = None
    if self.crop_padding:
      rng = np.random.default_rng([self.seed, step, 1])
      offsets = rng.integers(0, 2 * self.crop_padding + 1, (self.batch_size, 2))[self._local()]
    if self.flip:
      flips = (np.random.default_rng([self.seed, step, 2]).random(self.batch_size) < 0.5)
      flips = flips[self._local()]
    return offsets, flips

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of this process, a pure function of ``(seed, step)``.

    Args:
      step: 0-based global step; epoch ``step // steps_per_epoch``.

    Returns:
      ``{"image": float32 [local_batch_size, H, W, C], "label": int32 [local_batch_size]}``.
    """
    data = self.source.gather(self.indices(step))
    images = data["image"]
    offsets, flips = self.augmentation(step)
    if offsets is not None or flips is not None:
      images = crop_and_flip(images, offsets, flips, self.crop_padding)
    return {"image": preprocess(images, self.mean, self.std),
            "label": np.asarray(data["label"], np.int32)}

  def iterate(self, start_step: int = 0, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start_step``, ``start_step + 1``, ... forever.

    Args:
      start_step: the first step (to resume a run).
      prefetch: batches prepared ahead by a background thread; 0 for no thread. The
        thread stops when the iterator is closed or garbage-collected.

    Returns:
      An iterator yielding exactly ``batch(start_step)``, ``batch(start_step + 1)``, ...
    """
    start_step = _check_int("start_step", start_step, 0)
    if _check_int("prefetch", prefetch, 0) == 0:
      return _sequential(self.batch, start_step)
    return _prefetched(self.batch, start_step, prefetch)


def _sequential(make: Callable[[int], T], start: int) -> Iterator[T]:
  step = start
  while True:
    yield make(step)
    step += 1


class _Failure:
  """An exception raised in the prefetch thread, handed to the consumer."""

  def __init__(self, error: Exception):
    self.error = error


def _produce(make: Callable[[int], T], start: int, items: queue.Queue,
             stop: threading.Event) -> None:
  """Puts make(start), make(start + 1), ... into ``items`` until ``stop`` is set."""
  step = start
  while not stop.is_set():
    try:
      item = make(step)
    except Exception as e:  # handed over and re-raised in the consumer
      item = _Failure(e)
    while not stop.is_set():
      try:
        items.put(item, timeout=_POLL_SECONDS)
        break
      except queue.Full:
        pass
    if isinstance(item, _Failure):
      return
    step += 1


def _prefetched(make: Callable[[int], T], start: int, size: int) -> Iterator[T]:
  """make(start), make(start + 1), ... computed up to ``size`` ahead in a daemon thread."""
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  thread = threading.Thread(target=_produce, args=(make, start, items, stop), daemon=True,
                            name="sparsejax-prefetch")
  thread.start()
  try:
    while True:
      item = items.get()
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    if thread is not threading.current_thread():  # a cyclic GC may run in any thread
      thread.join(timeout=10 * _POLL_SECONDS)


def eval_batches(source: Source, batch_size: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """All examples in order, in fixed-shape batches (one compilation of the eval step).

  Args:
    source: the evaluation examples.
    batch_size: examples per batch.
    mean: per-channel normalisation mean; None for none.
    std: per-channel normalisation standard deviation, given with ``mean``.

  Yields:
    ``(images float32 [batch_size, H, W, C], labels int32 [batch_size], valid bool
    [batch_size])``; the last batch is zero-padded, with ``valid`` False for the padding.
  """
  batch_size = _check_int("batch_size", batch_size, 1)
  for start in range(0, len(source), batch_size):
    count = min(batch_size, len(source) - start)
    data = source.gather(np.arange(start, start + count))
    images = preprocess(data["image"], mean, std)
    labels = np.asarray(data["label"], np.int32)
    if count < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]),
                                                images.dtype)])
      labels = np.concatenate([labels, np.zeros(batch_size - count, np.int32)])
    yield images, labels, np.arange(batch_size) < count
