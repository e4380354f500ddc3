"""The compiled CPU kernel for compact models (sparsejax.nn.native, rows.cc)."""

import os
import shutil
import subprocess
import sys

from conftest import xla_flags
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.nn import native


def random_rows(rng, fan_in, units, density, position_dtype=None):
  """A random sparse ``[fan_in, units]`` kernel: (dense W, values, positions, offsets)."""
  mask = rng.random((fan_in, units)) < density
  dense = np.where(mask, rng.normal(size=(fan_in, units)), 0).astype(np.float32)
  unit, position = np.nonzero(mask.T)  # by unit, then position
  offsets = np.concatenate([[0], np.cumsum(np.bincount(unit, minlength=units))]).astype(np.int32)
  dtype = position_dtype or native.position_dtype(fan_in)
  return dense, dense.T[unit, position], position.astype(dtype), offsets


def test_the_kernel_builds_wherever_a_compiler_is():
  """Where ``c++`` exists (CI's machines have it), the kernel must build and load: the
  other tests would otherwise pass by testing nothing."""
  assert shutil.which(os.environ.get("CXX", "c++")), "no C++ compiler here"
  assert native.unavailable() is None


@settings(max_examples=30, deadline=None)
@given(batch=st.sampled_from([0, 1, 2, 3, 7, 16, 17, 40]), fan_in=st.integers(1, 70),
       units=st.integers(1, 40), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       wide=st.booleans(), seed=st.integers(0, 2**16))
def test_the_product_equals_the_dense_product(batch, fan_in, units, density, wide, seed):
  """Every batch path (by position below 3 rows, by tiles of 16 from 3 on, a partial last
  tile), uint16 and int32 positions, empty units and empty kernels; jit and eager agree
  bit for bit."""
  rng = np.random.default_rng(seed)
  dense, *rows = random_rows(rng, fan_in, units, density, np.int32 if wide else None)
  x = rng.normal(size=(batch, fan_in)).astype(np.float32)
  eager = native.rows_product(x, *rows)
  np.testing.assert_allclose(eager, x @ dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(jax.jit(native.rows_product)(x, *rows), eager)


def test_a_large_product_splits_over_threads_and_matches():
  """Big enough that every thread gets items, in both batch paths."""
  rng = np.random.default_rng(0)
  dense, *rows = random_rows(rng, 3000, 700, 0.05)
  for batch in (1, 2, 5, 64, 100):
    x = rng.normal(size=(batch, 3000)).astype(np.float32)
    np.testing.assert_allclose(native.rows_product(x, *rows), x @ dense, rtol=1e-4, atol=1e-4)


def test_gradients_equal_the_dense_gradients():
  rng = np.random.default_rng(1)
  dense, values, positions, offsets = random_rows(rng, 30, 12, 0.3)
  x = rng.normal(size=(5, 30)).astype(np.float32)
  target = rng.normal(size=(5, 12)).astype(np.float32)

  def sparse_loss(x, values):
    return jnp.sum((native.rows_product(x, values, positions, offsets) - target) ** 2)

  def dense_loss(x, w):
    return jnp.sum((x @ w - target) ** 2)

  dx, dvalues = jax.grad(sparse_loss, argnums=(0, 1))(x, values)
  dx_dense, dw_dense = jax.grad(dense_loss, argnums=(0, 1))(x, dense)
  unit, position = np.nonzero(dense.T != 0)
  np.testing.assert_allclose(dx, dx_dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dvalues, np.asarray(dw_dense).T[unit, position], rtol=1e-5,
                             atol=1e-5)


def test_vmap_over_inputs():
  rng = np.random.default_rng(2)
  dense, *rows = random_rows(rng, 20, 6, 0.4)
  xs = rng.normal(size=(3, 4, 20)).astype(np.float32)
  out = jax.vmap(lambda x: native.rows_product(x, *rows))(xs)
  np.testing.assert_allclose(out, xs @ dense, rtol=1e-5, atol=1e-5)


def test_offsets_that_do_not_describe_the_values_are_refused():
  rng = np.random.default_rng(3)
  _, values, positions, offsets = random_rows(rng, 10, 4, 0.5)
  x = np.ones((1, 10), np.float32)
  with pytest.raises(Exception, match="offsets do not describe the values"):
    native.rows_product(x, values, positions, offsets[:-1])
  decreasing = offsets.copy()
  decreasing[1], decreasing[2] = decreasing[2] + 1, decreasing[1]
  with pytest.raises(Exception, match="offsets decrease"):
    native.rows_product(x, values, positions, decreasing)


def _in_subprocess(code: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


PREPARE = """
import warnings
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, sparsejax as sj, sparsejax.nn as sjnn
model = nn.Dense(3)
x = jnp.ones((2, 4))
params = model.init(jax.random.PRNGKey(0), x)["params"]
stored = {"params": sj.compact(params, {"kernel": np.eye(4, 3, dtype=bool), "bias": None})}
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  runtime = sjnn.prepare(model, stored, x)
print(type(runtime["params"]["kernel"]).__name__)
print("|".join(str(w.message) for w in caught))
try:
  sjnn.prepare(model, stored, x, runtime="rows")
except ValueError as e:
  print(e)
"""


def test_a_failed_build_warns_once_and_falls_back_to_slots(tmp_path):
  """A compiler that fails: auto runs on slots with one warning saying why; asking for
  rows is one line with the same reason. Nothing is left in the cache."""
  result = _in_subprocess(PREPARE, CXX="false", SPARSEJAX_CACHE_DIR=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  kind, warning, error = result.stdout.splitlines()
  assert kind == "SlotKernel"
  assert warning == ("sparsejax: the compiled sparse kernel is unavailable (false could not "
                     "build rows.cc: no output); compact models run on the slot kernels, "
                     "which are slower on the CPU")
  assert error == ("runtime='rows' needs the compiled sparse kernel: false could not build "
                   "rows.cc: no output")
  assert not any(tmp_path.rglob("*.so"))


def test_turned_off_it_falls_back_silently():
  result = _in_subprocess(PREPARE, SPARSEJAX_NATIVE="0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == [
      "SlotKernel", "",
      "runtime='rows' needs the compiled sparse kernel: turned off by SPARSEJAX_NATIVE=0"]


def test_the_build_is_cached_by_source_and_machine(tmp_path):
  """A second process loads the cached library instead of compiling again."""
  code = "from sparsejax.nn import native; print(native.unavailable())"
  first = _in_subprocess(code, SPARSEJAX_CACHE_DIR=str(tmp_path))
  assert first.stdout.strip() == "None", first.stderr[-2000:]
  built = list(tmp_path.glob("rows-*.so"))
  assert len(built) == 1
  stamp = built[0].stat().st_mtime_ns
  second = _in_subprocess(code, SPARSEJAX_CACHE_DIR=str(tmp_path), CXX="false")
  assert second.stdout.strip() == "None", second.stderr[-2000:]
  assert built[0].stat().st_mtime_ns == stamp


SHARDED = """
import sys
sys.path.insert(0, "tests")
import numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
from test_native import random_rows
from sparsejax.nn import native
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
dense, *rows = random_rows(np.random.default_rng(0), 64, 32, 0.2)
x = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
per_device = jax.jit(jax.shard_map(lambda x: native.rows_product(x, *rows), mesh=mesh,
                                   in_specs=P("data"), out_specs=P("data")))
y = per_device(xs)
hlo = per_device.lower(xs).compile().as_text()
print(y.sharding.spec, float(np.abs(np.asarray(y) - x @ dense).max()), "all-gather" in hlo,
      "f32[4,32]" in hlo, sep="|")
"""


def test_shard_map_runs_the_kernel_on_each_device_s_rows():
  """4 devices, a batch-sharded input: under shard_map each device multiplies its own
  4 rows (no all-gather) and the result equals the dense product."""
  result = _in_subprocess(SHARDED, XLA_FLAGS=xla_flags(
      "--xla_force_host_platform_device_count=4"))
  assert result.returncode == 0, result.stderr[-2000:]
  spec, error, gathered, local = result.stdout.strip().split("|")
  assert spec == "P('data', None)" and float(error) < 1e-5
  assert (gathered, local) == ("False", "True")
