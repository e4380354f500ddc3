"""Building a method from an ml_collections config."""

from __future__ import annotations

import inspect
from typing import Any

import optax

from sparsejax.methods import dst, gmp, rigl, static
from sparsejax.methods import set as set_method

METHODS = {
    "static": static.static_sparse,
    "set": set_method.set,
    "rigl": rigl.rigl,
    "gmp": gmp.gmp,
    "dst": dst.dst,
}


def from_config(cfg: Any, inner: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """The transformation named by ``cfg.method``, built with the other keys of ``cfg``.

  ``cfg.method == "dense"`` returns ``inner`` unchanged.

  Args:
    cfg: a ``ml_collections.ConfigDict`` (or mapping) with ``method`` and that
      method's keywords, e.g. ``sparsity``, ``distribution``, ``update_every``.
    inner: the optimizer to wrap.

  Returns:
    An optax transformation.

  Raises:
    ValueError: for an unknown method or a key the method does not take.
  """
  kwargs = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  method = kwargs.pop("method", None)
  if method == "dense":
    return inner
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected 'dense' or one of {sorted(METHODS)}")
  factory = METHODS[method]
  accepted = set(inspect.signature(factory).parameters) - {"inner"}
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f"method {method!r} takes no config key {unknown[0]!r}; "
                     f"it accepts {sorted(accepted)}")
  return factory(inner, **kwargs)
