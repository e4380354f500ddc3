"""Inference on compact kernels against the dense model, side by side in one process.

Run::

  python benchmarks/inference.py [--repeats 7] [--calls 20]

For each model and sparsity, the masks come from ``sj.static_sparse(..., distribution=
"erk")`` (the distribution RigL starts from), the params are masked, and
``sj.compact`` → ``sjnn.prepare`` gives two runtimes: ``"auto"`` (the default: the
compiled CPU kernel's rows, and a plain dense kernel for a layer with more than a quarter
of its weights active) and ``"slots"`` (pure JAX, every backend). The three forwards are
jitted;
each round times ``calls`` calls of each, interleaved, and the table reports the median
per-call time and the median of the rounds' dense ÷ sparse (above 1: the sparse model
is faster). Stored bytes are per non-zero weight (values, indices and row offsets); the
slot form's padding (slots holding no weight: every output unit has its layer's
largest fan-in) is reported next to it; the row form has none.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import statistics
import time

import flax.linen as nn
import jax
import optax

import sparsejax as sj
import sparsejax.nn as sjnn


class MLP(nn.Module):
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      x = nn.Dense(width)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class MlpBlock(nn.Module):
  """A ViT encoder's MLP block: LayerNorm, Dense 4·d with GELU, Dense d, residual."""
  width: int = 192  # ViT-Ti

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(y))


MODELS = {  # name: (model, input shape without the batch)
    "mlp4096": (MLP((4096, 4096, 10)), (784,)),
    "vit_ti_mlp_block": (MlpBlock(192), (197, 192)),  # 197 tokens per example
    "lenet300100": (MLP((300, 100, 10)), (784,)),
}
CASES = [("mlp4096", 0.9), ("mlp4096", 0.95), ("mlp4096", 0.99), ("vit_ti_mlp_block", 0.9),
         ("lenet300100", 0.9)]


def _time(fn: Callable[[], jax.Array], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1e3


def bench(name: str, sparsity: float, batch: int, repeats: int, calls: int) -> dict[str, float]:
  model, shape = MODELS[name]
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, *shape))
  variables = model.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  masks = sj.masks(sj.static_sparse(optax.sgd(0.0), sparsity=sparsity,
                                    distribution="erk").init(params))
  params = jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                        is_leaf=lambda m: m is None)
  dense_vars = {**variables, "params": params}
  stored = {**variables, "params": sj.compact(params, masks)}
  sparse = jax.jit(lambda v, x: sjnn.sparse_apply(model, v, x))
  forwards = {"dense": (jax.jit(model.apply), dense_vars)}
  for runtime in ("auto", "slots"):
    forwards[runtime] = (sparse, sjnn.prepare(model, stored, x, runtime=runtime))
  for fn, v in forwards.values():
    jax.block_until_ready(fn(v, x))
  rounds: dict[str, list[float]] = {name: [] for name in forwards}
  for _ in range(repeats):
    for name, (fn, v) in forwards.items():
      rounds[name].append(_time(lambda fn=fn, v=v: fn(v, x), calls))
  sizes, padding = sj.compact_bytes(stored), sjnn.runtime_bytes(forwards["slots"][1])
  out = {f"{name}_ms": statistics.median(times) for name, times in rounds.items()}
  for name in ("auto", "slots"):
    out[f"{name}_speedup"] = statistics.median(
        d / c for d, c in zip(rounds["dense"], rounds[name]))
  return {**out,
          "bytes_per_nnz": (sizes["values"] + sizes["indices"] + sizes["offsets"]) / sizes["nnz"],
          "stored_mb": sizes["total"] / 2**20, "dense_mb": sizes["dense_total"] / 2**20,
          "padding": padding["padding_slots"] / max(padding["slots"], 1)}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
  parser.add_argument("--calls", type=int, default=20, help="calls per variant and round")
  parser.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
  args = parser.parse_args(argv)
  print(f"command: `python benchmarks/inference.py --repeats {args.repeats} --calls "
        f"{args.calls} --batches {args.batches}`\n")
  print("| model | sparsity | batch | dense (ms) | auto (ms) | dense ÷ auto | slots (ms) | "
        "dense ÷ slots | stored: bytes per nnz, MB (dense MB) | slot padding |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
  for name, sparsity in CASES:
    for batch in (int(b) for b in args.batches.split(",")):
      r = bench(name, sparsity, batch, args.repeats, args.calls)
      print(f"| {name} | {sparsity:.2f} | {batch} | {r['dense_ms']:.3f} | {r['auto_ms']:.3f} "
            f"| {r['auto_speedup']:.2f} | {r['slots_ms']:.3f} | {r['slots_speedup']:.2f} "
            f"| {r['bytes_per_nnz']:.2f}, {r['stored_mb']:.2f} ({r['dense_mb']:.1f}) "
            f"| {r['padding']:.0%} |", flush=True)


if __name__ == "__main__":
  main()
