"""The inner optimizer and learning-rate schedule of an experiment config's ``optimizer`` section."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


def learning_rate_schedule(opt: ml_collections.ConfigDict, per_epoch: int) -> optax.Schedule:
  """The learning rate of each step: linear warm-up, then constant, step or cosine decay.

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch (epochs in the config become steps).
    (The cosine decay reaches 0 at ``decay_epochs[-1]``, or never without it.)

  Returns:
    An optax schedule of the 0-based step count, as the optimizer sees it.
  """
  base = float(opt.learning_rate)
  warmup = round(opt.warmup_epochs * per_epoch)
  boundaries = [round(e * per_epoch) for e in (opt.decay_epochs or ())]
  if opt.schedule == "step":
    after = optax.piecewise_constant_schedule(
        base, {b - warmup: float(opt.decay_factor) for b in boundaries if b > warmup})
  elif opt.schedule == "cosine" and boundaries:
    after = optax.cosine_decay_schedule(base, max(boundaries[-1] - warmup, 1))
  else:
    after = optax.constant_schedule(base)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(base / warmup, base, warmup), after],
                              [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, per_epoch: int) -> optax.GradientTransformation:
  """The inner optimizer of the ``optimizer`` section (see the module docstring).

  Args:
    opt: the ``optimizer`` section.
    per_epoch: training steps per epoch, for the schedule.

  Returns:
    An optax transformation.
  """
  schedule = learning_rate_schedule(opt, per_epoch)
  if opt.name == "adam":
    return optax.adamw(schedule, weight_decay=opt.weight_decay)
  sgd = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
  if not opt.weight_decay:
    return sgd
  return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
