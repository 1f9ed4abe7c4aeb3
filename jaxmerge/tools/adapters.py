"""Merge PEFT LoRA adapters saved on disk, without the base model.

Follows `peft.tuners.lora.model.LoraModel.add_weighted_adapter` (PEFT 0.21)
rule for rule, with every merge done by the jaxmerge core:

* Per-layer scaling: lora_alpha / r (lora_alpha / sqrt(r) with rslora), with
  `rank_pattern` and `alpha_pattern` matched on the module name as PEFT does.
* linear, ties, dare_linear, dare_ties, magnitude_prune: each weight times the
  layer's scaling is split between A and B as sqrt(|w s|), the sign on A, and
  the A's and B's are merged separately. All adapters need the same r.
* cat: A's (scaled by weight and scaling) stacked on rows, B's on columns; r is the sum.
* svd and the *_svd types: the layers' delta weights B @ A * scaling are
  merged, then factored by SVD to `svd_rank` (default: the largest r),
  optionally clamped at the `svd_clamp` quantile.
* The new config is the first adapter's with r = lora_alpha = the new rank,
  the union of target modules and no rank or alpha pattern.

Linear, Embedding and Conv2d LoRA layers are supported (Conv2d deltas are
composed as PEFT's `get_delta_weight` does). Reading an adapter (its config,
scaling and factors) lives in `jaxmerge.formats.lora`; `Adapter` and
`load_adapter` are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import __version__
from jaxmerge.engine._atomic import atomic_directory, lies_inside
from jaxmerge.methods.pytree import bind_method, merge_leaf, path_key
from jaxmerge.formats.lora import KINDS, Adapter, load_adapter, lora_product
from jaxmerge.formats.safetensors_io import DTYPES, CheckpointError, ShardWriter, TensorInfo

__all__ = ["COMBINATION_TYPES", "Adapter", "load_adapter", "merge_lora"]

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
    "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
)
_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_CORE_METHOD = {
    "linear": "task_arithmetic", "svd": "task_arithmetic", "ties": "ties", "ties_svd": "ties",
    "dare_linear": "dare_linear", "dare_linear_svd": "dare_linear", "dare_ties": "dare_ties",
    "dare_ties_svd": "dare_ties", "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune",
}
def _new_target_modules(adapters: list[Adapter]):
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, (list, tuple)) for t in targets):
        return sorted(set().union(*map(set, targets)))
    raise CheckpointError("all adapters' target_modules must be lists, or all strings, as PEFT requires")


def _svd_factors(delta: jnp.ndarray, rank: int, clamp, a_shape, b_shape):
    """Factor a merged delta into (A, B) of rank `rank`, as PEFT's SVD path."""
    conv = delta.ndim == 4
    matrix = delta.reshape(delta.shape[0], -1) if conv else delta
    u, s, vh = jnp.linalg.svd(matrix.astype(jnp.float32), full_matrices=False)
    u = u[:, :rank] * s[:rank]
    vh = vh[:rank, :]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.ravel(), vh.ravel()]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    if conv:
        return vh.reshape(a_shape), u.reshape(b_shape)
    return vh, u


def merge_lora(
    adapter_dirs: Sequence[str | os.PathLike],
    weights: Sequence[float],
    output_dir: str | os.PathLike,
    *,
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Merge LoRA adapters from disk into a new adapter directory that PEFT loads.

    Args:
      adapter_dirs: PEFT adapter directories (adapter_config.json + adapter_model.safetensors).
      weights: one weight per adapter (negative subtracts).
      output_dir: the new adapter directory (written atomically).
      combination_type: one of `COMBINATION_TYPES`, as `add_weighted_adapter`.
      density: for the pruning types.
      majority_sign_method: "total" or "frequency".
      svd_rank: rank of the SVD types (default: the largest input rank).
      svd_clamp: quantile for clamping the SVD factors (None: no clamp).
      seed: DARE's key is `jax.random.key(seed)`; tensor `name` uses `path_key(key, name)`.
      force: replace an existing output directory.

    Returns:
      The new adapter's config (also written to adapter_config.json).
    """
    if combination_type not in COMBINATION_TYPES:
        raise CheckpointError(f"combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}")
    adapters = [load_adapter(p) for p in adapter_dirs]
    if not adapters:
        raise CheckpointError("at least one adapter directory is needed")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise CheckpointError(f"got {len(weights)} weights for {len(adapters)} adapters")
    out = Path(output_dir)
    for a in adapters:
        if lies_inside(out, a.path):
            raise CheckpointError(f"output {out} lies inside input {a.path}: choose another output")
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter can only be scaled
    ranks = [a.max_rank for a in adapters]
    if combination_type in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise CheckpointError(
                f"combination_type {combination_type} needs adapters of one rank, got r = {ranks} "
                f"for {[str(a.path) for a in adapters]}"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    method = _CORE_METHOD.get(combination_type)
    if method not in (None, "task_arithmetic") and density is None:
        raise CheckpointError(f"combination_type {combination_type} needs a density")

    key = jax.random.key(seed)
    layers: dict[str, str] = {}
    for a in adapters:
        layers.update(a.layers())
    merged: dict[str, np.ndarray] = {}

    def _bind(layer_weights):
        # PEFT's semantics on the factors or deltas taken as task vectors (no base), as add_weighted_adapter.
        params = {"weight": layer_weights, "semantics": "peft"}
        if method != "task_arithmetic":
            params["density"] = density
        if method in ("ties", "dare_ties"):
            params["majority_sign_method"] = majority_sign_method
        return bind_method(method, params, len(layer_weights), has_base=False)

    for module, kind in sorted(layers.items()):
        present = [(a, w) for a, w in zip(adapters, weights) if module in a.layers()]
        suffix_a, suffix_b = KINDS[kind]
        name_a, name_b = module + suffix_a, module + suffix_b
        factors = [a.factors(module, kind) for a, _ in present]
        dtype = factors[0][0].dtype
        if combination_type == "cat":
            a_rows = np.concatenate([fa * (w * ad.scaling(module)) for (fa, _), (ad, w) in zip(factors, present)], axis=0)
            b_cols = np.concatenate([fb for _, fb in factors], axis=1)
            new_a = np.zeros((new_rank, *a_rows.shape[1:]), dtype)
            new_b = np.zeros((b_cols.shape[0], new_rank, *b_cols.shape[2:]), dtype)
            new_a[: a_rows.shape[0]] = a_rows
            new_b[:, : b_cols.shape[1]] = b_cols
        elif combination_type.endswith("svd"):
            deltas = []
            for (fa, fb), (ad, _) in zip(factors, present):
                fa32, fb32 = jnp.asarray(fa, jnp.float32), jnp.asarray(fb, jnp.float32)
                delta = lora_product(fa32, fb32, "linear")  # B @ A, conv kernels composed; not transposed
                deltas.append(delta * ad.scaling(module))
            delta = merge_leaf(deltas, *_bind([w for _, w in present]), key=path_key(key, module))
            a_shape = (new_rank, *factors[0][0].shape[1:])
            b_shape = (factors[0][1].shape[0], new_rank, *factors[0][1].shape[2:])
            new_a, new_b = (np.asarray(t) for t in _svd_factors(delta, new_rank, svd_clamp, a_shape, b_shape))
        else:
            w_a, w_b = [], []
            for ad, w in present:
                scaled = w * ad.scaling(module)
                w_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
                w_b.append(math.sqrt(abs(scaled)))
            new_a = np.asarray(merge_leaf([fa for fa, _ in factors], *_bind(w_a), key=path_key(key, name_a)))
            new_b = np.asarray(merge_leaf([fb for _, fb in factors], *_bind(w_b), key=path_key(key, name_b)))
        merged[name_a] = np.asarray(new_a).astype(dtype)
        merged[name_b] = np.asarray(new_b).astype(dtype)

    first = adapters[0].config
    config = dict(first)
    config.update(
        r=new_rank, lora_alpha=new_rank, target_modules=_new_target_modules(adapters),
        alpha_pattern={}, rank_pattern={},
    )
    recipe = {
        "combination_type": combination_type, "adapters": [str(a.path) for a in adapters], "weights": weights,
        "density": density, "majority_sign_method": majority_sign_method, "svd_rank": svd_rank,
        "svd_clamp": svd_clamp, "seed": seed, "jaxmerge_version": __version__,
    }
    code_of = {dt: code for code, dt in DTYPES.items()}
    infos = [TensorInfo(n, tuple(t.shape), code_of[np.dtype(t.dtype)]) for n, t in merged.items()]
    planned = sum(info.nbytes for info in infos) + 64 * 1024  # the tensors, plus headers and JSON files
    with atomic_directory(out, force=force, expected_bytes=planned) as tmp:
        writer = ShardWriter(tmp / "adapter_model.safetensors", infos, {"format": "pt", "jaxmerge_recipe": json.dumps(recipe)})
        try:
            for info in infos:
                writer.write(info.name, merged[info.name])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "jaxmerge_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return config
