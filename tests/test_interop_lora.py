"""PEFT's own LoRA merge (`LoraModel.add_weighted_adapter`) with interop patched in."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import model as lora_model

from interop import merge_utils as im

DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
PATCHED = ["task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 32)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def model_with_three_adapters():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(MLP(), config, adapter_name="task_x")
    model.add_adapter("task_y", copy.deepcopy(config))
    model.add_adapter("task_z", LoraConfig(r=4, lora_alpha=16, target_modules=["fc1", "fc2"], init_lora_weights=False))
    return model


def merged_factors(model, combination_type, density=0.5):
    model.add_weighted_adapter(
        ["task_x", "task_y", "task_z"], [1.0, -0.6, 0.8], "merged", combination_type=combination_type, density=density
    )
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "merged" in m.lora_A}
    return {name: (m.lora_A["merged"].weight.detach().clone(), m.lora_B["merged"].weight.detach().clone()) for name, m in layers.items()}


def run_both(combination_type, monkeypatch):
    reference = merged_factors(model_with_three_adapters(), combination_type)
    with monkeypatch.context() as patch:
        for name in PATCHED:
            patch.setattr(lora_model, name, getattr(im, name))
        model = model_with_three_adapters()
        torch.manual_seed(1)
        ours = merged_factors(model, combination_type)
    return reference, ours, model


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_equal_peft(combination_type, monkeypatch):
    reference, ours, model = run_both(combination_type, monkeypatch)
    assert reference.keys() == ours.keys() and len(ours) == 2
    for name in ours:
        (a_ref, b_ref), (a, b) = reference[name], ours[name]
        assert a.shape == a_ref.shape and b.shape == b_ref.shape
        if combination_type.endswith("svd"):
            # Singular vectors are defined up to sign: compare the product B @ A.
            torch.testing.assert_close(b @ a, b_ref @ a_ref, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(a, a_ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-6)
    model.set_adapter("merged")
    assert torch.isfinite(model(torch.randn(3, 24))).all()


@pytest.mark.parametrize("combination_type", RANDOM)
def test_random_types_match_in_distribution_and_run(combination_type, monkeypatch):
    reference, ours, model = run_both(combination_type, monkeypatch)
    for name in ours:
        (a_ref, b_ref), (a, b) = reference[name], ours[name]
        assert a.shape == a_ref.shape and b.shape == b_ref.shape
        if not combination_type.endswith("svd"):
            # Entry dropped in all three tasks: (1 - density)^3 = 1/8 in expectation.
            n = a.numel()
            bound = 6 * (n * 0.125 * 0.875) ** 0.5 / n
            assert abs((a == 0).float().mean().item() - 0.125) <= bound
            assert abs((a_ref == 0).float().mean().item() - 0.125) <= bound
        # Same scale as PEFT's merge (rescaling by 1/density preserved).
        ratio = (b @ a).norm() / (b_ref @ a_ref).norm()
        assert 0.5 < ratio.item() < 2.0
    model.set_adapter("merged")
    assert torch.isfinite(model(torch.randn(3, 24))).all()
