"""sparsejax: sparse training for any Flax model through its optax chain."""

from sparsejax import schedules, scores
from sparsejax.compact import CompactKernel, compact, compact_bytes
from sparsejax.masks import (
    keep_non_kernels_dense,
    keep_non_weights_dense,
    keep_small_leaves_dense,
    masks,
    summary,
)
from sparsejax.methods.dst import DSTState, dst, thresholds
from sparsejax.methods.dst_ee import ActivityCounts, dst_ee
from sparsejax.methods.gmp import gmp
from sparsejax.methods.gse import GSEState, gse, gse_init
from sparsejax.methods.prune import prune
from sparsejax.methods.rigl import rigl
from sparsejax.methods.set import set  # noqa: A004
from sparsejax.methods.static import static_sparse
from sparsejax.metrics import coverage
from sparsejax.registry import METHODS, from_config, method_config, register_method, variant
from sparsejax.sampling import LayerStatistics
from sparsejax.scores import ScoreInputs
from sparsejax.statistics import value_grad_and_statistics
from sparsejax.topology import drop_and_grow, random_init
from sparsejax.wrapper import SparseState, SparseTransformation, Topology, sparse_wrapper

__version__ = "0.1.0"

__all__ = [
    "ActivityCounts",
    "CompactKernel",
    "DSTState",
    "GSEState",
    "LayerStatistics",
    "METHODS",
    "ScoreInputs",
    "SparseState",
    "SparseTransformation",
    "Topology",
    "compact",
    "compact_bytes",
    "coverage",
    "drop_and_grow",
    "dst",
    "dst_ee",
    "from_config",
    "gmp",
    "gse",
    "gse_init",
    "keep_non_kernels_dense",
    "keep_non_weights_dense",
    "keep_small_leaves_dense",
    "masks",
    "method_config",
    "prune",
    "random_init",
    "register_method",
    "rigl",
    "schedules",
    "scores",
    "set",
    "sparse_wrapper",
    "static_sparse",
    "summary",
    "thresholds",
    "value_grad_and_statistics",
    "variant",
]
