"""Data-parallel step time of RigL against dense on 1, 2, 4 and 8 devices.

Run::

  python benchmarks/scaling.py [--devices 1,2,4,8] [--repeats 7] [--calls 5]

Each device count runs in its own process (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``; on a GPU machine, the real devices). The
model is ``benchmarks/overhead.py``'s 784-1024-1024-1024-10 MLP with ``optax.adam(1e-3)``,
global batch 256 split along a ``data`` mesh axis, params and optimizer state
replicated, as the runner trains. Variants, timed interleaved in the process: dense;
RigL's non-update step (``mask_update=False``, as the runner compiles it); RigL's
update step (``update_every=1``). On one machine simulated devices share its cores, so
the table shows the overhead of sparse training at each device count, not a speed-up:
the ratios should stay flat. The last columns are the bytes each device holds for
params and optimizer state: replicated, as timed (the same at every count), and with
every array of >= 65,536 entries split over all N devices along ``model``
(``--config.mesh.model=N``, the runner's rule in ``sparsejax/train/sharding.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import os
import statistics
import subprocess
import sys

import jax
from jax.sharding import NamedSharding
from models import MLP
import optax
from overhead import Variant

import sparsejax as sj
from sparsejax.train import sharding


def worker(repeats: int, calls: int) -> dict[str, float]:
  """Times the variants on this process's devices; returns ratios, ms and bytes."""
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # collectives on 2 cores
  mesh = sharding.make_mesh()  # the runner's mesh: data × model, model = 1
  replicated = sharding.replicated(mesh)
  split = NamedSharding(mesh, sharding.BATCH)
  model = MLP((1024, 1024, 1024, 10))
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.device_put(jax.random.normal(kx, (256, 784)), split)
  y = jax.device_put(jax.random.randint(ky, (256,), 0, 10), split)
  params = jax.device_put(model.init(kp, x)["params"], replicated)

  rigl = dict(sparsity=0.9, distribution="erk", end_step=10**9)
  variants = [Variant("dense", "train", model, optax.adam(1e-3), params, x, y),
              Variant("rigl", "train", model,
                      sj.rigl(optax.adam(1e-3), update_every=10**8, **rigl), params, x, y,
                      mask_update=False),
              Variant("rigl_update", "update", model,
                      sj.rigl(optax.adam(1e-3), update_every=1, **rigl), params, x, y,
                      mask_update=True)]
  for v in variants:
    for _ in range(3):
      v.call(timed=False)
    # The runner's layout: a step of replicated params and state keeps them replicated.
    assert all(leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves((v.params, v.opt_state))), v.name
  ratios: dict[str, list[float]] = {v.name: [] for v in variants}
  for _ in range(repeats):
    for v in variants:
      v.round_ms.append(statistics.median(v.call() for _ in range(calls)))
    for v in variants:
      ratios[v.name].append(v.round_ms[-1] / variants[0].round_ms[-1])
  state_bytes = {v.name: sharding.bytes_per_device((v.params, v.opt_state)) for v in variants}
  fsdp = sharding.make_mesh(model=jax.device_count())
  split_bytes = {}
  for v in variants:
    state = (v.params, v.opt_state)
    state = sharding.place(state, sharding.state_shardings(state, fsdp, 2**16))
    split_bytes[v.name] = sharding.bytes_per_device(state)
  ms = {v.name: v.round_ms for v in variants}
  return {"devices": jax.device_count(),
          **{f"{n}_ratio": statistics.median(r) for n, r in ratios.items()},
          **{f"{n}_ms": statistics.median(m) for n, m in ms.items()},
          **{f"{n}_bytes": b for n, b in state_bytes.items()},
          **{f"{n}_split_bytes": b for n, b in split_bytes.items()}}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs one worker process per device count and prints a Markdown table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
  parser.add_argument("--calls", type=int, default=5, help="timed steps per variant and round")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.repeats, args.calls)))
    return
  print(f"command: `python benchmarks/scaling.py --devices {args.devices} "
        f"--repeats {args.repeats} --calls {args.calls}`")
  print()
  print("| devices | dense step (ms) | rigl non-update ÷ dense | rigl update ÷ dense "
        "| params + state per device (MB), dense / rigl: replicated | split along model |")
  print("|---|---:|---:|---:|---|---|")
  for count in (int(c) for c in args.devices.split(",") if c):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    result = subprocess.run([sys.executable, __file__, "--worker", f"--repeats={args.repeats}",
                             f"--calls={args.calls}"], env=env, capture_output=True, text=True,
                            check=True)
    r = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"| {r['devices']} | {r['dense_ms']:.2f} | {r['rigl_ratio']:.2f} "
          f"| {r['rigl_update_ratio']:.2f} | {r['dense_bytes'] / 2**20:.1f} / "
          f"{r['rigl_bytes'] / 2**20:.1f} | {r['dense_split_bytes'] / 2**20:.1f} / "
          f"{r['rigl_split_bytes'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
  main()
