"""What the command lines of ``experiments`` share: one-line errors."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from absl import flags


def fail(message: str, status: int) -> NoReturn:
  """Prints ``error: message`` on stderr and exits with ``status``."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def flag_error_line(error: flags.Error) -> str:
  """A flag-parsing error as one line (the last line of a traceback it carries, if any)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if len(lines) > 1 and "Traceback" in str(error):  # e.g. an exception raised by get_config
    lines = [re.sub(r"^\w+: ", "", lines[-1])]
  return " ".join(lines)
