r"""What the experiment runner's bookkeeping costs per training step.

The runner's jitted step also accumulates the loss, the step's sparse FLOPs (counted
from the masks) and the ever-active masks (coverage). This times it against a bare
step (``value_and_grad`` → ``tx.update`` → ``apply_updates``) of the same model and
optimizer, interleaved in one process, and prints the median per-round ratio:

  python benchmarks/runner.py [--rounds=15] [--steps=50]
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import fashion_mnist
from sparsejax.data import ArraySource
from sparsejax.train import loop, steps

_ROUNDS = flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per round.")


def bare_step(experiment: loop.Experiment):
  """The step a user would write: no metrics."""
  model, tx = experiment.model, experiment.tx

  def step(state: steps.TrainState, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grads = jax.grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)

  return jax.jit(step, donate_argnums=0)


def time_steps(step, state, batch, count: int):
  start = time.perf_counter()
  for _ in range(count):
    state = step(state, batch)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / count


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  data = ArraySource(rng.integers(0, 255, (1024, 28, 28, 1), dtype=np.uint8),
                     rng.integers(0, 10, 1024))
  print("| method | runner step / bare step | bare step (ms) |")
  print("|---|---:|---:|")
  for method in ("dense", "static", "rigl", "dst"):
    config = fashion_mnist.get_config(method)
    config.batch_size = 256
    experiment = loop.setup(config, (data, data))
    batch = jax.device_put(experiment.pipeline.batch(0))
    variants = {"runner": steps.make_train_step(experiment), "bare": bare_step(experiment)}
    states = {name: jax.tree.map(jnp.copy, experiment.state) for name in variants}
    for name, step in variants.items():  # compile and warm up
      states[name], _ = time_steps(step, states[name], batch, 5)
    ratios, bare = [], []
    for _ in range(_ROUNDS.value):
      times = {}
      for name, step in variants.items():
        states[name], times[name] = time_steps(step, states[name], batch, _STEPS.value)
      ratios.append(times["runner"] / times["bare"])
      bare.append(times["bare"])
    print(f"| {method} | {statistics.median(ratios):.3f} | "
          f"{1e3 * statistics.median(bare):.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
