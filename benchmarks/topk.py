"""Cost of exact top-k selection on 1M float32 scores, the building block of mask updates.

Run::

  python benchmarks/topk.py [--n 1048576] [--fraction 0.1] [--repeats 15] [--no-variants]

Times, jitted and interleaved round-robin (median and min over ``--repeats`` rounds,
``block_until_ready`` per call):

- ``jnp.sort`` (full sort);
- ``lax.top_k`` with a static ``k = fraction · n``;
- ``sparsejax.selection.top_k_mask`` with a traced ``k``, without and with an
  ``eligible`` mask (what drop-and-grow calls), on continuous scores and on heavily
  tied scores (which exercise the tie-break).

Unless ``--no-variants``, it also times experimental variants of the *same* algorithm
(32-step bisection on the bits of the sortable key, ties broken by flat index), each
checked to return exactly ``top_k_mask``'s mask first:

- ``f32 column counts``: the scores are padded and reshaped to ``[rows, 128]`` once;
  each bisection count is ``sum(key >= c, axis=0, dtype=float32)`` (128 column sums,
  exact while ``rows < 2**24``) followed by an int32 sum of the 128 partial counts.
  XLA:CPU vectorises this reduction along the major axis; the flat int32 count is a
  scalar loop.
- ``skip tie-break``: the tie-break (``cumsum`` over all n entries, an O(n log n)
  ``reduce_window`` on CPU) runs under ``lax.cond`` only when more entries tie at the
  k-th key than there is room for.
- ``blocked tie-break``: the first ``room`` tied entries in row-major order are found
  from per-row counts, a cumsum over the rows and a cumsum of the one crossing row.
- ``fast``: all three together (the candidate replacement for ``top_k_mask``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from sparsejax.selection import sortable_key, top_k_mask

COLS = 128


def _flat_count(b: jax.Array) -> jax.Array:
  """Number of True entries, as ``top_k_mask`` counts them (one int32 sum over the flat array)."""
  return jnp.sum(b.reshape(-1), dtype=jnp.int32)


def _column_count(b: jax.Array) -> jax.Array:
  """Number of True entries of a 2-D bool array: f32 column sums, exact below 2**24 rows."""
  return jnp.sum(b, axis=0, dtype=jnp.float32).astype(jnp.int32).sum()


def top_k_mask_variant(scores: jax.Array, k: jax.Array | int, eligible: jax.Array | None = None,
                       *, column_counts: bool = True, skip_tie_break: bool = True,
                       blocked_tie_break: bool = True) -> jax.Array:
  """Same contract and result as :func:`sparsejax.selection.top_k_mask`, faster on CPU.

  Args:
    scores: float array of any shape.
    k: number of entries to select (may be traced).
    eligible: optional bool array like ``scores``; only these may be selected.
    column_counts: count with f32 column sums of the ``[rows, 128]`` layout
      (else with a flat int32 sum, as ``top_k_mask``).
    skip_tie_break: run the tie-break only when ties exceed the room left.
    blocked_tie_break: break ties with per-row counts instead of a full cumsum.

  Returns:
    A bool array like ``scores``.
  """
  flat = scores.reshape(-1)
  n = flat.size
  ok = jnp.ones((n,), bool) if eligible is None else eligible.reshape(-1)
  key = jnp.where(ok, sortable_key(flat), jnp.uint32(0))
  cols = COLS
  rows = max(-(-n // cols), 1)
  if rows * cols != n:  # padding has key 0 and is not eligible: never counted or selected
    key = jnp.pad(key, (0, rows * cols - n))
    ok = jnp.pad(ok, (0, rows * cols - n))
  key, ok = key.reshape(rows, cols), ok.reshape(rows, cols)
  count = _column_count if column_counts else _flat_count
  k = jnp.minimum(jnp.asarray(k, jnp.int32), count(ok))

  def add_bit(bit, threshold):
    candidate = threshold | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
    # Ineligible keys are 0 < candidate: no `ok &` needed.
    return jnp.where(count(key >= candidate) >= k, candidate, threshold)

  kth = jax.lax.fori_loop(0, 32, add_bit, jnp.uint32(0))
  above = key > kth  # kth >= 0, so ineligible (key 0) entries are never above
  tied = ok & (key == kth)
  room = k - count(above)

  def first_room(tied):
    """``tied & (row-major cumsum(tied) <= room)``."""
    if not blocked_tie_break:
      return tied & (jnp.cumsum(tied.reshape(-1), dtype=jnp.int32) <= room).reshape(rows, cols)
    per_row = tied.sum(axis=1, dtype=jnp.int32)
    through = jnp.cumsum(per_row)  # tied entries up to and including each row
    crossing = jnp.minimum(jnp.sum(through <= room, dtype=jnp.int32), rows - 1)
    in_row = jnp.cumsum(jax.lax.dynamic_index_in_dim(tied, crossing, 0, keepdims=False),
                        dtype=jnp.int32)
    partial = ((jnp.arange(rows)[:, None] == crossing)
               & (in_row[None, :] <= room - (through - per_row)[crossing]))
    return tied & ((through <= room)[:, None] | partial)

  if skip_tie_break:
    chosen_tied = jax.lax.cond(count(tied) > room, first_room, lambda t: t, tied)
  else:
    chosen_tied = first_room(tied)
  return (above | chosen_tied).reshape(-1)[:n].reshape(scores.shape)


VARIANTS: dict[str, Callable[..., jax.Array]] = {
    "f32 column counts": functools.partial(top_k_mask_variant, skip_tie_break=False,
                                           blocked_tie_break=False),
    "skip tie-break": functools.partial(top_k_mask_variant, column_counts=False,
                                        blocked_tie_break=False),
    "blocked tie-break": functools.partial(top_k_mask_variant, column_counts=False,
                                           skip_tie_break=False),
    "fast (all three)": top_k_mask_variant,
}


def time_interleaved(cases: dict[str, tuple[Callable[..., jax.Array], tuple]], repeats: int
                     ) -> dict[str, tuple[float, float]]:
  """Median and min ms per case, round-robin over cases, after one warm-up call each."""
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def check_variants(n: int, k: int) -> None:
  """Raises AssertionError unless every variant equals ``top_k_mask`` on a few inputs."""
  base = jax.random.normal(jax.random.PRNGKey(1), (n,))
  eligible = jax.random.bernoulli(jax.random.PRNGKey(2), 0.1, (n,))
  inputs = [(base, k, None), (jnp.round(base * 4) / 4, k, None), (base, k // 10, eligible),
            (jnp.zeros((n,)), k, ~eligible), (base[:1000].reshape(10, 100), 37, None)]
  for name, fn in VARIANTS.items():
    jitted = jax.jit(fn)
    for scores, kk, elig in inputs:
      want = top_k_mask(scores, kk, elig)
      got = jitted(scores, jnp.int32(kk), elig)
      assert bool(jnp.array_equal(want, got)), f"{name} differs from top_k_mask"


def main(argv: Sequence[str] | None = None) -> None:
  """Parses flags, runs the benchmark and prints a Markdown table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=1 << 20, help="number of float32 scores")
  parser.add_argument("--fraction", type=float, default=0.1, help="k / n")
  parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
  parser.add_argument("--no-variants", action="store_true", help="skip the experimental variants")
  args = parser.parse_args(argv)
  n, k = args.n, int(args.fraction * args.n)

  print(f"command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; n = {n}, k = {k}; "
        f"{args.repeats} interleaved rounds")
  scores = jax.random.normal(jax.random.PRNGKey(0), (n,))
  tied = jnp.round(scores * 4) / 4  # ~30 distinct values: the k-th value is heavily tied
  eligible = jax.random.bernoulli(jax.random.PRNGKey(3), 0.1, (n,))  # a 90 %-sparse mask
  k_traced = jnp.int32(k)
  k_drop = jnp.int32(int(0.7 * eligible.sum()))  # RigL at drop fraction 0.3
  k_grow = jnp.int32(int(0.3 * eligible.sum()))

  mask_fns = {"sparsejax top_k_mask": top_k_mask}
  if not args.no_variants:
    check_variants(n, k)
    print("all variants return exactly top_k_mask's mask")
    mask_fns.update({f"variant: {name}": fn for name, fn in VARIANTS.items()})

  cases = {
      "jnp.sort": (jax.jit(jnp.sort), (scores,)),
      f"lax.top_k (static k={k})": (jax.jit(lambda s: jax.lax.top_k(s, k)), (scores,)),
  }
  columns = ("k = 10 % of n", "k = 10 %, tied scores",
             "drop: eligible 10 %, k = 70 % of them", "grow: eligible 90 %, k = 3.3 % of them")
  for name, fn in mask_fns.items():
    jitted = jax.jit(fn)
    cases[f"{name}|0"] = (jitted, (scores, k_traced))
    cases[f"{name}|1"] = (jitted, (tied, k_traced))
    cases[f"{name}|2"] = (jitted, (scores, k_drop, eligible))
    cases[f"{name}|3"] = (jitted, (scores, k_grow, ~eligible))
  results = time_interleaved(cases, args.repeats)

  def cell(name):
    median, best = results[name]
    return f"{median:.2f} (min {best:.2f})"

  print()
  print("| selection | " + " | ".join(columns) + " |")
  print("|---|" + "---|" * len(columns))
  for name in cases:
    if "|" not in name:
      print(f"| {name} | {cell(name)} |" + " |" * (len(columns) - 1))
  for name in mask_fns:
    print(f"| {name} | " + " | ".join(cell(f"{name}|{i}") for i in range(len(columns))) + " |")
  print()
  print("Cells: median ms per call (min ms), jitted, k passed as a traced int32 except lax.top_k.")


if __name__ == "__main__":
  main()
