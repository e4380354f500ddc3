"""Step-time overhead of sparsejax methods relative to dense training.

Run::

  python benchmarks/overhead.py [--models lenet,mlp1024,gpt] \
      [--methods static,set,rigl,dst_ee,gse,gse_grabo,gmp,dst] \
      [--repeats 7] [--calls 5] [--sparsity 0.9]

Models (flax.linen, ``benchmarks/models.py``), trained with ``optax.adam(1e-3)`` on one
fixed random batch kept on device:

- ``lenet``: LeNet-300-100, a 784-300-100-10 ReLU MLP, batch 256;
- ``mlp1024``: a 784-1024-1024-1024-10 ReLU MLP, batch 256;
- ``gpt``: ``models.GPT`` with 6 blocks (d_model 128, 4 heads, MLP 512, vocab 512;
  102 leaves, 37 of them masked kernels), next-token cross-entropy on 8 sequences of 64
  tokens: many small leaves, attention kernels with a heads axis.

Each variant is one jitted train step -- ``value_and_grad`` of the softmax
cross-entropy, ``tx.update`` and ``optax.apply_updates`` -- with params and
optimizer state donated. Every timed call is followed by ``block_until_ready``;
nothing inside the step syncs with the host.

Non-update and mask-update steps are timed separately by building each method twice:

- **non-update step**: ``update_every=10**8, end_step=10**9``, so no mask update
  falls in the timed window (GMP also prunes at step 1; that step is part of the
  warm-up). The step still carries the wrapper's ``lax.cond``, masking and
  ``where``s, which is the overhead paid on the ~99 % of steps that do not rewire.
- **host-scheduled non-update step**: the same, with ``mask_update=False`` passed to
  ``tx.update`` (what a loop that knows its step passes where ``tx.is_update_step``
  is False, as the runner does): the compiled step holds no mask-update code.
- **update step**: ``update_every=1, end_step=10**9``, so every step is a mask
  update (drop/grow or prune selection, inner-state reset), timed twice: compiled with
  ``mask_update=True`` (what a loop that knows its step passes where
  ``tx.is_update_step`` is True, as the runner does: no ``lax.cond``, no selects over
  the optimizer state), and as the step that checks its schedule. For SET, RigL and
  DST-EE (here with RigL's drop fraction 0.3, its acquisition score at c = 1e-2) and
  GSE (uniform sampling, ``gse``, or GraBo with the statistics computed in the update
  step, ``gse_grabo``; growth fraction 0.15, so α starts at 0.3; global scope) the
  drop fraction stays ≈ 0.3 (its cosine decay to ``end_step`` barely starts); for
  GMP the cubic schedule barely starts either, so masks stay nearly dense -- the
  cost of the exact top-k selection does not depend on k.

Static sparse training has no update step ("—").

Timing is interleaved in one process: every round runs ``--calls`` steps of each
variant in turn (dense, method 1 non-update, method 1 update, ...; the starting
variant rotates per round), takes the median call time of each variant in the
round and divides it by the dense median of the same round. The table reports the
median of these per-round ratios over ``--repeats`` rounds, which cancels most of
the drift of a shared, noisy machine. All variants are compiled and warmed up
before the first round.

A second table gives the minor page faults per timed step. XLA:CPU allocates an
executable's temporaries afresh at every call; when they exceed glibc's mmap
threshold (at most 32 MiB) they are mmapped and unmapped each step, and every first
touch of a page faults. A dense or static step updates params and optimizer state in
place (no large temporaries); the ``lax.cond`` of the dynamic methods makes XLA copy
and materialise the state (~70 MiB of temporaries on the 1024 MLP), so their steps
fault ~14k times. To measure them without that allocator effect, run with::

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295 \
      python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import os
import resource
import shlex
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from models import GPT, MLP, SEQ, next_token_batch
import optax

import sparsejax as sj

BATCH = 256  # MLP inputs
IN_FEATURES = 784
GPT_BLOCKS, GPT_BATCH = 6, 8  # sequences of models.SEQ tokens
Problem = tuple[nn.Module, jax.Array, jax.Array]  # model, inputs, integer targets


def mlp_problem(features: Sequence[int]) -> Callable[[jax.Array], Problem]:
  """An MLP on one random batch of :data:`BATCH` inputs of :data:`IN_FEATURES` features."""
  def build(key: jax.Array) -> Problem:
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (BATCH, IN_FEATURES), jnp.float32)
    return MLP(features), x, jax.random.randint(ky, (BATCH,), 0, features[-1])
  return build


def gpt_problem(key: jax.Array) -> Problem:
  """``models.GPT`` with :data:`GPT_BLOCKS` blocks on :data:`GPT_BATCH` random sequences."""
  return GPT(GPT_BLOCKS), *next_token_batch(key, GPT_BATCH)


MODELS = {
    "lenet": ("LeNet-300-100", mlp_problem((300, 100, 10))),
    "mlp1024": ("1024-1024-1024-10", mlp_problem((1024, 1024, 1024, 10))),
    "gpt": (f"GPT, {GPT_BLOCKS} blocks", gpt_problem),
}
METHODS = ("static", "set", "rigl", "dst_ee", "gse", "gse_grabo", "gmp", "dst")
NO_UPDATE_STEP = ("static", "dst")  # static never rewires; DST updates its masks every step
NEVER = 10**8  # update_every that keeps mask updates out of the timed window
END_STEP = 10**9


def make_tx(method: str, update_every: int | None, sparsity: float
            ) -> optax.GradientTransformation:
  """The optimizer of one variant.

  Args:
    method: "dense" or a name in :data:`METHODS`.
    update_every: steps between mask updates (ignored by dense and static).
    sparsity: target sparsity of the sparse methods.

  Returns:
    ``optax.adam(1e-3)``, wrapped by the method unless it is "dense".
  """
  inner = optax.adam(1e-3)
  if method == "dense":
    return inner
  if method == "static":
    return sj.static_sparse(inner, sparsity=sparsity, distribution="erk")
  if method == "dst":
    return sj.dst(inner, alpha=5e-4)
  if method in ("set", "rigl", "dst_ee"):
    factory = {"set": sj.set, "rigl": sj.rigl, "dst_ee": sj.dst_ee}[method]
    return factory(inner, sparsity=sparsity, distribution="erk", update_every=update_every,
                   end_step=END_STEP, drop_fraction=0.3)
  if method in ("gse", "gse_grabo"):
    return sj.gse(inner, sparsity=sparsity, distribution="erk", update_every=update_every,
                  end_step=END_STEP, growth_fraction=0.15,
                  sampling="grabo" if method == "gse_grabo" else "uniform")
  if method == "gmp":
    return sj.gmp(inner, sparsity=sparsity, update_every=update_every, start_step=0,
                  end_step=END_STEP)
  raise ValueError(f"unknown method {method!r}; expected 'dense' or one of {METHODS}")


def make_step(model: nn.Module, tx: optax.GradientTransformation, statistics: str | None = None,
              mask_update: bool | None = None) -> Callable[..., Any]:
  """A jitted train step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

  Params and optimizer state are donated. With ``statistics`` (GSE's GraBo), the step
  computes the layers' statistics (:func:`sparsejax.value_grad_and_statistics`) and
  passes them to ``tx.update``, as at a mask update; "none" passes
  ``layer_statistics=None``, as on the other steps. ``mask_update`` is passed to
  ``tx.update`` unless it is None.
  """
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    extra_args = {} if mask_update is None else {"mask_update": mask_update}
    if statistics in (None, "none"):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      if statistics == "none":
        extra_args["layer_statistics"] = None
    else:
      loss, grads, extra_args["layer_statistics"] = sj.value_grad_and_statistics(
          loss_fn, params, x, y, sampling=statistics)
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class Variant:
  """One timed configuration: a compiled step and the state it carries between calls."""

  def __init__(self, name: str, kind: str, model: nn.Module, tx: optax.GradientTransformation,
               params: Any, x: jax.Array, y: jax.Array, statistics: str | None = None,
               mask_update: bool | None = None):
    self.name, self.kind = name, kind
    self.step = make_step(model, tx, statistics, mask_update)
    # Own copies: the step donates its arguments.
    self.params = jax.tree.map(jnp.copy, params)
    self.opt_state = tx.init(self.params)
    self.x, self.y = x, y
    self.round_ms: list[float] = []
    self.faults = 0  # minor page faults during timed calls
    self.timed_calls = 0

  def call(self, timed: bool = True) -> float:
    """Runs one step to completion; returns its wall time in ms."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.x, self.y)
    jax.block_until_ready((self.params, self.opt_state, loss))
    elapsed = (time.perf_counter() - start) * 1e3
    if timed:
      self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
      self.timed_calls += 1
    return elapsed


def bench_model(model_key: str, methods: Sequence[str], repeats: int, calls: int, warmup: int,
                sparsity: float) -> dict[tuple[str, str], dict[str, float]]:
  """Times dense and every method's non-update/update steps on one model.

  Returns:
    ``{(method, kind): {"ratio": median per-round ratio to dense, "ms": median ms,
    "faults": minor page faults per timed step}}`` with kind "train" (non-update
    step), "scheduled" (non-update step with ``mask_update=False``), "update"
    (``mask_update=True``) or "checked_update" (update step with the ``lax.cond``);
    dense is ``("dense", "train")``.
  """
  key, kp = jax.random.split(jax.random.PRNGKey(0))
  model, x, y = MODELS[model_key][1](key)
  params = model.init(kp, x)["params"]

  variants = [Variant("dense", "train", model, make_tx("dense", None, sparsity), params, x, y)]
  for method in methods:
    guided = method == "gse_grabo"  # statistics at the update step only
    variants.append(Variant(method, "train", model, make_tx(method, NEVER, sparsity),
                            params, x, y, "none" if guided else None))
    if method not in NO_UPDATE_STEP:
      variants.append(Variant(method, "scheduled", model, make_tx(method, NEVER, sparsity),
                              params, x, y, "none" if guided else None, mask_update=False))
      variants.append(Variant(method, "update", model, make_tx(method, 1, sparsity),
                              params, x, y, "grabo" if guided else None, mask_update=True))
      variants.append(Variant(method, "checked_update", model, make_tx(method, 1, sparsity),
                              params, x, y, "grabo" if guided else None))
  for v in variants:  # compile, and run GMP's step-1 pruning outside the timed window
    for _ in range(warmup):
      v.call(timed=False)

  ratios: dict[tuple[str, str], list[float]] = {(v.name, v.kind): [] for v in variants}
  for r in range(repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      v.round_ms.append(statistics.median(v.call() for _ in range(calls)))
    dense_ms = variants[0].round_ms[-1]
    for v in variants:
      ratios[(v.name, v.kind)].append(v.round_ms[-1] / dense_ms)
  return {(v.name, v.kind): {"ratio": statistics.median(ratios[(v.name, v.kind)]),
                             "ms": statistics.median(v.round_ms),
                             "faults": v.faults / max(v.timed_calls, 1)} for v in variants}


def _cell(result: dict[str, float] | None, goal: float) -> str:
  if result is None:
    return "—"
  mark = "✓" if result["ratio"] <= goal else "✗"
  return f"{result['ratio']:.2f} {mark} ({result['ms']:.2f} ms)"


def main(argv: Sequence[str] | None = None) -> None:
  """Parses flags, runs the benchmark and prints a Markdown table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="lenet,mlp1024,gpt",
                      help=f"comma-separated subset of {','.join(MODELS)}")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of {','.join(METHODS)}")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
  parser.add_argument("--calls", type=int, default=5, help="timed steps per variant and round")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
  parser.add_argument("--sparsity", type=float, default=0.9)
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  methods = [m for m in args.methods.split(",") if m]
  for m in models:
    if m not in MODELS:
      parser.error(f"unknown model {m!r}; expected one of {list(MODELS)}")
  for m in methods:
    if m not in METHODS:
      parser.error(f"unknown method {m!r}; expected one of {list(METHODS)}")
  if args.warmup < 2:
    parser.error("--warmup must be >= 2 (compilation, then GMP's step-1 pruning)")

  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"command: `{command}`")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"optax.adam(1e-3), batch {BATCH} (GPT: {GPT_BATCH} x {SEQ} tokens), "
        f"sparsity {args.sparsity} "
        f"(erk for set/rigl/dst_ee/gse/static, "
        f"uniform for gmp); {args.repeats} rounds x {args.calls} calls, median of per-round "
        f"ratios")
  malloc_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
  print(f"malloc environment: {malloc_env or 'glibc defaults'}")
  start = time.perf_counter()
  results = {m: bench_model(m, methods, args.repeats, args.calls, args.warmup, args.sparsity)
             for m in models}

  print()
  print("| model | method | non-update step / dense (goal ≤ 1.03; DST ≤ 1.25) "
        "| the same, `mask_update=False` | update step, `mask_update=True` / dense (goal ≤ 2) "
        "| the same, checked |")
  # DST has no separate update step: its whole per-step cost is the first column.
  print("|---|---|---|---|---|---|")
  for m in models:
    res = results[m]
    name = MODELS[m][0]
    print(f"| {name} | dense | 1.00 ({res[('dense', 'train')]['ms']:.2f} ms) | — | — | — |")
    for method in methods:
      goal = 1.25 if method == "dst" else 1.03
      print(f"| {name} | {method} | {_cell(res[(method, 'train')], goal)} "
            f"| {_cell(res.get((method, 'scheduled')), 1.03)} "
            f"| {_cell(res.get((method, 'update')), 2.0)} "
            f"| {_cell(res.get((method, 'checked_update')), 2.0)} |")
  print()
  print("Cells: median over rounds of (variant median ms / dense median ms) in the same round; "
        "in parentheses the variant's median step time.")
  print()
  print("| model | method | minor page faults / non-update step | the same, "
        "`mask_update=False` | minor page faults / update step, `mask_update=True` "
        "| the same, checked |")
  print("|---|---|---|---|---|---|")
  for m in models:
    res = results[m]
    for method in ["dense", *methods]:
      cells = [res.get((method, kind))
               for kind in ("train", "scheduled", "update", "checked_update")]
      cells = ["—" if cell is None else f"{cell['faults']:.0f}" for cell in cells]
      print(f"| {MODELS[m][0]} | {method} | {' | '.join(cells)} |")
  print()
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
