"""sparsejax: sparse training for any Flax model through its optax chain."""

from sparsejax.config import METHODS, from_config
from sparsejax.masks import keep_small_leaves_dense, masks, summary
from sparsejax.methods.dst import dst, thresholds
from sparsejax.methods.gmp import gmp
from sparsejax.methods.prune import prune
from sparsejax.methods.rigl import rigl
from sparsejax.methods.set import set  # noqa: A004
from sparsejax.methods.static import static_sparse
from sparsejax.wrapper import SparseState, Topology, sparse_wrapper

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SparseState",
    "Topology",
    "dst",
    "from_config",
    "gmp",
    "keep_small_leaves_dense",
    "masks",
    "prune",
    "rigl",
    "set",
    "sparse_wrapper",
    "static_sparse",
    "summary",
    "thresholds",
]
