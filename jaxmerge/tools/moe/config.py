"""mergekit-moe's configuration file, read as mergekit 0.1.5 reads it (`mergekit/moe/config.py`).

    base_model: org/base                # attention, norms, embeddings and LM head come from here
    gate_mode: hidden                   # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
    dtype: bfloat16                     # optional: the output's dtype (default: the base config's)
    experts_per_token: 2
    architecture: mixtral               # optional: the output architecture's name, or its prefix
    experts:
      - source_model: org/code-ft       # its MLP becomes expert 0 of every layer
        positive_prompts: ["def f(x):"]
        negative_prompts: ["Once upon a time"]
        noise_scale: 0.01               # optional: Gaussian noise added to the expert's MLP weights
        residual_scale: 0.5             # optional: multiplies the expert's down projection
    shared_experts: [...]               # as experts (Qwen MoE: exactly one; DeepSeek MoE: at most one)

Keys mergekit does not know are ignored there; here each gives one `RecipeWarning`
line, and `strict=True` refuses it. The checks of mergekit's `is_bad_config` are
made too (one line each): at least one expert per token, as many experts as
experts per token, positive prompts for every expert when the gates come from
prompts, prompts that differ between experts, and experts that are not all the
same model (unless `allow_all_same`, mergekit's
`--i-understand-this-is-not-useful-without-training`). Unlike mergekit,
`uniform_random` gates need no prompts (they use none).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.recipes.schema import RecipeWarning, read_yaml

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # the gates come from the prompts
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
_CONFIG_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


class MoeError(CheckpointError):
    """A mixture-of-experts configuration or build failed; the message is one line."""


@dataclass(frozen=True)
class Expert:
    """One expert: a model whose MLP becomes an expert of every layer.

    Args:
      source_model: a model reference (path, Hub id, `MODEL+LORA`).
      positive_prompts: prompts this expert's router row points towards.
      negative_prompts: prompts it points away from.
      noise_scale: standard deviation of Gaussian noise added to its MLP weights (None: none).
      residual_scale: factor of its down projection (None: 1).
    """

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoeConfig:
    """A mixture of experts to build (mergekit's `MoEMergeConfig`)."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    where: str = "moe config"  # the file, for messages
    text: str | None = None  # the file's text, written beside the output

    @property
    def gated(self) -> tuple[Expert, ...]:
        """The experts that get a router row: every routed expert, then the shared experts when they have
        prompts or the gates are random (mergekit's `need_gates`)."""
        shared = self.shared_experts
        if shared and (shared[0].positive_prompts or self.gate_mode in ("random", "uniform_random")):
            return self.experts + shared
        return self.experts


def load_moe_config(path: str | os.PathLike, *, strict: bool = False) -> MoeConfig:
    """Read and check a mergekit-moe configuration file (see the module docstring).

    Args:
      path: the YAML file.
      strict: refuse keys mergekit ignores instead of warning.

    Raises:
      MoeError: one line naming the file, the key and the value.
    """
    text, data = read_yaml(Path(path), "moe configuration", error=MoeError)
    return parse_moe_config(data, where=str(path), strict=strict, text=text)


def parse_moe_config(data: Any, *, where: str = "moe config", strict: bool = False, text: str | None = None) -> MoeConfig:
    """A `MoeConfig` from the parsed YAML mapping (see `load_moe_config`)."""
    if not isinstance(data, dict):
        raise MoeError(f"{where}: a mergekit-moe configuration is a mapping with base_model and experts")
    _unknown_keys(data, _CONFIG_KEYS, f"{where}: ", strict)
    base = _reference(data.get("base_model"), f"{where}: base_model")
    experts = _experts(data.get("experts"), f"{where}: experts", strict, required=True)
    shared = _experts(data.get("shared_experts"), f"{where}: shared_experts", strict, required=False)
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise MoeError(f"{where}: gate_mode must be one of {', '.join(GATE_MODES)}, got {gate_mode!r}")
    dtype = data.get("dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") not in _DTYPES:
        raise MoeError(f"{where}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int):
        raise MoeError(f"{where}: experts_per_token must be an integer, got {per_token!r}")
    architecture = data.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise MoeError(f"{where}: architecture must be a name (mixtral, deepseek, qwen, qwen3), got {architecture!r}")
    return MoeConfig(
        base_model=base, experts=experts, gate_mode=gate_mode,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        experts_per_token=per_token, shared_experts=shared, architecture=architecture, where=where, text=text,
    )


def check_config(config: MoeConfig, *, allow_all_same: bool = False) -> None:
    """mergekit's `is_bad_config`, one line each (see the module docstring).

    Raises:
      MoeError: naming the file and what is wrong.
    """
    where = config.where
    if config.experts_per_token < 1:
        raise MoeError(f"{where}: experts_per_token must be >= 1, got {config.experts_per_token}")
    if len(config.experts) < config.experts_per_token:
        raise MoeError(f"{where}: {len(config.experts)} experts for experts_per_token {config.experts_per_token}: "
                       "give at least as many experts as experts per token")
    if config.gate_mode not in PROMPT_MODES:
        return
    for i, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise MoeError(f"{where}: experts[{i}] has no positive_prompts (gate_mode {config.gate_mode} "
                           "initialises each router row from its expert's prompts)")
    first = config.experts[0]
    if len(config.experts) > 1 and all(
        (e.positive_prompts, e.negative_prompts) == (first.positive_prompts, first.negative_prompts)
        for e in config.experts[1:]
    ):
        raise MoeError(f"{where}: every expert has the same positive and negative prompts: the router could not tell "
                       "them apart; give each expert prompts for what should be routed to it")
    if not allow_all_same and len(config.experts) > 1 and all(
        e.source_model == first.source_model for e in config.experts[1:]
    ):
        raise MoeError(f"{where}: every expert is {first.source_model}: the MoE would cost more and compute the same; "
                       "pass --i-understand-this-is-not-useful-without-training to build it for training")


def _unknown_keys(data: dict, allowed: tuple[str, ...], at: str, strict: bool) -> None:
    for key in data:
        if key not in allowed:
            line = f"{at}unknown key {key!r} is ignored, as mergekit-moe ignores it (known: {', '.join(allowed)})"
            if strict:
                raise MoeError(line.replace(" is ignored, as mergekit-moe ignores it", ""))
            warnings.warn(line, RecipeWarning, stacklevel=3)


def _reference(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MoeError(f"{where} must be a model path or Hub id, got {value!r}")
    return value.strip()


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoeError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _scale(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoeError(f"{where} must be a number, got {value!r}")
    return float(value)


def _experts(value: Any, where: str, strict: bool, *, required: bool) -> tuple[Expert, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        raise MoeError(f"{where} must be a list of experts (each with source_model), got {value!r}")
    experts = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(item, str):  # mergekit requires a mapping; a bare reference is the obvious meaning
            raise MoeError(f"{at} must be a mapping with source_model (and prompts), got {item!r}")
        if not isinstance(item, dict):
            raise MoeError(f"{at} must be a mapping with source_model, got {item!r}")
        _unknown_keys(item, _EXPERT_KEYS, f"{at}: ", strict)
        experts.append(Expert(
            source_model=_reference(item.get("source_model"), f"{at}.source_model"),
            positive_prompts=_prompts(item.get("positive_prompts"), f"{at}.positive_prompts"),
            negative_prompts=_prompts(item.get("negative_prompts"), f"{at}.negative_prompts"),
            noise_scale=_scale(item.get("noise_scale"), f"{at}.noise_scale"),
            residual_scale=_scale(item.get("residual_scale"), f"{at}.residual_scale"),
        ))
    return tuple(experts)
