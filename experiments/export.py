r"""Exports a finished run's masked model to compact sparse kernels and compares the two.

  python -m experiments.export RUN_DIR [--out=DIR]

Reads the run's ``config.json`` and newest checkpoint, compacts every masked kernel
(``sj.compact``: the active weights only), writes the compact variables as an orbax
checkpoint to ``DIR`` (default ``RUN_DIR/compact``; restore it with
``ocp.StandardCheckpointer().restore(DIR)``), then evaluates the masked dense model
and the compact one (``sparsejax.nn.sparse_apply``) on the run's test set and prints
one Markdown table: accuracy of each, the fraction of identical predictions, stored
sizes, how the compact kernels run (``sparsejax.nn.prepare``'s default runtime: the
compiled CPU kernel's rows, slots where it is unavailable, dense for a kernel with more
than a quarter of its weights active) and forward times (batch 1 and the config's
``eval_batch_size``, jitted, median of interleaved rounds).

A run directory without a checkpoint, of a dense or always-sparse method (already
compact), or a DIR that exists prints one line and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path
import statistics
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.cli import fail, flag_error_line

try:
  import orbax.checkpoint as ocp

  import sparsejax as sj
  from sparsejax import train as train_lib
  from sparsejax.data import eval_batches
  import sparsejax.nn as sjnn
  from sparsejax.train.always_sparse import is_always_sparse
  from sparsejax.train.checkpoints import Checkpointer
  from sparsejax.train.workdir import CHECKPOINT_DIR, CONFIG_FILE
except ImportError as e:  # the runner's packages come with sparsejax[experiments]
  fail(str(e), 1)

INPUT_ERROR = 2
_OUT = flags.DEFINE_string("out", None, "Where to write the compact checkpoint "
                           "(default: RUN_DIR/compact); must not exist.")


def load(run_dir: Path) -> tuple[Any, Any]:
  """The run's experiment (config, model, data) and its newest checkpointed state.

  Raises:
    ValueError: one line, for a directory that is not an exportable run.
  """
  if not (run_dir / CONFIG_FILE).is_file():
    raise ValueError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
  config = ml_collections.ConfigDict(json.loads((run_dir / CONFIG_FILE).read_text()))
  method = config.sparse.method
  if method == "dense" or is_always_sparse(method):
    raise ValueError(f"{run_dir}: a {method} run has no masked kernels to compact")
  experiment = train_lib.setup(config)
  with Checkpointer(run_dir / CHECKPOINT_DIR) as checkpointer:
    restored = checkpointer.restore(experiment.state)
  if restored is None:
    raise ValueError(f"{run_dir}: no checkpoint to export")
  return experiment, restored[0]


def _median_ms(fn, repeats: int = 5, calls: int = 5) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return statistics.median(times)


def compare(experiment: Any, dense_vars: dict[str, Any], runtime: dict[str, Any]
            ) -> dict[str, Any]:
  """Accuracy of both models, identical predictions, and forward times."""
  model, pipeline = experiment.model, experiment.pipeline
  dense = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compact = jax.jit(lambda v, x: sjnn.sparse_apply(model, v, x, train=False))
  correct, same, count = np.zeros(2), 0, 0
  size = experiment.config.eval_batch_size
  for images, labels, valid in eval_batches(experiment.test, size, pipeline.mean, pipeline.std):
    predictions = [np.asarray(jnp.argmax(fn(v, images), -1))
                   for fn, v in ((dense, dense_vars), (compact, runtime))]
    correct += [np.sum((p == labels) & valid) for p in predictions]
    same += int(np.sum((predictions[0] == predictions[1]) & valid))
    count += int(valid.sum())
  times = {}
  for batch in (1, size):
    x = jnp.asarray(images[:batch])
    jax.block_until_ready((dense(dense_vars, x), compact(runtime, x)))
    times[batch] = (_median_ms(lambda: dense(dense_vars, x)),  # noqa: B023
                    _median_ms(lambda: compact(runtime, x)))  # noqa: B023
  return {"accuracy": correct / count, "identical": same / count, "times": times}


def runtime_kinds(stored: dict[str, int], runtime: dict[str, int]) -> str:
  """How the compact kernels run, e.g. ``2 rows, 1 dense`` (slots with their padding)."""
  dense = stored["kernels"] - runtime["row_kernels"] - runtime["slot_kernels"]
  padding = f" ({runtime['padding_slots'] / max(runtime['slots'], 1):.0%} padding)"
  parts = [f"{runtime['row_kernels']} rows" * bool(runtime["row_kernels"]),
           f"{runtime['slot_kernels']} slots{padding}" * bool(runtime["slot_kernels"]),
           f"{dense} dense" * bool(dense)]
  return ", ".join(part for part in parts if part)


def table(method: str, result: dict[str, Any], stored: dict[str, int],
          runtime: dict[str, int]) -> str:
  """The one Markdown table the command prints."""
  (one_dense, one_compact), (many_dense, many_compact) = result["times"].values()
  batch = list(result["times"])[1]
  per_nnz = (stored["values"] + stored["indices"] + stored["offsets"]) / max(stored["nnz"], 1)
  return "\n".join([
      "| model | test accuracy (%) | identical predictions (%) | stored MB | bytes per "
      f"non-zero | kernels run as | batch 1 (ms) | batch {batch} (ms) |",
      "|---|---:|---:|---:|---:|---|---:|---:|",
      f"| {method}, masked dense | {100 * result['accuracy'][0]:.2f} | 100.00 | "
      f"{stored['dense_total'] / 2**20:.2f} | - | dense | {one_dense:.3f} | {many_dense:.2f} |",
      f"| {method}, compact | {100 * result['accuracy'][1]:.2f} | "
      f"{100 * result['identical']:.2f} | {stored['total'] / 2**20:.2f} | {per_nnz:.2f} | "
      f"{runtime_kinds(stored, runtime)} | {one_compact:.3f} | {many_compact:.2f} |"])


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  if len(argv) != 2:
    fail("give one run directory: python -m experiments.export RUN_DIR [--out=DIR]",
         INPUT_ERROR)
  run_dir = Path(argv[1])
  out = Path(_OUT.value) if _OUT.value else run_dir / "compact"
  if out.exists():
    fail(f"--out: {out} exists; give another directory", INPUT_ERROR)
  try:
    experiment, state = load(run_dir)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e), INPUT_ERROR)
  stored = {"params": sj.compact(state.params, sj.masks(state.opt_state)), **state.model_state}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out.absolute(), stored)
  sample = experiment.pipeline.batch(0)["image"][:1]
  runtime = sjnn.prepare(experiment.model, stored, sample, train=False)
  result = compare(experiment, {"params": state.params, **state.model_state}, runtime)
  print(table(experiment.method, result, sj.compact_bytes(stored), sjnn.runtime_bytes(runtime)),
        flush=True)
  print(f"wrote {out}", file=sys.stderr)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e), INPUT_ERROR)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
