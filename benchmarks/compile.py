"""Time to the first finished training step of sparsejax methods against the leaf count.

Run::

  python benchmarks/compile.py [--blocks 2,6,12,24] [--methods static,rigl,dst] \
      [--repeats 3] [--quick]

Model: ``models.GPT``, a GPT-style decoder-only transformer in flax.linen -- token
embedding (vocab 512), a learned positional embedding, ``--blocks`` pre-LayerNorm blocks
(causal 4-head ``MultiHeadDotProductAttention`` with d_model 128, then an MLP
128-512-128 with gelu), a final LayerNorm and a Dense head to the vocab -- trained on
next-token cross-entropy over one fixed random batch of 8 sequences of 64 tokens. A
block has 16 leaves (6 of them kernels, masked by default), so 12 blocks give 198 leaves.

Variants: ``dense`` (``optax.adam(1e-3)``); ``static``
(``static_sparse(adam, sparsity=0.9, distribution="erk")``); ``rigl`` (the same with
``update_every=100, end_step=10_000``); ``rigl_scheduled`` (the same RigL, its first
step compiled with ``mask_update=False`` as the runner does: steps where
``tx.is_update_step`` is False hold no mask-update code, and the update step is
compiled at the first update); ``dst`` (``dst(adam, alpha=5e-4)``).

One measurement of a variant builds a fresh optimizer and a fresh jitted train step
(a new closure: ``value_and_grad`` of the loss, ``tx.update``, ``optax.apply_updates``;
params and optimizer state donated), so nothing compiled before is reused, and times

- **init**: ``tx.init(params)`` to ``block_until_ready`` (sparsejax jits its init,
  so this includes that compilation; dense adam's init runs eagerly);
- **compile**: ``step.lower(...).compile()`` -- tracing, lowering and XLA compilation;
- **run**: the first call of the compiled step, to ``block_until_ready``;
- **deferred** (``rigl_scheduled`` only, not in the total): compiling the update step,
  paid later at the first mask update.

The total is the sum of init, compile and run. The persistent compilation cache is switched off. One untimed
warm-up measurement of every variant at the smallest block count takes the one-time
costs of the process (shared by all variants) out of the first round.

Timing is interleaved: for each block count, every one of ``--repeats`` rounds measures
each variant once (the starting variant rotates per round) and divides each total by
dense's total of the same round. Tables report the median of these ratios and the
median seconds. "Growth of the ratio" is a method's ratio at the largest block count
divided by its ratio at the smallest (1.0: the method's extra cost scales like dense's).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import shlex
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from models import D_MODEL, GPT, HEADS, MLP_WIDTH, SEQ, VOCAB, next_token_batch
import optax

import sparsejax as sj

METHODS = ("static", "rigl", "rigl_scheduled", "dst")
BATCH = 8
PIECES = ("init", "compile", "run")


def make_tx(method: str) -> optax.GradientTransformation:
  """A fresh optimizer of one variant: "dense" or a name in :data:`METHODS`."""
  inner = optax.adam(1e-3)
  if method == "dense":
    return inner
  if method == "static":
    return sj.static_sparse(inner, sparsity=0.9, distribution="erk")
  if method in ("rigl", "rigl_scheduled"):
    return sj.rigl(inner, sparsity=0.9, distribution="erk", update_every=100, end_step=10_000)
  if method == "dst":
    return sj.dst(inner, alpha=5e-4)
  raise ValueError(f"unknown method {method!r}; expected 'dense' or one of {METHODS}")


def make_step(model: nn.Module, tx: optax.GradientTransformation,
              mask_update: bool | None = None) -> Callable[..., Any]:
  """A new jitted train step ``(params, opt_state, x, y) -> (params, opt_state, loss)``;
  ``mask_update`` is passed to ``tx.update`` unless it is None."""
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    extra_args = {} if mask_update is None else {"mask_update": mask_update}
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def measure(method: str, model: nn.Module, params: Any, x: jax.Array, y: jax.Array
            ) -> tuple[dict[str, float], Any]:
  """Builds one variant from scratch and times its way to the first finished step.

  Returns:
    ``({"init", "compile", "run", "total", "deferred"}: seconds, opt_state after init)``.
  """
  params = jax.block_until_ready(jax.tree.map(jnp.copy, params))  # the step donates them
  tx = make_tx(method)
  scheduled = method.endswith("_scheduled")
  step = make_step(model, tx, mask_update=False if scheduled else None)
  t0 = time.perf_counter()
  opt_state = jax.block_until_ready(tx.init(params))
  t1 = time.perf_counter()
  compiled = step.lower(params, opt_state, x, y).compile()
  t2 = time.perf_counter()
  summary = sj.summary(opt_state) if method != "dense" else None  # before donation
  deferred = 0.0
  if scheduled:  # the update step, compiled at the first mask update (not in the total)
    t4 = time.perf_counter()
    make_step(model, tx, mask_update=True).lower(params, opt_state, x, y).compile()
    deferred = time.perf_counter() - t4
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(params, opt_state, x, y))
  t5 = time.perf_counter()
  times = {"init": t1 - t0, "compile": t2 - t1, "run": t5 - t3}
  times["total"] = sum(times.values())
  times["deferred"] = deferred
  return times, summary


def bench_blocks(blocks: int, variants: Sequence[str], repeats: int, warmup: bool
                 ) -> dict[str, Any]:
  """Interleaved measurements of every variant on the model with ``blocks`` blocks.

  Returns:
    ``{"leaves", "masked", "ratio": {variant: median ratio}, "s": {variant: {piece: median
    seconds}}}``; "masked" is the masked-leaf count of the first sparse variant.
  """
  model = GPT(blocks)
  kt, kp = jax.random.split(jax.random.PRNGKey(0))
  x, y = next_token_batch(kt, BATCH)
  params = model.init(kp, x)["params"]
  masked: dict[str, int] = {}
  if warmup:
    for v in variants:
      measure(v, model, params, x, y)
  runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
  ratios: dict[str, list[float]] = {v: [] for v in variants}
  for r in range(repeats):
    order = list(variants[r % len(variants):]) + list(variants[:r % len(variants)])
    for v in order:
      times, summary = measure(v, model, params, x, y)
      runs[v].append(times)
      if summary is not None:
        masked[v] = len(summary["layers"])
    for v in variants:
      ratios[v].append(runs[v][-1]["total"] / runs["dense"][-1]["total"])
  sparse = [v for v in variants if v != "dense"]
  return {"leaves": len(jax.tree.leaves(params)),
          "masked": masked[sparse[0]] if sparse else 0,
          "masked_all": masked,
          "ratio": {v: statistics.median(ratios[v]) for v in variants},
          "s": {v: {p: statistics.median(t[p] for t in runs[v])
                    for p in (*PIECES, "total", "deferred")}
                for v in variants}}


def main(argv: Sequence[str] | None = None) -> None:
  """Parses flags, runs the benchmark and prints Markdown tables."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--blocks", default="2,6,12,24", help="comma-separated block counts")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of {','.join(METHODS)}")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
  parser.add_argument("--quick", action="store_true",
                      help="blocks 2,6 and one round: only checks that the script runs")
  args = parser.parse_args(argv)
  blocks = [2, 6] if args.quick else sorted(int(b) for b in args.blocks.split(",") if b)
  repeats = 1 if args.quick else args.repeats
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      parser.error(f"unknown method {m!r}; expected one of {list(METHODS)}")
  variants = ["dense", *methods]
  # Off by default; make sure an environment variable did not turn it on.
  jax.config.update("jax_enable_compilation_cache", False)

  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"command: `{command}`")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"GPT d_model {D_MODEL}, {HEADS} heads, MLP {MLP_WIDTH}, vocab {VOCAB}, seq {SEQ}, "
        f"batch {BATCH}; optax.adam(1e-3), sparsity 0.9 erk; persistent compilation cache "
        f"enabled={jax.config.jax_enable_compilation_cache} "
        f"dir={jax.config.jax_compilation_cache_dir}; {repeats} rounds, median of per-round "
        f"ratios")
  start = time.perf_counter()
  results = {b: bench_blocks(b, variants, repeats, warmup=i == 0) for i, b in enumerate(blocks)}

  print()
  print("| blocks | leaves | masked leaves | dense first step (s) | "
        + " | ".join(f"{m} ÷ dense" for m in methods) + " |")
  print("|---|---|---|---|" + "---|" * len(methods))
  for b, res in results.items():
    cells = " | ".join(f"{res['ratio'][m]:.2f} ({res['s'][m]['total']:.2f} s)" for m in methods)
    print(f"| {b} | {res['leaves']} | {res['masked']} | {res['s']['dense']['total']:.2f} "
          f"| {cells} |")
  print()
  print("Cells: median over rounds of (variant total / dense total) in the same round; in "
        "parentheses the variant's median total. Masked leaves: entries of "
        "`sj.summary(opt_state)['layers']` (" + ", ".join(
            f"{m} {results[blocks[-1]]['masked_all'][m]}" for m in methods)
        + f" at {blocks[-1]} blocks).")
  print()
  print("| blocks | variant | init (s) | compile (s) | run (s) | total (s) | deferred (s) |")
  print("|---|---|---|---|---|---|---|")
  for b, res in results.items():
    for v in variants:
      s = res["s"][v]
      deferred = f"{s['deferred']:.2f}" if v.endswith("_scheduled") else "—"
      print(f"| {b} | {v} | {s['init']:.2f} | {s['compile']:.2f} | {s['run']:.3f} "
            f"| {s['total']:.2f} | {deferred} |")
  print()
  if len(blocks) > 1:
    growth = ", ".join(f"{m} {results[blocks[-1]]['ratio'][m] / results[blocks[0]]['ratio'][m]:.2f}"
                       for m in methods)
    print(f"growth of the ratio, {blocks[-1]} vs {blocks[0]} blocks (flat = 1.00): {growth}")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
