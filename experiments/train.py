r"""Trains sparse (and dense) models from an ml_collections config and prints a Markdown table.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl \
      [--config.sparse.sparsity=0.95] [--dense_baseline=false] \
      [--methods=dense,static,set,rigl,gmp]

Without ``--methods`` the configured method runs, plus the same setup with method
"dense" unless ``--dense_baseline=false``. With ``--methods``, each method keeps the
keys of ``config.sparse`` it accepts (a missing ``end_step`` becomes the 75 %
placeholder). Every run is validated and built before the first one trains: a bad
config prints one line and exits with status 2; a missing dataset exits with status 1.
"""

from __future__ import annotations

from collections.abc import Sequence
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

CONFIG_ERROR = 2
DATA_ERROR = 1


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


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
  """The results as a Markdown table, with the dense run's accuracy on every row.

  Args:
    results: dicts from :func:`sparsejax.train.run`.

  Returns:
    The table, one row per result.
  """
  dense = [r["test_accuracy"] for r in results if r["method"] == "dense"]
  dense_accuracy = f"{dense[0]:.4f}" if dense else "n/a"
  lines = ["| method | sparsity | test accuracy | dense accuracy | time (s) |",
           "|---|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {r['test_accuracy']:.4f} | "
                 f"{dense_accuracy} | {r['seconds']:.1f} |")
  return "\n".join(lines)


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
  results = [train_lib.run(experiment) for experiment in experiments]
  print(markdown_table(results), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
