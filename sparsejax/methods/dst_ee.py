"""DST-EE (Huang et al. 2023): RigL whose growth balances exploitation and exploration.

Drop by magnitude and cosine drop fraction as in RigL; grow the weights with the
highest acquisition score |∂L/∂w| + c·√(ln t / (N + ε)) (:func:`sparsejax.scores.acquisition`).
The paper publishes no code; the choices it leaves open are made here:

- ``t`` counts the mask updates that actually ran, this one included (t = 1 at the
  first, so its bonus is 0 and the first update is RigL's). An update skipped for a
  non-finite gradient is not counted.
- ``N`` counts, per weight, the mask updates at which it was active, i.e. active in
  the mask that update replaces: at each update, before scoring, N += old mask. A
  weight dropped at one update and regrown at a later one keeps its count, and a
  weight never active has N = 0 and the largest bonus, c·√(ln t / ε). N is stored in
  the smallest unsigned integer type that holds the run's number of updates.
- ``c`` decays as c · c_decay^⌊step / c_decay_every⌋ (the published scripts: ×0.9
  every 1,000 steps; ``c_decay=1`` keeps it constant), counting optimizer steps.
- Candidates for growth are all weights not kept, just-dropped ones included, and
  the swap count is truncated, as in google-research/rigl (:func:`sparsejax.rigl`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import scores
from sparsejax.masks import DensePredicate, keep_non_kernels_dense, map_masked
from sparsejax.methods.drop_grow import drop_grow_method
from sparsejax.wrapper import SparseTransformation


class ActivityCounts(NamedTuple):
  """DST-EE's state: mask updates so far and, per weight, at how many it was active."""
  updates: jax.Array  # t: mask updates run so far (int32)
  counts: Any  # N per masked leaf (unsigned integers), None for dense leaves


def count_dtype(num_updates: int) -> np.dtype:
  """The smallest unsigned integer type that counts to ``num_updates``."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if num_updates <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"{num_updates} mask updates do not fit a uint32 count")


def count_activity(inputs: scores.ScoreInputs) -> ActivityCounts:
  """At a mask update: t += 1 and N += the mask being replaced."""
  counts = map_masked(lambda m, n: n + m.astype(n.dtype), inputs.masks, inputs.extra.counts)
  return ActivityCounts(inputs.extra.updates + 1, counts)


def dst_ee(inner: optax.GradientTransformation, *, sparsity: float, end_step: int,
           c: float = 1e-2, eps: float = 1.0, c_decay: float = 1.0,
           c_decay_every: int = 1000, distribution: str | Mapping[str, float] = "erk",
           update_every: int = 100, start_step: int = 0,
           drop_fraction: float | optax.Schedule = 0.5,
           dense: DensePredicate = keep_non_kernels_dense, seed: int = 0,
           train_at_update: bool = False) -> SparseTransformation:
  """RigL with growth by an exploration–exploitation acquisition score.

  Every ``update_every`` steps until ``end_step``, each layer drops its
  ``int(f·nnz)`` smallest active weights and grows the same number of weights with
  the highest |∂L/∂w| + c·√(ln t / (N + ε)), where t counts mask updates and N
  counts, per weight, the updates at which it was active (the module docstring
  says exactly how). Grown weights start at 0 with a fresh optimizer state; the
  optimizer step is skipped at an update step unless ``train_at_update``, as in
  :func:`sparsejax.rigl`, which ``c=0`` reproduces bit for bit.

  Args:
    inner: the optimizer to wrap.
    sparsity: global sparsity in [0, 1).
    end_step: last step at which masks change.
    c: exploration coefficient c ≥ 0 (1e-2 in the published scripts).
    eps: ε > 0 in the bonus's denominator.
    c_decay: c is multiplied by this every ``c_decay_every`` steps, in (0, 1].
    c_decay_every: steps between two decays of c.
    distribution: "uniform", "er", "erk" or a mapping from path to sparsity.
    update_every: steps between mask updates (ΔT).
    start_step: masks change after this step.
    drop_fraction: initial drop fraction (0.5 in the paper), cosine-decayed to 0,
      or a schedule.
    dense: predicate ``(path, leaf) -> bool`` of leaves kept dense.
    seed: seed of the initial masks.
    train_at_update: also apply the optimizer step to the weights active before
      and after a mask update, at that step.

  Returns:
    An optax transformation whose state's ``extra`` is an :class:`ActivityCounts`.

  Examples:
    >>> import jax.numpy as jnp, optax, sparsejax as sj
    >>> params = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    >>> tx = sj.dst_ee(optax.sgd(0.1), sparsity=0.75, distribution="uniform",
    ...                update_every=1, end_step=10, c=0.1)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.zeros((8, 8)), "b": jnp.ones(8)}
    >>> for _ in range(2):
    ...   updates, state = tx.update(grads, state, params)
    >>> int(state.extra.updates), int(state.extra.counts["w"].sum())  # 2 updates, 16 each
    (2, 32)

  References:
    Huang et al., `Dynamic Sparse Training via Balancing the Exploration-Exploitation
    Trade-off <https://arxiv.org/abs/2211.16667>`_, DAC 2023
  """
  if not c >= 0:
    raise ValueError(f"c must be >= 0, got {c!r}")
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps!r}")
  if not 0 < c_decay <= 1:
    raise ValueError(f"c_decay must be in (0, 1], got {c_decay!r}")
  if c_decay_every < 1:
    raise ValueError(f"c_decay_every must be >= 1, got {c_decay_every!r}")
  dtype = count_dtype(max(end_step - start_step, 0) // max(update_every, 1))

  def init_extra(params, masks):
    del params
    return ActivityCounts(jnp.zeros((), jnp.int32),
                          map_masked(lambda m: jnp.zeros(m.shape, dtype), masks))

  exploration = optax.exponential_decay(c, c_decay_every, c_decay, staircase=True)
  return drop_grow_method(
      inner, scores.acquisition(exploration, eps), sparsity=sparsity,
      distribution=distribution, update_every=update_every, start_step=start_step,
      end_step=end_step, drop_fraction=drop_fraction, dense=dense, seed=seed,
      train_at_update=train_at_update, reads_dense_gradient=True, init_extra=init_extra,
      update_extra=count_activity)
