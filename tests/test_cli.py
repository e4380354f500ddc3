"""Tests of ``python -m experiments.train``, run for real in a subprocess on tiny IDX data."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import train as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "--config=experiments/configs/fashion_mnist.py"
HEADER = ("| method | model | sparsity | test accuracy (%) | n | train FLOPs (× dense) | "
          "inference FLOPs (× dense) | coverage |")
SHORT = ["--config.num_steps=20", "--config.batch_size=32", "--config.eval_batch_size=64",
         "--config.log_every=5", "--config.eval_every=10", "--config.checkpoint_every=10"]


def cli_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", *args]


def cli_env(data_dir: Path | str) -> dict[str, str]:
  return {**os.environ, "SPARSEJAX_DATA_DIR": str(data_dir), "JAX_PLATFORMS": "cpu"}


def run_cli(*args: str, data_dir: Path | str) -> subprocess.CompletedProcess:
  return subprocess.run(cli_command(*args), cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                        text=True, timeout=300, check=False)


def table_rows(stdout: str) -> dict[str, list[str]]:
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  assert lines[0] == HEADER
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
  return {row[0]: row[1:] for row in rows}


def test_main_job_with_dense_baseline_writes_run_dirs(data_dir, tmp_path):
  result = run_cli(f"{CONFIG}:rigl", "--dense_baseline", f"--workdir={tmp_path}", *SHORT,
                   data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  rows = table_rows(result.stdout)
  assert list(rows) == ["dense", "rigl"]
  assert rows["rigl"][1] == "0.900" and rows["dense"][1] == "0.000"
  for method in ("dense", "rigl"):
    run = tmp_path / method
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard"} <= {
        p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 20
    assert float(rows[method][2]) == pytest.approx(100 * summary["test_accuracy"], abs=0.006)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [10, 20]
  report = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path),
                           f"--out={tmp_path / 'report'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert report.returncode == 0, report.stderr
  assert table_rows(report.stdout).keys() == rows.keys()


def test_bad_sparsity_is_one_line_and_touches_nothing(data_dir, tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  result = run_cli(f"{CONFIG}:rigl", "--config.sparse.sparsity=1.5", f"--workdir={tmp_path}",
                   data_dir=data_dir)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "error: config.sparse: sparsity must be in [0, 1), got 1.5"]
  assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("args,message", [
    (["--config.batch_size=0"], "config.batch_size"),
    (["--config.nokey=3"], "--config.nokey"),
    (["--config.optimizer.name=lion"], "config.optimizer.name"),
    (["--config.sparse.distribution=zipf"], "config.sparse"),
    (["--methods=dense,magic"], "unknown method 'magic'"),
    (["--config.optimizer.decay_epochs=(1,)"], "config.optimizer.decay_epochs"),
    (["--seeds=0,1", "--config.seed=2"], "--seeds sets every seed of the run"),
    (["--seeds=0,-1"], "--seeds must be integers >= 0"),
])
def test_config_errors_are_one_line(data_dir, args, message):
  result = run_cli(f"{CONFIG}:static", *args, data_dir=data_dir)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr and message in lines[0], lines


def test_bad_config_argument_is_one_line(data_dir):
  result = run_cli(f"{CONFIG}:foo", data_dir=data_dir)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "unknown method 'foo' in the config argument" in lines[0]


def test_missing_data_is_one_line(tmp_path):
  result = run_cli(f"{CONFIG}:static", data_dir=tmp_path)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(tmp_path) in lines[0] and "SPARSEJAX_DATA_DIR" in lines[0]


def test_workdir_of_another_config_is_one_line_and_untouched(data_dir, tmp_path):
  assert run_cli(f"{CONFIG}:static", f"--workdir={tmp_path}", *SHORT,
                 data_dir=data_dir).returncode == 0
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  result = run_cli(f"{CONFIG}:static", f"--workdir={tmp_path}", *SHORT,
                   "--config.optimizer.learning_rate=0.1", data_dir=data_dir)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "config.optimizer.learning_rate = 0.02, not 0.1" in lines[0], lines
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_methods_to_run():
  assert cli.methods_to_run("rigl", None, False) == ["rigl"]
  assert cli.methods_to_run("rigl", None, True) == ["dense", "rigl"]
  assert cli.methods_to_run("rigl", ["set", "rigl", "set"], False) == ["set", "rigl"]


def test_run_dirs():
  assert cli.run_dirs(None, ["rigl"]) == [None]
  assert cli.run_dirs("out", ["rigl"]) == [Path("out")]
  assert cli.run_dirs("out", ["dense", "rigl"]) == [Path("out/dense"), Path("out/rigl")]
  assert cli.run_dirs("out", ["rigl"], [0, 1]) == [Path("out/seed0"), Path("out/seed1")]
  assert cli.run_dirs("out", ["dense", "rigl"], [3]) == [Path("out/dense/seed3"),
                                                        Path("out/rigl/seed3")]


SHIPPED = ["fashion_mnist.py", "mnist.py", "cifar10.py", "cifar100.py"]


def sequence_keys(tree, prefix=""):
  """``(dotted key, value)`` of every tuple- or list-valued key of a config dict."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from sequence_keys(value, f"{prefix}{key}.")
    elif isinstance(value, (tuple, list)):
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("setup", SHIPPED)
def test_every_sequence_key_is_overridable_with_validate_only(setup, tmp_path):
  """Through the real CLI, without data (CIFAR's is not here) and without touching the disk."""
  import importlib

  module = importlib.import_module(f"experiments.configs.{setup[:-3]}")
  keys = dict(sequence_keys(module.get_config().to_dict()))
  assert keys, setup
  args = []
  for key, value in keys.items():
    new = tuple(v / 2 for v in value) if value else (1,)
    args.append(f"--config.{key}={new}")
    if key == "optimizer.decay_epochs" and not value:  # a constant schedule takes none
      args.append("--config.optimizer.schedule=cosine")
    keys[key] = list(new)
  result = run_cli(f"--config=experiments/configs/{setup}", *args, "--validate_only",
                   f"--workdir={tmp_path / 'run'}", data_dir=tmp_path / "no-data")
  assert result.returncode == 0, result.stderr
  resolved = json.loads(result.stdout)
  for key, value in keys.items():
    section, name = key.rsplit(".", 1) if "." in key else ("", key)
    assert (resolved[section] if section else resolved)[name] == value
  assert not (tmp_path / "run").exists()


def test_seeds_run_resume_and_report(data_dir, tmp_path):
  """--seeds=0,1: two run directories, each resumable; the report averages them (n = 2)."""
  sweep = tmp_path / "sweep"
  args = [f"{CONFIG}:static", "--seeds=0,1", f"--workdir={sweep}", *SHORT]
  first = run_cli(*args, data_dir=data_dir)
  assert first.returncode == 0, first.stderr
  runs = [sweep / "seed0", sweep / "seed1"]
  configs = [json.loads((run / "config.json").read_text()) for run in runs]
  assert [(c["seed"], c["sparse"]["seed"]) for c in configs] == [(0, 0), (1, 1)]
  rows = table_rows(first.stdout)
  assert list(rows) == ["static"] and rows["static"][3] == "2"
  # Lose the last checkpoint and the summary of both: the same command resumes both.
  metrics = [(run / "metrics.jsonl").read_bytes() for run in runs]
  for run in runs:
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "20")
  again = run_cli(*args, data_dir=data_dir)
  assert again.returncode == 0, again.stderr
  assert [(run / "metrics.jsonl").read_bytes() for run in runs] == metrics
  assert again.stdout == first.stdout
  # A run with another num_steps is another row.
  other = run_cli(f"{CONFIG}:static", f"--workdir={tmp_path / 'short'}",
                  *[a for a in SHORT if "num_steps" not in a], "--config.num_steps=10",
                  data_dir=data_dir)
  assert other.returncode == 0, other.stderr
  report = subprocess.run([sys.executable, "-m", "experiments.report", str(sweep),
                           str(tmp_path / "short"), f"--out={tmp_path / 'report'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert report.returncode == 0, report.stderr
  rows = table_rows(report.stdout)
  assert {name: row[3] for name, row in rows.items()} == {"static (num_steps=10)": "1",
                                                          "static (num_steps=20)": "2"}


def checkpoint_leaves(run: Path, step: int | None = None) -> list[np.ndarray]:
  """The leaves of a run's checkpoint (default: the newest), restored onto this
  process's one device whatever the devices that saved it."""
  if step is None:
    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  path = (run / "checkpoints" / str(step) / "state").resolve()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    state = checkpointer.restore(path, target)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
