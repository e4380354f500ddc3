"""Data-parallel runs: the same CLI command on 1 and on 8 (simulated) devices agrees."""

import json
from pathlib import Path
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_cli import CONFIG, ROOT, SHORT, checkpoint_leaves, cli_env, data_dir  # noqa: F401

# ``python -m experiments.train ARGS`` with CPU steps dispatched synchronously: on this
# 2-core machine collectives can deadlock under asynchronous dispatch (a test setting,
# not the library's).
SYNCHRONOUS_CLI = ("import jax, runpy; jax.config.update('jax_cpu_enable_async_dispatch', False); "
                   "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)")


def _run(tmp_path: Path, data: Path, method: str, devices: int, name: str | None = None
         ) -> Path:
  workdir = tmp_path / (name or f"{method}-{devices}")
  env = {**cli_env(data), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  args = [f"{CONFIG}:{method}", f"--workdir={workdir}", *SHORT]
  if method != "dst":
    args.append("--config.sparse.update_every=4")
  result = subprocess.run([sys.executable, "-c", SYNCHRONOUS_CLI, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def _assert_alike(first: list[np.ndarray], second: list[np.ndarray]) -> None:
  """Masks, counts and steps equal; floats equal to the rounding of another reduction order."""
  for a, b in zip(first, second, strict=True):
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rigl", "dst"])
def test_one_and_eight_devices_train_alike(data_dir, tmp_path, method):  # noqa: F811
  """Global batch 32 on 1 device and split over 8: the same masks in both checkpoints
  (steps 10 and 20; RigL updates at 4, 8 and 12), the same weights-ever-active, and
  params, optimizer state and losses to float rounding; the summary records the mesh."""
  runs = {n: _run(tmp_path, data_dir, method, n) for n in (1, 8)}
  summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
  assert summaries[1]["devices"] == 1 and summaries[1]["mesh"] == {"data": 1}
  assert summaries[8]["devices"] == 8 and summaries[8]["mesh"] == {"data": 8}
  one, eight = summaries[1], summaries[8]
  assert one["layers"] == eight["layers"] and one["coverage"] == eight["coverage"]
  assert one["sparsity"] == eight["sparsity"]
  if method == "rigl":
    assert one["coverage"] > 1 - one["sparsity"] + 0.01  # the masks did change
  for step in (10, 20):
    leaves = {n: checkpoint_leaves(d, step) for n, d in runs.items()}
    assert any(leaf.dtype == bool for leaf in leaves[1])
    _assert_alike(leaves[1], leaves[8])
  rows = {n: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
          for n, d in runs.items()}
  assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[8]]
  for key in ("train_loss", "test_loss"):
    a = [r[key] for r in rows[1] if r.get(key) is not None]
    b = [r[key] for r in rows[8] if r.get(key) is not None]
    np.testing.assert_allclose(a, b, rtol=1e-4)
  assert one["test_accuracy"] == pytest.approx(eight["test_accuracy"], abs=1 / 64 + 1e-9)


def test_a_run_checkpointed_on_eight_devices_resumes_on_two(data_dir, tmp_path):  # noqa: F811
  """RigL on 8 devices loses its last checkpoint (step 20); the same command on 2 devices
  restores step 10 onto its own mesh and ends like the uninterrupted run."""
  whole = _run(tmp_path, data_dir, "rigl", 8, name="whole")
  resumed = _run(tmp_path, data_dir, "rigl", 8, name="resumed")
  (resumed / "summary.json").unlink()
  shutil.rmtree(resumed / "checkpoints" / "20")
  _run(tmp_path, data_dir, "rigl", 2, name="resumed")
  summary = json.loads((resumed / "summary.json").read_text())
  assert summary["devices"] == 2
  _assert_alike(checkpoint_leaves(whole, 20), checkpoint_leaves(resumed, 20))


def test_a_batch_that_does_not_split_over_the_devices_is_one_line(data_dir, tmp_path):  # noqa: F811
  env = {**cli_env(data_dir), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", SYNCHRONOUS_CLI, f"{CONFIG}:rigl",
                           f"--workdir={tmp_path / 'run'}", *SHORT, "--config.batch_size=36"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].endswith(
      "config.batch_size (36) must be a multiple of the number of devices (8)")
  assert not (tmp_path / "run").exists()


def test_the_readme_sharded_step_runs_on_eight_devices():
  """The README's "Sharded steps in your own loop" block, as written, on 8 devices."""
  readme = (ROOT / "README.md").read_text()
  block = readme.split("**Sharded steps in your own loop.**")[1].split("```python\n")[1]
  code = block.split("```")[0]
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


def test_several_processes_are_refused_with_one_line(monkeypatch):
  from sparsejax.train import sharding
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="multi-host runs are not supported yet"):
    sharding.data_mesh()
