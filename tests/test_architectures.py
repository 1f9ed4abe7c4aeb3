"""Encoder-decoder and mixture-of-experts models through mergekit recipes, against mergekit 0.1.5.

T5 (gated, as mergekit's definition expects) and BART have two layer stacks,
an encoder's and a decoder's: `models:` recipes and `modules:` recipes with
per-stack slices must equal mergekit's output tensor for tensor (T5's modules
are mergekit's names, encoder/decoder/shared; BART's are inferred from the
stack prefixes). Mixtral, Qwen2-MoE and Qwen3-MoE hold numbered experts inside
each layer: mergekit 0.1.5 with transformers 5 writes them in transformers'
fused in-memory layout (`mlp.experts.gate_up_proj`), jaxmerge keeps the
checkpoint's per-expert tensors, so there the two outputs are compared by the
logits transformers computes with each, on an entry-wise method. (Methods that
rank or normalise a whole tensor, ties or slerp, differ there: mergekit ranks
a layer's experts jointly in the fused tensor, jaxmerge each expert's own
tensor as its checkpoint holds it.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.cli import main

TOL = dict(rtol=1e-5, atol=1e-6)
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=tm.VOCAB)


def _builders():
    from transformers import (
        BartConfig, BartForConditionalGeneration, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
        Qwen3MoeConfig, Qwen3MoeForCausalLM, T5Config, T5ForConditionalGeneration,
    )

    return {
        "t5": lambda: T5ForConditionalGeneration(T5Config(
            vocab_size=tm.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            decoder_start_token_id=0, feed_forward_proj="gated-gelu")),
        "bart": lambda: BartForConditionalGeneration(BartConfig(
            vocab_size=tm.VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)),
        "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    }


def _linear(a: Path, b: Path) -> str:
    return f"""
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.7}}}}
dtype: float32
"""


def _task_arithmetic(base: Path, a: Path, b: Path) -> str:
    return f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: [0.3, 0.9]}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
dtype: float32
"""


def _modules(a: Path, b: Path, encoder: str, decoder: str, rest: str) -> str:
    return f"""
merge_method: linear
modules:
  {encoder}:
    models:
      - {{model: {a}, parameters: {{weight: 0.3}}}}
      - {{model: {b}, parameters: {{weight: 0.7}}}}
  {decoder}:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}]
      - sources: [{{model: {b}, layer_range: [1, 3], parameters: {{weight: 1.0}}}}]
  {rest}:
    models:
      - {{model: {a}, parameters: {{weight: 0.5}}}}
      - {{model: {b}, parameters: {{weight: 0.5}}}}
dtype: float32
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (jaxmerge's output, mergekit's output) for every recipe; mergekit runs once for all."""
    import torch

    root = tmp_path_factory.mktemp("architectures")
    models = {}
    for kind, build in _builders().items():
        for i in range(3):
            torch.manual_seed(i)
            directory = root / f"{kind}{i}"
            build().save_pretrained(directory)
            tm.save_tokenizer(directory)
            models[kind, i] = directory
    texts = {
        "t5_linear": _linear(models["t5", 0], models["t5", 1]),
        "t5_modules": _modules(models["t5", 0], models["t5", 1], "encoder", "decoder", "shared"),
        "bart_linear": _linear(models["bart", 0], models["bart", 1]),
        "bart_modules": _modules(models["bart", 0], models["bart", 1], "model.encoder.layers", "model.decoder.layers", "default"),
        **{f"{kind}_task_arithmetic": _task_arithmetic(models[kind, 0], models[kind, 1], models[kind, 2]) for kind in ("mixtral", "qwen2_moe", "qwen3_moe")},
    }
    jobs, out = [], {}
    for name, text in texts.items():
        recipe = root / f"{name}.yml"
        recipe.write_text(text.lstrip())
        jobs.append((recipe, root / f"mergekit-{name}"))
        assert main(["merge", str(recipe), "--output", str(root / f"jaxmerge-{name}"), "--quiet"]) == 0, name
        out[name] = (root / f"jaxmerge-{name}", root / f"mergekit-{name}")
    tm.run_mergekit(jobs, cwd=root)
    return out


@pytest.mark.parametrize("name", ["t5_linear", "t5_modules", "bart_linear", "bart_modules"])
def test_encoder_decoder_recipes_equal_mergekit(runs, name):
    ours, theirs = runs[name]
    a, b = tm.read_dir(ours), tm.read_dir(theirs)
    assert sorted(a) == sorted(b)
    for tensor in b:
        np.testing.assert_allclose(a[tensor], b[tensor], err_msg=tensor, **TOL)
    config, mergekit_config = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    if name == "t5_modules":  # 2 + 2 decoder layers, at mergekit's key for T5
        assert config["num_decoder_layers"] == mergekit_config["num_decoder_layers"] == 4
    if name == "bart_modules":
        # An inferred stack has no count key in mergekit: its config keeps 3 decoder layers for 4 in the weights.
        assert config["decoder_layers"] == 4 and mergekit_config["decoder_layers"] == 3
        assert sum(".decoder.layers." in t and t.endswith("fc1.weight") for t in a) == 4


def test_sliced_encoder_decoder_outputs_load_with_their_class(runs):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    for name in ("t5_modules", "bart_modules"):
        model, info = AutoModelForSeq2SeqLM.from_pretrained(runs[name][0], dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_recipes_give_mergekits_logits(runs, kind):
    ours, theirs = runs[f"{kind}_task_arithmetic"]
    mine = tm.read_dir(ours)
    assert any(".experts.3." in name for name in mine)  # every expert merged as its own tensor
    tokens = np.array([[1, 5, 9, 17, 33, 65, 100, 127, 2]])
    np.testing.assert_allclose(tm.logits(ours, tokens), tm.logits(theirs, tokens), rtol=1e-4, atol=1e-5)
