"""Merge full safetensors checkpoints, streamed: one tensor at a time, written as it finishes.

Peak memory stays near (inputs + 2) x the largest tensor whatever the model
size: each tensor is read from every input (memory-mapped), merged by the core
(`jaxmerge.methods.pytree.merge_leaf`) and appended to the output shard being written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxmerge import __version__
from jaxmerge.io._atomic import atomic_directory, lies_inside, stop_if_terminated
from jaxmerge.methods._table import MethodError
from jaxmerge.methods.pytree import bind_method, merge_leaf, path_key
from jaxmerge.io.safetensors_io import (
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointError,
    ShardWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
)


@dataclass
class MergePlan:
    """What a merge will do, known before any tensor is read."""

    inputs: list[Path]
    base: Path | None
    output: Path
    method: str
    params: dict
    seed: int
    tensors: list[TensorInfo]
    shards: list[list[TensorInfo]] = field(default_factory=list)
    params_for: Callable[[str], dict] | None = None
    bound: dict = field(default_factory=dict)  # tensor name -> (Method, bound parameters)

    @property
    def largest(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)

    @property
    def estimated_peak_bytes(self) -> int:
        # Each input's tensor, the base's, the float32 work copy and the result.
        return (len(self.inputs) + (self.base is not None) + 2) * self.largest

    def recipe(self) -> dict:
        return {
            "method": self.method,
            "inputs": [str(p) for p in self.inputs],
            "base": str(self.base) if self.base else None,
            "parameters": self.params,
            "seed": self.seed,
        }

    def describe(self) -> str:
        lines = [
            f"merge {len(self.inputs)} checkpoints with {self.method} into {self.output}",
            f"  parameters {self.params}, seed {self.seed}"
            + (f", base {self.base}" if self.base else ""),
            f"  {len(self.tensors)} tensors, {sum(t.nbytes for t in self.tensors) / 1e9:.3f} GB out,"
            f" {len(self.shards)} shard(s); estimated peak memory {self.estimated_peak_bytes / 1e9:.3f} GB",
        ]
        lines += [f"  {t.name:<60} {t.dtype:<5} {list(t.shape)}" for t in self.tensors]
        return "\n".join(lines)


def plan_merge(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    base: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    params_for: Callable[[str], dict] | None = None,
    **params,
) -> tuple[MergePlan, list[Checkpoint], Checkpoint | None]:
    """Open every input and check everything that can be checked before merging.

    The method's parameters are bound (validated) for every tensor here, so a
    bad value stops the merge before any tensor is read.

    Raises:
      CheckpointError (a ValueError): one line naming the file and tensor.
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
    bind_method(method, params, len(inputs), base is not None)  # fail fast, before opening files
    output = Path(output)
    sources = [Path(p) for p in inputs] + ([Path(base)] if base else [])
    for src in sources:
        if lies_inside(output, src):
            raise CheckpointError(f"output {output} lies inside input {src}: choose another --output")
    checkpoints = [Checkpoint(p) for p in inputs]
    base_ckpt = Checkpoint(base) if base else None
    reference = checkpoints[0]
    for other in checkpoints[1:] + ([base_ckpt] if base_ckpt else []):
        for name, info in reference.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                raise CheckpointError(f"{other.path}: tensor {name} is missing (present in {reference.path})")
            if theirs.shape != info.shape:
                raise CheckpointError(
                    f"{other.path}: tensor {name} has shape {list(theirs.shape)}, {reference.path} has {list(info.shape)}"
                )
            if theirs.dtype != info.dtype:
                raise CheckpointError(
                    f"{other.path}: tensor {name} has dtype {theirs.dtype}, {reference.path} has {info.dtype}"
                )
        extra = sorted(set(other.tensors) - set(reference.tensors))
        if extra:
            raise CheckpointError(f"{reference.path}: tensor {extra[0]} is missing (present in {other.path})")
    tensors = list(reference.tensors.values())
    plan = MergePlan(
        inputs=[c.path for c in checkpoints], base=base_ckpt.path if base_ckpt else None, output=output,
        method=method, params=params, seed=seed, tensors=tensors, params_for=params_for,
    )
    for info in tensors:
        per_tensor = {**params, **(params_for(info.name) if params_for else {})}
        try:
            plan.bound[info.name] = bind_method(
                method, per_tensor, len(inputs), base is not None
            )
        except MethodError as err:
            raise MethodError(f"tensor {info.name}: {err}") from None
    plan.shards = plan_shards(tensors, parse_size(max_shard_size))
    return plan, checkpoints, base_ckpt


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    base: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
    mesh=None,
    params_for: Callable[[str], dict] | None = None,
    **params,
) -> MergePlan:
    """Merge safetensors checkpoints tensor by tensor into `output` (a directory).

    Args:
      inputs: checkpoints: a .safetensors file, an index JSON, or a directory with either.
      output: the directory to create (atomically: complete or absent).
      method: any method of the table (`jaxmerge methods`).
      weights: one per input (default 1.0 each): the method's `weight`.
      seed: random methods' key is `jax.random.key(seed)`; tensor `name` uses `path_key(key, name)`.
      base: optional base checkpoint: task vectors are `input - base`, the result `base + merged`.
      max_shard_size: output shard size ("5GB", "500MB", bytes).
      force: replace an existing output.
      progress: show a progress bar over tensors.
      mesh: optional `jax.sharding.Mesh`: each tensor is sharded over it for the merge.
      params_for: optional `params_for(tensor_name) -> dict` of per-tensor parameter
        overrides (recipes' gradients and filters).
      **params: the method's parameters (`density=0.2`, ...).

    Returns:
      The executed plan. The output holds model.safetensors (or shards and an
      index) whose metadata records the recipe, the seed and the jaxmerge version.
    """
    plan, checkpoints, base_ckpt = plan_merge(
        inputs, output, method=method, weights=weights, seed=seed, base=base,
        max_shard_size=max_shard_size, params_for=params_for, **params,
    )
    metadata = {"format": "pt", "jaxmerge_version": __version__, "jaxmerge_recipe": json.dumps(plan.recipe())}
    key = jax.random.key(seed)
    names = shard_names(len(plan.shards))
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.tensors)
    with atomic_directory(plan.output, force=force) as tmp, tqdm(
        total=total, unit="B", unit_scale=True, desc="merging", disable=not progress
    ) as bar:
        for shard, filename in zip(plan.shards, names):
            writer = ShardWriter(tmp / filename, shard, metadata)
            try:
                for info in shard:
                    stop_if_terminated()
                    writer.write(info.name, _merge_tensor(info, checkpoints, base_ckpt, plan, key, mesh))
                    bar.update(info.nbytes)
                    bar.set_postfix_str(info.name[-40:], refresh=False)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        if len(plan.shards) > 1:
            write_index(tmp, plan.shards, names, {"jaxmerge_version": __version__})
        (tmp / "jaxmerge_recipe.json").write_text(json.dumps({**plan.recipe(), "jaxmerge_version": __version__}, indent=2) + "\n")
    return plan


def _merge_tensor(info: TensorInfo, checkpoints, base_ckpt, plan: MergePlan, key, mesh) -> np.ndarray:
    if info.dtype not in FLOAT_DTYPES:
        leaves = [c.read(info.name) for c in checkpoints]
        base = base_ckpt.read(info.name) if base_ckpt else None
        # Integer buffers (position ids, step counters) are not task vectors: they must agree.
        reference = base if base is not None else leaves[0]
        if any(not np.array_equal(reference, leaf) for leaf in leaves):
            raise CheckpointError(f"tensor {info.name} ({info.dtype}) differs across inputs and cannot be merged")
        return reference
    # Read into JAX directly: a NumPy copy on the way would double the inputs' memory.
    leaves = [c.read(info.name, framework="flax") for c in checkpoints]
    base = base_ckpt.read(info.name, framework="flax") if base_ckpt else None
    spec, bound = plan.bound[info.name]
    merged = merge_leaf(
        leaves, spec, bound, base=base, key=path_key(key, info.name) if spec.random else None, mesh=mesh,
    )
    return np.asarray(merged)
