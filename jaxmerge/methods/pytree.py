"""Merge whole parameter pytrees (plain dicts, Flax, equinox): every leaf through the core.

Task vectors (Ilharco et al., 2023, arXiv:2212.04089): with `base`, each model's
task vector is `tree - base` and the result is `base + merge(task vectors)`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core import _validation as v
from jaxmerge.core.sharding import onto_mesh, shard
from jaxmerge.methods import _table as table


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of one leaf: `fold_in(key, crc32(path))`.

    Depends on the leaf's path only, so adding or removing another leaf, or
    visiting the leaves in another order, never changes this leaf's mask.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _is_traced(weights: Any) -> bool:
    """`weights` (an array or a sequence) holds a tracer: merge_params is being differentiated or traced."""
    if isinstance(weights, (list, tuple)):
        return any(not v.is_concrete(w) for w in weights)
    return not v.is_concrete(weights)


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


def bind_method(method: str, params: dict, num_models: int, has_base: bool, where: str = ""):
    """Look `method` up in the table, check the model count and bind `params` (None values dropped).

    Args:
      method: a method name (`jaxmerge methods` lists them).
      params: parameter values; per-model ones as a scalar or one value per model.
      num_models: models merged, the base not counted.
      has_base: a base model is given.
      where: prefix naming the caller in errors.

    Returns:
      (Method, bound parameters): per-model parameters have one slot per input,
      the base's first when there is a base (`base_index` 0).
    """
    spec = table.get(method)
    num_inputs = num_models + (has_base and spec.base is not table.BasePolicy.IGNORED)
    spec.check_inputs(num_inputs, has_base)
    given = {name: value for name, value in params.items() if value is not None}
    return spec, spec.bind(given, num_inputs, where, base_index=0 if num_inputs > num_models else None)


def merge_leaf(
    leaves: Sequence[jax.Array],
    spec: table.Method,
    bound: dict,
    *,
    base: jax.Array | None = None,
    key: jax.Array | None = None,
    mesh=None,
) -> jax.Array:
    """Merge one tensor from each model (and an optional base): the unit of every model merge.

    Args:
      leaves: one same-shape array per model.
      spec, bound: from `bind_method`.
      base: the base tensor, or None.
      key: the tensor's PRNG key (random methods).
      mesh: optional `jax.sharding.Mesh`: the tensors are sharded over it first.

    Returns:
      The merged tensor, in the leaves' dtype; with `mesh`, sharded like its inputs.
    """
    inputs = [shard(jnp.asarray(leaf), mesh) for leaf in leaves]
    base_index = None
    if base is not None and spec.base is not table.BasePolicy.IGNORED:
        inputs = [shard(jnp.asarray(base), mesh), *inputs]
        base_index = 0
    merged = table.merge_tensor(spec, inputs, base_index, bound, key=key)
    if mesh is None:
        return merged
    # XLA may lay out a result replicated when it comes from whole-tensor reductions (slerp's norms,
    # Karcher's and Model Stock's means): every device would then hold all of it. The inputs ran on
    # the mesh's auto-axes twin (`shard`); the result goes back on the caller's own mesh.
    return onto_mesh(shard(merged, mesh), mesh)


def merge_params(
    trees: Sequence[Any],
    weights=None,
    *,
    method: str,
    base: Any = None,
    key: jax.Array | None = None,
    mesh=None,
    **params: Any,
) -> Any:
    """Merge parameter pytrees leaf by leaf with any method of the table (`jaxmerge methods`).

    Args:
      trees: same-structure pytrees, one per fine-tuned model.
      weights: one weight per tree (the methods' `weight`; default 1 each). With
        the task-vector methods they may be traced: `jax.grad`, `jit` and
        `vmap` of a function of the weights go through the merge.
      method: a method name, e.g. "ties", "dare_ties", "slerp", "model_stock".
      base: optional pytree of the base model. Task-vector methods (ties, dare,
        task_arithmetic, ...) then merge `tree - base` and return `base + merged`;
        without a base they take `trees` as task vectors.
      key: `jax.random.key`, required by random methods; leaf keys are
        `path_key(key, path)`.
      mesh: optional `jax.sharding.Mesh`: each leaf is sharded over it
        (`jaxmerge.core.sharding.leaf_sharding`) and merged in place.
      **params: the method's parameters (`density=0.2`, `majority_sign_method=...`,
        `t=0.5`, ...), a scalar or one value per tree for per-model ones. Methods
        that PEFT has keep PEFT's semantics unless `semantics="mergekit"`.

    Returns:
      A pytree of the structure of `trees[0]`. Non-float leaves (step counters,
      say) must be equal in every tree and are passed through.

    Raises:
      ValueError: structures differ (the first differing path is named), an
        unknown method or parameter, a bad value or weight count, a missing key.
    """
    if not trees:
        raise ValueError("trees must hold at least one pytree, got an empty sequence")
    traced = None
    if weights is not None:
        if _is_traced(weights):
            # Under jax.grad / jit / vmap: validate with placeholders, then merge with the traced values.
            traced = v.as_weights(jnp.asarray(weights, jnp.float32), len(trees))
            params["weight"] = [1.0] * len(trees)
        else:
            params["weight"] = [float(x) for x in np.asarray(v.as_weights(weights, len(trees)))]
    spec, bound = bind_method(method, params, len(trees), base is not None, "merge_params")
    if traced is not None:
        if not spec.task_vectors:
            raise TypeError(
                f"merge_params: method {method} needs concrete weights; traced weights (jax.grad, jit, vmap) work "
                f"with the task-vector methods ({', '.join(m.name for m in table.all_methods() if m.task_vectors)})"
            )
        slots = list(bound["weight"])
        offset = len(slots) - len(trees)  # the base's slot, when the method has one, comes first
        bound = {**bound, "weight": slots[:offset] + [traced[i] for i in range(len(trees))]}
    if spec.random:
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
                leaves, spec, bound,
                base=None if base_leaves is None else base_leaves[j],
                key=path_key(key, path) if spec.random else None,
                mesh=mesh,
            )
        )
    return jax.tree_util.tree_unflatten(treedef, merged)
