r"""Summarizes training run directories: a Markdown table over seeds and PNG plots.

  python -m experiments.report DIR [DIR ...] [--out=OUTDIR]

Each DIR is a run directory (it holds ``config.json`` or ``metrics.jsonl``, as written
by the training runner) or a directory searched recursively for run directories (the
search does not descend into a run directory). Runs are grouped by (dataset, model,
method, target sparsity) and aggregated over seeds.

Only finished runs (with ``summary.json``) enter the table and the accuracy plot; an
unfinished run is named on stderr, and its curves (loss, density) are still plotted
from its ``metrics.jsonl``, labelled "unfinished". A run that failed (its summary's
``status`` is not "finished", e.g. a diverged loss) is left out the same way and
listed, with where and why it failed, on stderr and under the table in ``report.md``.

The table is printed and written to ``OUTDIR/report.md``, next to the plots
``accuracy_vs_sparsity.png``, ``accuracy_vs_coverage.png`` (runs with a coverage),
``loss_<group>.png`` (every group) and
``density_<group>.png`` (sparse groups). OUTDIR defaults to ``DIR/report`` for a
single DIR and to ``./report`` for several. It is created if needed; only these files
are (over)written, nothing is deleted. A DIR that does not exist or holds no run, or
an unreadable JSON file, prints one line ``error: ...`` and exits with status 2; an
OUTDIR that cannot be written exits with status 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import json
import os
from pathlib import Path
import re
import statistics
import sys
from typing import Any, NamedTuple

from absl import app, flags

from experiments.cli import fail, flag_error_line
import sparsejax
from sparsejax.train.records import group_config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
ACCURACY_PLOT = "accuracy_vs_sparsity.png"
COVERAGE_PLOT = "accuracy_vs_coverage.png"
DEFAULT_OUT = "report"
INPUT_ERROR = 2
OUTPUT_ERROR = 1
DENSE = "dense"
LOG_SCALE_BELOW = 10.0  # density plots use a log y axis when some density (%) is below this
GLOBAL_LABEL = "global"


class ReportError(ValueError):
  """Bad input: a missing directory, no runs, or an unreadable file."""


class GroupKey(NamedTuple):
  """What runs aggregated over seeds share: their label, and their config without seeds."""
  dataset: str
  model: str
  method: str
  target_sparsity: float | None
  config: str = ""  # canonical JSON of records.group_config; "" when unknown


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


# Finding and reading runs.


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


# Grouping and aggregating.


def group_key(summary: Mapping[str, Any]) -> GroupKey:
  """The group of a summary (or :func:`run_info`) dict: dataset, model, method, target.

  A ``variant`` (e.g. DST's ``"alpha=0.0005"``, which stands in for a target sparsity)
  is part of the method's name: ``"dst (alpha=0.0005)"``. Summaries with a ``group``
  (the config without seeds) are grouped only with summaries of an equal one.
  """
  method = str(summary.get("method") or "unknown")
  if summary.get("variant"):
    method = f"{method} ({summary['variant']})"
  target = summary.get("target_sparsity")
  group = summary.get("group")
  return GroupKey(str(summary.get("dataset") or "-"), str(summary.get("model") or "-"), method,
                  None if method == DENSE or target is None else round(float(target), 6),
                  "" if group is None else json.dumps(group, sort_keys=True))


def sort_key(key: GroupKey) -> tuple[Any, ...]:
  """Dataset, model, dense first, method name, then target sparsity (none first)."""
  target = key.target_sparsity
  return (key.dataset, key.model, key.method != DENSE, key.method, target is not None,
          target or 0.0, key.config)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"optimizer.learning_rate": 0.1, ...}`` of a nested dict."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def method_labels(keys: Iterable[GroupKey]) -> dict[GroupKey, str]:
  """Each group's method name, followed by the config values that tell apart groups of
  the same dataset, model, method and target, e.g. ``"rigl (num_epochs=2)"``."""
  keys = list(keys)
  same: dict[GroupKey, list[GroupKey]] = {}
  for key in keys:
    same.setdefault(key._replace(config=""), []).append(key)
  labels = {}
  for members in same.values():
    flats = [_flat(json.loads(key.config)) if key.config else {} for key in members]
    names = sorted({name for flat in flats for name in flat})
    differing = [name for name in names if len({json.dumps(f.get(name)) for f in flats}) > 1]
    for key, flat in zip(members, flats):
      values = ", ".join(f"{name}={json.dumps(flat.get(name))}" for name in differing)
      labels[key] = f"{key.method} ({values})" if values else key.method
  return labels


def _mean(values: Iterable[Any]) -> float | None:
  numbers = [float(value) for value in values if value is not None]
  return statistics.fmean(numbers) if numbers else None


def _stdev(values: Iterable[Any]) -> float | None:
  """The sample standard deviation (ddof=1); None for fewer than two values."""
  numbers = [float(value) for value in values if value is not None]
  return statistics.stdev(numbers) if len(numbers) > 1 else None


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups summaries by :func:`group_key` and averages them over seeds.

  Args:
    summaries: ``summary.json`` dicts (or in-memory summaries of the training runner).

  Returns:
    One dict per group, sorted by :func:`sort_key`: ``key`` (a :class:`GroupKey`), ``n``
    (the number of summaries), ``seeds``, the means ``sparsity``, ``test_accuracy``,
    ``train_flops_ratio``, ``inference_flops_ratio`` and ``coverage`` (None where no
    summary has a value) and ``test_accuracy_std`` (sample std, None for one value).
  """
  groups: dict[GroupKey, list[Mapping[str, Any]]] = {}
  for summary in summaries:
    groups.setdefault(group_key(summary), []).append(summary)
  rows = []
  for key in sorted(groups, key=sort_key):
    members = groups[key]
    row: dict[str, Any] = {"key": key, "n": len(members),
                           "seeds": [member.get("seed") for member in members]}
    for name in ("sparsity", "test_accuracy", "train_flops_ratio", "inference_flops_ratio",
                 "coverage"):
      row[name] = _mean(member.get(name) for member in members)
    row["test_accuracy_std"] = _stdev(member.get("test_accuracy") for member in members)
    rows.append(row)
  return rows


def group_runs(runs: Sequence[Run]) -> dict[GroupKey, list[Run]]:
  """The runs by group, groups sorted by :func:`sort_key`; finished runs first, then by seed."""
  groups: dict[GroupKey, list[Run]] = {}
  for run in runs:
    groups.setdefault(group_key(run_info(run)), []).append(run)

  def order(run: Run) -> tuple[Any, ...]:
    seed = run_info(run)["seed"]
    return (not run.finished, seed is None, seed if isinstance(seed, (int, float)) else 0,
            str(run.path))

  return {key: sorted(groups[key], key=order) for key in sorted(groups, key=sort_key)}


# The table.


def _number(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def accuracy_cell(mean: float | None, std: float | None) -> str:
  """``"92.00 ± 2.00"`` (in %), just the mean without a std, ``"-"`` without a mean."""
  if mean is None:
    return "-"
  return f"{100.0 * mean:.2f}" if std is None else f"{100.0 * mean:.2f} ± {100.0 * std:.2f}"


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of the summaries, one row per group aggregated over seeds.

  Args:
    summaries: dicts with the keys of ``summary.json`` (method, dataset, model, seed,
      target_sparsity, sparsity, test_accuracy, train_flops_ratio, inference_flops_ratio,
      coverage); missing or null values show as "-".

  Returns:
    The table: method, model, dataset (only when there are several), mean measured
    sparsity, test accuracy in % as ``mean ± std`` over seeds (sample std), the number
    of seeds ``n``, mean FLOPs ratios (sparse / dense) and mean coverage.
  """
  rows = aggregate(summaries)
  labels = method_labels(row["key"] for row in rows)
  with_dataset = len({row["key"].dataset for row in rows}) > 1
  names = ["method", "model", *(["dataset"] if with_dataset else []), "sparsity",
           "test accuracy (%)", "n", "train FLOPs (× dense)", "inference FLOPs (× dense)",
           "coverage"]
  lines = ["| " + " | ".join(names) + " |",
           "|" + "|".join("---" if name in ("method", "model", "dataset") else "---:"
                          for name in names) + "|"]
  for row in rows:
    key = row["key"]
    cells = [labels[key], key.model, *([key.dataset] if with_dataset else []),
             _number(row["sparsity"], ".3f"),
             accuracy_cell(row["test_accuracy"], row["test_accuracy_std"]), str(row["n"]),
             _number(row["train_flops_ratio"], "#.3g"),
             _number(row["inference_flops_ratio"], "#.3g"), _number(row["coverage"], ".3f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# The plots.


def group_name(key: GroupKey) -> str:
  """A filesystem-safe name, e.g. ``"fashion_mnist-lenet300100-rigl-0.9"``."""
  parts = [key.dataset, key.model, key.method]
  if key.target_sparsity is not None:
    parts.append(f"{key.target_sparsity:g}")
  name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", part).strip("._") or "_" for part in parts)
  return name


def _unique_names(keys: Iterable[GroupKey]) -> dict[GroupKey, str]:
  """:func:`group_name` of every key, with ``-2``, ``-3``... after a name already taken."""
  names: dict[GroupKey, str] = {}
  taken: set[str] = set()
  for key in keys:
    name, count = group_name(key), 1
    while name in taken:
      count += 1
      name = f"{group_name(key)}-{count}"
    names[key] = name
    taken.add(name)
  return names


def _new_figure(width: float = 7.0, height: float = 4.5) -> Any:
  """A matplotlib Figure on an Agg canvas (matplotlib is imported only to plot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _save(figure: Any, path: Path) -> Path:
  """Writes ``figure`` as a PNG to ``path`` (through a temporary file)."""
  temporary = path.with_name(path.name + ".tmp")
  figure.savefig(os.fspath(temporary), format="png")
  temporary.replace(path)
  return path


def _run_label(run: Run) -> str:
  seed = run_info(run)["seed"]
  label = f"seed {seed}" if seed is not None else run.path.name
  if run.finished:
    return label
  return f"{label} ({'unfinished' if run.summary is None else run.summary['status']})"


def _group_title(key: GroupKey) -> str:
  sparsity = "" if key.target_sparsity is None else f" {100.0 * key.target_sparsity:g} %"
  return f"{key.method}{sparsity}, {key.model} on {key.dataset}"


def _seeds_label(method: str, counts: Sequence[int]) -> str:
  low, high = min(counts), max(counts)
  seeds = f"n={low}" if low == high else f"n={low}–{high}"
  return f"{method} ({seeds})"


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
  """Test accuracy (%) over measured sparsity (%), one panel per (dataset, model).

  Args:
    rows: groups from :func:`aggregate` (at least one).
    path: the PNG to write.

  Returns:
    ``path``. Each sparse method is a line with error bars (sample std over seeds);
    dense is a horizontal line with a ± std band.
  """
  panels: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for row in rows:
    panels.setdefault((row["key"].dataset, row["key"].model), []).append(row)
  methods = sorted({row["key"].method for row in rows if row["key"].method != DENSE})
  colors = {method: f"C{i % 10}" for i, method in enumerate(methods)}
  columns = min(len(panels), 3)
  lines = -(-len(panels) // columns)
  figure = _new_figure(7.0 * columns, 4.5 * lines)
  for index, ((dataset, model), members) in enumerate(panels.items()):
    axes = figure.add_subplot(lines, columns, index + 1)
    _draw_accuracy_panel(axes, members, colors)
    axes.set_title(f"{model} on {dataset}")
  return _save(figure, path)


def _draw_accuracy_panel(axes: Any, rows: Sequence[Mapping[str, Any]],
                         colors: Mapping[str, str]) -> None:
  for row in rows:
    if row["key"].method != DENSE or row["test_accuracy"] is None:
      continue
    mean, std = 100.0 * row["test_accuracy"], 100.0 * (row["test_accuracy_std"] or 0.0)
    axes.axhline(mean, color="black", linestyle="--", linewidth=1.5,
                 label=_seeds_label(DENSE, [row["n"]]))
    if std:
      axes.axhspan(mean - std, mean + std, color="black", alpha=0.1, linewidth=0)
  for method, color in colors.items():
    points = sorted(((row["sparsity"], row) for row in rows if row["key"].method == method
                     and row["sparsity"] is not None and row["test_accuracy"] is not None),
                    key=lambda point: point[0])
    if not points:
      continue
    axes.errorbar([100.0 * sparsity for sparsity, _ in points],
                  [100.0 * row["test_accuracy"] for _, row in points],
                  yerr=[100.0 * (row["test_accuracy_std"] or 0.0) for _, row in points],
                  marker="o", markersize=5, capsize=4, linewidth=1.5, color=color,
                  label=_seeds_label(method, [row["n"] for _, row in points]))
  axes.set_xlabel("sparsity (% of weights zero, measured)")
  axes.set_ylabel("test accuracy (%, mean ± std over seeds)")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="small")


def plot_coverage(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
  """Test accuracy (%) over final coverage (the fraction of weights ever active).

  Args:
    rows: groups from :func:`aggregate`.
    path: the PNG to write.

  Returns:
    ``path``, or None when no group has a coverage. One colour per method, one
    marker per target sparsity (groups differing in other settings, e.g. epochs, are
    separate points of the same look); dense groups are thin grey lines.
  """
  sparse = [row for row in rows if row["coverage"] is not None
            and row["test_accuracy"] is not None]
  if not sparse:
    return None
  methods = sorted({row["key"].method for row in sparse})
  colors = {method: f"C{i % 10}" for i, method in enumerate(methods)}
  targets = sorted({row["key"].target_sparsity for row in sparse},
                   key=lambda t: -1.0 if t is None else t)
  markers = {target: "osD^vP*X"[i % 8] for i, target in enumerate(targets)}
  figure = _new_figure()
  axes = figure.add_subplot(1, 1, 1)
  dense = [row for row in rows if row["key"].method == DENSE and row["test_accuracy"] is not None]
  for index, row in enumerate(dense):
    axes.axhline(100.0 * row["test_accuracy"], color="grey", linewidth=0.8,
                 label="dense (each setting)" if index == 0 else None)
  for row in sparse:
    key = row["key"]
    axes.errorbar(100.0 * row["coverage"], 100.0 * row["test_accuracy"],
                  yerr=100.0 * (row["test_accuracy_std"] or 0.0), linestyle="none",
                  marker=markers[key.target_sparsity], markersize=5, capsize=3,
                  color=colors[key.method])
  for method in methods:
    axes.plot([], [], linestyle="none", marker="o", color=colors[method], label=method)
  for target in targets:
    name = "-" if target is None else f"{100.0 * target:g} %"
    axes.plot([], [], linestyle="none", marker=markers[target], color="black", label=name)
  axes.set_xlabel("coverage (% of masked weights ever active, mean over seeds)")
  axes.set_ylabel("test accuracy (%, mean ± std over seeds)")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="x-small", ncol=2)
  return _save(figure, path)


def eval_rows(run: Run) -> list[dict[str, Any]]:
  """The evaluation rows of the run's metrics (those with ``test_loss`` or ``layers``)."""
  return [row for row in run.metrics if "test_loss" in row or "layers" in row]


def plot_loss(key: GroupKey, runs: Sequence[Run], path: Path) -> Path | None:
  """Train loss (lines) and test loss (markers at evaluation rows) over steps, per run.

  Args:
    key: the group (for the title).
    runs: the group's runs.
    path: the PNG to write.

  Returns:
    ``path``, or None (nothing written) when no run has a loss.
  """
  figure = _new_figure()
  axes = figure.add_subplot()
  drawn = False
  for index, run in enumerate(runs):
    color, label = f"C{index % 10}", _run_label(run)
    train = [(row["step"], row["train_loss"]) for row in run.metrics
             if row.get("train_loss") is not None]
    test = [(row["step"], row["test_loss"]) for row in eval_rows(run)
            if row.get("test_loss") is not None]
    if train:
      axes.plot(*zip(*train), color=color, linewidth=1.2, label=f"{label}: train")
    if test:
      axes.plot(*zip(*test), color=color, linewidth=1.2, linestyle="--", marker="o",
                markersize=4, label=f"{label}: test")
    drawn = drawn or bool(train or test)
  if not drawn:
    return None
  axes.set_xlabel("training step")
  axes.set_ylabel("loss")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="small")
  axes.set_title(f"loss: {_group_title(key)}")
  return _save(figure, path)


def density_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
  """Per-layer density in % (1 − sparsity) of every layer in the first row, then global.

  Args:
    rows: evaluation rows with a non-empty ``layers``.

  Returns:
    ``{layer path: [density %, ...], "global": [...]}`` (None where a row lacks a value).
  """
  def density(value: Any) -> float | None:
    return None if value is None else 100.0 * (1.0 - float(value))

  series = {name: [density(row["layers"].get(name)) for row in rows] for name in rows[0]["layers"]}
  series[GLOBAL_LABEL] = [density(row.get("sparsity")) for row in rows]
  return series


def plot_density(key: GroupKey, run: Run, path: Path) -> Path | None:
  """Per-layer and global density (%) over steps from the run's evaluation rows.

  Args:
    key: the group (for the title).
    run: the group's first run.
    path: the PNG to write.

  Returns:
    ``path``, or None (nothing written) when no evaluation row has per-layer values.
  """
  rows = [row for row in eval_rows(run) if row.get("layers")]
  if not rows:
    return None
  from matplotlib import ticker

  steps = [row["step"] for row in rows]
  series = density_series(rows)
  figure = _new_figure()
  axes = figure.add_subplot()
  for name, values in series.items():
    is_global = name == GLOBAL_LABEL
    final = "-" if values[-1] is None else f"{values[-1]:.1f} %"
    axes.plot(steps, [float("nan") if v is None else v for v in values], marker="o",
              markersize=3, linewidth=2.5 if is_global else 1.5,
              linestyle="--" if is_global else "-", color="black" if is_global else None,
              label=f"{name} ({final})")
  positive = [v for values in series.values() for v in values if v is not None and v > 0]
  if positive and min(positive) < LOG_SCALE_BELOW:
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
  axes.set_xlabel("training step")
  axes.set_ylabel("density (% of weights remaining)")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(title="layer (final)", fontsize="small")
  axes.set_title(f"density: {_group_title(key)}, {_run_label(run)}")
  return _save(figure, path)


def write_plots(runs: Sequence[Run], out: str | os.PathLike[str]) -> list[Path]:
  """Writes the PNG plots of ``runs`` into ``out`` (which must exist).

  Args:
    runs: finished and unfinished runs; only finished ones enter the accuracy plot.
    out: the output directory.

  Returns:
    The files written: ``accuracy_vs_sparsity.png`` (when a run finished),
    ``accuracy_vs_coverage.png`` (when a finished run reports coverage),
    ``loss_<group>.png`` per group with losses and ``density_<group>.png`` per group
    with per-layer sparsities (its first finished run, by seed).
  """
  out = Path(out)
  written = []
  summaries = [run_summary(run) for run in runs if run.finished]
  if summaries:
    rows = aggregate(summaries)
    written.append(plot_accuracy(rows, out / ACCURACY_PLOT))
    written.append(plot_coverage(rows, out / COVERAGE_PLOT))
  groups = group_runs(runs)
  for key, name in _unique_names(groups).items():
    members = groups[key]
    written.append(plot_loss(key, members, out / f"loss_{name}.png"))
    if key.method != DENSE:
      written.append(plot_density(key, members[0], out / f"density_{name}.png"))
  return [path for path in written if path is not None]


# The command line.


def default_out(paths: Sequence[str | os.PathLike[str]]) -> Path:
  """``DIR/report`` for a single DIR, else ``./report``."""
  return Path(paths[0]) / DEFAULT_OUT if len(paths) == 1 else Path(DEFAULT_OUT)


def write_report(table: str, out: Path) -> Path:
  """Writes ``out/report.md`` (through a temporary file) and returns its path."""
  path = out / REPORT_FILE
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(table + "\n")
  temporary.replace(path)
  return path


def define_flags() -> None:
  """Defines ``--out``; called only by the command line, so importing this module adds no flag."""
  flags.DEFINE_string("out", None, "Output directory (default: DIR/report for a single DIR, "
                      "else ./report).")


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags like ``app.run``, but reports an error as one line, with status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e), INPUT_ERROR)


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    fail("give at least one run directory: python -m experiments.report DIR [DIR ...]",
          INPUT_ERROR)
  try:
    runs = [load_run(path) for path in find_runs(paths)]
  except ReportError as e:
    fail(str(e), INPUT_ERROR)
  left_out = [(run, f"{run.left_out()}, left out of the table: {run.path}")
              for run in runs if not run.finished]
  for _, line in left_out:
    print(line, file=sys.stderr)
  summaries = [run_summary(run) for run in runs if run.finished]
  if not summaries:
    print("no finished run: the table is empty", file=sys.stderr)
  table = markdown_table(summaries)
  print(table, flush=True)
  failed = [line for run, line in left_out if run.summary is not None]
  if failed:
    table += "\n\nFailed runs:\n\n" + "\n".join(f"- {line}" for line in failed)
  out_flag = flags.FLAGS["out"].value if "out" in flags.FLAGS else None
  out = Path(out_flag) if out_flag else default_out(paths)
  try:
    out.mkdir(parents=True, exist_ok=True)
    write_report(table, out)
    written = write_plots(runs, out)
  except OSError as e:
    fail(f"--out: {e}", OUTPUT_ERROR)
  print(f"wrote {out / REPORT_FILE} and {len(written)} plots in {out}", file=sys.stderr)

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
