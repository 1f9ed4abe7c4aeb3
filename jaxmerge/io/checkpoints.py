"""Merge full safetensors checkpoints, streamed: one tensor at a time, written as it finishes.

Peak memory stays near (inputs + 2) x the largest tensor whatever the model
size: each tensor is read from every input (memory-mapped), merged by the core
(`jaxmerge.methods.pytree.merge_leaf`) and appended to the output shard being written.

Every merge is planned the same way: a *layout* lists the output tensors and,
for each, which tensor of which checkpoint feeds each input of the merge (the
base first when there is one) and that tensor's parameters. Merging N
same-shaped checkpoints is the identity layout (`identity_layout`); recipes
with layer slices ("frankenmerges") or per-layer parameter gradients give
other layouts (`jaxmerge.io.recipe_plan`). Everything is checked in
`plan_merge` before any tensor is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import __version__
from jaxmerge.io._atomic import atomic_directory, lies_inside, stop_if_terminated
from jaxmerge.methods._table import MethodError
from jaxmerge.methods.pytree import bind_method, merge_leaf, path_key
from jaxmerge.io.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointError,
    ShardWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    resolve_files,
    shard_names,
    write_index,
)

# mergekit's dtype names (recipes' `dtype` / `out_dtype`) -> safetensors codes.
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and where it comes from.

    Args:
      name: the tensor's name in the output.
      sources: `(checkpoint index, tensor name)` for each input of the merge,
        the base first when `has_base`.
      has_base: `sources[0]` is the base model.
      params: this tensor's method parameters (per-model ones aligned with the
        sources other than the base); None: the plan-wide parameters.
    """

    name: str
    sources: tuple[tuple[int, str], ...]
    has_base: bool = False
    params: Mapping[str, Any] | None = None


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
    layout: list[OutputTensor] = field(default_factory=list)
    dtype: str | None = None  # inputs are cast to this safetensors code when read
    given: list[str] = field(default_factory=list)  # the inputs as the caller named them
    extra_record: dict = field(default_factory=dict)

    @property
    def largest(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)

    @property
    def estimated_peak_bytes(self) -> int:
        # Each input's tensor, the float32 work copy and the result.
        widest = max((len(t.sources) for t in self.layout), default=len(self.inputs))
        return (widest + 2) * self.largest

    def recipe(self) -> dict:
        """The record written beside the output: enough to repeat the merge bit for bit."""
        paths = self.inputs + ([self.base] if self.base else [])
        given = self.given or [str(p) for p in paths]
        return {
            "method": self.method,
            "inputs": given[: len(self.inputs)],
            "base": given[-1] if self.base else None,
            "parameters": self.params,
            "seed": self.seed,
            # Absolute paths and sizes: the record does not depend on the working directory.
            "resolved_inputs": [_describe_files(p) for p in paths],
            **self.extra_record,
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


def _describe_files(path: Path) -> dict:
    found = resolve_files(path)
    files = sorted(set(found.values())) if isinstance(found, dict) else found
    return {
        "path": str(Path(path).resolve()),
        "files": {str(Path(f).resolve()): Path(f).stat().st_size for f in files if Path(f).exists()},
    }


def check_same_tensors(checkpoints: Sequence[Checkpoint]) -> None:
    """Every checkpoint holds the tensors of the first one, and no other (one line naming file and tensor)."""
    reference = checkpoints[0]
    for other in checkpoints[1:]:
        for name in reference.tensors:
            if name not in other.tensors:
                raise CheckpointError(f"{other.path}: tensor {name} is missing (present in {reference.path})")
        extra = sorted(set(other.tensors) - set(reference.tensors))
        if extra:
            raise CheckpointError(f"{reference.path}: tensor {extra[0]} is missing (present in {other.path})")


def identity_layout(checkpoints: Sequence[Checkpoint], base_index: int | None = None) -> list[OutputTensor]:
    """Merge tensor `name` of every checkpoint into tensor `name` (the base, if any, first)."""
    check_same_tensors(list(checkpoints))
    order = ([base_index] if base_index is not None else []) + [i for i in range(len(checkpoints)) if i != base_index]
    return [
        OutputTensor(name, tuple((i, name) for i in order), has_base=base_index is not None)
        for name in checkpoints[0].tensors
    ]


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
    layout: Sequence[OutputTensor] | Callable[[list[Checkpoint]], Sequence[OutputTensor]] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    **params,
) -> tuple[MergePlan, list[Checkpoint], Checkpoint | None]:
    """Open every input and check everything that can be checked before merging.

    The method's parameters are bound (validated) for every tensor here, so a
    bad value stops the merge before any tensor is read.

    Args:
      inputs, method, weights, seed, base, max_shard_size, params_for, **params:
        as `merge_checkpoints`.
      layout: the output tensors (`OutputTensor`), or a function of the opened
        checkpoints returning them; their source indices refer to `inputs`, and
        `base` must be None. None: the identity layout of `inputs` and `base`.
      dtype: cast floating inputs to this dtype when read ("bfloat16", ...).
      out_dtype: write floating outputs in this dtype (default: `dtype`, else
        the inputs' dtype).

    Raises:
      CheckpointError (a ValueError): one line naming the file and tensor.
      MethodError (a ValueError): one line naming the method, parameter and value.
    """
    if not inputs:
        raise CheckpointError("at least one input checkpoint is needed")
    if layout is not None and base is not None:
        raise CheckpointError("with a layout the base is one of the inputs (OutputTensor.has_base), not base=")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(inputs):
            raise CheckpointError(f"got {len(weights)} weights for {len(inputs)} inputs")
        params["weight"] = weights
    params = {k: v for k, v in params.items() if v is not None}
    if layout is None:
        bind_method(method, params, len(inputs), base is not None)  # fail fast, before opening files
    codes = {}
    for key_name, name in (("dtype", dtype), ("out_dtype", out_dtype)):
        if name is not None:
            short = str(name).removeprefix("torch.")
            if short not in DTYPE_NAMES:
                raise CheckpointError(f"{key_name} must be one of {list(DTYPE_NAMES)}, got {name!r}")
            codes[key_name] = DTYPE_NAMES[short]
    output = Path(output)
    sources = [Path(p) for p in inputs] + ([Path(base)] if base else [])
    for src in sources:
        if lies_inside(output, src):
            raise CheckpointError(f"output {output} lies inside input {src}: choose another --output")
    checkpoints = [Checkpoint(p) for p in sources]
    if layout is None:
        layout = identity_layout(checkpoints, len(inputs) if base else None)
    elif callable(layout):
        layout = layout(checkpoints)
    layout = list(layout)
    tensors = [_output_info(entry, checkpoints, codes) for entry in layout]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise CheckpointError(f"the layout writes tensor {next(n for n in names if names.count(n) > 1)} twice")
    base_ckpt = checkpoints[len(inputs)] if base else None
    plan = MergePlan(
        inputs=[c.path for c in checkpoints[: len(inputs)]], base=base_ckpt.path if base_ckpt else None,
        output=output, method=method, params=params, seed=seed, tensors=tensors, params_for=params_for,
        layout=layout, dtype=codes.get("dtype"), given=[str(p) for p in sources],
    )
    for entry, info in zip(layout, tensors):
        per_tensor = {**params, **(entry.params or {}), **(params_for(entry.name) if params_for else {})}
        num_models = len(entry.sources) - entry.has_base
        try:
            plan.bound[info.name] = bind_method(method, per_tensor, num_models, entry.has_base)
        except MethodError as err:
            raise MethodError(f"tensor {info.name}: {err}") from None
    plan.shards = plan_shards(tensors, parse_size(max_shard_size))
    return plan, checkpoints, base_ckpt


def _output_info(entry: OutputTensor, checkpoints: list[Checkpoint], codes: dict) -> TensorInfo:
    """The output tensor's spec; every source must exist and agree in shape (and dtype, unless cast)."""
    if not entry.sources:
        raise CheckpointError(f"output tensor {entry.name} has no source")
    infos = []
    for index, name in entry.sources:
        ckpt = checkpoints[index]
        info = ckpt.tensors.get(name)
        if info is None:
            present = next((checkpoints[i].path for i, n in entry.sources if n in checkpoints[i].tensors), None)
            where = f" (present in {present})" if present is not None else ""
            raise CheckpointError(f"{ckpt.path}: tensor {name} is missing{where}")
        infos.append((ckpt, info))
    ref_ckpt, ref = infos[0]
    for ckpt, info in infos[1:]:
        if info.shape != ref.shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {info.name} has shape {list(info.shape)}, {ref_ckpt.path} has {list(ref.shape)}"
                + (f" ({ref.name})" if ref.name != info.name else "")
            )
        cast = "dtype" in codes and info.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES
        if info.dtype != ref.dtype and not cast:
            raise CheckpointError(
                f"{ckpt.path}: tensor {info.name} has dtype {info.dtype}, {ref_ckpt.path} has {ref.dtype}"
            )
    dtype = ref.dtype
    if dtype in FLOAT_DTYPES:
        dtype = codes.get("out_dtype", codes.get("dtype", dtype))
    return TensorInfo(entry.name, ref.shape, dtype)


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
    layout: Sequence[OutputTensor] | Callable[[list[Checkpoint]], Sequence[OutputTensor]] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    allow_nonfinite: bool = False,
    finish: Callable[[Path, MergePlan], None] | None = None,
    record: Mapping[str, Any] | None = None,
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
        overrides.
      layout: which input tensors make each output tensor (see `plan_merge`).
      dtype, out_dtype: cast floating inputs when read / outputs when written.
      allow_nonfinite: merge inputs holding NaN or inf; by default such a tensor
        stops the merge (one line naming the file and tensor; nothing is written).
      finish: `finish(directory, plan)` writes further files (config.json, a
        model card) into the output before it is moved into place.
      record: more entries for the recorded recipe (jaxmerge_recipe.json).
      **params: the method's parameters (`density=0.2`, ...).

    Returns:
      The executed plan. The output holds model.safetensors (or shards and an
      index) whose metadata records the recipe, the seed and the jaxmerge version.
    """
    plan, checkpoints, _ = plan_merge(
        inputs, output, method=method, weights=weights, seed=seed, base=base,
        max_shard_size=max_shard_size, params_for=params_for, layout=layout, dtype=dtype, out_dtype=out_dtype,
        **params,
    )
    plan.extra_record = dict(record or {})
    metadata = {"format": "pt", "jaxmerge_version": __version__, "jaxmerge_recipe": json.dumps(plan.recipe())}
    key = jax.random.key(seed)
    names = shard_names(len(plan.shards))
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.tensors)
    with atomic_directory(plan.output, force=force) as tmp, tqdm(
        total=total, unit="B", unit_scale=True, desc="merging", disable=not progress
    ) as bar:
        entries = {e.name: e for e in plan.layout}
        for shard, filename in zip(plan.shards, names):
            writer = ShardWriter(tmp / filename, shard, metadata)
            try:
                for info in shard:
                    stop_if_terminated()
                    merged = _merge_tensor(entries[info.name], info, checkpoints, plan, key, mesh, allow_nonfinite)
                    writer.write(info.name, merged)
                    bar.update(info.nbytes)
                    bar.set_postfix_str(info.name[-40:], refresh=False)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        if len(plan.shards) > 1:
            write_index(tmp, plan.shards, names, {"jaxmerge_version": __version__})
        (tmp / "jaxmerge_recipe.json").write_text(json.dumps({**plan.recipe(), "jaxmerge_version": __version__}, indent=2) + "\n")
        if finish is not None:
            finish(tmp, plan)
    return plan


@jax.jit
def _finite(leaves):
    """One flag per input: every entry is finite.

    `x * 0` is 0 for finite entries and NaN for NaN and inf, so the sum is NaN
    exactly when some entry is not finite (no overflow: the summands are 0); a
    sum reduction is 2-3x faster on CPUs than `all(isfinite(x))`.
    """
    return jnp.isfinite(jnp.stack([jnp.sum(x * 0, dtype=jnp.float32) for x in leaves]))


def _merge_tensor(entry: OutputTensor, info: TensorInfo, checkpoints, plan: MergePlan, key, mesh, allow_nonfinite) -> np.ndarray:
    sources = [(checkpoints[i], name) for i, name in entry.sources]
    if info.dtype not in FLOAT_DTYPES:
        leaves = [c.read(name) for c, name in sources]
        # Integer buffers (position ids, step counters) are not task vectors: they must agree.
        if any(not np.array_equal(leaves[0], leaf) for leaf in leaves):
            raise CheckpointError(f"tensor {info.name} ({info.dtype}) differs across inputs and cannot be merged")
        return leaves[0]
    # Read into JAX directly: a NumPy copy on the way would double the inputs' memory.
    leaves = [c.read(name, framework="flax") for c, name in sources]
    if plan.dtype is not None:
        target = jnp.dtype(DTYPES[plan.dtype])
        leaves = [x if x.dtype == target else x.astype(target) for x in leaves]
    # Dispatched before the merge and read after it: the check overlaps the merge instead of waiting for it.
    flags = None if allow_nonfinite else _finite(tuple(leaves))
    base = leaves[0] if entry.has_base else None
    models = leaves[1:] if entry.has_base else leaves
    spec, bound = plan.bound[info.name]
    merged = merge_leaf(
        models, spec, bound, base=base, key=path_key(key, info.name) if spec.random else None, mesh=mesh,
    )
    if flags is not None:
        flags = np.asarray(flags)
        if not flags.all():
            ckpt, name = sources[int(np.argmin(flags))]
            raise CheckpointError(
                f"{ckpt.path}: tensor {name} holds NaN or inf; pass --allow-nonfinite (allow_nonfinite=True) to merge it anyway"
            )
    return np.asarray(merged)
