"""`jaxmerge extract-lora`'s run: the first pass of the rank rules, then each module's factors streamed into
adapter_model.safetensors, and the config, card and report, in a directory that appears complete or not at all."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

from jaxmerge import __version__
from jaxmerge.engine._ahead import AheadCompiler
from jaxmerge.engine._atomic import atomic_directory, stop_if_terminated
from jaxmerge.engine._pipeline import run_ordered
from jaxmerge.engine.lapack_threads import limit_lapack_threads
from jaxmerge.formats.safetensors_io import DTYPES, CheckpointError, ShardWriter
from jaxmerge.formats.sources import TensorSource, byte_ranges
from jaxmerge.methods.pytree import path_key
from jaxmerge.tools.extract_lora import svd
from jaxmerge.tools.extract_lora.plan import ExtractionPlan, _lora_infos, _Work, plan_extraction
from jaxmerge.tools.extract_lora.ranks import RankRule, Spectrum, choose_ranks
from jaxmerge.tools.extract_lora.report import REPORT_FILE, _card, _python_invocation, report_dict
from jaxmerge.tools.extract_lora.svd import (
    DEFAULT_MAX_RANK, POWER_ITERATIONS, ModuleReport, _finite, _report, oversampling,
)

__all__ = ["extract_lora_adapter"]


def _host_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float64 where JAX does not take float64 (it would narrow it with a warning), else dtype."""
    return np.dtype(np.float32) if dtype == np.float64 and not jax.config.jax_enable_x64 else dtype


def _host(array: np.ndarray) -> np.ndarray:
    """The array as read, in `_host_dtype`."""
    return array.astype(_host_dtype(array.dtype), copy=False)


def _kernel_args(w: _Work, ft_arr: np.ndarray, base_arr: np.ndarray):
    if w.kind == "conv":
        ft_arr, base_arr = ft_arr.reshape(w.shape), base_arr.reshape(w.shape)
    return _host(ft_arr), _host(base_arr)


def _kernel_specs(w: _Work, ft: TensorSource, base: TensorSource) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes and dtypes `_kernel_args` gives module `w`'s kernel, from the checkpoints' headers."""
    specs = []
    for source in (ft, base):
        info = source.tensors[w.tensor]
        specs.append(jax.ShapeDtypeStruct(w.shape if w.kind == "conv" else info.shape, _host_dtype(DTYPES[info.dtype])))
    return tuple(specs)


def _compiler(items: Sequence[_Work], ft: TensorSource, base: TensorSource,
              call: Callable[[_Work, Any, Any], Any]) -> tuple[AheadCompiler, dict[str, Hashable]]:
    """Each decomposed module's kernel, `call(w, ft_array, base_array)`, compiled on abstract inputs in a
    background thread, in order, while the first tensors are read (the engine's `AheadCompiler`); and each
    module's signature to wait for (modules of one shape, dtype, rank and method share a kernel)."""
    signatures: dict[str, Hashable] = {}
    jobs = []
    for w in items:
        if w.action != "lora":
            continue
        specs = _kernel_specs(w, ft, base)
        signatures[w.module] = (tuple((spec.shape, spec.dtype.name) for spec in specs), w.kind, w.method,
                                w.cap or w.rank, tuple(out.dtype for out in w.outputs))
        jobs.append((signatures[w.module], functools.partial(jax.eval_shape, functools.partial(call, w), *specs)))
    return AheadCompiler(jobs), signatures


def _first_pass(plan: ExtractionPlan, ft: TensorSource, base: TensorSource, key, rule: RankRule, sv_epsilon: float,
                progress: Callable[[_Work], None], depth: int, read_ahead: int) -> None:
    """Fix every module's rank from its singular values (the rank rules and --sv-epsilon).

    Reads each decomposed module once (overlapped with the SVDs, `run_ordered`), computes its top
    `cap` singular values and energy (`_singular_values`), then `choose_ranks` over all modules at
    once (a budget needs them all). A module whose rank is 0 is dropped, with a rank-0 report, and
    so is its bias delta (PEFT has no LoRA layer to hold it). The ranks are lowered in `plan.work`:
    the second pass runs the SVD at the cap and keeps the chosen rank.
    """
    lora = [w for w in plan.work if w.action == "lora"]
    spectra: dict[str, Spectrum] = {}

    def read(w: _Work):
        return _kernel_args(w, ft.read_host(w.tensor), base.read_host(w.tensor))

    def singular_values(w: _Work, ft_arr, base_arr):
        return svd._singular_values(ft_arr, base_arr, path_key(key, w.module), rank=w.rank, method=w.method,
                                    transpose=w.kind == "embedding", oversample=oversampling(w.rank),
                                    power_iterations=POWER_ITERATIONS)

    ahead, signatures = _compiler(lora, ft, base, singular_values)

    def dispatch(w: _Work, arrays):
        ahead.wait(signatures[w.module])
        return singular_values(w, *arrays)

    def write(w: _Work, result) -> None:
        s, total2 = result
        total2 = float(total2)
        if not math.isfinite(total2):
            raise CheckpointError(f"tensor {w.tensor}: the delta holds NaN or inf; nothing was written")
        spectra[w.module] = Spectrum(_finite(np.asarray(s), f"tensor {w.tensor}"), total2, sum(w.shape))
        progress(w)

    with ahead:
        run_ordered(lora, read, dispatch, write, depth=depth, between=stop_if_terminated,
                    ranges=[byte_ranges([(ft, w.tensor), (base, w.tensor)]) for w in lora], read_ahead=read_ahead)
    ranks = choose_ranks(rule, spectra, sv_epsilon)
    kept: list[_Work] = []
    for w in plan.work:
        if w.action != "lora":
            kept.append(w)
            continue
        rank, sp = ranks[w.module], spectra[w.module]
        if rank == 0:
            plan.skipped.append(w.module)
            plan.reports.append(_report(w.module, w.shape, 0, w.method, w.kind, sp.values, sp.total, sp.total))
            continue
        info = ft.tensors[w.tensor]
        kept.append(_Work("lora", w.module, w.tensor, _lora_infos(w.module, w.kind, info, rank), w.kind, rank,
                          w.method, w.shape, cap=w.rank))
    dropped = set(plan.skipped)
    plan.work = [w for w in kept if not (w.action == "bias" and w.module in dropped)]
    if not any(w.action == "lora" for w in plan.work):
        raise CheckpointError(f"every module's rank is 0 under the rank rule ({plan.rank_rule}): no singular value "
                              "is worth keeping; nothing was written")


def extract_lora_adapter(
    model: str | os.PathLike | TensorSource,
    base: str | os.PathLike | TensorSource,
    output: str | os.PathLike,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    distribute_scale: bool = True,
    embed_lora: bool = False,
    modules_to_save: Sequence[str] = (),
    include_regexes: Sequence[str] = (),
    exclude_regexes: Sequence[str] = (),
    sv_epsilon: float = 0.0,
    skip_undecomposable: bool = False,
    decomposition: str = "auto",
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    invocation: str | None = None,
    module_types: str = "auto",
    warn: Callable[[str], None] | None = None,
    depth: int | None = None,
    rank_by: str | None = None,
    rank_budget: int | None = None,
) -> ExtractionPlan:
    """Write the PEFT LoRA adapter that turns `base` into (approximately) `model`, as mergekit-extract-lora.

    Args:
      model: the fine-tuned model: a directory, Hub id, .safetensors/.bin file or index, `MODEL+LORA`,
        or an opened `TensorSource`.
      base: the base model, likewise.
      output: the adapter directory (adapter_config.json, adapter_model.safetensors, README.md and
        the report extract_lora_report.json), created atomically.
      max_rank, distribute_scale, embed_lora, modules_to_save: mergekit-extract-lora's options (see
        the module docstring).
      include_regexes, exclude_regexes, sv_epsilon, skip_undecomposable: likewise.
      decomposition: "auto" (default), "exact" or "randomized".
      seed: the randomized sketches' seed.
      rank_by: None (every module at max_rank, as mergekit) or "energy:F" (0 < F <= 1): per module the
        smallest rank whose singular values keep >= F of its task vector's energy, capped by max_rank.
      rank_budget: a total of LoRA parameters (sum over modules of rank x (rows + cols)) spent where it
        removes the most error (`allocate_budget`), each module capped by max_rank. Not with rank_by.
      force: replace an existing output.
      progress: show a progress bar.
      invocation: the command line for the card (default: a Python call).
      module_types, warn: see `plan_extraction`.
      depth: tensors in flight (default: the engine's `default_depth()`).

    Returns:
      The executed plan; `plan.reports` holds each decomposed module's `ModuleReport`.

    Raises:
      CheckpointError, ValueError, FileExistsError: bad input, before any tensor is computed (one line).
    """
    from jaxmerge.engine._prefetch import default_read_ahead
    from jaxmerge.engine.stream import default_depth

    plan, ft, base_src = plan_extraction(
        model, base, output, max_rank=max_rank, distribute_scale=distribute_scale, embed_lora=embed_lora,
        modules_to_save=modules_to_save, include_regexes=include_regexes, exclude_regexes=exclude_regexes,
        sv_epsilon=sv_epsilon, skip_undecomposable=skip_undecomposable, decomposition=decomposition, seed=seed,
        force=force, module_types=module_types, warn=warn, rank_by=rank_by, rank_budget=rank_budget,
    )
    key = jax.random.key(seed)
    depth = default_depth() if depth is None else depth
    read_ahead = default_read_ahead()  # checked before any work, as the depth
    # Every kernel's result is read back (the writes, the reports) before the limit is lifted.
    with limit_lapack_threads(svd.lapack_threads((w.method, w.shape) for w in plan.work if w.action == "lora")):
        return _extract(plan, ft, base_src, key, distribute_scale, force, progress, invocation, depth, read_ahead)


def _extract(plan: ExtractionPlan, ft: TensorSource, base_src: TensorSource, key, distribute_scale: bool,
             force: bool, progress: bool, invocation: str | None, depth: int, read_ahead: int) -> ExtractionPlan:
    """`extract_lora_adapter`'s two passes over the planned modules, and the adapter directory."""
    from tqdm.auto import tqdm

    if plan.rule.needs_spectrum or plan.options["sv_epsilon"] > 0:
        lora = [w for w in plan.work if w.action == "lora"]
        with tqdm(total=len(lora), desc="singular values", disable=not progress) as bar:
            _first_pass(plan, ft, base_src, key, plan.rule, plan.options["sv_epsilon"], lambda w: bar.update(1), depth,
                        read_ahead)
    infos = plan.tensors
    metadata = {"format": "pt", "jaxmerge_version": __version__,
                "jaxmerge_extract_lora": json.dumps({"model": plan.model, "base": plan.base, **plan.options})}
    total = sum(i.nbytes for i in infos)
    reports: list[ModuleReport] = []

    def read(w: _Work):
        if w.action == "save":
            return (ft.read_host(w.tensor),)
        return ft.read_host(w.tensor), base_src.read_host(w.tensor)

    def factors(w: _Work, ft_arr, base_arr):
        cap = w.cap or w.rank
        return svd._lora_kernel(ft_arr, base_arr, path_key(key, w.module), w.rank, rank=cap, method=w.method,
                                distribute_scale=distribute_scale, transpose=w.kind == "embedding",
                                oversample=oversampling(cap), power_iterations=POWER_ITERATIONS,
                                out_dtype=DTYPES[w.outputs[0].dtype].name)

    ahead, signatures = _compiler(plan.work, ft, base_src, factors)

    def dispatch(w: _Work, arrays):
        if w.action == "save":
            return arrays[0]
        if w.action == "bias":
            ft_arr, base_arr = arrays
            return (ft_arr.astype(np.float64) - base_arr.astype(np.float64)).astype(DTYPES[w.outputs[0].dtype])
        ahead.wait(signatures[w.module])
        return factors(w, *_kernel_args(w, *arrays))

    with atomic_directory(plan.output, force=force, expected_bytes=total) as tmp, ahead, tqdm(
        total=total, unit="B", unit_scale=True, desc="extracting", disable=not progress
    ) as bar:
        writer = ShardWriter(tmp / "adapter_model.safetensors", infos, metadata)

        def write(w: _Work, result) -> None:
            if w.action != "lora":
                writer.write(w.outputs[0].name, np.asarray(result).reshape(w.outputs[0].shape))
            else:
                a, b, s, err2, total2 = result
                reports.append(_report(w.module, w.shape, w.rank, w.method, w.kind, s, err2, total2))
                a, b = np.asarray(a)[: w.rank], np.asarray(b)[:, : w.rank]  # a lowered rank: zeros past it
                writer.write(w.outputs[0].name, a.reshape(w.outputs[0].shape))
                writer.write(w.outputs[1].name, b.reshape(w.outputs[1].shape))
            bar.update(sum(i.nbytes for i in w.outputs))

        try:
            run_ordered(plan.work, read, dispatch, write, depth=depth, between=stop_if_terminated,
                        ranges=[byte_ranges([(ft, w.tensor)] + ([] if w.action == "save" else [(base_src, w.tensor)]))
                                for w in plan.work], read_ahead=read_ahead)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        plan.reports = reports + plan.reports  # rank-0 modules of the first pass last
        (tmp / "adapter_config.json").write_text(json.dumps(plan.config(), indent=4) + "\n")
        (tmp / "README.md").write_text(_card(plan, invocation or _python_invocation(plan)))
        (tmp / REPORT_FILE).write_text(json.dumps(report_dict(plan), indent=1) + "\n")
    return plan
