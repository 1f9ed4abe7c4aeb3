"""Merge recipes: mergekit's YAML configuration, unchanged, is jaxmerge's recipe format.

The schema is mergekit 0.1.5's `MergeConfiguration` (mergekit/config.py)::

    merge_method: ties                  # any method of `jaxmerge methods`
    base_model: org/base                # a directory, or a Hub repo id (org/name[@revision])
    models:                             # either models ...
      - model: org/model-a
        parameters:
          weight: 1.0                   # a scalar,
          density: [0.2, 0.5, 0.8]      # a gradient: interpolated across the layers,
      - model: ./model-b
        parameters:
          weight:                       # or {filter, value} conditionals, first match wins
            - {filter: self_attn, value: 0.7}
            - {filter: mlp, value: [0.3, 0.9]}
            - value: 0.5
      - model: org/base+./my-lora       # a model with a PEFT LoRA adapter folded in
    # slices:                           # ... or slices (layer ranges, "frankenmerges")
    #   - sources:
    #       - {model: org/model-a, layer_range: [0, 16]}
    #   - sources:
    #       - {model: org/model-b, layer_range: [8, 24], parameters: {...}}
    #     parameters: {...}             # this slice's parameters
    #     base_model: org/base          # this slice's base
    # modules:                          # ... or one entry per layer stack (a VLM's language model and
    #   text_decoder: {models: [...]}   #     vision tower): models or slices, and parameters, each
    parameters:                         # defaults for every model and tensor
      normalize: true
    dtype: bfloat16                     # inputs are cast to it when read
    out_dtype: bfloat16                 # the output's dtype (default: dtype)
    tokenizer_source: union             # union, base or a model: the output's vocabulary
    # tokenizer: {source: union, tokens: {"<|im_start|>": {source: org/model-a, force: true}}, pad_to_multiple_of: 64}
    chat_template: chatml               # a template name (chatml, llama3, alpaca, mistral, exaone) or Jinja text
    jaxmerge:                           # jaxmerge's own settings (all optional)
      seed: 0                           # key of the random methods (dare_*, della*)
      semantics: mergekit               # or peft: PEFT's definitions of ties/dare/magnitude_prune
      max_shard_size: 5GB

Parameters are resolved per tensor as mergekit does: a model's own
`parameters` first, then its slice's, its module's, then the top-level ones; a conditional
list whose filters all miss falls through to the next. A filter matches when it
is a substring of the tensor's name ("*" and no filter match everything). A
gradient `[a, b, c]` is interpolated piecewise-linearly at `t = i / (n - 1)`
for the i-th of the n layers of the slice (the first value for tensors outside
the layers; lists of booleans or strings pick a value instead). Methods and
their parameters are those of the method table; a method with a `semantics`
parameter means "mergekit" in a recipe unless the recipe says otherwise.

Model paths are relative to the working directory, as in mergekit. What
mergekit accepts and ignores, jaxmerge accepts with a `RecipeWarning` (one
line per parameter): a parameter the method does not take (a `weight` left in
a slerp recipe), a slice's `residual_weight`; `strict=True` (`--strict`)
refuses it instead. PEFT LoRA adapters on their own (no model) are merged with
flags (`jaxmerge merge a/ b/ --method ties --density 0.5 --output out/`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxmerge.formats.safetensors_io import DTYPE_NAMES, CheckpointError
from jaxmerge.methods import _table as table

_TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "jaxmerge",
)
# jaxmerge's earlier recipe keys -> the mergekit key that replaces them.
_OLD_KEYS = {
    "method": "merge_method",
    "base": "base_model",
    "path": "model",
    "output": "the --output flag",
    "seed": "jaxmerge: {seed: ...}",
    "max_shard_size": "jaxmerge: {max_shard_size: ...}",
    "svd_rank": "the --svd-rank flag (LoRA adapters are merged with flags)",
    "svd_clamp": "the --svd-clamp flag (LoRA adapters are merged with flags)",
    "density": "parameters: {density: ...}",
    "weight": "parameters: {weight: ...}",
    "majority_sign_method": "parameters: {majority_sign_method: ...}",
}
_EXTRA_KEYS = ("seed", "semantics", "max_shard_size")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_SCALAR = (bool, int, float, str)


@dataclass
class Source:
    """A model of `models`, or a source of a slice."""

    model: str
    parameters: dict = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # None: every layer (the `models` form)
    where: str = ""  # "models[0]", "slices[1].sources[0]"


@dataclass
class Slice:
    """One entry of `slices`: its sources (each with a `layer_range`), parameters and base model."""

    sources: list[Source]
    parameters: dict = field(default_factory=dict)
    base_model: str | None = None
    where: str = ""


@dataclass
class Module:
    """One entry of `modules:` (a layer stack of a multi-stack model, such as a VLM's vision tower)."""

    models: list[Source] | None
    slices: list[Slice] | None
    parameters: dict = field(default_factory=dict)
    where: str = ""


@dataclass
class Recipe:
    """A checked recipe (mergekit's schema plus the `jaxmerge:` settings)."""

    merge_method: str
    models: list[Source] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    modules: dict[str, Module] | None = None
    tokenizer_source: str | None = None
    tokenizer: dict | None = None  # mergekit's `tokenizer:` {source, tokens, pad_to_multiple_of}
    chat_template: str | None = None  # a template name or Jinja text
    seed: int = 0
    max_shard_size: str = "5GB"
    path: Path | None = None  # the recipe file (None: built from command-line flags)
    text: str | None = None  # the recipe as written (copied to the output as mergekit_config.yml)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "command line"

    def sources(self) -> list[Source]:
        parts = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        return [s for models, slices in parts for s in (models or []) + [s for sl in slices or [] for s in sl.sources]]

    def scopes(self) -> list[dict]:
        """Every `parameters` mapping of the recipe."""
        slices = list(self.slices or []) + [sl for m in (self.modules or {}).values() for sl in m.slices or []]
        modules = [m.parameters for m in (self.modules or {}).values()]
        return [self.parameters, *modules, *(s.parameters for s in self.sources()), *(sl.parameters for sl in slices)]

    def to_yaml(self) -> str:
        """The recipe in mergekit's schema (for recipes built from flags)."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            data["base_model"] = self.base_model
        data["models"] = [
            {"model": s.model, **({"parameters": s.parameters} if s.parameters else {})} for s in self.models or []
        ]
        if self.parameters:
            data["parameters"] = self.parameters
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        extras: dict[str, Any] = {"seed": self.seed}
        spec = table.get(self.merge_method)
        if "semantics" in spec.param_names and "semantics" not in self.parameters:
            # A recipe file means mergekit's semantics by default; say which one these flags meant.
            extras["semantics"] = spec.param("semantics").default
        if self.max_shard_size != "5GB":
            extras["max_shard_size"] = self.max_shard_size
        data["jaxmerge"] = extras
        return yaml.safe_dump(data, sort_keys=False)


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    """Read and check a recipe file: one line naming the file and key on any error.

    What mergekit accepts and ignores (a parameter the method does not take) is
    accepted with a `RecipeWarning`, or refused with `strict=True`.

    Raises:
      CheckpointError: unreadable or malformed YAML (file, line, column), an
        unknown or unsupported key, a value of the wrong type.
      MethodError: an unknown method or parameter.
    """
    path = Path(path)
    text, data = read_yaml(path, "recipe")
    return parse_recipe(data, where=str(path), path=path, text=text, strict=strict)


def read_yaml(path: Path, what: str, *, documents: bool = False, error: type[Exception] = CheckpointError):
    """Read a YAML file (a recipe, a multi-merge file) with one-line errors naming the file, line and column.

    Args:
      path: the file.
      what: what the file is, for the unreadable-file error ("recipe").
      documents: read every `---`-separated document (a list) instead of one.
      error: the exception class raised.

    Returns:
      (the text, the parsed YAML).
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror if isinstance(err, OSError) else err})") from None
    try:
        return text, (list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}{at}: malformed YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None


def parse_recipe(
    data: Any, *, where: str, path: Path | None = None, text: str | None = None, strict: bool = False
) -> Recipe:
    """Check a recipe's parsed YAML (see the module docstring).

    Args:
      data: the parsed YAML.
      where: names the recipe in errors (its file).
      path, text: the recipe file and its text, kept with the recipe.
      strict: refuse what mergekit accepts but ignores (a parameter the method does not take,
        `residual_weight`) instead of warning (`RecipeWarning`).
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: a recipe is a mapping with merge_method and models (or slices, or modules)")
    _check_keys(data, _TOP_KEYS, f"{where}: ", "mergekit's keys")
    if "merge_method" not in data:
        raise CheckpointError(f"{where}: merge_method is required (see `jaxmerge methods`)")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: merge_method must be a method name, got {name!r}")
    try:
        method = table.get(name)
    except table.MethodError as err:
        raise table.MethodError(f"{where}: merge_method: {err}") from None
    if sum(key in data for key in ("models", "slices", "modules")) != 1:
        raise CheckpointError(f"{where}: give exactly one of models, slices and modules")
    parser = _Parser(method, where, strict)
    recipe = Recipe(merge_method=name, path=path, text=text)
    recipe.base_model = _model_ref(data.get("base_model"), f"{where}: base_model", optional=True)
    recipe.parameters = parser.settings(data.get("parameters"), "parameters")
    if "modules" in data:
        modules = data["modules"]
        if not isinstance(modules, dict) or not modules:
            raise CheckpointError(f"{where}: modules must map module names to {{models or slices, parameters}}")
        recipe.modules = {str(k): parser.module(v, f"modules.{k}") for k, v in modules.items()}
    else:
        recipe.models, recipe.slices = parser.models_or_slices(data, "")
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None:
            if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPE_NAMES:
                raise CheckpointError(f"{where}: {key} must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
            setattr(recipe, key, value.removeprefix("torch."))
    if "tokenizer_source" in data and "tokenizer" in data:
        raise CheckpointError(f"{where}: give tokenizer_source or tokenizer, not both (as mergekit)")
    source = data.get("tokenizer_source")
    if isinstance(source, dict):
        raise CheckpointError(f"{where}: tokenizer_source is union, base or a model; a configuration goes under tokenizer:")
    recipe.tokenizer_source = _model_ref(source, f"{where}: tokenizer_source", optional=True)
    if "tokenizer" in data:
        recipe.tokenizer = _tokenizer(data["tokenizer"], f"{where}: tokenizer")
    template = data.get("chat_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise CheckpointError(f"{where}: chat_template must be a template name (chatml, llama3, ...) or Jinja text, got {template!r}")
    recipe.chat_template = template
    _extras(recipe, data.get("jaxmerge"), method, where)
    parser.unused.warn()
    return recipe


def recipe_from_flags(
    inputs: list[str],
    *,
    method: str,
    weights: list[float] | None = None,
    base: str | None = None,
    params: dict | None = None,
    seed: int = 0,
    max_shard_size: str = "5GB",
) -> Recipe:
    """The recipe of `jaxmerge merge a b --method ... --weights ...` (the table's own defaults: no mergekit semantics)."""
    try:
        spec = table.get(method)
    except table.MethodError as err:
        raise table.MethodError(f"--method: {err}") from None
    if weights is not None and len(weights) != len(inputs):
        raise CheckpointError(f"got {len(weights)} weights for {len(inputs)} inputs")
    models = []
    for i, path in enumerate(inputs):
        parameters = {"weight": float(weights[i])} if weights is not None else {}
        models.append(Source(model=str(path), parameters=parameters, where="input"))
    shared = {k: v for k, v in (params or {}).items() if v is not None}
    for key in shared:
        if key not in spec.param_names:
            raise table.MethodError(f"method {method} has no parameter {key!r} (its parameters: {', '.join(spec.param_names) or 'none'})")
    return Recipe(
        merge_method=method, models=models, base_model=str(base) if base else None,
        parameters=shared, seed=seed, max_shard_size=max_shard_size,
    )


def _check_keys(data: dict, allowed: tuple[str, ...], at: str, listed: str = "allowed") -> None:
    """Every key of a recipe mapping is one of `allowed`; jaxmerge's old keys are named with their mergekit key.

    Args:
      at: the mapping's place as an error begins it ("recipe.yml: " or "recipe.yml: models[0].").
    """
    for key in data:
        if key in _OLD_KEYS and key not in allowed:
            raise CheckpointError(f"{at}{key} is jaxmerge's old recipe format; mergekit's key is {_OLD_KEYS[key]}")
        if key not in allowed:
            place = at[:-1] if at.endswith(".") else at.rstrip(": ")
            raise CheckpointError(f"{place}: unknown key {key!r} ({listed}: {', '.join(allowed)})")


def _model_ref(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CheckpointError(f"{where} must be a model directory or Hub repo id (a string), got {value!r}")
    return value


def _tokenizer(data: Any, where: str) -> dict:
    """mergekit's `tokenizer:` (TokenizerConfig): source, tokens, pad_to_multiple_of; token entries are
    checked against the models when the vocabulary is built (`jaxmerge.recipes.tokenizer`)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a mapping of source, tokens, pad_to_multiple_of, got {data!r}")
    _check_keys(data, ("source", "tokens", "pad_to_multiple_of"), f"{where}.")
    out = {"source": _model_ref(data.get("source", "union"), f"{where}.source")}
    tokens = data.get("tokens")
    if tokens is not None and not isinstance(tokens, dict):
        raise CheckpointError(f"{where}.tokens must map tokens to {{source, force}}, got {tokens!r}")
    out["tokens"] = {}
    for token, entry in (tokens or {}).items():
        at = f"{where}.tokens[{token!r}]"
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise CheckpointError(f"{at} must be {{source, force}}, got {entry!r}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise CheckpointError(f"{at}.force must be true or false, got {force!r}")
        src = entry.get("source")
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero" and set(src) == {"kind"}:
                pass
            elif kind == "model_token" and set(src) <= {"kind", "model", "token", "token_id"}:
                _model_ref(src.get("model"), f"{at}.source.model")
                if ("token" in src) == ("token_id" in src):
                    raise CheckpointError(f"{at}.source: give one of token and token_id")
                if "token_id" in src and (isinstance(src["token_id"], bool) or not isinstance(src["token_id"], int)):
                    raise CheckpointError(f"{at}.source.token_id must be an integer, got {src['token_id']!r}")
            else:
                raise CheckpointError(
                    f"{at}.source must be a model, {{kind: zero}} or {{kind: model_token, model, token or token_id}}, got {src!r}"
                )
        elif src is not None:
            _model_ref(src, f"{at}.source")
        out["tokens"][str(token)] = {"source": src, "force": force}
    pad = data.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise CheckpointError(f"{where}.pad_to_multiple_of must be an integer >= 1, got {pad!r}")
    out["pad_to_multiple_of"] = pad
    return out


class _Parser:
    """Checks the parts of one recipe that carry parameters (models, slices, modules)."""

    def __init__(self, method: table.Method, file: str, strict: bool):
        self.method, self.file, self.strict = method, file, strict
        self.unused = _Unused(method, file, strict)

    def models_or_slices(self, data: dict, prefix: str) -> tuple[list[Source] | None, list[Slice] | None]:
        at = f"{self.file}: {prefix}"
        if "models" in data:
            models = data["models"]
            if not isinstance(models, list) or not models:
                raise CheckpointError(f"{at}models must be a non-empty list of {{model, parameters}}")
            return [self.source(m, f"{prefix}models[{i}]", slice_source=False) for i, m in enumerate(models)], None
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise CheckpointError(f"{at}slices must be a non-empty list of {{sources, parameters}}")
        return None, [self.slice(s, f"{prefix}slices[{i}]") for i, s in enumerate(slices)]

    def module(self, data: Any, where: str) -> Module:
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.file}: {where} must be a mapping with models or slices, got {data!r}")
        _check_keys(data, ("models", "slices", "parameters"), f"{self.file}: {where}.")
        if ("models" in data) == ("slices" in data):
            raise CheckpointError(f"{self.file}: {where}: give exactly one of models and slices")
        models, slices = self.models_or_slices(data, f"{where}.")
        return Module(models, slices, self.settings(data.get("parameters"), f"{where}.parameters"), where)

    def source(self, data: Any, where: str, *, slice_source: bool) -> Source:
        file = self.file
        allowed = ("model", "parameters", "layer_range") if slice_source else ("model", "parameters")
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: {where} must be a mapping with {' and '.join(allowed)}, got {data!r}")
        _check_keys(data, allowed, f"{file}: {where}.")
        model = _model_ref(data.get("model"), f"{file}: {where}.model")
        layer_range = None
        if slice_source:
            value = data.get("layer_range")
            if (
                not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
                or not 0 <= value[0] < value[1]
            ):
                raise CheckpointError(f"{file}: {where}.layer_range must be [start, end] with 0 <= start < end, got {value!r}")
            layer_range = (value[0], value[1])
        parameters = self.settings(data.get("parameters"), f"{where}.parameters")
        return Source(model=model, parameters=parameters, layer_range=layer_range, where=where)

    def slice(self, data: Any, where: str) -> Slice:
        file = self.file
        allowed = ("sources", "parameters", "base_model", "residual_weight")
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: {where} must be a mapping with sources, got {data!r}")
        _check_keys(data, allowed, f"{file}: {where}.")
        if "residual_weight" in data:
            # mergekit 0.1.5's schema has the key, and nothing reads it.
            self.unused.ignored(f"{where}.residual_weight", "has no effect in mergekit 0.1.5")
        sources = data.get("sources")
        if not isinstance(sources, list) or not sources:
            raise CheckpointError(f"{file}: {where}.sources must be a non-empty list of {{model, layer_range}}")
        return Slice(
            sources=[self.source(s, f"{where}.sources[{i}]", slice_source=True) for i, s in enumerate(sources)],
            parameters=self.settings(data.get("parameters"), f"{where}.parameters"),
            base_model=_model_ref(data.get("base_model"), f"{file}: {where}.base_model", optional=True),
            where=where,
        )

    def settings(self, data: Any, where: str) -> dict:
        """Check a `parameters` mapping: values of their type (converted); parameters the method does not
        take are left out and noted (refused when strict)."""
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.file}: {where} must be a mapping of parameter names to values, got {data!r}")
        out = {}
        for name, setting in data.items():
            if name not in self.method.param_names:
                self.unused.note(name, f"{where}.{name}")
                continue
            out[name] = _setting(setting, self.method.param(name), f"{self.file}: {where}.{name}")
        return out


class RecipeWarning(UserWarning):
    """A recipe is accepted as mergekit accepts it, but part of it has no effect (`strict=True` refuses it)."""


class _Unused:
    """What a recipe gives that has no effect: mergekit ignores parameters a method does not take
    (recipes copied from model cards carry `weight` into slerp and the like). jaxmerge warns once per
    parameter, or refuses the first one when strict."""

    def __init__(self, method: table.Method, file: str, strict: bool):
        self.method, self.file, self.strict = method, file, strict
        self.places: dict[str, list[str]] = {}
        self.others: list[str] = []

    def note(self, name: str, where: str) -> None:
        if self.strict:
            known = ", ".join(self.method.param_names) or "none"
            raise table.MethodError(
                f"{self.file}: {where}: method {self.method.name} has no parameter {name!r} (its parameters: {known})"
            )
        self.places.setdefault(name, []).append(where)

    def ignored(self, where: str, why: str) -> None:
        if self.strict:
            raise CheckpointError(f"{self.file}: {where} {why} (--strict refuses it)")
        self.others.append(f"{self.file}: {where} {why}; ignored")

    def warn(self) -> None:
        lines = list(self.others)
        for name, places in self.places.items():
            shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
            lines.append(
                f"{self.file}: method {self.method.name} takes no parameter {name!r} ({shown}); "
                "ignored, as mergekit ignores it (--strict refuses it)"
            )
        for line in lines:
            warnings.warn(line, RecipeWarning, stacklevel=3)


def _setting(value: Any, param: table.Param, where: str) -> Any:
    """A scalar, a gradient (list of scalars), a {filter, value} or a list of them; values checked."""
    if isinstance(value, dict):
        return _conditional(value, param, where)
    if isinstance(value, list):
        if not value:
            raise CheckpointError(f"{where} is an empty list")
        if all(isinstance(v, dict) for v in value):
            return [_conditional(v, param, f"{where}[{i}]") for i, v in enumerate(value)]
        if all(isinstance(v, _SCALAR) for v in value):
            return [check_value(v, param, f"{where}[{i}]") for i, v in enumerate(value)]
        raise CheckpointError(f"{where} must be a value, a list of values (a gradient) or a list of {{filter, value}}, got {value!r}")
    if isinstance(value, _SCALAR):
        return check_value(value, param, where)
    raise CheckpointError(f"{where} must be a value, a gradient or {{filter, value}}, got {value!r}")


def _conditional(value: dict, param: table.Param, where: str) -> dict:
    unknown = sorted(set(value) - {"filter", "value"})
    if unknown or "value" not in value:
        raise CheckpointError(f"{where} must be {{filter, value}}, got {value!r}")
    filt = value.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise CheckpointError(f"{where}.filter must be a string (part of a tensor name), got {filt!r}")
    inner = value["value"]
    if isinstance(inner, list) and inner and all(isinstance(v, _SCALAR) for v in inner):
        checked = [check_value(v, param, f"{where}.value[{i}]") for i, v in enumerate(inner)]
    elif isinstance(inner, _SCALAR):
        checked = check_value(inner, param, f"{where}.value")
    else:
        raise CheckpointError(f"{where}.value must be a value or a list of values, got {inner!r}")
    return {"filter": filt, "value": checked}


def check_value(value: Any, param: table.Param, where: str) -> Any:
    """One value of `param`, converted as mergekit's (pydantic) validation does: YAML reads
    `1e-3` as a string, which is a number for a numeric parameter."""
    if param.kind in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if param.kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise CheckpointError(f"{where} must be a number, got nan")
        if param.kind is int and value != int(value):
            raise CheckpointError(f"{where} must be an integer, got {value!r}")
        return param.kind(value)  # ranges are checked per tensor, after interpolation
    try:
        return param.check(value, where)
    except table.MethodError as err:
        raise CheckpointError(str(err)) from None


def _extras(recipe: Recipe, data: Any, method: table.Method, where: str) -> None:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: jaxmerge must be a mapping of {', '.join(_EXTRA_KEYS)}, got {data!r}")
    for key in data:
        if key not in _EXTRA_KEYS:
            raise CheckpointError(f"{where}: jaxmerge: unknown key {key!r} (known: {', '.join(_EXTRA_KEYS)})")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CheckpointError(f"{where}: jaxmerge.seed must be an integer, got {seed!r}")
    recipe.seed = seed
    size = data.get("max_shard_size", "5GB")
    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise CheckpointError(f"{where}: jaxmerge.max_shard_size must look like 5GB or 500MB, got {size!r}")
    recipe.max_shard_size = str(size)
    # The one place where a recipe's meaning of the shared methods is decided: mergekit's, unless it says otherwise.
    if "semantics" in method.param_names:
        if "semantics" in data and "semantics" in recipe.parameters:
            raise CheckpointError(f"{where}: semantics is given both in jaxmerge and in parameters; keep one")
        if "semantics" not in recipe.parameters:
            recipe.parameters["semantics"] = check_value(
                data.get("semantics", "mergekit"), method.param("semantics"), f"{where}: jaxmerge.semantics"
            )
    elif "semantics" in data:
        raise CheckpointError(f"{where}: jaxmerge.semantics: method {method.name} has one definition (no semantics parameter)")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A checked setting's value for one tensor at layer position `t` in [0, 1] (mergekit's
    `evaluate_setting`): None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(v, dict) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        filt = cond["filter"]
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def resolve_setting(name: str, scopes: list[dict], tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: the first scope (most specific first) whose setting applies."""
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None


def uses_gradients(recipe: Recipe) -> bool:
    """Some parameter is a gradient (needs layer numbering)."""

    def has(setting):
        if isinstance(setting, dict):
            return isinstance(setting["value"], list)
        if isinstance(setting, list):
            return any(not isinstance(v, dict) for v in setting) or any(has(v) for v in setting)
        return False

    return any(has(v) for scope in recipe.scopes() for v in scope.values())
