"""The inner optimizer and learning-rate schedule of a config's ``optimizer`` section."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


def _steps(epochs: float, per_epoch: int) -> int:
  return round(epochs * per_epoch)


def check_schedule(opt: ml_collections.ConfigDict, per_epoch: int) -> None:
  """Refuses the schedule settings :func:`learning_rate_schedule` would ignore.

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch.

  Raises:
    ValueError: naming the key, e.g. ``decay_epochs`` with a constant schedule, more
      than one cosine end, a boundary inside the warm-up, or ``decay_factor`` with a
      schedule that does not use it. Boundaries after the end of training are
      allowed, so that a run shortened with ``num_steps`` keeps its config.
  """
  def fail(key: str, message: str) -> None:
    raise ValueError(f"config.optimizer.{key} {message}")

  epochs = tuple(opt.decay_epochs)
  warmup = _steps(opt.warmup_epochs, per_epoch)
  if opt.schedule == "constant" and epochs:
    fail("decay_epochs", f"= {epochs} does nothing with schedule 'constant' (use 'step')")
  if opt.schedule == "cosine" and len(epochs) > 1:
    fail("decay_epochs", f"= {epochs}: a cosine schedule takes at most one entry, the "
         "epoch where it reaches 0 (default: the end of training)")
  if opt.schedule == "step" and not epochs:
    fail("decay_epochs", "is empty: schedule 'step' would never decay (give the epochs, or "
         "use 'constant')")
  if opt.schedule == "step" and opt.decay_factor is None:
    fail("decay_factor", "is needed by schedule 'step'")
  if opt.schedule != "step" and opt.decay_factor is not None:
    fail("decay_factor", f"= {opt.decay_factor} does nothing with schedule {opt.schedule!r}")
  for epoch in epochs:
    if _steps(epoch, per_epoch) <= warmup:
      fail("decay_epochs", f"entry {epoch:g} is inside the warm-up ({opt.warmup_epochs:g} "
           "epochs)")


def learning_rate_schedule(opt: ml_collections.ConfigDict, per_epoch: int, num_steps: int
                           ) -> optax.Schedule:
  """The learning rate of each step: linear warm-up, then constant, step or cosine decay.

  ``cosine`` decays to 0 at ``decay_epochs[0]`` if given, else at the end of training;
  ``step`` multiplies the rate by ``decay_factor`` at each of ``decay_epochs``.

  Args:
    opt: the ``optimizer`` section (checked by :func:`check_schedule`).
    per_epoch: training steps per epoch (epochs in the config become steps).
    num_steps: total training steps.

  Returns:
    An optax schedule of the 0-based step count, as the optimizer sees it.
  """
  base = float(opt.learning_rate)
  warmup = _steps(opt.warmup_epochs, per_epoch)
  boundaries = [_steps(e, per_epoch) for e in opt.decay_epochs]
  if opt.schedule == "step":
    after = optax.piecewise_constant_schedule(
        base, {b - warmup: float(opt.decay_factor) for b in boundaries})
  elif opt.schedule == "cosine":
    zero_at = boundaries[0] if boundaries else num_steps
    after = optax.cosine_decay_schedule(base, max(zero_at - warmup, 1))
  else:
    after = optax.constant_schedule(base)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(base / warmup, base, warmup), after],
                              [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, per_epoch: int, num_steps: int
                   ) -> optax.GradientTransformation:
  """The inner optimizer of the ``optimizer`` section (SGD or AdamW with its schedule).

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch, for the schedule.
    num_steps: total training steps, for the schedule.

  Returns:
    An optax transformation.

  Raises:
    ValueError: for schedule settings that would be ignored (:func:`check_schedule`).
  """
  check_schedule(opt, per_epoch)
  schedule = learning_rate_schedule(opt, per_epoch, num_steps)
  if opt.name == "adam":
    return optax.adamw(schedule, weight_decay=opt.weight_decay)
  sgd = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
  if not opt.weight_decay:
    return sgd
  return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
