r"""Trains sparse (and dense) models from an ml_collections config and prints a Markdown table.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl \
      [--config.sparse.sparsity=0.95] [--dense_baseline=false] \
      [--methods=dense,static,set,rigl,gmp] [--workdir=/tmp/rigl]

Without ``--methods`` the configured method runs, plus the same setup with method
"dense" unless ``--dense_baseline=false``. With ``--methods``, each method keeps the
keys of ``config.sparse`` it accepts (a missing ``end_step`` becomes the 75 %
placeholder). Every run is validated and built before the first one trains: a bad
config prints one line and exits with status 2; a missing dataset, or a ``--workdir``
that cannot be created, exits with status 1.

The table has a column of the remaining weights per layer (%) when a ``dst`` run is
in it. With ``--workdir=DIR``, each run writes ``DIR/<method>/history.json`` (its
result, density history and config) and, for a sparse method, ``DIR/<method>/density.png``
(per-layer density over training); nothing else in DIR is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os
from pathlib import Path
import re
import sys
from typing import Any

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from sparsejax import train as train_lib
from sparsejax.data import load_idx_dataset

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_METHODS = flags.DEFINE_list("methods", None, "Methods to run, e.g. dense,static,set,rigl,gmp; "
                             "default: the config's method.")
_DENSE_BASELINE = flags.DEFINE_bool("dense_baseline", True,
                                    "Also train the same setup with method 'dense'.")

_WORKDIR = flags.DEFINE_string("workdir", None, "If set, write DIR/<method>/history.json and, "
                                "for sparse methods, DIR/<method>/density.png for every run.")

CONFIG_ERROR = 2
DATA_ERROR = 1
OUTPUT_ERROR = 1
PER_LAYER_METHODS = ("dst",)  # methods whose table shows the remaining % per layer


def _fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags like ``app.run``, but reports an error as one line, with status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):  # an exception raised by get_config
      lines = [re.sub(r"^\w+: ", "", lines[-1])]
    _fail(" ".join(lines), CONFIG_ERROR)
  except (AttributeError, KeyError) as e:  # ml_collections, for an override of a missing key
    key = str(e).strip("\"'")
    names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    names = [name for name in names if key in name.split(".")] or [f"--config.*{key}"]
    _fail(f"{names[0]}: the config has no such key", CONFIG_ERROR)


def layer_label(path: str) -> str:
  """A short layer name for the table: ``"Dense_0/kernel"`` → ``"Dense_0"``."""
  return path.removesuffix("/kernel")


def remaining_per_layer(layers: dict[str, float]) -> str:
  """The remaining weights (%) of each layer, e.g. ``"8.1 / 20.3 / 71.0"``; "-" if none.

  Args:
    layers: ``{path: sparsity}``, as in a result of :func:`sparsejax.train.run`.

  Returns:
    The densities in %, one decimal, in the order of ``layers``.
  """
  if not layers:
    return "-"
  return " / ".join(f"{100.0 * (1.0 - sparsity):.1f}" for sparsity in layers.values())


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
  """The results as a Markdown table, with the dense run's accuracy on every row.

  When a method of :data:`PER_LAYER_METHODS` is among the results, a last column
  gives every sparse run's remaining weights per layer (%), layers named in its header.

  Args:
    results: dicts from :func:`sparsejax.train.run`.

  Returns:
    The table, one row per result.
  """
  dense = [r["test_accuracy"] for r in results if r["method"] == "dense"]
  dense_accuracy = f"{dense[0]:.4f}" if dense else "n/a"
  header = "| method | sparsity | test accuracy | dense accuracy | time (s) |"
  rule = "|---|---:|---:|---:|---:|"
  per_layer = [r.get("layers") for r in results
               if r["method"] in PER_LAYER_METHODS and r.get("layers")]
  if per_layer:
    names = " / ".join(layer_label(path) for path in per_layer[0])
    header += f" remaining % per layer ({names}) |"
    rule += "---:|"
  lines = [header, rule]
  for r in results:
    line = (f"| {r['method']} | {r['sparsity']:.3f} | {r['test_accuracy']:.4f} | "
            f"{dense_accuracy} | {r['seconds']:.1f} |")
    if per_layer:
      line += f" {remaining_per_layer(r.get('layers') or {})} |"
    lines.append(line)
  return "\n".join(lines)


def _finite_or_none(tree: Any) -> Any:
  """``tree`` with NaN and infinite floats replaced by None (plain JSON numbers only)."""
  if isinstance(tree, dict):
    return {key: _finite_or_none(value) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite_or_none(value) for value in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def plot_title(config: ml_collections.ConfigDict, result: dict[str, Any]) -> str:
  """The density plot's title: method (and alpha), model, accuracy and remaining weights."""
  method = result["method"]
  if "alpha" in config.sparse:
    method += f" (alpha={config.sparse.alpha:g})"
  return (f"{method}, {config.model}: test accuracy {100.0 * result['test_accuracy']:.2f} %, "
          f"{100.0 * (1.0 - result['sparsity']):.1f} % remaining")


def write_run(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
              result: dict[str, Any]) -> Path:
  """Writes ``workdir/<method>/history.json`` and, with a history, ``density.png``.

  Only these two files are (over)written; directories are created as needed.

  Args:
    workdir: the ``--workdir`` directory.
    config: the run's config (saved in the JSON).
    result: the run's result, from :func:`sparsejax.train.run`.

  Returns:
    The run's directory.
  """
  directory = Path(workdir) / result["method"]
  directory.mkdir(parents=True, exist_ok=True)
  record = _finite_or_none({**result, "config": json.loads(config.to_json_best_effort())})
  temporary = directory / "history.json.tmp"
  temporary.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
  temporary.replace(directory / "history.json")
  if result["history"]:
    train_lib.plot_density(result["history"], directory / "density.png",
                           title=plot_title(config, result))
  return directory


def methods_to_run(config_method: str, methods: Sequence[str] | None,
                   dense_baseline: bool) -> list[str]:
  """The methods of one invocation, without repeats, "dense" first when it is added.

  Args:
    config_method: ``config.sparse.method``.
    methods: the ``--methods`` list, or None for the config's method alone.
    dense_baseline: add "dense" if it is not there.

  Returns:
    The method names, in order.
  """
  names = list(methods or [config_method])
  if dense_baseline and "dense" not in names:
    names.insert(0, "dense")
  return list(dict.fromkeys(names))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=experiments/configs/fashion_mnist.py:rigl",
          CONFIG_ERROR)
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # config_flags stands in an object that raises on access for a file it could not load
      config.get("sparse")
    except OSError as e:
      _fail(" ".join(line.strip() for line in str(e).splitlines() if line.strip()), CONFIG_ERROR)
  try:
    train_lib.validate_config(config)
    methods = methods_to_run(config.sparse.method, _METHODS.value, _DENSE_BASELINE.value)
    configs = [config if method == config.sparse.method else train_lib.with_method(config, method)
               for method in methods]
    for run_config in configs:
      train_lib.validate_config(run_config)
  except ValueError as e:
    _fail(str(e), CONFIG_ERROR)
  try:
    data = load_idx_dataset(config.get("dataset", "fashion_mnist"), config.get("data_dir"))
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e), DATA_ERROR)
  try:
    for run_config in configs:  # cheap checks of every run before any compilation
      train_lib.build_optimizer(run_config, len(data["train"]["label"]))
    experiments = [train_lib.setup(run_config, data) for run_config in configs]
  except ValueError as e:
    _fail(str(e), CONFIG_ERROR)
  workdir = _WORKDIR.value
  if workdir:
    try:  # fail before training if the results cannot be written
      Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      _fail(f"--workdir: {e}", OUTPUT_ERROR)
  results = []
  for experiment in experiments:
    results.append(train_lib.run(experiment))
    if workdir:
      directory = write_run(workdir, experiment.config, results[-1])
      print(f"wrote {directory}", file=sys.stderr, flush=True)
  print(markdown_table(results), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
