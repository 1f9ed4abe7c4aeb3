"""Recipes mergekit runs that jaxmerge used to refuse: leftover parameters, models with several layer stacks.

mergekit 0.1.5 is the oracle where it gets the answer right. On a LLaVA-shaped
model (a language model and a vision tower, each with its numbered layers) it
does not with the transformers installed beside it: mergekit names tensors by
transformers' in-memory layout (`model.language_model.layers.N`) while the
checkpoint holds `language_model.model.layers.N`, and its output has 43 of the
64 tensors, the whole language model missing (`from_pretrained` reports them
MISSING). Those tests compare with the merge computed here, tensor by tensor,
and load the output with transformers' own class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.cli import main

TOL = dict(rtol=1e-5, atol=1e-6)


def _run(capsys, *argv):
    rc = main(["merge", *map(str, argv)])
    return rc, capsys.readouterr().err


def _llava(directory: Path, seed: int) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(**{**tm.LLAMA, "num_hidden_layers": 3})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                      image_token_index=tm.VOCAB - 1))
    model.save_pretrained(directory)
    tm.save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {f"m{i}": _llava(root / f"m{i}", seed=i) for i in range(3)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    return dict(zip(["base", "ft1", "ft2"], tm.make_family(root, "llama", n_finetunes=2)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text.lstrip())
    return path


def _load_llava(directory: Path):
    import torch
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def test_vlm_models_recipe_merges_both_stacks_and_loads(vlm, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - {{model: {vlm['m0']}, parameters: {{weight: 0.3}}}}
  - {{model: {vlm['m1']}, parameters: {{weight: 0.7}}}}
dtype: float32
""")
    rc, err = _run(capsys, recipe, "--output", tmp_path / "out", "--quiet")
    assert rc == 0, err
    ours, a, b = (tm.read_dir(d) for d in (tmp_path / "out", vlm["m0"], vlm["m1"]))
    assert sorted(ours) == sorted(a) and len(ours) == 73
    for name in a:
        np.testing.assert_allclose(ours[name], 0.3 * a[name] + 0.7 * b[name], err_msg=name, **TOL)
    _load_llava(tmp_path / "out")


def test_vlm_gradients_run_along_each_stack(vlm, tmp_path, capsys):
    """A gradient [1, 0] / [0, 1] gives a stack's first layer to m0 and its last to m1, in either stack;
    tensors outside the stacks are at t = 0 (m0)."""
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - {{model: {vlm['m0']}, parameters: {{weight: [1.0, 0.0]}}}}
  - {{model: {vlm['m1']}, parameters: {{weight: [0.0, 1.0]}}}}
dtype: float32
""")
    rc, err = _run(capsys, recipe, "--output", tmp_path / "out", "--quiet")
    assert rc == 0, err
    ours, a, b = (tm.read_dir(d) for d in (tmp_path / "out", vlm["m0"], vlm["m1"]))
    checks = {
        "language_model.model.layers.0.mlp.up_proj.weight": a,
        "language_model.model.layers.2.mlp.up_proj.weight": b,  # 3 layers: t = 1 at the last
        "vision_tower.encoder.layers.0.mlp.fc1.weight": a,
        "vision_tower.encoder.layers.1.mlp.fc1.weight": b,  # 2 layers: t = 1 at the second
        "multi_modal_projector.linear_1.weight": a,
        "language_model.lm_head.weight": a,
    }
    for name, expected in checks.items():
        np.testing.assert_allclose(ours[name], expected[name], err_msg=name, **TOL)
    middle = "language_model.model.layers.1.mlp.up_proj.weight"
    np.testing.assert_allclose(ours[middle], 0.5 * a[middle] + 0.5 * b[middle], **TOL)


def test_vlm_modules_recipe_slices_one_stack_and_sets_its_count(vlm, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: linear
modules:
  language_model.model.layers:
    slices:
      - sources: [{{model: {vlm['m0']}, layer_range: [0, 3]}}]
      - sources: [{{model: {vlm['m1']}, layer_range: [1, 3]}}]
  vision_tower.encoder.layers:
    models:
      - {{model: {vlm['m0']}, parameters: {{weight: 0.3}}}}
      - {{model: {vlm['m1']}, parameters: {{weight: 0.7}}}}
  default:
    parameters: {{weight: 0.5}}
    models:
      - {{model: {vlm['m0']}}}
      - {{model: {vlm['m2']}}}
dtype: float32
""")
    rc, err = _run(capsys, recipe, "--output", tmp_path / "out", "--quiet")
    assert rc == 0, err
    ours = tm.read_dir(tmp_path / "out")
    m0, m1, m2 = (tm.read_dir(vlm[k]) for k in ("m0", "m1", "m2"))
    text = "language_model.model.layers.{}.self_attn.q_proj.weight"
    for out_layer, (src, layer) in enumerate([(m0, 0), (m0, 1), (m0, 2), (m1, 1), (m1, 2)]):
        np.testing.assert_array_equal(ours[text.format(out_layer)], src[text.format(layer)])
    fc1 = "vision_tower.encoder.layers.1.mlp.fc1.weight"
    np.testing.assert_allclose(ours[fc1], 0.3 * m0[fc1] + 0.7 * m1[fc1], **TOL)
    for name in ("language_model.model.embed_tokens.weight", "multi_modal_projector.linear_2.bias", "vision_tower.post_layernorm.weight"):
        np.testing.assert_allclose(ours[name], 0.5 * m0[name] + 0.5 * m2[name], err_msg=name, **TOL)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 5
    assert config["vision_config"]["num_hidden_layers"] == 2
    _load_llava(tmp_path / "out")


def test_vlm_bad_module_recipes_give_one_line(vlm, tmp_path, capsys):
    cases = {
        "slices": (f"""
merge_method: passthrough
slices:
  - sources: [{{model: {vlm['m0']}, layer_range: [0, 2]}}]
""", ["slices need a model with one layer stack", "language_model.model.layers", "modules:"]),
        "unknown": (f"""
merge_method: linear
modules:
  text_decoder:
    models: [{{model: {vlm['m0']}}}]
""", ["no module 'text_decoder'", "vision_tower.encoder.layers"]),
        "range": (f"""
merge_method: passthrough
modules:
  vision_tower.encoder.layers:
    slices:
      - sources: [{{model: {vlm['m0']}, layer_range: [0, 3]}}]
""", ["layer_range [0, 3] goes beyond", "2 layers in module vision_tower.encoder.layers"]),
    }
    for name, (text, needles) in cases.items():
        recipe = _write(tmp_path / f"{name}.yml", text)
        rc, err = _run(capsys, recipe, "--output", tmp_path / name, "--quiet")
        assert rc == 2, (name, err)
        assert len([line for line in err.splitlines() if "error" in line]) == 1, (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
        assert not (tmp_path / name).exists()


def test_a_module_left_out_warns_and_its_tensors_are_not_written(vlm, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: linear
modules:
  language_model.model.layers: {{models: [{{model: {vlm['m0']}}}]}}
  default: {{models: [{{model: {vlm['m0']}}}]}}
dtype: float32
""")
    rc, err = _run(capsys, recipe, "--output", tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert "no entry for module 'vision_tower.encoder.layers'" in err and "32 tensors are left out" in err
    ours = tm.read_dir(tmp_path / "out")
    assert not any(n.startswith("vision_tower.encoder.layers.") for n in ours)
    assert "vision_tower.post_layernorm.weight" in ours


def test_parameters_the_method_does_not_take_are_ignored_with_one_warning(llama, tmp_path, capsys):
    """mergekit ignores a `weight` left in a slerp recipe; jaxmerge merges the same and warns once, or
    refuses it with --strict."""
    recipe = _write(tmp_path / "slerp.yml", f"""
merge_method: slerp
base_model: {llama['base']}
models:
  - {{model: {llama['base']}, parameters: {{weight: 1.0}}}}
  - {{model: {llama['ft1']}, parameters: {{weight: 0.5, density: 0.3}}}}
parameters:
  t: [0.1, 0.6, 0.9]
dtype: float32
""")
    tm.run_mergekit([(recipe, tmp_path / "mergekit")], cwd=tmp_path)
    rc, err = _run(capsys, recipe, "--output", tmp_path / "ours", "--quiet")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err  # one per parameter: weight (twice in the recipe) and density
    assert "takes no parameter 'weight'" in err and "models[0].parameters.weight, models[1].parameters.weight" in err
    a, b = tm.read_dir(tmp_path / "ours"), tm.read_dir(tmp_path / "mergekit")
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], err_msg=name, **TOL)
    rc, err = _run(capsys, recipe, "--output", tmp_path / "strict", "--quiet", "--strict")
    assert rc == 2 and "models[0].parameters.weight: method slerp has no parameter 'weight'" in err
    assert not (tmp_path / "strict").exists()


def test_residual_weight_is_accepted_as_mergekit_accepts_it(llama, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: passthrough
slices:
  - sources: [{{model: {llama['ft1']}, layer_range: [0, 2]}}]
    residual_weight: 0.5
dtype: float32
""")
    rc, err = _run(capsys, recipe, "--output", tmp_path / "out", "--quiet")
    assert rc == 0 and "slices[0].residual_weight has no effect" in err, err
    rc, err = _run(capsys, recipe, "--output", tmp_path / "strict", "--quiet", "--strict")
    assert rc == 2 and "residual_weight" in err


def test_density_of_one_or_more_warns_on_the_command_line(llama, tmp_path, capsys):
    args = [llama["ft1"], llama["ft2"], "--base", llama["base"], "--method", "ties", "--output", tmp_path / "o", "--quiet"]
    rc, err = _run(capsys, *args, "--density", "1.5")
    assert rc == 0 and "warning: --density 1.5 is 1 or more: nothing is pruned" in err, err
    rc, err = _run(capsys, *args[:-3], "--output", tmp_path / "p", "--quiet", "--density", "0.5")
    assert rc == 0 and "warning" not in err, err


def _lora_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on `base` with non-zero B's, rank and alpha patterns and a saved LM head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"v_proj": 2},
                        alpha_pattern={"down_proj": 32}, modules_to_save=["lm_head"],
                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    return out


_LORA_DRIVER = """
import sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.run_yaml import main
main.main([sys.argv[1], sys.argv[2], '--no-lazy-unpickle', '--random-seed', '0', '--quiet',
           '--lora-merge-cache', sys.argv[3]], standalone_mode=False)
"""


def test_model_plus_lora_references_equal_mergekit(llama, tmp_path, capsys):
    """`model: BASE+ADAPTER` folds the adapter into the model as read (mergekit merges it with PEFT first)."""
    import subprocess
    import sys

    adapter = _lora_adapter(llama["ft1"], tmp_path / "adapter", seed=3)
    recipe = _write(tmp_path / "r.yml", f"""
merge_method: ties
base_model: {llama['base']}
models:
  - {{model: {llama['ft1']}+{adapter}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {llama['ft2']}, parameters: {{weight: 0.4, density: 0.5}}}}
dtype: float32
""")
    result = subprocess.run([sys.executable, "-c", _LORA_DRIVER, str(recipe), str(tmp_path / "mergekit"), str(tmp_path / "cache")],
                            cwd=tmp_path, env=tm.offline_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rc, err = _run(capsys, recipe, "--output", tmp_path / "ours", "--quiet")
    assert rc == 0, err
    a, b = tm.read_dir(tmp_path / "ours"), tm.read_dir(tmp_path / "mergekit")
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], err_msg=name, **TOL)
    # The adapter changed the merge: without it the same recipe gives other tensors.
    (tmp_path / "plain.yml").write_text(recipe.read_text().replace(f"+{adapter}", ""))
    rc, err = _run(capsys, tmp_path / "plain.yml", "--output", tmp_path / "plain", "--quiet")
    assert rc == 0, err
    plain = tm.read_dir(tmp_path / "plain")
    assert not np.allclose(plain["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_bad_lora_references_give_one_line_before_any_tensor(llama, tmp_path, capsys, vlm):
    adapter = _lora_adapter(llama["ft1"], tmp_path / "adapter", seed=4)
    capsys.readouterr()  # transformers' loading bar
    cases = {
        "missing": (f"{llama['ft1']}+{tmp_path / 'nowhere'}", ["models[0].model (its LoRA adapter)", "nowhere"]),
        "misfit": (f"{vlm['m0']}+{adapter}", ["adapter_model.safetensors", "does not have"]),
    }
    for name, (ref, needles) in cases.items():
        recipe = _write(tmp_path / f"{name}.yml", f"merge_method: linear\nmodels:\n  - model: {ref}\n")
        rc, err = _run(capsys, recipe, "--output", tmp_path / name, "--quiet")
        assert rc == 2, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
        assert not (tmp_path / name).exists()


def test_pytorch_bin_checkpoints_merge_like_their_safetensors(llama, tmp_path, capsys):
    """A model shipped as sharded pytorch_model-*.bin (read with weights_only) merges to the same bytes."""
    import shutil

    import torch

    state = tm.read_dir(llama["ft2"])
    binary = tmp_path / "ft2_bin"
    shutil.copytree(llama["ft2"], binary, ignore=shutil.ignore_patterns("*.safetensors*"))
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: torch.from_numpy(state[n]) for n in part}, binary / file)
        weight_map.update({n: file for n in part})
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models:
  - {{model: {llama['ft1']}, parameters: {{weight: 0.5}}}}
  - {{model: MODEL, parameters: {{weight: 0.5}}}}
dtype: float32
"""
    outs = {}
    for kind, model in (("safetensors", llama["ft2"]), ("bin", binary)):
        recipe = _write(tmp_path / f"{kind}.yml", text.replace("MODEL", str(model)))
        rc, err = _run(capsys, recipe, "--output", tmp_path / kind, "--quiet")
        assert rc == 0, (kind, err)
        outs[kind] = tm.read_dir(tmp_path / kind)
    for name in outs["safetensors"]:
        np.testing.assert_array_equal(outs["bin"][name], outs["safetensors"][name], err_msg=name)
