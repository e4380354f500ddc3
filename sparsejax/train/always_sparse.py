"""The always-sparse methods in the runner: ``always_gse``, ``always_rigl``, ``always_set``.

They train models of :mod:`sparsejax.nn` layers (the model zoo's ``sparse_mlp`` and
``wide_sparse_mlp``) with :func:`sparsejax.nn.gse`, :func:`~sparsejax.nn.rigl` and
:func:`~sparsejax.nn.set`. Their ``topology`` keyword is the model's ``"topology"``
collection, which the runner passes (registered ``collections``); their
``sparsity`` and ``distribution`` are not the optimizer's but the model's: the
runner builds the model's layers with them, so a config sets them in
``config.sparse`` as for every other method.
"""

from __future__ import annotations

from typing import Any

import optax

import sparsejax
from sparsejax.masks import unbox
import sparsejax.nn as sjnn

TOPOLOGY = "topology"


def always_gse(inner: optax.GradientTransformation, *, topology: Any, sparsity: float,
               end_step: int, distribution: str = "er", sampling: str = "uniform",
               growth_fraction: float = 0.1, update_every: int = 1000, start_step: int = 0,
               seed: int = 0) -> optax.GradientTransformation:
  """:func:`sparsejax.nn.gse`; ``sparsity`` and ``distribution`` shape the model's layers."""
  del sparsity, distribution  # the model's
  return sjnn.gse(inner, topology=topology, end_step=end_step, sampling=sampling,
                  growth_fraction=growth_fraction, update_every=update_every,
                  start_step=start_step, seed=seed)


def always_rigl(inner: optax.GradientTransformation, *, topology: Any, sparsity: float,
                end_step: int, distribution: str = "er", drop_fraction: float = 0.3,
                update_every: int = 100, start_step: int = 0, seed: int = 0
                ) -> optax.GradientTransformation:
  """:func:`sparsejax.nn.rigl`; ``sparsity`` and ``distribution`` shape the model's layers."""
  del sparsity, distribution  # the model's
  return sjnn.rigl(inner, topology=topology, end_step=end_step, drop_fraction=drop_fraction,
                   update_every=update_every, start_step=start_step, seed=seed)


def always_set(inner: optax.GradientTransformation, *, topology: Any, sparsity: float,
               end_step: int, distribution: str = "er", drop_fraction: float = 0.3,
               update_every: int = 100, start_step: int = 0, seed: int = 0
               ) -> optax.GradientTransformation:
  """:func:`sparsejax.nn.set`; ``sparsity`` and ``distribution`` shape the model's layers."""
  del sparsity, distribution  # the model's
  return sjnn.set(inner, topology=topology, end_step=end_step, drop_fraction=drop_fraction,
                  update_every=update_every, start_step=start_step, seed=seed)


def method_variables(method: str, opt_state: optax.OptState) -> dict[str, Any]:
  """The model variables the method keeps in its state (``{"topology": ...}``), or {}."""
  if method == sparsejax.registry.DENSE:
    return {}
  state = unbox(opt_state)
  return {name: optax.tree_utils.tree_get(state, name)
          for name in sparsejax.registry.entry(method).collections}


def is_always_sparse(method: str) -> bool:
  """Whether ``method`` trains always-sparse layers (it takes the model's topology)."""
  return (method != sparsejax.registry.DENSE
          and TOPOLOGY in sparsejax.registry.entry(method).collections)


sparsejax.register_method("always_gse", always_gse, variant_keys=("sampling",),
                          collections=(TOPOLOGY,))
sparsejax.register_method("always_rigl", always_rigl, collections=(TOPOLOGY,))
sparsejax.register_method("always_set", always_set, collections=(TOPOLOGY,))
