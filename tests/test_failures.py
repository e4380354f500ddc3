"""Runs that survive: SIGKILL, SIGTERM, damaged checkpoints, a full disk and a diverging
loss, each with the real CLI in a subprocess and real files."""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import CONFIG, ROOT, checkpoint_leaves, cli_command, cli_env

from experiments import train as cli
from sparsejax.train import checkpoints

# One worker runs this file (pytest-xdist --dist loadgroup): its module fixtures are
# built once.
pytestmark = pytest.mark.xdist_group("failures")

RESUME = ["--config.num_steps=400", "--config.batch_size=32", "--config.eval_batch_size=64",
          "--config.log_every=10", "--config.eval_every=50", "--config.checkpoint_every=25",
          "--config.sparse.update_every=20"]
ARGS = [f"{CONFIG}:set", *RESUME]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """SET trained for 400 steps without interruption (checkpoints every 25 steps)."""
  run = tmp_path_factory.mktemp("reference") / "run"
  result = subprocess.run(cli_command(*ARGS, f"--workdir={run}"), cwd=ROOT, env=cli_env(data_dir),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  return run


def _restart(run: Path, data: Path, prelude: str | None = None) -> subprocess.CompletedProcess:
  """The run's command again; ``prelude``: Python run first in the process."""
  command = cli_command(*ARGS, f"--workdir={run}")
  if prelude is not None:
    command[1:3] = ["-c", prelude + "\nimport runpy; runpy.run_module('experiments.train', "
                    "run_name='__main__', alter_sys=True)"]
  return subprocess.run(command, cwd=ROOT, env=cli_env(data), capture_output=True, text=True,
                        timeout=300, check=False)


def _assert_ends_like(reference: Path, run: Path) -> None:
  """Bit-identical ``metrics.jsonl`` and final params and state; the same summary."""
  assert (reference / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
  for a, b in zip(checkpoint_leaves(reference), checkpoint_leaves(run), strict=True):
    np.testing.assert_array_equal(a, b)
  summaries = [json.loads((r / "summary.json").read_text()) for r in (reference, run)]
  for key in ("test_accuracy", "test_loss", "train_loss", "sparsity", "coverage", "layers"):
    assert summaries[0][key] == summaries[1][key], key
  assert summaries[1]["status"] == "finished"


def _signal_when(process: subprocess.Popen, ready, signum: int, timeout: float = 240.0) -> bool:
  """Sends ``signum`` to ``process`` as soon as ``ready()`` holds; False if it ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if ready():
      process.send_signal(signum)
      return True
    time.sleep(0.001)
  return False


def _rows(run: Path) -> int:
  path = run / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _steps(run: Path) -> list[int]:
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _writing_checkpoint(run: Path) -> bool:
  directory = run / "checkpoints"
  return directory.exists() and any("tmp" in p.name for p in directory.iterdir())


def _unfinished_checkpoints(run: Path) -> list[str]:
  """The temporary directories of checkpoints orbax had not finished (renamed) yet."""
  names = [p.name for p in (run / "checkpoints").iterdir()]
  return sorted(name for name in names if "tmp" in name and name.split(".")[0] not in names)


# --- kill -9 -------------------------------------------------------------------------------


def test_sigkill_and_restart_ends_bit_identical(reference, data_dir, tmp_path):
  """Killed twice (once while a checkpoint is being written), restarted with the same command."""
  killed = tmp_path / "killed"
  command = cli_command(*ARGS, f"--workdir={killed}")

  def kill_when(ready) -> bool:
    process = subprocess.Popen(command, cwd=ROOT, env=cli_env(data_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sent = _signal_when(process, ready, signal.SIGKILL)
    process.wait()
    return sent

  # A checkpoint write takes ~0.2 s here and the poll ~1 ms, so the kill lands inside it and
  # leaves its temporary directory on disk, next to the older, complete checkpoints.
  assert kill_when(lambda: _rows(killed) >= 8 and _writing_checkpoint(killed)), (
      "the first run ended before it could be killed")
  listing = sorted(p.name for p in (killed / "checkpoints").iterdir())
  unfinished = _unfinished_checkpoints(killed)
  assert unfinished, f"the first kill did not happen while a checkpoint was written: {listing}"
  done = [int(name) for name in listing if name.isdigit()]
  assert done and max(done) < min(int(name.split(".")[0]) for name in unfinished), listing
  assert kill_when(lambda: _rows(killed) >= 27), "the second run ended before it could be killed"
  assert not (killed / "summary.json").exists()
  final = subprocess.run(command, cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                         text=True, timeout=300, check=False)
  assert final.returncode == 0, final.stderr
  assert not _writing_checkpoint(killed), "the unfinished checkpoints were not cleaned up"
  _assert_ends_like(reference, killed)


# --- SIGTERM -------------------------------------------------------------------------------


def test_sigterm_saves_the_step_it_stops_at_and_the_restart_is_bit_identical(
    reference, data_dir, tmp_path):
  """SIGTERM mid-epoch (past the checkpoint of step 75): the run saves the step it stops
  at, exits 75 and says so; the same command ends bit-identical to the uninterrupted run."""
  run = tmp_path / "run"
  process = subprocess.Popen(cli_command(*ARGS, f"--workdir={run}"), cwd=ROOT,
                             env=cli_env(data_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  assert _signal_when(process, lambda: _rows(run) >= 8, signal.SIGTERM), "ended before SIGTERM"
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == cli.PREEMPTED, stderr
  stopped_at = max(_steps(run))
  assert stopped_at > 80 and stopped_at % 25, _steps(run)  # not a periodic checkpoint
  assert f"stopped on request after step {stopped_at}, saved a checkpoint of it" in stderr
  assert not (run / "summary.json").exists()
  final = _restart(run, data_dir)
  assert final.returncode == 0, final.stderr
  _assert_ends_like(reference, run)


def test_sigterm_in_the_first_of_several_runs_stops_the_invocation(data_dir, tmp_path):
  """``--methods=static,rigl`` stopped in static: rigl has not started; the same command
  finishes static from its checkpoint, then trains rigl."""
  args = [f"{CONFIG}:rigl", "--methods=static,rigl", f"--workdir={tmp_path}",
          *[a for a in RESUME if "num_steps" not in a], "--config.num_steps=150"]
  process = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cli_env(data_dir),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert _signal_when(process, lambda: _rows(tmp_path / "static") >= 4, signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == cli.PREEMPTED, stderr
  assert "| static |" not in stdout and not (tmp_path / "rigl" / "metrics.jsonl").exists()
  final = subprocess.run(cli_command(*args), cwd=ROOT, env=cli_env(data_dir),
                         capture_output=True, text=True, timeout=300, check=False)
  assert final.returncode == 0, final.stderr
  assert "| static |" in final.stdout and "| rigl |" in final.stdout
  for method in ("static", "rigl"):
    steps = [json.loads(line)["step"]
             for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 151, 10)), (method, steps)


# --- damaged checkpoints -------------------------------------------------------------------


def _array_files(checkpoint: Path) -> list[Path]:
  """The files holding a checkpoint's array data, largest first."""
  files = [p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _truncate(checkpoint: Path) -> None:
  path = _array_files(checkpoint)[0]
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(checkpoint: Path) -> None:
  for path in _array_files(checkpoint):
    path.unlink()


def _flip(checkpoint: Path) -> None:
  path = _array_files(checkpoint)[0]
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip], ids=["truncated", "deleted",
                                                                     "flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, data_dir, tmp_path,
                                                                   damage):
  """The newest checkpoint (400) damaged: the restart warns in one line, resumes from 375,
  keeps the damaged one aside, and ends bit-identical."""
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  (run / "summary.json").unlink()
  damage(run / "checkpoints" / "400")
  result = _restart(run, data_dir)
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint 400" in warnings[0], result.stderr
  assert warnings[0].endswith("resuming from checkpoint 375")
  assert (run / "checkpoints_unreadable" / "400").is_dir()
  _assert_ends_like(reference, run)


def test_when_no_checkpoint_restores_it_is_one_line_and_nothing_moves(reference, data_dir,
                                                                      tmp_path):
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  (run / "summary.json").unlink()
  for step in _steps(run):
    _flip(run / "checkpoints" / str(step))
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  result = _restart(run, data_dir)
  assert result.returncode == cli.NO_CHECKPOINT
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: no checkpoint in {run / 'checkpoints'} restores: step 400: ")
  # Every checkpoint tried, each with its reason: mostly the checksum, but flipped bytes
  # may land in a compressed chunk, which tensorstore then fails to read.
  assert all(f"step {step}: " in last for step in _steps(run)), last
  assert "<bound method" not in last, last
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_read_error_is_one_line_without_the_tensorstore_spec():
  spec = "<bound method spec of TensorStore({\n  'driver': 'zarr',\n})>"
  error = ValueError(f"DATA_LOSS: Error reading chunk: {spec}")
  assert checkpoints._one_line(error) == "ValueError: DATA_LOSS: Error reading chunk"
  error = ValueError("NOT_FOUND: no file [tensorstore_spec='{\"driver\": \"zarr\"}']")
  assert checkpoints._one_line(error) == "ValueError: NOT_FOUND: no file"


# --- a full disk ---------------------------------------------------------------------------


# Writes past 100 kB fail with EFBIG, as writes to a full disk fail (ENOSPC), not a signal.
SMALL_FILES = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_restart_resumes(
    reference, data_dir, tmp_path):
  """Resumed from 375 where files cannot grow past 100 kB: writing checkpoint 400 fails
  with one line naming the directory; 375 stays intact; with room again the same command
  ends bit-identical."""
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  (run / "summary.json").unlink()
  shutil.rmtree(run / "checkpoints" / "400")
  result = _restart(run, data_dir, prelude=SMALL_FILES)
  last = _one_error_line(result)
  assert last.startswith(f"error: cannot write checkpoint 400 in {run / 'checkpoints'}: "), (
      result.stderr)
  assert "File too large" in last
  assert max(_steps(run)) == 375
  final = _restart(run, data_dir)
  assert final.returncode == 0, final.stderr
  assert "warning" not in final.stderr  # 375 restored intact
  _assert_ends_like(reference, run)


# --- a diverging loss ----------------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_with_one_line(data_dir, tmp_path):
  """learning_rate = 1e4: the run stops at the first non-finite loss with one line naming
  that step and the last checkpoint kept, exits 3 without a results table, records the
  failure in summary.json; the report leaves it out of its table and lists it."""
  run = tmp_path / "run"
  result = subprocess.run(cli_command(*ARGS, f"--workdir={run}",
                                      "--config.optimizer.learning_rate=10000.0"),
                          cwd=ROOT, env=cli_env(data_dir), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == cli.DIVERGED, result.stderr
  assert "|" not in result.stdout
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert lines[0].startswith(f"error: {run}: training diverged: non-finite loss at step ")
  summary = json.loads((run / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["failed_at_step"] >= 1
  assert f"at step {summary['failed_at_step']};" in lines[0]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert all(row["step"] < summary["failed_at_step"] for row in rows)
  assert all(row["train_loss"] is not None for row in rows)
  assert all(step < summary["failed_at_step"] for step in
             (_steps(run) if (run / "checkpoints").exists() else []))
  report = subprocess.run([sys.executable, "-m", "experiments.report", str(run),
                           f"--out={tmp_path / 'report'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert report.returncode == 0, report.stderr
  assert f"diverged at step {summary['failed_at_step']}, left out of the table: {run}" in (
      report.stderr)
  assert "| set |" not in report.stdout



@pytest.fixture
def small_tmpfs(tmp_path):
  """A tmpfs mounted at ``tmp_path / "disk"`` (root only; skipped where mounting fails)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                          str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield disk
  subprocess.run(["umount", str(disk)], check=True)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  """The last stderr line of a run that could not write (status 1, no traceback)."""
  assert result.returncode == cli.OUTPUT_ERROR, result.stderr
  assert "Traceback" not in result.stderr
  return result.stderr.strip().splitlines()[-1]


def _resize(disk: Path, size: int) -> None:
  subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_the_restart_resumes_once_there_is_room(
    reference, data_dir, small_tmpfs):
  """The run on a real tmpfs. With no room at all, the first file written (before any
  training) fails, one line. With room for less than one more checkpoint, writing 400
  fails with ENOSPC, one line (the metrics' flush that fails after it is not reported);
  375 stays intact. Once the disk grows the same command ends bit-identical."""
  run = small_tmpfs / "run"
  shutil.copytree(reference, run)
  (run / "summary.json").unlink()
  shutil.rmtree(run / "checkpoints" / "400")
  disk = os.statvfs(small_tmpfs)
  used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
  metrics = (run / "metrics.jsonl").read_bytes()
  _resize(small_tmpfs, used)
  result = _restart(run, data_dir)
  last = _one_error_line(result)
  assert last.startswith(f"error: {run}: cannot write the run's files: "), result.stderr
  assert "No space left on device" in last, last
  assert (run / "metrics.jsonl").read_bytes() == metrics
  _resize(small_tmpfs, used + 64 * 1024)
  result = _restart(run, data_dir)
  last = _one_error_line(result)
  assert last.startswith(f"error: cannot write checkpoint 400 in {run / 'checkpoints'}: "), (
      result.stderr)
  assert "No space left on device" in last or "ENOSPC" in last, last
  assert max(_steps(run)) == 375
  _resize(small_tmpfs, 64 * 2**20)
  final = _restart(run, data_dir)
  assert final.returncode == 0, final.stderr
  assert "warning" not in final.stderr
  _assert_ends_like(reference, run)
