"""Merge Orbax checkpoints leaf by leaf, streamed: what a JAX user saved, merged without loading whole models.

Flax NNX, MaxText and Gemma-in-JAX users save parameters with Orbax
(`ocp.StandardCheckpointer().save(path, nnx.state(model))`): a directory holding
a `_METADATA` file (the tree's structure) and the arrays in TensorStore (OCDBT).
`merge_orbax` merges such checkpoints with any method of the table:

* Every leaf's path, shape and dtype are read from the metadata and checked
  across inputs and base before any array is read (`plan_orbax`).
* Arrays are read with Orbax's partial restore (`ocp.args.PyTreeRestore` with
  every other leaf an `ocp.PLACEHOLDER`): a group of consecutive leaves at a
  time, a group holding at most max(largest leaf, 32 MB) of an input.
* The output is written by one Orbax save whose tree holds a pending merge
  per leaf: a type handler merges the leaves in Orbax's order and hands them
  to Orbax's own `jax.Array` handler in batches of at most a group's bytes,
  waiting for each batch's write before merging on. The result is an
  ordinary Orbax checkpoint (the files `StandardCheckpointer.save` writes),
  built in a temporary directory beside the output and renamed into place
  when complete (`jaxmerge.engine._atomic`).

Memory: about (sources + 6) x max(largest leaf, 32 MB) above the
interpreter's own, whatever the number of leaves (sources: the inputs and the
base): one group per source, the merge's float32 work arrays for one leaf and
one batch of results. Measured (`benchmarks/orbax_memory.py`, 3 float32
inputs of 0.92 GB in 58 MB leaves, ties, 2 CPU cores): 0.73-0.77 GB peak RSS
streamed (0.24 GB of it the interpreter with JAX and Orbax loaded), against
3.24 GB to restore the three whole and 5.29 GB to restore, `merge_params` and
save.

Each leaf is merged exactly as `jaxmerge.merge_params` merges it: one
`merge_leaf` call with the leaf's PRNG key `path_key(jax.random.key(seed),
leaf_path)`, where `leaf_path` is `jax.tree_util.keystr` of the leaf in the
tree `ocp.StandardCheckpointer().restore(path)` returns (nested dicts and
lists, e.g. `['l1']['kernel']['value']` for an NNX state). So
`merge_params(restored_trees, method=..., key=jax.random.key(seed))` gives the
same bits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core.sharding import leaf_sharding
from jaxmerge.engine._atomic import atomic_directory, lies_inside, stop_if_terminated
from jaxmerge.engine._finite import finite_flags, raise_unless_finite
from jaxmerge.formats.orbax import GroupedLeafReader, LeafInfo, OrbaxCheckpoint, check_orbax_dir, import_orbax
from jaxmerge.formats.orbax import is_orbax_checkpoint  # noqa: F401 - public here before the reader moved
from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.methods import _table as table
from jaxmerge.methods._table import MethodError
from jaxmerge.methods.pytree import bind_method, merge_leaf, path_key

GROUP_FLOOR_BYTES = 32 << 20  # leaves smaller than this are restored together (fewer Orbax calls)


# --- planning ---------------------------------------------------------------------------------

@dataclass
class OrbaxPlan:
    """What an Orbax merge will do, known before any array is read."""

    inputs: list[Path]
    base: Path | None
    output: Path
    method: str
    params: dict
    seed: int
    leaves: list[LeafInfo]
    bound: dict = field(default_factory=dict)  # leaf path -> (Method, bound parameters)

    @property
    def largest(self) -> int:
        return max((leaf.nbytes for leaf in self.leaves), default=0)

    @property
    def group_bytes(self) -> int:
        return max(self.largest, GROUP_FLOOR_BYTES)

    @property
    def estimated_peak_bytes(self) -> int:
        # A group per source, the kernel's float32 work arrays (stacked task vectors,
        # magnitudes, masks: measured about 4 leaves for ties) and a batch of results.
        sources = len(self.inputs) + (self.base is not None)
        return (sources + 6) * self.group_bytes

    def recipe(self) -> dict:
        return {
            "method": self.method,
            "inputs": [str(p.resolve()) for p in self.inputs],
            "base": str(self.base.resolve()) if self.base else None,
            "parameters": self.params,
            "seed": self.seed,
        }

    def describe(self) -> str:
        lines = [
            f"merge {len(self.inputs)} Orbax checkpoints with {self.method} into {self.output}",
            f"  parameters {self.params}, seed {self.seed}" + (f", base {self.base}" if self.base else ""),
            f"  {len(self.leaves)} leaves, {sum(x.nbytes for x in self.leaves) / 1e9:.3f} GB out;"
            f" estimated peak memory {self.estimated_peak_bytes / 1e9:.3f} GB",
        ]
        lines += [f"  {x.path:<60} {str(x.dtype):<9} {list(x.shape)}" for x in self.leaves]
        return "\n".join(lines)


def _check_same_leaves(checkpoints: Sequence[OrbaxCheckpoint]) -> None:
    """Every checkpoint has the first one's leaves, shapes and dtypes (one line naming leaf and files)."""
    ref = checkpoints[0]
    for other in checkpoints[1:]:
        for name, info in ref.leaves.items():
            got = other.leaves.get(name)
            if got is None:
                raise CheckpointError(f"{other.path}: leaf {name} is missing (present in {ref.path})")
            if got.array != info.array or got.shape != info.shape:
                raise CheckpointError(
                    f"{other.path}: leaf {name} has shape {list(got.shape)}, {ref.path} has {list(info.shape)}"
                )
            if got.dtype != info.dtype:
                raise CheckpointError(f"{other.path}: leaf {name} has dtype {got.dtype}, {ref.path} has {info.dtype}")
        extra = [name for name in other.leaves if name not in ref.leaves]
        if extra:
            raise CheckpointError(f"{ref.path}: leaf {extra[0]} is missing (present in {other.path})")


def plan_orbax(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    seed: int = 0,
    params_for: Callable[[str], dict] | None = None,
    **params,
) -> tuple[OrbaxPlan, list[OrbaxCheckpoint], OrbaxCheckpoint | None]:
    """Open every input and check everything checkable before any array is read.

    Args: as `merge_orbax`.

    Returns:
      (plan, input checkpoints, base checkpoint or None).

    Raises:
      CheckpointError (a ValueError): one line naming the file and leaf.
      MethodError (a ValueError): one line naming the method, parameter and value.
    """
    if not inputs:
        raise CheckpointError("at least one input checkpoint is needed")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(inputs):
            raise CheckpointError(f"got {len(weights)} weights for {len(inputs)} inputs")
        params["weight"] = weights
    params = {k: v for k, v in params.items() if v is not None}
    bind_method(method, params, len(inputs), base is not None)  # fail fast, before opening anything
    output = Path(output)
    sources = [Path(p) for p in inputs] + ([Path(base)] if base is not None else [])
    for src in sources:  # every path first: a safetensors input among Orbax ones is named as such
        check_orbax_dir(src)
    for src in sources:
        if lies_inside(output, src):
            raise CheckpointError(f"output {output} lies inside input {src}: choose another output")
    checkpoints = [OrbaxCheckpoint(p) for p in sources]
    _check_same_leaves(checkpoints)
    plan = OrbaxPlan(
        inputs=sources[: len(inputs)], base=sources[len(inputs)] if base is not None else None, output=output,
        method=method, params=params, seed=seed, leaves=list(checkpoints[0].leaves.values()),
    )
    for leaf in plan.leaves:
        if not leaf.floating:
            continue
        per_leaf = {**params, **(params_for(leaf.path) if params_for else {})}
        try:
            plan.bound[leaf.path] = bind_method(method, per_leaf, len(inputs), base is not None)
        except MethodError as err:
            raise MethodError(f"leaf {leaf.path}: {err}") from None
    base_ckpt = checkpoints[len(inputs)] if base is not None else None
    return plan, checkpoints[: len(inputs)], base_ckpt


# --- merging ----------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


@dataclass
class _Pending:
    """A leaf of the output still to be merged: Orbax's saver calls `compute` when it writes it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], jax.Array]


def _merging_registry(budget: int):
    """Orbax's standard type handlers plus one for `_Pending` leaves.

    The `_Pending` handler merges leaves in Orbax's order and writes them in
    batches of about `budget` bytes, waiting for each batch's write.
    """
    ocp = import_orbax()

    arrays = ocp.type_handlers.get_type_handler(jax.Array)

    class PendingHandler(ocp.type_handlers.TypeHandler):
        # Writes through Orbax's own jax.Array handler, so files, metadata and typestr are the standard ones.
        def typestr(self) -> str:
            return arrays.typestr()

        async def metadata(self, infos):
            return await arrays.metadata(infos)

        async def serialize(self, values, infos, args=None):
            args = list(args or [ocp.SaveArgs()] * len(values))
            batch: list[tuple[jax.Array, Any, Any]] = []
            held = 0
            for i, (value, info, arg) in enumerate(zip(values, infos, args)):
                merged = value.compute()
                batch.append((merged, info, arg))
                held += merged.nbytes
                del merged
                if held >= budget or i == len(values) - 1:
                    # Written and waited for before merging on: at most `budget` bytes of results are held.
                    merged_arrays, batch_infos, batch_args = (list(x) for x in zip(*batch))
                    batch, held = [], 0
                    for done in await arrays.serialize(merged_arrays, batch_infos, batch_args):
                        await asyncio.to_thread(done.result)
                    del merged_arrays
            return []

        async def deserialize(self, infos, args=None):
            return await arrays.deserialize(infos, args)

    pairs = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()]
    return ocp.type_handlers.create_type_handler_registry(*pairs, (_Pending, PendingHandler()))


def merge_orbax(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    mesh=None,
    params_for: Callable[[str], dict] | None = None,
    progress: bool = False,
    allow_nonfinite: bool = False,
    **params,
) -> OrbaxPlan:
    """Merge Orbax checkpoints leaf by leaf into a new Orbax checkpoint `output`.

    Peak memory is bounded by the largest leaves, not the model: about
    (inputs + base + 6) x max(largest leaf, 32 MB) above the interpreter's
    own (a group of leaves per source, the merge's float32 work arrays for one
    leaf, one batch of results), whatever the number of leaves; see the module
    docstring for a measurement. Leaves are read with Orbax's partial restore;
    whole models are never restored.

    Args:
      inputs: Orbax PyTree checkpoint directories (`ocp.StandardCheckpointer().save(path, tree)`,
        e.g. `nnx.state(model)`), all with the same leaves, shapes and dtypes.
      output: the Orbax checkpoint directory to create (atomically: complete or absent).
      method: any method of the table (`jaxmerge methods`).
      weights: one per input (default 1.0 each): the method's `weight`.
      base: optional base checkpoint: task vectors are `input - base`, the result `base + merged`.
      seed: random methods' key is `jax.random.key(seed)`; leaf `path` uses `path_key(key, path)`.
      force: replace an existing output.
      mesh: optional `jax.sharding.Mesh`: each leaf is restored straight onto it
        (`NamedSharding` from `jaxmerge.core.sharding.leaf_sharding`), merged
        there and saved sharded.
      params_for: optional `params_for(leaf_path) -> dict` of per-leaf parameter overrides.
      progress: show a progress bar over bytes.
      allow_nonfinite: merge float leaves holding NaN or inf (by default such
        a leaf stops the merge, naming the checkpoint and leaf; nothing is written).
      **params: the method's parameters (`density=0.2`, ...).

    Returns:
      The executed plan. The output's `_CHECKPOINT_METADATA` custom metadata
      holds the recipe (`jaxmerge_recipe`) and the jaxmerge version. Non-float
      leaves (step counters, PRNG keys) must be equal in every input and are
      copied.

    Raises:
      CheckpointError (a ValueError): a directory that is not an Orbax
        checkpoint, a safetensors input, a missing leaf, a shape or dtype
        mismatch (one line naming the file and leaf), all before any array is
        read; a non-float leaf that differs across inputs, or a float leaf
        holding NaN or inf without `allow_nonfinite` (nothing is written).
      MethodError (a ValueError): a bad method, parameter or value.
      FileExistsError: `output` exists and `force` is False.
    """
    ocp = import_orbax()
    from tqdm.auto import tqdm

    from jaxmerge import __version__

    plan, checkpoints, base_ckpt = plan_orbax(
        inputs, output, method=method, weights=weights, base=base, seed=seed, params_for=params_for, **params,
    )
    spec = table.get(method)
    uses_base = base_ckpt is not None and spec.base is not table.BasePolicy.IGNORED
    key = jax.random.key(seed)
    float_sources = checkpoints + ([base_ckpt] if uses_base else [])

    def merge_one(leaf: LeafInfo, leaves: list[Any]) -> jax.Array:
        # Dispatched before the merge and read after it, as in merge_checkpoints.
        flags = None if allow_nonfinite else finite_flags(tuple(jnp.asarray(x) for x in leaves))
        leaf_base = leaves.pop() if uses_base else None
        leaf_spec, bound = plan.bound[leaf.path]
        out = merge_leaf(
            leaves, leaf_spec, bound, base=leaf_base,
            key=path_key(key, leaf.path) if leaf_spec.random else None, mesh=mesh,
        )
        if flags is not None:
            raise_unless_finite(flags, [(src.path, f"leaf {leaf.path}") for src in float_sources])
        return out

    def check_equal(leaf: LeafInfo, leaves: list[Any]) -> Any:
        # Step counters, PRNG keys, strings are not task vectors: they must agree (as in merge_params).
        for src, value in zip(checkpoints[1:], leaves[1:]):
            if not _same(leaves[0], value):
                raise CheckpointError(
                    f"{src.path}: non-float leaf {leaf.path} ({leaf.dtype}) differs from {checkpoints[0].path}"
                    " and cannot be merged"
                )
        return leaves[0]

    # Scalars and strings are tiny: read and settled now, in one restore per source.
    small = [leaf for leaf in plan.leaves if not leaf.array]
    settled = {}
    if small:
        names = [leaf.path for leaf in small]
        columns = [src.read(names) for src in float_sources]
        for j, leaf in enumerate(small):
            leaves = [col[j] for col in columns]
            if leaf.floating:
                settled[leaf.path] = merge_one(leaf, leaves)
            else:
                settled[leaf.path] = check_equal(leaf, leaves[: len(checkpoints)])
    arrays = [leaf for leaf in plan.leaves if leaf.array]
    sharding_of = None if mesh is None else (lambda leaf: leaf_sharding(leaf.shape, mesh))
    float_reader = GroupedLeafReader(float_sources, [x for x in arrays if x.floating], plan.group_bytes, sharding_of)
    other_reader = GroupedLeafReader(checkpoints, [x for x in arrays if not x.floating], plan.group_bytes, sharding_of)

    total = sum(x.nbytes for x in plan.leaves)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress)

    def merged(leaf: LeafInfo) -> jax.Array:
        stop_if_terminated()
        if leaf.floating:
            out = merge_one(leaf, float_reader.take(leaf.path))
        else:
            out = check_equal(leaf, other_reader.take(leaf.path))
        bar.update(leaf.nbytes)
        return out

    def pending(leaf: LeafInfo):
        if not leaf.array:
            return settled[leaf.path]
        return _Pending(leaf.shape, np.dtype(leaf.dtype), lambda leaf=leaf: merged(leaf))

    tree = checkpoints[0]._treedef.unflatten([pending(leaf) for leaf in plan.leaves])
    record = {"jaxmerge_recipe": plan.recipe(), "jaxmerge_version": __version__}
    saver = ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(type_handler_registry=_merging_registry(plan.group_bytes)),
        # Orbax writes straight into our temporary directory; atomic_directory renames it into place.
        temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath,
    )
    try:
        with atomic_directory(plan.output, force=force) as tmp:
            tmp.rmdir()  # Orbax creates the directory it saves into
            saver.save(tmp, args=ocp.args.PyTreeSave(item=tree), custom_metadata=record)
    finally:
        bar.close()
    return plan
