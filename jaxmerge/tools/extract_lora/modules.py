"""Which modules of a checkpoint `jaxmerge extract-lora` sees, and of what kind (as mergekit's dummy model).

For the architectures of `NAME_TYPED_ARCHITECTURES` the tensors' names and shapes type the modules
exactly as transformers' classes do (`_modules_from_names`, no torch); otherwise transformers'
class is built on the meta device (`_modules_from_transformers`), as mergekit does.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from jaxmerge.formats.safetensors_io import TensorInfo

__all__ = ["NAME_TYPED_ARCHITECTURES"]

logger = logging.getLogger("jaxmerge.tools.extract_lora")


@dataclass(frozen=True)
class _Module:
    """A module of the model that has a weight: what kind it is and where its tensors are."""

    name: str  # e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear", "conv", "embedding" (nn.Embedding) or "other" (undecomposable)
    weight: str  # the weight's tensor name in the checkpoints
    bias: str | None
    embed: bool  # input or output embedding, or any nn.Embedding (mergekit's embedding test)
    embed_in: bool = False


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _modules_from_transformers(config_dir: Path, tensors: dict[str, TensorInfo]) -> tuple[list[_Module], str] | None:
    """The modules of transformers' class for config.json, built on the meta device as mergekit does; None
    when transformers (or torch) is missing or does not know the architecture."""
    try:
        import torch
        import transformers
        from torch import nn
    except ImportError:
        return None
    try:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(str(config_dir))
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            if cls is None:
                return None
            with torch.device("meta"):
                model = cls._from_config(config)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as err:  # noqa: BLE001 - any failure: fall back to the tensors' names
        logger.info("module types from tensor names: transformers could not build the model (%s)", err)
        return None
    embed_in = model.get_input_embeddings()
    try:
        embed_out = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        embed_out = None
    in_name = next((n for n, m in model.named_modules() if m is embed_in), None)
    modules = []
    for name, module in model.named_modules():
        if not name or not hasattr(module, "weight"):
            continue
        weight = f"{name}.weight"
        if weight not in tensors:
            if module is embed_out and in_name is not None and f"{in_name}.weight" in tensors:
                weight = f"{in_name}.weight"  # tied embeddings: mergekit loads the input embedding's tensor
            else:
                continue
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kind = "conv"
        else:
            kind = "other"
        bias = f"{name}.bias" if f"{name}.bias" in tensors else None
        modules.append(_Module(name, kind, weight, bias, embed=module is embed_in or module is embed_out
                               or kind == "embedding", embed_in=module is embed_in))
    if not modules:
        return None
    return modules, f"transformers {arch}"


_EMBEDDING_NAMES = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings"
                              r"|embed_in|embed_positions|tok_embeddings|embeddings|shared)")
_INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
_OUTPUT_EMBEDDING_NAMES = ("lm_head", "embed_out", "output")
# config.json model_types whose modules `_modules_from_names` types exactly as transformers' classes do
# (checked against transformers 5's classes; untied output embeddings only, see `_names_are_exact`).
# Not here, and typed by transformers instead: GPT-2 and others with Conv1D layers (undecomposable
# for mergekit), mixture-of-experts routers (not nn.Linear), custom code.
NAME_TYPED_ARCHITECTURES = frozenset({
    "llama", "mistral", "ministral", "qwen2", "qwen3", "phi", "gpt_neox", "olmo", "olmo2", "stablelm", "granite",
    "gptj", "exaone", "helium", "nemotron", "persimmon", "codegen", "gemma", "gemma2", "gemma3_text", "starcoder2",
    "cohere", "opt", "bloom", "xglm",
})


def _names_are_exact(config_dir: Path, tensors: dict[str, TensorInfo]) -> bool:
    """The tensors' names type the modules as transformers would: a known architecture whose output
    embedding has its own tensor (a tied one has none, and only the model class names it)."""
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("model_type") not in NAME_TYPED_ARCHITECTURES:
        return False
    for name, info in tensors.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _OUTPUT_EMBEDDING_NAMES and len(info.shape) == 2:
            return True
    return False


def _modules_from_names(tensors: dict[str, TensorInfo]) -> tuple[list[_Module], str]:
    """Module types from the tensors alone: `X.weight` of 2 dimensions is a Linear (an embedding when
    X's last component names one), of 3 or 4 a convolution, of 1 a norm (undecomposable).

    Order: the input embedding first, output embeddings last, the rest by name with numbers in
    numeric order, as transformers' `named_modules()` lists a decoder's (for modules_to_save's order).
    """
    modules = []
    seen_input = False
    for weight in sorted(tensors, key=_natural):
        if not weight.endswith(".weight"):
            continue
        name = weight[: -len(".weight")]
        leaf = name.rsplit(".", 1)[-1]
        ndim = len(tensors[weight].shape)
        embed_in = embed_out = False
        if ndim == 2 and _EMBEDDING_NAMES.fullmatch(leaf):
            kind = "embedding"
            if leaf in _INPUT_EMBEDDING_NAMES and not seen_input:
                embed_in = seen_input = True
        elif ndim == 2:
            kind = "linear"
            embed_out = leaf in _OUTPUT_EMBEDDING_NAMES
        elif ndim in (3, 4):
            kind = "conv"
        else:
            kind = "other"
        bias = f"{name}.bias" if f"{name}.bias" in tensors else None
        modules.append(_Module(name, kind, weight, bias, embed=kind == "embedding" or embed_out, embed_in=embed_in))
    rank = lambda m: 0 if m.embed_in else (2 if m.embed and m.kind != "embedding" else 1)  # noqa: E731
    return sorted(modules, key=rank), "tensor names"
