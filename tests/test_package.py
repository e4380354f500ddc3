"""The package's shape: the core imports no runner code, and the wheel ships only ``sparsejax``."""

import ast
from pathlib import Path
import sys

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# What the library core (sparsejax/*.py and sparsejax/methods/) may import at module level.
CORE_THIRD_PARTY = {"jax", "optax", "numpy", "ml_collections"}
CORE_OWN = ("sparsejax.masks", "sparsejax.methods", "sparsejax.metrics", "sparsejax.optstate",
            "sparsejax.registry", "sparsejax.schedules", "sparsejax.scores",
            "sparsejax.selection", "sparsejax.topology", "sparsejax.wrapper",
            "sparsejax.distributions", "sparsejax.sampling", "sparsejax.statistics")


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
