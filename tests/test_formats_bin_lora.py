"""PyTorch .bin checkpoints (formats/torch_bin) and LoRA adapters folded into their model (formats/lora)."""

import json
import os
import pickle
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from jaxmerge.formats.lora import (
    LoraFolded, load_adapter, mergekit_load_dtype, split_lora_reference, split_revision,
)
from jaxmerge.formats.safetensors_io import ALIGN, CheckpointError, aligned_empty
from jaxmerge.formats.sources import open_checkpoint
from jaxmerge.formats.torch_bin import TorchBinCheckpoint, is_torch_bin
from tiny_models import LLAMA, make_family, read_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny float32 Llama directory (safetensors)."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama", 0)[0]


def save_bin(state: dict, directory, shards: int = 1, legacy: bool = False):
    """`state` as transformers 4's save_pretrained(safe_serialization=False) wrote it: pytorch_model.bin,
    or `shards` files pytorch_model-0000i-of-0000n.bin and pytorch_model.bin.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return directory
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        file = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({names[j]: state[names[j]] for j in part}, directory / file, _use_new_zipfile_serialization=not legacy)
        weight_map.update({names[j]: file for j in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


# ---------------------------------------------------------------- .bin checkpoints


@pytest.mark.parametrize("shards, legacy", [(1, False), (3, False), (3, True)], ids=["single", "sharded", "legacy"])
def test_bin_reads_the_tensors_of_its_safetensors_save(llama, tmp_path, shards, legacy):
    state = load_file(llama / "model.safetensors")
    directory = save_bin(state, tmp_path / "bin", shards, legacy)
    assert is_torch_bin(directory) and not is_torch_bin(llama)
    source = open_checkpoint(directory)
    assert isinstance(source, TorchBinCheckpoint)
    assert list(source.tensors) == list(state)  # file order (shards in order)
    expected = read_dir(llama)
    for name, info in source.tensors.items():
        array = source.read_host(name)
        assert info.dtype == "F32" and array.shape == info.shape and array.ctypes.data % ALIGN == 0
        np.testing.assert_array_equal(array, expected[name])
    if shards > 1:  # the index as a path, and one shard mapped at a time
        by_index = open_checkpoint(directory / "pytorch_model.bin.index.json")
        assert list(by_index.tensors) == list(state)
        first, last = list(state)[0], list(state)[-1]
        by_index.read_host(last)
        by_index.read_host(first)
        assert by_index._loaded[0].name == "pytorch_model-00001-of-00003.bin"


def test_bin_dtypes_views_and_into(tmp_path):
    base = torch.randn(6, 4)
    state = {
        "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.half(), "f64": base.double(),
        "i64": torch.arange(5), "i32": torch.arange(5, dtype=torch.int32), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([7], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "transposed": base.T, "scalar": torch.tensor(2.5),
    }
    torch.save(state, tmp_path / "weights.pt")
    source = open_checkpoint(tmp_path / "weights.pt")
    codes = {name: info.dtype for name, info in source.tensors.items()}
    assert codes == {"f32": "F32", "bf16": "BF16", "f16": "F16", "f64": "F64", "i64": "I64", "i32": "I32",
                     "i8": "I8", "u8": "U8", "bool": "BOOL", "transposed": "F32", "scalar": "F32"}
    bf16 = source.read_host("bf16")
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16.view(np.uint16), state["bf16"].view(torch.uint16).numpy())
    np.testing.assert_array_equal(source.read_host("transposed"), base.numpy().T)
    assert source.read_host("scalar").shape == () and source.read_host("bool").tolist() == [True, False]
    buffer = aligned_empty(1024)
    out = source.read_host("f64", into=buffer)
    assert out.ctypes.data == buffer.ctypes.data and out.dtype == np.float64
    np.testing.assert_array_equal(out, state["f64"].numpy())


class _Payload:
    """Unpickling this calls a function from the file: writes `marker` if it is ever run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["zip", "raw-pickle", "shard"])
def test_bin_with_code_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "ran"
    payload = {"a.weight": torch.zeros(2), "b": _Payload(marker)}
    if how == "zip":
        torch.save(payload, tmp_path / "evil.bin")
        path = tmp_path / "evil.bin"
    elif how == "raw-pickle":  # not a torch.save file at all: the legacy (non-mmap) path
        with open(tmp_path / "evil.bin", "wb") as f:
            pickle.dump(payload, f, protocol=2)
        path = tmp_path / "evil.bin"
    else:
        path = save_bin({"x": torch.zeros(2), "y": torch.ones(2)}, tmp_path / "model", shards=2)
        torch.save(payload, path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and ("evil.bin" in message or "00002-of-00002.bin" in message)
    assert "system" in message or "Unsupported" in message  # the refused global, from torch's message
    assert not marker.exists()


@pytest.mark.parametrize("state, key", [
    ({"model": {"w": torch.zeros(2)}}, "'model'"),
    ({"w": torch.zeros(2), "step": 5}, "'step'"),
    ([torch.zeros(2)], "list"),
    ({3: torch.zeros(2)}, "3"),
], ids=["nested", "non-tensor", "list", "int-key"])
def test_bin_that_is_not_a_flat_dict_is_refused(tmp_path, state, key):
    torch.save(state, tmp_path / "model.bin")
    with pytest.raises(CheckpointError) as err:
        TorchBinCheckpoint(tmp_path / "model.bin")
    message = str(err.value)
    assert str(tmp_path / "model.bin") in message and key in message and "\n" not in message


def test_bin_index_entry_outside_its_directory_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "outside.bin")
    (tmp_path / "model").mkdir()
    index = {"weight_map": {"w": "../outside.bin"}}
    (tmp_path / "model" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the index's directory"):
        open_checkpoint(tmp_path / "model")


def test_bin_without_torch_names_the_install(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match=r"\.bin checkpoints need torch \(pip install torch\)"):
        open_checkpoint(tmp_path / "model.bin")


# ---------------------------------------------------------------- LoRA folded into its model


def randomise_adapter(model, seed=0):
    """Non-zero B's (and modules_to_save weights unlike the base's): every fold is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def make_adapter(model_dir, out, config, seed=0, **save):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    randomise_adapter(peft_model, seed)
    peft_model.save_pretrained(out, **save)
    return out


def peft_merged(model_dir, adapter_dir, dtype=None):
    """What mergekit's ModelReference.merged does: from_pretrained, PeftModel, merge_and_unload."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def llama_lora_config(use_rslora):
    return LoraConfig(
        r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 32},
        modules_to_save=["lm_head"],
    )


def assert_folded_equals(folded, reference, base=None, rtol=1e-6, atol=1e-6):
    changed = 0
    for name, info in folded.tensors.items():
        ours = folded.read_host(name)
        ref = reference[name]
        assert ours.shape == tuple(ref.shape), name
        ref = ref.float().numpy()
        np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=rtol, atol=atol, err_msg=name)
        if base is not None and not np.array_equal(base[name], ours.astype(np.float32)):
            changed += 1
    return changed


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_lora_folded_equals_merge_and_unload(llama, tmp_path, use_rslora):
    adapter = make_adapter(llama, tmp_path / "adapter", llama_lora_config(use_rslora))
    folded = LoraFolded(llama, adapter)
    assert list(folded.tensors) == list(open_checkpoint(llama).tensors)
    changed = assert_folded_equals(folded, peft_merged(llama, adapter), base=read_dir(llama))
    # 4 layers x (q, v, down) + embed_tokens (base weights saved and LoRA) + lm_head (modules_to_save)
    assert changed == 4 * 3 + 2


def test_lora_folded_bfloat16_model_as_mergekit_loads_it(llama, tmp_path):
    """mergekit loads the model in config.json's dtype; PEFT keeps float32 factors and rounds once
    (the embedding's delta is rounded before its add): equal bit for bit, but for the rare tie
    that a different float32 summation order moves by one bfloat16 step."""
    from transformers import AutoModelForCausalLM

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    adapter = make_adapter(llama, tmp_path / "adapter", llama_lora_config(False))
    assert mergekit_load_dtype(bf16_dir) == "BF16" and mergekit_load_dtype(llama) == "F32"
    assert mergekit_load_dtype(llama, "torch.float16") == "F16"
    folded = LoraFolded(bf16_dir, adapter, dtype=mergekit_load_dtype(bf16_dir))
    reference = peft_merged(bf16_dir, adapter)  # dtype unset, as mergekit: "auto"
    for name, info in folded.tensors.items():
        ours, ref = folded.read_host(name), reference[name]
        assert info.dtype == "BF16" and ours.dtype == ml_dtypes.bfloat16 and ref.dtype == torch.bfloat16
        ours_bits = ours.view(np.uint16).astype(np.int32)
        ref_bits = ref.view(torch.uint16).numpy().astype(np.int32)
        assert np.abs(ours_bits - ref_bits).max() <= 1, name
        assert (ours_bits != ref_bits).mean() < 1e-3, name
    # A float32 model read as bfloat16 (mergekit's --lora-merge-dtype bfloat16): passed-through tensors are cast too.
    cast = LoraFolded(llama, adapter, dtype="BF16")
    assert {info.dtype for info in cast.tensors.values()} == {"BF16"}
    norm = "model.norm.weight"
    np.testing.assert_array_equal(cast.read_host(norm), read_dir(llama)[norm].astype(ml_dtypes.bfloat16))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.conv = torch.nn.Conv2d(12, 8, 3, padding=1)
        self.point = torch.nn.Conv2d(8, 6, 1)
        self.fc = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 3)


def test_lora_folded_conv_bias_and_embedding_equal_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    net = ConvNet()
    base_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_file(base_state, str(tmp_path / "model.safetensors"))
    # (PEFT has no lora_bias for embeddings: the llama test covers those)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "point", "fc"], lora_bias=True,
                        alpha_pattern={"point": 9}, modules_to_save=["head"], init_lora_weights=False)
    peft_model = get_peft_model(net, config)
    randomise_adapter(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    folded = LoraFolded(tmp_path / "model.safetensors", tmp_path / "adapter")
    base = {k: v.numpy() for k, v in base_state.items()}
    changed = assert_folded_equals(folded, reference, base=base, rtol=1e-5, atol=1e-6)
    assert changed == len(base_state) - 1  # all but emb.weight: the weights, their lora biases, head (saved whole)


def test_lora_folded_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D stores (in, out): PEFT sets fan_in_fan_out and the delta is transposed."""
    gpt2 = make_family(tmp_path / "gpt2", "gpt2", 0)[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wpe"], init_lora_weights=False,
                        fan_in_fan_out=True)
    adapter = make_adapter(gpt2, tmp_path / "adapter", config)
    folded = LoraFolded(gpt2, adapter)
    changed = assert_folded_equals(folded, peft_merged(gpt2, adapter), base=read_dir(gpt2))
    assert changed == 3 * 2 + 1  # 3 layers x (c_attn, c_fc) + wpe


def test_lora_folded_adapter_saved_as_bin(llama, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    adapter = make_adapter(llama, tmp_path / "adapter", config, safe_serialization=False)
    assert (adapter / "adapter_model.bin").exists() and not (adapter / "adapter_model.safetensors").exists()
    assert isinstance(load_adapter(adapter).weights, TorchBinCheckpoint)
    assert_folded_equals(LoraFolded(llama, adapter), peft_merged(llama, adapter))


def test_mismatched_adapter_fails_on_open_in_one_line(llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48})).save_pretrained(wide)
    adapter = make_adapter(wide, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError) as err:
        LoraFolded(llama, adapter)
    message = str(err.value)
    assert "\n" not in message and str(adapter / "adapter_model.safetensors") in message
    assert "layers.0.self_attn.q_proj.lora_A.weight [4, 48]" in message  # the adapter's tensor and shape
    assert "model.layers.0.self_attn.q_proj.weight of shape [32, 32]" in message  # the model's
    # A module the model does not have at all.
    (tmp_path / "ad2").mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "ad2" / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "ad2" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"targets model\.layers\.9\.mlp\.up_proj\.weight, which the model .* does not have"):
        LoraFolded(llama, tmp_path / "ad2")


@pytest.mark.parametrize("key, value", [("use_dora", True), ("trainable_token_indices", [1, 2]),
                                        ("layer_replication", [[0, 2]])])
def test_lora_variants_are_refused(llama, tmp_path, key, value):
    adapter = make_adapter(llama, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=f"adapter_config.json: {key} = .*only plain LoRA"):
        LoraFolded(llama, adapter)


@pytest.mark.parametrize("ref", ["org/model", "org/model+org/lora", "org/model@v1+org/lora@main", "m@rev", "./a+./b"])
def test_split_lora_reference_as_mergekit(ref):
    from mergekit.common import ModelReference

    parsed = ModelReference.parse(ref)
    model, lora = split_lora_reference(ref)
    assert split_revision(model) == (parsed.model.path, parsed.model.revision)
    if parsed.lora is None:
        assert lora is None
    else:
        assert split_revision(lora) == (parsed.lora.path, parsed.lora.revision)


def test_split_lora_reference_local_paths(tmp_path):
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert split_lora_reference(str(plus)) == (str(plus), None)
    assert split_lora_reference(f"{plus}+org/lora") == (str(plus), "org/lora")
    at = tmp_path / "x@y"
    at.mkdir()
    assert split_revision(str(at)) == (str(at), None)
    for bad in ["a+b+c", "model+", "+lora"]:
        with pytest.raises(CheckpointError):
            split_lora_reference(bad)
    with pytest.raises(CheckpointError, match="more than one '@'"):
        split_revision("a@b@c")
