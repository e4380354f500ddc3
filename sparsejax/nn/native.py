"""The compiled CPU kernel for compact models: built on first use, called through XLA's FFI.

``rows.cc`` (beside this file) multiplies by a sparse kernel stored as compressed rows per
output unit, on XLA's intra-op threads. XLA:CPU's own gather costs 2–3 ns per element,
which is why the slot kernels (pure JAX) cannot go much past 2× a dense product at 90 %
sparsity; this kernel reads each weight once.

It is compiled here, not shipped as a binary: on the first call in a process that needs
it, :func:`rows_product` builds ``rows.cc`` with the system's C++ compiler (``$CXX`` or
``c++``, ``-O3 -march=native``) against the installed jaxlib's FFI headers
(``jax.ffi.include_dir()``), so the library stays pure Python and the kernel always
matches the jaxlib it runs in. The shared library is cached in
``$SPARSEJAX_CACHE_DIR`` (default ``~/.cache/sparsejax``), keyed by the source, the
jaxlib version, the flags and the CPU; the build takes a few seconds, once.
``SPARSEJAX_NATIVE=0`` turns the kernel off. Without it (no compiler, a failed build,
not a CPU backend) :func:`unavailable` says why and compact models run on the slot
kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("rows.cc")
# position dtype: (the handler's symbol in rows.cc, the name XLA knows it by)
HANDLERS = {jnp.dtype(jnp.uint16): ("SparsejaxRowsU16", "sparsejax_rows_u16"),
            jnp.dtype(jnp.int32): ("SparsejaxRowsS32", "sparsejax_rows_s32")}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


class NativeUnavailable(RuntimeError):
  """The compiled kernel cannot be used here; the message says why, in one line."""


def _cpu_identity() -> str:
  """What ``-march=native`` depends on: the CPU's model and instruction-set flags."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
  return platform.machine() + "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
  """Where built libraries are kept: ``$SPARSEJAX_CACHE_DIR`` or the user's cache."""
  base = os.environ.get("SPARSEJAX_CACHE_DIR") or Path(
      os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsejax"
  return Path(base)


def _build(compiler: str, include: str) -> Path:
  """The shared library for this source, jaxlib, flags and CPU, built if not cached."""
  key = hashlib.sha256("\0".join([
      SOURCE.read_text(), jaxlib.__version__, " ".join(FLAGS), _cpu_identity()
  ]).encode()).hexdigest()[:16]
  cache = _cache_dir()
  library = cache / f"rows-{key}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as scratch:  # same file system: atomic rename
    built = Path(scratch) / library.name
    result = subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(built)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
      errors = [line for line in result.stderr.splitlines() if "error" in line]
      raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: "
                              f"{(errors or result.stderr.splitlines() or ['no output'])[0]}")
    os.replace(built, library)
  return library


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None, or why it cannot
  (then also a warning, unless ``SPARSEJAX_NATIVE=0`` asked for this)."""
  if os.environ.get("SPARSEJAX_NATIVE", "1") == "0":
    return "turned off by SPARSEJAX_NATIVE=0"
  compiler = os.environ.get("CXX", "c++")
  try:
    if shutil.which(compiler) is None:
      raise NativeUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    library = ctypes.CDLL(str(_build(compiler, jax.ffi.include_dir())))
  except (NativeUnavailable, OSError) as error:
    reason = str(error).splitlines()[0]
    warnings.warn(f"sparsejax: the compiled sparse kernel is unavailable ({reason}); compact "
                  "models run on the slot kernels, which are slower on the CPU", stacklevel=3)
    return reason
  for symbol, target in HANDLERS.values():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return None


def unavailable() -> str | None:
  """None when the compiled kernel runs here; otherwise why not, in one line.

  The first call may build the kernel (a few seconds; cached across processes).
  """
  if jax.default_backend() != "cpu":
    return ("the compiled kernel runs on the CPU, and the default backend is "
            f"{jax.default_backend()}")
  return _load()


def position_dtype(fan_in: int) -> jnp.dtype:
  """The narrowest position type the kernel takes for ``fan_in`` inputs (uint16 or int32)."""
  return jnp.dtype(jnp.uint16 if fan_in <= 2**16 else jnp.int32)


def _unit_of_each(offsets: jax.Array, nnz: int) -> jax.Array:
  """For each of the ``nnz`` weights, the unit it belongs to."""
  return jnp.repeat(jnp.arange(offsets.shape[0] - 1), jnp.diff(offsets),
                    total_repeat_length=nnz)


@jax.custom_vjp
def rows_product(x: jax.Array, values: jax.Array, positions: jax.Array, offsets: jax.Array
                 ) -> jax.Array:
  """``x @ W`` for ``x`` float32 ``[batch, fan_in]`` and W as compressed rows per unit.

  Args:
    x: float32 ``[batch, fan_in]``.
    values: float32 ``[nnz]``: unit ``u``'s weights are ``values[offsets[u]:offsets[u+1]]``.
    positions: ``[nnz]`` their input positions (< fan_in), uint16 or int32
      (:func:`position_dtype`). They are not range-checked here: build them with
      :func:`sparsejax.nn.prepare`, which checks them once.
    offsets: int32 ``[units + 1]``.

  Returns:
    float32 ``[batch, units]``. Differentiable in ``x`` and ``values`` (the backward pass
    is plain JAX).

  Raises:
    NativeUnavailable: one line, when the kernel cannot run here (:func:`unavailable`).
  """
  reason = unavailable()
  if reason is not None:
    raise NativeUnavailable(f"the compiled sparse kernel is unavailable: {reason}")
  units = offsets.shape[0] - 1
  call = jax.ffi.ffi_call(HANDLERS[jnp.dtype(positions.dtype)][1],
                          jax.ShapeDtypeStruct((x.shape[0], units), jnp.float32),
                          vmap_method="sequential")
  return call(x, values, positions, offsets)


def _rows_product_fwd(x, values, positions, offsets):
  return rows_product(x, values, positions, offsets), (x, values, positions, offsets)


def _rows_product_bwd(residuals, dy):
  x, values, positions, offsets = residuals
  unit = _unit_of_each(offsets, values.shape[0])
  dy_of_weight = dy[:, unit]  # [batch, nnz]
  dx = jnp.zeros_like(x).at[:, positions].add(dy_of_weight * values)
  dvalues = jnp.sum(dy_of_weight * x[:, positions], axis=0)
  return dx, dvalues, None, None


rows_product.defvjp(_rows_product_fwd, _rows_product_bwd)
