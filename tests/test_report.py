"""Tests of ``python -m experiments.report`` on synthetic run directories."""

import json
import math
from pathlib import Path
import subprocess
import sys

import pytest

from experiments import report
from experiments.report_plots import group_name, plot_coverage, write_plots
from experiments.report_runs import (
  ReportError,
  find_runs,
  load_run,
  read_metrics,
  run_info,
  run_summary,
)
from experiments.report_tables import GroupKey, aggregate, group_runs, markdown_table
from sparsejax.train.records import group_config

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")
PREFIX = "fashion_mnist-lenet300100"

# (directory, method, seed, test accuracy, measured sparsity, train FLOPs ratio, coverage)
FINISHED = [
    ("dense_s0", "dense", 0, 0.95, 0.0, 1.0, None),
    ("dense_s1", "dense", 1, 0.97, 0.0, 1.0, None),
    ("rigl/s0", "rigl", 0, 0.90, 0.899, 0.20, 0.3),
    ("rigl/s1", "rigl", 1, 0.92, 0.900, 0.25, 0.4),
    ("rigl/s2", "rigl", 2, 0.94, 0.901, 0.30, 0.5),
    ("set_s1", "set", 1, 0.91, 0.9, 0.15, 0.7),  # listed before seed 0 on disk order
    ("set_s0", "set", 0, 0.88, 0.9, 0.15, 0.6),
    ("static_s0", "static", 0, 0.85, 0.9, 0.12, None),
]
HEADER = ("| method | model | sparsity | test accuracy (%) | n | train FLOPs (× dense) | "
          "inference FLOPs (× dense) | coverage |")
EXPECTED_ROWS = [
    "| dense | lenet300100 | 0.000 | 96.00 ± 1.41 | 2 | 1.00 | 1.00 | - |",
    "| rigl | lenet300100 | 0.900 | 92.00 ± 2.00 | 3 | 0.250 | 0.100 | 0.400 |",
    "| set | lenet300100 | 0.900 | 89.50 ± 2.12 | 2 | 0.150 | 0.100 | 0.650 |",
    "| static | lenet300100 | 0.900 | 85.00 | 1 | 0.120 | 0.100 | - |",
]


def config(method: str, seed: int, nested: bool = True) -> dict:
  sparse = {"method": method} if method == "dense" else {
      "method": method, "sparsity": 0.9, "distribution": "erk"}
  data = {"data": {"dataset": "fashion_mnist"}} if nested else {"dataset": "fashion_mnist"}
  return {**data, "model": "lenet300100", "seed": seed, "batch_size": 128,
          "optimizer": {"name": "sgd"}, "sparse": sparse}


def metrics_rows(method: str, sparsity: float, accuracy: float, coverage: float | None) -> list:
  rows = []
  for step in (10, 20, 30, 40):
    # The density falls from 50 % to the final one, so the density plots have a shape.
    current = sparsity * (0.5 + step / 80)
    row = {"step": step, "epoch": step / 20, "train_loss": 2.0 / step, "learning_rate": 0.1,
           "sparsity": current}
    if step % 20 == 0:
      row.update(test_loss=2.5 / step, test_accuracy=accuracy * step / 40,
                 layers={} if method == "dense" else {
                     name: min(current * factor, 0.999)
                     for name, factor in zip(LAYERS, (1.1, 1.0, 0.5))},
                 train_flops=step * 1e6, train_flops_dense=step * 4e6, inference_flops=1e4,
                 inference_flops_dense=1e5)
      if coverage is not None:
        row.update(coverage=coverage, churn=0.01)
    rows.append(row)
  return rows


def write_run(directory: Path, method: str, seed: int, accuracy: float, sparsity: float,
              flops: float, coverage: float | None, finished: bool = True,
              nested: bool = True) -> None:
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(config(method, seed, nested), indent=1))
  rows = metrics_rows(method, sparsity, accuracy, coverage)
  if not finished:
    rows = rows[:3]
  (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  if finished:
    summary = {"method": method, "dataset": "fashion_mnist", "model": "lenet300100",
               "seed": seed, "target_sparsity": None if method == "dense" else 0.9,
               "sparsity": sparsity, "test_accuracy": accuracy, "test_loss": 0.3,
               "train_loss": 0.2, "steps": 40, "seconds": 1.5, "train_flops_ratio": flops,
               "inference_flops_ratio": 1.0 if method == "dense" else 0.1,
               "coverage": coverage, "layers": rows[-1]["layers"]}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))


def build_sweep(root: Path) -> Path:
  """Eight finished runs, an unfinished rigl seed 3 (nested data config), and other files."""
  for name, *values in FINISHED:
    write_run(root / name, *values)
  write_run(root / "rigl" / "s3", "rigl", 3, 0.5, 0.9, 0.2, 0.2, finished=False, nested=True)
  (root / "rigl" / "s0" / "checkpoints" / "40").mkdir(parents=True)  # never searched
  (root / "rigl" / "s0" / "checkpoints" / "40" / "config.json").write_text("{not json")
  (root / "notes.txt").write_text("keep me")
  (root / "empty").mkdir()
  return root


@pytest.fixture
def sweep(tmp_path):
  return build_sweep(tmp_path / "sweep")


def snapshot(root: Path) -> dict[str, bytes | None]:
  return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
          for path in sorted(root.rglob("*"))}


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.report", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def summaries(runs) -> list[dict]:
  return [run.summary for run in runs if run.summary is not None]


def test_find_runs(sweep):
  runs = find_runs([sweep])
  assert [path.relative_to(sweep).as_posix() for path in runs] == [
      "dense_s0", "dense_s1", "rigl/s0", "rigl/s1", "rigl/s2", "rigl/s3", "set_s0", "set_s1",
      "static_s0"]
  # A run directory itself, and repeats are dropped.
  assert find_runs([sweep / "rigl" / "s1", sweep / "rigl"]) == [
      sweep / "rigl" / "s1", sweep / "rigl" / "s0", sweep / "rigl" / "s2", sweep / "rigl" / "s3"]


@pytest.mark.parametrize("name,message", [
    ("missing", "no such directory"), ("empty", "no run directories"),
    ("notes.txt", "not a directory")])
def test_find_runs_errors(sweep, name, message):
  with pytest.raises(ReportError, match=message):
    find_runs([sweep / "dense_s0", sweep / name])


def test_load_run_and_info(sweep):
  finished = load_run(sweep / "rigl" / "s1")
  assert finished.finished and len(finished.metrics) == 4 and finished.summary["seed"] == 1
  unfinished = load_run(sweep / "rigl" / "s3")
  assert not unfinished.finished and len(unfinished.metrics) == 3
  info = run_info(unfinished)
  group = info.pop("group")
  assert group == group_config(unfinished.config) and "seed" not in group
  assert info == {"method": "rigl", "variant": None,
                                         "dataset": "fashion_mnist",
                                         "model": "lenet300100", "seed": 3,
                                         "target_sparsity": 0.9}
  assert run_info(load_run(sweep / "dense_s0"))["target_sparsity"] is None


def test_read_metrics_skips_a_cut_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')
  assert read_metrics(path) == [{"step": 1}, {"step": 2}]
  path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
  with pytest.raises(ReportError, match=r"metrics.jsonl:2: invalid JSON"):
    read_metrics(path)


def test_aggregate_means_and_sample_stds(sweep):
  rows = aggregate(summaries(load_run(p) for p in find_runs([sweep])))
  assert [(row["key"].method, row["key"].target_sparsity, row["n"]) for row in rows] == [
      ("dense", None, 2), ("rigl", 0.9, 3), ("set", 0.9, 2), ("static", 0.9, 1)]
  dense, rigl, set_, static = rows
  assert dense["test_accuracy"] == pytest.approx(0.96)
  assert dense["test_accuracy_std"] == pytest.approx(0.01 * math.sqrt(2))
  assert rigl["test_accuracy"] == pytest.approx(0.92)
  assert rigl["test_accuracy_std"] == pytest.approx(0.02)  # ddof=1: sqrt((4 + 0 + 4) / 2) %
  assert rigl["sparsity"] == pytest.approx(0.9)
  assert rigl["train_flops_ratio"] == pytest.approx(0.25)
  assert rigl["coverage"] == pytest.approx(0.4)
  assert set_["test_accuracy_std"] == pytest.approx(0.03 / math.sqrt(2))
  assert sorted(set_["seeds"]) == [0, 1]
  assert static["test_accuracy_std"] is None and static["coverage"] is None
  assert dense["coverage"] is None


def test_markdown_table_of_the_sweep(sweep):
  table = markdown_table(
      summaries(load_run(p) for p in find_runs([sweep])))
  assert table.splitlines() == [HEADER, "|---|---|---:|---:|---:|---:|---:|---:|",
                                *EXPECTED_ROWS]


def test_markdown_table_order_and_dataset_column():
  def summary(dataset, model, method, target, accuracy, seed=0):
    return {"method": method, "dataset": dataset, "model": model, "seed": seed,
            "target_sparsity": target, "sparsity": target or 0.0, "test_accuracy": accuracy,
            "train_flops_ratio": None, "inference_flops_ratio": 1.0, "coverage": None}

  table = markdown_table([
      summary("mnist", "lenet5", "rigl", 0.95, 0.9), summary("mnist", "lenet5", "rigl", 0.8, 0.9),
      summary("fashion_mnist", "lenet5", "dst", None, 0.8),
      summary("mnist", "lenet5", "dense", None, 0.99),
      summary("fashion_mnist", "lenet5", "dense", None, 0.9),
      summary("fashion_mnist", "lenet5", "dense", None, 0.8, seed=1)])
  lines = table.splitlines()
  assert lines[0].startswith("| method | model | dataset | sparsity |")
  assert [line.split(" | ")[:4] for line in lines[2:]] == [
      ["| dense", "lenet5", "fashion_mnist", "0.000"],
      ["| dst", "lenet5", "fashion_mnist", "0.000"],
      ["| dense", "lenet5", "mnist", "0.000"],
      ["| rigl", "lenet5", "mnist", "0.800"],
      ["| rigl", "lenet5", "mnist", "0.950"]]
  assert "| 85.00 ± 7.07 | 2 | - | 1.00 | - |" in lines[2]
  assert markdown_table([]).count("\n") == 1  # the header alone


def test_group_names_are_filesystem_safe():
  assert group_name(GroupKey("fashion_mnist", "lenet300100", "rigl", 0.9)) == (
      "fashion_mnist-lenet300100-rigl-0.9")
  assert group_name(GroupKey("my data", "res/net 50", "dense", None)) == (
      "my_data-res_net_50-dense")
  assert group_name(GroupKey("..", "a\\b:c", "x*", 0.95)) == "_-a_b_c-x-0.95"


def test_group_runs_puts_finished_runs_first(sweep):
  runs = [load_run(p) for p in find_runs([sweep])]
  groups = group_runs(runs)
  assert [key.method for key in groups] == ["dense", "rigl", "set", "static"]
  rigl = next(members for key, members in groups.items() if key.method == "rigl")
  assert [run_info(run)["seed"] for run in rigl] == [0, 1, 2, 3]
  assert [run.finished for run in rigl] == [True, True, True, False]


def test_write_plots(sweep, tmp_path):
  from matplotlib.image import imread

  runs = [load_run(p) for p in find_runs([sweep])]
  out = tmp_path / "out"
  out.mkdir()
  written = write_plots(runs, out)
  expected = ["accuracy_vs_sparsity.png", "accuracy_vs_coverage.png",
              *(f"loss_{PREFIX}-{name}.png"
                for name in ("dense", "rigl-0.9", "set-0.9", "static-0.9")),
              *(f"density_{PREFIX}-{name}.png" for name in ("rigl-0.9", "set-0.9", "static-0.9"))]
  assert sorted(path.name for path in written) == sorted(expected)
  assert sorted(path.name for path in out.iterdir()) == sorted(expected)  # no temporary left
  for path in written:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000, path
    image = imread(path)
    assert image.shape[:2] == (540, 840) and image[..., :3].std() > 0.05, path


def test_coverage_plot_needs_a_run_with_coverage(sweep, tmp_path):
  runs = [load_run(p) for p in find_runs([sweep])]
  rows = aggregate([run_summary(run) for run in runs if run.finished])
  assert plot_coverage(rows, tmp_path / "a.png") == tmp_path / "a.png"
  without = [row for row in rows if row["coverage"] is None]
  assert {row["key"].method for row in without} == {"dense", "static"}
  assert plot_coverage(without, tmp_path / "b.png") is None
  assert not (tmp_path / "b.png").exists()


def test_cli_prints_the_table_and_touches_nothing_else(sweep, tmp_path):
  before = snapshot(sweep)
  out = tmp_path / "out" / "nested"
  result = run_cli(str(sweep), f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [HEADER, "|---|---|---:|---:|---:|---:|---:|---:|",
                                        *EXPECTED_ROWS]
  assert (out / "report.md").read_text() == result.stdout
  assert f"unfinished (no summary.json), left out of the table: {sweep / 'rigl' / 's3'}" in (
      result.stderr)
  assert len(list(out.glob("*.png"))) == 9
  assert snapshot(sweep) == before


def test_cli_writes_into_the_single_dir_by_default(tmp_path):
  sweep = build_sweep(tmp_path / "sweep")
  before = snapshot(sweep)
  result = run_cli(str(sweep / "rigl"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[2:] == [EXPECTED_ROWS[1]]
  after = snapshot(sweep)
  added = sorted(set(after) - set(before))
  assert added == ["rigl/report", "rigl/report/accuracy_vs_coverage.png",
                   "rigl/report/accuracy_vs_sparsity.png",
                   f"rigl/report/density_{PREFIX}-rigl-0.9.png",
                   f"rigl/report/loss_{PREFIX}-rigl-0.9.png", "rigl/report/report.md"]
  assert {name: after[name] for name in before} == before
  assert report.default_out([sweep, tmp_path]) == Path("report")


@pytest.mark.parametrize("name,message", [
    ("missing", "missing: no such directory"), ("empty", "empty: no run directories")])
def test_cli_bad_dir_is_one_line(sweep, tmp_path, name, message):
  before = snapshot(sweep)
  result = run_cli(str(sweep / "dense_s0"), str(sweep / name), f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert snapshot(sweep) == before and not (tmp_path / "out").exists()


def test_cli_without_dirs_is_one_line():
  result = run_cli()
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_importing_defines_no_flag():
  from absl import flags

  assert "out" not in flags.FLAGS  # experiments.train imports markdown_table from here


def test_importing_the_report_does_not_import_matplotlib():
  code = "import sys, experiments.report; print('matplotlib' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
  assert result.stdout.strip() == "False"


def test_dst_runs_are_grouped_by_alpha():
  def summary(alpha, accuracy, seed):
    return {"method": "dst", "variant": f"alpha={alpha:g}", "dataset": "fashion_mnist",
            "model": "lenet300100", "seed": seed, "target_sparsity": None, "sparsity": 0.9,
            "test_accuracy": accuracy, "train_flops_ratio": 0.5, "inference_flops_ratio": 0.1,
            "coverage": 1.0}

  rows = aggregate([summary(5e-4, 0.8, 0), summary(5e-4, 0.9, 1), summary(1e-3, 0.7, 0)])
  assert [(row["key"].method, row["n"]) for row in rows] == [
      ("dst (alpha=0.0005)", 2), ("dst (alpha=0.001)", 1)]
