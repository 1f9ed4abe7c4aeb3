"""Build a mixture of experts through the streamed engine: every output tensor is one input tensor, copied.

The MoE is a layout for `jaxmerge.engine.stream.merge_checkpoints` with the
`passthrough` method: attention, norms, embeddings and LM head come from the
base model; expert `e`'s weights of layer `l` are the `model.layers.l.mlp.*`
tensors of expert `e`'s model (its down projection times `residual_scale`, every
MLP weight plus `noise_scale` x N(0, 1) noise drawn from the seed); the routers'
weights, and the zero attention biases Qwen MoE needs, are computed and read from
memory (`jaxmerge.formats.sources.ArraySource`). So the build streams tensor by
tensor like a merge: memory stays near the largest tensors, the output directory
appears only when complete, the inputs are only read. The computed tensors come
last: `cheap_embed` routers wait for the prompts' token ids, tokenised by a child
process meanwhile (`jaxmerge.tools.moe.prompt_tokens`), so the seconds of loading
transformers overlap the copy instead of preceding it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml

from jaxmerge.engine.stream import MergePlan, OutputTensor, merge_checkpoints, plan_merge
from jaxmerge.formats.hf_model import ModelDir, copy_generation_and_tokenizer, set_config_dtype
from jaxmerge.formats.orbax import METADATA_FILE, is_orbax_checkpoint
from jaxmerge.formats.safetensors_io import DTYPE_NAMES, DTYPES
from jaxmerge.formats.sources import ArraySource, TensorSource, open_checkpoint
from jaxmerge.methods.pytree import path_key
from jaxmerge.recipes.plan import reference_source, resolve_reference
from jaxmerge.tools.moe.architectures import PROJECTIONS, MoeArchitecture, select_architecture
from jaxmerge.tools.moe.config import Expert, MoeConfig, MoeError, check_config, load_moe_config
from jaxmerge.tools.moe.gates import EMBEDDING, degenerate_note, gate_vectors, start_prompt_tokens
from jaxmerge.tools.moe.prompt_tokens import PromptTokens

COMPUTED = "router weights (computed)"  # what errors name as the computed tensors' source
CONFIG_FILE = "mergekit_moe_config.yml"  # the configuration, beside the output (as mergekit-moe writes it)
_SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints hold; no architecture loads them


@dataclass
class MoePlan:
    """Everything `build_moe` decided before the first tensor is read."""

    config: MoeConfig
    architecture: MoeArchitecture
    models: list[tuple[ModelDir, ModelDir | None]]  # the inputs: (model, LoRA adapter), base first
    sources: list  # what the engine reads for each model, then the computed tensors (ArraySource)
    layout: list[OutputTensor]
    out_dtype: str | None  # the output's dtype name (None: each tensor's own)
    out_config: dict
    notes: list[str]  # warnings to show (several architectures fit, ill-conditioned gates known now)
    prompt_tokens: PromptTokens | None = None  # the child tokenising cheap_embed's prompts (`close` when done)

    def close(self) -> None:
        """Stop the prompts' tokenizer process if it still runs (a build that failed before the routers)."""
        if self.prompt_tokens is not None:
            self.prompt_tokens.close()


def plan_moe(config: MoeConfig | str | os.PathLike, *, seed: int = 0, allow_all_same: bool = False,
             strict: bool = False, warn=None) -> MoePlan:
    """Check the configuration and the models, start the routers' weights, and lay the output out.

    Args:
      config: a `MoeConfig` or the path of a mergekit-moe YAML file.
      seed: key of the random gates and of `noise_scale`'s noise (`jax.random.key(seed)`).
      allow_all_same: build even when every expert is the same model.
      strict: refuse keys mergekit ignores (with a path).
      warn: `warn(line)` for the notes about `cheap_embed` routers, known only once they are computed
        (during the build; default: `warnings.warn` as RecipeWarning).

    Returns:
      The plan (nothing written). With `cheap_embed` the routers are computed on their first read;
      `MoePlan.close` stops their tokenizer process if that never comes.

    Raises:
      MoeError / CheckpointError: one line naming the file, model, tensor and value. With
        `cheap_embed`, a tokenizer that exists but fails to load or to tokenise the prompts is
        reported when the routers are read (the build's last tensors), as a MoeError.
    """
    if not isinstance(config, MoeConfig):
        config = load_moe_config(config, strict=strict)
    check_config(config, allow_all_same=allow_all_same)
    where = config.where
    index: dict[tuple, int] = {}
    models: list[tuple[ModelDir, ModelDir | None]] = []

    def model_index(ref: str, at: str) -> int:
        model, adapter = resolve_reference(ref, f"{where}: {at}")
        key = (model.path.resolve(), adapter.path.resolve() if adapter else None)
        if key not in index:
            index[key] = len(models)
            models.append((model, adapter))
        return index[key]

    base_index = model_index(config.base_model, "base_model")
    expert_index = [model_index(e.source_model, f"experts[{i}].source_model") for i, e in enumerate(config.experts)]
    shared_index = [model_index(e.source_model, f"shared_experts[{i}].source_model")
                    for i, e in enumerate(config.shared_experts)]
    base_dir = models[base_index][0].directory
    tokens = start_prompt_tokens(config.gated, base_dir, where) if config.gate_mode == "cheap_embed" else None
    try:
        configs = [_model_config(m, where) for m, _ in models]
        order = [base_index, *expert_index, *shared_index]
        arch, notes = select_architecture(config, [configs[i].get("model_type") for i in order])
        base_config = configs[base_index]
        layers, hidden = _size(base_config, "num_hidden_layers", models[base_index][0]), _size(base_config, "hidden_size", models[base_index][0])
        sources = [reference_source(m, a) for m, a in models]
        opened = [open_checkpoint(s) for s in sources]
        _check_experts(opened, base_index, sorted(set(expert_index + shared_index)), layers)
        out_dtype = config.dtype or _config_dtype(base_config)
        # Only random gates and noise_scale draw from the key (creating one compiles small programs).
        random = config.gate_mode in ("random", "uniform_random") or any(e.noise_scale for e in (*config.experts, *config.shared_experts))
        key = jax.random.key(seed) if random else None
        gate_dtype = _gate_dtype(out_dtype, opened[base_index])
        base = opened[base_index]
        if config.gate_mode == "cheap_embed" and EMBEDDING not in base.tensors:  # known now, not after the experts
            raise MoeError(f"{base.path}: tensor {EMBEDDING} is missing (gate_mode cheap_embed reads the embeddings)")

        def gates():
            return gate_vectors(config.gate_mode, config.gated, base_dir=base_dir, base=base, layers=layers,
                                hidden=hidden, key=path_key(key, "router") if key is not None else None, where=where,
                                tokens=tokens)

        if tokens is None:  # computed now: their notes are shown before the build
            gate_rows = gates()
            notes += _degenerate_notes(gate_rows)
            computed = ArraySource(COMPUTED, _computed_tensors(arch, config, gate_rows, base, layers, gate_dtype))
        else:  # computed on the first read of a router, once the child has tokenised the prompts

            def compute():
                gate_rows = gates()
                _show(_degenerate_notes(gate_rows), warn)
                return _computed_tensors(arch, config, gate_rows, base, layers, gate_dtype)

            placeholder = np.zeros((layers, len(config.gated), hidden), np.float32)
            specs = {name: (a.shape, a.dtype)
                     for name, a in _computed_tensors(arch, config, placeholder, base, layers, gate_dtype).items()}
            computed = ArraySource(COMPUTED, compute, specs)
        sources.append(computed)
        layout = _layout(arch, config, base, base_index, expert_index, shared_index, computed.tensors,
                         len(sources) - 1, layers, key)
    except BaseException:
        if tokens is not None:
            tokens.close()
        raise
    out_config = {**base_config, **arch.config(base_config, config)}
    out_config.pop("transformers_version", None)
    set_config_dtype(out_config, DTYPE_NAMES[out_dtype] if out_dtype else None)
    if arch.torch_dtype_key and out_dtype:
        out_config["torch_dtype"] = out_dtype
    return MoePlan(config, arch, models, sources, layout, out_dtype, out_config, notes, tokens)


def build_moe(config: MoeConfig | str | os.PathLike, output: str | os.PathLike, *, seed: int = 0,
              allow_all_same: bool = False, strict: bool = False, force: bool = False, progress: bool = True,
              max_shard_size: str | int = "5GB", allow_nonfinite: bool = False, depth: int | None = None,
              warn=None) -> tuple[MoePlan, MergePlan]:
    """Build the mixture of experts a mergekit-moe configuration describes into `output`.

    Args:
      config, seed, allow_all_same, strict: as `plan_moe`.
      output: the model directory to create (atomically): weights, config.json, generation config,
        the base model's tokenizer, README.md and mergekit_moe_config.yml.
      force: replace an existing output.
      progress: show a progress bar.
      max_shard_size, allow_nonfinite, depth: as `jaxmerge.engine.stream.merge_checkpoints`.
      warn: `warn(line)` for each note of the plan (default: `warnings.warn` as RecipeWarning).

    Returns:
      (the MoE plan, the engine's executed plan).
    """
    plan = plan_moe(config, seed=seed, allow_all_same=allow_all_same, strict=strict, warn=warn)
    try:
        _show(plan.notes, warn)
        merged = merge_checkpoints(
            plan.sources, output, method="passthrough", layout=plan.layout, out_dtype=plan.out_dtype, seed=seed,
            force=force, progress="building the MoE" if progress else False, max_shard_size=max_shard_size,
            allow_nonfinite=allow_nonfinite, depth=depth, finish=lambda tmp, _: _write_model_files(tmp, plan),
            record=_record(plan, seed),
        )
    finally:
        plan.close()
    return plan, merged


def dry_run(config: MoeConfig | str | os.PathLike, output: str | os.PathLike, *, seed: int = 0,
            allow_all_same: bool = False, strict: bool = False, max_shard_size: str | int = "5GB",
            warn=None) -> tuple[MoePlan, MergePlan]:
    """Plan the build as `build_moe` would (the routers computed, every tensor checked) and write nothing."""
    plan = plan_moe(config, seed=seed, allow_all_same=allow_all_same, strict=strict, warn=warn)
    try:
        _show(plan.notes, warn)
        merged, _, _ = plan_merge(plan.sources, output, method="passthrough", layout=plan.layout,
                                  out_dtype=plan.out_dtype, seed=seed, max_shard_size=max_shard_size)
        plan.sources[-1].materialize()
    finally:
        plan.close()
    return plan, merged


def _show(notes: list[str], warn) -> None:
    import warnings

    from jaxmerge.recipes.schema import RecipeWarning

    for line in notes:
        if warn is not None:
            warn(line)
        else:
            warnings.warn(line, RecipeWarning, stacklevel=3)


def _model_config(model: ModelDir, where: str) -> dict:
    config = model.config()
    if config is None and is_orbax_checkpoint(model.path):
        raise MoeError(f"{model.path}: no config.json beside the Orbax checkpoint's {METADATA_FILE} (the Flax "
                       f"model's Hugging Face config names its architecture: config.save_pretrained(path); {where})")
    if config is None:
        raise MoeError(f"{model.path}: no config.json (a MoE is built from model directories: {where})")
    return config


def _size(config: dict, key: str, model: ModelDir) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoeError(f"{model.path / 'config.json'}: {key} must be a positive integer, got {value!r}")
    return value


def _config_dtype(config: dict) -> str | None:
    """The base config's dtype (`torch_dtype`, or transformers 5's `dtype`), as mergekit's `select_dtype`."""
    for key in ("torch_dtype", "dtype"):
        name = str(config.get(key) or "").removeprefix("torch.")
        if name in DTYPE_NAMES:
            return name
    return None


def _gate_dtype(out_dtype: str | None, base: TensorSource) -> np.dtype:
    """The routers' dtype: the output's, else the base embeddings' (a config without a dtype), else float32."""
    if out_dtype:
        return DTYPES[DTYPE_NAMES[out_dtype]]
    info = base.tensors.get(EMBEDDING)
    return DTYPES[info.dtype] if info is not None else np.dtype(np.float32)


def _mlp(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _check_experts(opened: list[TensorSource], base_index: int, experts: list[int], layers: int) -> None:
    """Every expert model holds each layer's MLP weights in the base's shapes (one line naming file and tensor)."""
    base = opened[base_index]
    for layer in range(layers):
        for proj in PROJECTIONS:
            name = _mlp(layer, proj)
            ref = base.tensors.get(name)
            for i in experts:
                info = opened[i].tensors.get(name)
                if info is None:
                    raise MoeError(f"{opened[i].path}: tensor {name} is missing (every expert needs each layer's "
                                   f"{', '.join(PROJECTIONS)})")
                if ref is not None and info.shape != ref.shape:
                    raise MoeError(f"{opened[i].path}: tensor {name} has shape {list(info.shape)}, the base "
                                   f"{base.path} has {list(ref.shape)}")


def _degenerate_notes(gates: np.ndarray) -> list[str]:
    note = degenerate_note(gates)
    return [] if note is None else [note]


def _computed_tensors(arch: MoeArchitecture, config: MoeConfig, gates: np.ndarray, base: TensorSource, layers: int,
                      dtype) -> dict[str, np.ndarray]:
    """The routers' weights (and Qwen MoE's shared-expert gates and zero attention biases), by output name."""
    n = len(config.experts)
    out = {}
    for layer in range(layers):
        out[arch.router(layer)] = gates[layer, :n].astype(dtype)
        if arch.shared_router is not None:
            out[arch.shared_router(layer)] = gates[layer, n:].astype(dtype)
        if arch.zero_attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = base.tensors.get(f"model.layers.{layer}.self_attn.{proj}.weight")
                bias = f"model.layers.{layer}.self_attn.{proj}.bias"
                if weight is not None and bias not in base.tensors:
                    out[bias] = np.zeros(weight.shape[:1], dtype)
    return out


def _noise(scale: float, key: jax.Array):
    """`prepare` hook: the tensor plus scale x N(0, 1), computed in float32 (or wider) and rounded once."""

    def add(arrays: list[np.ndarray]) -> list[np.ndarray]:
        (x,) = arrays
        wide = np.float64 if x.dtype == np.float64 else np.float32
        noise = np.asarray(jax.random.normal(key, x.shape, np.float32)).astype(wide)
        return [(x.astype(wide) + wide(scale) * noise).astype(x.dtype)]

    return add


def _expert_tensor(out_name: str, source: int, in_name: str, expert: Expert, proj: str, shape, key) -> OutputTensor:
    scale = expert.residual_scale if proj == "down_proj" else None
    params = {"scale": [scale]} if scale is not None else None
    if expert.noise_scale:
        return OutputTensor(out_name, ((source, in_name),), params=params,
                            prepare=_noise(expert.noise_scale, path_key(key, out_name)), shape=tuple(shape))
    return OutputTensor(out_name, ((source, in_name),), params=params)


def _layout(arch: MoeArchitecture, config: MoeConfig, base: TensorSource, base_index: int, expert_index: list[int],
            shared_index: list[int], computed: dict, computed_index: int, layers: int, key) -> list[OutputTensor]:
    """Base tensors outside the MLPs in the base's order, layer by layer the experts and the shared expert,
    then the computed tensors (routers, zero biases): last, so that nothing waits for them."""
    layout = [OutputTensor(name, ((base_index, name),)) for name in base.tensors
              if ".mlp." not in name and not name.endswith(_SKIPPED)]
    for layer in range(layers):
        for e, (expert, source) in enumerate(zip(config.experts, expert_index)):
            for proj in PROJECTIONS:
                shape = base.tensors[_mlp(layer, proj)].shape if _mlp(layer, proj) in base.tensors else None
                layout.append(_expert_tensor(arch.expert_tensor(layer, e, proj), source, _mlp(layer, proj), expert,
                                             proj, shape, key))
        if arch.shared_tensor is not None:
            for expert, source in zip(config.shared_experts, shared_index):
                for proj in PROJECTIONS:
                    shape = base.tensors[_mlp(layer, proj)].shape if _mlp(layer, proj) in base.tensors else None
                    layout.append(_expert_tensor(arch.shared_tensor(layer, proj), source, _mlp(layer, proj), expert,
                                                 proj, shape, key))
    layout += [OutputTensor(name, ((computed_index, name),)) for name in computed]
    return layout


def _write_model_files(out: Path, plan: MoePlan) -> None:
    """config.json, generation_config.json, the base's tokenizer, README.md and the configuration."""
    base = plan.models[0][0]
    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    copy_generation_and_tokenizer(out, donor=base, tokenizer=base)
    text = plan.config.text if plan.config.text is not None else yaml.safe_dump(_config_dict(plan.config), sort_keys=False)
    (out / CONFIG_FILE).write_text(text)
    (out / "README.md").write_text(_card(plan, text))


def _config_dict(config: MoeConfig) -> dict:
    def expert(e: Expert) -> dict:
        d = {"source_model": e.source_model, "positive_prompts": list(e.positive_prompts),
             "negative_prompts": list(e.negative_prompts), "noise_scale": e.noise_scale, "residual_scale": e.residual_scale}
        return {k: v for k, v in d.items() if v not in (None, [])}

    d = {"base_model": config.base_model, "gate_mode": config.gate_mode, "dtype": config.dtype,
         "experts_per_token": config.experts_per_token, "architecture": config.architecture,
         "experts": [expert(e) for e in config.experts], "shared_experts": [expert(e) for e in config.shared_experts]}
    return {k: v for k, v in d.items() if v not in (None, [])}


def _card(plan: MoePlan, text: str) -> str:
    hub = sorted({m.hub_id for m, _ in plan.models if m.hub_id})
    meta = {"base_model": hub, "library_name": "transformers", "tags": ["moe", "merge", "jaxmerge"]} if hub else {
        "library_name": "transformers", "tags": ["moe", "merge", "jaxmerge"]}
    config = plan.config
    experts = "\n".join(f"* expert {i}: `{e.source_model}`" for i, e in enumerate(config.experts))
    shared = "".join(f"\n* shared expert: `{e.source_model}`" for e in config.shared_experts)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# Mixture of experts\n\n"
        f"A {plan.architecture.name} mixture of experts built with `jaxmerge moe` from dense models: the MLP of each "
        f"layer comes from each expert, everything else from `{config.base_model}`; {config.experts_per_token} experts "
        f"per token; routers initialised with `{config.gate_mode}`.\n\n## Experts\n\n{experts}{shared}\n\n"
        f"## Configuration\n\nmergekit-moe's format, also in `{CONFIG_FILE}`:\n\n```yaml\n{text.rstrip()}\n```\n"
    )


def _record(plan: MoePlan, seed: int) -> dict:
    return {"tool": "moe", "architecture": plan.architecture.name, "gate_mode": plan.config.gate_mode,
            "moe_config": plan.config.text if plan.config.text is not None else _config_dict(plan.config),
            "moe_seed": seed}
