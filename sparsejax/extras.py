"""The packages of the experiment runner, which ``pip install sparsejax`` does not bring.

The library (``import sparsejax``, ``sparsejax.nn``) needs only jax, flax, optax, chex,
ml-collections and numpy; ``sparsejax.train`` and the ``experiments`` command lines also
need the ``experiments`` extra: ``pip install 'sparsejax[experiments]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib.util

RUNNER = ("orbax.checkpoint", "tensorboardX", "rich")  # sparsejax.train, experiments.train
REPORT = ("matplotlib",)  # experiments.report's plots


def _available(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is missing
    return False


def require(modules: Sequence[str], what: str) -> None:
  """Raises ImportError, one line naming the extra, unless every module can be imported.

  Args:
    modules: module names, e.g. :data:`RUNNER`.
    what: what needs them, e.g. "the experiment runner".
  """
  missing = [module for module in modules if not _available(module)]
  if missing:
    raise ImportError(f"{what} needs the 'experiments' extra: pip install "
                      f"'sparsejax[experiments]' (missing: {', '.join(missing)})")
