"""Why a run stops before its end: a request to stop (preemption) or a diverging loss.

Preemptible machines and TPU pods announce the end with SIGTERM and kill the process a
little later. :class:`StopRequests` turns that into a step at which training stops
after saving a checkpoint:

- one process: SIGTERM or SIGINT (Ctrl-C) asks to stop; the step running when the
  signal arrives finishes, and training stops after it. Further signals while stopping
  change nothing.
- several processes (``jax.distributed``): JAX's preemption service catches SIGTERM on
  any host and agrees on a step with the others
  (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`: the largest
  step any host has reached, plus one), so every process stops after the same step.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped at a step boundary on request, after saving that step."""

  def __init__(self, step: int, saved: bool):
    self.step, self.saved = step, saved
    where = "saved a checkpoint of it" if saved else "nothing saved (no run directory)"
    super().__init__(f"stopped on request after step {step}, {where}")


class Diverged(Exception):
  """Training met a non-finite loss, gradient or state and stopped (nothing after the
  last checkpoint before it is saved)."""

  def __init__(self, step: int, what: str, last_checkpoint: int | None):
    self.step, self.last_checkpoint = step, last_checkpoint
    kept = ("no checkpoint kept" if last_checkpoint is None
            else f"the last checkpoint kept is step {last_checkpoint}")
    super().__init__(f"training diverged: non-finite {what} at step {step}; {kept}")


class StopRequests:
  """Watches for requests to stop while in a ``with`` block (the signal handlers are
  restored at its end); :meth:`reached` is asked after every step."""

  def __init__(self) -> None:
    self._requested = False
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del signum, frame
    self._requested = True

  def __enter__(self) -> StopRequests:
    # Under jax.distributed, JAX's preemption service owns SIGTERM; Ctrl-C stays as is.
    if not jax.distributed.is_initialized():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """Whether training should stop after ``step`` (call it after every step, on
    every process)."""
    if jax.distributed.is_initialized():
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested
