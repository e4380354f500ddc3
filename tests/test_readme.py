"""Every Python block of the README runs, and prints what its comments say it prints."""

import json
from pathlib import Path
import re
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the README's fragments take as given: a linen model, its params, a batch, a loss.
CONTEXT = """
import functools, itertools
import flax.linen as nn, jax, jax.numpy as jnp, optax, sparsejax as sj
model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(10)])
x, y = jax.random.normal(jax.random.PRNGKey(1), (16, 20)), jnp.arange(16) % 10
batch, key = (x, y), jax.random.PRNGKey(0)
params = model.init(key, x)["params"]
def loss(params, batch):
  logits = model.apply({"params": params}, batch[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
loss_fn = loss
tx = sj.rigl(optax.sgd(0.1), sparsity=0.9, update_every=2, end_step=10)
state, num_steps, batches = tx.init(params), 4, itertools.repeat(batch)
"""

# Blocks that only define a step: call it once (keyed by a line of the block).
CALLS = {
    "def update_step(params, state, batch, key):":
        "params, state = update_step(params, state, batch, key)\n"
        "params, state = train_step(params, state, batch)",
    "def train_step(params, state, x, y):\n  def loss_fn(params):":
        "params, state = train_step(params, state, x, y)",
}

RUNNER = """
import contextlib, io, json, sys
context, code, call = json.loads(sys.stdin.read())
namespace, out = {}, io.StringIO()
exec(context, namespace)
with contextlib.redirect_stdout(out):
  exec(compile(code + "\\n" + call, "README block", "exec"), namespace)
print(json.dumps(out.getvalue()), flush=True)
"""


def readme_blocks() -> list[str]:
  """The README's Python blocks, dedented (some sit inside list items)."""
  text = (ROOT / "README.md").read_text()
  found = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
  return ["".join(line[len(indent):] + "\n" for line in code.splitlines())
          for indent, code in found]


def expected_output(code: str) -> str | None:
  """What a block prints when its ``print(...)`` lines end with a comment, else None."""
  said = [line.split("#")[-1].strip() for line in code.splitlines()
          if line.startswith("print(") and "#" in line]
  return "".join(f"{text}\n" for text in said) if said else None


def test_the_readme_has_its_blocks_and_every_call_key_matches_one():
  blocks = readme_blocks()
  assert len(blocks) >= 10
  for key in CALLS:
    assert sum(key in code for code in blocks) == 1, f"CALLS key matches no single block: {key}"


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_a_readme_block_runs_and_prints_what_it_says(index, tmp_path):
  """Block ``index`` in a fresh process (after the shared context), in an empty directory."""
  code = readme_blocks()[index]
  call = next((call for key, call in CALLS.items() if key in code), "")
  result = subprocess.run(
      [sys.executable, "-c", RUNNER], input=json.dumps([CONTEXT, code, call]), cwd=tmp_path,
      capture_output=True, text=True, timeout=600, check=False,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, f"README block {index}:\n{code}\n{result.stderr[-3000:]}"
  expected = expected_output(code)
  if expected is not None:
    assert json.loads(result.stdout.splitlines()[-1]) == expected, f"README block {index}"
