"""Tests of ``python -m experiments.train``, run for real in a subprocess on tiny IDX data."""

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from experiments import train as cli
from sparsejax.data import write_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "--config=experiments/configs/fashion_mnist.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A tiny Fashion-MNIST look-alike: 256 training and 64 test images."""
  rng = np.random.default_rng(0)
  directory = tmp_path_factory.mktemp("idx")
  write_idx_dataset(directory, {
      split: {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "label": rng.integers(0, 10, n, dtype=np.uint8)}
      for split, n in (("train", 256), ("test", 64))})
  return directory


def run_cli(*args: str, data_dir: Path | str) -> subprocess.CompletedProcess:
  env = {**os.environ, "SPARSEJAX_DATA_DIR": str(data_dir), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def table_rows(stdout: str) -> dict[str, list[str]]:
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  assert lines[0] == "| method | sparsity | test accuracy | dense accuracy | time (s) |"
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
  return {row[0]: row[1:] for row in rows}


def test_rigl_with_dense_baseline(data_dir):
  result = run_cli(f"{CONFIG}:rigl", "--config.num_steps=12", "--config.batch_size=32",
                   "--config.eval_batch_size=50", "--config.sparse.update_every=4",
                   "--config.sparse.sparsity=0.8", data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  rows = table_rows(result.stdout)
  assert list(rows) == ["dense", "rigl"]
  assert rows["dense"][0] == "0.000" and rows["rigl"][0] == "0.800"
  for _, accuracy, dense_accuracy, seconds in rows.values():
    assert 0.0 <= float(accuracy) <= 1.0 and float(seconds) > 0
    assert dense_accuracy == rows["dense"][1]


def test_bad_sparsity_is_one_line_before_training(data_dir):
  result = run_cli(f"{CONFIG}:rigl", "--config.sparse.sparsity=1.5", data_dir=data_dir)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "error: config.sparse: sparsity must be in [0, 1), got 1.5"]


@pytest.mark.parametrize("args,message", [
    (["--config.batch_size=0"], "config.batch_size"),
    (["--config.nokey=3"], "--config.nokey"),
    (["--methods=dense,magic"], "unknown method 'magic'"),
])
def test_config_errors_are_one_line(data_dir, args, message):
  result = run_cli(f"{CONFIG}:static", *args, data_dir=data_dir)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr and message in lines[0], lines


def test_bad_config_argument_is_one_line(data_dir):
  result = run_cli(f"{CONFIG}:foo", data_dir=data_dir)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: unknown method 'foo' in the config argument; expected one of "
      "['dense', 'static', 'set', 'rigl', 'gmp']"]


def test_missing_data_is_one_line(tmp_path):
  result = run_cli(f"{CONFIG}:static", data_dir=tmp_path)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(tmp_path) in lines[0] and "SPARSEJAX_DATA_DIR" in lines[0]


def test_methods_to_run():
  assert cli.methods_to_run("rigl", None, True) == ["dense", "rigl"]
  assert cli.methods_to_run("rigl", None, False) == ["rigl"]
  assert cli.methods_to_run("rigl", ["static", "gmp", "static"], True) == [
      "dense", "static", "gmp"]
  assert cli.methods_to_run("rigl", ["set", "dense"], True) == ["set", "dense"]


def test_markdown_table():
  results = [{"method": "static", "sparsity": 0.9, "test_accuracy": 0.8, "seconds": 1.25},
             {"method": "dense", "sparsity": 0.0, "test_accuracy": 0.875, "seconds": 2.0}]
  assert cli.markdown_table(results).splitlines()[2:] == [
      "| static | 0.900 | 0.8000 | 0.8750 | 1.2 |",
      "| dense | 0.000 | 0.8750 | 0.8750 | 2.0 |"]
  assert "| n/a |" in cli.markdown_table(results[:1])
