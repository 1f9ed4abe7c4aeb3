"""The mixture-of-experts architectures `jaxmerge moe` writes, chosen as mergekit-moe 0.1.5 chooses them.

Each output architecture says which configurations it supports (the input
models' `model_type`, shared experts), how config.json changes, and where each
expert's tensors go. The tensors are named as the architecture's released
checkpoints name them on the Hub (Mixtral-8x7B's `block_sparse_moe.experts.N.w1`,
Qwen1.5-MoE's and Qwen3-30B-A3B's `mlp.experts.N.gate_proj`): transformers 4 and
5, vLLM and llama.cpp read that layout (transformers 5 fuses the experts when it
loads them; mergekit 0.1.5 writes the fused form of transformers 5 for Mixtral and
Qwen3 MoE, which older readers do not know).

| name (mergekit's) | input model_type | shared experts | output class |
| --- | --- | --- | --- |
| Mixtral | llama, mistral | none | MixtralForCausalLM |
| DeepSeek MoE | llama, mistral | at most one, without prompts | DeepseekForCausalLM (remote code: deepseek-ai/deepseek-moe-16b-base) |
| Qwen MoE | llama, mistral, qwen2 | exactly one, with prompts unless gate_mode is random | Qwen2MoeForCausalLM |
| Qwen3 MoE | qwen3 | none | Qwen3MoeForCausalLM |

Selection (mergekit's `select_output_arch`): the configuration's `architecture`
keeps the names that start with it (case-insensitive); of those that support the
configuration, Mixtral is taken when it is one, else the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jaxmerge.tools.moe.config import MoeConfig, MoeError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense model's MLP, `model.layers.N.mlp.<proj>.weight`
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass(frozen=True)
class MoeArchitecture:
    """One output architecture (see the module docstring).

    Args:
      name: mergekit's name for it.
      input_types: the `model_type`s every input model must share.
      shared: how many shared experts it takes: (fewest, most).
      shared_prompts: the shared expert must have prompts (True), must not (False), or either (None).
      config: `config(base_config, config) -> dict` of the keys config.json changes.
      expert_tensor: `expert_tensor(layer, expert, projection) -> name` of a routed expert's weight.
      shared_tensor: the same for the shared expert (None: no shared experts).
      router: the router's weight of a layer (experts x hidden).
      shared_router: the shared expert's gate of a layer (1 x hidden), or None.
    """

    name: str
    input_types: tuple[str, ...]
    shared: tuple[int, int]
    shared_prompts: bool | None
    config: Callable[[dict, MoeConfig], dict]
    expert_tensor: Callable[[int, int, str], str]
    shared_tensor: Callable[[int, str], str] | None = None
    router: Callable[[int], str] = lambda layer: f"model.layers.{layer}.mlp.gate.weight"
    shared_router: Callable[[int], str] | None = None
    zero_attention_bias: bool = False  # q/k/v biases the base lacks are written as zeros (Qwen MoE's attention has them)
    torch_dtype_key: bool = False  # config.json also gets `torch_dtype` (remote code written before transformers 5)

    def why_not(self, config: MoeConfig, model_types: list[str]) -> str | None:
        """Why this architecture cannot build `config` from models of `model_types` (None: it can)."""
        fewest, most = self.shared
        n_shared = len(config.shared_experts)
        if not fewest <= n_shared <= most:
            wanted = "no" if most == 0 else ("exactly one" if fewest == most else f"at most {most}")
            return f"{self.name} takes {wanted} shared expert(s), the configuration has {n_shared}"
        if n_shared and self.shared_prompts is True and config.gate_mode != "random" \
                and not config.shared_experts[0].positive_prompts:
            return f"{self.name} needs positive_prompts for its shared expert's gate"
        if n_shared and self.shared_prompts is False and (
                config.shared_experts[0].positive_prompts or config.shared_experts[0].negative_prompts):
            return f"{self.name} does not gate its shared expert: leave out its prompts"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every input model of one architecture, got model_type {sorted(set(model_types))}"
        if model_types[0] not in self.input_types:
            return f"{self.name} is built from {', '.join(self.input_types)} models, got model_type {model_types[0]!r}"
        return None


def _per_token(config: MoeConfig, default: int = 2) -> int:
    return config.experts_per_token or default


def _mixtral_config(base: dict, config: MoeConfig) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_local_experts": len(config.experts), "num_experts_per_tok": _per_token(config),
        "sliding_window": None, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    }


def _qwen2_moe_config(base: dict, config: MoeConfig) -> dict:
    size = base.get("intermediate_size")
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "num_experts": len(config.experts), "num_experts_per_tok": _per_token(config),
        "decoder_sparse_step": 1, "norm_topk_prob": True, "sliding_window": None, "use_sliding_window": False,
        "shared_expert_intermediate_size": size, "moe_intermediate_size": size, "qkv_bias": True,
        "mlp_only_layers": [], "output_router_logits": False, "router_aux_loss_coef": 0.001,
    }


def _qwen3_moe_config(base: dict, config: MoeConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "num_experts": len(config.experts), "num_experts_per_tok": _per_token(config),
        "decoder_sparse_step": 1, "norm_topk_prob": True, "moe_intermediate_size": base.get("intermediate_size"),
        "mlp_only_layers": [], "output_router_logits": False, "router_aux_loss_coef": 0.001,
    }


def _deepseek_config(base: dict, config: MoeConfig) -> dict:
    shared = len(config.shared_experts)
    remote = "deepseek-ai/deepseek-moe-16b-base--"
    return {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "n_routed_experts": len(config.experts), "n_shared_experts": shared or None,
        "num_experts_per_tok": config.experts_per_token or (1 if shared else 2),
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
        "moe_intermediate_size": base.get("intermediate_size"),
        "auto_map": {
            "AutoConfig": remote + "configuration_deepseek.DeepseekConfig",
            "AutoModel": remote + "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": remote + "modeling_deepseek.DeepseekForCausalLM",
        },
    }


def _experts_at(prefix: str) -> Callable[[int, int, str], str]:
    return lambda layer, expert, proj: f"model.layers.{layer}.mlp.{prefix}{expert}.{proj}.weight"


ARCHITECTURES: tuple[MoeArchitecture, ...] = (  # mergekit's ALL_OUTPUT_ARCHITECTURES order
    MoeArchitecture(
        name="Mixtral", input_types=("llama", "mistral"), shared=(0, 0), shared_prompts=None,
        config=_mixtral_config,
        expert_tensor=lambda layer, expert, proj:
            f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_NAMES[proj]}.weight",
        router=lambda layer: f"model.layers.{layer}.block_sparse_moe.gate.weight",
    ),
    MoeArchitecture(
        name="DeepSeek MoE", input_types=("llama", "mistral"), shared=(0, 1), shared_prompts=False,
        config=_deepseek_config, expert_tensor=_experts_at("experts."),
        shared_tensor=lambda layer, proj: f"model.layers.{layer}.mlp.shared_experts.{proj}.weight",
        torch_dtype_key=True,
    ),
    MoeArchitecture(
        name="Qwen MoE", input_types=("llama", "mistral", "qwen2"), shared=(1, 1), shared_prompts=True,
        config=_qwen2_moe_config, expert_tensor=_experts_at("experts."),
        shared_tensor=lambda layer, proj: f"model.layers.{layer}.mlp.shared_expert.{proj}.weight",
        shared_router=lambda layer: f"model.layers.{layer}.mlp.shared_expert_gate.weight",
        zero_attention_bias=True,
    ),
    MoeArchitecture(
        name="Qwen3 MoE", input_types=("qwen3",), shared=(0, 0), shared_prompts=None,
        config=_qwen3_moe_config, expert_tensor=_experts_at("experts."),
    ),
)


def select_architecture(config: MoeConfig, model_types: list[str]) -> tuple[MoeArchitecture, list[str]]:
    """The output architecture for `config` (see the module docstring).

    Args:
      config: the checked configuration.
      model_types: `model_type` of the base, each expert and each shared expert.

    Returns:
      (the architecture, warnings to show: several candidates fit).

    Raises:
      MoeError: no architecture has the name given, or none supports the configuration (with each one's reason).
    """
    candidates = list(ARCHITECTURES)
    if config.architecture:
        candidates = [a for a in candidates if a.name.lower().startswith(config.architecture.lower())]
        if not candidates:
            names = ", ".join(a.name for a in ARCHITECTURES)
            raise MoeError(f"{config.where}: architecture {config.architecture!r} names no output architecture ({names})")
    reasons = {a.name: a.why_not(config, model_types) for a in candidates}
    fitting = [a for a in candidates if reasons[a.name] is None]
    if not fitting:
        raise MoeError(f"{config.where}: no output architecture fits: " + "; ".join(reasons.values()))
    for arch in fitting:
        if arch.name == "Mixtral":  # mergekit's default, for older configurations
            return arch, []
    notes = [f"several output architectures fit ({', '.join(a.name for a in fitting)}); building {fitting[0].name} "
             "(set architecture: to choose)"] if len(fitting) > 1 else []
    return fitting[0], notes
