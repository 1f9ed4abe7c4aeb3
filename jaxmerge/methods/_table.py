"""The method table: every merge method declared once, read by every entry point.

A `Method` names its tensor function, its parameters (type, default, range,
scope), how it treats a base model, whether it is random, how many models it
takes and its paper. The CLI (`jaxmerge merge`, `jaxmerge methods`), recipes,
`merge_params`, checkpoint merging and Orbax merging all go through
`Method.bind` (validation, defaults, one line naming the method, parameter and
value) and `Method.merge` (one tensor). Adding a method is one function, one
`Method(...)` in its module's `METHODS` and its tests.

The idea follows mergekit's `merge_methods/registry.py` (ParameterSpec,
InputContract); semantics of the shared methods are mergekit's or PEFT's by a
parameter of the same code (see `jaxmerge.methods.task_arithmetic`).

The tensor function's convention (mergekit's `TensorGroup`): it receives
`inputs`, one same-shape array per model in the order given, with the base
model among them at `base_index` (None without a base), keyword `key` (a PRNG
key for random methods, else None) and the bound parameters: per-model
parameters as tuples aligned with `inputs` (the base's slot holds the default
and is ignored by methods that skip the base), shared ones as scalars.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REQUIRED = object()  # marks a parameter without default


class Scope(str, Enum):
    """Along which axis a parameter varies (mergekit's ParameterScope)."""

    SHARED = "shared"  # one value for the whole merge
    PER_MODEL = "per_model"  # one value per model other than the base (the base's slot holds the default or None)
    PER_INPUT = "per_input"  # one value per input, the base's included


class BasePolicy(str, Enum):
    """How a method treats a base model."""

    REQUIRED = "required"  # task vectors against the base, or the base is an end point (slerp)
    OPTIONAL = "optional"
    IGNORED = "ignored"  # a base given for other reasons is not an input of the merge


class MethodError(ValueError):
    """A method, parameter or model count that does not fit the table; one line naming it."""


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    Args:
      name: the parameter's name in recipes, flags and keyword arguments.
      kind: float, int, bool or str.
      default: the default, or `REQUIRED`.
      scope: `Scope.SHARED` or `Scope.PER_MODEL`.
      low, high: inclusive bounds for numbers (None: unbounded).
      low_open, high_open: make the bound exclusive.
      choices: allowed values for strings.
      doc: one line for `jaxmerge methods` and the README.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    scope: Scope = Scope.SHARED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Convert and range-check one value; `where` names it in the error ("ties: density")."""
        if value is None and not self.required and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise MethodError(f"{where} must be true or false, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise MethodError(f"{where} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise MethodError(f"{where} must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_real_scalar(value):
            raise MethodError(f"{where} must be a number, got {value!r}")
        number = float(value)
        if self.kind is int:
            if number != int(number):
                raise MethodError(f"{where} must be an integer, got {value!r}")
            number = int(number)
        if math.isnan(number):
            raise MethodError(f"{where} must be a number, got nan")
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            raise MethodError(f"{where} must be {self._range()}, got {value!r}")
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            raise MethodError(f"{where} must be {self._range()}, got {value!r}")
        return number

    def _range(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        bits = [self.kind.__name__, self.scope.value.replace("_", " "), default]
        if self.choices:
            bits.append("one of " + "/".join(self.choices))
        elif self.low is not None or self.high is not None:
            bits.append(self._range())
        return f"{self.name} ({', '.join(bits)}): {self.doc}"


def _is_real_scalar(value: Any) -> bool:
    try:
        import numpy as np

        return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
    except Exception:  # noqa: BLE001 - anything that is not a NumPy scalar is not a number here
        return False


@dataclass(frozen=True)
class Method:
    """One merge method: its tensor function and everything needed to call it safely.

    Args:
      name: the method's name (mergekit's where mergekit has it).
      merge: `merge(inputs, base_index, *, key, **params) -> Array` (see the module docstring).
      params: the parameters.
      base: `BasePolicy`.
      random: the method draws from `key`.
      min_models, max_models: number of inputs, the base included when it is an input.
      paper: citation (authors, year, arXiv id).
      summary: one line.
      check: optional `check(bound_params, num_inputs) -> None` for constraints between parameters.
      task_vectors: without a base, the inputs are taken as task vectors (the
        result is their merge, not base + merge): merge_params and LoRA factors.
      entrywise: optional `entrywise(bound_params) -> bool`, true when with these
        parameters every output entry comes from the inputs' entries at the same
        flat (row-major) position and from per-tensor values that do not depend
        on the shape (counts, random bits in flat order): merging any reshape of
        the tensors then gives the same values. The checkpoint merge uses it to
        merge every tensor of one size through one compiled kernel
        (`merges_entrywise`). None: shape matters (SVDs, per-row statistics,
        float sums whose order follows the shape).
      identity: optional `identity(bound_params) -> bool`, true when with these
        parameters the merge returns its one input unchanged (passthrough without a
        scale). The checkpoint merge then writes the input's bytes as they are,
        without compiling or running a kernel (`returns_input`).
    """

    name: str
    merge: Callable[..., jax.Array]
    params: tuple[Param, ...]
    base: BasePolicy
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    paper: str = ""
    summary: str = ""
    check: Callable[[dict, int], None] | None = field(default=None, compare=False)
    task_vectors: bool = False
    entrywise: Callable[[Mapping[str, Any]], bool] | None = field(default=None, compare=False)
    identity: Callable[[Mapping[str, Any]], bool] | None = field(default=None, compare=False)

    def merges_entrywise(self, bound: Mapping[str, Any]) -> bool:
        """The merge with these bound parameters may be given any reshape of the tensors (see `entrywise`)."""
        return self.entrywise is not None and bool(self.entrywise(bound))

    def returns_input(self, bound: Mapping[str, Any]) -> bool:
        """The merge with these bound parameters is its one input, unchanged (see `identity`)."""
        return self.identity is not None and bool(self.identity(bound))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_inputs(self, num_inputs: int, has_base: bool) -> None:
        """Raise MethodError when the method cannot take this many inputs, or needs a base."""
        if self.base is BasePolicy.REQUIRED and not has_base and not self.task_vectors:
            raise MethodError(f"method {self.name} needs a base model (base_model / --base)")
        if num_inputs < self.min_models:
            raise MethodError(f"method {self.name} takes at least {self.min_models} models{self._counted()}, got {num_inputs}")
        if self.max_models is not None and num_inputs > self.max_models:
            exactly = "exactly" if self.max_models == self.min_models else "at most"
            raise MethodError(f"method {self.name} takes {exactly} {self.max_models} models{self._counted()}, got {num_inputs}")

    def _counted(self) -> str:
        return " (the base included)" if self.base is not BasePolicy.IGNORED else ""

    def bind(self, values: Mapping[str, Any], num_inputs: int, where: str = "", base_index: int | None = None) -> dict:
        """Fill defaults and check every parameter before any tensor is read.

        Args:
          values: parameter values; a per-model parameter takes a scalar (same for
            every model) or a sequence with one value per model, the base left
            out for `PER_MODEL` parameters (None: the default).
          num_inputs: number of inputs, the base included when it is an input.
          where: prefix naming the source in errors (a recipe file, "merge_params").
          base_index: the base's slot among the inputs, or None; a `PER_MODEL`
            parameter there takes its default (None when required) unchecked.

        Returns:
          A dict of every parameter: per-model ones as tuples of `num_inputs`.

        Raises:
          MethodError: unknown or missing parameter, wrong count or a value out of range.
        """
        prefix = f"{where}: " if where else ""
        unknown = sorted(set(values) - set(self.param_names))
        if unknown:
            known = ", ".join(self.param_names) or "none"
            raise MethodError(f"{prefix}method {self.name} has no parameter {unknown[0]!r} (its parameters: {known})")
        bound = {}
        for p in self.params:
            value = values.get(p.name, None)
            label = f"{prefix}{self.name}: {p.name}"
            if p.scope is Scope.SHARED:
                if value is None:
                    if p.required:
                        raise MethodError(f"{label} is required")
                    bound[p.name] = p.default
                else:
                    bound[p.name] = p.check(value, label)
                continue
            skips_base = p.scope is Scope.PER_MODEL and base_index is not None
            if isinstance(value, (list, tuple)):
                # A per-model list names the models other than the base; the base's slot is added here.
                expected = num_inputs - skips_base
                if len(value) != expected:
                    raise MethodError(f"{label}: got {len(value)} values for {expected} models")
                per_model = list(value)
                if skips_base:
                    per_model.insert(base_index, None)
            else:
                per_model = [value] * num_inputs
            out = []
            for i, item in enumerate(per_model):
                if skips_base and i == base_index:
                    out.append(None if p.required else p.default)
                elif item is None:
                    if p.required:
                        raise MethodError(f"{label} is required (missing for model {i})")
                    out.append(p.default)
                else:
                    out.append(p.check(item, f"{label}[{i}]" if isinstance(value, (list, tuple)) else label))
            bound[p.name] = tuple(out)
        if self.check is not None:
            self.check(bound, num_inputs)
        return bound


_REGISTRY: dict[str, Method] = {}


def register(*methods: Method) -> None:
    """Add methods to the table; a name is declared once."""
    for method in methods:
        if method.name in _REGISTRY:
            raise ValueError(f"merge method {method.name!r} is declared twice")
        _REGISTRY[method.name] = method


def get(name: str) -> Method:
    """The method called `name`; MethodError listing every name otherwise."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown merge method {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> tuple[str, ...]:
    """Every method's name, sorted."""
    _load()
    return tuple(sorted(_REGISTRY))


def all_methods() -> tuple[Method, ...]:
    """Every method of the table, sorted by name."""
    _load()
    return tuple(_REGISTRY[n] for n in sorted(_REGISTRY))


_loaded = False


def _load() -> None:
    """Import the method modules and register their METHODS, once, whatever the caller imported first."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from jaxmerge.methods._modules import MODULES

    for name in MODULES:
        register(*importlib.import_module(name).METHODS)


def merge_tensor(
    method: Method,
    inputs: Sequence[jax.Array],
    base_index: int | None,
    params: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Merge one tensor with bound parameters (`Method.bind`): the unit of every model merge."""
    return method.merge(tuple(inputs), base_index, key=key if method.random else None, **params)


def split_inputs(inputs: Sequence[Any], base_index: int | None) -> tuple[list[Any], Any]:
    """The non-base inputs in order, and the base (None without one)."""
    if base_index is None:
        return list(inputs), None
    return [x for i, x in enumerate(inputs) if i != base_index], inputs[base_index]


def non_base(values: Sequence[Any], base_index: int | None) -> list[Any]:
    """A per-model parameter's values without the base's slot."""
    return [x for i, x in enumerate(values) if i != base_index]


def weight_array(weights: Sequence[Any]) -> np.ndarray | jax.Array:
    """Per-model weights for a kernel: NumPy when known now (the kernel call moves them), stacked
    when traced (`merge_params` under `jax.grad`, `jit` or `vmap`)."""
    if all(isinstance(w, (int, float, np.number)) for w in weights):
        return np.asarray(weights, np.float32)
    return jnp.stack([jnp.asarray(w, jnp.float32) for w in weights])
