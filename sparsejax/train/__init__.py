"""The training loop and models used by the experiments."""

from sparsejax.train.experiment_config import validate_config, with_method
from sparsejax.train.loop import (
    Experiment,
    TrainResult,
    build_optimizer,
    evaluate,
    run,
    setup,
    train,
    train_and_evaluate,
)
from sparsejax.train.models import LeNet5Caffe, LeNet300100, get_model
from sparsejax.train.plots import plot_density

__all__ = [
    "Experiment",
    "LeNet300100",
    "LeNet5Caffe",
    "TrainResult",
    "build_optimizer",
    "evaluate",
    "get_model",
    "plot_density",
    "run",
    "setup",
    "train",
    "train_and_evaluate",
    "validate_config",
    "with_method",
]
