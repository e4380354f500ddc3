"""The methods by name: one registry entry each, and their ml_collections config sections.

A method is registered once, by its factory. Its config section is read off the
factory's signature: every keyword with a scalar default (int, float, str, bool)
becomes a typed field with that default, every required scalar keyword a typed
placeholder, and keywords that are functions or optimizers (``dense``,
``threshold_optimizer``) stay out of configs. A runner needs nothing else::

  sj.register_method("toy", toy)         # toy(inner, *, sparsity, seed=0, ...)
  section = sj.method_config("toy")      # ConfigDict(method="toy", sparsity=None, seed=0)
  section.sparsity = 0.9
  tx = sj.from_config(section, optax.sgd(0.1))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
import types
import typing
from typing import Any, NamedTuple

import ml_collections
from ml_collections import config_dict
import optax

from sparsejax.methods import dst, dst_ee, gmp, gse, rigl, static
from sparsejax.methods import set as set_method

DENSE = "dense"
SCALAR_TYPES = (bool, int, float, str)
Factory = Callable[..., optax.GradientTransformation]
InitParams = Callable[[Any, Any, Any], Any]  # (key, params, masks) -> params


class MethodEntry(NamedTuple):
  """A registered method."""
  factory: Factory  # factory(inner, **keywords) -> optax transformation
  variant_keys: tuple[str, ...]  # keys naming a variant in reports (DST: alpha, DST-EE: c)
  init_params: InitParams | None = None  # called once after tx.init (GSE's initialisation)
  statistics: Callable[[Mapping[str, Any]], str | None] | None = None  # GSE's sampling
  collections: tuple[str, ...] = ()  # keywords filled from the model's variable collections


_REGISTRY: dict[str, MethodEntry] = {}
METHODS: dict[str, Factory] = {}  # name -> factory, in registration order


def _scalar_type(hint: Any) -> type | None:
  """The scalar type of an annotation (``float``, ``float | Schedule`` → float), or None."""
  if hint in SCALAR_TYPES:
    return hint
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg in SCALAR_TYPES:
        return arg
  return None


def _config_fields(name: str, factory: Factory, collections: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
  """The config fields of ``factory``: defaults, or typed placeholders for required keys.

  Keywords named in ``collections`` are not config fields: the runner fills them.
  """
  try:
    hints = typing.get_type_hints(factory)
  except (NameError, TypeError):  # an annotation that does not evaluate: use the defaults
    hints = {}
  parameters = [p for p in list(inspect.signature(factory).parameters.values())[1:]  # after inner
                if p.name not in collections]
  fields: dict[str, Any] = {}
  for parameter in parameters:
    default, kind = parameter.default, _scalar_type(hints.get(parameter.name))
    if parameter.default is inspect.Parameter.empty:
      if kind is None:
        raise ValueError(f"method {name!r}: required keyword {parameter.name!r} has no "
                         f"scalar type ({', '.join(t.__name__ for t in SCALAR_TYPES)})")
      fields[parameter.name] = config_dict.placeholder(kind)
    elif isinstance(default, SCALAR_TYPES):
      fields[parameter.name] = default
    elif default is None and kind is not None:
      fields[parameter.name] = config_dict.placeholder(kind)
  return fields


def register_method(name: str, factory: Factory, *, variant_keys: tuple[str, ...] = (),
                    init_params: InitParams | None = None,
                    statistics: Callable[[Mapping[str, Any]], str | None] | None = None,
                    collections: tuple[str, ...] = ()) -> None:
  """Makes ``factory`` available by ``name`` to :func:`from_config` and the runner.

  Args:
    name: the method's name in configs (``config.sparse.method``).
    factory: ``factory(inner, **keywords)`` returning an optax transformation; its
      keyword defaults are the method's config defaults.
    variant_keys: config keys that name a variant of the method in reports, each
      value its own line in plots (DST's ``alpha``, which stands in for a target
      sparsity; DST-EE's exploration coefficient ``c``).
    init_params: ``(key, params, masks) -> params``, the method's own initialisation
      of the weights, which a runner applies once after ``tx.init`` (GSE's).
    statistics: ``keywords -> sampling or None``: the kind of per-layer statistics
      (:func:`sparsejax.value_grad_and_statistics`) the method needs at its
      mask-update steps, passed as ``tx.update(..., layer_statistics=...)``.
    collections: keywords that a runner fills with the model's variable collection
      of the same name (the always-sparse methods' ``topology``); not config keys.

  Raises:
    ValueError: for the reserved name "dense", a name already registered, or a
      required keyword without a scalar type.

  Examples:
    >>> import optax, sparsejax as sj
    >>> def fixed(inner, *, sparsity: float, seed: int = 0):
    ...   return sj.static_sparse(inner, sparsity=sparsity, distribution="uniform", seed=seed)
    >>> sj.register_method("fixed_uniform", fixed)
    >>> sj.method_config("fixed_uniform").to_dict()
    {'method': 'fixed_uniform', 'seed': 0, 'sparsity': None}
  """
  if name == DENSE or name in _REGISTRY:
    raise ValueError(f"method name {name!r} is {'reserved' if name == DENSE else 'taken'}")
  _config_fields(name, factory, tuple(collections))  # fails now, not when a config is built
  for kind, keys in (("variant key", variant_keys), ("collection", collections)):
    for key in keys:
      if key not in inspect.signature(factory).parameters:
        raise ValueError(f"method {name!r}: {kind} {key!r} is not one of its keywords")
  _REGISTRY[name] = MethodEntry(factory, tuple(variant_keys), init_params, statistics,
                                tuple(collections))
  METHODS[name] = factory


def entry(name: str) -> MethodEntry:
  """The registered method ``name``; ValueError for an unknown one."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; expected {DENSE!r} or one of "
                     f"{sorted(_REGISTRY)}")
  return _REGISTRY[name]


def required_keywords(name: str) -> tuple[str, ...]:
  """The keywords method ``name`` has no default for (e.g. RigL's ``sparsity``, ``end_step``).

  Raises:
    ValueError: for an unknown method.
  """
  method = entry(name)
  parameters = list(inspect.signature(method.factory).parameters.values())[1:]
  return tuple(p.name for p in parameters
               if p.default is inspect.Parameter.empty and p.name not in method.collections)


def method_config(name: str) -> ml_collections.ConfigDict:
  """The config section of method ``name``: ``method`` and its keywords, typed and locked.

  Args:
    name: "dense" or a registered method.

  Returns:
    A locked ``ConfigDict``: unknown keys and values of the wrong type are refused;
    required keywords are placeholders (None) to be set.

  Examples:
    >>> import sparsejax as sj
    >>> section = sj.method_config("rigl")
    >>> section.sparsity, section.update_every, section.drop_fraction
    (None, 100, 0.3)
  """
  fields = {"method": name}
  if name != DENSE:
    fields.update(_config_fields(name, entry(name).factory, entry(name).collections))
  section = ml_collections.ConfigDict(fields)
  section.lock()
  return section


def variant(sparse: Mapping[str, Any]) -> str | None:
  """The values that name a variant: ``"alpha=0.0005"`` for DST, ``"c=0.01"`` for DST-EE.

  Args:
    sparse: a config section of a method (``method`` and its keywords).

  Returns:
    ``"key=value"`` pairs joined by commas, or None for a method without variant keys.
  """
  name = sparse.get("method")
  if name not in _REGISTRY:
    return None
  pairs = [f"{key}={sparse[key]:g}" if isinstance(sparse[key], float) else f"{key}={sparse[key]}"
           for key in _REGISTRY[name].variant_keys if sparse.get(key) is not None]
  return ",".join(pairs) or None


def from_config(cfg: Any, inner: optax.GradientTransformation, **collections: Any
                ) -> optax.GradientTransformation:
  """The transformation named by ``cfg.method``, built with the other keys of ``cfg``.

  ``cfg.method == "dense"`` returns ``inner`` unchanged.

  Args:
    cfg: a ``ml_collections.ConfigDict`` (or mapping) with ``method`` and that
      method's keywords, e.g. ``sparsity``, ``distribution``, ``update_every``.
    inner: the optimizer to wrap.
    **collections: the model's variable collections the method takes (its
      registered ``collections``, e.g. ``topology=variables["topology"]``).

  Returns:
    An optax transformation.

  Raises:
    ValueError: for an unknown method, a key the method does not take, or a
      required keyword left unset.

  Examples:
    >>> import optax, sparsejax as sj
    >>> tx = sj.from_config({"method": "rigl", "sparsity": 0.9, "end_step": 1000},
    ...                     optax.sgd(0.1))
    >>> sj.from_config({"method": "dense"}, optax.sgd(0.1)) is not None
    True
  """
  kwargs = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  method = kwargs.pop("method", None)
  if method == DENSE:
    return inner
  factory, wanted = entry(method).factory, entry(method).collections
  if set(collections) != set(wanted):
    raise ValueError(f"method {method!r} takes the model's collections {list(wanted)}, "
                     f"got {sorted(collections)}")
  accepted = set(list(inspect.signature(factory).parameters)[1:]) - set(wanted)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f"method {method!r} takes no config key {unknown[0]!r}; "
                     f"it accepts {sorted(accepted)}")
  for name in required_keywords(method):
    if kwargs.get(name) is None:
      raise ValueError(f"method {method!r} needs {name!r}")
  return factory(inner, **kwargs, **collections)


register_method("static", static.static_sparse)
register_method("set", set_method.set)
register_method("rigl", rigl.rigl)
register_method("gmp", gmp.gmp)
register_method("dst", dst.dst, variant_keys=("alpha",))
register_method("dst_ee", dst_ee.dst_ee, variant_keys=("c",))
register_method("gse", gse.gse, variant_keys=("sampling",), init_params=gse.gse_init,
                statistics=lambda keywords: None if keywords["sampling"] == "uniform"
                else keywords["sampling"])
