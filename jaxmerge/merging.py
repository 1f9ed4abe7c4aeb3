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
`jaxmerge.pruning.random_mask(jax.random.split(key, num_tasks)[i], density, shape)`.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _validation as v
from jaxmerge._dtypes import compute_dtype
from jaxmerge.pruning import drop_and_rescale
from jaxmerge.selection import density_to_k, keep_top_k_magnitude
from jaxmerge.sign import elect_and_merge, sum_tasks


@functools.partial(jax.jit, static_argnames=("sparsify", "sign_method", "partitioned"))
def _merge_kernel(tasks, weights, density, k, key, *, sparsify, sign_method, partitioned=False):
    """The one merge kernel: sparsify each task, then a weighted sum or TIES' disjoint merge.

    Args:
      tasks: tuple of task arrays, or one stacked array.
      weights: (num_tasks,) weights.
      density: keep fraction (random pruning), traced.
      k: entries to keep per task (magnitude pruning), traced count.
      key: PRNG key (random pruning) or None.
      sparsify: None, "magnitude" or "random".
      sign_method: None for a weighted sum, else "total"/"frequency" for TIES' elect + disjoint merge.
      partitioned: the tasks are sharded over several devices (see `selection.top_k_magnitude_mask`).
    """
    tasks = v.unstack(tasks)
    out_dtype = tasks[0].dtype
    cd = compute_dtype(out_dtype)
    if sparsify == "magnitude":
        tasks = [keep_top_k_magnitude(t, k, partitioned) for t in tasks]
    elif sparsify == "random":
        keys = jax.random.split(key, len(tasks))
        tasks = [drop_and_rescale(t, density, keys[i], rescale=True) for i, t in enumerate(tasks)]
    tasks = [t.astype(cd) for t in tasks]
    w = weights.astype(cd)
    if sign_method is None:
        merged = sum_tasks([t * w[i] for i, t in enumerate(tasks)])
    else:
        merged = elect_and_merge(tasks, w, sign_method)
    return merged.astype(out_dtype)


def _merge(task_tensors, weights, density, key, *, sparsify, sign_method):
    """Validate everything, then run the kernel once."""
    if sign_method is not None:
        v.check_choice("majority_sign_method", sign_method, v.SIGN_METHODS)
    tasks = v.as_tasks(task_tensors)
    w = v.as_weights(weights, v.num_tasks(tasks))
    if sparsify == "random":
        key = v.check_key(key)
    if sparsify is None:
        density, k = 1.0, 0
    else:
        v.check_density(density)
        size = 1
        for dim in v.task_shape(tasks):
            size *= dim
        k = density_to_k(density, size)
    return _merge_kernel(
        # NumPy scalars go straight to the compiled kernel (an eager jnp.asarray costs ~40 us).
        tasks, w, density if isinstance(density, jax.Array) else np.float32(density), k, key,
        sparsify=sparsify, sign_method=sign_method, partitioned=v.is_partitioned(tasks),
    )


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
