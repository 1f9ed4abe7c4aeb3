"""Turn a recipe (`jaxmerge.io.recipe`) into a checkpoint merge: which tensors feed which, with which parameters.

This follows mergekit 0.1.5's planner (mergekit/plan.py): the `models` form is
one slice spanning every layer of every model, the base model added as one more
source when it is not listed; a slice's layers are merged source by source
(layer `start + i` of each), numbered on from the previous slice in the output;
tensors outside the layers come from the first slice's sources (embeddings) or
the last slice's (final norm, LM head). Each tensor's parameters are resolved
by `recipe.evaluate_setting` at `t = i / (n - 1)` for the i-th of a slice's n
layers (t = 1 when n = 1) and t = 0 outside the layers; filters see the
output name for shared parameters and the input's name for per-model ones.
The merge itself is `jaxmerge.io.checkpoints.merge_checkpoints` with the layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from jaxmerge.io.checkpoints import DTYPE_NAMES, MergePlan, OutputTensor, check_same_tensors, merge_checkpoints, plan_merge
from jaxmerge.io.model_dir import (
    LayerScheme,
    ModelDir,
    check_tokenizer_source,
    layer_scheme,
    model_card,
    resolve_model,
    write_model_files,
)
from jaxmerge.io.recipe import Recipe, Source, resolve_setting, uses_gradients
from jaxmerge.io.safetensors_io import Checkpoint, CheckpointError
from jaxmerge.methods import _table as table

# Tensors before the first layer (from the first slice's sources); the others outside the layers come after.
_PRE = re.compile(r"(^|\.)(embed|embeddings|wte|wpe|word_embeddings|embed_in|tok_embeddings|embed_tokens)(\.|$)")


@dataclass
class _Slice:
    sources: list[Source]
    models: list[int]  # each source's model index
    parameters: dict
    base: int | None  # model index of this slice's base, when the method takes one
    where: str


class RecipePlanner:
    """Resolve a recipe's models and build its layout (see the module docstring)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.method = table.get(recipe.merge_method)
        self.models: list[ModelDir] = []
        self._index: dict[Path, int] = {}
        file = recipe.where
        key = (lambda where, k="model": f"{file}: {where}.{k}") if recipe.path else (lambda where, k="model": where)
        self.base = self._model(recipe.base_model, f"{file}: base_model" if recipe.path else "--base") if recipe.base_model else None
        self.slices: list[_Slice] = []
        if recipe.models is not None:
            indices = [self._model(s.model, key(s.where)) for s in recipe.models]
            self._no_duplicates(indices, recipe.models, file)
            sources = list(recipe.models)
            ignored = self.method.base is table.BasePolicy.IGNORED
            if self.base is not None and self.base not in indices and not (ignored and recipe.path is None):
                # mergekit adds the base as one more source (an ordinary input for methods that ignore bases;
                # `--base` with such a method on the command line stays ignored).
                sources.append(Source(model=recipe.base_model, where="base_model"))
                indices.append(self.base)
            self.slices.append(_Slice(sources, indices, {}, self._slice_base(self.base, indices, "models"), "models"))
        else:
            for sl in recipe.slices:
                indices = [self._model(s.model, key(s.where)) for s in sl.sources]
                self._no_duplicates(indices, sl.sources, file)
                base = self._model(sl.base_model, key(sl.where, "base_model")) if sl.base_model else self.base
                self.slices.append(_Slice(sl.sources, indices, sl.parameters, self._slice_base(base, indices, sl.where), sl.where))
        first = self.slices[0].models[0]
        self.donor = self.models[self.base if self.base is not None else first]
        self.tokenizer = self._tokenizer()

    # -- models ---------------------------------------------------------------------------------

    def _model(self, ref: str, where: str) -> int:
        model = resolve_model(ref, where)
        if self.recipe.path and (model.path / "adapter_config.json").is_file() and not (model.path / "config.json").is_file():
            raise CheckpointError(f"{where}: {ref} is a LoRA adapter; adapters are merged with flags (jaxmerge merge a/ b/ --method ties --output out/)")
        key = model.path.resolve()
        if key not in self._index:
            self._index[key] = len(self.models)
            self.models.append(model)
        return self._index[key]

    def _no_duplicates(self, indices, sources, file):
        for i, index in enumerate(indices):
            if indices.index(index) != i:
                raise CheckpointError(f"{file}: {sources[i].where}.model: {sources[i].model} is listed twice in one merge")

    def _slice_base(self, base: int | None, indices: list[int], where: str) -> int | None:
        if base is None or self.method.base is table.BasePolicy.IGNORED:
            return None
        if base not in indices:
            raise CheckpointError(
                f"{self.recipe.where}: {where}: the base model {self.models[base].ref} is not among its sources (list it there)"
            )
        return base

    def _tokenizer(self) -> ModelDir | None:
        source = self.recipe.tokenizer_source
        where = f"{self.recipe.where}: tokenizer_source"
        if source is None:  # mergekit copies the donor's tokenizer
            return self.donor
        if source == "base":
            if self.base is None:
                raise CheckpointError(f"{where}: base needs a base_model")
            chosen = self.models[self.base]
        else:
            chosen = resolve_model(source, where)
        check_tokenizer_source(chosen, self.models, where)
        return chosen

    # -- layout ---------------------------------------------------------------------------------

    def layout(self, checkpoints: list[Checkpoint]) -> list[OutputTensor]:
        """The output tensors (a `plan_merge` layout), checked against the opened checkpoints."""
        self._checkpoints = checkpoints
        self._schemes: dict[int, LayerScheme | None] = {}
        self.output_layers: list[tuple[ModelDir, int]] | None = None
        if self.recipe.models is not None:
            return self._models_layout(self.slices[0])
        return self._slices_layout()

    def scheme(self, index: int, where: str, required: bool) -> LayerScheme | None:
        if index not in self._schemes:
            model = self.models[index]
            self._schemes[index] = layer_scheme(self._checkpoints[index].tensors, model.config(), f"{self.recipe.where}: {where}")
        if required and self._schemes[index] is None:
            raise CheckpointError(
                f"{self.recipe.where}: {where}: {self.models[index].ref} has no numbered layers "
                "(its tensor names and config.json give none), so layer_range and gradients cannot apply"
            )
        return self._schemes[index]

    def _models_layout(self, sl: _Slice) -> list[OutputTensor]:
        check_same_tensors([self._checkpoints[i] for i in sl.models])
        gradients = uses_gradients(self.recipe)
        schemes = [self.scheme(i, s.where, gradients) for i, s in zip(sl.models, sl.sources)]
        counts = {s.count for s in schemes if s is not None}
        if gradients and len(counts) > 1:
            raise CheckpointError(f"{self.recipe.where}: models have different numbers of layers: {sorted(counts)}")
        scheme = schemes[0]
        out = []
        for name in self._checkpoints[sl.models[0]].tensors:
            t = 0.0
            split = scheme.split(name) if scheme is not None else None
            if split is not None:
                t = split[0] / (scheme.count - 1) if scheme.count > 1 else 1.0
            out.append(self._tensor(sl, name, [name] * len(sl.models), t))
        return out

    def _slices_layout(self) -> list[OutputTensor]:
        file = self.recipe.where
        lengths = []
        for sl in self.slices:
            spans = []
            for index, src in zip(sl.models, sl.sources):
                scheme = self.scheme(index, src.where, True)
                start, end = src.layer_range
                if end > scheme.count:
                    raise CheckpointError(
                        f"{file}: {src.where}.layer_range [{start}, {end}] goes beyond {src.model}'s {scheme.count} layers"
                    )
                spans.append(end - start)
            if len(set(spans)) > 1:
                raise CheckpointError(f"{file}: {sl.where}: every source must span as many layers, got {spans}")
            lengths.append(spans[0])
        first, last = self.slices[0], self.slices[-1]
        ref_index = first.models[0]
        ref_scheme = self.scheme(ref_index, first.sources[0].where, True)
        outside = [n for n in self._checkpoints[ref_index].tensors if ref_scheme.split(n) is None]
        pre = [n for n in outside if _PRE.search(n)]
        post = [n for n in outside if not _PRE.search(n)]
        out = [self._tensor(first, name, [name] * len(first.models), 0.0) for name in pre]
        self.output_layers = []
        for sl, n in zip(self.slices, lengths):
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                layer = len(self.output_layers)
                rests = None
                inputs = []
                for index, src in zip(sl.models, sl.sources):
                    scheme = self._schemes[index]
                    at = src.layer_range[0] + offset
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
                    out.append(self._tensor(sl, ref_scheme.name(layer, rest), [s.name(at, rest) for s, at in inputs], t))
                self.output_layers.append((self.models[sl.models[0]], sl.sources[0].layer_range[0] + offset))
        out += [self._tensor(last, name, [name] * len(last.models), 0.0) for name in post]
        return out

    def _tensor(self, sl: _Slice, out_name: str, in_names: list[str], t: float) -> OutputTensor:
        """One output tensor: its sources (the base first) and its resolved parameters."""
        order = list(range(len(sl.models)))
        has_base = sl.base is not None
        if has_base:
            b = sl.models.index(sl.base)
            order = [b] + [i for i in order if i != b]
        params = {}
        for p in self.method.params:
            if p.scope is table.Scope.SHARED:
                value = resolve_setting(p.name, [sl.parameters, self.recipe.parameters], out_name, t)
                if value is not None:
                    params[p.name] = value
                continue
            values = []
            for position, i in enumerate(order):
                if has_base and position == 0 and p.scope is table.Scope.PER_MODEL:
                    continue  # the base takes no per-model parameters
                own = [s.parameters for s, m in zip(sl.sources, sl.models) if m == sl.models[i]]
                values.append(resolve_setting(p.name, [*own, sl.parameters, self.recipe.parameters], in_names[i], t))
            if any(v is not None for v in values):
                params[p.name] = values
        sources = tuple((sl.models[i], in_names[i]) for i in order)
        return OutputTensor(out_name, sources, has_base=has_base, params=params)

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
            models=[self.models[i] for i in dict.fromkeys(m for sl in self.slices for m in sl.models)],
            recipe_text=text,
        )
        write_model_files(
            out, donor=self.donor, tokenizer=self.tokenizer, dtype_code=code,
            layers=self.output_layers, card=card, recipe_text=text,
        )

    def record(self) -> dict:
        """Entries of jaxmerge_recipe.json beyond the plan's own."""
        recipe = self.recipe
        return {
            "inputs": [m.ref for m in self.models],
            "recipe_file": str(recipe.path.resolve()) if recipe.path else None,
            "recipe": recipe.text if recipe.text is not None else recipe.to_yaml(),
            "parameters": recipe.parameters,
        }


def plan_recipe(recipe: Recipe, output: str | os.PathLike, *, seed: int | None = None, max_shard_size: str | None = None):
    """Plan a recipe's merge (nothing written): returns (RecipePlanner, MergePlan)."""
    planner = RecipePlanner(recipe)
    plan, _, _ = plan_merge(
        [m.path for m in planner.models], output, method=recipe.merge_method,
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
        [m.path for m in planner.models], output, method=recipe.merge_method,
        seed=recipe.seed if seed is None else seed, max_shard_size=max_shard_size or recipe.max_shard_size,
        layout=planner.layout, dtype=recipe.dtype, out_dtype=recipe.out_dtype, force=force, progress=progress,
        mesh=mesh, allow_nonfinite=allow_nonfinite, finish=planner.finish, record=planner.record(),
        processes=processes,
    )
