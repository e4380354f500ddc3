"""Sharded runs: the same CLI command on 1 device, 8 (simulated) devices, a 2 × 4 mesh with
leaves split along ``model``, and two ``jax.distributed`` processes trains alike."""

import json
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import time

from conftest import xla_flags
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from test_cli import CONFIG, ROOT, SHORT, checkpoint_leaves, cli_env

from experiments.train import PREEMPTED
from sparsejax.train.sharding import leaf_sharding, make_mesh

# One worker runs this file (pytest-xdist --dist loadgroup): its module fixtures are
# built once.
pytestmark = pytest.mark.xdist_group("sharding")

# ``python -m experiments.train ARGS`` with CPU steps dispatched synchronously: on this
# 2-core machine collectives can deadlock under asynchronous dispatch (a test setting,
# not the library's).
SYNCHRONOUS_CLI = ("import jax, runpy; jax.config.update('jax_cpu_enable_async_dispatch', False); "
                   "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)")
# A checkpoint at every mask update (RigL updates every 4 steps here): masks compared at each.
EVERY_UPDATE = ["--config.sparse.update_every=4", "--config.checkpoint_every=4",
                "--config.keep_checkpoints=5"]
UPDATES = (4, 8, 12, 16, 20)
FSDP = ["--config.mesh.model=4", "--config.mesh.min_shard_size=1024"]


def _command(tmp: Path, data: Path, method: str, devices: int, name: str,
             extra: tuple[str, ...]) -> tuple[list[str], dict[str, str], Path]:
  workdir = tmp / name
  env = {**cli_env(data),
         "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}")}
  args = [f"{CONFIG}:{method}", f"--workdir={workdir}", *SHORT, *EVERY_UPDATE, *extra]
  if method == "dst":  # DST has no update schedule
    args.remove("--config.sparse.update_every=4")
  return [sys.executable, "-c", SYNCHRONOUS_CLI, *args], env, workdir


def _run(tmp: Path, data: Path, method: str, devices: int, name: str,
         extra: tuple[str, ...] = ()) -> Path:
  command, env, workdir = _command(tmp, data, method, devices, name, extra)
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """``runs(method, devices, *flags)``: the run directory of that command, run once per module."""
  tmp, done = tmp_path_factory.mktemp("runs"), {}

  def get(method: str, devices: int, *extra: str) -> Path:
    key = (method, devices, *extra)
    if key not in done:
      done[key] = _run(tmp, data_dir, method, devices, f"run{len(done)}", extra)
    return done[key]

  return get


def _assert_alike(first: list[np.ndarray], second: list[np.ndarray]) -> None:
  """Masks, counts and steps equal; floats equal to the rounding of another reduction order."""
  for a, b in zip(first, second, strict=True):
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _assert_same_training(one: Path, other: Path, method: str) -> None:
  """The same masks at every update (and every state leaf alike), the same per-layer
  sparsity and coverage, and losses and accuracy to float rounding."""
  summaries = [json.loads((run / "summary.json").read_text()) for run in (one, other)]
  first, second = summaries
  assert first["layers"] == second["layers"] and first["coverage"] == second["coverage"]
  assert first["sparsity"] == second["sparsity"]
  if method != "dst":
    assert first["coverage"] > 1 - first["sparsity"] + 0.01  # the masks did change
  for step in UPDATES:
    leaves = [checkpoint_leaves(run, step) for run in (one, other)]
    assert any(leaf.dtype == bool for leaf in leaves[0])
    _assert_alike(*leaves)
  rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
          for run in (one, other)]
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # one writer
  for key in ("train_loss", "test_loss"):
    a, b = ([r[key] for r in run_rows if r.get(key) is not None] for run_rows in rows)
    np.testing.assert_allclose(a, b, rtol=1e-4)
  assert first["test_accuracy"] == pytest.approx(second["test_accuracy"], abs=1 / 64 + 1e-9)


@pytest.mark.parametrize("method", ["rigl", "dst", "dst_ee", "gse"])
def test_one_and_eight_devices_train_alike(runs, method):
  """Global batch 32 on 1 device and split over 8: the same training (masks compared at
  every RigL update); the summary records the mesh and the state replicated."""
  one, eight = runs(method, 1), runs(method, 8)
  _assert_same_training(one, eight, method)
  summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in ((1, one), (8, eight))}
  assert summaries[1]["mesh"] == {"data": 1, "model": 1} and summaries[1]["devices"] == 1
  assert summaries[8]["mesh"] == {"data": 8, "model": 1} and summaries[8]["devices"] == 8
  assert summaries[1]["state_bytes_per_device"] == summaries[8]["state_bytes_per_device"]


@pytest.mark.parametrize("method", ["rigl", "dst"])
def test_leaves_sharded_along_model_train_like_one_device(runs, method):
  """A 2 × 4 mesh with every array of >= 1024 entries split along ``model``: the
  selection runs on split masks and scores and still picks exactly what one device
  picks; each device holds about a quarter of the state (its large arrays)."""
  one, sharded = runs(method, 1), runs(method, 8, *FSDP)
  _assert_same_training(one, sharded, method)
  summary = json.loads((sharded / "summary.json").read_text())
  assert summary["mesh"] == {"data": 2, "model": 4}
  replicated = json.loads((one / "summary.json").read_text())["state_bytes_per_device"]
  assert summary["state_bytes_per_device"] < 0.3 * replicated


def test_a_run_checkpointed_on_eight_devices_resumes_on_two(runs, data_dir, tmp_path):
  """RigL on a 2 × 4 mesh with split leaves loses its last checkpoint (step 20); the
  command on 2 devices, replicated, restores step 16 onto its own mesh (``config.mesh``
  may change on a resume) and ends like the uninterrupted run."""
  whole = runs("rigl", 8, *FSDP)
  resumed = tmp_path / "resumed"
  shutil.copytree(whole, resumed)
  (resumed / "summary.json").unlink()
  shutil.rmtree(resumed / "checkpoints" / "20")
  _run(tmp_path, data_dir, "rigl", 2, "resumed")
  summary = json.loads((resumed / "summary.json").read_text())
  assert summary["devices"] == 2 and summary["mesh"] == {"data": 2, "model": 1}
  _assert_alike(checkpoint_leaves(whole, 20), checkpoint_leaves(resumed, 20))


def _two_processes(tmp: Path, data: Path, extra: tuple[str, ...] = ()
                   ) -> tuple[list[subprocess.Popen], Path]:
  """The rigl command as two ``jax.distributed`` processes on this machine (a localhost
  coordinator, 2 devices each, large leaves split along ``model``), started."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  processes = []
  for index in range(2):
    command, env, workdir = _command(
        tmp, data, "rigl", 2, "two",
        ("--config.mesh.model=2", "--config.mesh.min_shard_size=1024",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={index}", *extra))
    processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  return processes, workdir


def test_two_processes_with_jax_distributed_train_like_one(runs, data_dir, tmp_path):
  """Two processes: each reads half of every batch, only process 0 writes metrics and
  summary, all write the checkpoints, and the run trains like one process on one device."""
  processes, workdir = _two_processes(tmp_path, data_dir)
  outputs = [process.communicate(timeout=300) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
  assert "| rigl |" in outputs[0][0] and "| rigl |" not in outputs[1][0]  # one table
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["mesh"] == {"data": 2, "model": 2}
  _assert_same_training(runs("rigl", 1), workdir, "rigl")


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(data_dir, tmp_path):
  """SIGTERM to process 1 only: JAX's preemption service agrees on a step, both processes
  save it together and exit 75; the same two commands then finish the run."""
  longer = ("--config.num_steps=100", "--config.checkpoint_every=50")
  processes, workdir = _two_processes(tmp_path, data_dir, longer)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 4):
    assert time.monotonic() < deadline and processes[1].poll() is None, "ended before SIGTERM"
    time.sleep(0.005)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [process.communicate(timeout=120) for process in processes]
  assert [p.returncode for p in processes] == [PREEMPTED, PREEMPTED], outputs[0][1][-2000:]
  stopped = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert max(stopped) % 50 and f"after step {max(stopped)}, saved" in outputs[0][1]
  again, _ = _two_processes(tmp_path, data_dir, longer)
  for process, (_, stderr) in zip(again, [p.communicate(timeout=300) for p in again]):
    assert process.returncode == 0, stderr[-2000:]
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(5, 101, 5))


def test_a_batch_that_does_not_split_over_the_devices_is_one_line(data_dir, tmp_path):
  env = {**cli_env(data_dir), "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
  result = subprocess.run([sys.executable, "-c", SYNCHRONOUS_CLI, f"{CONFIG}:rigl",
                           f"--workdir={tmp_path / 'run'}", *SHORT, "--config.batch_size=36"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].endswith(
      "config.batch_size (36) must be a multiple of the number of devices (8)")
  assert not (tmp_path / "run").exists()


# After the README block: the same params and state split along ``model`` on a 2 × 4
# mesh (the runner's FSDP rule); sj.masks and sj.summary read them as they are.
ON_A_SPLIT_STATE = """
from sparsejax.train import sharding as runner_sharding
split_mesh = runner_sharding.make_mesh(model=4)
params, state = runner_sharding.place((params, state), runner_sharding.state_shardings(
    (params, state), split_mesh, min_size=1024))
mask = sj.masks(state)["layers_0"]["kernel"]
assert not mask.sharding.is_fully_replicated and mask.sharding.spec == P("model")
assert sj.summary(state, params) == summary, "summary of the split state differs"
"""


def test_the_readme_sharded_step_runs_on_eight_devices():
  """The README's "Sharded steps in your own loop" block, as written, on 8 devices; then
  ``sj.masks`` and ``sj.summary`` on the same state split along ``model``."""
  readme = (ROOT / "README.md").read_text()
  block = readme.split("**Sharded steps in your own loop.**")[1].split("```python\n")[1]
  code = block.split("```")[0] + ON_A_SPLIT_STATE
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin"}
  result = subprocess.run(
      [sys.executable, "-c", "import jax; jax.config.update('jax_cpu_enable_async_dispatch', "
       "False)\n" + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  sparsity, violations, sharding = result.stdout.strip().splitlines()[-1].split(" ", 2)
  assert (sparsity, violations) == ("0.9", "[]")
  assert sharding.startswith("NamedSharding(mesh=Mesh('data': 8") and "spec=P()" in sharding


def test_the_sharding_rule_depends_on_the_shape_alone():
  """Large arrays split along ``model`` on their largest dimension the axis divides, so a
  param, its mask and its optimizer moments split alike; small or indivisible ones stay
  whole."""
  mesh = AbstractMesh((2, 4), ("data", "model"))
  spec = lambda shape, min_size=1024: leaf_sharding(shape, mesh, min_size).spec  # noqa: E731
  assert spec((784, 300)) == P("model")
  assert spec((300, 100)) == P("model")  # 300 is the larger of the two divisible ones
  assert spec((3, 3, 64, 128)) == P(None, None, None, "model")
  assert spec((3, 5, 7, 11, 13)) == P()  # no dimension splits in four
  assert spec((300,)) == P()  # under min_size
  assert spec((300,), min_size=300) == P("model")
  one_way = AbstractMesh((8, 1), ("data", "model"))
  assert leaf_sharding((784, 300), one_way, 1).spec == P()


def test_a_model_axis_that_does_not_divide_the_devices_is_one_line():
  with pytest.raises(ValueError, match=r"^config.mesh.model \(3\) must divide the number of "
                     r"devices \(1\)$"):
    make_mesh(3)


def test_importing_sparsejax_starts_no_jax_backend():
  """``jax.distributed.initialize()`` must come before any backend starts: importing the
  library, the runner or the report (as a multi-host program does first) starts none."""
  code = ("import sparsejax, sparsejax.nn, sparsejax.train, experiments.train, "
          "experiments.report\nfrom jax._src import xla_bridge\n"
          "print(xla_bridge.backends_are_initialized())")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True, env={"JAX_PLATFORMS": "cpu",
                                                        "PATH": "/usr/bin:/bin"})
  assert result.stdout.strip() == "False"
