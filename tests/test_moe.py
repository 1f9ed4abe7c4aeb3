"""`jaxmerge moe`: mixtures of experts from mergekit-moe configurations, with mergekit 0.1.5's `mergekit-moe`
as the oracle.

Tiny Llama and Qwen3 families (a base and fine-tunes = base + small random deltas)
are built offline; mergekit-moe (one process for every configuration) and
`jaxmerge moe` build the same configurations. Both outputs are loaded with
transformers' AutoModelForCausalLM (transformers 5 reads jaxmerge's Hub layout,
`block_sparse_moe.experts.N.w1`, and mergekit's fused one into the same model):
every tensor of the loaded models must agree (experts bit for bit; routers to
float32 rounding for cheap_embed, bit for bit for the hidden modes, which both
compute with transformers in bfloat16), the configs as transformers reads them
must be equal, and so must the logits. DeepSeek MoE needs remote code, so its
tensors and config.json are compared as files. The random gate modes and
noise_scale are checked for their distribution and their reproducibility by seed;
bad configurations give one line, exit 2 and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.cli import main

pytest.importorskip("mergekit", reason="the oracle is mergekit 0.1.5 (the test extra installs it)")
torch = pytest.importorskip("torch", reason="the outputs are loaded with transformers, which needs torch")

QWEN3 = dict(tm.LLAMA, head_dim=8)
PROMPTS = {
    "ft1": dict(positive_prompts=["w3 w4 w5", "w6 w7"], negative_prompts=["w9 w10"]),
    "ft2": dict(positive_prompts=["w11 w12 w13 w14"]),
    "ft3": dict(positive_prompts=["w20 w21", "w22"]),
}


def _family(root: Path, kind: str, dtype: str, n: int, seed: int) -> list[Path]:
    """A base and `n` fine-tunes (base + 5% noise), saved in `dtype` with the word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tm.LLAMA)) if kind == "llama" else Qwen3ForCausalLM(Qwen3Config(**QWEN3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n + 1):
        if i:
            gen = torch.Generator().manual_seed(seed * 100 + i)
            model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) * v.abs().mean().clamp_min(1e-3)
                                   for k, v in base.items()})
        directory = root / f"{kind}-{dtype}-{'base' if i == 0 else f'ft{i}'}"
        model.to(getattr(torch, dtype)).save_pretrained(directory)
        model.to(torch.float32)
        tm.save_tokenizer(directory)
        dirs.append(directory)
    return dirs


def _expert(path: Path, name: str, **extra) -> dict:
    return {"source_model": str(path), **PROMPTS[name], **extra}


def _configs(llama, llama_bf16, qwen3) -> dict[str, dict]:
    base, ft1, ft2, ft3 = llama
    return {
        # Mixtral from Llama, prompts with negatives, a residual scale, three experts (not a power of two).
        "mixtral_cheap": {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "float32",
                          "experts": [_expert(ft1, "ft1"), _expert(ft2, "ft2", residual_scale=0.5),
                                      _expert(ft3, "ft3")]},
        # Qwen MoE: one shared expert with prompts (mergekit reads it only when it is one of the other models).
        "qwen_moe": {"base_model": str(base), "gate_mode": "cheap_embed", "architecture": "qwen",
                     "experts_per_token": 1,
                     "experts": [_expert(ft1, "ft1"), _expert(ft2, "ft2")],
                     "shared_experts": [_expert(base, "ft3", residual_scale=0.3)]},
        # DeepSeek MoE: an ungated shared expert.
        "deepseek": {"base_model": str(base), "gate_mode": "cheap_embed",
                     "experts": [_expert(ft1, "ft1"), _expert(ft2, "ft2")],
                     "shared_experts": [{"source_model": str(base)}]},
        # Qwen3 MoE, routers from the base's hidden states (last token).
        "qwen3_hidden": {"base_model": str(qwen3[0]), "gate_mode": "hidden",
                         "experts": [_expert(qwen3[1], "ft1"), _expert(qwen3[2], "ft2")]},
        # bfloat16 models, mean hidden states, the dtype left to the base config.
        "mixtral_bf16_hidden_avg": {"base_model": str(llama_bf16[0]), "gate_mode": "hidden_avg",
                                    "experts": [_expert(llama_bf16[1], "ft1"), _expert(llama_bf16[2], "ft2")]},
    }


_MOE_DRIVER = """
import sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.moe import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main.main([config, out, "--no-lazy-unpickle", "--random-seed", "0", "--quiet"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every configuration built by mergekit-moe (one process) and by `jaxmerge moe`."""
    root = tmp_path_factory.mktemp("moe")
    llama = _family(root, "llama", "float32", 3, seed=0)
    configs = _configs(llama, _family(root, "llama", "bfloat16", 2, seed=1), _family(root, "qwen3", "float32", 2, seed=2))
    digests = {p: _digest(p) for p in root.iterdir()}
    jobs = []
    for name, config in configs.items():
        (root / f"{name}.yml").write_text(json.dumps(config))
        jobs += [root / f"{name}.yml", root / f"mergekit-{name}"]
    result = subprocess.run([sys.executable, "-c", _MOE_DRIVER, *map(str, jobs)], cwd=root, env=tm.offline_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in configs:
        assert main(["moe", str(root / f"{name}.yml"), str(root / f"jaxmerge-{name}"), "--quiet"]) == 0
    return root, configs, digests, llama


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _loaded(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model


def _config(directory: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    return config


@pytest.mark.parametrize("name, cls, exact_gates", [
    ("mixtral_cheap", "MixtralForCausalLM", False),
    ("qwen_moe", "Qwen2MoeForCausalLM", False),
    ("qwen3_hidden", "Qwen3MoeForCausalLM", True),
    ("mixtral_bf16_hidden_avg", "MixtralForCausalLM", True),
])
def test_moe_equals_mergekit(built, name, cls, exact_gates):
    root, _, _, _ = built
    ours, theirs = _loaded(root / f"jaxmerge-{name}"), _loaded(root / f"mergekit-{name}")
    assert type(ours).__name__ == cls == type(theirs).__name__
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    for key in a:
        if ".gate." in key or "shared_expert_gate" in key:
            if exact_gates:
                assert torch.equal(a[key], b[key]), key
            else:  # float32 sums of the same embeddings in another order
                np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    assert _config(root / f"jaxmerge-{name}") == _config(root / f"mergekit-{name}")
    tokens = torch.tensor([[1, 5, 9, 33, 70, 100, 3, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(tokens).logits.numpy(), theirs(tokens).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_layout_dtype_and_files(built):
    """jaxmerge writes the Hub's per-expert names, in the dtype asked for, with tokenizer, card and configuration."""
    from jaxmerge.formats.safetensors_io import Checkpoint

    root, configs, digests, llama = built
    out = root / "jaxmerge-mixtral_cheap"
    names = Checkpoint(out).tensors
    assert "model.layers.3.block_sparse_moe.experts.2.w1.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names and not any(".mlp." in n for n in names)
    # residual_scale scales the down projection (w2) only, in the expert's dtype.
    ft2 = Checkpoint(llama[2])
    np.testing.assert_array_equal(Checkpoint(out).read_host("model.layers.1.block_sparse_moe.experts.1.w2.weight"),
                                  ft2.read_host("model.layers.1.mlp.down_proj.weight") * np.float32(0.5))
    np.testing.assert_array_equal(Checkpoint(out).read_host("model.layers.1.block_sparse_moe.experts.1.w1.weight"),
                                  ft2.read_host("model.layers.1.mlp.gate_proj.weight"))
    bf16 = Checkpoint(root / "jaxmerge-mixtral_bf16_hidden_avg").tensors
    assert {t.dtype for t in bf16.values()} == {"BF16"}
    for f in ("tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_moe_config.yml", "generation_config.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "mergekit_moe_config.yml").read_text()) == configs["mixtral_cheap"]
    # The inputs were only read.
    assert {p: _digest(p) for p in digests} == digests


def test_deepseek_files_equal_mergekit(built):
    """DeepSeek MoE loads only with remote code: its tensors and config.json are compared as written."""
    root, _, _, _ = built
    ours, theirs = tm.read_dir(root / "jaxmerge-deepseek"), tm.read_dir(root / "mergekit-deepseek")
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6, err_msg=key)
    a = json.loads((root / "jaxmerge-deepseek" / "config.json").read_text())
    b = json.loads((root / "mergekit-deepseek" / "config.json").read_text())
    keys = ("architectures", "model_type", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "first_k_dense_replace", "moe_layer_freq", "scoring_func", "norm_topk_prob", "moe_intermediate_size",
            "auto_map", "torch_dtype", "hidden_size", "num_hidden_layers", "vocab_size")
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def _random_config(root: Path, llama, mode: str, **expert_extra) -> Path:
    config = {"base_model": str(llama[0]), "gate_mode": mode,
              "experts": [{"source_model": str(llama[1]), **expert_extra}, {"source_model": str(llama[2])}]}
    path = root / f"random-{mode}-{len(expert_extra)}.yml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_reproducible_by_seed(built, tmp_path, mode):
    from jaxmerge.formats.safetensors_io import Checkpoint

    root, _, _, llama = built
    config = _random_config(tmp_path, llama, mode)
    gates = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["moe", str(config), str(tmp_path / run), "--seed", str(seed), "--quiet"]) == 0
        c = Checkpoint(tmp_path / run)
        gates[run] = np.stack([c.read_host(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(4)])
    np.testing.assert_array_equal(gates["a"], gates["b"])
    assert not np.array_equal(gates["a"], gates["c"])
    g = gates["a"]
    assert g.shape == (4, 2, tm.LLAMA["hidden_size"])
    if mode == "uniform_random":  # torch's nn.Linear initialisation: U(-1/sqrt(h), 1/sqrt(h))
        bound = 1 / np.sqrt(tm.LLAMA["hidden_size"])
        assert np.abs(g).max() <= bound and np.abs(g).max() > 0.8 * bound
    else:
        assert abs(g.mean()) < 0.2 and 0.8 < g.std() < 1.2
    assert type(_loaded(tmp_path / "a")).__name__ == "MixtralForCausalLM"


def test_noise_scale_is_seeded_gaussian(built, tmp_path):
    from jaxmerge.formats.safetensors_io import Checkpoint

    root, _, _, llama = built
    config = _random_config(tmp_path, llama, "random", noise_scale=0.01)
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(["moe", str(config), str(tmp_path / run), "--seed", str(seed), "--quiet"]) == 0
    name, source = "model.layers.2.block_sparse_moe.experts.0.w3.weight", "model.layers.2.mlp.up_proj.weight"
    a, b, c = (Checkpoint(tmp_path / r).read_host(name) for r in "abc")
    noise = a - Checkpoint(llama[1]).read_host(source)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(noise.mean()) < 2e-3 and 0.008 < noise.std() < 0.012
    # The expert without noise_scale is copied exactly.
    np.testing.assert_array_equal(Checkpoint(tmp_path / "a").read_host(name.replace("experts.0", "experts.1")),
                                  Checkpoint(llama[2]).read_host(source))


def _bad(tmp_path: Path, config: dict, *extra: str) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    return path, out


@pytest.mark.parametrize("change, expected", [
    (lambda c, m: c.update(experts_per_token=3), "2 experts for experts_per_token 3"),
    (lambda c, m: c.update(experts_per_token=0), "experts_per_token must be >= 1"),
    (lambda c, m: c["experts"][1].pop("positive_prompts"), "experts[1] has no positive_prompts"),
    (lambda c, m: c["experts"][1].update(PROMPTS["ft1"]), "same positive and negative prompts"),
    (lambda c, m: c["experts"][1].update(source_model=c["experts"][0]["source_model"]), "every expert is"),
    (lambda c, m: c.update(gate_mode="hiden"), "gate_mode must be one of"),
    (lambda c, m: c.update(architecture="gpt"), "architecture 'gpt' names no output architecture"),
    (lambda c, m: c.update(shared_experts=[{"source_model": c["base_model"]}], architecture="mixtral"),
     "Mixtral takes no shared expert"),
    (lambda c, m: c["experts"][1].update(source_model=str(m["qwen3"])), "model_type ['llama', 'qwen3']"),
    (lambda c, m: c["experts"][1].update(source_model=str(m["wide"])), "has shape [96, 32], the base"),
    (lambda c, m: c["experts"][0].update(source_model="/nonexistent/model"), "no such file or directory"),
    (lambda c, m: c["experts"][0].update(noise_scale="big"), "noise_scale must be a number"),
])
def test_bad_configuration_is_one_line(built, tmp_path, capsys, change, expected):
    from transformers import LlamaConfig, LlamaForCausalLM

    root, configs, _, llama = built
    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**tm.LLAMA, "intermediate_size": 96})).save_pretrained(wide)
    config = json.loads(json.dumps({k: v for k, v in configs["mixtral_cheap"].items() if k != "dtype"}))
    config["experts"] = config["experts"][:2]
    change(config, {"qwen3": root / "qwen3-float32-ft1", "wide": wide})
    path, out = _bad(tmp_path, config)
    capsys.readouterr()
    assert main(["moe", str(path), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxmerge moe: error: ") and expected in err, err
    assert not out.exists()


def test_base_without_tokenizer_is_one_line(built, tmp_path, capsys):
    """cheap_embed tokenises while the experts are copied (a child process); its failure still ends the build
    with one line, exit 2, and nothing written."""
    import shutil

    root, configs, _, llama = built
    base = tmp_path / "base-without-tokenizer"
    base.mkdir()
    for f in llama[0].iterdir():
        if "token" not in f.name:
            shutil.copy(f, base / f.name)
    config = dict(configs["mixtral_cheap"], base_model=str(base))
    path, out = _bad(tmp_path, config)
    capsys.readouterr()
    assert main(["moe", str(path), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{base}: no tokenizer for the experts' prompts" in err, err
    assert not out.exists() and not list(tmp_path.glob(".*out*"))


def test_broken_tokenizer_fails_at_the_routers_with_one_line(built, tmp_path, capsys, monkeypatch):
    """A tokenizer that exists but cannot load is found when the routers are computed (the child fails, the
    in-process try fails too): one line naming the base, exit 2, nothing written, no request file left."""
    import shutil
    import tempfile

    root, configs, _, llama = built
    base = tmp_path / "base-broken-tokenizer"
    shutil.copytree(llama[0], base)
    (base / "tokenizer.json").write_text("{not json")
    config = dict(configs["mixtral_cheap"], base_model=str(base))
    path, out = _bad(tmp_path, config)
    # A temporary directory of this test's own: other workers' merges write their requests to the shared one.
    requests = tmp_path / "tmp"
    requests.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(requests))
    capsys.readouterr()
    assert main(["moe", str(path), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{base}: no tokenizer for the experts' prompts (" in err, err
    assert not out.exists() and not list(tmp_path.glob(".*out*"))
    assert not list(requests.iterdir())


@pytest.mark.parametrize("dry_run", [False, True])
def test_similar_prompts_warn_once(built, tmp_path, capsys, dry_run):
    """Experts whose prompts point the same way: one warning naming the layers (mergekit's
    warn_degenerate_gates), from the lazily computed routers as from a dry run."""
    root, configs, _, llama = built
    config = json.loads(json.dumps(configs["mixtral_cheap"]))
    shared = " ".join(f"w{i}" for i in range(3, 40))  # the same long prompt, one word apart
    for i, expert in enumerate(config["experts"]):
        expert.update(positive_prompts=[f"{shared} w{50 + i}"])
        expert.pop("negative_prompts", None)
    path, out = _bad(tmp_path, config)
    capsys.readouterr()
    assert main(["moe", str(path), str(out), "--quiet", *(["--dry-run"] if dry_run else [])]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "every layer: the routers' rows are nearly dependent" in err, err


def test_unknown_keys_warn_or_refuse_when_strict(built, tmp_path, capsys):
    root, configs, _, _ = built
    config = dict(configs["mixtral_cheap"], jaxmerge_extra=1)
    path, out = _bad(tmp_path, config)
    capsys.readouterr()
    assert main(["moe", str(path), str(out), "--quiet", "--strict"]) == 2
    assert "unknown key 'jaxmerge_extra'" in capsys.readouterr().err and not out.exists()
    assert main(["moe", str(path), str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "'jaxmerge_extra' is ignored, as mergekit-moe ignores it" in err
    assert main(["moe", str(path), str(out), "--quiet"]) == 2  # the output exists: --force replaces it
    assert "exists" in capsys.readouterr().err


def test_multi_file_builds_a_mixture_of_merges(built, tmp_path):
    """Beyond mergekit-multi: a multi file's MoE document takes an earlier merge of the file as an expert."""
    root, _, _, llama = built
    base, ft1, ft2, ft3 = llama
    merge_a = {"name": "A", "merge_method": "linear", "dtype": "float32",
               "models": [{"model": str(ft1), "parameters": {"weight": 0.5}},
                          {"model": str(ft2), "parameters": {"weight": 0.5}}]}
    mixture = {"base_model": str(base), "gate_mode": "cheap_embed",
               "experts": [{"source_model": "A", **PROMPTS["ft1"]}, _expert(ft3, "ft3")]}
    (tmp_path / "multi.yml").write_text(json.dumps(merge_a) + "\n---\n" + json.dumps(mixture))
    assert main(["multi", str(tmp_path / "multi.yml"), "-I", str(tmp_path / "merges"),
                 "--out-path", str(tmp_path / "moe"), "--quiet"]) == 0
    mixture["experts"][0]["source_model"] = str(tmp_path / "merges" / "A")
    (tmp_path / "direct.yml").write_text(json.dumps(mixture))
    assert main(["moe", str(tmp_path / "direct.yml"), str(tmp_path / "direct"), "--quiet"]) == 0
    ours, direct = tm.read_dir(tmp_path / "moe"), tm.read_dir(tmp_path / "direct")
    assert set(ours) == set(direct) and all(np.array_equal(ours[k], direct[k]) for k in ours)
    a = tm.read_dir(tmp_path / "merges" / "A")
    np.testing.assert_array_equal(ours["model.layers.0.block_sparse_moe.experts.0.w2.weight"],
                                  a["model.layers.0.mlp.down_proj.weight"])


def test_config_without_dtype_keeps_the_inputs_dtype(built, tmp_path):
    """No `dtype` in the configuration nor in the base's config.json: tensors keep theirs, routers follow the
    embeddings (mergekit would write float32 cheap_embed routers into a bfloat16 model)."""
    import shutil

    from jaxmerge.formats.safetensors_io import Checkpoint

    root, _, _, _ = built
    base = tmp_path / "base"
    shutil.copytree(root / "llama-bfloat16-base", base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps(config))
    moe = {"base_model": str(base), "gate_mode": "cheap_embed",
           "experts": [_expert(root / "llama-bfloat16-ft1", "ft1"), _expert(root / "llama-bfloat16-ft2", "ft2")]}
    (tmp_path / "moe.yml").write_text(json.dumps(moe))
    assert main(["moe", str(tmp_path / "moe.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    assert {t.dtype for t in Checkpoint(tmp_path / "out").tensors.values()} == {"BF16"}
