"""Tests of ``python -m experiments.train``, run for real in a subprocess on tiny IDX data."""

import json
import os
from pathlib import Path
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import train as cli
from sparsejax.data import write_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "--config=experiments/configs/fashion_mnist.py"
HEADER = "| method | sparsity | test accuracy | dense accuracy | time (s) |"
PER_LAYER = " remaining % per layer (Dense_0 / Dense_1 / Dense_2) |"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def table_rows(stdout: str, per_layer: bool = False) -> dict[str, list[str]]:
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  assert lines[0] == HEADER + (PER_LAYER if per_layer else "")
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


def test_dst_writes_workdir(data_dir, tmp_path):
  """dst trains a few steps; --workdir gets history.json and a PNG per sparse run, nothing else."""
  workdir = tmp_path / "work"
  (workdir / "dst").mkdir(parents=True)
  unrelated = {workdir / "notes.txt": "keep", workdir / "dst" / "other.json": "{}"}
  for path, text in unrelated.items():
    path.write_text(text)
  result = run_cli(f"{CONFIG}:dst", "--config.num_steps=10", "--config.batch_size=32",
                   "--config.eval_batch_size=50", f"--workdir={workdir}", data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  rows = table_rows(result.stdout, per_layer=True)
  assert list(rows) == ["dense", "dst"]
  assert rows["dense"][-1] == "-"
  per_layer = rows["dst"][-1]
  assert re.fullmatch(r"\d+\.\d / \d+\.\d / \d+\.\d", per_layer), per_layer
  assert all(0.0 <= float(v) <= 100.0 for v in per_layer.split(" / "))

  record = json.loads((workdir / "dst" / "history.json").read_text())
  assert record["method"] == "dst" and record["steps"] == 10
  assert record["config"]["sparse"] == {"method": "dst", "alpha": 5e-4, "recovery_density": 0.01}
  assert [(r["step"], r["epoch"]) for r in record["history"]] == [(0, 0), (8, 1), (10, 2)]
  assert record["history"][-1]["density"] == pytest.approx(1.0 - record["sparsity"])
  assert f"{record['sparsity']:.3f}" == rows["dst"][0]
  assert (workdir / "dst" / "density.png").read_bytes()[:8] == PNG_MAGIC
  dense = json.loads((workdir / "dense" / "history.json").read_text())
  assert dense["history"] == [] and dense["layers"] == {} and dense["method"] == "dense"
  assert not (workdir / "dense" / "density.png").exists()  # dense has no masks to plot
  for path, text in unrelated.items():
    assert path.read_text() == text
  assert sorted(p.name for p in workdir.rglob("*")) == [
      "dense", "density.png", "dst", "history.json", "history.json", "notes.txt", "other.json"]


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
      "['dense', 'static', 'set', 'rigl', 'gmp', 'dst']"]


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
  assert "remaining" not in cli.markdown_table(results)  # no dst run: no per-layer column


def test_markdown_table_per_layer_for_dst():
  layers = {"Dense_0/kernel": 0.919, "Dense_1/kernel": 0.797, "Dense_2/kernel": 0.29}
  results = [{"method": "dense", "sparsity": 0.0, "layers": {}, "test_accuracy": 0.9,
              "seconds": 3.0},
             {"method": "dst", "sparsity": 0.9, "layers": layers, "test_accuracy": 0.88,
              "seconds": 4.0}]
  assert cli.markdown_table(results).splitlines() == [
      HEADER + PER_LAYER,
      "|---|---:|---:|---:|---:|---:|",
      "| dense | 0.000 | 0.9000 | 0.9000 | 3.0 | - |",
      "| dst | 0.900 | 0.8800 | 0.9000 | 4.0 | 8.1 / 20.3 / 71.0 |"]
