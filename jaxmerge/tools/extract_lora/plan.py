"""The plan of `jaxmerge extract-lora`: every module's fate (decomposed, saved whole, skipped), its rank cap
and output tensors, and adapter_config.json, all known before any tensor is computed."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jaxmerge.engine._atomic import lies_inside
from jaxmerge.formats.lora import PREFIX, LoraFolded, mergekit_load_dtype, split_lora_reference
from jaxmerge.formats.safetensors_io import FLOAT_DTYPES, CheckpointError, TensorInfo
from jaxmerge.formats.sources import TensorSource, open_checkpoint
from jaxmerge.tools.extract_lora.modules import (
    _Module, _modules_from_names, _modules_from_transformers, _names_are_exact,
)
from jaxmerge.tools.extract_lora.ranks import RankRule, check_budget, rank_rule
from jaxmerge.tools.extract_lora.svd import (
    DEFAULT_MAX_RANK, ModuleReport, _check_epsilon, _check_rank, choose_decomposition,
)

__all__ = ["ExtractionPlan", "plan_extraction"]

logger = logging.getLogger("jaxmerge.tools.extract_lora")


@dataclass(frozen=True)
class _Work:
    """One step of the extraction: a module decomposed, a tensor saved whole, or a bias delta."""

    action: str  # "lora", "save" or "bias"
    module: str
    tensor: str  # the tensor read (from both checkpoints for lora and bias)
    outputs: tuple[TensorInfo, ...]
    kind: str = ""  # lora: "linear", "conv" or "embedding"
    rank: int = 0
    method: str = ""
    shape: tuple[int, ...] = ()  # lora: the matrix decomposed
    cap: int = 0  # lora: the SVD's truncation when --sv-epsilon lowered `rank` below it (0: `rank`)


@dataclass
class ExtractionPlan:
    """What an extraction will write, known before any tensor is computed."""

    model: str
    base: str
    output: Path
    options: dict
    module_types: str
    work: list[_Work]
    modules_to_save: list[str]
    skipped: list[str]
    base_vocab: int | None
    final_vocab: int | None
    hub_ids: dict[str, str | None] = field(default_factory=dict)
    reports: list[ModuleReport] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorInfo]:
        return [info for w in self.work for info in w.outputs]

    @property
    def ranks(self) -> dict[str, int]:
        return {w.module: w.rank for w in self.work if w.action == "lora"}

    @property
    def rule(self) -> RankRule:
        """The rank rule of `options` (rank_by / rank_budget)."""
        return rank_rule(self.options.get("rank_by"), self.options.get("rank_budget"))

    @property
    def rank_rule(self) -> str:
        """The rank rule in words, for the report and the card."""
        return self.rule.describe(self.options["max_rank"], self.options["sv_epsilon"])

    @property
    def lora_parameters(self) -> int:
        """The LoRA factors' parameters: sum over decomposed modules of rank x (rows + cols)."""
        return sum(w.rank * sum(w.shape) for w in self.work if w.action == "lora")

    def config(self) -> dict:
        """adapter_config.json, as mergekit's `make_config_dict` writes it."""
        ranks = self.ranks
        max_rank = max(ranks.values())
        different = {k: v for k, v in ranks.items() if v != max_rank}
        config = {
            "base_model_name_or_path": self.base,
            "peft_type": "LORA",
            "use_rslora": False,
            "target_modules": sorted({k.split(".")[-1] for k in ranks}),
            "modules_to_save": list(self.modules_to_save),
            "task_type": "CAUSAL_LM",
            "r": max_rank,
            "lora_alpha": max_rank,
            "rank_pattern": different,
            "alpha_pattern": dict(different),
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        if any(w.action == "bias" for w in self.work):
            config["lora_bias"] = True
        return config


def _open(ref: str | os.PathLike | TensorSource, where: str):
    """(source, hub id or None, the paths it reads, its config directory) for a model reference."""
    if isinstance(ref, TensorSource):
        path = Path(ref.path)
        return ref, None, [path], path if path.is_dir() else path.parent
    from jaxmerge.formats.hf_model import resolve_model

    model_ref, lora_ref = split_lora_reference(str(ref))
    model = resolve_model(model_ref, where)
    config_dir = model.path if model.path.is_dir() else model.path.parent
    if lora_ref is None:
        if (model.path / "adapter_config.json").is_file() and not (model.path / "config.json").is_file():
            raise CheckpointError(f"{where}: {ref} is a LoRA adapter, not a model (give MODEL+ADAPTER)")
        return open_checkpoint(model.path), model.hub_id, [model.path], config_dir
    adapter = resolve_model(lora_ref, f"{where} (its LoRA adapter)")
    source = LoraFolded(model.path, adapter.path, dtype=mergekit_load_dtype(model.path))
    return source, model.hub_id, [model.path, adapter.path], config_dir


def _compile(regexes: Sequence[str], flag: str) -> list[re.Pattern]:
    out = []
    for text in regexes or ():
        try:
            out.append(re.compile(text))
        except re.error as err:
            raise CheckpointError(f"{flag} {text!r} is not a regular expression ({err})") from None
    return out


def plan_extraction(
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
    module_types: str = "auto",
    warn: Callable[[str], None] | None = None,
    rank_by: str | None = None,
    rank_budget: int | None = None,
) -> tuple[ExtractionPlan, TensorSource, TensorSource]:
    """Open both models and decide every module's fate; every check that can fail fails here.

    Args: as `extract_lora_adapter`; `module_types` "auto" (transformers' model class when it can be
    built, else the tensors' names), "transformers" or "names"; `warn(line)` gets mergekit's warnings.

    Returns:
      (plan, fine-tune source, base source). With sv_epsilon > 0, rank_by or rank_budget the ranks
      are still the caps: `extract_lora_adapter` lowers them in its first pass.

    Raises:
      CheckpointError (a ValueError): one line naming what is wrong.
    """
    warn = warn or (lambda line: logger.warning("%s", line))
    max_rank = _check_rank(max_rank)
    sv_epsilon = _check_epsilon(sv_epsilon)
    rule = rank_rule(rank_by, rank_budget)
    choose_decomposition((1, 1), 1, decomposition)
    if module_types not in ("auto", "transformers", "names"):
        raise ValueError(f"module_types must be auto, transformers or names, got {module_types!r}")
    includes = _compile(include_regexes, "--include-regex")
    excludes = _compile(exclude_regexes, "--exclude-regex")
    output = Path(output)
    ft, ft_hub, ft_paths, config_dir = _open(model, "--model")
    base_src, base_hub, base_paths, _ = _open(base, "--base")
    for path in ft_paths + base_paths:
        if lies_inside(output, path):
            raise CheckpointError(f"output {output} lies inside input {path}: choose another --output")
    if os.path.lexists(output) and not force:
        raise FileExistsError(f"{output} exists; pass --force to replace it")
    from jaxmerge.engine.stream import check_same_tensors

    check_same_tensors([ft, base_src])

    found = None
    has_config = (config_dir / "config.json").is_file()
    if module_types == "transformers" or (module_types == "auto" and has_config
                                          and not _names_are_exact(config_dir, ft.tensors)):
        found = _modules_from_transformers(config_dir, ft.tensors) if has_config else None
    if found is None:
        if module_types == "transformers":
            raise CheckpointError(f"{config_dir}: transformers cannot build this model's class from config.json")
        found = _modules_from_names(ft.tensors)
    modules, described = found

    names = [m.name for m in modules]
    for flag, patterns in (("--include-regex", includes), ("--exclude-regex", excludes)):
        for pattern in patterns:
            if not any(pattern.search(n) for n in names):
                raise CheckpointError(f"{flag} {pattern.pattern!r} matches no module of {ft.path}")

    embed = next((m for m in modules if m.embed_in), None)
    final_vocab = ft.tensors[embed.weight].shape[0] if embed is not None else None
    base_vocab = base_src.tensors[embed.weight].shape[0] if embed is not None else None
    if embed_lora and final_vocab != base_vocab:
        warn(f"vocabulary size mismatch: the fine-tuned model has {final_vocab} tokens, the base {base_vocab}; "
             "embeddings are saved whole (--no-embed-lora)")
        embed_lora = False

    to_save = list(modules_to_save)
    work: list[_Work] = []
    skipped: list[str] = []
    warned: set[str] = set()

    def extract(name: str) -> bool:
        if includes and not any(p.search(name) for p in includes):
            return False
        return not any(p.search(name) for p in excludes)

    def save(m: _Module) -> None:
        info = ft.tensors[m.weight]
        work.append(_Work("save", m.name, m.weight, (TensorInfo(f"{PREFIX}{m.name}.weight", info.shape, info.dtype),)))
        if m.bias is not None:
            b = ft.tensors[m.bias]
            work.append(_Work("save", m.name, m.bias, (TensorInfo(f"{PREFIX}{m.bias}", b.shape, b.dtype),)))

    for m in modules:
        key = m.name.split(".")[-1]
        if not embed_lora and m.embed and not any(p.search(m.name) for p in excludes) and key not in to_save:
            warn(f"adding {key} to modules_to_save")
            to_save.append(key)
        if m.name in to_save or key in to_save:
            save(m)
        elif extract(m.name):
            if m.kind == "other":
                if key not in warned:
                    warn(f"{key} has an unsupported module type - "
                         + ("skipping" if skip_undecomposable else "saving at full rank"))
                    warned.add(key)
                if skip_undecomposable:
                    skipped.append(m.name)
                    continue
                if key not in to_save:
                    to_save.append(key)
                save(m)
                continue
            work.extend(_lora_work(m, ft, base_src, max_rank, decomposition))
    if not any(w.action == "lora" for w in work):
        raise CheckpointError(f"no module of {ft.path} is left to decompose (check --include-regex, "
                              "--exclude-regex and --save-module)")
    check_budget(rule, {w.module: sum(w.shape) for w in work if w.action == "lora"})
    options = {"max_rank": max_rank, "distribute_scale": distribute_scale, "embed_lora": embed_lora,
               "modules_to_save": list(modules_to_save), "include_regexes": list(include_regexes or ()),
               "exclude_regexes": list(exclude_regexes or ()), "sv_epsilon": sv_epsilon,
               "skip_undecomposable": skip_undecomposable, "decomposition": decomposition, "seed": seed,
               "rank_by": str(rank_by).strip() if rule.kind == "energy" else None,
               "rank_budget": rule.budget if rule.kind == "budget" else None}
    plan = ExtractionPlan(
        model=str(getattr(model, "path", model)), base=str(getattr(base, "path", base)), output=output,
        options=options, module_types=described, work=work, modules_to_save=to_save, skipped=skipped,
        base_vocab=base_vocab, final_vocab=final_vocab, hub_ids={"model": ft_hub, "base": base_hub},
    )
    return plan, ft, base_src


def _lora_work(m: _Module, ft: TensorSource, base: TensorSource, max_rank: int, decomposition: str) -> list[_Work]:
    info, base_info = ft.tensors[m.weight], base.tensors[m.weight]
    if info.shape != base_info.shape:
        raise CheckpointError(f"{base.path}: tensor {m.weight} has shape {list(base_info.shape)}, {ft.path} has "
                              f"{list(info.shape)}; a LoRA needs the same shapes")
    if info.dtype not in FLOAT_DTYPES or base_info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{ft.path}: tensor {m.weight} is {info.dtype}; only floating-point weights decompose")
    kind = m.kind
    if kind == "embedding":
        if len(info.shape) != 2:
            raise CheckpointError(f"{ft.path}: embedding {m.weight} has shape {list(info.shape)}, not a matrix")
        shape = (info.shape[1], info.shape[0])  # mergekit decomposes the transposed delta
    elif kind == "conv" or len(info.shape) > 2:
        kind = "conv"
        shape = (info.shape[0], math.prod(info.shape[1:]))
    elif len(info.shape) == 2:
        shape = tuple(info.shape)
    else:
        raise CheckpointError(f"{ft.path}: tensor {m.weight} has shape {list(info.shape)}; a {kind} weight is a matrix")
    rank = min(max_rank, min(shape))
    method = choose_decomposition(shape, rank, decomposition)
    out = [_Work("lora", m.name, m.weight, _lora_infos(m.name, kind, info, rank), kind, rank, method, shape)]
    if m.bias is not None:
        b, bb = ft.tensors[m.bias], base.tensors[m.bias]
        if b.shape != bb.shape:
            raise CheckpointError(f"{base.path}: tensor {m.bias} has shape {list(bb.shape)}, {ft.path} has {list(b.shape)}")
        out.append(_Work("bias", m.name, m.bias, (TensorInfo(f"{PREFIX}{m.name}.lora_B.bias", b.shape, b.dtype),)))
    return out


def _lora_infos(name: str, kind: str, info: TensorInfo, rank: int) -> tuple[TensorInfo, TensorInfo]:
    """The A and B tensors PEFT reads for a module of `kind` (weight `info`) at `rank`."""
    dtype = info.dtype
    if kind == "embedding":
        vocab, dim = info.shape
        return (TensorInfo(f"{PREFIX}{name}.lora_embedding_A", (rank, vocab), dtype),
                TensorInfo(f"{PREFIX}{name}.lora_embedding_B", (dim, rank), dtype))
    if kind == "conv":
        out_ch, *rest = info.shape
        return (TensorInfo(f"{PREFIX}{name}.lora_A.weight", (rank, *rest), dtype),
                TensorInfo(f"{PREFIX}{name}.lora_B.weight", (out_ch, rank, *([1] * (len(rest) - 1))), dtype))
    out_f, in_f = info.shape
    return (TensorInfo(f"{PREFIX}{name}.lora_A.weight", (rank, in_f), dtype),
            TensorInfo(f"{PREFIX}{name}.lora_B.weight", (out_f, rank), dtype))
