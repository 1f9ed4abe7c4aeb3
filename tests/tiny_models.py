"""Tiny Hugging Face models built offline with transformers, a Hub cache of them, and mergekit runs.

Used by tests/test_mergekit_recipes.py: everything is made on the fly from
random initialisations (nothing is downloaded); mergekit 0.1.5 runs as a
subprocess on the same recipes. `write_safetensors_models` writes bare
safetensors files for the checkpoint tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

VOCAB = 128
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB)
GPT2 = dict(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)


def write_safetensors_models(root, n: int, shapes: dict, *, seed: int = 0, dtype=np.float32) -> list[Path]:
    """`n` files `model{i}.safetensors` of random float tensors `shapes` and an int64 `position_ids`."""
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        tensors = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        tensors["position_ids"] = np.arange(10, dtype=np.int64)
        path = root / f"model{i}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def mlp_trees(rng: np.random.Generator, n_tasks: int, scale: float = 0.5):
    """A 5-6-4 MLP's parameters (base) and `n_tasks` fine-tunes: base + scale x N(0, 1) deltas."""

    def tree(s):
        return {
            "l0": {"w": rng.standard_normal((5, 6)).astype(np.float32) * s, "b": rng.standard_normal(6).astype(np.float32) * s},
            "l1": {"w": rng.standard_normal((6, 4)).astype(np.float32) * s, "b": rng.standard_normal(4).astype(np.float32) * s},
        }

    base = tree(1.0)
    finetuned = []
    for _ in range(n_tasks):
        delta = tree(scale)
        finetuned.append({k: {n: base[k][n] + delta[k][n] for n in base[k]} for k in base})
    return base, finetuned


def offline_env(**extra) -> dict:
    """The environment of every subprocess here: no network, CPU only, quiet."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer with exactly VOCAB tokens (the models' vocabulary size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def make_family(root: Path, kind: str = "llama", n_finetunes: int = 3, seed: int = 0, scale: float = 0.05) -> list[Path]:
    """A base model and `n_finetunes` models = base + small random deltas, saved float32 with a tokenizer.

    Returns:
      [base, ft1, ..., ftn] directories.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    else:
        model = GPT2LMHeadModel(GPT2Config(**GPT2))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n_finetunes + 1):
        directory = root / (f"{kind}-base" if i == 0 else f"{kind}-ft{i}")
        if i:
            gen = torch.Generator().manual_seed(seed * 100 + i)
            state = {
                k: v + scale * torch.randn(v.shape, generator=gen) * v.abs().mean().clamp_min(1e-3)
                if v.is_floating_point() else v
                for k, v in base_state.items()
            }
            model.load_state_dict(state)
        model.save_pretrained(directory)
        save_tokenizer(directory)
        dirs.append(directory)
    model.load_state_dict(base_state)
    return dirs


def hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "0" * 40) -> None:
    """Lay `source` out as huggingface_hub's cache holds repo `repo_id` (refs/main -> snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        shutil.copyfile(file, snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


_DRIVER = """
import sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.run_yaml import main
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main.main([recipe, out, "--no-lazy-unpickle", "--random-seed", "0", "--quiet"], standalone_mode=False)
"""


def run_mergekit(jobs: list[tuple[Path, Path]], cwd: Path) -> None:
    """mergekit-yaml on each (recipe, output), in one process (mergekit's own command, CPU)."""
    args = [str(x) for job in jobs for x in job]
    result = subprocess.run([sys.executable, "-c", _DRIVER, *args], cwd=cwd, env=offline_env(),
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{result.stderr[-4000:]}")


def read_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory (float32 NumPy; bfloat16 widened)."""
    from jaxmerge.formats.safetensors_io import Checkpoint

    c = Checkpoint(directory)
    return {name: np.asarray(c.read(name)).astype(np.float32) for name in c.tensors}


def logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    """The causal LM's logits on `tokens`, loaded with transformers' AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
