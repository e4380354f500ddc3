"""Finding and reading training run directories for the report.

A run directory is one that holds ``config.json`` or ``metrics.jsonl`` (as written by the
training runner), and ``summary.json`` once the run has finished. This module finds run
directories under given paths, reads them into :class:`Run` values (raising
:class:`ReportError` for bad input) and derives each run's method, dataset, model, seed,
target sparsity and config without seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import sparsejax
from sparsejax.train.records import group_config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DENSE = "dense"


class ReportError(ValueError):
  """Bad input: a missing directory, no runs, or an unreadable file."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory as read from disk.

  Attributes:
    path: the run directory.
    config: ``config.json`` ({} when missing).
    metrics: the rows of ``metrics.jsonl``, in order.
    summary: ``summary.json``, or None for an unfinished run.
  """
  path: Path
  config: dict[str, Any]
  metrics: list[dict[str, Any]]
  summary: dict[str, Any] | None

  @property
  def finished(self) -> bool:
    """Whether the run reached its last step (older summaries have no status)."""
    return self.summary is not None and self.summary.get("status", "finished") == "finished"

  def left_out(self) -> str | None:
    """Why the run is not in the table ("unfinished", "diverged at step N"), or None."""
    if self.finished:
      return None
    if self.summary is None:
      return f"unfinished (no {SUMMARY_FILE})"
    return f"{self.summary['status']} at step {self.summary.get('failed_at_step')}"


def is_run_dir(path: Path) -> bool:
  """Whether ``path`` is a run directory (holds ``config.json`` or ``metrics.jsonl``)."""
  return (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()


def _search(root: Path) -> list[Path]:
  """The run directories at or below ``root``, sorted; run directories are not entered."""
  found = []
  for directory, subdirectories, _ in os.walk(root):
    if is_run_dir(Path(directory)):
      found.append(Path(directory))
      subdirectories[:] = []
    else:
      subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
  return sorted(found)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
  """The run directories named by or found (recursively) under ``paths``, without repeats.

  Args:
    paths: run directories or directories holding run directories.

  Returns:
    The run directories, in the order of ``paths`` and then sorted by path.

  Raises:
    ReportError: for a path that does not exist, is not a directory or holds no run.
  """
  runs: dict[Path, Path] = {}
  for name in paths:
    path = Path(name)
    if not path.exists():
      raise ReportError(f"{name}: no such directory")
    if not path.is_dir():
      raise ReportError(f"{name}: not a directory")
    found = _search(path)
    if not found:
      raise ReportError(f"{name}: no run directories (with {CONFIG_FILE} or {METRICS_FILE})")
    for run in found:
      runs.setdefault(run.resolve(), run)
  return list(runs.values())


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ReportError(f"{path}: cannot read JSON ({e})") from e


def _read_object(path: Path) -> dict[str, Any] | None:
  """The JSON object in ``path``, or None when the file does not exist."""
  if not path.is_file():
    return None
  value = _read_json(path)
  if not isinstance(value, dict):
    raise ReportError(f"{path}: expected a JSON object")
  return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl`` ([] when missing); a cut last line is skipped.

  Raises:
    ReportError: for a malformed line other than an unterminated last one.
  """
  if not path.is_file():
    return []
  text = path.read_text()
  lines = text.split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: being written, or cut by a crash
        continue
      raise ReportError(f"{path}:{number}: invalid JSON ({e})") from e
    if not isinstance(row, dict):
      raise ReportError(f"{path}:{number}: expected a JSON object")
    rows.append(row)
  return rows


def load_run(directory: str | os.PathLike[str]) -> Run:
  """Reads a run directory's ``config.json``, ``metrics.jsonl`` and ``summary.json``.

  Args:
    directory: the run directory.

  Returns:
    The run; ``summary`` is None when the run has not finished.

  Raises:
    ReportError: for a file that is not valid JSON.
  """
  path = Path(directory)
  return Run(path=path, config=_read_object(path / CONFIG_FILE) or {},
             metrics=read_metrics(path / METRICS_FILE),
             summary=_read_object(path / SUMMARY_FILE))


def _config_value(config: Mapping[str, Any], key: str, section: str) -> Any:
  """``config[section][key]``, else ``config[key]``, else ``key`` in another section; or None."""
  preferred = config.get(section)
  candidates = [preferred if isinstance(preferred, Mapping) else {}, config,
                *(value for value in config.values() if isinstance(value, Mapping))]
  for candidate in candidates:
    value = candidate.get(key)
    if value is not None and not isinstance(value, Mapping):
      return value
  return None


def run_info(run: Run) -> dict[str, Any]:
  """The run's method, dataset, model, seed and target sparsity.

  Taken from ``summary.json`` when the run finished, else (or where it lacks a value)
  from ``config.json``.
  """
  config = run.config
  model = config.get("model")
  if isinstance(model, Mapping):
    model = model.get("name")
  method = _config_value(config, "method", "sparse") or "unknown"
  sparse = config.get("sparse")
  info = {"method": method,
          "variant": sparsejax.variant(sparse) if isinstance(sparse, Mapping) else None,
          "dataset": _config_value(config, "dataset", "data"), "model": model,
          "seed": _config_value(config, "seed", "train"),
          "target_sparsity": None if method == DENSE else _config_value(config, "sparsity",
                                                                          "sparse")}
  for key, value in (run.summary or {}).items():
    if key in info and (value is not None or key == "target_sparsity"):
      info[key] = value
  info["group"] = run_group(run)
  return info


def run_group(run: Run) -> dict[str, Any] | None:
  """The run's config without seeds (:func:`records.group_config`): its summary's, else
  from ``config.json``; None when neither has it."""
  if run.summary and run.summary.get("group") is not None:
    return run.summary["group"]
  return group_config(run.config) if run.config else None


def run_summary(run: Run) -> dict[str, Any]:
  """The finished run's summary, with its ``group`` (older summaries lack it)."""
  return {**(run.summary or {}), "group": run_group(run)}
