"""merge_lora: adapters from disk against PEFT's add_weighted_adapter."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from jaxmerge.tools.adapters import merge_lora
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError

DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
NAMES = ["task_x", "task_y", "task_z"]
WEIGHTS = [1.0, -0.6, 0.8]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.conv = torch.nn.Conv2d(12, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, ids):
        h = self.emb(ids)  # (batch, 9, 12)
        h = self.conv(h.transpose(1, 2).reshape(-1, 12, 3, 3))
        return self.fc2(torch.relu(self.fc1(h.mean((2, 3)))))


def configs():
    targets = ["emb", "conv", "fc1", "fc2"]
    return [
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, alpha_pattern={"fc2": 32}),
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False, use_rslora=True),
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Base weights and three adapters saved with PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    base = Net()
    base_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, configs()[0], adapter_name=NAMES[0])
    for name, config in zip(NAMES[1:], configs()[1:]):
        model.add_adapter(name, config)
    dirs = []
    for name in NAMES:
        model.save_pretrained(root / "saved", selected_adapters=[name])
        dirs.append(root / "saved" / name if name != "default" else root / "saved")
    return base_state, model, dirs, root


def peft_merge(model, combination_type, density=0.5):
    model = copy.deepcopy(model)
    model.add_weighted_adapter(NAMES, WEIGHTS, "merged", combination_type=combination_type, density=density)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    return model, {k: v.detach().numpy() for k, v in state.items()}


def product(a, b):
    if a.ndim == 4:
        return np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    return b @ a


def pairs(state):
    out = {}
    for k in state:
        for sa, sb in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if k.endswith(sa):
                out[k[: -len(sa)]] = (state[k], state[k[: -len(sa)] + sb])
    return out


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_equal_add_weighted_adapter(saved, combination_type, tmp_path):
    base_state, model, dirs, _ = saved
    peft_model, reference = peft_merge(model, combination_type)
    config = merge_lora(dirs, WEIGHTS, tmp_path / "merged", combination_type=combination_type, density=0.5)
    ours = Checkpoint(tmp_path / "merged" / "adapter_model.safetensors")
    assert set(ours.tensors) == set(reference)
    peft_config = peft_model.peft_config["merged"]
    assert config["r"] == peft_config.r and config["lora_alpha"] == peft_config.lora_alpha
    assert set(config["target_modules"]) == set(peft_config.target_modules)
    for module, (a_ref, b_ref) in pairs(reference).items():
        a, b = pairs({k: ours.read(k) for k in ours.tensors})[module]
        assert a.shape == a_ref.shape and b.shape == b_ref.shape, module
        if combination_type.endswith("svd"):
            # Two float32 SVD implementations: agree to round-off relative to the matrix's scale.
            ref = product(a_ref, b_ref)
            np.testing.assert_allclose(product(a, b), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        else:
            np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)
    # PEFT loads the merged adapter, and the model gives PEFT's outputs.
    fresh = Net()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "merged")
    ids = torch.randint(0, 30, (5, 9))
    peft_model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), peft_model(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination_type", RANDOM)
def test_random_types_reproducible_and_loadable(saved, combination_type, tmp_path):
    base_state, model, dirs, _ = saved
    merge_lora(dirs, WEIGHTS, tmp_path / "one", combination_type=combination_type, density=0.5, seed=3)
    merge_lora(dirs, WEIGHTS, tmp_path / "two", combination_type=combination_type, density=0.5, seed=3)
    a, b = Checkpoint(tmp_path / "one" / "adapter_model.safetensors"), Checkpoint(tmp_path / "two" / "adapter_model.safetensors")
    for name in a.tensors:
        np.testing.assert_array_equal(a.read(name), b.read(name))
    recipe = json.loads((tmp_path / "one" / "jaxmerge_recipe.json").read_text())
    assert recipe["seed"] == 3 and recipe["combination_type"] == combination_type and "jaxmerge_version" in recipe
    fresh = Net()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "one")
    assert torch.isfinite(loaded(torch.randint(0, 30, (2, 9)))).all()


def test_errors(saved, tmp_path):
    _, _, dirs, root = saved
    with pytest.raises(CheckpointError, match="2 weights for 3 adapters"):
        merge_lora(dirs, [1.0, 1.0], tmp_path / "o", combination_type="ties", density=0.5)
    with pytest.raises(CheckpointError, match="combination_type must be one of"):
        merge_lora(dirs, WEIGHTS, tmp_path / "o", combination_type="average")
    with pytest.raises(CheckpointError, match="inside input"):
        merge_lora(dirs, WEIGHTS, dirs[0] / "merged", combination_type="linear")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        merge_lora([tmp_path], [1.0], tmp_path / "o", combination_type="linear")
    # Different ranks where the type needs one rank.
    torch.manual_seed(1)
    other = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False))
    other.save_pretrained(root / "rank2")
    with pytest.raises(CheckpointError, match=r"one rank, got r = \[4, 2\]"):
        merge_lora([dirs[0], root / "rank2"], [1.0, 1.0], tmp_path / "o", combination_type="ties", density=0.5)
    assert not (tmp_path / "o").exists()
