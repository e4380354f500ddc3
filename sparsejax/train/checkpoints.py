"""orbax checkpoints of a whole training state, with exact resume and checked contents.

A checkpoint holds the training state pytree (params, model state, the whole
optimizer state with masks, thresholds, keys and counts, the step and the running
metrics) and a small JSON record (the data position, host-side totals and a checksum
of every array). orbax writes each checkpoint into a temporary directory and renames
it when complete, and deletes old checkpoints only after a newer one is committed, so
a process killed while writing leaves the previous checkpoints intact; the leftover
temporary directory is removed when the manager is opened again.

orbax keeps no checksum of array contents, so a damaged file can restore silently into
wrong values. Each checkpoint's record therefore holds a 64-bit checksum of every array
(:func:`checksums`), and :meth:`Checkpointer.restore` tries the newest checkpoint first
and falls back to older ones when one does not restore or does not match its checksums.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.scores import mix32

UNREADABLE_DIR = "checkpoints_unreadable"  # beside the checkpoints: the ones that failed


class CheckpointError(Exception):
  """A checkpoint cannot be written or restored; the message is one line."""


class UnreadableCheckpoints(CheckpointError):
  """There are checkpoints, but none restores intact."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as a flat uint32 vector (one word per entry, two for 64-bit types)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _checksum(leaf: jax.Array) -> jax.Array:
  """``[2]`` uint32: two sums of hashes of (word, position) over one array."""
  words = _words(leaf)
  position = mix32(jnp.arange(words.size, dtype=jnp.uint32))
  return jnp.stack([jnp.sum(mix32(words ^ position), dtype=jnp.uint32),
                    jnp.sum(mix32(words + mix32(position ^ jnp.uint32(0x9E3779B9))),
                            dtype=jnp.uint32)])


def on_one_device(leaves: list[Any]) -> bool:
  """Whether no array of ``leaves`` spans several devices (so none needs a collective)."""
  return all(not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1 for x in leaves)


def per_leaf_or_whole(fn: Callable[[jax.Array], jax.Array]
                      ) -> Callable[[list[Any]], list[jax.Array]]:
  """``leaves -> [fn(leaf) ...]``, compiled to suit where the leaves are.

  On one device, one small program per leaf signature: a model has few distinct
  shapes, while one program over a whole state takes XLA:CPU seconds to compile (a
  reduction kernel per leaf; 10 s for ResNet-56's checksums). Across devices, one
  program for all leaves, so that its cross-device reductions meet once.
  """
  one, whole = jax.jit(fn), jax.jit(lambda leaves: [fn(x) for x in leaves])

  def apply(leaves: list[Any]) -> list[jax.Array]:
    return [one(x) for x in leaves] if on_one_device(leaves) else whole(leaves)

  return apply


_checksums = per_leaf_or_whole(_checksum)


def checksums(tree: Any) -> list[str]:
  """A 64-bit checksum of every array of ``tree`` (in leaf order), as hex strings.

  Computed on the devices, as sums of a hash of each 32-bit word and its position:
  integer sums do not depend on the order of reduction, so the checksum of an array is
  the same whatever its sharding and on every process, and any change of its bits
  changes it but with probability 2**-64.
  """
  words = np.asarray(jax.device_get(_checksums(jax.tree.leaves(tree))))
  return [f"{int(a):08x}{int(b):08x}" for a, b in words.reshape(-1, 2)]


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs in one directory, keeping the last few.

  Args:
    directory: where the checkpoints live (created if needed).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
    self._directory = Path(os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    self._writing = 0  # the step of the newest checkpoint started

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    """Starts writing a checkpoint of ``state`` and ``record`` at ``step`` (asynchronously).

    The arrays are copied before this returns, so ``state`` may be donated afterwards.
    The record is saved with ``"checksums"`` added (:meth:`restore` checks and drops them).

    Args:
      step: the training step the state is at.
      state: a pytree of arrays.
      record: JSON-serialisable data saved with it.

    Raises:
      CheckpointError: when this or the previous checkpoint cannot be written.
    """
    record = {**record, "checksums": checksums(state)}
    self._writing = step
    self._write(lambda: self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))))

  def _write(self, action: Callable[[], Any]) -> None:
    """Runs an orbax call that writes; its errors become one-line CheckpointErrors."""
    try:
      action()
    except (OSError, ValueError, RuntimeError) as e:
      raise CheckpointError(f"cannot write checkpoint {self._writing} in {self._directory}: "
                            f"{_one_line(e)}") from e

  def restore(self, template: Any, step: int | None = None,
              warn: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]] | None:
    """The state and record of the newest checkpoint that restores intact, or None.

    A checkpoint that fails to restore, or whose arrays do not match their checksums,
    is skipped for the one before it. Once one restores, each skipped one is reported
    through ``warn`` (one line: which step, why) and moved to ``UNREADABLE_DIR`` beside
    the checkpoints (by process 0), so that training goes on from the restored step.

    Args:
      template: a state with the structure, shapes, dtypes and shardings to restore
        into (its NamedTuples and Nones come back as they are, not as dicts).
      step: the newest checkpoint to try; None for the newest there is.
      warn: called with a line for each unreadable checkpoint.

    Returns:
      ``(state, record)``, or None when there is no checkpoint.

    Raises:
      UnreadableCheckpoints: when there are checkpoints but none restores intact (they
        are all left where they are).
    """
    steps = sorted((s for s in self._manager.all_steps() if step is None or s <= step),
                   reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    failures: list[tuple[int, str]] = []
    for candidate in steps:
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        _check_contents(restored.state, restored.record)
      except Exception as e:  # noqa: BLE001 - any failure makes the checkpoint unusable
        failures.append((candidate, _one_line(e)))
        continue
      for failed, why in failures:
        if warn is not None:
          warn(f"checkpoint {failed} in {self._directory} is unreadable ({why}); "
               f"resuming from checkpoint {candidate}")
        self._set_aside(failed)
      record = {key: value for key, value in restored.record.items() if key != "checksums"}
      return restored.state, record
    if failures:
      raise UnreadableCheckpoints(f"no checkpoint in {self._directory} restores: " + "; ".join(
          f"step {failed}: {why}" for failed, why in failures))
    return None

  def _set_aside(self, step: int) -> None:
    """Moves checkpoint ``step`` out of orbax's sight (kept for inspection): a new
    checkpoint of that step will be written when training gets there again."""
    if jax.process_index() == 0:
      aside = self._directory.parent / UNREADABLE_DIR
      aside.mkdir(exist_ok=True)
      target = aside / str(step)
      suffix = 0
      while target.exists():
        suffix += 1
        target = aside / f"{step}.{suffix}"
      (self._directory / str(step)).rename(target)
    ocp.multihost.sync_global_processes(f"sparsejax_set_aside_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the checkpoints being written are committed.

    Raises:
      CheckpointError: when one could not be written.
    """
    self._write(self._manager.wait_until_finished)

  def close(self) -> None:
    """Finishes pending writes and releases the manager.

    Raises:
      CheckpointError: when a pending checkpoint could not be written.
    """
    self._write(self._manager.close)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _check_contents(state: Any, record: dict[str, Any]) -> None:
  """Raises ValueError unless ``state``'s arrays match the record's checksums."""
  expected = record.get("checksums")
  if expected is None:
    raise ValueError("its record has no checksums")
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  found = checksums(state)
  if len(found) != len(expected):
    raise ValueError(f"{len(expected)} checksums for {len(found)} arrays")
  for path, want, got in zip(paths, expected, found):
    if want != got:
      raise ValueError(f"the array data of {path} does not match its checksum")


def _one_line(error: BaseException) -> str:
  """The first non-empty line of an error, prefixed with its type (without the
  tensorstore spec that tensorstore and orbax append to their errors)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  line = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
  # Some of orbax's read errors end with the repr of a TensorStore's bound `spec` method.
  line = line.split(" <bound method ")[0].rstrip(":")
  return f"{type(error).__name__}: {line}".rstrip(": ")
