"""Flax models saved with Orbax, read under their Hugging Face names (`jaxmerge.formats.flax_hf`), and
`jaxmerge moe` built from them.

The oracle is the Hugging Face checkpoint itself: tiny Llama models are saved by
transformers as safetensors, and the same parameters are saved with Orbax in the
layouts Flax code uses (written here from transformers' PyTorch-to-Flax rules:
Dense kernels transposed, `embedding`, norms as `weight` or `scale`): as linen
variables under `params` beside an optimizer state, and as an NNX state (each
array under `value`, layers in a list). Read back, every tensor must equal the
safetensors one bit for bit; a mixture of experts built from the Orbax
directories must equal the one built from the safetensors directories (itself
checked against mergekit-moe in test_moe.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.cli import main
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError
from jaxmerge.formats.sources import open_checkpoint

ocp = pytest.importorskip("orbax.checkpoint")
pytest.importorskip("torch", reason="the models are built with transformers")

from jaxmerge.formats import flax_hf  # noqa: E402
from jaxmerge.formats.flax_hf import FlaxCheckpoint, torch_name_and_axes  # noqa: E402
from jaxmerge.formats.orbax import OrbaxCheckpoint  # noqa: E402


def _flax_tree(tensors: dict[str, np.ndarray], style: str) -> dict:
    """A Hugging Face state as Flax code stores it (transformers' PyTorch-to-Flax rules)."""
    tree: dict = {}
    for name, value in tensors.items():
        *module, leaf = name.split(".")
        if leaf == "weight" and module[-1] == "embed_tokens":
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight" and style == "nnx":
            leaf = "scale"  # nnx.RMSNorm / nn.LayerNorm name their weight `scale`
        node = tree
        for key in module:
            node = node.setdefault(key, {})
        node[leaf] = {"value": value} if style == "nnx" else value
    if style == "nnx":  # layers as a list, as NNX states keep them
        layers = tree["model"]["layers"]
        tree["model"]["layers"] = [layers[str(i)] for i in range(len(layers))]
        return tree
    # linen variables beside an optimizer state and a step counter: only `params` is the model
    return {"params": tree, "opt_state": {"mu": {"x": np.ones(3, np.float32)}}, "step": np.int32(7)}


def _save_orbax(hf_dir: Path, out: Path, style: str) -> Path:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(out), _flax_tree(tm.read_dir(hf_dir), style))
    checkpointer.wait_until_finished()
    for f in hf_dir.iterdir():  # the Hugging Face config and tokenizer beside the arrays
        if f.suffix == ".json" and "safetensors" not in f.name:
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flax")
    hf = tm.make_family(root, "llama", n_finetunes=2)
    orbax = {style: [_save_orbax(d, root / f"{d.name}-{style}", style) for d in hf] for style in ("linen", "nnx")}
    return root, hf, orbax


@pytest.mark.parametrize("style", ["linen", "nnx"])
def test_orbax_flax_model_reads_as_its_hugging_face_checkpoint(models, style):
    _, hf, orbax = models
    for hf_dir, orbax_dir in zip(hf, orbax[style]):
        ours, theirs = open_checkpoint(orbax_dir), Checkpoint(hf_dir)
        assert isinstance(ours, FlaxCheckpoint)
        assert {n: (i.shape, i.dtype) for n, i in ours.tensors.items()} == \
               {n: (i.shape, i.dtype) for n, i in theirs.tensors.items()}
        for name in theirs.tensors:
            got = ours.read_host(name)
            assert got.flags.c_contiguous and got.tobytes() == theirs.read_host(name).tobytes(), name


@pytest.mark.parametrize("budget", [None, 4096])
def test_leaves_are_restored_in_groups(models, monkeypatch, budget):
    """One Orbax restore costs tens of ms whatever it reads: tensors read in their listed order come
    from a few restores of at most GROUP_BYTES each (or one larger leaf); any order reads right."""
    _, hf, orbax = models
    if budget is not None:
        monkeypatch.setattr(flax_hf, "GROUP_BYTES", budget)
    restores = []
    real_read = OrbaxCheckpoint.read

    def counted(self, names, shardings=None):
        restores.append([self.leaves[n].nbytes for n in names])
        return real_read(self, names, shardings)

    monkeypatch.setattr(OrbaxCheckpoint, "read", counted)
    ours, theirs = FlaxCheckpoint(orbax["linen"][1]), Checkpoint(hf[1])
    for name in ours.tensors:
        assert ours.read_host(name).tobytes() == theirs.read_host(name).tobytes(), name
    limit = flax_hf.GROUP_BYTES
    assert all(sum(group) <= limit or len(group) == 1 for group in restores)
    # Fewer restores than tensors; every leaf restored once.
    assert len(restores) < len(ours.tensors) and sum(len(g) for g in restores) == len(ours.tensors)
    if budget is None:
        assert len(restores) == 1  # a tiny model fits one group
    for name in reversed(list(ours.tensors)):  # out of order: a held group is dropped, values still right
        assert ours.read_host(name).tobytes() == theirs.read_host(name).tobytes(), name


def test_rules_for_each_leaf_kind():
    assert torch_name_and_axes(("model", "layers", "0", "mlp", "up_proj", "kernel"), 2) == \
        ("model.layers.0.mlp.up_proj.weight", (1, 0))
    assert torch_name_and_axes(("conv", "kernel"), 4) == ("conv.weight", (3, 2, 0, 1))  # (kh, kw, in, out)
    assert torch_name_and_axes(("conv1d", "kernel"), 3) == ("conv1d.weight", (2, 1, 0))  # transformers' .T
    assert torch_name_and_axes(("embed_tokens", "embedding"), 2) == ("embed_tokens.weight", None)
    assert torch_name_and_axes(("norm", "scale"), 1) == ("norm.weight", None)
    assert torch_name_and_axes(("norm", "weight"), 1) == ("norm.weight", None)
    assert torch_name_and_axes(("q_proj", "bias"), 1) == ("q_proj.bias", None)


def test_two_leaves_with_one_name_and_no_parameters_are_one_line(tmp_path):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(tmp_path / "clash"), {"norm": {"scale": np.ones(3, np.float32),
                                                                      "weight": np.ones(3, np.float32)}})
    checkpointer.save(os.path.abspath(tmp_path / "ints"), {"step": np.arange(3)})
    checkpointer.wait_until_finished()
    with pytest.raises(CheckpointError, match=r"clash: leaves \['norm'\]\['scale'\] and \['norm'\]\['weight'\] "
                                              r"are both tensor norm.weight"):
        FlaxCheckpoint(tmp_path / "clash")
    with pytest.raises(CheckpointError, match="ints: an Orbax checkpoint without floating-point parameters"):
        FlaxCheckpoint(tmp_path / "ints")


def _moe_config(base: Path, experts: list[Path]) -> dict:
    prompts = [["w3 w4 w5", "w6"], ["w11 w12"]]
    return {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "float32", "experts_per_token": 1,
            "experts": [{"source_model": str(e), "positive_prompts": p, "residual_scale": 0.5 if i else None}
                        for i, (e, p) in enumerate(zip(experts, prompts))]}


@pytest.mark.parametrize("style", ["linen", "nnx"])
def test_moe_from_orbax_flax_models_equals_moe_from_safetensors(models, tmp_path, style):
    _, hf, orbax = models
    outputs = {}
    for kind, dirs in (("safetensors", hf), ("orbax", orbax[style])):
        config = _moe_config(dirs[0], dirs[1:])
        config["experts"] = [{k: v for k, v in e.items() if v is not None} for e in config["experts"]]
        (tmp_path / f"{kind}.yml").write_text(json.dumps(config))
        assert main(["moe", str(tmp_path / f"{kind}.yml"), str(tmp_path / kind), "--quiet"]) == 0
        outputs[kind] = tm.read_dir(tmp_path / kind)
    assert set(outputs["orbax"]) == set(outputs["safetensors"])
    for name, value in outputs["safetensors"].items():
        assert outputs["orbax"][name].tobytes() == value.tobytes(), name
    assert (tmp_path / "orbax" / "tokenizer.json").is_file()
    record = json.loads((tmp_path / "orbax" / "jaxmerge_recipe.json").read_text())
    assert any(f.endswith("_METADATA") for i in record["resolved_inputs"] for f in i["files"])  # what was read


def test_orbax_model_without_config_is_one_line(models, tmp_path, capsys):
    _, hf, orbax = models
    bare = tmp_path / "bare"
    shutil.copytree(orbax["linen"][1], bare)
    (bare / "config.json").unlink()
    (tmp_path / "moe.yml").write_text(json.dumps(_moe_config(orbax["linen"][0], [bare, orbax["linen"][2]])))
    capsys.readouterr()
    assert main(["moe", str(tmp_path / "moe.yml"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bare}: no config.json beside the Orbax checkpoint's _METADATA" in err, err
    assert not (tmp_path / "out").exists()


def test_extract_lora_from_orbax_flax_models_equals_from_safetensors(models, tmp_path):
    """extract-lora reads the same tensors through the same source: a Flax fine-tune saved with Orbax gives
    the adapter its safetensors twin gives, tensor for tensor."""
    _, hf, orbax = models
    for kind, (base, ft) in (("safetensors", hf[:2]), ("orbax", orbax["nnx"][:2])):
        assert main(["extract-lora", "--model", str(ft), "--base", str(base), "--output", str(tmp_path / kind),
                     "--max-rank", "4", "--quiet"]) == 0
    ours, theirs = Checkpoint(tmp_path / "orbax"), Checkpoint(tmp_path / "safetensors")
    assert list(ours.tensors) == list(theirs.tensors)
    assert all(ours.read_host(n).tobytes() == theirs.read_host(n).tobytes() for n in theirs.tensors)
    config = json.loads((tmp_path / "orbax" / "adapter_config.json").read_text())
    assert config["target_modules"] == json.loads((tmp_path / "safetensors" / "adapter_config.json").read_text())["target_modules"]
