"""The experiment runner: configs, the training loop, checkpoints, metrics logs, models.

It needs the ``experiments`` extra (``pip install 'sparsejax[experiments]'``); without it,
importing this package raises one ImportError line naming it.
"""

from sparsejax import extras

extras.require(extras.RUNNER, "the experiment runner (sparsejax.train)")

from sparsejax.train.checkpoints import CheckpointError, UnreadableCheckpoints
from sparsejax.train.experiment_config import validate_config, with_method
from sparsejax.train.loop import Experiment, build_optimizer, check, load_data, run, setup
from sparsejax.train.models import get_model
from sparsejax.train.steps import TrainState, make_evaluate, make_train_step
from sparsejax.train.stopping import Diverged, Preempted
from sparsejax.train.workdir import check_workdir

__all__ = [
    "CheckpointError",
    "Diverged",
    "Experiment",
    "Preempted",
    "TrainState",
    "UnreadableCheckpoints",
    "build_optimizer",
    "check",
    "check_workdir",
    "get_model",
    "load_data",
    "make_evaluate",
    "make_train_step",
    "run",
    "setup",
    "validate_config",
    "with_method",
]
