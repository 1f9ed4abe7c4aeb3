"""`jaxmerge multi`: mergekit-multi's files, with mergekit 0.1.5's `mergekit-multi` as the oracle.

A three-stage chain on tiny Llama models (tests/tiny_models.py), listed out of
order: A = slerp(base, ft1); B = ties of A+LORA and ft2 on base; the unnamed
final merge = linear of B and ft3. mergekit-multi (one process) and `jaxmerge
multi` run the same file; every stage must agree tensor for tensor, and equal a
single `jaxmerge merge` of its recipe. Reruns skip finished stages, --force
reruns them; bad files give one line, exit 2 and nothing written; a failing
merge stops the run naming it and keeps the merges before it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.cli import main
from jaxmerge.tools.multi import is_complete

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 recipes: summation order differs, nothing else

STAGE_A = """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters:
  t: [{{filter: self_attn, value: [0.2, 0.8]}}, {{value: 0.4}}]
dtype: float32
"""
STAGE_B = """merge_method: ties
base_model: {base}
models:
  - {{model: {A}+{adapter}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.7}}}}
dtype: float32
"""
FINAL = """merge_method: linear
models:
  - {{model: {B}, parameters: {{weight: 0.7}}}}
  - {{model: {ft3}, parameters: {{weight: 0.3}}}}
dtype: float32
"""

_MULTI_DRIVER = """
import sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.multimerge import main
main.main([sys.argv[1], '--intermediate-dir', sys.argv[2], '--out-path', sys.argv[3], '--no-lazy-unpickle',
           '--random-seed', '0', '--quiet', '--lora-merge-cache', sys.argv[4]], standalone_mode=False)
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """An unknown name looks like a Hub repo id: search the cache only (nothing is downloaded)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _adapter(base: Path, out: Path) -> Path:
    """A PEFT LoRA adapter on `base` with non-zero B's (it changes what it is folded into)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The models, the multi file, and mergekit-multi's outputs of it."""
    root = tmp_path_factory.mktemp("multi")
    base, ft1, ft2, ft3 = tm.make_family(root / "models", "llama", 3)
    m = dict(base=base, ft1=ft1, ft2=ft2, ft3=ft3, adapter=_adapter(base, root / "adapter"))
    # Out of order: the merges run in dependency order, not file order.
    text = ("name: B\n" + STAGE_B.format(A="A", **m) + "---\n" + FINAL.format(B="B", **m)
            + "---\nname: A\n" + STAGE_A.format(**m))
    (root / "multi.yml").write_text(text)
    theirs = root / "mergekit"
    run = subprocess.run(
        [sys.executable, "-c", _MULTI_DRIVER, str(root / "multi.yml"), str(theirs), str(theirs / "final"),
         str(root / "lora-cache")],
        cwd=root, env=tm.offline_env(), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(root=root, models=m, file=root / "multi.yml", mergekit=theirs)


def _multi(capsys, *argv):
    rc = main(["multi", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _same(a: Path, b: Path) -> None:
    x, y = tm.read_dir(a), tm.read_dir(b)
    assert sorted(x) == sorted(y)
    for name in y:
        np.testing.assert_allclose(x[name], y[name], err_msg=f"{a} vs {b}: {name}", **TOL)


def _mtimes(*dirs: Path) -> list[float]:
    return [(d / "model.safetensors").stat().st_mtime_ns for d in dirs]


def test_chain_equals_mergekit_multi_and_single_merges(chain, tmp_path, capsys):
    ours, final = tmp_path / "ours", tmp_path / "ours-final"
    rc, out, err = _multi(capsys, chain["file"], "--intermediate-dir", ours, "--out-path", final, "--quiet")
    assert rc == 0, err
    lines = [line for line in out.splitlines() if "merging into" in line]
    assert [line.split(":")[0] for line in lines] == ["merges[A]", "merges[B]", "merges[(unnamed)]"]
    theirs = chain["mergekit"]
    for mine, ref in ((ours / "A", theirs / "A"), (ours / "B", theirs / "B"), (final, theirs / "final")):
        assert is_complete(mine)
        _same(mine, ref)
    # Each stage is an ordinary `jaxmerge merge` of its recipe, the earlier outputs in place of the names.
    m = chain["models"]
    for text, out_dir in ((STAGE_A.format(**m), ours / "A"), (STAGE_B.format(A=ours / "A", **m), ours / "B"),
                          (FINAL.format(B=ours / "B", **m), final)):
        recipe = tmp_path / f"{out_dir.name}.yml"
        recipe.write_text(text)
        assert main(["merge", str(recipe), "--output", str(tmp_path / "single" / out_dir.name), "--quiet"]) == 0
        _same(tmp_path / "single" / out_dir.name, out_dir)
        np.testing.assert_array_equal(*(tm.read_dir(d)["model.layers.0.self_attn.q_proj.weight"]
                                        for d in (tmp_path / "single" / out_dir.name, out_dir)))
    # The adapter took part: B without it differs.
    plain = tmp_path / "plain.yml"
    plain.write_text(STAGE_B.format(A=ours / "A", **m).replace(f"+{m['adapter']}", ""))
    assert main(["merge", str(plain), "--output", str(tmp_path / "plain"), "--quiet"]) == 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(tm.read_dir(tmp_path / "plain")[q], tm.read_dir(ours / "B")[q])
    # The recipe written beside B names A's output, as mergekit's does.
    assert str(ours / "A") + "+" in (ours / "B" / "mergekit_config.yml").read_text()
    capsys.readouterr()

    # A rerun skips every finished merge; --force reruns them all.
    before = _mtimes(ours / "A", ours / "B", final)
    rc, out, err = _multi(capsys, chain["file"], "-I", ours, "--out-path", final, "--quiet")
    assert rc == 0, err
    assert out.count("skipped") == 3 and "merging" not in out
    assert _mtimes(ours / "A", ours / "B", final) == before
    # Only B's output gone: B is merged again, A and the final merge are skipped (as mergekit's lazy check).
    import shutil

    shutil.rmtree(ours / "B")
    rc, out, err = _multi(capsys, chain["file"], "-I", ours, "--out-path", final, "--quiet")
    assert rc == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if "merging into" in line] == ["merges[B]"]
    assert _mtimes(ours / "A", final) == [before[0], before[2]]
    rc, out, err = _multi(capsys, chain["file"], "--output-dir", ours, "--out-path", final, "--quiet", "--force")
    assert rc == 0, err
    assert out.count("merging into") == 3 and "skipped" not in out
    after = _mtimes(ours / "A", ours / "B", final)
    assert all(a != b for a, b in zip(after, before))
    _same(final, theirs / "final")


def _file(path: Path, *docs: str) -> Path:
    path.write_text("---\n".join(docs))
    return path


def test_bad_files_give_one_line_exit_2_and_nothing_written(chain, tmp_path, capsys):
    m = chain["models"]
    a = "name: A\n" + STAGE_A.format(**m)
    b = "name: B\n" + STAGE_B.format(A="A", **m)
    final = "name: final\n" + FINAL.format(B="B", **m)
    cases = {
        "cycle": (_file(tmp_path / "cycle.yml", "name: A\n" + STAGE_A.format(**{**m, "ft1": "final"}), b, final),
                  ["cycle", "A -> final -> B -> A"]),
        "self": (_file(tmp_path / "self.yml", "name: A\n" + FINAL.format(B="A", **m)), ["cycle", "A -> A"]),
        "unknown": (_file(tmp_path / "unknown.yml", a, "name: B\n" + STAGE_B.format(A="stageA", **m), final),
                    ["merges[B]", "models[0].model", "stageA", "its merges: A, B, final"]),
        "duplicate": (_file(tmp_path / "dup.yml", a, b, "name: A\n" + FINAL.format(B="B", **m)),
                      ["duplicate merge name 'A'"]),
        "two unnamed": (_file(tmp_path / "two.yml", a, STAGE_A.format(**m), FINAL.format(B="A", **m)), ["second unnamed"]),
        "unnamed, no --out-path": (_file(tmp_path / "nout.yml", a, FINAL.format(B="A", **m)), ["--out-path is required"]),
        # Errors of a later merge are found before the first merge runs.
        "bad method later": (_file(tmp_path / "method.yml", a, b, final.replace("linear", "no_such_method")),
                             ["merges[final]", "merge_method", "no_such_method"]),
        "bad key later": (_file(tmp_path / "key.yml", a, b, final + "modelz: []\n"), ["merges[final]", "modelz"]),
        "missing model later": (_file(tmp_path / "missing.yml", a, b, final.replace(str(m["ft3"]), str(tmp_path / "nowhere"))),
                                ["merges[final]", "models[1].model", "nowhere"]),
        "missing adapter later": (_file(tmp_path / "lora.yml", a, b.replace(str(m["adapter"]), str(tmp_path / "nolora")), final),
                                  ["merges[B]", "LoRA adapter", "nolora"]),
        "bad name": (_file(tmp_path / "name.yml", "name: ../A\n" + STAGE_A.format(**m)), ["name must name a directory"]),
        "malformed": (_file(tmp_path / "bad.yml", a, "name: B\nmodels: [\n"), ["malformed YAML", "line"]),
    }
    for case, (file, words) in cases.items():
        out_dir = tmp_path / f"out-{file.stem}"
        rc, out, err = _multi(capsys, file, "-I", out_dir, "--quiet")
        assert rc == 2, (case, err)
        assert len(err.strip().splitlines()) == 1, (case, err)
        assert err.startswith("jaxmerge multi: error: "), (case, err)
        for word in words:
            assert word in err, (case, word, err)
        assert not out_dir.exists(), case


def test_incomplete_output_is_refused_until_force(chain, tmp_path, capsys):
    file = _file(tmp_path / "one.yml", "name: A\n" + STAGE_A.format(**chain["models"]))
    (tmp_path / "out" / "A").mkdir(parents=True)
    (tmp_path / "out" / "A" / "config.json").write_text("{}")  # config.json without weights: not complete
    rc, out, err = _multi(capsys, file, "-I", tmp_path / "out", "--quiet")
    assert rc == 2 and "merges[A]" in err and "--force" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _multi(capsys, file, "-I", tmp_path / "out", "--quiet", "--dry-run")
    assert rc == 2
    rc, out, err = _multi(capsys, file, "-I", tmp_path / "out", "--quiet", "--force", "--dry-run")
    assert rc == 0 and "dry run: nothing written" in out and not is_complete(tmp_path / "out" / "A")
    rc, out, err = _multi(capsys, file, "-I", tmp_path / "out", "--quiet", "--no-lazy")
    assert rc == 0, err
    assert is_complete(tmp_path / "out" / "A")


def test_failing_middle_merge_stops_naming_it_and_keeps_earlier(chain, tmp_path, capsys):
    m = chain["models"]
    # B's slice asks for 8 layers of A, which has 4: only found once A exists.
    bad_b = """name: B
merge_method: passthrough
slices:
  - sources:
      - {model: A, layer_range: [0, 8]}
dtype: float32
"""
    file = _file(tmp_path / "fail.yml", "name: A\n" + STAGE_A.format(**m), bad_b, "name: final\n" + FINAL.format(B="B", **m))
    out_dir = tmp_path / "out"
    rc, out, err = _multi(capsys, file, "-I", out_dir, "--quiet", "--dry-run")
    assert rc == 0 and "merges[B]: into" in out and "after A" in out and not out_dir.exists()
    rc, out, err = _multi(capsys, file, "-I", out_dir, "--quiet")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("jaxmerge multi: error: ") and "merges[B]" in err and "stopped" in err, err
    assert is_complete(out_dir / "A")
    assert not (out_dir / "B").exists() and not (out_dir / "final").exists()
    assert [p.name for p in out_dir.iterdir()] == ["A"]  # no temporary left behind
