"""Data-free subspace merges: TSV-M, Iso-C, Iso-CTS and WUDI.

Each merges task vectors tau_i (model - base) matrix by matrix, as FusionBench
0.2.33 does (`fusion_bench.method.task_singular_vector.utils.TSVM_utils`,
`isotropic_merging.iso_utils`, `wudi.wudi_merging`): a 2-D tensor gets the
method, any other tensor (biases, norms, conv kernels) the mean of the task
vectors. With T tasks, a matrix of shape (m, n) and k = min(m, n):

* `tsv_m`: each tau_i keeps its top r = int(k / T) singular triplets; the
  T r left (right) singular vectors, side by side, are replaced by their
  nearest orthogonal matrix (the polar factor U V^T of their SVD) and
  recombined with the kept singular values. Gargiulo et al., 2025, "Task
  Singular Vectors: Reducing Task Interference in Model Merging", arXiv:2412.00081.
* `iso_c`: the sum of the task vectors with all its singular values replaced
  by their mean (a flat, isotropic spectrum). Marczak et al., 2025, "No Task
  Left Behind: Isotropic Model Merging with Common and Task-Specific
  Subspaces", arXiv:2502.04959.
* `iso_cts`: the top c singular directions of the sum (the common subspace,
  c about `common_space_fraction` k) plus, per task, its top (k - c) / T
  directions of tau_i projected off the common subspace; both sides
  orthogonalised, one flat spectrum (same paper).
* `wudi`: from the sum, Adam (lr 1e-5, FusionBench's) minimises
  sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 for `iter_num` steps.
  Cheng et al., 2025, "Whoever Started the Interference Should End It:
  Guiding Data-Free Model Merging via Task Vectors", arXiv:2503.08099.

The functions return the merged task vector; the table's methods (base
required) return base + merged. Heavy work is one jitted kernel per call;
scalars (weights, scalings, lr, iter_num) are traced, so sweeping them does not
recompile; `common_space_fraction` fixes the subspace sizes and is static.
Several same-shape matrices (scan-stacked layers) merge in one call with
`batch_dims`. Matmuls use full float32 precision (no TF32 on accelerators), as
FusionBench's torch does by default.

Deliberate differences from FusionBench:
* WUDI: a zero task vector (a frozen layer) has weight 0 in the loss;
  FusionBench divides 0 by 0 there and returns NaN. The gradient is the
  closed form 2 (tau G - C), G = sum_i tau_i^T tau_i / l_i,
  C = sum_i tau_i tau_i^T tau_i / l_i, l_i = ||tau_i||^2 (one matmul per
  step instead of 3T); the value is the same up to rounding.
* Iso-CTS raises ValueError where the rounding of the task-specific size
  leaves a negative common space (FusionBench fails on a shape error).
* Half-precision inputs are widened to float32 for every method (FusionBench
  does so for TSV-M only) and the result has the inputs' dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core import _validation as v
from jaxmerge.core._dtypes import compute_dtype
from jaxmerge.core._kernels import kernel
from jaxmerge.methods._table import BasePolicy, Method, MethodError, Param, Scope, non_base, split_inputs, weight_array

TSV_PAPER = "Gargiulo et al., 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081"
ISO_PAPER = (
    "Marczak et al., 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, arXiv:2502.04959"
)
WUDI_PAPER = (
    "Cheng et al., 2025, Whoever Started the Interference Should End It: Guiding Data-Free "
    "Model Merging via Task Vectors, arXiv:2503.08099"
)

# FusionBench's defaults (fusion_bench_config/method/*.yaml and wudi_merging's Adam).
ISO_CTS_FRACTION = 0.8
WUDI_ITER_NUM = 400
WUDI_LR = 1e-5

_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _polar(a):
    """The orthogonal polar factor U V^T of `a` (its nearest matrix with orthonormal columns or rows)."""
    u, _, vh = jnp.linalg.svd(a, full_matrices=False)
    return _mm(u, vh)


def _blocks(u, s, vh, r):
    """Each task's top `r` triplets side by side: (m, T r), (T r,), (T r, n)."""
    t, m, _ = u.shape
    cols = jnp.transpose(u[:, :, :r], (1, 0, 2)).reshape(m, t * r)
    return cols, s[:, :r].reshape(t * r), vh[:, :r, :].reshape(t * r, vh.shape[-1])


# --------------------------------------------------------------------------- one matrix, tasks stacked (T, m, n)


def _tsv_m_matrix(x):
    t, m, n = x.shape
    k = min(m, n)
    r = int(k * (1 / t))  # FusionBench's int(s.shape[0] * sv_reduction), in the same float arithmetic
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    bu, bs, bvh = _blocks(u, s, vh, r)
    # Columns past T r stay zero, as in FusionBench (they meet a zero singular value).
    sum_u = jnp.zeros((m, k), x.dtype).at[:, : t * r].set(bu)
    sum_s = jnp.zeros((k,), x.dtype).at[: t * r].set(bs)
    sum_vh = jnp.zeros((k, n), x.dtype).at[: t * r].set(bvh)
    return _mm(_polar(sum_u) * sum_s, _polar(sum_vh))


def _iso_c_matrix(x):
    u, s, vh = jnp.linalg.svd(jnp.sum(x, axis=0), full_matrices=False)
    return jnp.mean(s) * _mm(u, vh)


def iso_cts_sizes(k: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """FusionBench's subspace sizes: (common directions c, directions per task p), c + T p = k.

    Raises:
      ValueError: the rounding of (k - c) / T up leaves c < 0.
    """
    common = int(k * common_space_fraction)
    common = k - round((k - common) / num_tasks) * num_tasks  # task-specific part divisible by T
    if common < 0:
        raise ValueError(
            f"iso_cts: common_space_fraction {common_space_fraction!r} gives a negative common space "
            f"for a matrix of rank {k} and {num_tasks} tasks; use a larger fraction"
        )
    return common, (k - common) // num_tasks


def _iso_cts_matrix(x, fraction):
    t, m, n = x.shape
    c, p = iso_cts_sizes(min(m, n), t, fraction)
    u, s, vh = jnp.linalg.svd(jnp.sum(x, axis=0), full_matrices=False)
    cu, cs, cvh = u[:, :c], s[:c], vh[:c]
    # Each task vector with the common subspace projected out of its columns.
    specific = x - _mm(cu, jnp.einsum("mc,tmn->tcn", cu, x, precision=_HI))
    tu, ts, tvh = jnp.linalg.svd(specific, full_matrices=False)
    bu, bs, bvh = _blocks(tu, ts, tvh, p)
    big_u = jnp.concatenate([bu, cu], axis=1)
    big_s = jnp.concatenate([bs, cs])
    big_vh = jnp.concatenate([bvh, cvh], axis=0)
    return jnp.mean(big_s) * _mm(_polar(big_u), _polar(big_vh))


def _inverse_sq_norms(x):
    sq = jnp.sum(x * x, axis=(1, 2))
    return jnp.where(sq > 0, 1 / jnp.where(sq > 0, sq, 1), 0)  # a zero task vector weighs nothing


def wudi_gradient_terms(x):
    """(G, C) with the gradient of `wudi_loss` at tau equal to 2 (tau G - C), for tasks stacked (T, m, n).

    G = sum_i tau_i^T tau_i / l_i (n, n) and C = sum_i tau_i tau_i^T tau_i / l_i (m, n), l_i = ||tau_i||_F^2.
    """
    inv = _inverse_sq_norms(x)
    grams = jnp.einsum("tmn,tmo->tno", x, x, precision=_HI)  # tau_i^T tau_i
    gram = jnp.einsum("t,tno->no", inv, grams, precision=_HI)
    target = jnp.einsum("t,tmn,tno->mo", inv, x, grams, precision=_HI)
    return gram, target


def _wudi_matrix(x, iter_num, lr):
    import optax  # here: importing it costs every command ~0.08 s of start-up, and only WUDI uses it

    gram, target = wudi_gradient_terms(x)
    opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # torch.optim.Adam's defaults

    def step(_, carry):
        tau, state = carry
        grad = 2 * (_mm(tau, gram) - target)  # d/dtau sum_i ||(tau - tau_i) tau_i^T||^2 / l_i
        updates, state = opt.update(grad, state, tau)
        return optax.apply_updates(tau, updates), state

    tau0 = jnp.sum(x, axis=0)
    tau, _ = jax.lax.fori_loop(0, iter_num, step, (tau0, opt.init(tau0)))
    return tau


def wudi_loss(merged, task_tensors):
    """WUDI's objective sum_i ||(merged - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 for one matrix (for checks)."""
    x = jnp.stack(task_tensors) if isinstance(task_tensors, (list, tuple)) else jnp.asarray(task_tensors)
    prod = jnp.einsum("tmn,ton->tmo", merged[None] - x, x, precision=_HI)
    return jnp.sum(_inverse_sq_norms(x) * jnp.sum(prod * prod, axis=(1, 2)))


# --------------------------------------------------------------------------- the kernel


# How a matrix maps inputs to outputs. torch's nn.Linear and safetensors checkpoints store
# (out, in), which FusionBench's WUDI and Iso-CTS assume; Flax and most JAX code store kernels
# (in, out). TSV-M and Iso-C are symmetric under a transpose; WUDI and Iso-CTS are not.
OUT_IN, IN_OUT = "out_in", "in_out"
LAYOUTS = (OUT_IN, IN_OUT)


def _matrix_fn(method, fraction, iter_num, lr):
    if method == "tsv_m":
        return _tsv_m_matrix
    if method == "iso_c":
        return _iso_c_matrix
    if method == "iso_cts":
        return functools.partial(_iso_cts_matrix, fraction=fraction)
    return functools.partial(_wudi_matrix, iter_num=iter_num, lr=lr)


@kernel(static_argnames=("method", "batch_dims", "fraction", "transpose"))
def _kernel(tasks, base, weights, scale, iter_num, lr, *, method, batch_dims, fraction, transpose=False):
    """Merge the task vectors `tasks` (or `tasks - base`); add `base` back when given.

    `tasks` is a tuple of same-shape arrays or one array stacked on axis 0;
    `weights` scale each task vector first, `scale` the merged one;
    `transpose` merges each matrix's transpose (an (in, out) kernel as (out, in)).
    """
    out_dtype = tasks[0].dtype if isinstance(tasks, tuple) else tasks.dtype
    cd = compute_dtype(out_dtype)
    x = jnp.stack([t.astype(cd) for t in tasks]) if isinstance(tasks, tuple) else tasks.astype(cd)
    if base is not None:
        x = x - base.astype(cd)[None]
    x = x * weights.astype(cd).reshape((-1,) + (1,) * (x.ndim - 1))
    if x.ndim - 1 - batch_dims == 2:
        fn = _matrix_fn(method, fraction, iter_num, lr.astype(cd))
        for _ in range(batch_dims):  # each leading axis indexes independent matrices
            fn = jax.vmap(fn, in_axes=1, out_axes=0)
        merged = jnp.swapaxes(fn(jnp.swapaxes(x, -1, -2)), -1, -2) if transpose else fn(x)
    else:
        merged = jnp.mean(x, axis=0)
    merged = merged * scale.astype(cd)
    if base is not None:
        merged = base.astype(cd) + merged
    return merged.astype(out_dtype)


def _run(method, tasks, base=None, weights=None, scale=1.0, *, iter_num=0, lr=0.0, batch_dims=0, fraction=0.0,
         layout=OUT_IN):
    n = v.num_tasks(tasks)
    shape = v.task_shape(tasks)
    if method == "iso_cts" and len(shape) - batch_dims == 2:
        iso_cts_sizes(min(shape[-2:]), n, fraction)  # raises before any work
    if layout not in LAYOUTS:
        raise ValueError(f"{method}: layout must be one of {LAYOUTS}, got {layout!r}")
    w = np.ones(n, np.float32) if weights is None else weights
    return _kernel(
        tasks, base, w, np.float32(scale), np.int32(iter_num), np.float32(lr),
        method=method, batch_dims=batch_dims, fraction=float(fraction), transpose=layout == IN_OUT,
    )


def _check_batch_dims(name, tasks, batch_dims):
    ndim = len(v.task_shape(tasks))
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, (int, np.integer)) or not 0 <= batch_dims <= ndim:
        raise ValueError(f"{name}: batch_dims must be an integer in [0, {ndim}], got {batch_dims!r}")
    return int(batch_dims)


def _check_number(name, param, value, *, low=None, low_open=False, high=None, integer=False):
    bad = isinstance(value, bool) or np.ndim(value) != 0
    if not bad:
        try:
            number = float(value)
        except (TypeError, ValueError):
            bad = True
        else:
            bad = (
                not math.isfinite(number)
                or (integer and number != int(number))
                or (low is not None and (number < low or (low_open and number == low)))
                or (high is not None and number > high)
            )
    if bad:
        kind = "an integer" if integer else "a finite number"
        where = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
        where += "" if high is None else f" and <= {high:g}"
        raise ValueError(f"{name}: {param} must be {kind}{where}, got {value!r}")
    return int(number) if integer else number


# --------------------------------------------------------------------------- public functions


def tsv_m(task_tensors, weights=None, *, alpha: float = 1.0, batch_dims: int = 0) -> jax.Array:
    """Task Singular Vectors merge (TSV-M) of task vectors (Gargiulo et al., 2025, arXiv:2412.00081).

    FusionBench's `compute_and_sum_svd_mem_reduction` and the scalings of its
    `TaskSingularVectorMerging` (per-task alphas before, a scalar alpha after).

    Args:
      task_tensors: same-shape task vectors, a sequence or one array stacked on axis 0.
      weights: one scale per task vector, applied before the SVD (FusionBench's
        list `alpha`); default 1 each.
      alpha: scales the merged task vector (FusionBench's scalar `alpha`).
      batch_dims: leading axes of each task tensor that index independent
        matrices (e.g. 1 for scan-stacked layers (L, m, n)).

    Returns:
      The merged task vector: TSV-M where a task tensor is a matrix (after
      `batch_dims`), the mean of the (weighted) task vectors otherwise; in the
      inputs' dtype.
    """
    tasks = v.as_tasks(task_tensors)
    batch_dims = _check_batch_dims("tsv_m", tasks, batch_dims)
    w = None if weights is None else v.as_weights(weights, v.num_tasks(tasks))
    alpha = _check_number("tsv_m", "alpha", alpha)
    return _run("tsv_m", tasks, None, w, alpha, batch_dims=batch_dims)


def iso_c(task_tensors, *, scaling_factor: float = 1.0, batch_dims: int = 0) -> jax.Array:
    """Isotropic merging in the common subspace (Iso-C; Marczak et al., 2025, arXiv:2502.04959).

    FusionBench's `iso_utils.iso_c` times `scaling_factor` (its `ISO_C_Merge`).

    Args:
      task_tensors: same-shape task vectors, a sequence or one array stacked on axis 0.
      scaling_factor: scales the merged task vector.
      batch_dims: leading axes that index independent matrices.

    Returns:
      For a matrix, mean(S) U V^T with U S V^T the SVD of the sum of the task
      vectors; for any other tensor their mean; times `scaling_factor`, in the
      inputs' dtype.
    """
    tasks = v.as_tasks(task_tensors)
    batch_dims = _check_batch_dims("iso_c", tasks, batch_dims)
    scale = _check_number("iso_c", "scaling_factor", scaling_factor)
    return _run("iso_c", tasks, None, None, scale, batch_dims=batch_dims)


def iso_cts(
    task_tensors,
    *,
    common_space_fraction: float = ISO_CTS_FRACTION,
    scaling_factor: float = 1.0,
    batch_dims: int = 0,
    layout: str = OUT_IN,
) -> jax.Array:
    """Isotropic merging in common and task-specific subspaces (Iso-CTS; Marczak et al., 2025, arXiv:2502.04959).

    FusionBench's `iso_utils.iso_cts` times `scaling_factor` (its `ISO_CTS_Merge`).

    Args:
      task_tensors: same-shape task vectors, a sequence or one array stacked on axis 0.
      common_space_fraction: share of the k = min(m, n) directions taken from
        the sum of the task vectors, in [0, 1]; the rest is split evenly among
        the tasks (`iso_cts_sizes`). Static: a new value compiles anew.
      scaling_factor: scales the merged task vector.
      batch_dims: leading axes that index independent matrices.
      layout: "out_in" (torch/safetensors weights, FusionBench's) or "in_out"
        (Flax/JAX kernels): the method treats the two sides of a matrix differently.

    Returns:
      The merged task vector (the mean for tensors that are not matrices), in
      the inputs' dtype.

    Raises:
      ValueError: a fraction outside [0, 1], or one that leaves a negative common space.
    """
    tasks = v.as_tasks(task_tensors)
    batch_dims = _check_batch_dims("iso_cts", tasks, batch_dims)
    fraction = _check_number("iso_cts", "common_space_fraction", common_space_fraction, low=0.0, high=1.0)
    scale = _check_number("iso_cts", "scaling_factor", scaling_factor)
    return _run("iso_cts", tasks, None, None, scale, batch_dims=batch_dims, fraction=fraction, layout=layout)


def wudi(
    task_tensors, *, iter_num: int = WUDI_ITER_NUM, lr: float = WUDI_LR, batch_dims: int = 0, layout: str = OUT_IN
) -> jax.Array:
    """WUDI merging (Cheng et al., 2025, arXiv:2503.08099): FusionBench's `wudi_merging`.

    Per matrix, starting from the sum of the task vectors tau_i, `iter_num`
    steps of Adam (optax; betas 0.9/0.999, eps 1e-8, as torch's) on
    sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (`wudi_loss`).

    Args:
      task_tensors: same-shape task vectors, a sequence or one array stacked on axis 0.
      iter_num: optimisation steps (FusionBench's config: 400).
      lr: Adam's learning rate (FusionBench: 1e-5).
      batch_dims: leading axes that index independent matrices (optimised independently).
      layout: "out_in" (torch/safetensors weights, FusionBench's) or "in_out"
        (Flax/JAX kernels): the loss measures interference on the input side.

    Returns:
      The merged task vector (the mean for tensors that are not matrices), in
      the inputs' dtype.
    """
    tasks = v.as_tasks(task_tensors)
    batch_dims = _check_batch_dims("wudi", tasks, batch_dims)
    iter_num = _check_number("wudi", "iter_num", iter_num, low=0, integer=True)
    lr = _check_number("wudi", "lr", lr, low=0.0, low_open=True)
    return _run("wudi", tasks, None, None, 1.0, iter_num=iter_num, lr=lr, batch_dims=batch_dims, layout=layout)


# --------------------------------------------------------------------------- the method table


def _table_merge(method):
    """The table's tensor function: task vectors against the base (or the inputs themselves without one)."""

    def merge(inputs, base_index, *, key, weight=None, alpha=1.0, scaling_factor=1.0,
              common_space_fraction=ISO_CTS_FRACTION, iter_num=WUDI_ITER_NUM, lr=WUDI_LR, layout=OUT_IN):
        models, base = split_inputs(inputs, base_index)
        if not models:
            return base
        weights = None if weight is None else weight_array(non_base(weight, base_index))
        scale = alpha if method == "tsv_m" else scaling_factor
        try:
            return _run(
                method, tuple(models), base, weights, scale,
                iter_num=iter_num, lr=lr, fraction=common_space_fraction if method == "iso_cts" else 0.0,
                layout=layout,
            )
        except ValueError as err:  # the sizes check: a table error names method and parameter
            raise MethodError(str(err)) from None

    return merge


SCALING_FACTOR = Param("scaling_factor", float, 1.0, doc="scales the merged task vector")
LAYOUT = Param(
    "layout", str, OUT_IN, choices=LAYOUTS,
    doc="matrices stored (out, in) as torch/safetensors, or (in, out) as Flax/JAX kernels",
)

METHODS = (
    Method(
        name="tsv_m",
        merge=_table_merge("tsv_m"),
        params=(
            Param("weight", float, 1.0, Scope.PER_MODEL,
                  doc="scales the model's task vector before the SVD (FusionBench's per-task alpha)"),
            Param("alpha", float, 1.0, doc="scales the merged task vector (FusionBench's scalar alpha)"),
        ),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=TSV_PAPER,
        summary="per matrix: each task's top 1/T singular vectors, orthogonalised across tasks",
        task_vectors=True,
    ),
    Method(
        name="iso_c",
        merge=_table_merge("iso_c"),
        params=(SCALING_FACTOR,),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=ISO_PAPER,
        summary="per matrix: the sum of task vectors with a flat (mean) singular spectrum",
        task_vectors=True,
    ),
    Method(
        name="iso_cts",
        merge=_table_merge("iso_cts"),
        params=(
            SCALING_FACTOR,
            Param("common_space_fraction", float, ISO_CTS_FRACTION, low=0.0, high=1.0,
                  doc="share of singular directions from the sum; the rest split among the tasks"),
            LAYOUT,
        ),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=ISO_PAPER,
        summary="per matrix: common plus task-specific singular directions, flat spectrum",
        task_vectors=True,
    ),
    Method(
        name="wudi",
        merge=_table_merge("wudi"),
        params=(
            Param("iter_num", int, WUDI_ITER_NUM, low=0, doc="Adam steps per matrix"),
            Param("lr", float, WUDI_LR, low=0.0, low_open=True, doc="Adam's learning rate"),
            LAYOUT,
        ),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=WUDI_PAPER,
        summary="per matrix: Adam on the task vectors' interference, from their sum",
        task_vectors=True,
    ),
)
