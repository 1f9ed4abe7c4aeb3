"""Turn a recipe (`jaxmerge.recipes.schema`) into a checkpoint merge: which tensors feed which, with which parameters.

This follows mergekit 0.1.5's planner (mergekit/plan.py). A model is made of
modules (`jaxmerge.recipes.architectures`: one per layer stack of a
vision-language or encoder-decoder model; one, `default`, for most language
models). The `models` form merges every tensor with its namesakes, the base
model added as one more source when it is not listed. `slices` apply to the
one module of a single-stack model; `modules:` gives each module its own
models or slices and parameters. Within a module a slice's layers are merged
source by source (layer `start + i` of each), numbered on from the previous
slice in the output; the module's other tensors come from its first slice's
sources (embeddings) or its last slice's (final norm, LM head). Each tensor's
parameters are resolved by `schema.evaluate_setting` at `t = i / (n - 1)` for
the i-th of a slice's n layers (t = 1 when n = 1) and t = 0 outside the
layers, from the most specific scope on: the source's own, its slice's, its
module's, the recipe's; filters see the output name for shared parameters and
the input's name for per-model ones. The merge itself is
`jaxmerge.engine.stream.merge_checkpoints` with the layout.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from jaxmerge.engine.stream import MergePlan, OutputTensor, check_same_tensors, merge_checkpoints, plan_merge
from jaxmerge.formats.lora import LoraFolded, mergekit_load_dtype, split_lora_reference
from jaxmerge.formats.hf_model import ModelDir, model_card, resolve_model, write_model_files
from jaxmerge.formats.safetensors_io import DTYPE_NAMES, CheckpointError
from jaxmerge.formats.sources import TensorSource
from jaxmerge.methods import _table as table
from jaxmerge.recipes.architectures import Architecture, architecture
from jaxmerge.recipes.schema import Recipe, RecipeWarning, Source, resolve_setting, uses_gradients

# Tensors with one row per token (mergekit's vocabulary_axis 0): input embeddings and LM heads.
_VOCABULARY = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|lm_head|embed_out|output)\.weight$")
# Tensors before the first layer (from the first slice's sources); the others outside the layers come after.
_PRE = re.compile(r"(^|\.)(embed|embeddings|wte|wpe|word_embeddings|embed_in|tok_embeddings|embed_tokens|shared)(\.|$)")


@dataclass
class _Slice:
    sources: list[Source]
    models: list[int]  # each source's model index
    parameters: dict
    base: int | None  # model index of this slice's base, when the method takes one
    where: str
    module_parameters: dict | None = None  # the `modules:` entry's parameters
    recipe_base: int | None = None  # the slice's or recipe's base_model, whether the method takes one or not


class RecipePlanner:
    """Resolve a recipe's models and build its layout (see the module docstring)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.method = table.get(recipe.merge_method)
        self.models: list[ModelDir] = []
        self.adapters: list[ModelDir | None] = []  # each model's LoRA adapter (mergekit's MODEL+LORA)
        self._index: dict[tuple[Path, Path | None], int] = {}
        file = recipe.where
        self._key = (lambda where, k="model": f"{file}: {where}.{k}") if recipe.path else (lambda where, k="model": where)
        self.base = self._model(recipe.base_model, f"{file}: base_model" if recipe.path else "--base") if recipe.base_model else None
        self.slices: list[_Slice] = []  # the `models` form: one slice; `slices`: the default module's
        self.modules: dict[str, list[_Slice]] | None = None  # the `modules` form
        if recipe.models is not None:
            self.slices = [self._models_slice(recipe.models, "models", None, adds_base_always=recipe.path is not None)]
        elif recipe.slices is not None:
            self.slices = [self._slice(sl, None) for sl in recipe.slices]
        else:
            self.modules = {}
            for name, module in recipe.modules.items():
                if module.models is not None:
                    group = [self._models_slice(module.models, module.where, module.parameters, adds_base_always=True)]
                else:
                    group = [self._slice(sl, module.parameters) for sl in module.slices]
                self.modules[name] = group
        first = self.all_slices()[0].models[0]
        self.donor = self.models[self.base if self.base is not None else first]
        self.tokenizer = self._tokenizer()
        self.vocabulary = self._vocabulary()
        self.chat_template = self.vocabulary.chat_template if self.vocabulary else self._chat_template()

    def all_slices(self) -> list[_Slice]:
        return self.slices + [sl for group in (self.modules or {}).values() for sl in group]

    # -- models ---------------------------------------------------------------------------------

    def _models_slice(self, models: list[Source], where: str, module_parameters, *, adds_base_always: bool) -> _Slice:
        indices = [self._model(s.model, self._key(s.where)) for s in models]
        self._no_duplicates(indices, models)
        sources = list(models)
        ignored = self.method.base is table.BasePolicy.IGNORED
        if self.base is not None and self.base not in indices and not (ignored and not adds_base_always):
            # mergekit adds the base as one more source (an ordinary input for methods that ignore bases;
            # `--base` with such a method on the command line stays ignored).
            sources.append(Source(model=self.recipe.base_model, where="base_model"))
            indices.append(self.base)
        return _Slice(sources, indices, {}, self._slice_base(self.base, indices, where), where, module_parameters, self.base)

    def _slice(self, sl, module_parameters) -> _Slice:
        indices = [self._model(s.model, self._key(s.where)) for s in sl.sources]
        self._no_duplicates(indices, sl.sources)
        base = self._model(sl.base_model, self._key(sl.where, "base_model")) if sl.base_model else self.base
        return _Slice(sl.sources, indices, sl.parameters, self._slice_base(base, indices, sl.where), sl.where,
                      module_parameters, base)

    def _model(self, ref: str, where: str) -> int:
        """The index of the model `ref` names (`MODEL` or mergekit's `MODEL+LORA`), resolved once."""
        model, adapter = resolve_reference(ref, where)
        key = (model.path.resolve(), adapter.path.resolve() if adapter else None)
        if key not in self._index:
            self._index[key] = len(self.models)
            self.models.append(model)
            self.adapters.append(adapter)
        return self._index[key]

    def inputs(self) -> list:
        """What the engine reads, model by model (see `reference_source`)."""
        return [reference_source(m, a) for m, a in zip(self.models, self.adapters)]

    def _no_duplicates(self, indices, sources):
        for i, index in enumerate(indices):
            if indices.index(index) != i:
                raise CheckpointError(f"{self.recipe.where}: {sources[i].where}.model: {sources[i].model} is listed twice in one merge")

    def _slice_base(self, base: int | None, indices: list[int], where: str) -> int | None:
        if base is None or self.method.base is table.BasePolicy.IGNORED:
            return None
        if base not in indices:
            raise CheckpointError(
                f"{self.recipe.where}: {where}: the base model {self.models[base].ref} is not among its sources (list it there)"
            )
        return base

    def _tokenizer(self) -> ModelDir | None:
        """The model whose tokenizer files are copied: the donor's, as mergekit, unless the recipe names a
        tokenizer source (then the output's vocabulary is built, `_vocabulary`)."""
        if self.recipe.tokenizer_source is None and self.recipe.tokenizer is None:
            return self.donor
        return None

    def _vocabulary(self):
        """The output vocabulary (`jaxmerge.recipes.tokenizer`) when the recipe names a tokenizer source
        (mergekit builds the tokenizer then, even from one model's), else None; built now, before any
        tensor is read, so a bad token or source stops the merge first."""
        recipe = self.recipe
        if self.tokenizer is not None:
            return None
        from jaxmerge.recipes.tokenizer import build_vocabulary  # noqa: PLC0415 - needs transformers

        config = recipe.tokenizer or {"source": recipe.tokenizer_source, "tokens": {}, "pad_to_multiple_of": None}
        source = config["source"]
        if source == "base" and self.base is None:
            raise CheckpointError(f"{recipe.where}: tokenizer_source: base needs a base_model")
        if source not in ("union", "base"):
            source = resolve_model(source, f"{recipe.where}: tokenizer.source").path
        return build_vocabulary(
            [m.path for m in self.models], source=source, base=self.base, tokens=config["tokens"],
            pad_to_multiple_of=config["pad_to_multiple_of"], names=[m.ref for m in self.models],
            chat_template=self._chat_template(), where=recipe.where,
            source_key="tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source",
        )

    def _chat_template(self) -> str | None:
        if self.recipe.chat_template is None:
            return None
        from jaxmerge.recipes.tokenizer import resolve_chat_template  # noqa: PLC0415

        return resolve_chat_template(self.recipe.chat_template, [m.path for m in self.models],
                                     where=f"{self.recipe.where}: chat_template")

    # -- layout ---------------------------------------------------------------------------------

    def layout(self, checkpoints: list[TensorSource]) -> list[OutputTensor]:
        """The output tensors (a `plan_merge` layout), checked against the opened checkpoints."""
        self._checkpoints = checkpoints
        self._archs: dict[int, Architecture] = {}
        self.output_layers: dict[str | None, list[tuple[ModelDir, int]]] = {}
        if self.recipe.models is not None:
            return self._models_layout(self.slices[0])
        if self.modules is None:
            arch = self.arch(self.slices[0].models[0], self.slices[0].sources[0].where)
            if len(arch.stacks) != 1:
                found = ", ".join(m.name for m in arch.modules if m.stack) or "none"
                raise CheckpointError(
                    f"{self.recipe.where}: slices need a model with one layer stack; "
                    f"{self.models[self.slices[0].models[0]].ref} has {len(arch.stacks)} ({found}): "
                    "give slices per stack under modules: (as mergekit requires)"
                )
            return self._module_layout(next(m.name for m in arch.modules if m.stack), self.slices, arch)
        ref = self.all_slices()[0]
        arch = self.arch(ref.models[0], ref.sources[0].where)
        out = []
        for module in arch.modules:
            if module.name not in self.modules:
                members = [n for n in checkpoints[ref.models[0]].tensors if arch.locate(n)[0] is module]
                if members:
                    warnings.warn(
                        f"{self.recipe.where}: modules: no entry for module {module.name!r} of "
                        f"{self.models[ref.models[0]].ref}; its {len(members)} tensors are left out, as mergekit does",
                        RecipeWarning, stacklevel=2,
                    )
                continue
            out += self._module_layout(module.name, self.modules[module.name], arch)
        for name in self.modules:
            arch.module(name, f"{self.recipe.where}: modules.{name}")
        return out

    def arch(self, index: int, where: str) -> Architecture:
        if index not in self._archs:
            self._archs[index] = architecture(
                self._checkpoints[index].tensors, self.models[index].config(), f"{self.recipe.where}: {where}"
            )
        return self._archs[index]

    def _models_layout(self, sl: _Slice) -> list[OutputTensor]:
        check_same_tensors([self._checkpoints[i] for i in sl.models])
        archs = [self.arch(i, s.where) for i, s in zip(sl.models, sl.sources)]
        if uses_gradients(self.recipe):
            counts = {tuple(s.count for s in a.stacks) for a in archs}
            if len(counts) > 1:
                raise CheckpointError(f"{self.recipe.where}: models have different numbers of layers: {sorted(counts)}")
            if not archs[0].stacks:
                raise CheckpointError(
                    f"{self.recipe.where}: {sl.sources[0].where}: {self.models[sl.models[0]].ref} has no numbered layers "
                    "(its tensor names give none), so gradients cannot apply"
                )
        out = []
        for name in self._checkpoints[sl.models[0]].tensors:
            module, index, _ = archs[0].locate(name)
            t = 0.0
            if index is not None:
                count = module.stack.count
                t = index / (count - 1) if count > 1 else 1.0
            out.append(self._tensor(sl, name, [name] * len(sl.models), t))
        return out

    def _module_layout(self, module_name: str, slices: list[_Slice], ref_arch: Architecture) -> list[OutputTensor]:
        """One module's tensors: its loose tensors before the layers, its slices' layers, the loose ones after."""
        file = self.recipe.where
        module = ref_arch.module(module_name, f"{file}: modules.{module_name}")
        first, last = slices[0], slices[-1]
        ref_index = first.models[0]
        loose = [n for n in self._checkpoints[ref_index].tensors if ref_arch.locate(n)[0] is module and ref_arch.locate(n)[1] is None]
        if module.stack is None:
            if len(slices) > 1 or any(s.layer_range is not None for s in first.sources):
                raise CheckpointError(f"{file}: modules.{module_name} has no layers; give it models, not slices")
            return [self._tensor(first, name, [name] * len(first.models), 0.0) for name in loose]
        stack = module.stack
        lengths = []
        for sl in slices:
            spans = []
            for index, src in zip(sl.models, sl.sources):
                theirs = self.arch(index, src.where).module(module_name, f"{file}: {src.where}").stack
                if theirs is None:
                    raise CheckpointError(f"{file}: {src.where}: {src.model} has no layers in module {module_name}")
                start, end = src.layer_range or (0, theirs.count)
                if end > theirs.count:
                    raise CheckpointError(
                        f"{file}: {src.where}.layer_range [{start}, {end}] goes beyond {src.model}'s {theirs.count} layers"
                        + (f" in module {module_name}" if module_name != "default" else "")
                    )
                spans.append(end - start)
            if len(set(spans)) > 1:
                raise CheckpointError(f"{file}: {sl.where}: every source must span as many layers, got {spans}")
            lengths.append(spans[0])
        out = [self._tensor(first, name, [name] * len(first.models), 0.0) for name in loose if _PRE.search(name)]
        layers = self.output_layers.setdefault(stack.config_key, [])
        for sl, n in zip(slices, lengths):
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                layer = len(layers)
                rests = None
                inputs = []
                for index, src in zip(sl.models, sl.sources):
                    scheme = self.arch(index, src.where).module(module_name, src.where).stack
                    at = (src.layer_range or (0, 0))[0] + offset
                    theirs = [s[1] for s in map(scheme.split, self._checkpoints[index].tensors) if s and s[0] == at]
                    if rests is None:
                        rests, ref = theirs, (index, at)
                    elif set(theirs) != set(rests):
                        extra = sorted(set(rests) ^ set(theirs))[0]
                        missing_in = self.models[index] if extra in rests else self.models[ref[0]]
                        raise CheckpointError(
                            f"{missing_in.path}: layer {at if extra in rests else ref[1]} has no tensor {extra} ({sl.where})"
                        )
                    inputs.append((scheme, at))
                for rest in rests:
                    out.append(self._tensor(sl, stack.name(layer, rest), [s.name(at, rest) for s, at in inputs], t))
                layers.append((self.models[sl.models[0]], (sl.sources[0].layer_range or (0, 0))[0] + offset))
        out += [self._tensor(last, name, [name] * len(last.models), 0.0) for name in loose if not _PRE.search(name)]
        return out

    def _tensor(self, sl: _Slice, out_name: str, in_names: list[str], t: float) -> OutputTensor:
        """One output tensor: its sources (the base first) and its resolved parameters."""
        order = list(range(len(sl.models)))
        has_base = sl.base is not None
        if has_base:
            b = sl.models.index(sl.base)
            order = [b] + [i for i in order if i != b]
        shared_scopes = [sl.parameters, *([sl.module_parameters] if sl.module_parameters else []), self.recipe.parameters]
        params = {}
        for p in self.method.params:
            if p.scope is table.Scope.SHARED:
                value = resolve_setting(p.name, shared_scopes, out_name, t)
                if value is not None:
                    params[p.name] = value
                continue
            values = []
            for position, i in enumerate(order):
                if has_base and position == 0 and p.scope is table.Scope.PER_MODEL:
                    continue  # the base takes no per-model parameters
                own = [s.parameters for s, m in zip(sl.sources, sl.models) if m == sl.models[i]]
                values.append(resolve_setting(p.name, [*own, *shared_scopes], in_names[i], t))
            if any(v is not None for v in values):
                params[p.name] = values
        sources = tuple((sl.models[i], in_names[i]) for i in order)
        if self.vocabulary is not None and self._has_vocabulary_axis(sl.models[order[0]], in_names[order[0]]):
            # Embedding and LM-head rows re-indexed to the output vocabulary, as mergekit's PermutedVocabulary.
            # mergekit's missing rows prefer the base model's row, whatever the method does with bases.
            group = self.vocabulary.plan([sl.models[i] for i in order], sl.recipe_base)
            rest = self._checkpoints[sl.models[order[0]]].tensors[in_names[order[0]]].shape[1:]
            return OutputTensor(out_name, sources, has_base=has_base, params=params,
                                prepare=functools.partial(group.align, vocabulary_axis=0),
                                shape=(self.vocabulary.size, *rest))
        return OutputTensor(out_name, sources, has_base=has_base, params=params)

    def _has_vocabulary_axis(self, index: int, name: str) -> bool:
        """An input or output embedding: named so, with one row per token of its model's vocabulary."""
        if not _VOCABULARY.search(name):
            return False
        from jaxmerge.recipes.tokenizer import config_vocab_size  # noqa: PLC0415

        shape = self._checkpoints[index].tensors[name].shape
        size = config_vocab_size(self.models[index].path) if self.models[index].directory else None
        return len(shape) == 2 and (size is None or shape[0] == size)

    # -- output files ---------------------------------------------------------------------------

    def finish(self, out: Path, plan: MergePlan) -> None:
        """Write config.json, generation_config.json, tokenizer, model card and recipe beside the weights."""
        recipe = self.recipe
        codes = [t.dtype for t in plan.tensors if t.dtype in ("F32", "F16", "BF16", "F64")]
        dtype = recipe.out_dtype or recipe.dtype
        code = DTYPE_NAMES[dtype] if dtype else (max(set(codes), key=codes.count) if codes else None)
        text = recipe.text if recipe.text is not None else recipe.to_yaml()
        card = model_card(
            method=recipe.merge_method, paper=self.method.paper, name=Path(plan.output).name,
            base=self.models[self.base] if self.base is not None else None,
            models=[self.models[i] for i in dict.fromkeys(m for sl in self.all_slices() for m in sl.models)],
            recipe_text=text,
        )
        write_model_files(
            out, donor=self.donor, tokenizer=self.tokenizer if self.vocabulary is None else None, dtype_code=code,
            layers=self.output_layers, card=card, recipe_text=text,
            vocab_size=self.vocabulary.size if self.vocabulary is not None else None,
        )
        if self.vocabulary is not None:
            self.vocabulary.save(out)
        elif self.chat_template is not None and self.tokenizer is not None:
            from jaxmerge.recipes.tokenizer import reserialize_tokenizer  # noqa: PLC0415

            reserialize_tokenizer(self.tokenizer.path, out, self.chat_template)

    def record(self) -> dict:
        """Entries of jaxmerge_recipe.json beyond the plan's own."""
        recipe = self.recipe
        return {
            "inputs": [m.ref for m in self.models],
            "recipe_file": str(recipe.path.resolve()) if recipe.path else None,
            "recipe": recipe.text if recipe.text is not None else recipe.to_yaml(),
            "parameters": recipe.parameters,
        }


def resolve_reference(ref: str, where: str) -> tuple[ModelDir, ModelDir | None]:
    """The model and LoRA adapter a recipe's model reference names (`MODEL` or mergekit's `MODEL+LORA`).

    Args:
      ref: the reference as written.
      where: the recipe key, for errors ("recipe.yml: models[1].model").

    Returns:
      (the model, its adapter or None), resolved as `resolve_model` resolves paths and Hub ids.

    Raises:
      CheckpointError: one line: no such model, or an adapter given without its model.
    """
    try:
        model_ref, lora_ref = split_lora_reference(ref)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    model = resolve_model(model_ref, where)
    if (model.path / "adapter_config.json").is_file() and not (model.path / "config.json").is_file():
        raise CheckpointError(
            f"{where}: {model_ref} is a LoRA adapter; give it with its model (model: BASE+{model_ref}), "
            "or merge adapters on their own with flags (jaxmerge merge a/ b/ --method ties --output out/)"
        )
    adapter = resolve_model(lora_ref, f"{where} (its LoRA adapter)") if lora_ref else None
    return model, adapter


def reference_source(model: ModelDir, adapter: ModelDir | None):
    """What the engine reads for a resolved reference: the model's path, or the model with its LoRA adapter
    folded in (in the dtype mergekit loads it in; checked against the model now, before any tensor is read)."""
    return model.path if adapter is None else LoraFolded(model.path, adapter.path, dtype=mergekit_load_dtype(model.path))


def plan_recipe(recipe: Recipe, output: str | os.PathLike, *, seed: int | None = None, max_shard_size: str | None = None):
    """Plan a recipe's merge (nothing written): returns (RecipePlanner, MergePlan)."""
    planner = RecipePlanner(recipe)
    plan, _, _ = plan_merge(
        planner.inputs(), output, method=recipe.merge_method,
        seed=recipe.seed if seed is None else seed, max_shard_size=max_shard_size or recipe.max_shard_size,
        layout=planner.layout, dtype=recipe.dtype, out_dtype=recipe.out_dtype,
    )
    return planner, plan


def merge_recipe(
    recipe: Recipe,
    output: str | os.PathLike,
    *,
    seed: int | None = None,
    max_shard_size: str | None = None,
    force: bool = False,
    progress: bool = True,
    mesh=None,
    allow_nonfinite: bool = False,
    processes=None,
) -> MergePlan:
    """Merge as the recipe says into `output` (weights, config.json, tokenizer, README.md, mergekit_config.yml).

    Args:
      recipe: from `load_recipe` or `recipe_from_flags`.
      output: the output directory (written atomically).
      seed, max_shard_size: override the recipe's `jaxmerge:` settings.
      force, progress, mesh, allow_nonfinite, processes: as `merge_checkpoints`.

    Returns:
      The executed plan.
    """
    planner = RecipePlanner(recipe)
    return merge_checkpoints(
        planner.inputs(), output, method=recipe.merge_method,
        seed=recipe.seed if seed is None else seed, max_shard_size=max_shard_size or recipe.max_shard_size,
        layout=planner.layout, dtype=recipe.dtype, out_dtype=recipe.out_dtype, force=force, progress=progress,
        mesh=mesh, allow_nonfinite=allow_nonfinite, finish=planner.finish, record=planner.record(),
        processes=processes,
    )
