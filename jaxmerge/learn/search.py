"""Grid search of merging hyperparameters (lambda, density): every lambda scored in one compiled call.

Task arithmetic (Ilharco et al., 2023, arXiv:2212.04089) and TIES-Merging
(Yadav et al., 2023, arXiv:2306.01708) pick the scaling coefficient lambda
(and TIES its density) on validation data:

    merged(lambda, density) = base + lambda * merge_density(finetuned - base)

The merged task vector does not depend on lambda, so `search_coefficients`
merges once per density (`merge_params` on the task vectors: the core's
compiled kernel, reused for every density since the kept count is a runtime
argument), then scores every point of the grid in one jitted, `jax.vmap`ped
call of `base + lambda * delta[density]` and `evaluate`: the model and
`evaluate` are traced and compiled once for the whole grid. (Vmapping the
exact top-k selection itself over the grid costs its compilation once more
per leaf and grows with the grid; merging per density does not.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core._validation import check_key
from jaxmerge.learn.adamerging import _tree_columns
from jaxmerge.methods import _table as table
from jaxmerge.methods.pytree import bind_method, merge_leaf, merge_params, path_key

def _searchable(method: str) -> table.Method | None:
    """The method's table entry if it is a task-vector method (it has `lambda`), else None."""
    try:
        spec = table.get(method)
    except table.MethodError:
        return None
    return spec if spec.task_vectors and "lambda" in spec.param_names else None


def searchable_methods() -> list[str]:
    """The methods `search_coefficients` takes: every task-vector method of the table."""
    return [name for name in table.names() if _searchable(name) is not None]


@dataclass(frozen=True)
class SearchResult:
    """What `search_coefficients` found.

    Attributes:
      scores: NumPy array shaped by the grid, axes in the grid's key order:
        `scores[i, j]` is `evaluate` at `grid[name0][i]`, `grid[name1][j]`.
      best: the best point, {name: value}.
      best_score: `evaluate` there.
      params: the merged pytree at the best point (`merge_params`).
    """

    scores: np.ndarray
    best: dict[str, float]
    best_score: float
    params: Any


def _merge_task_vectors(taus, paths, floats, method, key, params) -> list[jax.Array]:
    """Each float leaf's merged task vector at lambda 1: `merge_params`' leaf merge on `finetuned - base`.

    Leaf keys are `path_key(key, path)` of the full tree's paths, so DARE's
    masks are those `merge_params(finetuned, base=base, key=key)` draws.
    """
    spec, bound = bind_method(method, params, len(taus), False, "search_coefficients")
    return [
        merge_leaf([t[i] for t in taus], spec, bound, key=path_key(key, paths[j]) if key is not None else None)
        for i, j in enumerate(floats)
    ]


def _check_grid(grid: Any, method: str, method_params: dict) -> dict[str, np.ndarray]:
    """Each grid entry as a 1-D float64 array; the key named in every error."""
    allowed = ("lambda", "density") if "density" in _searchable(method).param_names else ("lambda",)
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must be a dict of parameter name -> 1-D values, got {type(grid).__name__}")
    for name in grid:
        if name not in allowed:
            raise ValueError(f"grid has key {name!r}, which method {method} cannot search (searchable: {list(allowed)})")
        if name in method_params:
            raise ValueError(f"grid[{name!r}] and {name}={method_params[name]!r} are both given; give one")
    if "lambda" not in grid:
        raise ValueError(f"grid must have a 'lambda' key (the merged task vector's scale), got keys {list(grid)}")
    out = {}
    for name, values in grid.items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"grid[{name!r}] must be a 1-D sequence of numbers, got {values!r}") from None
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"grid[{name!r}] must be a non-empty 1-D sequence, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"grid[{name!r}] must hold finite numbers, got {values!r}")
        if name == "density" and np.any(arr < 0):
            raise ValueError(f"grid['density'] must hold densities >= 0, got {values!r}")
        out[name] = arr
    return out


def search_coefficients(
    evaluate: Callable[[Any], jax.Array],
    base: Any,
    finetuned: Sequence[Any],
    *,
    method: str = "task_arithmetic",
    grid: Mapping[str, Sequence[float]],
    key: jax.Array | None = None,
    batch_size: int | None = None,
    **method_params: Any,
) -> SearchResult:
    """Score `base + lambda * merge(finetuned - base)` at every point of `grid`, in one compiled call.

    Args:
      evaluate: `evaluate(params) -> scalar`, higher is better (validation
        accuracy, say); traced once (pure JAX, no Python side effects on values).
      base: the pretrained pytree.
      finetuned: same-structure pytrees, one per task.
      method: a task-vector method of the table (`searchable_methods()`: task_arithmetic,
        ties, dare_ties, breadcrumbs, della, ...).
      grid: parameter name -> 1-D values; "lambda" (required) and, for the
        sparsifying methods, "density". The full Cartesian product is scored.
      key: `jax.random.key` for the DARE methods (the same masks at every point, as `merge_params`).
      batch_size: None scores the whole grid in one `jax.vmap` (memory: one
        merged model per point); a number scores chunks of that many points
        in a `jax.lax.map` (same compilation; `evaluate` is traced twice when
        the grid size is not a multiple of it).
      **method_params: the method's other parameters as `merge_params` takes
        them (`weight`, `majority_sign_method`, `semantics`, fixed `density`, ...).

    Returns:
      A `SearchResult`; NaN scores are never best. Every score equals
      `evaluate(merge_params(finetuned, method=method, base=base, key=key,
      lambda=..., density=..., **method_params))` at its point.

    Raises:
      ValueError/TypeError, before any work: a method that cannot be searched,
        a grid key it lacks or a bad grid value (the key named), a bad
        parameter, mismatched trees, `evaluate` not returning a scalar.
    """
    where = "search_coefficients"
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    if _searchable(method) is None:
        raise ValueError(f"method must be one of {searchable_methods()} for {where}, got method={method!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size <= 0):
        raise ValueError(f"batch_size must be None or a positive integer, got batch_size={batch_size!r}")
    values = _check_grid(grid, method, method_params)
    names = list(values)
    paths, base_leaves, treedef, columns = _tree_columns(base, finetuned, where)
    densities = list(values.get("density", [None]))
    # The table validates every other parameter (and each density) exactly as merge_params does.
    for d in densities:
        params = {**method_params, **({} if d is None else {"density": float(d)})}
        spec, _ = bind_method(method, params, len(finetuned), True, where)
    if spec.random:
        key = check_key(key)

    floats = [j for j, leaf in enumerate(base_leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    base_f = [jnp.asarray(base_leaves[j]) for j in floats]
    # Task vectors in float32 at least, as the kernel computes them; merged once per density at lambda 1.
    cds = [jnp.promote_types(x.dtype, jnp.float32) for x in base_f]
    taus = [[jnp.asarray(col[j]).astype(cd) - b.astype(cd) for j, b, cd in zip(floats, base_f, cds)] for col in columns]
    deltas = []  # per density: the merged task vector of each float leaf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density")  # density >= 1 is a valid "keep all"
        for d in densities:
            params = {**method_params, **({} if d is None else {"density": float(d)})}
            merged = _merge_task_vectors(taus, paths, floats, method, key if spec.random else None, params)
            deltas.append(merged)
    stacked = [jnp.stack([delta[i] for delta in deltas]) for i in range(len(floats))]  # (D, *leaf shape)

    # Flattened grid: point g has lambda lam[g] and density index d_index[g].
    index = np.stack(np.meshgrid(*[np.arange(values[n].size) for n in names], indexing="ij"), -1).reshape(-1, len(names))
    lam = values["lambda"][index[:, names.index("lambda")]].astype(np.float32)
    d_index = (index[:, names.index("density")] if "density" in values else np.zeros(len(index), int)).astype(np.int32)

    def point(base_f, stacked, lam_g, d_g):
        merged = list(columns[0])  # non-float leaves: as merge_params, the first tree's
        for i, j in enumerate(floats):
            merged[j] = (base_f[i].astype(cds[i]) + lam_g * stacked[i][d_g]).astype(base_f[i].dtype)
        return evaluate(jax.tree_util.tree_unflatten(treedef, merged))

    def run(base_f, stacked, lam, d_index):
        def one(args):
            return point(base_f, stacked, *args)

        if batch_size is None:
            return jax.vmap(one)((lam, d_index))
        return jax.lax.map(one, (lam, d_index), batch_size=batch_size)

    args = (base_f, stacked, lam, d_index)
    traced = jax.jit(run).trace(*args)
    out = traced.out_info
    if not hasattr(out, "shape") or out.shape != (len(index),):
        got = jax.tree_util.tree_map(lambda x: x.shape[1:], out)  # per point: drop the grid axis
        raise TypeError(f"evaluate must return a scalar, got {got}")
    scores = np.asarray(traced.lower().compile()(*args), np.float64).reshape([values[n].size for n in names])
    if np.all(np.isnan(scores)):
        raise ValueError("evaluate returned NaN at every grid point")
    best_index = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    best = {n: float(values[n][i]) for n, i in zip(names, best_index)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density")
        params = merge_params(finetuned, method=method, base=base, key=key, **method_params, **best)
    return SearchResult(scores, best, float(scores[best_index]), params)

