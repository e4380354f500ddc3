"""When masks change, how much of each layer is swapped, and how sparsity grows.

Steps count optimizer updates from 1: with ``update_every=100`` and ``start_step=0``
masks change at steps 100, 200, ... up to ``end_step``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

StepPredicate = Callable[[jax.Array], jax.Array]


def check_steps(update_every: int, start_step: int, end_step: int) -> None:
  """Raises ValueError for an empty or ill-formed update window."""
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if end_step <= start_step:
    raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")


def update_steps(update_every: int, start_step: int, end_step: int) -> StepPredicate:
  """Predicate of the steps at which masks are updated.

  Args:
    update_every: steps between two mask updates (ΔT).
    start_step: first step of the window; the first update is at
      ``start_step + update_every``.
    end_step: last step at which masks may change.

  Returns:
    A function ``step -> bool array``, traceable.
  """
  check_steps(update_every, start_step, end_step)

  def is_update(step: jax.Array) -> jax.Array:
    since_start = step - start_step
    return (since_start > 0) & (since_start % update_every == 0) & (step <= end_step)

  return is_update


def cosine_drop_fraction(initial: float, start_step: int, end_step: int) -> optax.Schedule:
  """Cosine decay of the drop fraction from ``initial`` at ``start_step`` to 0 at ``end_step``.

  Args:
    initial: drop fraction at the start (0.3 in RigL, 0.5 in DST-EE).
    start_step: step at which the decay starts.
    end_step: step at which it reaches 0.

  Returns:
    An optax schedule of the step.
  """
  if not 0.0 <= initial <= 1.0:
    raise ValueError(f"drop_fraction must be in [0, 1], got {initial!r}")
  cosine = optax.cosine_decay_schedule(initial, end_step - start_step)
  return lambda step: cosine(jnp.maximum(step - start_step, 0))


def as_drop_fraction(drop_fraction: float | optax.Schedule, start_step: int,
                     end_step: int) -> optax.Schedule:
  """A float becomes :func:`cosine_drop_fraction`; a schedule is used as given."""
  if callable(drop_fraction):
    return drop_fraction
  return cosine_drop_fraction(drop_fraction, start_step, end_step)


def cubic_sparsity(final: float, initial: float, start_step: int, end_step: int) -> optax.Schedule:
  """Zhu & Gupta (2017) gradual pruning: s_t = s_f + (s_i − s_f)(1 − progress)³.

  Args:
    final: sparsity reached at ``end_step``.
    initial: sparsity at ``start_step``.
    start_step: step at which pruning starts (t₀).
    end_step: step at which the final sparsity is reached (t₀ + n·ΔT).

  Returns:
    An optax schedule of the step, constant outside the window.
  """
  def schedule(step):
    progress = jnp.clip((step - start_step) / (end_step - start_step), 0.0, 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3

  return schedule
