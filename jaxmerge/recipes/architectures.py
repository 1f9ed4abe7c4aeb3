"""A model's layer stacks, from its tensor names and config.json, as mergekit 0.1.5's `architecture` package sees them.

A *layer stack* is a run of numbered blocks: the tensors named
`prefix.N.rest` for N = 0 .. count-1 (`model.layers.N.` in Llama, `h.N.` in
GPT-2, `encoder.block.N.` in T5). Most language models have one; a
vision-language model has two or more (LLaVA: `language_model.model.layers.N`
and `vision_tower.encoder.layers.N`), an encoder-decoder two. MoE models are
ordinary stacks whose layers hold numbered experts (`...layers.3.mlp.experts.7.`):
the layer is the first number of a name, as in mergekit.

mergekit calls the parts of a model *modules*. For the architectures it defines
with several modules (T5, Whisper, Mistral3, Gemma3, Qwen2-VL, Llama 4) the
module names are mergekit's (`encoder`/`decoder`, `text_decoder`/`vision_tower`/
`multi_modal_projector`); for any other model they are inferred as mergekit
infers them: one module per stack, named by its prefix
(`language_model.model.layers`), and the tensors outside every stack form the
module `default`. A model with one stack is one module, `default`.

Each stack's layer count comes from the tensor names and is cross-checked with
config.json: the key that holds it (`num_hidden_layers`,
`text_config.num_hidden_layers`, `vision_config.depth`, `num_decoder_layers`,
...) is found so that a frankenmerge's output config gets each stack's count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from jaxmerge.formats.hf_model import LAYER_COUNT_KEYS
from jaxmerge.formats.safetensors_io import CheckpointError

# The first numeric name component: `prefix.N.rest` (GPT-2's `h.N.` has no dot before the prefix).
_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")

# mergekit's module names for the architectures it defines with several modules:
# architecture -> (module name, the tensor prefix of its stack or None, the prefix of its other tensors).
_KNOWN_MODULES: dict[str, tuple[tuple[str, str | None, str], ...]] = {
    "T5ForConditionalGeneration": (("encoder", "encoder.block.", "encoder."), ("decoder", "decoder.block.", "decoder."),
                                   ("shared", None, "")),
    "WhisperForConditionalGeneration": (("encoder", "model.encoder.layers.", "model.encoder."),
                                        ("decoder", "model.decoder.layers.", "")),
    "Mistral3ForConditionalGeneration": (("text_decoder", "language_model.model.layers.", "language_model."),
                                         ("vision_tower", "vision_tower.transformer.layers.", "vision_tower."),
                                         ("multi_modal_projector", None, "multi_modal_projector.")),
    "Gemma3ForConditionalGeneration": (("text_decoder", "language_model.model.layers.", "language_model."),
                                       ("vision_tower", "vision_tower.vision_model.encoder.layers.", "vision_tower."),
                                       ("multi_modal_projector", None, "multi_modal_projector.")),
    "Llama4ForConditionalGeneration": (("text_decoder", "language_model.model.layers.", "language_model."),
                                       ("vision_model", "vision_model.model.layers.", "vision_model."),
                                       ("multi_modal_projector", None, "multi_modal_projector.")),
    "Qwen2VLForConditionalGeneration": (("text_decoder", "model.layers.", ""), ("vision_tower", "visual.blocks.", "visual.blocks."),
                                        ("multi_modal_projector", None, "visual.")),
}


@dataclass(frozen=True)
class LayerScheme:
    """One layer stack: tensors `prefix + str(i) + "." + rest` for i < count."""

    prefix: str
    count: int
    config_key: str | None = None  # dotted path of its count in config.json, when one holds it

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer index, rest) of a tensor in this stack, else None."""
        if not name.startswith(self.prefix):
            return None
        head, dot, rest = name[len(self.prefix):].partition(".")
        if not dot or not head.isdigit() or int(head) >= self.count:
            return None
        return int(head), rest

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}{index}.{rest}"


@dataclass(frozen=True)
class Module:
    """A part of a model (mergekit's module): at most one layer stack and the tensors that belong to it."""

    name: str
    stack: LayerScheme | None
    prefix: str  # tensors outside every stack whose names start with it belong here ("": any)


@dataclass(frozen=True)
class Architecture:
    """A model's modules and stacks (`architecture()`)."""

    modules: tuple[Module, ...]

    @property
    def stacks(self) -> list[LayerScheme]:
        return [m.stack for m in self.modules if m.stack is not None]

    def module(self, name: str, where: str) -> Module:
        for module in self.modules:
            if module.name == name:
                return module
        raise CheckpointError(f"{where}: no module {name!r} in this model (its modules: {', '.join(m.name for m in self.modules)})")

    def locate(self, name: str) -> tuple[Module, int | None, str]:
        """The module a tensor belongs to, its layer index in the module's stack (None outside) and the rest."""
        for module in self.modules:
            if module.stack is not None:
                split = module.stack.split(name)
                if split is not None:
                    return module, split[0], split[1]
        loose = [m for m in self.modules if name.startswith(m.prefix)]
        return max(loose, key=lambda m: len(m.prefix)), None, name


def find_stacks(names: Iterable[str]) -> dict[str, int]:
    """prefix -> layer count of every layer stack among tensor names: the indices of a prefix must run 0..count-1."""
    indices: dict[str, set[int]] = {}
    for name in names:
        match = _INDEX.search(name)
        if match:
            indices.setdefault(name[: match.start(1)], set()).add(int(match.group(1)))
    return {p: len(ix) for p, ix in indices.items() if ix == set(range(len(ix)))}


def _config_key(config: dict | None, prefix: str, count: int, used: set[str]) -> str | None:
    """The key of config.json (dotted for sub-configs) that holds a stack's `count`: first where the stack's
    name points (a vision stack's count is in vision_config, a decoder's in decoder_layers), else the
    only key anywhere that holds it."""
    config = config or {}
    words = prefix.lower()
    if "vision" in words or "visual" in words:
        hinted = [("vision_config.", k) for k in LAYER_COUNT_KEYS]
    elif "audio" in words:
        hinted = [("audio_config.", k) for k in LAYER_COUNT_KEYS]
    elif "decoder" in words and "model.decoder" in words or words.startswith("decoder"):
        hinted = [("", "decoder_layers"), ("", "num_decoder_layers"), ("decoder.", "num_hidden_layers")]
    elif "encoder" in words:
        hinted = [("", "encoder_layers"), ("", "num_layers"), ("", "num_hidden_layers"), ("encoder.", "num_hidden_layers")]
    else:
        hinted = [(scope, k) for scope in ("", "text_config.") for k in LAYER_COUNT_KEYS[:4]]
    everywhere = [(scope, k) for scope in ("", *(f"{s}." for s in _SUB_CONFIGS)) for k in LAYER_COUNT_KEYS]

    def holds(scope: str, key: str) -> bool:
        values = config.get(scope[:-1]) if scope else config
        value = values.get(key) if isinstance(values, dict) else None
        return value == count and not isinstance(value, bool) and scope + key not in used

    for scope, key in hinted:
        if holds(scope, key):
            return scope + key
    found = [scope + key for scope, key in everywhere if holds(scope, key)]
    return found[0] if len(found) == 1 else None


def architecture(names: Iterable[str], config: dict | None, where: str) -> Architecture:
    """The modules and layer stacks of a model (see the module docstring).

    Args:
      names: its tensor names.
      config: its config.json, or None.
      where: names the model in errors.

    Returns:
      An `Architecture`; a model without numbered layers has one module, `default`, with no stack.
    """
    names = list(names)
    stacks = find_stacks(names)
    used: set[str] = set()

    def scheme(prefix: str) -> LayerScheme:
        key = _config_key(config, prefix, stacks[prefix], used)
        if key is not None:
            used.add(key)
        return LayerScheme(prefix, stacks[prefix], key)

    arch = ((config or {}).get("architectures") or [None])[0]
    known = _KNOWN_MODULES.get(arch)
    if known and all(stack is None or stack in stacks for _, stack, _ in known):
        modules = [Module(name, scheme(stack) if stack else None, prefix) for name, stack, prefix in known]
        if all(m.prefix for m in modules):
            modules.append(Module("default", None, ""))
        return Architecture(tuple(modules))
    if len(stacks) <= 1:
        return Architecture((Module("default", scheme(next(iter(stacks))) if stacks else None, ""),))
    # Several stacks, as mergekit infers them: one module per stack, named by its prefix; the rest is `default`.
    modules = [Module(prefix.rstrip("."), scheme(prefix), prefix) for prefix in sorted(stacks)]
    return Architecture((*modules, Module("default", None, "")))
