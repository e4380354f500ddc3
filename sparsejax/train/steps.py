"""The jitted steps of the experiment runner: the train step and the evaluation.

:class:`TrainState` is everything a step reads and writes. A sparsejax method's train
steps come in two kinds (:func:`train_steps`): mask-update steps, compiled with
``mask_update=True`` (and the statistics a guided method samples from), and the others,
compiled with ``mask_update=False``, without any mask-update code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax.data import eval_batches
from sparsejax.train import records, sharding
from sparsejax.train.always_sparse import method_variables

if TYPE_CHECKING:
  from sparsejax.train.loop import Experiment


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""
  step: jax.Array  # int32, steps taken
  params: Any
  model_state: Any  # mutable collections, e.g. {"batch_stats": ...}; {} if none
  opt_state: optax.OptState
  tracker: records.Tracker



def apply_model(model: nn.Module, params: Any, model_state: Any, images: jax.Array, train: bool,
           method_state: Mapping[str, Any]):
  """Logits and the new model state (unchanged when not training or stateless).

  ``method_state``: the variables the method keeps (:func:`method_variables`).
  """
  variables = {"params": params, **model_state, **method_state}
  if train and model_state:
    logits, new_state = model.apply(variables, images, train=True, mutable=list(model_state))
    return logits, dict(new_state)
  return model.apply(variables, images, train=train), model_state


def make_train_step(experiment: Experiment, with_statistics: bool = False,
                    mask_update: bool | None = None) -> Callable[[TrainState, Any], TrainState]:
  """The jitted ``(state, batch) -> state`` of ``experiment`` (state donated).

  Args:
    experiment: what to train.
    with_statistics: for a method that needs per-layer statistics at its mask updates
      (GSE's GraBo and GraEst), compute them (:func:`sparsejax.value_grad_and_statistics`,
      GraEst's signs from the seed and the step) and pass them to ``tx.update``;
      without it the step passes None.
    mask_update: passed to a sparsejax ``tx.update``: True compiles an update step,
      False a step without mask-update code (take them from ``tx.is_update_step``);
      None lets the compiled step check the schedule.

  Returns:
    The jitted step.
  """
  model, tx, sampling = experiment.model, experiment.tx, experiment.statistics
  skip_nonfinite = experiment.config.on_nonfinite == "skip"

  def loss_fn(params, model_state, batch, method_state):
    logits, model_state = apply_model(model, params, model_state, batch["image"], train=True,
                                 method_state=method_state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, model_state

  def train_step(state: TrainState, batch) -> TrainState:
    extra_args = {} if sampling is None else {"layer_statistics": None}
    if mask_update is not None:
      extra_args["mask_update"] = mask_update
    method_state = method_variables(experiment.method, state.opt_state)
    if with_statistics:
      key = jax.random.fold_in(jax.random.PRNGKey(experiment.config.seed), state.step)
      (loss, model_state), grads, extra_args["layer_statistics"] = (
          sparsejax.value_grad_and_statistics(loss_fn, state.params, state.model_state, batch,
                                              method_state, sampling=sampling, key=key,
                                              has_aux=True))
    else:
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, state.model_state, batch, method_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss)
    if skip_nonfinite:  # optax.apply_if_finite: a step with a non-finite loss or gradient
      finite &= all_finite(grads)  # changes nothing but the step and the counts
      params, model_state, opt_state = optax.tree.where(
          finite, (params, model_state, opt_state),
          (state.params, state.model_state, state.opt_state))
    tracker = records.track_step(state.tracker, state.step + 1, loss, finite, state.opt_state,
                                 opt_state, state.params, experiment.positions)
    return TrainState(state.step + 1, params, model_state, opt_state, tracker)

  # The state keeps its shardings; a batch split over the devices splits the work.
  state_shardings = jax.tree.map(lambda x: x.sharding, experiment.state)
  return jax.jit(train_step, donate_argnums=0, out_shardings=state_shardings)


def all_finite(tree: Any) -> jax.Array:
  """Whether every inexact entry of ``tree`` is finite (traceable)."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def train_steps(experiment: Experiment) -> Callable[[int], Callable[[TrainState, Any], TrainState]]:
  """The jitted train step to run as step ``step`` (from 1), compiled at its first use.

  A sparsejax method's steps come in two kinds: mask-update steps (by
  ``tx.is_update_step``), which also compute the statistics a guided method samples
  from, and the others, compiled without any mask-update code.
  """
  tx = experiment.tx
  schedule = tx.is_update_step if isinstance(tx, sparsejax.SparseTransformation) else None
  compiled: dict[bool | None, Callable[[TrainState, Any], TrainState]] = {}

  def step_for(step: int) -> Callable[[TrainState, Any], TrainState]:
    update = None if schedule is None else schedule(step)
    if update not in compiled:
      compiled[update] = make_train_step(
          experiment, with_statistics=bool(update) and experiment.statistics is not None,
          mask_update=update)
    return compiled[update]

  return step_for


def make_evaluate(experiment: Experiment) -> Callable[[TrainState], tuple[float, float]]:
  """``state -> (test_loss, test_accuracy)`` over the whole test split."""
  model = experiment.model

  @jax.jit
  def batch_sums(state, images, labels, valid):
    logits, _ = apply_model(model, state.params, state.model_state, images, train=False,
                       method_state=method_variables(experiment.method, state.opt_state))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(correct & valid)

  pipeline, size = experiment.pipeline, experiment.config.eval_batch_size

  def evaluate(state: TrainState) -> tuple[float, float]:
    loss, correct, count = jnp.zeros(()), jnp.zeros((), jnp.int32), 0
    for batch in eval_batches(experiment.test, size, pipeline.mean, pipeline.std):
      images, labels, valid = sharding.shard_batch(sharding.process_rows(batch), experiment.mesh)
      batch_loss, batch_correct = batch_sums(state, images, labels, valid)
      loss, correct, count = loss + batch_loss, correct + batch_correct, count + int(batch[2].sum())
    return float(loss) / count, int(correct) / count

  return evaluate
