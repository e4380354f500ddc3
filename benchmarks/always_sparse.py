"""Step time and memory of the always-sparse layers (sparsejax.nn) against dense layers.

Run::

  .venv/bin/python benchmarks/always_sparse.py [--part=ratios|sweep|order|all] [--repeats=5] \
      [--calls=3] [--warmup=2]

Model: a flax.linen ReLU MLP 784 → width → width → 10, every layer
``sparsejax.nn.layers.SparseDense`` (sparse) or ``nn.Dense`` (dense), trained with
``optax.sgd(0.1, momentum=0.9)`` on one fixed random batch of 128 kept on device; the
sparse optimizer is ``sparsejax.nn.growth.gse`` around it (uniform sampling, γ = 1).
A variant is one jitted step -- ``value_and_grad`` of the softmax cross-entropy,
``tx.update``, ``optax.apply_updates`` -- with params, optimizer state and batch passed
as arguments and params and state donated; it is lowered and compiled ahead of time
and every call ends with ``block_until_ready``. The kernels walk each layer's
connections in its ``order`` (tiles of outputs, by input within a tile), which
rewiring keeps sorted, so a long-trained topology runs like a fresh one.

Parts:

- ``ratios``: at widths 4096 and 8192, all three layers at 99 % and 99.9 % sparsity.
  The **train step** is GSE's non-update step (``update_every=10**8``: no rewiring in
  the timed window, the ``lax.cond`` is still there); the **growth step** uses
  ``update_every=1``, so every step scores candidates and rewires every layer.
  Both are divided by the dense step of the same round.
- ``sweep``: ``SparseDense(width, fan_in=32)`` for every layer at hidden widths 1024
  to 32768 (connections ∝ width), train step only, and the dense MLP where affordable
  (timed up to ``--dense-time-max``, memory up to ``--dense-memory-max`` from shapes
  only, nothing allocated). Slopes are least squares of log time (memory) on log width.

- ``order``: one layer's forward and backward with its connections walked by input,
  by output, in random order and in the order the layers use (tiles of outputs, by
  input within a tile), at 784 → 32768 and 32768² (fan-in 32) and 8192² at 99 %.

Timing is interleaved in one process: every round runs ``--calls`` steps of each
variant of a group (one width of ``ratios``; all of ``sweep``) in turn, the starting
variant rotating per round, and keeps each variant's median call. Ratios are the
median over rounds of the per-round ratio to dense; times the median over rounds.

Memory is XLA's accounting of the compiled step (``compiled.memory_analysis()``):
arguments + outputs + temporaries − donated (aliased) outputs, i.e. the live bytes of
one step with params and state updated in place.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import math
import shlex
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.nn import growth, layers

IN_FEATURES, OUT_FEATURES = 784, 10
NEVER = 10**8  # update_every of the train step: no rewiring in the timed window
END_STEP = 10**9
GOALS = {0.99: 0.5, 0.999: 0.1}  # train step ÷ dense step
SLOPE_GOAL = 1.1
MIB = 2**20


class MLP(nn.Module):
  """784 → width → width → 10 with ReLU; SparseDense layers if sparsity or fan_in is set."""
  width: int
  sparsity: float | None = None
  fan_in: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def layer(features: int) -> nn.Module:
      if self.sparsity is None and self.fan_in is None:
        return nn.Dense(features)
      return layers.SparseDense(features, sparsity=self.sparsity, fan_in=self.fan_in)

    x = nn.relu(layer(self.width)(x))
    x = nn.relu(layer(self.width)(x))
    return layer(OUT_FEATURES)(x)

  @property
  def sparse(self) -> bool:
    return self.sparsity is not None or self.fan_in is not None


def make_tx(model: MLP, topology: Any, update_every: int) -> optax.GradientTransformation:
  """SGD with momentum; wrapped by always-sparse GSE for a sparse model."""
  inner = optax.sgd(0.1, momentum=0.9)
  if not model.sparse:
    return inner
  return growth.gse(inner, topology=topology, end_step=END_STEP, update_every=update_every)


def make_step(model: MLP, tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The train step ``(params, state, x, y) -> (params, state, loss)``, not jitted."""
  def step(params, state, x, y):
    def loss_fn(p):
      variables = {"params": p}
      if model.sparse:
        variables["topology"] = growth.topology(state)
      logits = model.apply(variables, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def live_bytes(compiled: Any) -> float:
  """Arguments + outputs + temporaries − aliased bytes of a compiled step."""
  stats = compiled.memory_analysis()
  try:
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  except AttributeError:
    print(f"memory_analysis() has no expected field; it returned: {stats!r}")
    return math.nan


def connections(params: Any) -> int:
  """Number of weights: the sparse layers' ``values``, or the dense kernels' entries."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(math.prod(leaf.shape) for path, leaf in flat
             if getattr(path[-1], "key", None) in ("values", "kernel"))


class Variant:
  """One timed configuration: a compiled step and the state it carries between calls."""

  def __init__(self, name: str, model: MLP, x: jax.Array, y: jax.Array,
               update_every: int = NEVER):
    self.name, self.model = name, model
    start = time.perf_counter()
    variables = jax.block_until_ready(jax.jit(model.init)(jax.random.PRNGKey(0), x))
    tx = make_tx(model, variables.get("topology"), update_every)
    state = jax.block_until_ready(jax.jit(tx.init)(variables["params"]))
    # Own copies of every buffer: the step donates params and state.
    self.params, self.state = jax.tree.map(jnp.copy, (variables["params"], state))
    del variables, state
    self.init_s = time.perf_counter() - start
    self.nnz = connections(self.params)
    start = time.perf_counter()
    self.step = jax.jit(make_step(model, tx), donate_argnums=(0, 1)).lower(
        self.params, self.state, x, y).compile()
    self.compile_s = time.perf_counter() - start
    self.bytes = live_bytes(self.step)
    self.x, self.y = x, y
    self.round_ms: list[float] = []
    self.ratios: list[float] = []
    self.rewired = "—"

  def call(self) -> float:
    """Runs one step to completion; returns its wall time in ms."""
    start = time.perf_counter()
    self.params, self.state, loss = self.step(self.params, self.state, self.x, self.y)
    jax.block_until_ready((self.params, self.state, loss))
    return (time.perf_counter() - start) * 1e3

  @property
  def ms(self) -> float:
    return statistics.median(self.round_ms)

  @property
  def ratio(self) -> float:
    return statistics.median(self.ratios)

  def release(self) -> None:
    """Records the growth bookkeeping, then frees params and state."""
    if isinstance(self.state, growth.AlwaysSparseState):
      self.rewired = (f"{int(self.state.rewired):,} connections moved at the last step, "
                      f"{int(self.state.nonfinite_updates)} updates skipped as non-finite")
    self.params = self.state = self.step = None


def run_rounds(variants: Sequence[Variant], dense: Variant | None, repeats: int, calls: int,
               warmup: int) -> None:
  """Warms up, then times ``variants`` interleaved; fills ``round_ms`` and ``ratios``."""
  for v in variants:
    for _ in range(warmup):
      v.call()
  for r in range(repeats):
    shift = r % len(variants)
    for v in [*variants[shift:], *variants[:shift]]:
      v.round_ms.append(statistics.median(v.call() for _ in range(calls)))
    if dense is not None:
      for v in variants:
        v.ratios.append(v.round_ms[-1] / dense.round_ms[-1])
  for v in variants:
    v.release()


def batch(size: int) -> tuple[jax.Array, jax.Array]:
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  return (jax.random.normal(kx, (size, IN_FEATURES), jnp.float32),
          jax.random.randint(ky, (size,), 0, OUT_FEATURES))


def log(message: str) -> None:
  print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def part_ratios(args: argparse.Namespace, setup: list[Variant]) -> None:
  """Sparse ÷ dense step time and memory at fixed sparsities; prints a table."""
  x, y = batch(args.batch)
  rows = []
  for width in args.widths:
    log(f"ratios: width {width}")
    dense = Variant(f"dense {width}", MLP(width), x, y)
    group = [dense]
    for sparsity in args.sparsities:
      model = MLP(width, sparsity=sparsity)
      group.append(Variant(f"sparse {width} @ {sparsity:g} train", model, x, y))
      group.append(Variant(f"sparse {width} @ {sparsity:g} growth", model, x, y, update_every=1))
    setup.extend(group)
    run_rounds(group, dense, args.repeats, args.calls, args.warmup)
    for i, sparsity in enumerate(args.sparsities):
      rows.append((width, sparsity, dense, group[1 + 2 * i], group[2 + 2 * i]))

  print()
  print("| width | sparsity | connections | dense step | sparse train step | "
        "train ÷ dense | sparse growth step | growth ÷ dense | dense memory | "
        "sparse memory (train / growth) | memory sparse ÷ dense (train / growth) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for width, sparsity, dense, train, grow in rows:
    goal = GOALS.get(sparsity)
    mark = "" if goal is None else (f" ✓ (≤ {goal:g})" if train.ratio <= goal
                                    else f" ✗ (goal ≤ {goal:g})")
    print(f"| {width} | {sparsity:.1%} | {train.nnz:,} / {dense.nnz:,} | {dense.ms:.1f} ms "
          f"| {train.ms:.2f} ms | {train.ratio:.3f}{mark} | {grow.ms:.2f} ms | {grow.ratio:.3f} "
          f"| {dense.bytes / MIB:.1f} MiB | {train.bytes / MIB:.1f} / {grow.bytes / MIB:.1f} MiB "
          f"| {train.bytes / dense.bytes:.3f} / {grow.bytes / dense.bytes:.3f} |")
  print()
  print("Times: median over rounds of each variant's median step; ratios: median over rounds "
        "of the per-round ratio to the dense step of the same width. Growth steps rewire "
        "every layer at every step; after timing they report: "
        + "; ".join(f"{grow.name}: {grow.rewired}" for *_, grow in rows) + ".")


def slope(widths: Sequence[int], values: Sequence[float]) -> float:
  """Least-squares slope of log(value) on log(width); nan with fewer than two points."""
  if len(widths) < 2:
    return math.nan
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def dense_bytes_from_shapes(width: int, x: jax.Array, y: jax.Array) -> tuple[float, float]:
  """Live bytes of the dense step at ``width`` and its compile time, nothing allocated."""
  start = time.perf_counter()
  model = MLP(width)
  tx = make_tx(model, None, NEVER)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(make_step(model, tx), donate_argnums=(0, 1)).lower(
      params, state, jax.ShapeDtypeStruct(x.shape, x.dtype),
      jax.ShapeDtypeStruct(y.shape, y.dtype)).compile()
  return live_bytes(compiled), time.perf_counter() - start


def part_sweep(args: argparse.Namespace, setup: list[Variant]) -> None:
  """Sparse (fixed fan-in) and dense step time and memory against width; prints a table."""
  x, y = batch(args.batch)
  sparse, dense = {}, {}
  for width in args.sweep_widths:
    log(f"sweep: sparse width {width}")
    sparse[width] = Variant(f"sparse {width} fan-in {args.fan_in}",
                            MLP(width, fan_in=args.fan_in), x, y)
    if width <= args.dense_time_max:
      log(f"sweep: dense width {width}")
      dense[width] = Variant(f"dense {width}", MLP(width), x, y)
  setup.extend([*sparse.values(), *dense.values()])
  dense_memory = {w: v.bytes for w, v in dense.items()}
  for width in args.sweep_widths:
    if width not in dense and width <= args.dense_memory_max:
      log(f"sweep: dense width {width}, memory from shapes")
      dense_memory[width], seconds = dense_bytes_from_shapes(width, x, y)
      log(f"sweep: dense width {width} compiled in {seconds:.1f} s")
  log("sweep: timing")
  run_rounds([*sparse.values(), *dense.values()], None, args.repeats, args.calls, args.warmup)

  print()
  print(f"| hidden width | sparse connections (fan-in {args.fan_in}) | sparse step "
        "| sparse memory | dense step | dense memory | sparse ÷ dense time "
        "| sparse ÷ dense memory |")
  print("|---|---|---|---|---|---|---|---|")
  for width, s in sparse.items():
    d = dense.get(width)
    d_bytes = dense_memory.get(width)
    print(f"| {width} | {s.nnz:,} | {s.ms:.2f} ms | {s.bytes / MIB:.1f} MiB "
          f"| {'—' if d is None else f'{d.ms:.1f} ms'} "
          f"| {'—' if d_bytes is None else f'{d_bytes / MIB:.0f} MiB'} "
          f"| {'—' if d is None else f'{s.ms / d.ms:.3f}'} "
          f"| {'—' if d_bytes is None else f'{s.bytes / d_bytes:.4f}'} |")
  s_time = slope(list(sparse), [v.ms for v in sparse.values()])
  s_mem = slope(list(sparse), [v.bytes for v in sparse.values()])
  d_time = slope(list(dense), [v.ms for v in dense.values()])
  d_mem = slope(list(dense_memory), list(dense_memory.values()))

  def check(value: float) -> str:
    return "" if math.isnan(value) else "✓" if value <= SLOPE_GOAL else "✗"

  widths = list(sparse)
  upper = widths[len(widths) // 2:]
  print(f"| **log-log slope** | | **{s_time:.2f}** {check(s_time)} | **{s_mem:.2f}** "
        f"{check(s_mem)} | {_number(d_time)} | {_number(d_mem)} | | |")
  print()
  print(f"Slopes: least squares of log time (memory) on log width; sparse over "
        f"{widths[0]}–{widths[-1]} (goal ≤ {SLOPE_GOAL}; over {upper[0]}–{upper[-1]} only: time "
        f"{slope(upper, [sparse[w].ms for w in upper]):.2f}, memory "
        f"{slope(upper, [sparse[w].bytes for w in upper]):.2f}), dense time over "
        f"{_span(dense)}, dense memory over {_span(dense_memory)} (untimed widths compiled "
        "from shapes only, nothing allocated).")


ORDER_LAYERS = ((784, 32768, 32 * 32768), (8192, 8192, 671_089), (32768, 32768, 32 * 32768))


def part_order(args: argparse.Namespace) -> None:
  """One layer's forward and backward (``sparse_matmul``) with its connections walked by
  input, by output and in random order (where rewiring leaves the slots): what
  :func:`sparsejax.nn.connections.connection_order` chooses from."""
  from sparsejax.nn import connections, kernels  # pylint: disable=g-import-not-at-top

  print()
  print("| layer | connections | by input | by output | random order "
        f"| tiles of {connections.ORDER_TILE} outputs, by input (used) |")
  print("|---|---|---|---|---|---|")
  for fan_in, fan_out, nnz in ORDER_LAYERS:
    log(f"order: {fan_in} x {fan_out}")
    rows, cols = connections.random_connections(jax.random.PRNGKey(0), nnz, fan_in, fan_out)
    by_output = jnp.asarray(np.lexsort((np.asarray(rows), np.asarray(cols))), jnp.int32)
    orders = {"by input": jnp.arange(nnz, dtype=jnp.int32), "by output": by_output,
              "random order": jax.random.permutation(jax.random.PRNGKey(1), nnz),
              "tiles of outputs by input (used)": connections.connection_order(
                  rows, cols, fan_in, fan_out)}
    x = jax.random.normal(jax.random.PRNGKey(2), (args.batch, fan_in))
    values = jax.random.normal(jax.random.PRNGKey(3), (nnz,))

    @jax.jit
    def step(x, values, rows, cols, order, fan_out=fan_out):
      def loss(x, values):
        return jnp.sum(kernels.sparse_matmul(x, values[order], rows[order], cols[order],
                                             fan_out) ** 2)
      return jax.grad(loss, (0, 1))(x, values)

    times = {name: [] for name in orders}
    for order in orders.values():  # compile and warm up
      jax.block_until_ready(step(x, values, rows, cols, order))
    for round_ in range(args.repeats):
      names = list(orders)[round_ % len(orders):] + list(orders)[:round_ % len(orders)]
      for name in names:
        start = time.perf_counter()
        for _ in range(args.calls):
          out = step(x, values, rows, cols, orders[name])
        jax.block_until_ready(out)
        times[name].append((time.perf_counter() - start) / args.calls)
    cells = " | ".join(f"{statistics.median(times[n]) * 1e3:.1f} ms" for n in orders)
    print(f"| {fan_in} → {fan_out} | {nnz:,} | {cells} |")
  print()
  print("Median over rounds of the mean of each round's calls; batch "
        f"{args.batch}, float32.")


def _number(value: float) -> str:
  return "—" if math.isnan(value) else f"{value:.2f}"


def _span(widths: Any) -> str:
  return f"{min(widths)}–{max(widths)}" if widths else "—"


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t]


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t]


def main(argv: Sequence[str] | None = None) -> None:
  """Parses flags, runs the selected parts and prints Markdown tables."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("ratios", "sweep", "order", "all"), default="all")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
  parser.add_argument("--calls", type=int, default=3, help="timed steps per variant and round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--widths", type=_ints, default=[4096, 8192], help="ratios: hidden widths")
  parser.add_argument("--sparsities", type=_floats, default=[0.99, 0.999],
                      help="ratios: sparsity of every layer")
  parser.add_argument("--sweep-widths", type=_ints,
                      default=[1024, 2048, 4096, 8192, 16384, 32768], help="sweep: hidden widths")
  parser.add_argument("--fan-in", type=int, default=32, help="sweep: connections per output")
  parser.add_argument("--dense-time-max", type=int, default=8192,
                      help="sweep: widest dense MLP timed")
  parser.add_argument("--dense-memory-max", type=int, default=32768,
                      help="sweep: widest dense MLP whose memory is compiled from shapes")
  args = parser.parse_args(argv)
  if min(args.repeats, args.calls) < 1 or args.warmup < 0:
    parser.error("--repeats and --calls must be >= 1, --warmup >= 0")

  command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"command: `{command}`")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"MLP 784-w-w-10, batch {args.batch}, optax.sgd(0.1, momentum=0.9), sparse: "
        f"sparsejax.nn.growth.gse (uniform sampling, candidates γ = 1); {args.repeats} rounds "
        f"x {args.calls} calls after {args.warmup} warm-up steps")
  start = time.perf_counter()
  setup: list[Variant] = []
  if args.part in ("ratios", "all"):
    part_ratios(args, setup)
  if args.part in ("sweep", "all"):
    part_sweep(args, setup)
  if args.part in ("order", "all"):
    part_order(args)

  print()
  print("| variant | init (jit model.init + tx.init) | compile step |")
  print("|---|---|---|")
  for v in setup:
    print(f"| {v.name} | {v.init_s:.1f} s | {v.compile_s:.1f} s |")
  print()
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
