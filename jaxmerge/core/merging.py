"""Merge task tensors: task arithmetic, magnitude pruning, TIES and DARE.

* Task arithmetic: Ilharco et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089.
* TIES-Merging (trim, elect sign, disjoint merge): Yadav et al., 2023, arXiv:2306.01708.
* DARE (drop and rescale): Yu et al., 2023, "Language Models are Super Mario", arXiv:2311.03099.

Semantics follow `peft.utils.merge_utils` (PEFT 0.21), argument for argument;
random methods take an explicit keyword-only `key`. Every function is one
jitted kernel over a static number of tasks: the per-task work is unrolled so
that XLA fuses it into a few passes over memory, and the density is a runtime
value (sweeping densities compiles once per shape and dtype).

Key derivation for DARE: task i is pruned with
`jax.random.split(key, num_tasks)[i]`, i.e. its mask is
`jaxmerge.core.pruning.random_mask(jax.random.split(key, num_tasks)[i], density, shape)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core import _validation as v
from jaxmerge.core._dtypes import compute_dtype, count_dtype
from jaxmerge.core._kernels import kernel
from jaxmerge.core.pruning import della_drop, drop_and_rescale, keep_magnitude_band, rescale_l1
from jaxmerge.core.selection import density_to_k, masked, top_k_magnitude_mask
from jaxmerge.core.sign import elect_and_merge, sum_tasks


@dataclass(frozen=True)
class Rule:
    """How task vectors are sparsified, voted on and combined: PEFT's and mergekit's semantics.

    One kernel serves both: they differ only in these choices (read from
    `peft.utils.merge_utils` and mergekit's `generalized_task_arithmetic.py`).

    Attributes:
      sparsify: None, "magnitude" (keep the k largest |x|), "random" (DARE's
        drop), "band" (breadcrumbs: keep the k largest but the k_top largest)
        or "della" (DELLA's magnitude-ranked keep probabilities, per row).
      rescale: None, "inverse_density" (PEFT's DARE: divide by the density) or
        "l1" (mergekit: restore each tensor's L1 norm).
      consensus: None (weighted sum) or "total"/"frequency" (TIES' sign election:
        sign of the sum, or of the sum of signs).
      vote: "pruned" (PEFT: elect on the unweighted pruned tensors) or
        "weighted" (mergekit: elect on the weighted ones).
      divide: None, "count" (PEFT's disjoint mean: by the number agreeing) or
        "weights" (mergekit's normalize: by the sum of the weights, of the agreeing ones with a consensus).
    """

    sparsify: str | None = None
    rescale: str | None = None
    consensus: str | None = None
    vote: str = "pruned"
    divide: str | None = None


PEFT_TIES = Rule(sparsify="magnitude", consensus="total", vote="pruned", divide="count")


def _sums_are_exact(args: tuple, kwargs: dict) -> bool:
    """A merge kernel call whose only sums over entries are the magnitude selection's exact counts: magnitude
    or band (breadcrumbs) sparsification without the L1 rescale; sign election and the disjoint merge sum
    across tasks, entry by entry (`kernel(exact_sums=...)`)."""
    rule = kwargs["rule"]
    return rule.sparsify in ("magnitude", "band") and rule.rescale is None


@kernel(static_argnames=("rule", "partitioned"), exact_sums=_sums_are_exact)
def _merge_kernel(tasks, weights, density, k, k_top, epsilon, lam, key, base=None, *, rule: Rule, partitioned=False):
    """The one merge kernel: sparsify each task, weight, then a sum or TIES' disjoint merge.

    Args:
      tasks: tuple of task arrays, or one stacked array.
      weights: (num_tasks,) weights.
      density: (num_tasks,) keep fractions (random and DELLA pruning).
      k: (num_tasks,) entries to keep per task (magnitude and band pruning).
      k_top: (num_tasks,) largest entries dropped by band pruning (breadcrumbs).
      epsilon: (num_tasks,) DELLA's spread of keep probabilities.
      lam: scalar multiplying the merged task vector (mergekit's lambda).
      key: PRNG key (random methods) or None.
      base: None, or the base tensor: `tasks` are then models, the task vectors
        `model - base` are taken inside the kernel in the compute dtype (no
        tensor-sized temporaries between calls, no bfloat16 rounding of the
        deltas) and the result is `base + merged`, rounded once.
      rule: a static `Rule`.
      partitioned: the tasks are sharded over several devices (see `selection.top_k_magnitude_mask`).
    """
    tasks = v.unstack(tasks)
    out_dtype = tasks[0].dtype
    cd = compute_dtype(out_dtype)
    models = tasks
    if base is not None:
        # Task vectors in the compute dtype: a bfloat16 model's deltas are not rounded to bfloat16.
        tasks = [t.astype(cd) - base.astype(cd) for t in tasks]
    keys = jax.random.split(key, len(tasks)) if key is not None else [None] * len(tasks)
    tasks = [
        sparsify_task(t, rule, density[i], k[i], k_top[i], epsilon[i], keys[i], partitioned,
                      of=None if base is None else (models[i], base))
        for i, t in enumerate(tasks)
    ]
    tasks = [t.astype(cd) for t in tasks]
    w = weights.astype(cd)
    weighted = [t * w[i] for i, t in enumerate(tasks)]
    if rule.consensus is None:
        merged = sum_tasks(weighted)
        if rule.divide == "weights":
            total = sum_tasks([w[i] for i in range(len(tasks))])
            merged = merged / jnp.where(jnp.abs(total) < 1e-8, 1, total)
    else:
        voters = tasks if rule.vote == "pruned" else weighted
        divisors = None if rule.divide is None else [
            jnp.ones((), cd) if rule.divide == "count" else w[i] for i in range(len(tasks))
        ]
        merged = elect_and_merge(voters, weighted, divisors, rule.consensus)
    merged = merged * lam.astype(cd)
    # One rounding to the output dtype, after the base is added.
    return (merged if base is None else base.astype(cd) + merged).astype(out_dtype)


def sparsify_task(t, rule: Rule, density, k, k_top, epsilon, key, partitioned, of=None):
    """One task's sparsification and rescaling under `rule` (traceable; no validation).

    `of`: optional `(model, base)` with `t == model.astype(cd) - base.astype(cd)`. The magnitude
    selection then reads the two terms and takes the difference in each of its passes, so that `t`
    is computed only where it is used and never written out whole: XLA writes out every value that
    enters the selection's loop and branches (for bfloat16 models, a float32 tensor per task; on
    TinyLlama's 5632 x 2048 matrices those three writes were ~40 of a TIES kernel's ~150 ms). The
    band's two selections keep reading `t`: each pass over the two terms costs more arithmetic than
    one over `t`, which outweighed the write for their twice as many passes (breadcrumbs' kernel
    240 -> 271 ms with the terms).
    """
    if rule.sparsify is None:
        return t
    if rule.sparsify == "magnitude":
        model, base = (t, None) if of is None else of
        kept = masked(t, top_k_magnitude_mask(model, k, partitioned, base))
    elif rule.sparsify == "band":
        kept = keep_magnitude_band(t, k, k_top, partitioned)
    elif rule.sparsify == "della":
        kept = della_drop(t, density, epsilon, key)
    else:
        return drop_and_rescale(t, density, key, rescale=rule.rescale == "inverse_density") if rule.rescale != "l1" \
            else rescale_l1(t, drop_and_rescale(t, density, key, rescale=False))
    return rescale_l1(t, kept) if rule.rescale == "l1" else kept


def _as_per_task(value, n: int, dtype) -> Any:
    """A scalar or per-task value as an (n,) array: NumPy on the host, JAX when traced."""
    if isinstance(value, jax.Array):
        return jnp.broadcast_to(value.astype(dtype), (n,))
    return np.broadcast_to(np.asarray(value, dtype), (n,))


def merge_task_vectors(
    task_tensors,
    weights,
    density=1.0,
    *,
    rule: Rule,
    key=None,
    lam=1.0,
    k=None,
    k_top=0,
    epsilon=0.0,
    base=None,
):
    """Validate, then run the kernel once: the entry point of every task-vector method.

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task.
      density: a scalar or one per task (traced is fine).
      rule: the `Rule`.
      key: PRNG key, required when the rule is random.
      lam: scalar multiplier of the result.
      k: per-task entries kept (default: PEFT's `int(density * size)`).
      k_top, epsilon: per-task band and DELLA parameters.
      base: optional base tensor: `task_tensors` are then models and the result
        is `base + merge(model - base)`, all in one kernel.

    Returns:
      The merged task vector (or model, with `base`), in the task tensors' dtype.
    """
    if rule.consensus is not None:
        v.check_choice("majority_sign_method", rule.consensus, v.SIGN_METHODS)
    tasks = v.as_tasks(task_tensors)
    n = v.num_tasks(tasks)
    w = v.as_weights(weights, n)
    if rule.sparsify in ("random", "della"):
        key = v.check_key(key)
    else:
        key = None
    if rule.sparsify is not None:
        for d in density if isinstance(density, (list, tuple)) else [density]:
            v.check_density(d)
    size = 1
    for dim in v.task_shape(tasks):
        size *= dim
    if k is None:
        if isinstance(density, (list, tuple)):
            k = np.asarray([density_to_k(d, size) for d in density], count_dtype())
        else:
            k = density_to_k(density, size)
    cdt = count_dtype()
    return v.warn_if_half_overflow(_merge_kernel(
        # NumPy values go straight to the compiled kernel (an eager jnp.asarray costs ~40 us).
        tasks, w,
        _as_per_task(density, n, np.float32),
        _as_per_task(k, n, cdt), _as_per_task(k_top, n, cdt), _as_per_task(epsilon, n, jnp.float32),
        lam if isinstance(lam, jax.Array) else np.float32(lam), key, base,
        rule=rule, partitioned=v.is_partitioned(tasks),
    ))


def _merge(task_tensors, weights, density, key, *, sparsify, sign_method):
    """PEFT's functions: PEFT's rule (inverse-density DARE, vote on pruned, disjoint mean by count)."""
    rule = Rule(
        sparsify=sparsify,
        rescale="inverse_density" if sparsify == "random" else None,
        consensus=sign_method,
        divide=None if sign_method is None else "count",
    )
    return merge_task_vectors(task_tensors, weights, 1.0 if sparsify is None else density, rule=rule, key=key)


def reshape_weight_task_tensors(task_tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """Reshape `weights` to broadcast against `task_tensors` (trailing singleton axes), as PEFT.

    Args:
      task_tensors: the stacked task tensors (only the rank is used).
      weights: the weights, usually (num_tasks,).

    Returns:
      `weights` with shape `weights.shape + (1,) * (task_tensors.ndim - weights.ndim)`.
    """
    w = jnp.asarray(weights)
    t_ndim = jnp.ndim(task_tensors)
    if w.ndim > t_ndim:
        raise ValueError(
            f"weights has more dimensions ({w.ndim}) than task_tensors ({t_ndim}): cannot broadcast"
        )
    return w.reshape(w.shape + (1,) * (t_ndim - w.ndim))


def task_arithmetic(task_tensors, weights) -> jax.Array:
    """Weighted sum of task tensors (task arithmetic).

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task (1-D array or sequence); negative weights subtract.

    Returns:
      sum_i weights[i] * task_tensors[i], in the task tensors' dtype.
    """
    return _merge(task_tensors, weights, None, None, sparsify=None, sign_method=None)


def magnitude_prune(task_tensors, weights, density: float) -> jax.Array:
    """Magnitude-prune each task tensor to `density`, then take the weighted sum.

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task.
      density: fraction of entries each task keeps, in [0, 1].

    Returns:
      The merged tensor, in the task tensors' dtype.
    """
    return _merge(task_tensors, weights, density, None, sparsify="magnitude", sign_method=None)


def ties(
    task_tensors,
    weights,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> jax.Array:
    """TIES-Merging: trim (magnitude prune), elect sign, disjoint merge.

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task (applied after the sign election, as PEFT).
      density: fraction of entries each task keeps, in [0, 1].
      majority_sign_method: "total" or "frequency".

    Returns:
      The merged tensor, in the task tensors' dtype.
    """
    return _merge(
        task_tensors, weights, density, None, sparsify="magnitude", sign_method=majority_sign_method
    )


def dare_linear(task_tensors, weights, density: float, *, key: jax.Array) -> jax.Array:
    """DARE: drop each entry with probability 1 - density, rescale by 1/density, weighted sum.

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task.
      density: keep probability, in [0, 1].
      key: a `jax.random.key`; task i uses `jax.random.split(key, num_tasks)[i]`.

    Returns:
      The merged tensor, in the task tensors' dtype.
    """
    return _merge(task_tensors, weights, density, key, sparsify="random", sign_method=None)


def dare_ties(
    task_tensors,
    weights,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    key: jax.Array,
) -> jax.Array:
    """DARE's drop and rescale, then TIES' sign election and disjoint merge.

    Args:
      task_tensors: a sequence of same-shape arrays, or one array stacked on axis 0.
      weights: one weight per task.
      density: keep probability, in [0, 1].
      majority_sign_method: "total" or "frequency".
      key: a `jax.random.key`; task i uses `jax.random.split(key, num_tasks)[i]`.

    Returns:
      The merged tensor, in the task tensors' dtype.
    """
    return _merge(
        task_tensors, weights, density, key, sparsify="random", sign_method=majority_sign_method
    )
