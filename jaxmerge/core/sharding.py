"""Place tensors on a device mesh so that merges run with JAX's SPMD partitioning.

Every jaxmerge function accepts arrays sharded with `NamedSharding` and returns
results with the same sharding, without gathering a whole tensor onto one
device (magnitude selection counts per shard and all-reduces scalars and
per-row counts). Random masks use threefry, which is partitionable
(`jax_threefry_partitionable`, on by default since JAX 0.5): the same key gives
the same mask whatever the number of devices.

Several hosts: call `jax.distributed.initialize(coordinator_address=...,
num_processes=..., process_id=...)` in every process before building the mesh
from `jax.devices()` (all hosts' devices); each process then holds its own
shards, and the same program runs everywhere.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(num_devices: int | None = None, axis_name: str = "devices") -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got num_devices={num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (axis_name,))


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `AxisType.Auto`, the partitioning jaxmerge's kernels are written for.

    `jax.make_mesh` gives explicit axes by default (JAX 0.10): sharding then
    becomes part of every type, and operations without a sharding rule for
    their operands (a sort along a sharded axis in the selection's sample)
    are refused. On auto axes XLA partitions the same kernels itself. Same
    devices, same axis names and sizes.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Shard a tensor's first axis that divides evenly over the mesh's first axis; else replicate.

    The sharding is on `auto_axes(mesh)`.
    """
    mesh = auto_axes(mesh)
    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    for dim, length in enumerate(shape):
        if length % size == 0 and length >= size:
            return NamedSharding(mesh, P(*([None] * dim), axis))
    return NamedSharding(mesh, P())


def shard(x, mesh: Mesh | None):
    """`x` placed on `mesh` (unchanged when mesh is None)."""
    if mesh is None:
        return x
    return jax.device_put(x, leaf_sharding(np.shape(x), mesh))
