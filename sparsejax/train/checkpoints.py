"""orbax checkpoints of a whole training state, with exact resume.

A checkpoint holds the training state pytree (params, model state, the whole
optimizer state with masks, thresholds, keys and counts, the step and the running
metrics) and a small JSON record (the data position and host-side totals). orbax
writes each checkpoint into a temporary directory and renames it when complete, so a
process killed while writing leaves the previous checkpoints intact; the leftover
temporary directory is removed when the manager is opened again.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs in one directory, keeping the last few.

  Args:
    directory: where the checkpoints live (created if needed).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    """Starts writing a checkpoint of ``state`` and ``record`` at ``step`` (asynchronously).

    The arrays are copied before this returns, so ``state`` may be donated afterwards.

    Args:
      step: the training step the state is at.
      state: a pytree of arrays.
      record: JSON-serialisable data saved with it.
    """
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     record=ocp.args.JsonSave(record)))

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """The state and record of checkpoint ``step`` (default: the newest), or None.

    Args:
      template: a state with the structure, shapes and dtypes to restore into (its
        NamedTuples and Nones come back as they are, not as dicts).
      step: which checkpoint; None for the newest.

    Returns:
      ``(state, record)``, or None when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    return restored.state, restored.record

  def wait(self) -> None:
    """Blocks until the checkpoints being written are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the manager."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
