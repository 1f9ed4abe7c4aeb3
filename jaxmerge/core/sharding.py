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

from typing import Any

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


def explicit_mesh(leaves: list[Any]) -> Mesh | None:
    """The mesh of the first array sharded on explicit axes; None when there is none or when tracing.

    Under a transformation (`jax.jit`, `jax.grad`) some arguments are tracers whose mesh is part of
    their type: moving only the concrete ones would leave the call with two meshes, so nothing moves.
    """
    mesh = None
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return None
        if mesh is None and isinstance(leaf, jax.Array):
            sharding = leaf.sharding
            if isinstance(sharding, NamedSharding) and AxisType.Explicit in sharding.mesh.axis_types:
                mesh = sharding.mesh
    return mesh


def onto_mesh(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` on `mesh`'s devices and axes, but other axis types, moved to `mesh` (same spec).

    Arrays on other devices stay where they are (and a kernel refuses them, as it would have);
    tracers stay too (their mesh is part of their type).
    """
    def move(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            sharding = leaf.sharding
            if (isinstance(sharding, NamedSharding) and sharding.mesh != mesh
                    and auto_axes(sharding.mesh) == auto_axes(mesh)):
                return jax.device_put(leaf, NamedSharding(mesh, sharding.spec))
        return leaf

    return jax.tree_util.tree_map(move, tree)


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
