"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard event files and a progress bar.

``metrics.jsonl`` holds one JSON object per logged step, plain numbers only. When a
run resumes from the checkpoint at step ``s``, the rows after ``s`` (written by the
interrupted process, possibly cut in the middle of a line) are dropped first, so the
file ends up exactly as an uninterrupted run would have written it. TensorBoard gets
the same scalars through tensorboardX, with the rows after ``s`` purged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import sys
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def plain(value: Any) -> Any:
  """``value`` as plain JSON: numpy/JAX scalars to Python numbers, NaN and ±inf to None."""
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The complete rows of a ``metrics.jsonl`` (a cut last line is skipped)."""
  rows = []
  path = Path(path)
  if not path.exists():
    return rows
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


class MetricsWriter:
  """Appends rows to ``metrics.jsonl`` and TensorBoard, resuming after ``resume_step``.

  Args:
    directory: the run directory.
    resume_step: rows with a larger step are dropped (the run restarts there).
    tensorboard: also write TensorBoard event files (``directory/tensorboard``).
    write: False only reads the kept rows and remembers the rows given, writing
      nothing (every process but the first of a multi-host run).
  """

  def __init__(self, directory: str | os.PathLike[str], resume_step: int = 0,
               tensorboard: bool = True, write: bool = True):
    self._path = Path(directory) / METRICS_FILE
    kept = [row for row in read_rows(self._path) if row.get("step", math.inf) <= resume_step]
    self._last = kept[-1] if kept else None
    self._file = self._tensorboard = None
    if not write:
      return
    temporary = self._path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in kept))
    temporary.replace(self._path)
    self._file = self._path.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.fspath(Path(directory) / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)

  def last_row(self) -> dict[str, Any] | None:
    """The newest row in the file (kept or written), None for an empty file."""
    return self._last

  def write(self, row: dict[str, Any]) -> None:
    """Appends one row (``row["step"]`` is its step) and flushes it."""
    row = self._last = plain(row)
    if self._file is None:
      return
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    if self._tensorboard is not None:
      for name, value in _scalars(row):
        self._tensorboard.add_scalar(name, value, row["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def _scalars(row: dict[str, Any], prefix: str = ""):
  """``(name, number)`` pairs of a row, nested dicts flattened with "/"."""
  for key, value in row.items():
    if key == "step":
      continue
    if isinstance(value, dict):
      yield from _scalars(value, f"{prefix}{key}/")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield prefix + key, value


class Progress:
  """A progress bar with steps/s, loss and sparsity on a terminal; log lines otherwise.

  Args:
    total: the number of training steps.
    start: the step training starts (or resumes) from.
    description: shown before the bar, e.g. the method.
    enabled: False shows nothing at all.
  """

  def __init__(self, total: int, start: int, description: str, enabled: bool = True):
    from rich.console import Console  # pylint: disable=g-import-not-at-top
    from rich.progress import (  # pylint: disable=g-import-not-at-top
      BarColumn,
      MofNCompleteColumn,
      TextColumn,
      TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress  # pylint: disable=g-import-not-at-top
    self._enabled = enabled
    self._interactive = enabled and sys.stderr.isatty()
    self._description = description
    self._timed_from: tuple[int, float] | None = None  # (step, time) after the first step
    self._bar = RichProgress(
        TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("{task.fields[speed]} steps/s"), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True), disable=not self._interactive)
    self._task = self._bar.add_task(description, total=total, completed=start, speed="-",
                                    status="")

  def __enter__(self) -> Progress:
    self._bar.start()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._bar.stop()

  def advance(self, step: int) -> None:
    """Moves the bar to ``step``; the speed is measured from the first step on (after
    its compilation)."""
    if not self._interactive:
      return
    now = time.perf_counter()
    if self._timed_from is None:
      self._timed_from = (step, now)
    first_step, first_time = self._timed_from
    speed = f"{(step - first_step) / (now - first_time):.0f}" if step > first_step else "-"
    self._bar.update(self._task, completed=step, speed=speed)

  def show(self, row: dict[str, Any]) -> None:
    """Shows a logged row: its loss and sparsity (and accuracy at evaluation rows)."""
    if not self._enabled:
      return
    status = f"loss {row['train_loss']:.4f}  sparsity {row['sparsity']:.3f}"
    if row.get("test_accuracy") is not None:
      status += f"  acc {row['test_accuracy']:.4f}"
    self._bar.update(self._task, status=status)
    if not self._interactive and row.get("test_accuracy") is not None:
      print(f"{self._description}: step {row['step']}  {status}", file=sys.stderr, flush=True)
