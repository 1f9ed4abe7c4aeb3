"""`jaxmerge.extract_lora`: LoRA factors of a JAX parameter pytree's task vectors, with the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.engine.lapack_threads import limit_lapack_threads
from jaxmerge.methods.pytree import path_key
from jaxmerge.tools.extract_lora import svd
from jaxmerge.tools.extract_lora.ranks import Spectrum, check_budget, choose_ranks, rank_rule
from jaxmerge.tools.extract_lora.svd import (
    DEFAULT_MAX_RANK, POWER_ITERATIONS, LoraFactors, ModuleReport, _check_epsilon, _check_rank, _finite, _report,
    choose_decomposition, lapack_threads, oversampling,
)

__all__ = ["extract_lora"]


def extract_lora(
    finetuned: Any,
    base: Any,
    rank: int = DEFAULT_MAX_RANK,
    *,
    decomposition: str = "auto",
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    rank_by: str | None = None,
    rank_budget: int | None = None,
    seed: int = 0,
    key: jax.Array | None = None,
    select: Callable[[str], bool] | None = None,
) -> tuple[Any, dict[str, ModuleReport]]:
    """LoRA factors of every 2-D leaf's task vector, for JAX parameter pytrees (dicts, Flax, equinox).

    For each 2-D leaf, delta = finetuned - base ~= B @ A in the leaf's own layout (a Flax
    kernel (in, out) gives A (r, out), B (in, r)), truncated as `mergekit-extract-lora` does:
    rank min(`rank`, min(m, n)), lowered to the singular values above `sv_epsilon` when > 0.
    With `rank_by` or `rank_budget` the rank of each leaf comes from its spectrum instead
    (`rank_rule`; `rank` is then the cap), as `jaxmerge extract-lora --rank-by/--rank-budget`.

    Args:
      finetuned, base: pytrees of the same structure and leaf shapes.
      rank: the largest rank kept (>= 1).
      decomposition: "auto" (default), "exact" or "randomized" (see the module docstring).
      distribute_scale: sqrt(S) on both factors (default) or S on A only.
      sv_epsilon: drop singular values <= this (0: keep `rank`).
      rank_by: None, or "energy:F": per leaf the smallest rank keeping >= F of its delta's energy.
      rank_budget: a total of LoRA parameters (sum of rank x (rows + cols)) spread over the leaves
        where they remove the most error (`allocate_budget`).
      seed, key: the randomized sketches' PRNG key (`key` wins; each leaf folds in its path).
      select: optional `select(path) -> bool` choosing the 2-D leaves (paths as `jax.tree_util.keystr`).

    Returns:
      (factors, report): `factors` has `finetuned`'s structure, each decomposed leaf a
      `LoraFactors(a, b)` in the leaf's dtype and every other leaf None; `report` maps each
      decomposed leaf's path to its `ModuleReport`. A leaf whose rank falls to 0 (under
      `sv_epsilon`, a zero delta under `rank_by`, or not worth the budget) gets None and a report of rank 0.

    Raises:
      ValueError: different structures or shapes, rank < 1, sv_epsilon < 0, an unknown decomposition,
        a bad rank rule, or a budget below the cheapest leaf's rank 1.
    """
    rank = _check_rank(rank)
    sv_epsilon = _check_epsilon(sv_epsilon)
    rule = rank_rule(rank_by, rank_budget)
    choose_decomposition((1, 1), 1, decomposition)  # validates the name
    flat_ft, treedef = jax.tree_util.tree_flatten_with_path(finetuned)
    flat_base, base_def = jax.tree_util.tree_flatten_with_path(base)
    if treedef != base_def:
        raise ValueError(f"finetuned and base have different structures: {treedef} and {base_def}")
    key = jax.random.key(seed) if key is None else key
    leaves: dict[str, tuple[int, jax.Array, jax.Array, dict]] = {}  # path -> (index, ft, base, kernel options)
    for i, ((path, leaf), (_, base_leaf)) in enumerate(zip(flat_ft, flat_base)):
        name = jax.tree_util.keystr(path)
        if np.shape(leaf) != np.shape(base_leaf):
            raise ValueError(f"leaf {name}: finetuned has shape {np.shape(leaf)}, base has {np.shape(base_leaf)}")
        if np.ndim(leaf) != 2 or (select is not None and not select(name)):
            continue
        r = min(rank, min(np.shape(leaf)))
        options = dict(rank=r, method=choose_decomposition(np.shape(leaf), r, decomposition), transpose=False,
                       oversample=oversampling(r), power_iterations=POWER_ITERATIONS)
        leaves[name] = (i, jnp.asarray(leaf), jnp.asarray(base_leaf), options)
    check_budget(rule, {name: sum(ft.shape) for name, (_, ft, _, _) in leaves.items()})
    threads = lapack_threads((o["method"], ft.shape) for _, ft, _, o in leaves.values())
    with limit_lapack_threads(threads):  # every kernel's result is read (`_report`) inside
        out, report = _factor_leaves(leaves, rule, sv_epsilon, key, distribute_scale, len(flat_ft))
    return jax.tree_util.tree_unflatten(treedef, out), report


def _factor_leaves(leaves: dict, rule, sv_epsilon: float, key, distribute_scale: bool, count: int):
    """`extract_lora`'s passes over the selected leaves: (factors or None per flat leaf, report)."""
    ranks = {name: o["rank"] for name, (_, _, _, o) in leaves.items()}
    spectra: dict[str, Spectrum] = {}
    if rule.needs_spectrum or sv_epsilon > 0:  # first pass: every leaf's spectrum before any rank is fixed
        for name, (_, ft, bs, options) in leaves.items():
            s, total2 = svd._singular_values(ft, bs, path_key(key, name), **options)
            spectra[name] = Spectrum(_finite(np.asarray(s), name), float(total2), sum(ft.shape))
        ranks = choose_ranks(rule, spectra, sv_epsilon)
    out: list[Any] = [None] * count
    report = {}
    for name, (i, ft, bs, options) in leaves.items():
        r = ranks[name]
        if r == 0:
            sp = spectra[name]
            report[name] = _report(name, ft.shape, 0, options["method"], "matrix", sp.values, sp.total, sp.total)
            continue
        out_dtype = jnp.result_type(ft.dtype, bs.dtype).name
        # The SVD at the cap (static) keeping r (traced): one compiled kernel per shape, whatever the ranks.
        a, b, s, err2, total2 = svd._lora_kernel(ft, bs, path_key(key, name), r, distribute_scale=distribute_scale,
                                                 out_dtype=out_dtype, **options)
        out[i] = LoraFactors(a[:r], b[:, :r])
        report[name] = _report(name, ft.shape, r, options["method"], "matrix", s, err2, total2)
    return out, report
