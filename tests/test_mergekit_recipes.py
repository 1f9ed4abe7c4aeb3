"""mergekit recipes, unchanged, through `jaxmerge merge`: mergekit 0.1.5 is the oracle.

Tiny Llama- and GPT-2-shaped models are built offline with transformers
(tests/tiny_models.py); mergekit-yaml and `jaxmerge merge` run the same
recipe; the outputs must agree tensor for tensor (deterministic methods), in
distribution (random ones), in logits once loaded with transformers, and in
config.json. Bad recipes must give one line, exit 2 and no output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from jaxmerge.cli import build_parser, main
from jaxmerge.engine.stream import merge_checkpoints
from jaxmerge.methods import _table as table

TOL = dict(rtol=1e-5, atol=1e-6)  # float32: summation order differs, nothing else
TOKENS = np.array([[1, 5, 9, 17, 33, 65, 100, 127, 2]])


def has_method(name: str) -> bool:
    return name in table.names()


def recipes(L: dict, G: dict) -> dict[str, str]:
    """Recipes by name; L / G map llama / gpt2 model names to absolute paths (mergekit's card
    would look relative paths up on the Hub)."""
    r = {
        "linear": f"""
merge_method: linear
models:
  - {{model: {L['ft1']}, parameters: {{weight: 0.7}}}}
  - {{model: {L['ft2']}, parameters: {{weight: 0.3}}}}
  - {{model: {L['ft3']}, parameters: {{weight: 0.5}}}}
dtype: float32
""",
        "task_arithmetic": f"""
merge_method: task_arithmetic
base_model: {L['base']}
models:
  - {{model: {L['ft1']}, parameters: {{weight: 1.0}}}}
  - {{model: {L['ft2']}, parameters: {{weight: -0.5}}}}
  - {{model: {L['ft3']}, parameters: {{weight: 0.7}}}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
        "ties": f"""
merge_method: ties
base_model: {L['base']}
models:
  - model: {L['base']}
  - {{model: {L['ft1']}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {L['ft2']}, parameters: {{weight: 0.3, density: 0.6}}}}
  - {{model: {L['ft3']}, parameters: {{weight: 0.5, density: 0.4}}}}
parameters: {{int8_mask: true}}
dtype: float32
""",
        "ties_unnormalized": f"""
merge_method: ties
base_model: {L['base']}
models:
  - {{model: {L['ft1']}, parameters: {{weight: 1.0}}}}
  - {{model: {L['ft2']}, parameters: {{weight: 0.6}}}}
parameters: {{normalize: false, density: 0.3}}
dtype: float32
""",
        "breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {L['base']}
models:
  - {{model: {L['ft1']}, parameters: {{weight: 0.8}}}}
  - {{model: {L['ft2']}, parameters: {{weight: 0.5, gamma: 0.05}}}}
parameters: {{density: 0.8, gamma: 0.02}}
dtype: float32
""",
        # Gradients and {filter, value} lists, with every level of mergekit's precedence.
        "gradients": f"""
merge_method: ties
base_model: {L['base']}
models:
  - model: {L['base']}
  - model: {L['ft1']}
    parameters:
      weight: [{{filter: self_attn, value: 0.8}}, {{filter: mlp, value: [0.2, 1.0]}}, {{value: 0.5}}]
      density: [0.2, 0.5, 0.9]
  - model: {L['ft2']}
    parameters:
      weight: 0.3
      density: [{{filter: nothing_matches, value: 0.1}}]
parameters:
  normalize: false
  density: 0.7
tokenizer_source: base
dtype: float32
""",
        # Per-slice merges: slice parameters, per-source parameters, gradients over each slice.
        "slices_merge": f"""
merge_method: task_arithmetic
base_model: {L['base']}
slices:
  - sources:
      - {{model: {L['base']}, layer_range: [0, 2]}}
      - {{model: {L['ft1']}, layer_range: [0, 2], parameters: {{weight: 0.9}}}}
      - {{model: {L['ft2']}, layer_range: [0, 2]}}
    parameters: {{weight: 0.4}}
  - sources:
      - {{model: {L['base']}, layer_range: [2, 4]}}
      - {{model: {L['ft1']}, layer_range: [2, 4]}}
      - {{model: {L['ft2']}, layer_range: [2, 4]}}
    parameters: {{weight: [0.1, 0.9]}}
parameters: {{weight: 2.0, lambda: 0.5}}
tokenizer_source: {L['ft1']}
dtype: float32
""",
        # A frankenmerge: layers 0-2 of ft1 then 1-3 of ft2 (6 layers); linear of one source copies it.
        "frankenmerge": f"""
merge_method: linear
slices:
  - sources: [{{model: {L['ft1']}, layer_range: [0, 3]}}]
  - sources: [{{model: {L['ft2']}, layer_range: [1, 4]}}]
parameters: {{weight: 1.0}}
dtype: float32
""",
        "gpt2_frankenmerge": f"""
merge_method: linear
slices:
  - sources: [{{model: {G['ft1']}, layer_range: [0, 2]}}]
  - sources: [{{model: {G['ft2']}, layer_range: [1, 3]}}]
parameters: {{weight: 1.0}}
dtype: float32
""",
        "out_dtype": f"""
merge_method: task_arithmetic
base_model: {L['base']}
models:
  - {{model: {L['ft1']}, parameters: {{weight: 0.6}}}}
  - {{model: {L['ft2']}, parameters: {{weight: 0.4}}}}
dtype: float32
out_dtype: bfloat16
""",
        "gpt2_gradients": f"""
merge_method: task_arithmetic
base_model: {G['base']}
models:
  - model: {G['ft1']}
    parameters:
      weight: [{{filter: attn, value: [1.0, 0.0]}}, {{value: [0.2, 1.0]}}]
  - {{model: {G['ft2']}, parameters: {{weight: 0.5}}}}
dtype: float32
""",
    }
    for name, density in (("dare_linear", 0.3), ("dare_ties", 0.5), ("della", 0.5)):
        extra = ", epsilon: 0.1" if name == "della" else ""
        models = "\n".join(f"  - {{model: {L[m]}, parameters: {{weight: {w}}}}}" for m, w in (("ft1", 1.0), ("ft2", 0.6), ("ft3", 0.8)))
        r[name] = f"merge_method: {name}\nbase_model: {L['base']}\nmodels:\n{models}\nparameters: {{density: {density}{extra}}}\ndtype: float32\n"
    if has_method("passthrough"):
        r["passthrough"] = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {L['ft1']}, layer_range: [0, 3]}}]
  - sources: [{{model: {L['ft2']}, layer_range: [1, 4]}}]
dtype: float32
"""
        r["gpt2_passthrough"] = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {G['ft1']}, layer_range: [0, 2]}}]
  - sources: [{{model: {G['ft2']}, layer_range: [1, 3]}}]
dtype: float32
"""
    if has_method("slerp"):  # mergekit's README example: t gradients filtered by module
        r["slerp"] = f"""
slices:
  - sources:
      - {{model: {L['ft1']}, layer_range: [0, 4]}}
      - {{model: {L['ft2']}, layer_range: [0, 4]}}
merge_method: slerp
base_model: {L['ft1']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    return r


class Env:
    def __init__(self, root: Path):
        self.root = root
        llama = tm.make_family(root / "models", "llama", n_finetunes=3)
        gpt2 = tm.make_family(root / "models", "gpt2", n_finetunes=2, seed=1)
        self.L = dict(zip(["base", "ft1", "ft2", "ft3"], llama))
        self.G = dict(zip(["base", "ft1", "ft2"], gpt2))
        self.recipes = {}
        for name, text in recipes(self.L, self.G).items():
            path = root / "recipes" / f"{name}.yml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text.lstrip())
            self.recipes[name] = path
        self.mergekit = {name: root / "mergekit" / name for name in self.recipes}
        tm.run_mergekit([(self.recipes[n], self.mergekit[n]) for n in self.recipes], cwd=root)
        self._ours = {}

    def ours(self, name: str, *extra: str) -> Path:
        """`jaxmerge merge recipe.yml --output OUT` (in this process), once per name and flags."""
        key = (name, extra)
        if key not in self._ours:
            out = self.root / "jaxmerge" / (name + "".join(extra).replace("-", "_"))
            assert main(["merge", str(self.recipes[name]), "--output", str(out), "--quiet", *extra]) == 0
            self._ours[key] = out
        return self._ours[key]


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("mergekit_recipes"))


def assert_same_tensors(ours: Path, theirs: Path, **tol):
    a, b = tm.read_dir(ours), tm.read_dir(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], err_msg=name, **(tol or TOL))


DETERMINISTIC = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "breadcrumbs", "gradients", "slices_merge",
                 "frankenmerge", "gpt2_gradients", "gpt2_frankenmerge", "passthrough", "gpt2_passthrough", "slerp"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_recipes_equal_mergekit(env, name):
    if name not in env.recipes:
        pytest.skip(f"method {name.removeprefix('gpt2_')} is not in the method table yet")
    ours, theirs = env.ours(name), env.mergekit[name]
    assert_same_tensors(ours, theirs)
    # config.json as mergekit writes it (dtype field, layer count of a frankenmerge).
    mine, mk = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    mine.pop("transformers_version", None), mk.pop("transformers_version", None)
    assert mine == mk
    if (theirs / "generation_config.json").exists():  # copied by mergekit unless it rebuilds the tokenizer
        assert (ours / "generation_config.json").read_bytes() == (theirs / "generation_config.json").read_bytes()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ours).get_vocab() == AutoTokenizer.from_pretrained(theirs).get_vocab()


def test_frankenmerge_layers_are_the_sources_layers(env):
    out, ft1, ft2 = (tm.read_dir(p) for p in (env.ours("frankenmerge"), env.L["ft1"], env.L["ft2"]))
    assert json.loads((env.ours("frankenmerge") / "config.json").read_text())["num_hidden_layers"] == 6
    for layer, (source, at) in enumerate([(ft1, 0), (ft1, 1), (ft1, 2), (ft2, 1), (ft2, 2), (ft2, 3)]):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        np.testing.assert_array_equal(out[name], source[f"model.layers.{at}.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(out["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])
    np.testing.assert_array_equal(out["lm_head.weight"], ft2["lm_head.weight"])


def test_recipe_changes_the_result(env):
    """The comparisons above can fail: a gradient and filters change tensors (and differ from ties without them)."""
    a, b = tm.read_dir(env.ours("gradients")), tm.read_dir(env.ours("ties"))
    assert not np.allclose(a["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    base = tm.read_dir(env.L["base"])
    # Layer 0's mlp weight is 0.2 and layer 3's 1.0 (gradient [0.2, 1.0]); self_attn 0.8 everywhere.
    ft1, ft2 = tm.read_dir(env.L["ft1"]), tm.read_dir(env.L["ft2"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.allclose(a[name], b[name])
    assert np.abs(a[name] - base[name]).max() < np.abs(ft1[name] - base[name]).max() + np.abs(ft2[name] - base[name]).max()


def test_out_dtype_writes_bfloat16_as_mergekit(env):
    ours, theirs = env.ours("out_dtype"), env.mergekit["out_dtype"]
    from safetensors import safe_open

    with safe_open(str(ours / "model.safetensors"), "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((ours / "config.json").read_text())["dtype"] == "bfloat16"
    # One rounding of the same float32 result: equal, or one bfloat16 ulp apart where summation order differs.
    assert_same_tensors(ours, theirs, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("name", ["ties", "frankenmerge", "passthrough", "slerp", "gpt2_gradients", "gpt2_frankenmerge"])
def test_outputs_load_with_transformers_and_give_mergekits_logits(env, name):
    if name not in env.recipes:
        pytest.skip(f"method {name} is not in the method table yet")
    ours = tm.logits(env.ours(name), TOKENS)
    theirs = tm.logits(env.mergekit[name], TOKENS)
    base = tm.logits(env.G["base"] if name.startswith("gpt2") else env.L["base"], TOKENS)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ours, base, atol=1e-4)  # the merge did something


def _kept_and_l1(out: Path, base: Path):
    a, b = tm.read_dir(out), tm.read_dir(base)
    kept = sum(int(np.count_nonzero(a[k] - b[k])) for k in b)
    total = sum(b[k].size for k in b)
    l1 = sum(float(np.abs(a[k] - b[k]).sum()) for k in b)
    return kept / total, l1


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della"])
def test_random_recipes_match_mergekit_in_distribution_and_are_seeded(env, name):
    ours, theirs = env.ours(name), env.mergekit[name]
    share, l1 = _kept_and_l1(ours, env.L["base"])
    mk_share, mk_l1 = _kept_and_l1(theirs, env.L["base"])
    # ~37k entries: the kept share's standard deviation is ~0.003.
    assert abs(share - mk_share) < 0.02, (share, mk_share)
    assert abs(l1 / mk_l1 - 1) < 0.05, (l1, mk_l1)
    assert 0.05 < share < 0.95
    again = env.ours(name, "--force")  # same recipe, same seed: bit for bit
    a, b = tm.read_dir(ours), tm.read_dir(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = tm.read_dir(env.ours(name, "--seed", "1"))
    assert not all(np.array_equal(a[k], other[k]) for k in a)


def test_output_directory_is_publishable(env):
    out = env.ours("gradients")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- merge\n" in card and "- jaxmerge\n" in card
    assert "`ties`" in card and "arXiv:2306.01708" in card and str(env.L["ft1"]) in card
    assert (out / "mergekit_config.yml").read_text() == env.recipes["gradients"].read_text()
    assert env.recipes["gradients"].read_text().strip() in card
    record = json.loads((out / "jaxmerge_recipe.json").read_text())
    assert record["recipe_file"] == str(env.recipes["gradients"].resolve())
    for entry in record["resolved_inputs"]:
        assert Path(entry["path"]).is_absolute()
        for file, size in entry["files"].items():
            assert Path(file).is_absolute() and Path(file).stat().st_size == size
    assert (out / "tokenizer.json").read_bytes() == (env.L["base"] / "tokenizer.json").read_bytes()


def test_dry_run_of_a_recipe_writes_nothing(env, tmp_path, capsys):
    rc = main(["merge", str(env.recipes["frankenmerge"]), "--output", str(tmp_path / "o"), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0 and "model.layers.5.mlp.up_proj.weight" in text and "dry run: nothing written" in text
    assert not (tmp_path / "o").exists()


def test_hub_repo_ids_resolve_from_the_local_cache(env, tmp_path):
    cache = tmp_path / "hub"
    for name in ("base", "ft1", "ft2"):
        tm.hub_cache(cache, f"acme/llama-{name}", env.L[name])
    text = env.recipes["ties_unnormalized"].read_text()
    for name in ("base", "ft1", "ft2"):
        text = text.replace(str(env.L[name]), f"acme/llama-{name}")
    recipe = tmp_path / "hub.yml"
    recipe.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(tmp_path / "out"), "--quiet"],
        env=tm.offline_env(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home")), capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert_same_tensors(tmp_path / "out", env.ours("ties_unnormalized"), rtol=0, atol=0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model:\n- acme/llama-base\n- acme/llama-ft1\n" in card
    # A repo id absent from the cache: one line, exit 2, nothing downloaded (offline).
    recipe.write_text(text.replace("acme/llama-ft2", "acme/not-cached"))
    run = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(tmp_path / "out2"), "--quiet"],
        env=tm.offline_env(HF_HUB_CACHE=str(cache)), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and "acme/not-cached" in run.stderr and "models[1].model" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


def test_gpt2_layers_named_h_N_without_prefix(env, tmp_path):
    """Old GPT-2 checkpoints name layers `h.N.` (no `transformer.`): gradients find them too."""
    stripped = {}
    for name in ("base", "ft1", "ft2"):
        directory = tmp_path / name
        shutil.copytree(env.G[name], directory)
        tensors = load_file(str(directory / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(directory / "model.safetensors"))
        stripped[name] = directory
    text = env.recipes["gpt2_gradients"].read_text()
    for name in ("base", "ft1", "ft2"):
        text = text.replace(str(env.G[name]), str(stripped[name]))
    (tmp_path / "r.yml").write_text(text)
    assert main(["merge", str(tmp_path / "r.yml"), "--output", str(tmp_path / "out"), "--quiet"]) == 0
    ours, reference = tm.read_dir(tmp_path / "out"), tm.read_dir(env.ours("gpt2_gradients"))
    assert sorted(ours) == sorted(k.removeprefix("transformer.") for k in reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(ours[name.removeprefix("transformer.")], value)


# ------------------------------------------------------------------------------------ bad input


def _bad_models(env, root: Path) -> dict[str, Path]:
    out = {}
    for name, change in {
        "missing": lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        "vocab": lambda t: t.update({"model.embed_tokens.weight": np.zeros((130, 32), np.float32)}),
        "nan": lambda t: t["model.layers.2.self_attn.q_proj.weight"].__setitem__((0, 0), np.nan),
    }.items():
        directory = root / name
        shutil.copytree(env.L["ft2"], directory)
        tensors = load_file(str(directory / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
        out[name] = directory
    return out


def _run(capsys, *argv):
    rc = main(["merge", *map(str, argv)])
    err = capsys.readouterr().err
    return rc, err


def test_bad_recipes_give_one_line_exit_2_and_nothing_written(env, tmp_path, capsys):
    bad = _bad_models(env, tmp_path)
    L = env.L
    ties = env.recipes["ties_unnormalized"].read_text()
    cases = {
        "unknown_method": (ties.replace("merge_method: ties", "merge_method: average"), ["merge_method", "'average'"]),
        "unknown_key": (ties + "foo: 1\n", ["unknown key 'foo'"]),
        "unknown_param": (ties.replace("normalize: false", "normalise: false"), ["parameters.normalise", "ties"]),
        "missing_tensor": (ties.replace(str(L["ft2"]), str(bad["missing"])), [f"{bad['missing']}: tensor model.layers.1.mlp.up_proj.weight is missing"]),
        "vocab": (ties.replace(str(L["ft2"]), str(bad["vocab"])), ["model.embed_tokens.weight", "[130, 32]", "[128, 32]"]),
        "layer_range": (env.recipes["slices_merge"].read_text().replace("[2, 4]", "[2, 6]"), ["slices[1].sources[0].layer_range [2, 6]", "4 layers"]),
        "weight_type": (ties.replace("weight: 1.0", "weight: heavy"), ["models[0].parameters.weight", "'heavy'"]),
        "yaml": ("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n", ["line 4, column"]),
        "old_format": ("method: ties\nmodels:\n  - {path: a}\n", ["method is jaxmerge's old recipe format; mergekit's key is merge_method"]),
        "old_model_key": (ties.replace(f"model: {L['ft1']}", f"path: {L['ft1']}"), ["models[0].path is jaxmerge's old recipe format; mergekit's key is model"]),
        "modules": ("merge_method: ties\nmodules: {}\n", ["modules"]),
        "lora_ref": (ties.replace(str(L["ft1"]), str(L["ft1"]) + "+some/lora"), ["models[0].model", "LoRA"]),
        "slerp_count": (ties.replace("merge_method: ties", "merge_method: slerp").replace("normalize: false, density: 0.3", "t: 0.5"), ["slerp"]),
        "nan": (ties.replace(str(L["ft2"]), str(bad["nan"])), [f"{bad['nan']}: tensor model.layers.2.self_attn.q_proj.weight holds NaN", "--allow-nonfinite"]),
    }
    for name, (text, needles) in cases.items():
        if name == "slerp_count" and not has_method("slerp"):
            continue
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text(text)
        out = tmp_path / "out" / name
        strict = ["--strict"] if name == "unknown_param" else []
        rc, err = _run(capsys, recipe, "--output", out, "--quiet", *strict)
        assert rc == 2, (name, err)
        # One error line; slerp_count's leftover weights add their warning line before it.
        errors = [line for line in err.strip().splitlines() if "warning:" not in line]
        assert len(errors) == 1 and "error:" in errors[0], (name, err)
        assert ("warning:" in err) == (name == "slerp_count"), (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
        if name not in ("missing_tensor", "vocab", "nan"):  # those name the model's file instead
            assert str(recipe) in err, (name, err)
        parent = tmp_path / "out"
        assert not out.exists() and (not parent.exists() or not list(parent.iterdir())), name
    rc, err = _run(capsys, env.recipes["ties"], "--method", "dare_ties", "--output", tmp_path / "o")
    assert rc == 2 and "--method does not combine with a recipe" in err and not (tmp_path / "o").exists()
    # --allow-nonfinite merges the NaN input anyway.
    rc, err = _run(capsys, tmp_path / "nan.yml", "--output", tmp_path / "nan_out", "--quiet", "--allow-nonfinite")
    assert rc == 0, err


def test_bad_recipe_from_a_real_process(tmp_path):
    recipe = tmp_path / "broken.yml"
    recipe.write_text("merge_method: ties\nmodels: [\n")
    run = subprocess.run([sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(tmp_path / "o")],
                         env=tm.offline_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert str(recipe) in run.stderr and "line 3, column 1" in run.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- flags (issue 16)


@pytest.mark.parametrize("weights", [["-0.5,1,0.7"], ["-0.5", "1", "0.7"], ["-0.5,", "1,", "0.7"]])
def test_negative_weights_in_both_forms(env, tmp_path, capsys, weights):
    models = [env.L["ft1"], env.L["ft2"], env.L["ft3"]]
    out = tmp_path / "flags"
    rc, err = _run(capsys, *models, "--base", env.L["base"], "--method", "task_arithmetic", "--weights", *weights,
                   "--output", out, "--quiet")
    assert rc == 0, err
    merge_checkpoints(models, tmp_path / "api", method="task_arithmetic", base=env.L["base"], weights=[-0.5, 1, 0.7], progress=False)
    assert_same_tensors(out, tmp_path / "api", rtol=0, atol=0)
    # Model directories in, a loadable model directory out, flags or not.
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert "merge_method: task_arithmetic" in (out / "mergekit_config.yml").read_text()
    # The recipe written beside the output repeats the merge (semantics included).
    rc, err = _run(capsys, out / "mergekit_config.yml", "--output", tmp_path / "again", "--quiet")
    assert rc == 0, err
    assert_same_tensors(tmp_path / "again", out, rtol=0, atol=0)


def test_help_and_density_behaviour_agree(env, tmp_path, capsys):
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    text = " ".join(merge.format_help().split())
    assert "--method" in text and "required for checkpoints" in text
    assert "1 or more keeps everything" in text
    models = [env.L["ft1"], env.L["ft2"]]
    outs = []
    for density in ("1.5", "1"):
        outs.append(tmp_path / density)
        rc, err = _run(capsys, *models, "--base", env.L["base"], "--method", "ties", "--density", density, "--output", outs[-1], "--quiet")
        assert rc == 0, err
    assert_same_tensors(outs[0], outs[1], rtol=0, atol=0)
    rc, err = _run(capsys, *models, "--output", tmp_path / "x")
    assert rc == 2 and "--method is required" in err


def test_recipe_written_for_flags_repeats_them(env, tmp_path, capsys):
    """Flags mean the table's (PEFT) semantics; the mergekit_config.yml they leave says so, and repeats the merge."""
    flags = [env.L["ft1"], env.L["ft2"], "--base", env.L["base"], "--method", "ties", "--weights", "1,0.3", "--density", "0.5"]
    rc, err = _run(capsys, *flags, "--output", tmp_path / "flags", "--quiet")
    assert rc == 0, err
    written = (tmp_path / "flags" / "mergekit_config.yml").read_text()
    assert "semantics: peft" in written
    rc, err = _run(capsys, tmp_path / "flags" / "mergekit_config.yml", "--output", tmp_path / "again", "--quiet")
    assert rc == 0, err
    assert_same_tensors(tmp_path / "again", tmp_path / "flags", rtol=0, atol=0)
    (tmp_path / "mk.yml").write_text(written.replace("semantics: peft", "semantics: mergekit"))
    rc, err = _run(capsys, tmp_path / "mk.yml", "--output", tmp_path / "mk", "--quiet")
    assert rc == 0, err
    a, b = tm.read_dir(tmp_path / "mk"), tm.read_dir(tmp_path / "flags")
    assert not all(np.allclose(a[k], b[k]) for k in a)  # the two semantics differ on unequal weights
