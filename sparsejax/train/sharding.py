"""Data-parallel training over every visible device, with JAX's own sharding.

The runner puts all devices on one mesh axis, ``data``: each global batch is split
along it, and the whole training state (params, model state, the optimizer state with
masks, latent weights, thresholds, counts and keys, the running metrics) is replicated.
The jitted step computes on the global batch, so XLA reduces the gradients across
devices, and every mask update, sampling and threshold runs once on replicated arrays:
masks are identical on every device by construction.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh, ``data``, over ``devices`` (default: every device of this process).

  Raises:
    ValueError: with several processes (``jax.distributed``), which the runner does not
      support yet: its evaluation and files assume one process.
  """
  if jax.process_count() > 1:
    raise ValueError(f"the runner trains on the devices of one process; this is one of "
                     f"{jax.process_count()} (multi-host runs are not supported yet)")
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array held whole by every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(name: str, size: int, mesh: Mesh) -> None:
  """Raises ValueError unless a batch of ``size`` splits evenly over the mesh's devices."""
  if size % mesh.size:
    raise ValueError(f"config.{name} ({size}) must be a multiple of the number of devices "
                     f"({mesh.size})")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` with every array replicated over ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """A global batch from this process's part of it, split along ``data``.

  Args:
    batch: pytree of host arrays, this process's rows of the global batch (all of it
      on one host).
    mesh: the data mesh.

  Returns:
    The same pytree of global ``jax.Array``s, sharded along their first axis.
  """
  sharding = NamedSharding(mesh, PartitionSpec(DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def describe(mesh: Mesh) -> dict[str, Any]:
  """``{"devices": count, "mesh": {axis: size}}`` for the run's summary."""
  return {"devices": int(mesh.size), "mesh": {name: int(size) for name, size in mesh.shape.items()}}
