"""Shared fixtures: a tiny MLP and helpers to step any optax transformation."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.extend.core
import numpy as np
import optax
import pytest

from sparsejax.data import write_idx_dataset


class TinyMLP(nn.Module):
  """20 → 16 → 12 → 4: three kernels (masked) and three biases (dense)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(4)(x)


def make_batch(seed: int = 0, n: int = 32):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, (n, 20)), jax.random.randint(ky, (n,), 0, 4)


@pytest.fixture(scope="session")
def mlp():
  model = TinyMLP()
  x, y = make_batch()
  params = model.init(jax.random.PRNGKey(1), x)["params"]

  def loss(p, batch=(x, y)):
    logits = model.apply({"params": p}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return params, loss


def make_step(tx, loss, jit: bool = True):
  """A train step ``(params, state, batch) -> (params, state, grads)``."""

  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  return jax.jit(step) if jit else step


def run(tx, params, loss, steps, jit=True):
  """Yields (step, params_before, params_after, state_before, state_after, grads)."""
  state = tx.init(params)
  step_fn = make_step(tx, loss, jit=jit)
  for t in range(1, steps + 1):
    new_params, new_state, grads = step_fn(params, state, make_batch(t))
    yield t, params, new_params, state, new_state, grads
    params, state = new_params, new_state


def reference_update(mask, drop_score, grow_score, fraction):
  """google-research/rigl's ``_get_update_op`` in NumPy (ties by index, no noise)."""
  n_prune = int(np.float32(mask.sum()) * np.float32(fraction))
  active = np.flatnonzero(mask)
  kept = np.zeros_like(mask)
  kept[active[np.argsort(-drop_score[active], kind="stable")[:mask.sum() - n_prune]]] = True
  candidates = np.flatnonzero(~kept)  # the weights dropped just now included
  new = kept.copy()
  new[candidates[np.argsort(-grow_score[candidates], kind="stable")[:n_prune]]] = True
  return new, n_prune


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
  """A tiny MNIST-format dataset (32 random 28x28 images per split) in IDX files."""
  from sparsejax.data import write_idx_dataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  directory = tmp_path_factory.mktemp("mnist")
  write_idx_dataset(directory, {
      split: {"image": rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
              "label": rng.integers(0, 10, 32, dtype=np.uint8)} for split in ("train", "test")})
  return directory


def mask_leaves(tree):
  """Flat list of the mask arrays (None for dense leaves)."""
  return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def assert_exactly_sparse(params, masks):
  """Masked weights are exactly 0; active weights may be anything."""
  for p, m in zip(jax.tree.leaves(params), mask_leaves(masks)):
    if m is not None:
      np.testing.assert_array_equal(np.asarray(p)[~np.asarray(m)], 0.0)


def nnz_per_leaf(masks):
  return [None if m is None else int(np.sum(m)) for m in mask_leaves(masks)]


# The tests' programs are tiny and compiled once or a few times: XLA:CPU's compile time,
# mostly LLVM's optimisation of the generated code, is most of the suite's time. Without
# it (these flags) compiles take about half as long. Results can differ from a default
# build in the last bit (e.g. no fused multiply-adds: a 20-step RigL run's state differed
# by up to 9e-8); every comparison in the tests is between programs compiled alike
# (subprocesses inherit the flags) or within a tolerance.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(*flags: str) -> str:
  """``XLA_FLAGS`` for a subprocess: the tests' flags and ``flags``."""
  return " ".join((os.environ.get("XLA_FLAGS", ""), *flags)).strip()


def pytest_configure(config):
  """Compiled programs are cached on disk and shared by the tests and their subprocesses,
  and compiled with :data:`TEST_XLA_FLAGS` (set before JAX starts its backend).

  Many tests compile the same train step; the cache (``.pytest_cache/jax``) makes the
  repeats cheap. Subprocesses (the CLI tests) inherit both through the environment.
  """
  if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags(TEST_XLA_FLAGS)
  cache = os.path.join(str(config.rootpath), ".pytest_cache", "jax")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def primitive_names(jaxpr) -> list[str]:
  """The primitives of a jaxpr's equations, those of nested jaxprs included."""
  return [eqn.primitive.name for eqn in jaxpr.eqns] + [
      name for eqn in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(eqn.params)
      for name in primitive_names(sub)]


def loop_count(jaxpr) -> int:
  """Number of loops (while, scan) in a jaxpr, nested ones included."""
  return sum(name in ("while", "scan") for name in primitive_names(jaxpr))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tiny Fashion-MNIST look-alike: 256 training and 64 test images."""
  rng = np.random.default_rng(0)
  directory = tmp_path_factory.mktemp("idx")
  write_idx_dataset(directory, {
      split: {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "label": rng.integers(0, 10, n, dtype=np.uint8)}
      for split, n in (("train", 256), ("test", 64))})
  return directory
