"""A run directory's own files: the config it was started with and the final summary.

Checkpoints live in ``CHECKPOINT_DIR`` and the metrics in ``metrics.jsonl``
(:mod:`sparsejax.train.logs`); this module keeps a directory from being reused by a
run of another config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from sparsejax.train.logs import plain

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
RESUMABLE_ELSEWHERE = "mesh"  # the config section a run may change when it resumes


def check_workdir(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when ``workdir`` holds a run of a different config (nothing is touched).

  Args:
    workdir: the run directory (may not exist yet).
    config: the resolved config of the run about to start.
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved, current = json.loads(path.read_text()), json.loads(config.to_json_best_effort())
  for run in (saved, current):  # where the state lives is not what is trained
    run.pop(RESUMABLE_ELSEWHERE, None)
  difference = _first_difference(saved, current)
  if difference is not None:
    key, old, new = difference
    raise ValueError(f"{workdir} holds a run with config.{key} = {old!r}, not {new!r}: use "
                     "another --workdir (or delete that run) to train this config")


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
      if found is not None:
        return found
    return None
  return None if old == new else (prefix.rstrip("."), old, new)


def write_config(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and writes ``config.json`` (checked by :func:`check_workdir` first)."""
  Path(workdir).mkdir(parents=True, exist_ok=True)
  _write_atomically(Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=1) + "\n")


def write_summary(workdir: str | os.PathLike[str], summary: dict[str, Any]) -> None:
  """Writes ``summary.json``: the run's final numbers as plain JSON."""
  _write_atomically(Path(workdir) / SUMMARY_FILE, json.dumps(plain(summary), indent=1) + "\n")


def _write_atomically(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text)
  temporary.replace(path)
