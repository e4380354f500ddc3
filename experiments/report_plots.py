"""The report's PNG plots: accuracy over sparsity and over coverage, loss and density.

Plots are drawn on matplotlib Figures with an Agg canvas and written through a temporary
file. matplotlib is imported only inside the functions that draw, so importing this
module (or the report, or the training runner) does not import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import os
from pathlib import Path
import re
from typing import Any

from experiments.report_runs import DENSE, Run, run_info, run_summary
from experiments.report_tables import GroupKey, aggregate, group_runs

ACCURACY_PLOT = "accuracy_vs_sparsity.png"
COVERAGE_PLOT = "accuracy_vs_coverage.png"
LOG_SCALE_BELOW = 10.0  # density plots use a log y axis when some density (%) is below this
GLOBAL_LABEL = "global"


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
