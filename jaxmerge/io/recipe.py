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
    # slices:                           # ... or slices (layer ranges, "frankenmerges")
    #   - sources:
    #       - {model: org/model-a, layer_range: [0, 16]}
    #   - sources:
    #       - {model: org/model-b, layer_range: [8, 24], parameters: {...}}
    #     parameters: {...}             # this slice's parameters
    #     base_model: org/base          # this slice's base
    parameters:                         # defaults for every model and tensor
      normalize: true
    dtype: bfloat16                     # inputs are cast to it when read
    out_dtype: bfloat16                 # the output's dtype (default: dtype)
    tokenizer_source: base              # base or a model: its tokenizer files are copied
    jaxmerge:                           # jaxmerge's own settings (all optional)
      seed: 0                           # key of the random methods (dare_*, della*)
      semantics: mergekit               # or peft: PEFT's definitions of ties/dare/magnitude_prune
      max_shard_size: 5GB

Parameters are resolved per tensor as mergekit does: a model's own
`parameters` first, then its slice's, then the top-level ones; a conditional
list whose filters all miss falls through to the next. A filter matches when it
is a substring of the tensor's name ("*" and no filter match everything). A
gradient `[a, b, c]` is interpolated piecewise-linearly at `t = i / (n - 1)`
for the i-th of the n layers of the slice (the first value for tensors outside
the layers; lists of booleans or strings pick a value instead). Methods and
their parameters are those of the method table; a method with a `semantics`
parameter means "mergekit" in a recipe unless the recipe says otherwise.

Model paths are relative to the working directory, as in mergekit. Not
supported (one line naming the key): `modules`, `tokenizer`, `chat_template`,
`tokenizer_source: union`, `residual_weight`, LoRA references `model+lora`.
Recipes merge models; PEFT LoRA adapters are merged with flags
(`jaxmerge merge a/ b/ --method ties --density 0.5 --output out/`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxmerge.io.safetensors_io import CheckpointError
from jaxmerge.methods import _table as table

_TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "jaxmerge",
)
_UNSUPPORTED = {
    "modules": "per-module merges are not supported yet; use models or slices",
    "tokenizer": "tokenizer building (mergekit's vocabulary union and permutation) is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat templates are not set by jaxmerge; the tokenizer files of tokenizer_source are copied as they are",
    "residual_weight": "residual_weight is not supported",
}
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
    sources: list[Source]
    parameters: dict = field(default_factory=dict)
    base_model: str | None = None
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
    tokenizer_source: str | None = None
    seed: int = 0
    max_shard_size: str = "5GB"
    path: Path | None = None  # the recipe file (None: built from command-line flags)
    text: str | None = None  # the recipe as written (copied to the output as mergekit_config.yml)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "command line"

    def sources(self) -> list[Source]:
        return list(self.models or []) + [s for sl in self.slices or [] for s in sl.sources]

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


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file: one line naming the file and key on any error.

    Raises:
      CheckpointError: unreadable or malformed YAML (file, line, column), an
        unknown or unsupported key, a value of the wrong type.
      MethodError: an unknown method or parameter.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the recipe ({err.strerror if isinstance(err, OSError) else err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CheckpointError(f"{path}{at}: malformed YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    return parse_recipe(data, where=str(path), path=path, text=text)


def parse_recipe(data: Any, *, where: str, path: Path | None = None, text: str | None = None) -> Recipe:
    """Check a recipe's parsed YAML (see the module docstring)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: a recipe is a mapping with merge_method and models (or slices)")
    for key in data:
        if key in _OLD_KEYS and key not in _TOP_KEYS:
            raise CheckpointError(f"{where}: {key} is jaxmerge's old recipe format; mergekit's key is {_OLD_KEYS[key]}")
        if key in _UNSUPPORTED:
            raise CheckpointError(f"{where}: {key}: {_UNSUPPORTED[key]}")
        if key not in _TOP_KEYS:
            raise CheckpointError(f"{where}: unknown key {key!r} (mergekit's keys: {', '.join(_TOP_KEYS)})")
    if "merge_method" not in data:
        raise CheckpointError(f"{where}: merge_method is required (see `jaxmerge methods`)")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: merge_method must be a method name, got {name!r}")
    try:
        method = table.get(name)
    except table.MethodError as err:
        raise table.MethodError(f"{where}: merge_method: {err}") from None
    if ("models" in data) == ("slices" in data):
        raise CheckpointError(f"{where}: give exactly one of models and slices")
    recipe = Recipe(merge_method=name, path=path, text=text)
    recipe.base_model = _model_ref(data.get("base_model"), f"{where}: base_model", optional=True)
    recipe.parameters = _settings(data.get("parameters"), method, f"{where}: parameters")
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise CheckpointError(f"{where}: models must be a non-empty list of {{model, parameters}}")
        recipe.models = [_source(m, method, where, f"models[{i}]", slice_source=False) for i, m in enumerate(models)]
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise CheckpointError(f"{where}: slices must be a non-empty list of {{sources, parameters}}")
        recipe.slices = [_slice(s, method, where, f"slices[{i}]") for i, s in enumerate(slices)]
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None:
            from jaxmerge.io.checkpoints import DTYPE_NAMES

            if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPE_NAMES:
                raise CheckpointError(f"{where}: {key} must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
            setattr(recipe, key, value.removeprefix("torch."))
    source = data.get("tokenizer_source")
    if source == "union":
        raise CheckpointError(f"{where}: tokenizer_source: union (mergekit's merged vocabulary) is not supported; use base or a model")
    if isinstance(source, dict):
        raise CheckpointError(f"{where}: tokenizer_source: a tokenizer configuration is not supported; use base or a model")
    recipe.tokenizer_source = _model_ref(source, f"{where}: tokenizer_source", optional=True)
    _extras(recipe, data.get("jaxmerge"), method, where)
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


def _model_ref(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CheckpointError(f"{where} must be a model directory or Hub repo id (a string), got {value!r}")
    return value


def _source(data: Any, method: table.Method, file: str, where: str, *, slice_source: bool) -> Source:
    allowed = ("model", "parameters", "layer_range") if slice_source else ("model", "parameters")
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: {where} must be a mapping with {' and '.join(allowed)}, got {data!r}")
    for key in data:
        if key in _OLD_KEYS and key not in allowed:
            raise CheckpointError(f"{file}: {where}.{key} is jaxmerge's old recipe format; mergekit's key is {_OLD_KEYS[key]}")
        if key not in allowed:
            raise CheckpointError(f"{file}: {where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
    model = _model_ref(data.get("model"), f"{file}: {where}.model")
    if "+" in model and not Path(model).exists():
        raise CheckpointError(f"{file}: {where}.model: LoRA references (model+lora) are not supported; merge the adapter into the model first")
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
    parameters = _settings(data.get("parameters"), method, f"{file}: {where}.parameters")
    return Source(model=model, parameters=parameters, layer_range=layer_range, where=where)


def _slice(data: Any, method: table.Method, file: str, where: str) -> Slice:
    allowed = ("sources", "parameters", "base_model")
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: {where} must be a mapping with sources, got {data!r}")
    for key in data:
        if key in _UNSUPPORTED:
            raise CheckpointError(f"{file}: {where}.{key}: {_UNSUPPORTED[key]}")
        if key not in allowed:
            raise CheckpointError(f"{file}: {where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise CheckpointError(f"{file}: {where}.sources must be a non-empty list of {{model, layer_range}}")
    return Slice(
        sources=[_source(s, method, file, f"{where}.sources[{i}]", slice_source=True) for i, s in enumerate(sources)],
        parameters=_settings(data.get("parameters"), method, f"{file}: {where}.parameters"),
        base_model=_model_ref(data.get("base_model"), f"{file}: {where}.base_model", optional=True),
        where=where,
    )


def _settings(data: Any, method: table.Method, where: str) -> dict:
    """Check a `parameters` mapping: known parameters, values of their type (converted)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a mapping of parameter names to values, got {data!r}")
    out = {}
    for name, setting in data.items():
        if name not in method.param_names:
            known = ", ".join(method.param_names) or "none"
            raise table.MethodError(f"{where}.{name}: method {method.name} has no parameter {name!r} (its parameters: {known})")
        out[name] = _setting(setting, method.param(name), f"{where}.{name}")
    return out


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

    scopes = [recipe.parameters] + [s.parameters for s in recipe.sources()] + [sl.parameters for sl in recipe.slices or []]
    return any(has(v) for scope in scopes for v in scope.values())
