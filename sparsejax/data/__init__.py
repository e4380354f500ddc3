"""Dataset loading: a built-in IDX reader for MNIST and Fashion-MNIST."""

from sparsejax.data.idx import (
    batches,
    load_idx_dataset,
    read_idx,
    write_idx,
    write_idx_dataset,
)

__all__ = ["batches", "load_idx_dataset", "read_idx", "write_idx", "write_idx_dataset"]
