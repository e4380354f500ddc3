"""Always-sparse training: Flax layers whose memory and compute are linear in their connections.

``import sparsejax.nn as sjnn``: layers (:class:`SparseDense`, :class:`SparseConv`
for linen; :mod:`sparsejax.nn.nnx` for flax.nnx) and the transformations that train
and rewire them (:func:`gse`, :func:`rigl`, :func:`set`), composed with any optax
optimizer. The module docstrings of :mod:`sparsejax.nn.layers` and
:mod:`sparsejax.nn.growth` show the training step. :func:`sparse_apply` runs an
unchanged linen model on the compact kernels of a masked model (``sj.compact``).
"""

from sparsejax.nn import nnx
from sparsejax.nn.connections import connection_count, random_connections
from sparsejax.nn.growth import AlwaysSparseState, gse, rigl, set, topology  # noqa: A004
from sparsejax.nn.inference import RowKernel, SlotKernel, prepare, runtime_bytes, sparse_apply
from sparsejax.nn.kernels import pair_gradients, sparse_matmul
from sparsejax.nn.layers import SparseConv, SparseDense, summary
from sparsejax.nn.sparsify import CompactLayer, sparsify

__all__ = [
    "AlwaysSparseState",
    "CompactLayer",
    "RowKernel",
    "SlotKernel",
    "SparseConv",
    "SparseDense",
    "connection_count",
    "gse",
    "nnx",
    "pair_gradients",
    "prepare",
    "random_connections",
    "rigl",
    "runtime_bytes",
    "set",
    "sparse_apply",
    "sparse_matmul",
    "sparsify",
    "summary",
    "topology",
]
