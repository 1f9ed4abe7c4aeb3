"""`jaxmerge extract-lora` against mergekit 0.1.5's `mergekit-extract-lora`, PEFT and the fine-tune itself.

A tiny Llama family (base + one fine-tune, float32, built offline) is extracted by mergekit (one
subprocess, several option sets) and by jaxmerge with the same options: with the exact
decomposition every module's B @ A equals mergekit's (float32 round-off) and the adapter config
agrees key for key; the randomized decomposition stays within 1% of the exact truncated SVD's
error; PEFT loads the adapter and its logits are those of base + B @ A; folding the adapter back
(`LoraFolded`) gives the fine-tune (exactly at full rank); bad inputs exit 2 with one line before
any tensor is computed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_family, offline_env  # noqa: E402

from jaxmerge.cli import main as cli_main  # noqa: E402
from jaxmerge.formats.lora import LoraFolded, load_adapter  # noqa: E402
from jaxmerge.tools import extract_lora as xl  # noqa: E402

# Option sets run by both tools (mergekit's flags; jaxmerge takes the same names).
CASES = {
    # max-rank 128 >= every matrix's rank: full rank (k/v projections 16, the rest 32: a rank_pattern).
    "default": [],
    "rank8": ["--max-rank", "8"],
    # mergekit 0.1.5 crashes with --save-module whenever it adds a name to modules_to_save itself (it appends
    # to click's tuple): with --embed-lora and --skip-undecomposable it adds none.
    "options": ["--max-rank", "4", "--no-distribute-scale", "--embed-lora", "--skip-undecomposable",
                "-i", r"layers\.[01]\.", "-i", "embed", "-i", "lm_head", "-e", r"layers\.1\.mlp", "--save-module", "o_proj"],
    "skip": ["--max-rank", "6", "--skip-undecomposable", "-e", "down_proj"],
    # --sv-epsilon is added by the fixture (a value away from every singular value).
    "epsilon": ["--max-rank", "12"],
}

_DRIVER = """
import json, sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.extract_lora import main
for args in json.loads(sys.argv[1]):
    main.main(args, standalone_mode=False)
"""


def _epsilon(base: Path, ft: Path) -> float:
    """A singular-value threshold between the 4th and 12th values of the deltas, away from all of them."""
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    values = np.concatenate([np.linalg.svd(f[k] - b[k], compute_uv=False) for k in f
                             if f[k].ndim == 2 and "layers" in k])
    values = np.sort(values)
    for candidate in np.quantile(values, np.linspace(0.3, 0.7, 41)):
        if np.min(np.abs(values - candidate)) > 1e-4 * candidate:
            return float(f"{candidate:.6g}")
    raise AssertionError("no threshold away from the singular values")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Base, fine-tune, mergekit's adapters (one process) and jaxmerge's exact ones, per case."""
    root = tmp_path_factory.mktemp("xlora")
    base, ft = make_family(root, "llama", 1)
    eps = _epsilon(base, ft)
    cases = {name: list(args) for name, args in CASES.items()}
    cases["epsilon"] += ["--sv-epsilon", str(eps)]
    jobs = [["--model", str(ft), "--base-model", str(base), "--out-path", str(root / f"mk-{name}"), *args]
            for name, args in cases.items()]
    result = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], cwd=root, env=offline_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name, args in cases.items():
        code = cli_main(["extract-lora", "--model", str(ft), "--base", str(base), "--output", str(root / f"jx-{name}"),
                         "--decomposition", "exact", "--quiet", *args])
        assert code == 0
    return {"root": root, "base": base, "ft": ft, "cases": cases}


def _products(directory: Path) -> tuple[dict, dict, dict]:
    """(module -> B @ A laid out as the weight, times scaling; other tensors; config)."""
    adapter = load_adapter(directory)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    products, others = {}, {}
    for module, kind in adapter.layers().items():
        a, b = (np.asarray(x, np.float64) for x in adapter.factors(module, kind))
        products[module] = (b @ a if kind == "linear" else (b @ a).T) * adapter.scaling(module)
    for name, value in tensors.items():
        if ".lora_" not in name:
            others[name] = value
    return products, others, adapter.config


@pytest.mark.parametrize("case", list(CASES))
def test_exact_matches_mergekit(family, case):
    root = family["root"]
    mk, jx = root / f"mk-{case}", root / f"jx-{case}"
    mk_products, mk_others, mk_config = _products(mk)
    jx_products, jx_others, jx_config = _products(jx)
    assert set(load_file(str(jx / "adapter_model.safetensors"))) == set(load_file(str(mk / "adapter_model.safetensors")))
    assert set(jx_config["target_modules"]) == set(mk_config["target_modules"])
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type", "task_type",
                "use_rslora", "lora_dropout", "fan_in_fan_out", "inference_mode"):
        assert jx_config[key] == mk_config[key], key
    assert jx_config["base_model_name_or_path"] == str(family["base"])
    for name, value in mk_others.items():
        np.testing.assert_array_equal(jx_others[name], value, err_msg=name)
    for module, product in mk_products.items():
        scale = np.abs(product).max()
        np.testing.assert_allclose(jx_products[module], product, rtol=0, atol=1e-4 * scale, err_msg=module)
    # The factors themselves follow mergekit's scale split: with --no-distribute-scale B = U (orthonormal columns).
    if "--no-distribute-scale" in CASES[case]:
        b = load_file(str(jx / "adapter_model.safetensors"))[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-5)


def test_report_and_card(family, capsys):
    out = family["root"] / "jx-printed"
    assert cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]), "--output", str(out),
                     "--max-rank", "8"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / xl.REPORT_FILE).read_text())
    modules = report["modules"]
    assert len(modules) == 28 and {m["rank"] for m in modules} == {8}
    for m in modules:
        assert 0 < m["energy_kept"] < 1 and 0 < m["relative_error"] < 1
        # Exact SVD: the error is what the discarded singular values leave.
        assert m["relative_error"] == pytest.approx(np.sqrt(1 - m["energy_kept"]), rel=1e-3)
        assert m["module"] in printed
    assert "28 modules decomposed" in printed
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert f"--model {family['ft']}" in card and "--max-rank 8" in card


def test_cli_loads_its_kernels_from_the_compilation_cache(family, tmp_path, monkeypatch):
    """Like `jaxmerge merge`, the command turns on the persistent compilation cache before any JAX work,
    so a second run loads the SVD kernels instead of compiling them."""
    from jaxmerge.engine import compile_cache

    calls = []
    monkeypatch.setattr(compile_cache, "enable_compile_cache", lambda *args, **kwargs: calls.append(args))
    assert cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]),
                     "--output", str(tmp_path / "out"), "--max-rank", "4", "--quiet"]) == 0
    assert len(calls) == 1


def _fold(base: Path, adapter: Path, into: Path) -> Path:
    """A model directory holding base + the adapter (LoraFolded), with the base's config."""
    folded = LoraFolded(base, adapter)
    into.mkdir()
    save_file({n: np.ascontiguousarray(folded.read_host(n)) for n in folded.tensors}, str(into / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(base / "config.json", into / "config.json")
    return into


def test_fold_back_reproduces_the_finetune(family):
    base, ft, root = family["base"], family["ft"], family["root"]
    ft_tensors = load_file(str(ft / "model.safetensors"))
    # Full rank (max-rank 128 covers every matrix): the fine-tune itself.
    folded = LoraFolded(base, root / "jx-default")
    for name, value in ft_tensors.items():
        np.testing.assert_allclose(folded.read_host(name), value, rtol=0, atol=2e-6, err_msg=name)
    # Truncated: each module misses the fine-tune by its reported error.
    folded = LoraFolded(base, root / "jx-rank8")
    base_tensors = load_file(str(base / "model.safetensors"))
    report = {m["module"]: m for m in json.loads((root / "jx-rank8" / xl.REPORT_FILE).read_text())["modules"]}
    for module, m in report.items():
        name = module + ".weight"
        delta = ft_tensors[name] - base_tensors[name]
        error = np.linalg.norm(folded.read_host(name) - ft_tensors[name]) / np.linalg.norm(delta)
        assert error == pytest.approx(m["relative_error"], rel=1e-3), module
    for name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(folded.read_host(name), ft_tensors[name])


@pytest.mark.parametrize("case", ["default", "rank8", "options"])
def test_peft_loads_the_adapter(family, case):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft, root = family["base"], family["ft"], family["root"]
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, 128, size=(2, 12)))

    def logits(model):
        model.eval()
        with torch.no_grad():
            return model(tokens).logits.float().numpy()

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           root / f"jx-{case}")
    adapted = logits(peft_model)
    expected_dir = ft if case == "default" else _fold(base, root / f"jx-{case}", root / f"folded-{case}")
    expected = logits(AutoModelForCausalLM.from_pretrained(expected_dir, dtype=torch.float32))
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    if case != "default":  # a truncated adapter is not the fine-tune
        assert not np.allclose(adapted, logits(AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)),
                               atol=1e-3 * np.abs(expected).max())


def test_randomized_close_to_exact_on_the_model(family):
    root = family["root"]
    exact_dir, rand_dir = root / "jx-exact4", root / "jx-rand4"
    for out, method in ((exact_dir, "exact"), (rand_dir, "randomized")):
        assert cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]),
                         "--output", str(out), "--max-rank", "4", "--decomposition", method, "--quiet"]) == 0
    exact = {m["module"]: m for m in json.loads((exact_dir / xl.REPORT_FILE).read_text())["modules"]}
    rand = {m["module"]: m for m in json.loads((rand_dir / xl.REPORT_FILE).read_text())["modules"]}
    assert {m["decomposition"] for m in rand.values()} == {"randomized"}
    for module, m in exact.items():
        assert rand[module]["relative_error"] <= 1.01 * m["relative_error"], module
    # Seeded: the same seed gives the same bytes.
    again = root / "jx-rand4-again"
    assert cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]), "--output",
                     str(again), "--max-rank", "4", "--decomposition", "randomized", "--quiet"]) == 0
    assert (again / "adapter_model.safetensors").read_bytes() == (rand_dir / "adapter_model.safetensors").read_bytes()


def _spectrum_matrix(rng, m, n, values):
    u, _ = np.linalg.qr(rng.standard_normal((m, len(values))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(values))))
    return ((u * values) @ v.T).astype(np.float32)


def test_randomized_within_one_percent_of_exact():
    """The randomized rule (oversampling max(10, rank // 2), up to 3 power iterations) against the exact
    truncated SVD, on the hardest spectrum measured (Gaussian: flat) and on decaying ones, up to rank = n/4."""
    rng = np.random.default_rng(0)
    m, n = 384, 256
    i = np.arange(1, n + 1)
    matrices = {
        "gaussian": rng.standard_normal((m, n)).astype(np.float32),
        "power-law": _spectrum_matrix(rng, m, n, i ** -0.5),
        "exponential": _spectrum_matrix(rng, m, n, np.exp(-i / 20)),
        "low-rank+noise": (rng.standard_normal((m, 16)) @ rng.standard_normal((16, n))
                           + 0.3 * rng.standard_normal((m, n))).astype(np.float32),
        # a flat block of 48 values over small noise: the hardest measured at 2048 x 1024 (+0.68% at rank 8)
        "low-rank-48+small-noise": (0.05 * rng.standard_normal((m, 48)) @ rng.standard_normal((48, n))
                                    + 0.01 * rng.standard_normal((m, n))).astype(np.float32),
    }
    worst = 0.0
    for name, x in matrices.items():
        for rank in (8, 16, 32, 64):
            _, exact = xl.decompose(x, rank, decomposition="exact")
            (a, b), rand = xl.decompose(x, rank, decomposition="randomized", key=jax.random.key(rank))
            assert rand.decomposition == "randomized" and a.shape == (rank, n) and b.shape == (m, rank)
            ratio = rand.relative_error / exact.relative_error
            worst = max(worst, ratio - 1)
            assert ratio <= 1.01, (name, rank, ratio)
            # The report's error is the factors' own.
            assert rand.relative_error == pytest.approx(
                float(np.linalg.norm(x - np.asarray(b) @ np.asarray(a)) / np.linalg.norm(x)), rel=1e-4)
    assert worst > 0  # the check has teeth: randomized is not exact here


def test_power_iterations_stop_once_converged():
    """A sketch that holds the whole signal stops early: the first iteration still sharpens the noise
    directions it keeps, the second gains under 1% and is the last; a flat spectrum keeps improving, so
    it runs all of them; a remainder below float32's resolution of the total cannot show a gain, so it
    runs all of them too; each within 1% of the exact error."""
    from jaxmerge.tools.extract_lora import svd

    rng = np.random.default_rng(1)
    m, n, rank = 512, 384, 16
    signal = rng.standard_normal((m, 12)) @ rng.standard_normal((12, n))
    cases = {"rank 12 + noise": (signal + 0.05 * rng.standard_normal((m, n))).astype(np.float32),
             "gaussian": rng.standard_normal((m, n)).astype(np.float32),
             "rank 12 + 1e-6 noise": (signal + 1e-6 * rng.standard_normal((m, n))).astype(np.float32)}
    iterations = {}
    for name, x in cases.items():
        u, s, vh, done = svd._randomized_svd(jnp.asarray(x), jax.random.key(0), rank, xl.oversampling(rank),
                                             xl.POWER_ITERATIONS)
        iterations[name] = int(done)
        err = np.linalg.norm(x - np.asarray(u) * np.asarray(s) @ np.asarray(vh))
        exact = np.sqrt((np.linalg.svd(x.astype(np.float64), compute_uv=False)[rank:] ** 2).sum())
        assert err <= 1.01 * exact + 1e-4 * np.linalg.norm(x), name
    assert iterations == {"rank 12 + noise": 2, "gaussian": xl.POWER_ITERATIONS,
                          "rank 12 + 1e-6 noise": xl.POWER_ITERATIONS}


def test_auto_rule():
    assert xl.choose_decomposition((4096, 4096), 128) == "randomized"  # 4 x (128 + 64) <= 4096
    assert xl.choose_decomposition((768, 4096), 128) == "randomized"
    assert xl.choose_decomposition((767, 4096), 128) == "exact"
    assert xl.choose_decomposition((64, 32), 8) == "exact"
    assert xl.choose_decomposition((64, 32), 8, "randomized") == "randomized"
    with pytest.raises(ValueError):
        xl.choose_decomposition((4, 4), 1, "fast")


def test_pytree_api():
    rng = np.random.default_rng(1)
    base = {"dense": {"kernel": rng.standard_normal((12, 8)).astype(np.float32),
                      "bias": rng.standard_normal(8).astype(np.float32)},
            "conv": rng.standard_normal((3, 3, 4)).astype(np.float32),
            "same": np.ones((6, 5), np.float32)}
    ft = {"dense": {"kernel": base["dense"]["kernel"] + rng.standard_normal((12, 8)).astype(np.float32),
                    "bias": base["dense"]["bias"] + 1},
          "conv": base["conv"] + 1, "same": np.ones((6, 5), np.float32)}
    factors, report = xl.extract_lora(ft, base, rank=8)
    a, b = factors["dense"]["kernel"]
    assert isinstance(factors["dense"]["kernel"], xl.LoraFactors)
    assert a.shape == (8, 8) and b.shape == (12, 8)
    np.testing.assert_allclose(b @ a, ft["dense"]["kernel"] - base["dense"]["kernel"], atol=1e-5)
    assert factors["dense"]["bias"] is None and factors["conv"] is None
    assert set(report) == {"['dense']['kernel']", "['same']"}
    assert report["['dense']['kernel']"].relative_error < 1e-5
    assert report["['same']"].energy_kept == 1.0 and report["['same']"].relative_error == 0.0
    # Truncation, sv_epsilon (a zero delta has no singular value above it) and jnp inputs.
    factors, report = xl.extract_lora(jax.tree.map(jnp.asarray, ft), base, rank=3, sv_epsilon=1e-6,
                                      decomposition="randomized")
    assert factors["dense"]["kernel"].a.shape == (3, 8) and factors["same"] is None
    assert report["['same']"].rank == 0 and 0 < report["['dense']['kernel']"].energy_kept < 1
    # bfloat16 leaves give bfloat16 factors, computed in float32.
    bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), (ft, base))
    factors, _ = xl.extract_lora(*bf, rank=8)
    assert factors["dense"]["kernel"].a.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rank"):
        xl.extract_lora(ft, base, rank=0)
    with pytest.raises(ValueError, match="shape"):
        xl.extract_lora(ft, {**base, "same": np.ones((5, 6), np.float32)})


def test_module_types_from_names_match_transformers(family):
    plans = {}
    for types in ("names", "transformers"):
        plan, _, _ = xl.plan_extraction(family["ft"], family["base"], family["root"] / "unused", module_types=types,
                                        warn=lambda line: None)
        plans[types] = plan
    assert plans["transformers"].module_types == "transformers LlamaForCausalLM"
    assert plans["names"].modules_to_save == plans["transformers"].modules_to_save
    assert sorted(plans["names"].work, key=lambda w: w.module) == sorted(plans["transformers"].work,
                                                                         key=lambda w: w.module)
    auto, _, _ = xl.plan_extraction(family["ft"], family["base"], family["root"] / "unused", warn=lambda line: None)
    assert auto.module_types == "tensor names"  # a Llama with its own lm_head: no torch needed


def _bad(family, tmp_path, capsys, monkeypatch, *args, model=None, base=None, output=None):
    """Run the command expecting exit 2, one line on stderr, no output and no decomposition started."""
    def never(*a, **k):
        raise AssertionError("a tensor was decomposed before the input was refused")

    monkeypatch.setattr(xl.svd, "_lora_kernel", never)
    monkeypatch.setattr(xl.svd, "_singular_values", never)
    output = output or tmp_path / "out"
    code = cli_main(["extract-lora", "--model", str(model or family["ft"]), "--base", str(base or family["base"]),
                     "--output", str(output), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("jaxmerge extract-lora: error:"), err
    assert not output.exists()
    return err


def _copy_model(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_inputs(family, tmp_path, capsys, monkeypatch):
    err = _bad(family, tmp_path, capsys, monkeypatch, "--max-rank", "0")
    assert "--max-rank" in err
    err = _bad(family, tmp_path, capsys, monkeypatch, "-i", "no_such_module")
    assert "no_such_module" in err and "matches no module" in err
    err = _bad(family, tmp_path, capsys, monkeypatch, "-e", "nothing_here")
    assert "nothing_here" in err
    _bad(family, tmp_path, capsys, monkeypatch, "-i", "(unclosed")
    _bad(family, tmp_path, capsys, monkeypatch, "--sv-epsilon", "-1")
    err = _bad(family, tmp_path, capsys, monkeypatch, output=family["base"] / "lora")
    assert "lies inside" in err
    missing = _copy_model(family["base"], tmp_path / "missing", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    err = _bad(family, tmp_path, capsys, monkeypatch, base=missing)
    assert "model.layers.2.mlp.up_proj.weight" in err
    reshaped = _copy_model(family["base"], tmp_path / "reshaped", lambda t: t.update(
        {"model.layers.1.self_attn.q_proj.weight": np.zeros((32, 16), np.float32)}))
    err = _bad(family, tmp_path, capsys, monkeypatch, base=reshaped)
    assert "q_proj" in err and "[32, 16]" in err
    # Everything excluded: nothing to decompose.
    err = _bad(family, tmp_path, capsys, monkeypatch, "-e", "proj")
    assert "no module" in err
    # An existing output without --force.
    (tmp_path / "exists").mkdir()
    code = cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]), "--output",
                     str(tmp_path / "exists"), "--quiet"])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_model_plus_lora_reference_round_trip(family, tmp_path):
    """--model BASE+ADAPTER (mergekit's reference): a rank-8 adapter's delta is rank 8, so extracting it
    at rank 8 gives the adapter's products back."""
    root = family["root"]
    out = tmp_path / "again"
    assert cli_main(["extract-lora", "--model", f"{family['base']}+{root / 'jx-rank8'}", "--base", str(family["base"]),
                     "--output", str(out), "--max-rank", "8", "--decomposition", "exact", "--quiet"]) == 0
    first, _, _ = _products(root / "jx-rank8")
    second, _, config = _products(out)
    assert config["r"] == 8 and set(first) == set(second)
    for module, product in first.items():
        np.testing.assert_allclose(second[module], product, rtol=0, atol=1e-5 * np.abs(product).max(), err_msg=module)


def test_vocabulary_resized(family, tmp_path):
    """A fine-tune with more tokens: --embed-lora is turned off (warning), the embeddings are saved whole,
    the card says to resize the base's embeddings (as mergekit)."""
    rng = np.random.default_rng(0)

    def grow(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = np.concatenate([tensors[name], rng.standard_normal((8, 32)).astype(np.float32)])

    ft = _copy_model(family["ft"], tmp_path / "ft-136", grow)
    warnings = []
    plan = xl.extract_lora_adapter(ft, family["base"], tmp_path / "out", max_rank=4, embed_lora=True,
                                   warn=warnings.append)
    assert any("vocabulary size mismatch" in w for w in warnings)
    assert plan.options["embed_lora"] is False and {"embed_tokens", "lm_head"} <= set(plan.modules_to_save)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (136, 32)
    assert "model.resize_token_embeddings(136)" in (tmp_path / "out" / "README.md").read_text()


def test_bare_checkpoints_conv_bias_and_norm(tmp_path):
    """Safetensors files without config.json: module types from the names. A conv weight gets PEFT's conv
    layout, a Linear's bias its delta (lora_B.bias, with lora_bias), a norm is saved whole; folding the
    full-rank adapter back gives the fine-tune."""
    rng = np.random.default_rng(2)
    shapes = {"conv.weight": (6, 3, 3, 3), "fc.weight": (5, 7), "fc.bias": (5,), "norm.weight": (7,)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ft = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    plan = xl.extract_lora_adapter(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", tmp_path / "lora",
                                   warn=lambda line: None)
    assert plan.module_types == "tensor names" and plan.ranks == {"conv": 6, "fc": 5}
    saved = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert saved["base_model.model.conv.lora_A.weight"].shape == (6, 3, 3, 3)
    assert saved["base_model.model.conv.lora_B.weight"].shape == (6, 6, 1, 1)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] == ["norm"]
    assert config["rank_pattern"] == {"fc": 5}
    folded = LoraFolded(tmp_path / "base.safetensors", tmp_path / "lora")
    for name, value in ft.items():
        np.testing.assert_allclose(folded.read_host(name), value, rtol=0, atol=1e-5, err_msg=name)


def test_peft_applies_bias_deltas(tmp_path):
    """A Qwen2 (biased q/k/v projections): the bias deltas are saved as lora_B.bias with lora_bias true,
    so PEFT reproduces the fine-tune, biases included (mergekit saves them without the flag)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.abs().mean().clamp_min(1e-3))
    model.save_pretrained(tmp_path / "ft")
    plan = xl.extract_lora_adapter(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", warn=lambda line: None)
    assert plan.config()["lora_bias"] is True
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in load_file(
        str(tmp_path / "lora" / "adapter_model.safetensors"))
    tokens = torch.randint(0, 128, (2, 10))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                        tmp_path / "lora").eval()
    with torch.no_grad():
        got, want = adapted(tokens).logits.numpy(), model.eval()(tokens).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# --- ranks chosen from the spectrum: --rank-by energy:F and --rank-budget N --------------------------

def _cli_has_rank_rules() -> bool:
    """Whether `jaxmerge extract-lora` takes --rank-by and --rank-budget (the parser leaves no argument over)."""
    from jaxmerge.cli import build_parser

    _, unknown = build_parser().parse_known_args(["extract-lora", "--model", "m", "--base", "b", "--output", "o",
                                                  "--rank-by", "energy:0.5", "--rank-budget", "5"])
    return not unknown


def _smallest_rank_keeping(values: np.ndarray, fraction: float) -> int:
    """The reference: walk the spectrum until the kept energy reaches `fraction` of the total."""
    total, kept = float(np.sum(values.astype(np.float64) ** 2)), 0.0
    for k, s in enumerate(values.astype(np.float64), start=1):
        kept += s * s
        if kept >= fraction * total:
            return k
    return len(values)


def test_energy_rule_keeps_the_smallest_rank_meeting_the_energy():
    """On U diag(s) V^T with a known spectrum: at a threshold equal to the energy of the top k values
    the rank is k, just above it k + 1, and at random thresholds the smallest rank whose energy meets
    them (the kept energy meets the threshold, one rank less would not)."""
    rng = np.random.default_rng(3)
    m, n = 72, 48
    values = np.sort(rng.uniform(0.5, 3.0, n))[::-1] * np.exp(-np.arange(n) / 24)  # distinct, decaying
    delta = _spectrum_matrix(rng, m, n, values)
    base = rng.standard_normal((m, n)).astype(np.float32)
    tree_base, tree_ft = {"w": base}, {"w": base + delta}
    cumulative = np.cumsum(values ** 2) / np.sum(values ** 2)
    assert np.min(np.diff(cumulative)[[0, 4, 16]]) > 2e-3  # +1e-3 crosses exactly one boundary
    cases = [(float(cumulative[k - 1]), k) for k in (1, 5, 17)]  # the energy of the top k values exactly: k
    cases += [(float(cumulative[k - 1]) + 1e-3, k + 1) for k in (1, 5, 17)]  # just above: one more
    cases += [(1.0, n)]
    for fraction in rng.uniform(0.05, 0.999, 6):  # away from every boundary, the reference decides
        if np.min(np.abs(cumulative - fraction)) > 1e-4:
            cases.append((float(fraction), _smallest_rank_keeping(values, fraction)))
    for fraction, expected in cases:
        for method in ("exact", "randomized"):
            _, report = xl.extract_lora(tree_ft, tree_base, rank=n, rank_by=f"energy:{fraction!r}",
                                        decomposition=method)
            r = report["['w']"]
            assert r.rank == expected, (fraction, method, r.rank, expected)
            assert r.energy_kept >= fraction * (1 - 1e-5)
            if expected > 1:
                assert cumulative[expected - 2] < fraction
    # The cap: max-rank (rank=) wins over the energy.
    _, report = xl.extract_lora(tree_ft, tree_base, rank=3, rank_by="energy:0.99")
    assert report["['w']"].rank == 3 < _smallest_rank_keeping(values, 0.99)


def _brute_force(spectra: list[np.ndarray], costs: list[int], budget: int) -> float:
    """The least total squared error of any ranks (r1, r2, r3) costing <= budget (Eckart-Young per module)."""
    best = np.inf
    for ranks in np.ndindex(*(len(s) + 1 for s in spectra)):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = min(best, sum(float(np.sum(s[r:] ** 2)) for s, r in zip(spectra, ranks)))
    return best


def _budget_case(rng, shapes, scales=None):
    """Base and fine-tune trees of matrices m{i} whose deltas have the returned (known) spectra."""
    base, ft, spectra = {}, {}, []
    for i, (m, n) in enumerate(shapes):
        low, high = scales[i] if scales else (0.1, 2.0)
        values = np.sort(rng.uniform(low, high, min(m, n)))[::-1].astype(np.float64)
        name = f"m{i}"
        base[name] = rng.standard_normal((m, n)).astype(np.float32)
        ft[name] = base[name] + _spectrum_matrix(rng, m, n, values)
        spectra.append(values)
    return base, ft, spectra


def _squared_error(ft, base, factors, name) -> float:
    delta = ft[name].astype(np.float64) - base[name]
    if factors[name] is not None:
        delta = delta - np.asarray(factors[name].b, np.float64) @ np.asarray(factors[name].a, np.float64)
    return float(np.sum(delta ** 2))


def test_rank_budget_matches_brute_force():
    """Three modules of the same rows + cols: for every budget, the ranks spend at most the budget and
    leave exactly the least error that any allocation of it leaves (brute force over all rank triples)."""
    rng = np.random.default_rng(4)
    shapes = [(6, 10), (8, 8), (12, 4)]  # rows + cols = 16 for each
    base, ft, spectra = _budget_case(rng, shapes)
    costs = [m + n for m, n in shapes]
    for budget in range(16, 16 * 19, 11):
        factors, report = xl.extract_lora(ft, base, rank=16, rank_budget=budget, decomposition="exact")
        ranks = [report[f"['m{i}']"].rank for i in range(3)]
        assert sum(r * c for r, c in zip(ranks, costs)) <= budget
        got = sum(_squared_error(ft, base, factors, f"m{i}") for i in range(3))
        best = _brute_force(spectra, costs, budget)
        assert got == pytest.approx(best, rel=1e-4, abs=1e-6), (budget, ranks)


def test_rank_budget_with_different_costs():
    """Modules of different rows + cols (integer costs, where a greedy can leave budget unspent): never over
    the budget, never better than the brute-force optimum (a check of both), short of it by at most one
    rank's gain (the bound the docstring states), and no rank left out that the leftover budget would buy.
    The order is by error removed per parameter, not per rank: at 32 parameters the four ranks of the 4 x 4
    module (~0.8 of squared error each, 8 parameters each) beat one rank of the others (up to 2.6, 32 or 40)."""
    rng = np.random.default_rng(5)
    shapes = [(4, 4), (12, 20), (20, 20)]  # costs 8, 32, 40
    base, ft, spectra = _budget_case(rng, shapes, scales=[(0.9, 1.0), (1.0, 1.6), (1.0, 1.8)])
    costs = [m + n for m, n in shapes]
    for budget in [32, *range(8, 420, 17)]:
        factors, report = xl.extract_lora(ft, base, rank=20, rank_budget=budget, decomposition="exact")
        ranks = [report[f"['m{i}']"].rank for i in range(3)]
        spent = sum(r * c for r, c in zip(ranks, costs))
        assert spent <= budget
        assert all(r == len(s) or c > budget - spent for r, s, c in zip(ranks, spectra, costs)), (budget, ranks)
        got = sum(_squared_error(ft, base, factors, f"m{i}") for i in range(3))
        best = _brute_force(spectra, costs, budget)
        next_gain = max((s[r] ** 2 for s, r in zip(spectra, ranks) if r < len(s)), default=0.0)
        assert best * (1 - 1e-4) - 1e-6 <= got <= best + next_gain + 1e-4, (budget, ranks)
        if budget == 32:
            assert got == pytest.approx(best, rel=1e-4) and ranks == [4, 0, 0]


def _fold_numpy(base: Path, adapter: Path, into: Path) -> Path:
    """base + B @ A for every module of the adapter (scaling 1, computed here in float64) and the tensors it
    saves whole, as a model directory."""
    tensors = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    for name, a in lora.items():
        if ".lora_" not in name:  # modules_to_save: the fine-tune's tensor, whole
            tensors[name[len(prefix):]] = a
        elif name.endswith(".lora_A.weight"):
            module = name[len(prefix): -len(".lora_A.weight")]
            b = lora[name.replace("lora_A", "lora_B")]
            weight = module + ".weight"
            tensors[weight] = (tensors[weight].astype(np.float64) + b.astype(np.float64) @ a).astype(np.float32)
    into.mkdir()
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", into / "config.json")
    return into


@pytest.mark.parametrize("rule", [{"rank_by": "energy:0.6"}, {"rank_budget": 6000}])
def test_peft_loads_mixed_ranks(family, tmp_path, rule):
    """An adapter whose modules have different ranks (r + rank_pattern/alpha_pattern): PEFT builds each
    LoRA layer at its rank with scaling 1, and its logits are the base's with B @ A added."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft = family["base"], family["ft"]
    out = tmp_path / "mixed"
    plan = xl.extract_lora_adapter(ft, base, out, max_rank=16, decomposition="exact", warn=lambda line: None, **rule)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = plan.ranks
    assert len(set(ranks.values())) >= 3  # mixed indeed
    assert config["r"] == max(ranks.values()) and config["rank_pattern"]
    for module, rank in ranks.items():
        assert config["rank_pattern"].get(module, config["r"]) == rank
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == rank
    report = json.loads((out / xl.REPORT_FILE).read_text())
    assert report["lora_parameters"] == sum(m["rank"] * sum(m["shape"]) for m in report["modules"])
    if "rank_budget" in rule:
        assert report["lora_parameters"] <= rule["rank_budget"] and "budget of 6000" in report["rank_rule"]
    else:
        assert "energy >= 0.6" in report["rank_rule"]
        assert all(m["energy_kept"] >= 0.6 * (1 - 1e-5) for m in report["modules"])

    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, 128, size=(2, 12)))

    def logits(model):
        model.eval()
        with torch.no_grad():
            return model(tokens).logits.float().numpy()

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
    checked = set()
    for name, layer in peft_model.named_modules():
        module = name.removeprefix("base_model.model.")
        if hasattr(layer, "lora_A") and module in ranks:
            assert layer.r["default"] == ranks[module] and layer.scaling["default"] == 1.0, name
            checked.add(module)
    assert checked == set(ranks)
    adapted = logits(peft_model)
    expected = logits(AutoModelForCausalLM.from_pretrained(_fold_numpy(base, out, tmp_path / "folded"),
                                                           dtype=torch.float32))
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


_BAD_RULES = [({"rank_by": "energy:0"}, "(0, 1]"), ({"rank_by": "energy:1.5"}, "(0, 1]"),
              ({"rank_by": "energy:-0.2"}, "(0, 1]"), ({"rank_by": "energy:nan"}, "(0, 1]"),
              ({"rank_by": "energy:much"}, "(0, 1]"), ({"rank_by": "energy"}, "not a rule"),
              ({"rank_by": "spectrum:0.9"}, "not a rule"), ({"rank_budget": 0}, "--rank-budget"),
              ({"rank_budget": 47}, "rank 1 of"),  # k/v projections: 16 x 32, 48 parameters a rank
              ({"rank_by": "energy:0.9", "rank_budget": 1000}, "not both")]


def test_bad_rank_rules(family, tmp_path, monkeypatch):
    """Energy outside (0, 1], unknown rule text, both rules, a budget below the cheapest module's rank 1:
    a one-line ValueError before any SVD, and no output."""
    def never(*a, **k):
        raise AssertionError("a tensor was decomposed before the input was refused")

    monkeypatch.setattr(xl.svd, "_lora_kernel", never)
    monkeypatch.setattr(xl.svd, "_singular_values", never)
    for options, words in _BAD_RULES:
        with pytest.raises(ValueError) as info:
            xl.extract_lora_adapter(family["ft"], family["base"], tmp_path / "out", warn=lambda line: None, **options)
        assert words in str(info.value) and "\n" not in str(info.value), options
        assert not (tmp_path / "out").exists()
    # 48 parameters pay for rank 1 of a k/v projection: no error from the plan.
    xl.plan_extraction(family["ft"], family["base"], tmp_path / "out", rank_budget=48, warn=lambda line: None)
    with pytest.raises(ValueError, match="rank 1 of"):
        xl.extract_lora({"w": np.ones((3, 4))}, {"w": np.zeros((3, 4))}, rank_budget=6)
    with pytest.raises(ValueError, match="not a rule"):
        xl.extract_lora({"w": np.ones((3, 4))}, {"w": np.zeros((3, 4))}, rank_by="top:3")


def test_bad_rank_rules_cli(family, tmp_path, capsys, monkeypatch):
    """The same values on the command line: exit 2, one line, no output, no SVD started."""
    if not _cli_has_rank_rules():
        pytest.skip("jaxmerge extract-lora has no --rank-by/--rank-budget yet (the CLI diff is pending)")
    for options, words in _BAD_RULES:
        args = [w for k, v in options.items() for w in ("--" + k.replace("_", "-"), str(v))]
        err = _bad(family, tmp_path, capsys, monkeypatch, *args)
        assert words in err, (options, err)


def test_lapack_threads_rule():
    # Randomized SVDs, and exact ones of matrices under 512 on their smaller side: LAPACK on one thread.
    assert xl.lapack_threads([("randomized", (5632, 2048)), ("exact", (256, 2048)), ("exact", (2048, 511))]) == 1
    assert xl.lapack_threads([]) == 1
    # An exact SVD from 512 on: LAPACK's threads as they are.
    assert xl.lapack_threads([("randomized", (4096, 4096)), ("exact", (512, 2048))]) is None
    assert xl.lapack_threads([("exact", (4096, 512))]) is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the limit applies to the CPU's LAPACK only")
def test_kernels_run_under_the_lapack_limit(family, tmp_path, monkeypatch):
    """Each SVD kernel is dispatched (and so runs) while the run's limit holds: one BLAS thread for the
    tiny model's small exact SVDs and for a randomized one, the pool's own count (two here) for an exact
    512 x 520 SVD. Calls the compiler thread makes on abstract inputs are not counted."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from jaxmerge.engine._ahead import THREAD_NAME
    from jaxmerge.tools.extract_lora import svd

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    jnp.linalg.qr(jnp.ones((4, 3))).Q.block_until_ready()  # jaxlib's LAPACK is loaded
    seen = []
    kernel = svd._lora_kernel

    def recording(*args, **kwargs):
        if threading.current_thread().name != THREAD_NAME:
            seen.append((kwargs["method"], blas_threads()))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(svd, "_lora_kernel", recording)
    rng = np.random.default_rng(0)
    base = {"big": rng.standard_normal((512, 520)).astype(np.float32),
            "tall": rng.standard_normal((640, 160)).astype(np.float32)}
    ft = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    with threadpool_limits(limits=2, user_api="blas"):  # a pool of two, whatever the host's count
        assert cli_main(["extract-lora", "--model", str(family["ft"]), "--base", str(family["base"]),
                         "--output", str(tmp_path / "cli"), "--max-rank", "4", "--quiet"]) == 0
        assert seen and {m for m, _ in seen} == {"exact"} and all(t == {1} for _, t in seen)
        seen.clear()
        xl.extract_lora({"tall": ft["tall"]}, {"tall": base["tall"]}, rank=4)
        assert seen == [("randomized", {1})]
        seen.clear()
        xl.extract_lora(ft, base, rank=4, decomposition="exact")
        assert seen == [("exact", {2}), ("exact", {2})]
        assert blas_threads() == {2}


@pytest.mark.parametrize("rank_by", [None, "energy:0.9"])
def test_svd_kernels_are_compiled_ahead_in_their_own_thread(tmp_path, caplog, rank_by):
    """Like a merge's, the extraction's kernels (the first pass's singular values under a rank rule, then
    the factors) are compiled by the engine's background thread (`jaxmerge.engine._ahead`) before their
    modules are dispatched: the dispatching thread compiles none of them (a kernel compiled ahead for
    other shapes or dtypes than the real call's would be compiled again there). A conv (reshaped), a
    float64 pair (narrowed to float32 without x64) and an exact and a randomized shape; the factors equal
    those of a run that compiles its kernels anew in the calling thread."""
    import logging

    from jaxmerge.engine._ahead import THREAD_NAME

    rng = np.random.default_rng(3)
    # Shapes no other test (or case) uses, so that every kernel compiles here.
    more = 2 if rank_by else 0
    shapes = {"conv.weight": (7 + more, 3, 3, 3), "fc.weight": (11 + more, 13), "big.weight": (197 + more, 211),
              "wide.weight": (9 + more, 17)}
    dtypes = {"wide.weight": np.float64}
    base = {k: rng.standard_normal(s).astype(dtypes.get(k, np.float32)) for k, s in shapes.items()}
    ft = {k: v + rng.standard_normal(v.shape).astype(v.dtype) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    jax.config.update("jax_log_compiles", True)  # globally: `jax.log_compiles()` holds for its own thread only
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            plan = xl.extract_lora_adapter(tmp_path / "ft.safetensors", tmp_path / "base.safetensors",
                                           tmp_path / "lora", max_rank=8, rank_by=rank_by, warn=lambda line: None)
    finally:
        jax.config.update("jax_log_compiles", False)
    assert {r.decomposition for r in plan.reports} == {"exact", "randomized"}
    names = ("Compiling jit(_lora_kernel)", "Compiling jit(_singular_values)")
    kernels = [r for r in caplog.records if r.getMessage().startswith(names)]
    assert len(kernels) == len(shapes) * (2 if rank_by else 1), [r.getMessage()[:60] for r in kernels]
    assert {r.threadName for r in kernels} == {THREAD_NAME}
    from jaxmerge.engine._ahead import AheadCompiler
    from jaxmerge.tools.extract_lora import adapter

    jax.clear_caches()
    compiler = adapter._compiler
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter, "_compiler", lambda *args: (AheadCompiler([]), compiler(*args)[1]))
        serial = xl.extract_lora_adapter(tmp_path / "ft.safetensors", tmp_path / "base.safetensors",
                                         tmp_path / "serial", max_rank=8, rank_by=rank_by, warn=lambda line: None,
                                         depth=0)
    assert plan.ranks == serial.ranks
    assert load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "serial" / "adapter_model.safetensors")).keys()
    for name, value in load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).items():
        np.testing.assert_array_equal(value, load_file(str(tmp_path / "serial" / "adapter_model.safetensors"))[name])
