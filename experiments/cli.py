"""What the command lines of ``experiments`` share: one-line errors."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import NoReturn

from absl import flags


def fail(message: str, status: int, last_words: bool = False) -> NoReturn:
  """Prints ``error: message`` on stderr and exits with ``status``.

  ``last_words``: nothing else reaches stderr after the line (background threads that
  are still failing, e.g. orbax's writes after a full disk, would print after it).
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  if last_words:
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, sys.stderr.fileno())
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - kept open until the process exits
  sys.exit(status)


def flag_error_line(error: flags.Error) -> str:
  """A flag-parsing error as one line (the last line of a traceback it carries, if any)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if len(lines) > 1 and "Traceback" in str(error):  # e.g. an exception raised by get_config
    lines = [re.sub(r"^\w+: ", "", lines[-1])]
  return " ".join(lines)


def quiet_checkpoint_errors() -> None:
  """Leaves a failed checkpoint to the runner's one line: drops orbax's own error logs,
  asyncio's reports of orbax's other failed writes, and the tracebacks of tensorstore
  callbacks that arrive after orbax's event loop closed (reported as unraisable)."""
  logging.getLogger("absl").addFilter(
      lambda record: not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname))
  logging.getLogger("asyncio").addFilter(  # orbax's writes that failed after the first one
      lambda record: "/orbax/" not in record.getMessage())
  default_hook, default_unraisable = sys.excepthook, sys.unraisablehook

  def closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  def hook(kind, value, traceback):
    if not closed_loop(value):
      default_hook(kind, value, traceback)

  def unraisable(report):
    if not closed_loop(report.exc_value):
      default_unraisable(report)

  sys.excepthook, sys.unraisablehook = hook, unraisable
