"""Plots of training histories (matplotlib, imported only when a plot is drawn).

The figures are drawn with matplotlib's object-oriented API on an Agg canvas: no
``pyplot``, no global backend switch, no display needed::

  result = sparsejax.train.train_and_evaluate(config)
  plot_density(result["history"], "density.png", title="dst: test accuracy 88.1 %")
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

LOG_SCALE_BELOW = 0.1  # use a log y axis when some density falls below 10 %
GLOBAL_LABEL = "global"


def density_series(history: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
  """Per-layer and global density, in %, one value per record of ``history``.

  Args:
    history: records ``{"step", "epoch", "density", "layers": {path: density}}``
      as made by :func:`sparsejax.train.loop.density_record`.

  Returns:
    ``{path: [density %, ...]}`` for every layer of the first record, then
    ``{"global": [...]}``.
  """
  layers = list(history[0]["layers"]) if history else []
  series = {name: [100.0 * record["layers"][name] for record in history] for name in layers}
  series[GLOBAL_LABEL] = [100.0 * record["density"] for record in history]
  return series


def use_log_scale(series: dict[str, list[float]]) -> bool:
  """Whether the densities span enough to need a log y axis (some value below 10 %)."""
  values = [value for values in series.values() for value in values if value > 0]
  return bool(values) and min(values) < 100.0 * LOG_SCALE_BELOW


def _steps_per_epoch(history: Sequence[dict[str, Any]]) -> int | None:
  """The step count of the first full epoch, if the history has one."""
  for record in history:
    if record["epoch"] == 1:
      return int(record["step"])
  return None


def plot_density(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                 title: str = "") -> None:
  """Writes a PNG of per-layer and global density (%) over training steps.

  Args:
    history: density records (see :func:`density_series`); at least one.
    path: the PNG file to write (its directory must exist).
    title: the figure title, e.g. the method and its final accuracy.

  Raises:
    ValueError: for an empty history.
  """
  if not history:
    raise ValueError("plot_density needs at least one history record")
  # Imported here so that sparsejax needs matplotlib only to plot.
  from matplotlib import ticker
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  steps = [int(record["step"]) for record in history]
  series = density_series(history)
  figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for name, values in series.items():
    is_global = name == GLOBAL_LABEL
    final = f"{values[-1]:.1f} %"
    axes.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if is_global else 1.5,
              linestyle="--" if is_global else "-", color="black" if is_global else None,
              label=f"{name} ({final})")
  if use_log_scale(series):
    axes.set_yscale("log")  # ticks at 1, 2, 5, 10, 20, 50, 100 %, written as plain numbers
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
  epoch = _steps_per_epoch(history)
  axes.set_xlabel(f"training step ({epoch} per epoch)" if epoch else "training step")
  axes.set_ylabel("density (% of weights remaining)")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(title="layer (final)", fontsize="small")
  if title:
    axes.set_title(title)
  figure.savefig(os.fspath(path), format="png")
