"""Merge full safetensors checkpoints, streamed: one tensor at a time, written as it finishes.

Each tensor is read from every input, merged by the core
(`jaxmerge.methods.pytree.merge_leaf`) and appended to the output shard being
written. The three steps overlap (`jaxmerge.engine._pipeline`): a reader thread
reads the next tensors' inputs while JAX computes the current merge
(dispatched asynchronously) and a writer thread writes the previous result.
At most `depth` tensors (default: `machine_depth()`) are in flight, so peak memory stays near
depth x (inputs + 2) x the largest tensor whatever the model size. The bytes
written are those of the serial loop (`depth=0`), tensor for tensor.

Every merge is planned the same way: a *layout* lists the output tensors and,
for each, which tensor of which checkpoint feeds each input of the merge (the
base first when there is one) and that tensor's parameters. Merging N
same-shaped checkpoints is the identity layout (`identity_layout`); recipes
with layer slices ("frankenmerges") or per-layer parameter gradients give
other layouts (`jaxmerge.recipes.plan`). Everything is checked in
`plan_merge` before any tensor is read.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import queue
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import __version__
from jaxmerge.core.selection import flat_rows_shape
from jaxmerge.engine._ahead import AheadCompiler
from jaxmerge.engine._atomic import atomic_directory, lies_inside, stop_if_terminated
from jaxmerge.engine._finite import finite_flags as _finite, host_finite, raise_unless_finite
from jaxmerge.engine._pipeline import PhaseProfile, run_ordered
from jaxmerge.engine._prefetch import default_read_ahead
from jaxmerge.formats.safetensors_io import (
    ALIGN,
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointError,
    ShardWriter,
    TensorInfo,
    aligned_empty,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
)
from jaxmerge.formats.sources import TensorSource, byte_ranges, checkpoint_files, open_checkpoint
from jaxmerge.methods._table import MethodError
from jaxmerge.methods.pytree import bind_method, merge_leaf, path_key


DEFAULT_DEPTH = 2
logger = logging.getLogger(__name__)


def machine_depth() -> int:
    """The pipeline depth that pays on this machine: 0 on a CPU backend with at most 2 cores, else 2.

    Overlap needs a spare core: on XLA:CPU the merge kernels already use every
    core, and on 2 cores overlapping gained nothing while holding two tensors'
    inputs more (Llama-shaped 0.64 GB float32 models, ties: the CLI took 6.5 s
    and 1.32 GB peak RSS serial, 6.9 s and 1.85 GB at depth 2; in a warm process
    3.4 s serial, 4.2 s at depth 2, benchmarks/results/vs_mergekit.md).
    Accelerators and more cores keep the overlap.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jax.default_backend() == "cpu" and cores <= 2:
        return 0
    return DEFAULT_DEPTH


def default_depth() -> int:
    """Tensors in flight (`merge_checkpoints`' `depth`): $JAXMERGE_PIPELINE_DEPTH, else `machine_depth()`."""
    text = os.environ.get("JAXMERGE_PIPELINE_DEPTH", "").strip()
    if not text:
        return machine_depth()
    try:
        depth = int(text)
    except ValueError:
        raise CheckpointError(f"JAXMERGE_PIPELINE_DEPTH must be an integer >= 0, got {text!r}") from None
    if depth < 0:
        raise CheckpointError(f"JAXMERGE_PIPELINE_DEPTH must be an integer >= 0, got {text!r}")
    return depth


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
      prepare: optional `prepare(arrays) -> arrays`, applied to the inputs as read
        (host NumPy arrays, in `sources` order) before they are merged; every
        array it returns has shape `shape` and its input's dtype. For inputs
        that must be made alike first: embedding rows aligned to a merged
        vocabulary (`jaxmerge.recipes.tokenizer`). The inputs may then differ
        in shape.
      shape: the prepared inputs' (and the output's) shape; with `prepare` only.
    """

    name: str
    sources: tuple[tuple[int, str], ...]
    has_base: bool = False
    params: Mapping[str, Any] | None = None
    prepare: Callable[[list[np.ndarray]], list[np.ndarray]] | None = field(default=None, compare=False)
    shape: tuple[int, ...] | None = None


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
    depth: int = DEFAULT_DEPTH  # tensors in flight (see merge_checkpoints)
    read_ahead: int = 0  # bytes of inputs the disk reads ahead of the merge (`engine._prefetch.default_read_ahead`)
    profile: dict = field(default_factory=dict)  # seconds per phase of the executed merge (PhaseProfile.as_dict)

    @property
    def largest(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)

    @property
    def estimated_peak_bytes(self) -> int:
        # Per tensor in flight: each input's tensor, the float32 work copy and the result.
        widest = max((len(t.sources) for t in self.layout), default=len(self.inputs))
        return max(1, self.depth) * (widest + 2) * self.largest

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
    if not Path(path).exists():  # tensors computed in memory (formats.sources.ArraySource): no files
        return {"path": str(path), "files": {}}
    files = checkpoint_files(path)
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
    inputs: Sequence[str | os.PathLike | TensorSource],
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
    sources = list(inputs) + ([base] if base else [])
    for src in sources:
        where = Path(src.path if isinstance(src, TensorSource) else src)
        if lies_inside(output, where):
            raise CheckpointError(f"output {output} lies inside input {where}: choose another --output")
    checkpoints = [open_checkpoint(p) for p in sources]
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
        layout=layout, dtype=codes.get("dtype"), given=[str(p.path if isinstance(p, TensorSource) else p) for p in sources], depth=default_depth(),
        read_ahead=default_read_ahead(),
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
        if info.shape != ref.shape and entry.prepare is None:
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
    return TensorInfo(entry.name, tuple(entry.shape) if entry.prepare is not None else ref.shape, dtype)


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike | TensorSource],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    base: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool | str = True,
    mesh=None,
    params_for: Callable[[str], dict] | None = None,
    layout: Sequence[OutputTensor] | Callable[[list[Checkpoint]], Sequence[OutputTensor]] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    allow_nonfinite: bool = False,
    finish: Callable[[Path, MergePlan], None] | None = None,
    record: Mapping[str, Any] | None = None,
    depth: int | None = None,
    processes=None,
    **params,
) -> MergePlan:
    """Merge safetensors checkpoints tensor by tensor into `output` (a directory).

    Args:
      inputs: checkpoints: a .safetensors file, an index JSON, a directory with either, a PyTorch
        `.bin` checkpoint, or an opened `TensorSource` (`jaxmerge.formats.sources.open_checkpoint`).
      output: the directory to create (atomically: complete or absent).
      method: any method of the table (`jaxmerge methods`).
      weights: one per input (default 1.0 each): the method's `weight`.
      seed: random methods' key is `jax.random.key(seed)`; tensor `name` uses `path_key(key, name)`.
      base: optional base checkpoint: task vectors are `input - base`, the result `base + merged`.
      max_shard_size: output shard size ("5GB", "500MB", bytes).
      force: replace an existing output.
      progress: show a progress bar over the output's bytes; a string is the bar's label
        (default "merging").
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
      processes: a `jaxmerge.engine.distributed.Processes` group: this process
        merges and writes its share of the output shards, process 0 the index
        and model files (same bytes as one process). None: merge alone.
      depth: tensors in flight at once: reading the next inputs, merging and
        writing overlap in three threads, and peak memory is about
        `depth x (inputs + 2) x` the largest tensor (`plan.estimated_peak_bytes`).
        0 merges one tensor after the other in the calling thread. None:
        $JAXMERGE_PIPELINE_DEPTH, else `machine_depth()` (0 on a 2-core CPU machine,
        2 elsewhere). The output is the same for every depth.
      **params: the method's parameters (`density=0.2`, ...).

    Returns:
      The executed plan. The output holds model.safetensors (or shards and an
      index) whose metadata records the recipe, the seed and the jaxmerge version.
      Within each shard the tensors' bytes lie grouped by kernel (`in_compile_order`),
      the order they are merged in; `plan.shards` lists them so.
      `plan.profile` holds the seconds of each phase (read, dispatch, compile,
      wait, write, sync, wall; see `jaxmerge.engine._pipeline.PhaseProfile`); it is
      logged at INFO level, and $JAXMERGE_PROFILE=1 prints it on stderr
      ($JAXMERGE_PROFILE=<file>.json writes it there as JSON).
    """
    profile = PhaseProfile()
    started = time.perf_counter()
    with profile.phase("plan"):
        try:
            plan, checkpoints, _ = plan_merge(
                inputs, output, method=method, weights=weights, seed=seed, base=base,
                max_shard_size=max_shard_size, params_for=params_for, layout=layout, dtype=dtype, out_dtype=out_dtype,
                **params,
            )
        except BaseException:
            if processes is not None:
                processes.all_true(False)  # the other processes wait for this one's plan
            raise
        if processes is not None and not processes.all_true(True):
            raise CheckpointError(f"{output}: another merging process could not plan the merge; nothing was written")
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise CheckpointError(f"depth must be an integer >= 0, got {depth!r}")
        plan.depth = depth
    plan.extra_record = dict(record or {})
    metadata = {"format": "pt", "jaxmerge_version": __version__, "jaxmerge_recipe": json.dumps(plan.recipe())}
    # Only random methods read the key (creating one compiles two small programs, ~0.2 s here).
    key = jax.random.key(seed) if any(spec.random for spec, _ in plan.bound.values()) else None
    names = shard_names(len(plan.shards))
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.tensors)
    entries = {e.name: e for e in plan.layout}
    views = _merge_views(plan, mesh)
    copies = {info.name for info in plan.tensors if _is_copy(entries[info.name], info, checkpoints, plan)}
    signatures = {info.name: None if info.name in copies else
                  _kernel_signature(entries[info.name], info, checkpoints, plan, views.get(info.name))
                  for info in plan.tensors}
    plan.shards = in_compile_order(plan.shards, signatures)
    # (shard number, position in the shard, tensor): the order of the output's bytes.
    items = [(s, i, info) for s, shard in enumerate(plan.shards) for i, info in enumerate(shard)]
    if processes is not None:  # this process writes its share of the shards (jaxmerge.engine.distributed)
        from jaxmerge.engine import distributed

        owners = distributed.assign_shards([sum(t.nbytes for t in shard) for shard in plan.shards], processes.count)
        items = [item for item in items if owners[item[0]] == processes.index]
    writers: dict[int, ShardWriter] = {}
    arenas = _Arenas(max(1, plan.depth), max((_arena_bytes(e, checkpoints) for e in plan.layout), default=0))
    ahead = _ahead_compiler(items, signatures, entries, views, checkpoints, plan, key, mesh, allow_nonfinite)

    # The plan knows the output's size: a disk without room for it fails before anything is written.
    def finalize(tmp: Path) -> None:
        with profile.phase("finish"):
            if len(plan.shards) > 1:
                write_index(tmp, plan.shards, names, {"jaxmerge_version": __version__})
            (tmp / "jaxmerge_recipe.json").write_text(json.dumps({**plan.recipe(), "jaxmerge_version": __version__}, indent=2) + "\n")
            if finish is not None:
                finish(tmp, plan)

    if processes is None:
        output_directory = atomic_directory(plan.output, force=force, expected_bytes=total)
    else:  # every process writes into one temporary; process 0 finalizes it once all succeeded
        output_directory = distributed.shared_atomic_directory(plan.output, processes, force=force, finalize=finalize)
    with profile.compiles(), output_directory as tmp, ahead, tqdm(
        total=total, unit="B", unit_scale=True, desc=progress if isinstance(progress, str) else "merging",
        disable=not progress
    ) as bar:

        def read(item):
            with profile.phase("read"):
                arena = arenas.take()
                info = item[2]
                return arena, _read_sources(entries[info.name], info, checkpoints, arena, views.get(info.name),
                                            copy=info.name in copies)

        def dispatch(item, read_result):
            arena, leaves = read_result
            with profile.phase("compile_wait"):
                ahead.wait(signatures[item[2].name])
            with profile.phase("dispatch"):
                return arena, _dispatch_merge(entries[item[2].name], item[2], leaves, checkpoints, plan, key, mesh, allow_nonfinite)

        def write(item, dispatched):
            arena, pending = dispatched
            del dispatched
            shard, position, info = item
            if position == 0:  # the shard's header is written (and its room checked) before its first tensor
                with profile.phase("write"):
                    writers[shard] = ShardWriter(tmp / names[shard], plan.shards[shard], metadata)
            with profile.phase("wait"):
                array = _result(pending)
            with profile.phase("write"):
                writers[shard].write(info.name, array.reshape(info.shape))
                # The merge is computed and written: nothing reads this tensor's inputs any more.
                del array, pending
                arenas.give_back(arena)
            if position == len(plan.shards[shard]) - 1:
                with profile.phase("sync"):
                    writers.pop(shard).close()
            bar.update(info.nbytes)
            bar.set_postfix_str(info.name[-40:], refresh=False)

        try:
            advised = run_ordered(
                items, read, dispatch, write, depth=plan.depth, between=stop_if_terminated,
                ranges=[byte_ranges((checkpoints[i], name) for i, name in entries[info.name].sources)
                        for _, _, info in items], read_ahead=plan.read_ahead)
        finally:
            for writer in writers.values():  # a shard left open by an error: its file is discarded
                writer.abort()
        if processes is None:
            finalize(tmp)
    profile.add("wall", time.perf_counter() - started)
    profile.add("compile_ahead", ahead.seconds)
    profile.count("tensors", len(items))
    profile.count("depth", plan.depth)
    if advised:  # inputs that were not in memory: a first merge's disk time shows here
        profile.count("read_ahead_mb", max(1, round(advised / (1 << 20))))
    plan.profile = profile.as_dict()
    _report_profile(plan, profile)
    return plan


def in_compile_order(shards: list[list[TensorInfo]], signatures: Mapping[str, Hashable | None]) -> list[list[TensorInfo]]:
    """Each shard's tensors in the order that lets compilation overlap merging: tensors merged without a
    kernel first, then each kernel's tensors together, the kernel with the most bytes to merge first.

    In a checkpoint's own order the first layer meets every kernel at once, so a first run waits for
    each compilation in turn (TinyLlama-shaped ties: ~3.4 s of 5 kernels). Grouped, only the first
    kernel is waited for: the others compile in the background (`_ahead_compiler`) while the largest
    group merges. Which tensors each shard holds does not change, only where their bytes lie in it
    (readers find tensors by the header); within a group the checkpoint's order is kept.

    Args:
      shards: the planned shards' tensors.
      signatures: tensor name -> its kernel signature (`_kernel_signature`), None without a kernel.

    Returns:
      The shards, each reordered.
    """
    work: collections.Counter = collections.Counter()
    first: dict[Hashable | None, int] = {}
    for position, info in enumerate(info for shard in shards for info in shard):
        signature = signatures[info.name]
        work[signature] += info.nbytes
        first.setdefault(signature, position)

    def rank(info: TensorInfo) -> tuple:
        signature = signatures[info.name]
        return signature is not None, -work[signature], first[signature]

    return [sorted(shard, key=rank) for shard in shards]


def _report_profile(plan: MergePlan, profile: PhaseProfile) -> None:
    """Log the profile; $JAXMERGE_PROFILE=1 prints it on stderr, =<path> writes it as JSON."""
    logger.info("merged %s: %s", plan.output, profile.line())
    where = os.environ.get("JAXMERGE_PROFILE", "").strip()
    if not where or where == "0":
        return
    if where in ("1", "stderr"):
        print(f"jaxmerge: profile: {profile.line()}", file=sys.stderr, flush=True)
        return
    try:
        Path(where).write_text(json.dumps({"output": str(plan.output), **plan.profile}, indent=1) + "\n")
    except OSError as err:
        logger.warning("cannot write the profile to %s: %s", where, err)


class _Arenas:
    """Host buffers for the inputs of the tensors in flight, reused from tensor to tensor.

    Fresh memory costs a page fault (and the kernel's zeroing) per page on its
    first write: reading into reused buffers is 2-3x faster than reading into
    new ones. There is one arena per tensor in flight (`depth`), each the size
    of the widest tensor's inputs; the reader takes one, the writer gives it
    back once the tensor's merge is computed and written (the JAX arrays
    aliasing it are no longer read). Allocated on first use.
    """

    def __init__(self, count: int, nbytes: int):
        self._nbytes = nbytes
        self._count = count
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def take(self) -> np.ndarray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            # The first `count` tensors, and after an error; a fresh buffer is always correct.
            return aligned_empty(self._nbytes)

    def give_back(self, arena: np.ndarray) -> None:
        if self._free.qsize() < self._count:
            self._free.put(arena)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _arena_bytes(entry: OutputTensor, checkpoints) -> int:
    """Bytes of one output tensor's inputs, each starting ALIGN-aligned."""
    return sum(_aligned(checkpoints[i].tensors[name].nbytes) for i, name in entry.sources)


def _merge_views(plan: MergePlan, mesh) -> dict[str, tuple[int, int]]:
    """Output tensor -> the shape its inputs are merged in, where it may differ from theirs.

    An entry-wise merge (`Method.merges_entrywise`) gives the same values for any
    reshape of its tensors, so every tensor of one size is merged in one 2-D view
    (`selection.flat_rows_shape`): a matrix and its transpose (a Llama's up and
    down projections) share one compiled kernel instead of two. Not with a mesh:
    the tensors are sharded along their own axes.
    """
    if mesh is not None:
        return {}
    views = {}
    for info in plan.tensors:
        spec, bound = plan.bound.get(info.name, (None, None))
        view = flat_rows_shape(math.prod(info.shape)) if info.shape else None
        if spec is not None and view is not None and view != tuple(info.shape) and spec.merges_entrywise(bound):
            views[info.name] = view
    return views


def _ahead_compiler(items, signatures, entries, views, checkpoints, plan: MergePlan, key, mesh,
                    allow_nonfinite) -> AheadCompiler:
    """Compile each kernel signature's dispatch (cast, finite check, merge) on abstract inputs, in plan order,
    in a background thread (`jaxmerge.engine._ahead`).

    Not with a mesh: the inputs are placed on it when read, and their shardings are part of the kernels.
    One thread: on 2 cores (measured once, with other jobs running) a second one did not shorten the
    first, uncached run of a Llama-shaped merge, whose kernels already use both cores.
    """
    if mesh is not None:
        return AheadCompiler([])

    def prepare(info: TensorInfo) -> Callable[[], object]:
        entry = entries[info.name]
        abstract = tuple(jax.ShapeDtypeStruct(shape, DTYPES[code])
                         for shape, code in _input_specs(entry, checkpoints, views.get(info.name)))

        def dispatch_abstract(leaves):
            _, (merged, flags, _) = _dispatch_merge(entry, info, ("float", list(leaves)), checkpoints, plan, key,
                                                    mesh, allow_nonfinite)
            return merged, flags

        return lambda: jax.eval_shape(dispatch_abstract, abstract)

    return AheadCompiler([(signatures[info.name], prepare(info)) for _, _, info in items
                          if signatures[info.name] is not None])


def _kernel_signature(entry: OutputTensor, info: TensorInfo, checkpoints, plan: MergePlan,
                      view: tuple[int, ...] | None) -> tuple | None:
    """What decides which kernels merge this tensor: its inputs' shapes and dtypes, the cast and the bound
    method; None for a tensor merged without a kernel (integers, passed through)."""
    if info.dtype not in FLOAT_DTYPES:
        return None
    spec, bound = plan.bound[info.name]
    return _input_specs(entry, checkpoints, view), plan.dtype, entry.has_base, spec.name, repr(sorted(bound.items()))


def _is_copy(entry: OutputTensor, info: TensorInfo, checkpoints, plan: MergePlan) -> bool:
    """This floating tensor is written as its one input's bytes: the method returns that input unchanged
    (`Method.returns_input`: passthrough without a scale) and nothing casts it. No kernel compiles or runs
    for it; its finite check reads the host bytes (`_finite.host_finite`)."""
    if info.dtype not in FLOAT_DTYPES or len(entry.sources) != 1:
        return False
    spec, bound = plan.bound[info.name]
    index, name = entry.sources[0]
    dtype = checkpoints[index].tensors[name].dtype
    return spec.returns_input(bound) and dtype == info.dtype and plan.dtype in (None, dtype)


def _input_specs(entry: OutputTensor, checkpoints, view: tuple[int, ...] | None) -> tuple:
    """(shape, safetensors dtype code) of each input of the merge, as `_read_sources` hands them to it."""
    return tuple((view or entry.shape or checkpoints[i].tensors[name].shape, checkpoints[i].tensors[name].dtype)
                 for i, name in entry.sources)


def _read_sources(entry: OutputTensor, info: TensorInfo, checkpoints, arena: np.ndarray | None = None,
                  view: tuple[int, ...] | None = None, copy: bool = False) -> tuple[str, Any]:
    """Read one output tensor's inputs (the reader thread): ("int", array), ("copy", array) for a tensor
    written as it is read (`_is_copy`), or ("float", JAX arrays).

    With `arena` (ALIGN-aligned uint8, `_arena_bytes(entry)` long) the inputs are read into it,
    one after the other; the results are views of it. With `view` the float inputs are
    reshaped to it (free: the bytes stay where they are; see `_merge_views`).
    """
    sources = [(checkpoints[i], name) for i, name in entry.sources]
    leaves, offset = [], 0
    for c, name in sources:
        size = c.tensors[name].nbytes
        into = arena[offset : offset + size] if arena is not None and offset + size <= arena.nbytes else None
        leaves.append(c.read_host(name, into))
        offset += _aligned(size)
    if info.dtype not in FLOAT_DTYPES:
        # Integer buffers (position ids, step counters) are not task vectors: they must agree.
        if any(not np.array_equal(leaves[0], leaf) for leaf in leaves):
            raise CheckpointError(f"tensor {info.name} ({info.dtype}) differs across inputs and cannot be merged")
        return "int", leaves[0]
    if entry.prepare is not None:
        leaves = [np.asarray(x) for x in entry.prepare(leaves)]
    if copy:
        return "copy", leaves[0]
    if view is not None:
        leaves = [x.reshape(view) for x in leaves]
    # The aligned host buffers become JAX arrays without a copy (no NumPy or JAX copy on the way).
    return "float", [jax.device_put(x, may_alias=True) for x in leaves]


def _dispatch_merge(entry: OutputTensor, info: TensorInfo, read: tuple[str, Any], checkpoints, plan: MergePlan,
                    key, mesh, allow_nonfinite):
    """Start one tensor's merge (JAX dispatches asynchronously); `_result` waits for it."""
    kind, leaves = read
    if kind == "int":
        return kind, leaves
    sources = [(checkpoints[i], name) for i, name in entry.sources]
    if kind == "copy":
        return kind, (leaves, allow_nonfinite or host_finite(leaves), sources)
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
    return kind, (merged, flags, sources)


def _result(pending) -> np.ndarray:
    """Wait for a dispatched merge; stop on non-finite inputs (one line naming the file and tensor)."""
    kind, value = pending
    if kind == "int":
        return value
    if kind == "copy":
        array, finite, sources = value
        raise_unless_finite([finite], [(ckpt.path, f"tensor {name}") for ckpt, name in sources])
        return array
    merged, flags, sources = value
    if flags is not None:
        raise_unless_finite(flags, [(ckpt.path, f"tensor {name}") for ckpt, name in sources])
    result = np.asarray(merged)
    if flags is not None and result.dtype == np.float16 and np.isinf(result).any():
        # Finite inputs, infinite result: the weighted merge left float16's range when cast back.
        raise CheckpointError(
            f"tensor {sources[-1][1]}: the merged values exceed float16's range (65504); merge to float32 "
            "(a recipe's out_dtype: float32) or pass --allow-nonfinite (allow_nonfinite=True) to keep inf"
        )
    return result
