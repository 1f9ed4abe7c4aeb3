"""Recipes and command-line merges whose models are Orbax checkpoints.

A recipe (`jaxmerge.recipes.schema`, mergekit's schema) or `jaxmerge merge a/ b/
--method ...` whose models are Orbax checkpoint directories is merged by
`jaxmerge.engine.orbax.merge_orbax`, leaf by leaf. The `models` form maps onto it
directly; each leaf's parameters are resolved as mergekit resolves a tensor's,
with the leaf path (`['params']['dense']['kernel']`) as the tensor name that
`filter`s match:

* shared parameters from `parameters`, per-model ones from each model's own
  `parameters` first;
* a model that is also the `base_model` is the base (its per-model parameters
  apply to the base's slot of per-input parameters);
* for a method that ignores bases, a `base_model` not among the models becomes
  one more input, as in mergekit.

What needs a Hugging Face model (layer numbering) is refused by name: `slices`,
`modules`, gradients (a list as a value), `dtype`/`out_dtype`, `tokenizer_source`,
`tokenizer`, `chat_template`, and Hub ids. Orbax and safetensors models cannot be mixed in one merge.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxmerge.engine.orbax import OrbaxPlan, merge_orbax, plan_orbax
from jaxmerge.formats.orbax import is_orbax_checkpoint
from jaxmerge.recipes.schema import Recipe, Source, resolve_setting, uses_gradients
from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.methods import _table as table


def uses_orbax(recipe: Recipe) -> bool:
    """Some model (or the base) of `recipe` is an Orbax checkpoint directory."""
    refs = [s.model for s in recipe.sources()] + ([recipe.base_model] if recipe.base_model else [])
    return any(is_orbax_checkpoint(Path(ref).expanduser()) for ref in refs)


class _OrbaxRecipe:
    """A recipe's inputs, base and per-leaf parameters for `merge_orbax`."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.method = table.get(recipe.merge_method)
        file = recipe.where
        for key in ("slices", "modules"):
            if getattr(recipe, key) is not None:
                raise CheckpointError(f"{file}: {key}: Orbax checkpoints have no layer stacks; merge them with models")
        for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
            if getattr(recipe, key) is not None:
                why = "leaves keep their dtypes" if "dtype" in key else "Orbax checkpoints carry no tokenizer"
                raise CheckpointError(f"{file}: {key}: not supported for Orbax checkpoints ({why})")
        if uses_gradients(recipe):
            raise CheckpointError(f"{file}: a gradient (a list of values) needs numbered layers; Orbax checkpoints have none")
        where = (lambda s: f"{file}: {s.where}.model") if recipe.path else (lambda s: "input")
        for source in recipe.models:
            self._check_orbax(source.model, where(source))
        base = recipe.base_model
        if base is not None:
            self._check_orbax(base, f"{file}: base_model" if recipe.path else "--base")
        sources = list(recipe.models)
        same = lambda a, b: Path(a).expanduser().resolve() == Path(b).expanduser().resolve()  # noqa: E731
        self.base_source = None
        ignored = self.method.base is table.BasePolicy.IGNORED
        if base is not None and not ignored:
            listed = [s for s in sources if same(s.model, base)]
            self.base_source = listed[0] if listed else None
            sources = [s for s in sources if not same(s.model, base)]
            self.base = base
        else:
            self.base = None
            if base is not None and recipe.path is not None and not any(same(s.model, base) for s in sources):
                sources.append(Source(model=base, where="base_model"))  # mergekit: one more input
        seen: dict[Path, str] = {}
        for s in sources:
            resolved = Path(s.model).expanduser().resolve()
            if resolved in seen:
                raise CheckpointError(f"{file}: {s.where}.model: {s.model} is listed twice in one merge")
            seen[resolved] = s.where
        if not sources:
            raise CheckpointError(f"{file}: models: no model left to merge besides the base")
        self.sources = sources

    @staticmethod
    def _check_orbax(ref: str, where: str) -> None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise CheckpointError(f"{where}: {ref}: no such directory (Orbax checkpoints are local directories)")
        if not is_orbax_checkpoint(path):
            raise CheckpointError(
                f"{where}: {ref} is not an Orbax checkpoint, and Orbax and safetensors models cannot be mixed in one merge"
            )

    def params_for(self, leaf_path: str) -> dict:
        """Every parameter of the method for one leaf (None where no setting applies)."""
        recipe, params = self.recipe, {}
        has_base = self.base is not None
        for p in self.method.params:
            if p.scope is table.Scope.SHARED:
                value = resolve_setting(p.name, [recipe.parameters], leaf_path, 0.0)
                if value is not None:
                    params[p.name] = value
                continue
            slots = list(self.sources)
            if has_base and p.scope is table.Scope.PER_INPUT:
                slots = [self.base_source] + slots  # the base's slot comes first
            values = [
                resolve_setting(p.name, [*([s.parameters] if s is not None else []), recipe.parameters], leaf_path, 0.0)
                for s in slots
            ]
            if any(v is not None for v in values):
                params[p.name] = values
        return params

    def kwargs(self, seed: int | None) -> dict:
        return dict(
            inputs=[s.model for s in self.sources], method=self.recipe.merge_method, base=self.base,
            seed=self.recipe.seed if seed is None else seed, params_for=self.params_for, **self.params_for(""),
        )


def plan_orbax_recipe(recipe: Recipe, output: str | os.PathLike, *, seed: int | None = None) -> OrbaxPlan:
    """Check an Orbax recipe and plan its merge (nothing read but metadata, nothing written)."""
    plan, _, _ = plan_orbax(output=output, **_OrbaxRecipe(recipe).kwargs(seed))
    return plan


def merge_orbax_recipe(
    recipe: Recipe,
    output: str | os.PathLike,
    *,
    seed: int | None = None,
    force: bool = False,
    progress: bool = True,
    mesh=None,
    allow_nonfinite: bool = False,
) -> OrbaxPlan:
    """Merge a recipe whose models are Orbax checkpoints into the Orbax checkpoint `output`.

    Args:
      recipe: from `load_recipe` or `recipe_from_flags`.
      output: the Orbax checkpoint directory to create (atomically).
      seed: overrides the recipe's `jaxmerge.seed`.
      force, progress, mesh, allow_nonfinite: as `merge_orbax`.

    Returns:
      The executed plan.

    Raises:
      CheckpointError: slices, gradients, dtype settings, a non-Orbax model;
        and every error of `merge_orbax`.
    """
    return merge_orbax(
        output=output, force=force, progress=progress, mesh=mesh, allow_nonfinite=allow_nonfinite,
        **_OrbaxRecipe(recipe).kwargs(seed),
    )
