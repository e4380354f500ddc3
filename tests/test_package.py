"""The package's shape: the core imports no runner code, and the wheel ships only ``sparsejax``."""

import ast
from pathlib import Path
import re
import subprocess
import sys
import zipfile

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# What the library core (sparsejax/*.py and sparsejax/methods/) may import at module level.
CORE_THIRD_PARTY = {"jax", "optax", "numpy", "ml_collections"}
CORE_OWN = ("sparsejax.masks", "sparsejax.methods", "sparsejax.metrics", "sparsejax.optstate",
            "sparsejax.registry", "sparsejax.schedules", "sparsejax.scores",
            "sparsejax.selection", "sparsejax.topology", "sparsejax.wrapper",
            "sparsejax.distributions", "sparsejax.sampling", "sparsejax.statistics",
            "sparsejax.compact", "sparsejax.extras")


def module_imports(path: Path) -> set[str]:
  """Modules imported at the top level of ``path`` (not inside functions)."""
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
      names.add(node.module)
      if node.module == "sparsejax":
        names.update(f"sparsejax.{alias.name}" for alias in node.names)
  return names


def test_core_imports_only_jax_optax_numpy_and_ml_collections():
  core = [*ROOT.glob("sparsejax/*.py"), *ROOT.glob("sparsejax/methods/*.py")]
  assert len(core) > 10
  for path in core:
    for name in module_imports(path):
      top = name.split(".")[0]
      if top == "sparsejax":
        assert name == "sparsejax" or name.startswith(CORE_OWN), (path.name, name)
      else:
        assert top in CORE_THIRD_PARTY or top in sys.stdlib_module_names, (path.name, name)


def test_wheel_installs_no_top_level_experiments_package():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["sparsejax*"]


# Packages only the experiment runner needs: the wheel's library must work without them.
RUNNER_ONLY = {"orbax", "tensorboardX", "matplotlib", "tensorflow", "tensorflow_datasets"}
CORE_REQUIREMENTS = {"jax", "flax", "optax", "chex", "ml-collections", "numpy"}
LIBRARY_ONLY = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {sorted(RUNNER_ONLY)!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Missing())
sys.path.insert(0, sys.argv[1])
"""
CONTRACT = """
import flax.linen as nn, jax, jax.numpy as jnp, optax, sparsejax as sj, sparsejax.nn
assert sj.__file__.startswith(sys.argv[1]), sj.__file__
model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
x, y = jnp.ones((8, 20)), jnp.zeros((8,), jnp.int32)
params = model.init(jax.random.PRNGKey(0), x)["params"]
tx = sj.rigl(optax.sgd(0.1), sparsity=0.9, update_every=1, end_step=10)
state = tx.init(params)
loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                                 y).mean()
updates, state = tx.update(jax.grad(loss)(params), state, params)
params = optax.apply_updates(params, updates)
print(round(sj.summary(state, params)["sparsity"], 2), sj.summary(state, params)["violations"])
try:
  import sparsejax.train
except ImportError as e:
  print(e)
"""


def test_the_wheel_needs_only_the_core_packages(tmp_path):
  """The wheel, built here without network: it requires the core packages only (the
  runner's are extras), ships only ``sparsejax`` (with the kernel's C++ source), and on its own, with the runner's
  packages made unimportable, runs a RigL step; the runner says which extra it needs."""
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], check=True,
                 capture_output=True, timeout=300)
  wheel = next(tmp_path.glob("sparsejax-*.whl"))
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    archive.extractall(site)
  assert {name.split("/")[0].split("-")[0] for name in names} == {"sparsejax"}
  assert "sparsejax/nn/rows.cc" in names  # the compiled kernel's source, built on first use
  requires = [line.split(": ", 1)[1] for line in metadata.decode().splitlines()
              if line.startswith("Requires-Dist: ")]
  unconditional = {re.split(r"[\s<>=!~;\[]", r)[0].lower() for r in requires if "extra ==" not in r}
  assert unconditional == CORE_REQUIREMENTS
  assert any("extra == \"experiments\"" in r and r.startswith("tensorboardX") for r in requires)
  result = subprocess.run([sys.executable, "-I", "-c", LIBRARY_ONLY + CONTRACT, str(site)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == [
      "0.9 []", "the experiment runner (sparsejax.train) needs the 'experiments' extra: "
      "pip install 'sparsejax[experiments]' (missing: orbax.checkpoint, tensorboardX)"]


def test_the_command_lines_without_the_extra_are_one_line():
  """``python -m experiments.train`` / ``experiments.report`` with tensorboardX and
  matplotlib unimportable: one line naming the extra, status 1."""
  for module, missing in (("experiments.train", "tensorboardX"),
                          ("experiments.report", "tensorboardX")):
    code = LIBRARY_ONLY + f"import runpy; runpy.run_module({module!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), "--config=x.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: the experiment runner (sparsejax.train) needs the 'experiments' extra: pip "
        f"install 'sparsejax[experiments]' (missing: orbax.checkpoint, {missing})"]
