"""Cost of exact top-k selection on 1M float32 scores, the building block of mask updates.

Run::

  python benchmarks/topk.py [--n 1048576] [--fraction 0.1] [--repeats 15]

Times, jitted and interleaved round-robin (median and min over ``--repeats`` rounds,
``block_until_ready`` per call):

- ``jnp.sort`` (full sort);
- ``lax.top_k`` with a static ``k = fraction · n``;
- ``sparsejax.selection.top_k_mask`` with a traced ``k``, without and with an
  ``eligible`` mask (what drop-and-grow calls), on continuous scores and on heavily
  tied scores (which exercise the tie-break).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from sparsejax.selection import top_k_mask


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


def main(argv: Sequence[str] | None = None) -> None:
  """Parses flags, runs the benchmark and prints a Markdown table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=1 << 20, help="number of float32 scores")
  parser.add_argument("--fraction", type=float, default=0.1, help="k / n")
  parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
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
