"""`jaxmerge multi`: mergekit-multi's files of several recipes, merged in dependency order.

The file format is mergekit 0.1.5's `mergekit-multi` (mergekit/scripts/multimerge.py),
unchanged: YAML documents separated by `---`, each an ordinary recipe plus a
`name`. A merge named `A` is written to `INTERMEDIATE_DIR/A`; at most one
document may leave out `name`: it is written to `--out-path`. Wherever a recipe
names a model (`models[].model`, `base_model`, slice sources and bases,
`tokenizer_source`, `tokenizer:` sources), a reference whose model part (before
`@revision` and `+LORA`) is exactly a merge's name means that merge's output:
it is rewritten to `os.path.join(INTERMEDIATE_DIR, name)`, its `+LORA` kept
(mergekit's `patched_config`). Names are matched before paths, so a merge
name shadows a directory or Hub id spelled the same; any other reference is a
path or Hub id, as in a single recipe. Documents may come in any order; the
merges run in dependency order (each merge's inputs first, then file order).

Beyond mergekit-multi, a document may be a mergekit-moe configuration (it has
`experts` and no `merge_method`; `jaxmerge.tools.moe`): its `source_model`s may
name merges of the file, so a mixture's experts can themselves be merges.

A merge whose output is complete is skipped (mergekit's `MergeModelTask.execute`
with `--lazy`, the default): complete means `config.json` and one of
`model.safetensors`, `pytorch_model.bin` or their `.index.json` exist in it.
`--force` (or mergekit's `--no-lazy`) reruns every merge, replacing its output.

Before anything is written, the whole file is checked: every document is parsed
as a recipe, names are unique, references form no cycle, each merge's output is
either complete or absent, and every reference that is not a merge of the file
is resolved (an unknown name is a path that does not exist); merges whose inputs
all exist already are planned in full. A merge that fails later stops the run;
the merges before it stay in place.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.recipes.schema import Recipe, RecipeWarning, parse_recipe, read_yaml
from jaxmerge.tools.moe.config import MoeConfig, check_config, parse_moe_config

# mergekit/scripts/multimerge.py: a merge is complete when config.json and one of these exist.
MODEL_CHECK_FILENAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# Recipe keys whose string values are model references (mergekit patches every string that parses as one;
# these are the places a recipe holds models). Values under the skipped keys are never references.
_REF_KEYS = ("model", "base_model", "tokenizer_source", "source", "source_model")
_SKIPPED_KEYS = ("parameters", "jaxmerge", "chat_template", "merge_method", "dtype", "out_dtype")


class MultiError(CheckpointError):
    """A multi-merge file or one of its merges failed; the message is one line naming the merge."""


@dataclass
class Stage:
    """One merge of the file."""

    name: str | None  # None: the unnamed merge (written to --out-path)
    where: str  # "multi.yml: merges[A]"
    output: str
    recipe: Recipe | MoeConfig  # a MoeConfig for a mergekit-moe document (beyond mergekit-multi)
    needs: list[str] = field(default_factory=list)  # names of the merges it reads, in order
    refs: list[tuple[str, str, str | None]] = field(default_factory=list)  # (key, reference, merge name or None)


def is_complete(directory: str | os.PathLike) -> bool:
    """mergekit-multi's test that a merge is done: config.json and a weights file or index in `directory`."""
    d = Path(directory)
    return (d / "config.json").exists() and any((d / name).exists() for name in MODEL_CHECK_FILENAMES)


def _merge_part(ref: str) -> tuple[str, str | None, str | None] | None:
    """(model path, revision, LoRA) as mergekit's ModelReference parses `ref`; None when it does not parse."""
    chunks = ref.split("+")
    if len(chunks) > 2 or chunks[0].count("@") > 1:
        return None
    path, _, revision = chunks[0].partition("@")
    return path, revision or None, chunks[1] if len(chunks) == 2 else None


def _rewrite(doc: dict, names: set[str], intermediate_dir: str, where: str, strict: bool):
    """Replace references to merges of the file with their output directories.

    Returns:
      (rewritten document, [(key, reference as rewritten, merge name or None)]).
    """
    refs: list[tuple[str, str, str | None]] = []

    def visit(value: str, at: str) -> str:
        if at in ("tokenizer_source", "tokenizer.source") and value in ("union", "base") and value not in names:
            return value  # mergekit's tokenizer modes, not models
        parts = _merge_part(value)
        if parts is None or parts[0] not in names:
            refs.append((at, value, None))
            return value
        path, revision, lora = parts
        if revision is not None:
            message = f"{where}: {at}: {value}: a merge of this file has no revisions; @{revision} is ignored, as mergekit ignores it"
            if strict:
                raise MultiError(message.replace(", as mergekit ignores it", " (--strict refuses it)"))
            warnings.warn(message, RecipeWarning, stacklevel=2)
        out = os.path.join(intermediate_dir, path) + (f"+{lora}" if lora is not None else "")
        refs.append((at, out, path))
        return out

    def walk(value: Any, at: str) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                here = f"{at}.{key}" if at else str(key)
                if key in _SKIPPED_KEYS:
                    out[key] = item
                elif key in _REF_KEYS and isinstance(item, str):
                    out[key] = visit(item, here)
                else:
                    out[key] = walk(item, here)
            return out
        if isinstance(value, list):
            return [walk(item, f"{at}[{i}]") for i, item in enumerate(value)]
        return value

    return walk(doc, ""), refs


def load_multi(path: str | os.PathLike, *, intermediate_dir: str, out_path: str | None = None, strict: bool = False) -> list[Stage]:
    """Read and check a mergekit-multi file: its merges in the order they run.

    Args:
      path: the YAML file (documents separated by `---`, each a recipe with a `name`).
      intermediate_dir: where merge `NAME` is written (`INTERMEDIATE_DIR/NAME`).
      out_path: where the one unnamed merge is written (required when there is one).
      strict: refuse what mergekit accepts and ignores (see `parse_recipe`).

    Returns:
      The stages, each merge after the merges it reads.

    Raises:
      MultiError, CheckpointError, MethodError: one line naming the file and merge (malformed YAML,
        a duplicate or bad name, a cycle, a recipe error, an unnamed merge without `out_path`).
    """
    file = str(path)
    _, parsed = read_yaml(path, "file", documents=True, error=MultiError)
    docs = [(i, d) for i, d in enumerate(parsed, 1) if d is not None]  # empty documents: none
    if not docs:
        raise MultiError(f"{file}: no recipes (YAML documents separated by ---, each with a name)")
    named: dict[str | None, dict] = {}
    base = os.path.abspath(intermediate_dir)
    for i, doc in docs:
        if not isinstance(doc, dict):
            raise MultiError(f"{file}: document {i}: a recipe is a mapping with name, merge_method and models")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (
            not isinstance(name, str) or not name.strip()
            or not os.path.abspath(os.path.join(intermediate_dir, name)).startswith(base + os.sep)
        ):
            raise MultiError(f"{file}: document {i}: name must name a directory inside {intermediate_dir}, got {name!r}")
        if name in named:
            raise MultiError(f"{file}: document {i}: " + (f"duplicate merge name {name!r}" if name is not None else
                             "a second unnamed merge (only one, the final merge, may leave out name)"))
        named[name] = doc
    if None in named and not out_path:
        raise MultiError(f"{file}: --out-path is required: the file has an unnamed (final) merge")
    if out_path and None not in named:
        warnings.warn(f"{file}: every merge has a name; --out-path is unused (as mergekit ignores it)", RecipeWarning, stacklevel=2)
    names = {n for n in named if n is not None}
    stages: dict[str | None, Stage] = {}
    for name, doc in named.items():
        where = f"{file}: merges[{name if name is not None else '(unnamed)'}]"
        rewritten, refs = _rewrite(doc, names, intermediate_dir, where, strict)
        text = yaml.safe_dump(rewritten, sort_keys=False)
        if "experts" in rewritten and "merge_method" not in rewritten:  # a mergekit-moe configuration
            recipe = parse_moe_config(rewritten, where=where, strict=strict, text=text)
            check_config(recipe)
        else:
            recipe = parse_recipe(rewritten, where=where, path=Path(file), text=text, strict=strict)
        output = os.path.join(intermediate_dir, name) if name is not None else str(out_path)
        stages[name] = Stage(name, where, output, recipe, list(dict.fromkeys(m for _, _, m in refs if m)), refs)
    outputs: dict[str, str] = {}
    for stage in stages.values():
        key = os.path.abspath(stage.output)
        if key in outputs:
            raise MultiError(f"{stage.where}: writes {stage.output}, as {outputs[key]} does")
        outputs[key] = stage.where
    return _in_order(stages, file)


def _in_order(stages: dict[str | None, Stage], file: str) -> list[Stage]:
    """Each merge after its inputs (depth first, in file order); a cycle is one line naming its merges."""
    order: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, path: list[str | None]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name):] + [name]
            raise MultiError(f"{file}: the merges form a cycle: {' -> '.join(str(n) for n in cycle)}")
        state[name] = "open"
        for dep in stages[name].needs:
            visit(dep, path + [name])
        state[name] = "done"
        order.append(stages[name])

    for name in stages:
        visit(name, [])
    return order


def _named(err: Exception, stage: Stage) -> MultiError:
    """`err` as one line beginning with the merge's place ("multi.yml: merges[B]: ...")."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    file = stage.where.split(": ", 1)[0]
    if message.startswith(stage.where):
        return MultiError(message)
    if message.startswith(f"{file}: "):
        return MultiError(f"{stage.where}: {message[len(file) + 2:]}")
    return MultiError(f"{stage.where}: {message}")


def check_stages(stages: list[Stage], *, force: bool = False, seed: int | None = None, max_shard_size: str | None = None) -> dict:
    """Check what can be checked before the first merge; nothing is written.

    Args:
      stages: from `load_multi`.
      force: every merge reruns (otherwise complete outputs are skipped).
      seed, max_shard_size: as `merge_recipe`.

    Returns:
      {stage name: the plan (a `MergePlan`), "skip", or None (its inputs do not exist yet)}.

    Raises:
      MultiError: one line naming the merge (an output that exists but is incomplete, an
        unknown model or merge name, an error of a merge whose inputs all exist).
    """
    from jaxmerge.formats.hf_model import resolve_model
    from jaxmerge.formats.lora import split_lora_reference
    from jaxmerge.recipes.orbax import uses_orbax
    from jaxmerge.recipes.plan import plan_recipe
    from jaxmerge.tools import moe

    merges = ", ".join(s.name for s in stages if s.name is not None) or "none"
    pending: set[str | None] = set()
    plans: dict = {}
    for stage in stages:
        if not force and is_complete(stage.output):
            plans[stage.name] = "skip"
            continue
        if not force and os.path.lexists(stage.output):
            raise MultiError(
                f"{stage.where}: {stage.output} exists but holds no complete model (config.json and weights, as "
                "mergekit-multi checks); pass --force to replace it"
            )
        pending.add(stage.name)
        try:
            for at, ref, merge in stage.refs:
                model, lora = split_lora_reference(ref)
                if merge is None:
                    try:
                        resolve_model(model, at)
                    except CheckpointError as err:
                        raise MultiError(f"{err}, nor a merge of this file (its merges: {merges})") from None
                if lora is not None:
                    resolve_model(lora, f"{at} (its LoRA adapter)")
            if pending.intersection(stage.needs):
                plans[stage.name] = None  # planned when the merges it reads exist
                continue
            if isinstance(stage.recipe, MoeConfig):
                plans[stage.name] = moe.dry_run(stage.recipe, stage.output, seed=seed or 0,
                                                max_shard_size=max_shard_size or "5GB")[1]
                continue
            if uses_orbax(stage.recipe):
                raise MultiError(f"{stage.where}: Orbax checkpoints merge one recipe at a time (jaxmerge merge)")
            plans[stage.name] = plan_recipe(stage.recipe, stage.output, seed=seed, max_shard_size=max_shard_size)[1]
        except (ValueError, OSError) as err:
            raise _named(err, stage) from None
    return plans


def run_stages(
    stages: list[Stage],
    *,
    force: bool = False,
    seed: int | None = None,
    max_shard_size: str | None = None,
    progress: bool = True,
    allow_nonfinite: bool = False,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Merge each stage in order, skipping complete outputs unless `force`; stop at the first failure.

    Args:
      stages: from `load_multi`, checked by `check_stages`.
      force: rerun every merge, replacing its output.
      seed, max_shard_size, progress, allow_nonfinite: as `merge_recipe`.
      say: prints one line per merge (merged or skipped).

    Returns:
      The outputs merged by this run.

    Raises:
      MultiError: one line naming the failed merge and the merges kept before it.
    """
    from jaxmerge.engine._atomic import sigterm_before_writing
    from jaxmerge.recipes.orbax import uses_orbax
    from jaxmerge.recipes.plan import merge_recipe
    from jaxmerge.tools import moe

    done: list[str] = []
    for stage in stages:
        label = stage.where.split(": ", 1)[1]
        if not force and is_complete(stage.output):
            say(f"{label}: {stage.output} is complete; skipped (--force reruns it)")
            continue
        say(f"{label}: merging into {stage.output}")
        try:
            with sigterm_before_writing(stage.output):
                if isinstance(stage.recipe, MoeConfig):
                    moe.build_moe(stage.recipe, stage.output, seed=seed or 0, force=force, progress=progress,
                                  max_shard_size=max_shard_size or "5GB", allow_nonfinite=allow_nonfinite)
                    done.append(stage.output)
                    say(f"{label}: built into {Path(stage.output).resolve()}")
                    continue
                if uses_orbax(stage.recipe):
                    raise MultiError(f"{stage.where}: Orbax checkpoints merge one recipe at a time (jaxmerge merge)")
                merge_recipe(
                    stage.recipe, stage.output, seed=seed, max_shard_size=max_shard_size, force=force,
                    progress=progress, allow_nonfinite=allow_nonfinite,
                )
        except Exception as err:  # noqa: BLE001 - any failure stops the run in one line naming the merge
            kept = f" (stopped; merged before it: {', '.join(done)})" if done else " (stopped)"
            error = _named(err if isinstance(err, (ValueError, OSError)) else RuntimeError(f"{type(err).__name__}: {err}"), stage)
            raise MultiError(f"{error}{kept}") from err
        done.append(stage.output)
        say(f"{label}: merged into {Path(stage.output).resolve()}")
    return done
