"""Datasets and input pipelines.

A built-in IDX reader for MNIST and Fashion-MNIST, random-access sources (IDX or
tensorflow-datasets), deterministic resumable training batches with augmentation,
and fixed-shape evaluation batches.
"""

from sparsejax.data.idx import (
    load_idx_dataset,
    load_idx_split,
    read_idx,
    write_idx,
    write_idx_dataset,
)
from sparsejax.data.pipeline import (
    NORMALIZATION,
    TrainPipeline,
    crop_and_flip,
    eval_batches,
    preprocess,
)
from sparsejax.data.sources import (
    KNOWN_SHAPES,
    ArraySource,
    DatasetShape,
    RandomAccessSource,
    Source,
    dataset_shape,
    load_source,
    num_classes,
    read_into_memory,
)

__all__ = [
    "NORMALIZATION",
    "KNOWN_SHAPES",
    "ArraySource",
    "DatasetShape",
    "RandomAccessSource",
    "Source",
    "TrainPipeline",
    "crop_and_flip",
    "dataset_shape",
    "eval_batches",
    "load_idx_dataset",
    "load_idx_split",
    "load_source",
    "num_classes",
    "preprocess",
    "read_idx",
    "read_into_memory",
    "write_idx",
    "write_idx_dataset",
]
