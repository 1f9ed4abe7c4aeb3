"""YAML merge recipes, in the spirit of mergekit's configs.

    method: ties                 # or task_arithmetic, dare_linear, dare_ties, magnitude_prune,
                                 # or any LoRA combination type when the models are adapters
    base: path/to/base           # optional (checkpoints): task vectors are model - base
    density: 0.2                 # default for every model
    majority_sign_method: total
    seed: 0
    output: merged/
    max_shard_size: 5GB
    models:
      - path: model_a/
        weight: 1.0
        density: 0.3             # per-model density overrides the default
      - path: model_b/
        weight: 0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxmerge.io.safetensors_io import CheckpointError

_TOP_KEYS = {
    "method", "base", "density", "majority_sign_method", "seed", "output", "max_shard_size",
    "models", "svd_rank", "svd_clamp",
}
_MODEL_KEYS = {"path", "weight", "density"}


@dataclass
class Recipe:
    method: str
    inputs: list[str]
    weights: list[float]
    density: float | list[float] | None = None
    majority_sign_method: str | None = None
    seed: int = 0
    base: str | None = None
    output: str | None = None
    max_shard_size: str = "5GB"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    extra: dict = field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe file; paths are relative to the recipe's directory."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: cannot read the recipe ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a recipe is a mapping with 'method' and 'models'")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r} (known: {sorted(_TOP_KEYS)})")
    for required in ("method", "models"):
        if required not in data:
            raise CheckpointError(f"{path}: the recipe needs '{required}'")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise CheckpointError(f"{path}: 'models' must be a non-empty list of {{path, weight, density}}")
    here = path.parent
    inputs, weights, densities = [], [], []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "path" not in m:
            raise CheckpointError(f"{path}: models[{i}] needs a 'path'")
        bad = sorted(set(m) - _MODEL_KEYS)
        if bad:
            raise CheckpointError(f"{path}: models[{i}] has unknown key {bad[0]!r} (known: {sorted(_MODEL_KEYS)})")
        inputs.append(str(here / m["path"]))
        weights.append(float(m.get("weight", 1.0)))
        densities.append(m.get("density", data.get("density")))
    density = None
    if any(d is not None for d in densities):
        if any(d is None for d in densities):
            raise CheckpointError(f"{path}: give a density for every model, or a top-level default")
        density = densities[0] if len(set(densities)) == 1 else [float(d) for d in densities]
    resolve = lambda p: None if p is None else str(here / p)  # noqa: E731
    return Recipe(
        method=data["method"], inputs=inputs, weights=weights, density=density,
        majority_sign_method=data.get("majority_sign_method"), seed=int(data.get("seed", 0)),
        base=resolve(data.get("base")), output=resolve(data.get("output")),
        max_shard_size=str(data.get("max_shard_size", "5GB")),
        svd_rank=data.get("svd_rank"), svd_clamp=data.get("svd_clamp"),
    )
