"""PEFT LoRA adapters: reading one (config, per-layer scaling, delta weights) and folding it into its model.

One reading of an adapter directory (`load_adapter`) serves both the adapter
merges of `jaxmerge.tools.adapters` and `LoraFolded`, the tensor source that
gives a model's tensors with an adapter merged in, as mergekit does for a model
reference `model+lora` (`split_lora_reference` parses one).

What mergekit 0.1.5 does for `model+lora` (`ModelReference.merged`): it loads
the model with transformers (`from_pretrained(torch_dtype=lora_merge_dtype)`;
the option is unset by default, and transformers 5 then loads in the dtype of
config.json), loads the adapter with `PeftModel.from_pretrained`, calls
`merge_and_unload()` and saves the result as safetensors, which the merge
then reads. PEFT (0.21) keeps the LoRA factors in float32 when the model is
float16/bfloat16 (float64 when it is float64), and merges, per layer:

* Linear and Conv: W <- W + scaling * (B @ A), the product in float32 and the
  sum in float32, rounded once to W's dtype (an in-place add of a float32
  delta); with `fan_in_fan_out` (GPT-2's Conv1D) the product is transposed.
  A LoRA bias (`lora_bias`) adds scaling * lora_B.bias to the layer's bias.
* Embedding: W <- W + round_to_W's_dtype(scaling * (B @ A))^T: the delta is
  rounded to W's dtype before the add.
* Tensors saved whole in the adapter replace the model's: `modules_to_save`
  (saved as `base_model.model.lm_head.weight`), the embedding's base weights
  saved when an embedding layer is targeted (`...embed_tokens.base_layer.weight`,
  loaded before the LoRA delta is added), biases saved with `bias="all"`.

`LoraFolded` does the same arithmetic in NumPy, so its tensors equal
`merge_and_unload()`'s to float32 round-off (the matmul's summation order).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxmerge.formats.safetensors_io import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, Checkpoint, CheckpointError, TensorInfo, copy_to_host
from jaxmerge.formats.sources import TensorSource, open_checkpoint

PREFIX = "base_model.model."  # PeftModel's prefix of every saved key
KINDS = {  # LoRA factor suffixes (A, B) on disk; conv layers use the linear names
    "linear": (".lora_A.weight", ".lora_B.weight"),
    "embedding": (".lora_embedding_A", ".lora_embedding_B"),
}
_LORA_BIAS = ".lora_B.bias"
# Config fields that switch on a LoRA variant whose merge is not W + s * B @ A (PEFT 0.21's
# `is_lora_variant` fields, and QALoRA), and features that change the model's structure.
_VARIANTS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
             "arrow_config", "kasa_config", "use_qalora")
_STRUCTURAL = ("trainable_token_indices", "layer_replication", "target_parameters")


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory: its checked config and its weights (read on demand).

    Attributes:
      path: the directory.
      config: adapter_config.json, checked by `_check_config`.
      weights: adapter_model.safetensors (or adapter_model.bin) as a tensor source.
    """

    path: Path
    config: dict
    weights: TensorSource

    @property
    def max_rank(self) -> int:
        pattern = self.config.get("rank_pattern") or {}
        return max([self.config["r"], *pattern.values()])

    def layers(self) -> dict[str, str]:
        """module name (with PEFT's prefix) -> "linear" or "embedding" (conv layers use the linear names)."""
        found = {}
        for name in self.weights.tensors:
            for kind, (suffix_a, _) in KINDS.items():
                if name.endswith(suffix_a):
                    found[name[: -len(suffix_a)]] = kind
        return found

    def factors(self, module: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of one layer as stored (NumPy; bfloat16 via ml_dtypes)."""
        suffix_a, suffix_b = KINDS[kind]
        return self.weights.read_host(module + suffix_a), self.weights.read_host(module + suffix_b)

    def rank(self, module: str) -> int:
        """r of one layer: `rank_pattern` matched on the module name as PEFT does, else r."""
        return _pattern_value(self.config.get("rank_pattern") or {}, _relative(module), self.config["r"])

    def scaling(self, module: str) -> float:
        """lora_alpha / r of one layer (lora_alpha / sqrt(r) with use_rslora), with PEFT's pattern matching."""
        r = self.rank(module)
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, _relative(module), self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _relative(module: str) -> str:
    """The module's name in the model (PEFT matches its patterns on this)."""
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


def _pattern_value(patterns: dict, key: str, default):
    """The value of the first pattern matching the end of `key` at a dot boundary (PEFT's `get_pattern_key`)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Open a PEFT LoRA adapter directory; its config is checked before any weight is read.

    Args:
      path: the directory with adapter_config.json and adapter_model.safetensors (or adapter_model.bin).

    Returns:
      The adapter, weights opened (specs read, data on demand).

    Raises:
      CheckpointError: one line naming the file (and the key) that is missing or wrong.
    """
    p = Path(path)
    config_file = p / "adapter_config.json"
    if not config_file.exists():
        raise CheckpointError(f"{p}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: unreadable JSON ({err})") from None
    _check_config(config_file, config)
    if (p / "adapter_model.safetensors").exists():
        return Adapter(p, config, Checkpoint(p / "adapter_model.safetensors"))
    if (p / "adapter_model.bin").exists():  # PEFT's format before safetensors: a pickle, read restricted
        from jaxmerge.formats.torch_bin import TorchBinCheckpoint  # noqa: PLC0415 - imports torch

        return Adapter(p, config, TorchBinCheckpoint(p / "adapter_model.bin"))
    raise CheckpointError(f"{p}: no adapter_model.safetensors (nor adapter_model.bin)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(file: Path, config) -> None:
    """The keys the merge reads, with their types: a wrong one is named with its file."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must be a JSON object with the LoRA config (r, lora_alpha, ...), got a JSON {_json_type(config)}")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {config.get('peft_type')}, only LORA adapters merge here")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise CheckpointError(f"{file}: the key {key!r} is missing (a LoRA config names its rank r and lora_alpha)")
    if not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] <= 0:
        raise CheckpointError(f"{file}: 'r' must be a positive integer, got {config['r']!r}")
    if not _is_number(config["lora_alpha"]):
        raise CheckpointError(f"{file}: 'lora_alpha' must be a number, got {config['lora_alpha']!r}")
    for key, valid, what in (
        ("rank_pattern", lambda r: isinstance(r, int) and not isinstance(r, bool) and r > 0, "a positive integer"),
        ("alpha_pattern", _is_number, "a number"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{file}: {key!r} must be a JSON object (module pattern -> value), got {patterns!r}")
        for pattern, value in patterns.items():
            if not valid(value):
                raise CheckpointError(f"{file}: {key}[{pattern!r}] must be {what}, got {value!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise CheckpointError(f"{file}: 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise CheckpointError(f"{file}: 'target_modules' must be a string or a list of strings, got {targets!r}")


def _check_foldable(file: Path, config: dict) -> None:
    """Refuse the options whose merge is not W + scaling * B @ A on the model's own tensors."""
    for key in _VARIANTS + _STRUCTURAL:
        if config.get(key):
            raise CheckpointError(f"{file}: {key} = {config[key]!r}: only plain LoRA adapters can be folded into a model")
    if config.get("init_lora_weights") == "mica":  # MiCA merges with its own variant
        raise CheckpointError(f"{file}: init_lora_weights = 'mica': only plain LoRA adapters can be folded into a model")


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def lora_product(a, b, kind: str, *, fan_in_fan_out: bool = False):
    """B @ A laid out as the layer's weight (unscaled), for NumPy or JAX arrays.

    Args:
      a, b: the stored factors: linear A (r, in), B (out, r); embedding A (r, vocab), B (dim, r);
        conv A (r, in, *kernel), B (out, r, 1, ...) (PEFT's B is a 1x1 kernel, so the
        composition is a matrix product).
      kind: "linear" (conv when A has more than 2 dimensions) or "embedding".
      fan_in_fan_out: the layer stores its weight as (in, out) (GPT-2's Conv1D).

    Returns:
      The delta's shape: (out, in), (in, out) with fan_in_fan_out, (vocab, dim), or (out, in, *kernel).
    """
    if kind == "embedding":
        return (b @ a).T
    if a.ndim > 2:
        flat = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        return flat.reshape(b.shape[0], *a.shape[1:])
    product = b @ a
    return product.T if fan_in_fan_out else product


def _delta_shape(a_shape, b_shape, kind, fan_in_fan_out) -> tuple[int, ...] | None:
    """The shape `lora_product` gives, or None when A and B do not compose."""
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1]:
        return None
    if kind == "embedding":
        return (a_shape[1], b_shape[0]) if len(a_shape) == len(b_shape) == 2 else None
    if len(a_shape) > 2:
        ok = len(b_shape) == len(a_shape) and all(k == 1 for k in b_shape[2:])
        return (b_shape[0], *a_shape[1:]) if ok else None
    if len(b_shape) != 2:
        return None
    return (a_shape[1], b_shape[0]) if fan_in_fan_out else (b_shape[0], a_shape[1])


@dataclass(frozen=True)
class _Fold:
    """How one model tensor is made: replaced by an adapter tensor, and/or plus a LoRA delta."""

    replace: str | None = None  # adapter key whose tensor replaces the model's
    kind: str | None = None  # "linear" (also conv), "embedding" or "bias"; None: no delta
    a: str | None = None  # adapter keys of the factors (bias: b is lora_B.bias)
    b: str | None = None
    scaling: float = 0.0


class LoraFolded:
    """A model's tensors with a PEFT LoRA adapter merged in, as mergekit's `model+lora` (a `TensorSource`).

    Targeted weights are read as W + scaling * (B @ A) (see the module docstring for PEFT's exact
    arithmetic, which this follows); tensors the adapter saves whole replace the model's;
    every other tensor passes through. Everything is checked when opened: an adapter that
    does not fit its model fails before any tensor is merged.
    """

    def __init__(self, model: str | os.PathLike | TensorSource, adapter: str | os.PathLike | Adapter, *,
                 dtype: str | None = None):
        """Open the model and adapter and plan every tensor.

        Args:
          model: the model checkpoint (anything `open_checkpoint` takes, or an opened source).
          adapter: a PEFT adapter directory or a loaded `Adapter`.
          dtype: safetensors code of the floating dtype the model is loaded in before merging,
            as transformers does for mergekit (see `mergekit_load_dtype`); None: each tensor's own.

        Raises:
          CheckpointError: one line naming the adapter file, the tensor and both shapes when the
            adapter does not fit the model, or what else is wrong.
        """
        self.model = open_checkpoint(model)
        self.adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
        self.path = self.model.path
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
        self._file = Path(getattr(self.adapter.weights, "path", self.adapter.path))
        _check_foldable(self.adapter.path / "adapter_config.json", self.adapter.config)
        self._folds = self._plan()
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in self.model.tensors.items():
            out = dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype
            self.tensors[name] = TensorInfo(name, info.shape, out)

    def _model_tensor(self, key: str, name: str, floating: bool = True) -> TensorInfo:
        info = self.model.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self._file}: {key} targets {name}, which the model {self.path} does not have")
        if floating and info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self._file}: {key} targets {name}, a {info.dtype} tensor of {self.path}")
        return info

    def _plan(self) -> dict[str, _Fold]:
        """model tensor -> _Fold, every shape checked against the model."""
        specs = self.adapter.weights.tensors
        fan_in_fan_out = bool(self.adapter.config.get("fan_in_fan_out"))
        folds: dict[str, _Fold] = {}
        factors: dict[str, dict[str, str]] = {}  # module -> {"A"|"B"|"bias": key}
        for key, spec in specs.items():
            if spec.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{self._file}: {key} is a {spec.dtype} tensor; adapter weights are floating point")
            for role, suffix in (("A", KINDS["linear"][0]), ("B", KINDS["linear"][1]), ("bias", _LORA_BIAS),
                                 ("eA", KINDS["embedding"][0]), ("eB", KINDS["embedding"][1])):
                if key.endswith(suffix):
                    factors.setdefault(key[: -len(suffix)], {})[role] = key
                    break
            else:
                if ".lora_" in key or key.startswith("lora_"):
                    raise CheckpointError(f"{self._file}: {key} is not a LoRA factor this reader knows "
                                          f"(lora_A/lora_B weights, lora_B bias, lora_embedding_A/B)")
                name = self._replaced_name(key)
                info = self._model_tensor(key, name, floating=False)
                if tuple(spec.shape) != info.shape or (info.dtype in FLOAT_DTYPES) != (spec.dtype in FLOAT_DTYPES):
                    raise CheckpointError(f"{self._file}: {key} has shape {list(spec.shape)} ({spec.dtype}), but the model "
                                          f"{self.path} has {name} of shape {list(info.shape)} ({info.dtype})")
                folds[name] = _Fold(replace=key)
        for module, roles in factors.items():
            kind = "embedding" if "eA" in roles or "eB" in roles else "linear"
            a_key, b_key = (roles.get("eA"), roles.get("eB")) if kind == "embedding" else (roles.get("A"), roles.get("B"))
            if a_key is None or b_key is None or (kind == "embedding" and ("A" in roles or "B" in roles)):
                raise CheckpointError(f"{self._file}: {module} has the LoRA tensors {sorted(roles.values())}; "
                                      f"a layer needs exactly one A and one B")
            a_shape, b_shape = tuple(specs[a_key].shape), tuple(specs[b_key].shape)
            name = _relative(module) + ".weight"
            info = self._model_tensor(a_key, name)
            delta = _delta_shape(a_shape, b_shape, kind, fan_in_fan_out)
            if delta != info.shape:
                raise CheckpointError(
                    f"{self._file}: {a_key} {list(a_shape)} and {b_key} {list(b_shape)} make a delta of shape "
                    f"{list(delta) if delta else 'none (they do not compose)'}, but the model {self.path} has {name} "
                    f"of shape {list(info.shape)}")
            rank = self.adapter.rank(module)
            if a_shape[0] != rank:
                raise CheckpointError(f"{self._file}: {a_key} has rank {a_shape[0]} (shape {list(a_shape)}), its config "
                                      f"gives {_relative(module)} r = {rank}")
            scaling = self.adapter.scaling(module)
            folds[name] = _Fold(replace=folds.get(name, _Fold()).replace, kind=kind, a=a_key, b=b_key, scaling=scaling)
            if "bias" in roles:
                bias = _relative(module) + ".bias"
                bias_info = self._model_tensor(roles["bias"], bias)
                if tuple(specs[roles["bias"]].shape) != bias_info.shape:
                    raise CheckpointError(
                        f"{self._file}: {roles['bias']} has shape {list(specs[roles['bias']].shape)}, but the model "
                        f"{self.path} has {bias} of shape {list(bias_info.shape)}")
                folds[bias] = _Fold(replace=folds.get(bias, _Fold()).replace, kind="bias", b=roles["bias"], scaling=scaling)
        return folds

    def _replaced_name(self, key: str) -> str:
        """The model tensor an adapter's whole tensor replaces (PEFT's wrapper infixes removed)."""
        parts = [p for p in _relative(key).split(".") if p != "base_layer"]
        if "modules_to_save" in parts:  # older or hand-made saves keep the wrapper: <m>.modules_to_save[.<adapter>].weight
            i = parts.index("modules_to_save")
            for candidate in (parts[:i] + parts[i + 2:], parts[:i] + parts[i + 1:]):
                if ".".join(candidate) in self.model.tensors:
                    return ".".join(candidate)
        return ".".join(parts)

    def read_host(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor, the adapter merged in when it targets it.

        Args:
          name: the tensor.
          into: optional 64-byte-aligned uint8 buffer to write the result into (see `Checkpoint.read_host`).

        Returns:
          An array of `tensors[name]`'s shape and dtype.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        fold = self._folds.get(name)
        if fold is None and self.model.tensors[name].dtype == info.dtype:
            return self.model.read_host(name, into)
        out_dtype = DTYPES[info.dtype]
        weights = self.adapter.weights
        w = weights.read_host(fold.replace) if fold is not None and fold.replace else self.model.read_host(name)
        w = w.astype(out_dtype)  # transformers loads the model in this dtype before PEFT merges
        if fold is not None and fold.kind is not None:
            compute = np.float64 if info.dtype == "F64" else np.float32  # PEFT's float32 factors (float64 models: float64)
            if fold.kind == "bias":
                delta = weights.read_host(fold.b).astype(compute) * compute(fold.scaling)
            else:
                a, b = weights.read_host(fold.a).astype(compute), weights.read_host(fold.b).astype(compute)
                fan_in_fan_out = bool(self.adapter.config.get("fan_in_fan_out"))
                delta = lora_product(a, b, fold.kind, fan_in_fan_out=fan_in_fan_out) * compute(fold.scaling)
                if fold.kind == "embedding":  # PEFT's Embedding rounds the delta to the weight's dtype first
                    delta = delta.astype(out_dtype).astype(compute)
            w = (w.astype(compute) + delta).astype(out_dtype)
        return copy_to_host(w, into)


def mergekit_load_dtype(model_dir: str | os.PathLike, lora_merge_dtype: str | None = None) -> str | None:
    """The dtype mergekit 0.1.5 loads a model in to merge a LoRA into it (pass it to `LoraFolded(dtype=...)`).

    mergekit calls `from_pretrained(torch_dtype=lora_merge_dtype)`; unset, transformers 5
    loads in config.json's `dtype` (or the older `torch_dtype`), else in the dtype of the
    checkpoint's first floating tensor.

    Args:
      model_dir: the model's directory (a file's parent directory is used for config.json).
      lora_merge_dtype: mergekit's `--lora-merge-dtype` option, e.g. "bfloat16" (None: unset).

    Returns:
      A safetensors code ("F32", "BF16", ...), or None when neither the config nor the weights say.
    """
    def code(value, where):
        name = str(value).removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise CheckpointError(f"{where}: dtype {value!r} is not one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]

    if lora_merge_dtype:
        return code(lora_merge_dtype, "lora_merge_dtype")
    p = Path(model_dir)
    config_file = (p if p.is_dir() else p.parent) / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_file}: unreadable JSON ({err})") from None
        value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
        if value:
            return code(value, config_file)
    for info in open_checkpoint(p).tensors.values():
        if info.dtype in FLOAT_DTYPES:
            return info.dtype
    return None


def split_revision(ref: str) -> tuple[str, str | None]:
    """Split mergekit's `path@revision` (at most one '@'); an existing local path is a plain path.

    Returns:
      (path, revision or None).
    """
    if os.path.exists(ref) or "@" not in ref:
        return ref, None
    if ref.count("@") > 1:
        raise CheckpointError(f"{ref!r}: more than one '@' (a model path is PATH or PATH@REVISION)")
    path, revision = ref.split("@")
    if not path or not revision:
        raise CheckpointError(f"{ref!r}: empty path or revision around '@'")
    return path, revision


def split_lora_reference(ref: str) -> tuple[str, str | None]:
    """Split mergekit's model reference `MODEL+LORA` (each may carry `@revision`).

    As mergekit's `ModelReference.parse`: one '+' separates the model from its LoRA
    adapter. Unlike mergekit, an existing local path containing '+' is a plain path, and
    with several '+' the split whose model part exists locally is taken.

    Args:
      ref: e.g. "org/model", "org/model+org/lora", "org/model@main+./lora", "/data/a+b".

    Returns:
      (model reference, LoRA reference or None), revisions kept (see `split_revision`).

    Raises:
      CheckpointError: an empty side, or several '+' none of which splits off an existing model path.
    """
    if "+" not in ref or os.path.exists(ref):
        return ref, None
    cuts = [i for i, c in enumerate(ref) if c == "+"]
    if len(cuts) > 1:
        local = [i for i in cuts if os.path.exists(ref[:i])]
        if len(local) != 1:
            raise CheckpointError(f"{ref!r}: several '+' and no one of them follows an existing local model path "
                                  f"(a reference is MODEL or MODEL+LORA)")
        cuts = local
    model, lora = ref[: cuts[0]], ref[cuts[0] + 1:]
    if not model or not lora:
        raise CheckpointError(f"{ref!r}: empty model or LoRA path around '+' (a reference is MODEL or MODEL+LORA)")
    return model, lora
