"""Training over every device of every process, with JAX's own sharding.

The runner puts all devices on a two-axis mesh, ``data`` × ``model``. Each global
batch is split over all of them. By default the ``model`` axis has size 1 and the whole
training state (params, model state, the optimizer state with masks, latent weights,
thresholds, counts and keys, the running metrics) is replicated. With
``config.mesh.model = M > 1`` every state array of at least ``config.mesh.min_shard_size``
elements is split along ``model`` on its largest dimension that ``M`` divides
(FSDP-style): the rule depends on the shape alone, so a param's mask, latent weights
and optimizer moments are split exactly like the param.

The jitted step computes on global arrays, so XLA reduces the gradients and gathers
sharded leaves where it needs them, and every mask update, sampling and threshold runs
once on global arrays: the masks are the same on every device by construction, and the
same as on one device.

Several processes (``jax.distributed``): each reads its own rows of every batch
(:func:`shard_batch`, :func:`process_rows`), and :func:`is_primary` says which one
writes the run's files.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA = "data"
MODEL = "model"
BATCH = PartitionSpec((DATA, MODEL))  # a batch's first axis, split over every device


def make_mesh(model: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """The ``data`` × ``model`` mesh over ``devices`` (default: every device of every process).

  Args:
    model: the size of the ``model`` axis; ``data`` takes the rest.
    devices: the devices, in process order (``jax.devices()``).

  Raises:
    ValueError: when ``model`` does not divide the number of devices.
  """
  devices = np.asarray(devices if devices is not None else jax.devices())
  if model < 1 or devices.size % model:
    raise ValueError(f"config.mesh.model ({model}) must divide the number of devices "
                     f"({devices.size})")
  return Mesh(devices.reshape(-1, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array held whole by every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> NamedSharding:
  """Where an array of ``shape`` lives: split along ``model`` on its largest dimension
  that the axis divides (the first of equals) if it has ``min_size`` elements or more,
  else replicated."""
  ways = mesh.shape[MODEL]
  dims = [d for d, size in enumerate(shape) if size % ways == 0]
  if ways == 1 or not dims or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  dim = max(dims, key=lambda d: shape[d])
  return NamedSharding(mesh, PartitionSpec(*[None] * dim, MODEL))


def state_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
  """A pytree of :func:`leaf_sharding` for every array of ``tree``."""
  return jax.tree.map(lambda x: leaf_sharding(np.shape(x), mesh, min_size), tree)


def place(tree: Any, shardings: Any) -> Any:
  """``tree`` (the same on every process) as global arrays with ``shardings``.

  Each process puts the pieces its own devices hold, so this works with several
  processes as with one.
  """
  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def check_divisible(name: str, size: int, mesh: Mesh) -> None:
  """Raises ValueError unless a batch of ``size`` splits evenly over the mesh's devices."""
  if size % mesh.size:
    raise ValueError(f"config.{name} ({size}) must be a multiple of the number of devices "
                     f"({mesh.size})")


def process_rows(batch: Any) -> Any:
  """This process's contiguous part of the rows of a global batch (all of it on one host)."""
  count, index = jax.process_count(), jax.process_index()
  def rows(x):
    size = len(x) // count
    return x[index * size:(index + 1) * size]
  return jax.tree.map(rows, batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """A global batch from this process's part of it, split over every device.

  Args:
    batch: pytree of host arrays, this process's rows of the global batch (all of it
      on one host).
    mesh: the run's mesh.

  Returns:
    The same pytree of global ``jax.Array``s, sharded along their first axis.
  """
  sharding = NamedSharding(mesh, BATCH)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def is_primary() -> bool:
  """Whether this process writes the run's metrics, TensorBoard events and summary."""
  return jax.process_index() == 0


def bytes_per_device(tree: Any) -> int:
  """The bytes one device holds for the arrays of ``tree`` (the largest share)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def describe(mesh: Mesh, state: Any) -> dict[str, Any]:
  """``{"devices", "processes", "mesh": {axis: size}, "state_bytes_per_device"}`` for the
  run's summary (``state``: the training state, params and optimizer state included)."""
  return {"devices": int(mesh.size), "processes": jax.process_count(),
          "mesh": {name: int(size) for name, size in mesh.shape.items()},
          "state_bytes_per_device": bytes_per_device(state)}
