"""Router initialisation: one gate vector per expert and layer, as mergekit-moe 0.1.5 computes it
(`mergekit/moe/router.py`).

* `cheap_embed`: the sum of the base model's token embeddings over an expert's
  prompts (padding masked), normalised; the same vector for every layer. Computed
  here in NumPy, float32, from the embedding rows read from the checkpoint.
* `hidden` / `hidden_last` (the last token's hidden state) and `hidden_avg` (the
  mean over the sequence, padding included, as mergekit): the hidden state that
  enters each layer, averaged over the prompts. This needs a forward pass of the
  base model: it runs through transformers and torch (the `torch` extra), in
  bfloat16 on the CPU, with mergekit's arithmetic, so the gates are mergekit's.
* `random` (standard normal) and `uniform_random` (U(-1/sqrt(h), 1/sqrt(h)), torch's
  `nn.Linear` initialisation): drawn with JAX from an explicit key, reproducible by seed
  (mergekit draws them from torch's global generator).

For the prompt modes, an expert's vector is the positive prompts' vector minus the
negative prompts' (each normalised), normalised again (`x / max(|x|, 1e-8)`).
Prompts are tokenised as mergekit does: the base model's tokenizer, its BOS token
prepended as text, no other special tokens, left padding. For `cheap_embed` this
happens in a child process started before the build
(`jaxmerge.tools.moe.prompt_tokens`), so loading transformers overlaps copying
the experts.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import numpy as np

from jaxmerge.formats.sources import TensorSource
from jaxmerge.tools.moe.config import Expert, MoeError
from jaxmerge.tools.moe.prompt_tokens import PromptTokenError, PromptTokens, load_tokenizer, one_line, tokenize

EMBEDDING = "model.embed_tokens.weight"  # mergekit reads the embeddings under this name
DEGENERATE_CONDITION = 5.0  # mergekit's threshold on each layer's gate matrix condition number


def gate_vectors(mode: str, experts: tuple[Expert, ...], *, base_dir: Path | None, base: TensorSource,
                 layers: int, hidden: int, key: jax.Array | None, where: str,
                 tokens: PromptTokens | None = None) -> np.ndarray:
    """The routers' rows for `experts`, (layers, experts, hidden).

    Args:
      mode: the configuration's gate_mode.
      experts: the experts that get a row (`MoeConfig.gated`).
      base_dir: the base model's directory (its tokenizer; `hidden` loads the model from it).
      base: the base model's tensors (`cheap_embed` reads its embeddings).
      layers, hidden: the base config's num_hidden_layers and hidden_size.
      key: the random modes' key.
      where: names the configuration in errors.
      tokens: for `cheap_embed`, the prompts' ids from `start_prompt_tokens` (started earlier, so the
        tokenizer loaded while other work ran); None: tokenised now.

    Returns:
      float32 for cheap_embed and the random modes; bfloat16 for the hidden modes (the
      dtype of mergekit's forward pass).

    Raises:
      MoeError: one line (no tokenizer, no embeddings, transformers missing).
    """
    shape = (layers, len(experts), hidden)
    if mode == "random":
        return np.asarray(jax.random.normal(key, shape, np.float32))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return np.asarray(jax.random.uniform(key, shape, np.float32, minval=-scale, maxval=scale))
    if mode == "cheap_embed":
        if EMBEDDING not in base.tensors:
            raise MoeError(f"{base.path}: tensor {EMBEDDING} is missing (gate_mode cheap_embed reads the embeddings)")
        tokens = tokens if tokens is not None else start_prompt_tokens(experts, base_dir, where)
        try:
            batches = dict(zip(map(tuple, tokens.prompt_lists), tokens.result()))
        except PromptTokenError as err:
            raise MoeError(f"{base_dir}: {err}") from None
        embed = np.asarray(base.read_host(EMBEDDING))  # the checkpoint's dtype: only the prompts' rows are widened

        def vector(prompts):
            ids, mask = batches[tuple(prompts)]
            summed = (embed[ids].astype(np.float32) * mask[..., None]).sum(axis=1).sum(axis=0, keepdims=True)
            return np.repeat(summed / max(float(np.linalg.norm(summed)), 1e-8), layers, axis=0)

        rows = [_expert_row(vector, e) for e in experts]
        return np.stack(rows, axis=1).astype(np.float32)
    return _hidden_vectors(mode, experts, base_dir, _prompt_tokenizer(base_dir, where), layers, where)


def start_prompt_tokens(experts: tuple[Expert, ...], base_dir: Path | None, where: str) -> PromptTokens:
    """Start tokenising the experts' prompts (positive and negative lists) in a child process.

    Raises:
      MoeError: before anything starts, when there can be no tokenizer (no transformers, no base directory,
        no tokenizer file in it).
    """
    _check_tokenizer_prerequisites(base_dir, where)
    if not _has_tokenizer_files(base_dir):
        raise MoeError(f"{base_dir}: no tokenizer for the experts' prompts (no tokenizer files: tokenizer.json, "
                       "tokenizer_config.json, tokenizer.model, vocab.json, ...)")
    lists = []
    for expert in experts:
        for prompts in (expert.positive_prompts, expert.negative_prompts):
            if prompts and list(prompts) not in lists:
                lists.append(list(prompts))
    return PromptTokens(base_dir, lists)


def _expert_row(vector, expert: Expert) -> np.ndarray:
    """positive - negative, normalised per layer (float32 here; the hidden modes do it in torch)."""
    row = vector(expert.positive_prompts)
    if expert.negative_prompts:
        row = row - vector(expert.negative_prompts)
    return row / np.maximum(np.linalg.norm(row, axis=-1, keepdims=True), 1e-8)


def _check_tokenizer_prerequisites(base_dir: Path | None, where: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise MoeError(f"{where}: gate_mode hidden and cheap_embed tokenize the prompts with transformers: "
                       "pip install 'jaxmerge[torch]' transformers")
    if base_dir is None:
        raise MoeError(f"{where}: base_model must be a model directory with a tokenizer for prompt-based gates")


def _has_tokenizer_files(directory: Path) -> bool:
    """Some file of a tokenizer is there (any name transformers' tokenizers save: `*token*`, `*vocab*`,
    `merges.txt`, `*.model`, `*.tiktoken`): only a directory without any is refused before the build."""
    return any(("token" in f.name or "vocab" in f.name or f.name == "merges.txt" or f.suffix in (".model", ".tiktoken"))
               and f.is_file() for f in directory.iterdir())


def _prompt_tokenizer(base_dir: Path | None, where: str):
    """The base model's tokenizer, set up as mergekit sets it (left padding, pad = BOS, else EOS)."""
    _check_tokenizer_prerequisites(base_dir, where)
    try:
        return load_tokenizer(base_dir)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a missing or broken tokenizer
        raise MoeError(f"{base_dir}: " + one_line("no tokenizer for the experts' prompts", err)) from None


def _hidden_vectors(mode: str, experts, base_dir: Path, tokenizer, layers: int, where: str) -> np.ndarray:
    """The hidden modes: mergekit's `get_hidden_states`, in torch and bfloat16 as there."""
    try:
        import ml_dtypes
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MoeError(f"{where}: gate_mode {mode} runs the base model with torch: pip install 'jaxmerge[torch]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16, low_cpu_mem_usage=True)
    model.eval()

    def vector(prompts):
        ids, mask = tokenize(tokenizer, prompts, tensors="pt")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:-1])  # (layers, batch, seq, hidden): each layer's input
        states = states.sum(dim=2) / states.shape[2] if mode == "hidden_avg" else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]

    rows = []
    for expert in experts:
        row = vector(expert.positive_prompts)
        if expert.negative_prompts:
            row -= vector(expert.negative_prompts)
        row /= row.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(row)
    gates = torch.stack(rows, dim=1)  # (layers, experts, hidden)
    if gates.shape[0] != layers:
        raise MoeError(f"{base_dir}: the model ran {gates.shape[0]} layers, its config says {layers}")
    return gates.float().numpy().astype(ml_dtypes.bfloat16)


def degenerate_note(gates: np.ndarray) -> str | None:
    """The note naming the layers whose gate matrix is ill-conditioned (mergekit's `warn_degenerate_gates`):
    their experts' prompts point the same way and some experts will rarely be chosen. None: none is.

    A string rather than a warning: the build shows it from whichever thread computed the routers,
    and `warnings.catch_warnings` is not safe across threads."""
    bad = [i for i in range(gates.shape[0]) if np.linalg.cond(gates[i].astype(np.float32)) > DEGENERATE_CONDITION]
    if not bad:
        return None
    layers = "every layer" if len(bad) == gates.shape[0] else "layer" + ("s " if len(bad) > 1 else " ") + ", ".join(map(str, bad))
    return (f"{layers}: the routers' rows are nearly dependent (condition number > {DEGENERATE_CONDITION:g}): "
            "the experts' prompts may be too similar, and some experts will be underused")
