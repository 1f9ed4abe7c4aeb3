"""Merge whole parameter pytrees (plain dicts, Flax, equinox): every leaf through the core.

Task vectors (Ilharco et al., 2023, arXiv:2212.04089): with `base`, each model's
task vector is `tree - base` and the result is `base + merge(task vectors)`.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import _validation as v
from jaxmerge import merging, pruning
from jaxmerge.sharding import shard

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_RANDOM = ("dare_linear", "dare_ties")
_PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of one leaf: `fold_in(key, crc32(path))`.

    Depends on the leaf's path only, so adding or removing another leaf, or
    visiting the leaves in another order, never changes this leaf's mask.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def _check_same_structure(paths: list[str], other: list[str], name: str) -> None:
    if paths == other:
        return
    for i, (a, b) in enumerate(zip(paths, other)):
        if a != b:
            raise ValueError(f"{name} differs from trees[0] at leaf {i}: {b} where trees[0] has {a}")
    longer, shorter = (paths, other) if len(paths) > len(other) else (other, paths)
    owner = "trees[0]" if longer is paths else name
    raise ValueError(f"{owner} has a leaf the other lacks: {longer[len(shorter)]}")


def merge_leaf(
    leaves: Sequence[jax.Array],
    weights,
    *,
    method: str,
    base: jax.Array | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
    mesh=None,
) -> jax.Array:
    """Merge one tensor from each model (and an optional base): the unit of every model merge.

    Args:
      leaves: one same-shape array per model.
      weights: one weight per model.
      method: one of `METHODS`.
      base: optional base tensor; the task vectors are then `leaf - base`.
      density: as the core functions take it, or one density per model.
      majority_sign_method, key: as the core functions take them.
      mesh: optional `jax.sharding.Mesh`: the tensors are sharded over it first.

    Returns:
      The merged tensor (`base + merged task vectors` when `base` is given), in the leaves' dtype.
    """
    tasks = [shard(jnp.asarray(leaf), mesh) for leaf in leaves]
    if base is not None:
        base = shard(jnp.asarray(base), mesh)
        tasks = [t - base for t in tasks]
    if isinstance(density, (list, tuple)):
        tasks, density = _prune_each(tasks, density, method, key), 1.0
    fn = getattr(merging, method)
    args = (tasks, weights) if method == "task_arithmetic" else (tasks, weights, density)
    if method in ("ties", "dare_ties"):
        args = (*args, majority_sign_method)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density")  # density 1 after per-model pruning
        merged = fn(*args, key=key) if method in _RANDOM else fn(*args)
    return merged if base is None else (base + merged).astype(base.dtype)


def _prune_each(tasks, densities, method, key):
    """Per-model densities (mergekit-style recipes): prune each task with its own density first.

    Uses the same per-task subkeys as the core (`split(key, num_tasks)[i]`), so
    equal densities give exactly the core's result.
    """
    if len(densities) != len(tasks):
        raise ValueError(f"got {len(densities)} densities for {len(tasks)} models")
    if method == "task_arithmetic":
        return tasks
    if method in _RANDOM:
        keys = jax.random.split(key, len(tasks))
        return [pruning.random_pruning(t, d, True, key=k) for t, d, k in zip(tasks, densities, keys)]
    return [pruning.magnitude_based_pruning(t, d) for t, d in zip(tasks, densities)]


def merge_params(
    trees: Sequence[Any],
    weights,
    *,
    method: str,
    base: Any = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
    mesh=None,
) -> Any:
    """Merge parameter pytrees leaf by leaf with a jaxmerge method.

    Args:
      trees: same-structure pytrees, one per fine-tuned model.
      weights: one weight per tree.
      method: "task_arithmetic", "ties", "dare_linear", "dare_ties" or "magnitude_prune".
      base: optional pytree of the base model; task vectors are `tree - base`
        and the result is `base + merged`.
      density: fraction kept, required by the pruning methods.
      majority_sign_method: "total" or "frequency" (ties, dare_ties).
      key: `jax.random.key`, required by the DARE methods; leaf keys are
        `path_key(key, path)`.
      mesh: optional `jax.sharding.Mesh`: each leaf is sharded over it
        (`jaxmerge.sharding.leaf_sharding`) and merged in place.

    Returns:
      A pytree of the structure of `trees[0]`. Non-float leaves (step counters,
      say) must be equal in every tree and are passed through.

    Raises:
      ValueError: structures differ (the first differing path is named), a bad
        method or weight count, or a missing density or key.
    """
    v.check_choice("method", method, METHODS)
    if not trees:
        raise ValueError("trees must hold at least one pytree, got an empty sequence")
    if method in _PRUNED and density is None:
        raise ValueError(f"density is required for method={method!r}")
    if method in _RANDOM:
        key = v.check_key(key)
    paths, first_leaves, treedef = _paths_and_leaves(trees[0])
    columns = [first_leaves]
    for i, tree in enumerate(trees[1:], start=1):
        other_paths, leaves, _ = _paths_and_leaves(tree)
        _check_same_structure(paths, other_paths, f"trees[{i}]")
        columns.append(leaves)
    base_leaves = None
    if base is not None:
        base_paths, base_leaves, _ = _paths_and_leaves(base)
        _check_same_structure(paths, base_paths, "base")
    w = v.as_weights(weights, len(trees))
    for j, path in enumerate(paths):
        shapes = {jnp.shape(col[j]) for col in columns}
        if len(shapes) > 1:
            raise ValueError(f"leaf {path} has different shapes across trees: {sorted(shapes)}")

    merged = []
    for j, path in enumerate(paths):
        leaves = [col[j] for col in columns]
        if not jnp.issubdtype(jnp.result_type(leaves[0]), jnp.floating):
            if any(not jnp.array_equal(leaves[0], leaf) for leaf in leaves[1:]):
                raise ValueError(f"non-float leaf {path} differs across trees and cannot be merged")
            merged.append(leaves[0])
            continue
        merged.append(
            merge_leaf(
                leaves,
                w,
                method=method,
                base=None if base_leaves is None else base_leaves[j],
                density=density,
                majority_sign_method=majority_sign_method,
                key=path_key(key, path) if method in _RANDOM else None,
                mesh=mesh,
            )
        )
    return jax.tree_util.tree_unflatten(treedef, merged)
