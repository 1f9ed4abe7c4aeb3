"""Hugging Face model directories: Hub ids in, a loadable and publishable output.

Inputs are local paths (a model directory, a .safetensors file or an index) or
Hub repo ids `org/name[@revision]` resolved through `huggingface_hub`'s cache
(`HF_HUB_CACHE` / `HF_HOME`; with `HF_HUB_OFFLINE=1` nothing is downloaded).

Layer stacks are the recipe side's business (`jaxmerge.recipes.architectures`);
this module only writes their counts into the output's config.

The output directory gets what `from_pretrained` and the Hub expect besides the
weights: config.json (from the base model, else the first model; its dtype
field set to the output's dtype, its layer counts and vocab_size to the merged
model's), generation_config.json, the donor's tokenizer files (a recipe with a
tokenizer source writes its built tokenizer instead), a
README.md model card and the recipe (mergekit_config.yml).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import yaml

from jaxmerge.formats.safetensors_io import DTYPE_NAMES, CheckpointError

# config.json keys that hold a layer stack's count (top level, or in text_config, vision_config, ...).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth", "encoder_layers", "decoder_layers",
                    "num_decoder_layers")
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".yml", ".yaml", ".gguf")
_SAFETENSORS_DTYPE_NAMES = {code: name for name, code in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class ModelDir:
    """A resolved model reference."""

    ref: str  # as written in the recipe
    path: Path  # a local directory or file
    hub_id: str | None = None  # the repo id when it came from the Hub

    @property
    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def config(self) -> dict | None:
        """config.json as a dict, or None."""
        if self.directory is None or not (self.path / "config.json").is_file():
            return None
        try:
            data = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path / 'config.json'}: not readable JSON ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: not a JSON object")
        return data


def resolve_model(ref: str, where: str) -> ModelDir:
    """A local path as it is; otherwise a Hub repo id from huggingface_hub's cache (or the Hub).

    Args:
      ref: a path, or `org/name[@revision]`.
      where: names the recipe key in errors ("recipe.yml: models[1].model").
    """
    path = Path(ref).expanduser()
    if path.exists():
        return ModelDir(ref, path)
    repo, _, revision = ref.partition("@")
    if ref.count("@") > 1 or not _REPO_ID.fullmatch(repo) or ref.startswith((".", "/", "~")) or repo.endswith(_FILE_SUFFIXES):
        raise CheckpointError(f"{where}: {ref}: no such file or directory")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(f"{where}: {ref} is not a local path, and Hub repo ids need huggingface_hub (pip install huggingface_hub)") from None
    try:
        local = huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=_HUB_PATTERNS)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not found"
        offline = " (HF_HUB_OFFLINE is set: only the cache was searched)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"{where}: {ref}: no such file or directory, nor a Hugging Face repo{offline} ({type(err).__name__})"
        ) from None
    return ModelDir(ref, Path(local), hub_id=repo)


def write_model_files(
    out: Path,
    *,
    donor: ModelDir,
    tokenizer: ModelDir | None,
    dtype_code: str | None,
    layers: dict[str | None, list[tuple[ModelDir, int]]] | None,
    card: str,
    recipe_text: str,
    vocab_size: int | None = None,
) -> None:
    """Write config.json, generation_config.json, tokenizer files, README.md and mergekit_config.yml into `out`.

    Args:
      out: the (temporary) output directory.
      donor: where config.json and generation_config.json come from.
      tokenizer: where the tokenizer files come from (None: none copied).
      dtype_code: the output's floating dtype (safetensors code) for config.json.
      layers: for slices, each layer stack's output layers by the config key of its
        count (`num_hidden_layers`, `text_config.num_hidden_layers`; None: the
        top-level key), each layer's source (model, layer index): the counts, and
        per-layer lists such as `layer_types`, follow them.
      card: README.md.
      recipe_text: mergekit_config.yml.
      vocab_size: the output's vocabulary rows when a merged vocabulary changed them
        (`vocab_size`, or `text_config.vocab_size` where the config keeps it there).
    """
    config = donor.config()
    if config is not None:
        set_config_dtype(config, dtype_code)
        if layers:
            _set_layers(config, layers)
        if vocab_size is not None:
            scope = config if "vocab_size" in config or not isinstance(config.get("text_config"), dict) else config["text_config"]
            scope["vocab_size"] = vocab_size
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_generation_and_tokenizer(out, donor=donor, tokenizer=tokenizer)
    (out / "README.md").write_text(card)
    (out / "mergekit_config.yml").write_text(recipe_text)


def set_config_dtype(config: dict, dtype_code: str | None) -> None:
    """Set config.json's dtype field(s) (`torch_dtype` and/or transformers 5's `dtype`) to a safetensors code's name."""
    if dtype_code in _SAFETENSORS_DTYPE_NAMES:
        name = _SAFETENSORS_DTYPE_NAMES[dtype_code]
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = name


def copy_generation_and_tokenizer(out: Path, *, donor: ModelDir, tokenizer: ModelDir | None) -> None:
    """Copy the donor's generation_config.json and the tokenizer's files (`TOKENIZER_FILES`) into `out`."""
    if donor.directory is not None and (donor.path / "generation_config.json").is_file():
        shutil.copyfile(donor.path / "generation_config.json", out / "generation_config.json")
    if tokenizer is not None and tokenizer.directory is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer.path / name).is_file():
                shutil.copyfile(tokenizer.path / name, out / name)


def _set_layers(config: dict, layers: dict[str | None, list[tuple[ModelDir, int]]]) -> None:
    """Each layer stack's count, at its key (dotted for sub-configs: `text_config.num_hidden_layers`), and the
    per-layer lists beside it (`layer_types`, sliding-window patterns) rebuilt from the layers' sources."""
    for key, sources in layers.items():
        if key is None:  # a single stack whose count no key held as expected: the usual top-level keys
            key = next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
            if key is None or len(layers) > 1:
                continue
        *path, leaf = key.split(".")
        scope: Any = config
        for part in path:
            scope = scope.get(part) if isinstance(scope, dict) else None
        if not isinstance(scope, dict):
            continue
        count = scope.get(leaf)
        scope[leaf] = len(sources)
        for name, value in list(scope.items()):
            if isinstance(value, list) and isinstance(count, int) and len(value) == count > 0 and name.startswith("layer"):
                rebuilt = []
                for model, index in sources:
                    theirs = model.config() or {}
                    for part in path:
                        theirs = theirs.get(part) if isinstance(theirs, dict) else None
                    theirs = (theirs or {}).get(name)
                    rebuilt.append(theirs[index] if isinstance(theirs, list) and index < len(theirs) else value[min(index, count - 1)])
                scope[name] = rebuilt


def model_card(*, method: str, paper: str, base: ModelDir | None, models: list[ModelDir], recipe_text: str, name: str) -> str:
    """README.md for the Hub: front matter (base models, tags merge and jaxmerge), method, models, recipe."""
    hub = sorted({m.hub_id for m in [*models, *([base] if base else [])] if m.hub_id})
    meta = {"base_model": hub, "library_name": "transformers", "tags": ["merge", "jaxmerge"]} if hub else {
        "library_name": "transformers", "tags": ["merge", "jaxmerge"]
    }
    link = lambda m: f"[{m.hub_id}](https://huggingface.co/{m.hub_id})" if m.hub_id else f"`{m.ref}`"  # noqa: E731
    using = f" with {link(base)} as the base" if base else ""
    listed = "\n".join(f"* {link(m)}" for m in models if base is None or m.path != base.path)
    cite = f" ({paper})" if paper else ""
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {name}\n\n"
        f"This model is a merge of pre-trained language models made with jaxmerge.\n\n"
        f"## Merge method\n\n`{method}`{cite}{using}.\n\n"
        f"## Models merged\n\n{listed}\n\n"
        f"## Recipe\n\nThe recipe (mergekit's configuration schema), also in `mergekit_config.yml`:\n\n"
        f"```yaml\n{recipe_text.rstrip()}\n```\n"
    )
