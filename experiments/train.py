r"""Trains sparse (and dense) models from an ml_collections config and prints a Markdown table.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py:rigl \
      [--config.sparse.sparsity=0.95] [--workdir=runs/rigl] [--dense_baseline] \
      [--methods=dense,static,set,rigl,gmp] [--seeds=0,1,2] [--validate_only] \
      [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

The configured method runs (``--methods``: each of them, keeping the keys of
``config.sparse`` a method accepts; ``--dense_baseline``: "dense" too), once per seed
of ``--seeds`` (which sets ``config.seed`` and the method's ``sparse.seed``). With
``--workdir=DIR`` a single run writes into DIR, several into ``DIR/<method>``,
``DIR/seed<s>`` or ``DIR/<method>/seed<s>``: ``config.json``, ``metrics.jsonl``,
TensorBoard events, orbax checkpoints and ``summary.json``; running the same command
again resumes every run from its last checkpoint (or just reports a finished run).
The printed table averages runs whose configs differ only in their seeds (mean ± std,
n). ``python -m experiments.report DIR`` makes tables and plots from run directories.

``--validate_only`` checks every run's config and overrides and builds its model and
optimizer (abstractly), without reading data or touching the disk, prints each run's
resolved config as JSON and exits 0.

Every run is validated and built before the first one trains: a bad config, or a DIR
holding a run of another config, prints one line and exits with status 2 (nothing on
disk is touched); a missing dataset, or a DIR that cannot be written, exits with 1.

While training, SIGTERM or SIGINT stops the current run after the running step, saves
a checkpoint of it and exits with status 75; the same command continues. A
non-finite loss stops that run (status 3 at the end, the other runs still train; with
``--config.on_nonfinite=skip`` such steps are skipped and counted instead). A
checkpoint that does not restore intact is reported and the one before it used; when
none does, the run exits with 4; a checkpoint that cannot be written exits with 1.

Multi-host: ``--distributed`` (or ``JAX_COORDINATOR_ADDRESS`` in the environment) starts
``jax.distributed`` before anything else; on Cloud TPU, SLURM, Open MPI and Kubernetes
JAX finds the processes itself, elsewhere give ``--coordinator_address``,
``--num_processes`` and ``--process_id``. Every process runs the same command; each
reads its own rows of every batch, all write the checkpoints (orbax), and only process
0 writes the other files and prints the table.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import os
from pathlib import Path
import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from experiments.cli import fail, flag_error_line, quiet_checkpoint_errors

try:
  from experiments.report_tables import markdown_table
  from sparsejax import train as train_lib
  from sparsejax.train.sharding import is_primary
except ImportError as e:  # the runner's packages come with sparsejax[experiments]
  fail(str(e), 1)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_METHODS = flags.DEFINE_list("methods", None, "Methods to run, e.g. dense,static,set,rigl,gmp; "
                             "default: the config's method.")
_DENSE_BASELINE = flags.DEFINE_bool("dense_baseline", False,
                                    "Also train the same setup with method 'dense'.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds to run, e.g. 0,1,2: each sets config.seed and "
                           "config.sparse.seed; one run directory per seed.")
_VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False, "Validate the config(s), build model "
                                   "and optimizer without data or disk, print them, exit.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (DIR/<method> for several runs): "
                               "checkpoints, metrics.jsonl, TensorBoard, summary.json.")

_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Start jax.distributed (multi-host); "
                                 "implied by the three flags below or JAX_COORDINATOR_ADDRESS.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 "
                                   "(jax.distributed; default: detected from the cluster).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run "
                                      "(jax.distributed; default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index "
                                   "(jax.distributed; default: detected).")

CONFIG_ERROR = 2
DATA_ERROR = 1
OUTPUT_ERROR = 1  # also: a checkpoint could not be written
DIVERGED = 3  # a run met a non-finite loss (config.on_nonfinite="stop") or state
NO_CHECKPOINT = 4  # a run directory holds checkpoints, but none restores intact
PREEMPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags like ``app.run``, but reports an error as one line, with status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e), CONFIG_ERROR)
  except (AttributeError, KeyError) as e:  # ml_collections, for an override of a missing key
    key = str(e).strip("\"'")
    names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    names = [name for name in names if key in name.split(".")] or [f"--config.*{key}"]
    fail(f"{names[0]}: the config has no such key", CONFIG_ERROR)


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


def run_dirs(workdir: str | None, methods: Sequence[str], seeds: Sequence[int] | None = None
             ) -> list[Path | None]:
  """Each run's directory, methods outer and seeds inner.

  ``workdir`` for one run; ``workdir/<method>`` for several methods without ``seeds``;
  ``workdir/seed<s>`` for one method with seeds; else ``workdir/<method>/seed<s>``.
  """
  runs = [(method, seed) for method in methods for seed in (seeds or [None])]
  if workdir is None:
    return [None] * len(runs)
  root = Path(workdir)
  if seeds is None:
    return [root] if len(methods) == 1 else [root / method for method, _ in runs]
  return [(root if len(methods) == 1 else root / method) / f"seed{seed}"
          for method, seed in runs]


def parse_seeds(values: Sequence[str] | None, argv: Sequence[str]) -> list[int] | None:
  """The ``--seeds`` list as integers, without repeats; None without the flag.

  Raises:
    ValueError: for a value that is not an integer >= 0, or ``--config.seed`` /
      ``--config.sparse.seed`` given too (``--seeds`` sets them).
  """
  if values is None:
    return None
  for arg in argv:
    name = arg.split("=")[0]
    if name in ("--config.seed", "--config.sparse.seed"):
      raise ValueError(f"--seeds sets every seed of the run: drop {name}")
  try:
    seeds = [int(value) for value in values]
  except ValueError:
    raise ValueError(f"--seeds must be integers >= 0, got {','.join(values)}") from None
  if not seeds or min(seeds) < 0:
    raise ValueError(f"--seeds must be integers >= 0, got {','.join(values)}")
  return list(dict.fromkeys(seeds))


def with_seed(config: ml_collections.ConfigDict, seed: int | None) -> ml_collections.ConfigDict:
  """``config`` with ``seed`` as ``config.seed`` and, if the method takes one, ``sparse.seed``."""
  if seed is None:
    return config
  config = config.copy_and_resolve_references()
  config.seed = seed
  if "seed" in config.sparse:
    config.sparse.seed = seed
  return config


def start_distributed() -> None:
  """Starts ``jax.distributed`` when the flags or the environment ask for it.

  Exits with status 2 and one line when JAX cannot find the processes.
  """
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not (_DISTRIBUTED.value or any(v is not None for v in given)
          or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  try:
    jax.distributed.initialize(*given)
  except (ValueError, RuntimeError) as e:
    fail(f"--distributed: {str(e).strip().splitlines()[0]}", CONFIG_ERROR)


def _loaded_config() -> ml_collections.ConfigDict:
  config = _CONFIG.value
  if config is None:
    fail("--config is required, e.g. --config=experiments/configs/fashion_mnist.py:rigl",
          CONFIG_ERROR)
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # config_flags stands in an object that raises on access for a file it could not load
      config.get("sparse")
    except OSError as e:
      fail(" ".join(line.strip() for line in str(e).splitlines() if line.strip()), CONFIG_ERROR)
  return config


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
    logging.set_verbosity(logging.WARNING)
  quiet_checkpoint_errors()
  start_distributed()
  config = _loaded_config()
  try:
    seeds = parse_seeds(_SEEDS.value, sys.argv)
    train_lib.validate_config(config)
    methods = methods_to_run(config.sparse.method, _METHODS.value, _DENSE_BASELINE.value)
    configs = [with_seed(config if method == config.sparse.method
                         else train_lib.with_method(config, method), seed)
               for method in methods for seed in (seeds or [None])]
    for run_config in configs:
      train_lib.validate_config(run_config)
    if _VALIDATE_ONLY.value:
      resolved = [train_lib.check(run_config) for run_config in configs]
  except ValueError as e:
    fail(str(e), CONFIG_ERROR)
  if _VALIDATE_ONLY.value:
    for run_config in resolved:
      print(json.dumps(run_config.to_dict()), flush=True)
    return
  try:
    data = train_lib.load_data(config)
  except (FileNotFoundError, ValueError) as e:
    fail(str(e), DATA_ERROR)
  directories = run_dirs(_WORKDIR.value, methods, seeds)
  try:  # build (and check the run directory of) every run before any trains
    experiments = [train_lib.setup(run_config, data) for run_config in configs]
    for experiment, directory in zip(experiments, directories):
      if directory is not None:
        train_lib.check_workdir(directory, experiment.config)
  except ValueError as e:
    fail(str(e), CONFIG_ERROR)
  for directory in directories:
    if directory is not None:
      try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
          raise OSError(f"cannot write to {directory}")
      except OSError as e:
        fail(f"--workdir: {e}", OUTPUT_ERROR)
  summaries, diverged = [], []
  primary = is_primary()
  say = functools.partial(print, file=sys.stderr, flush=True) if primary else lambda _: None
  for experiment, directory in zip(experiments, directories):
    name = directory or experiment.method
    try:
      summaries.append(train_lib.run(experiment, directory))
    except train_lib.Preempted as e:
      again = "; run the same command to continue" if e.saved else ""
      say(f"{name}: {e}{again}")
      sys.exit(PREEMPTED)
    except train_lib.Diverged as e:
      say(f"error: {name}: {e}")
      diverged.append(name)
      continue
    except train_lib.UnreadableCheckpoints as e:
      fail(str(e), NO_CHECKPOINT)
    except train_lib.CheckpointError as e:  # orbax's threads may still be failing
      fail(str(e), OUTPUT_ERROR, last_words=True)
    except OSError as e:  # the metrics, config or summary (e.g. a full disk)
      fail(f"{name}: cannot write the run's files: {e}", OUTPUT_ERROR, last_words=True)
    if directory is not None:
      say(f"wrote {directory}")
  if primary and summaries:
    print(markdown_table(summaries), flush=True)
  if diverged:
    fail(f"diverged, left out of the table: {', '.join(map(str, diverged))}", DIVERGED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
