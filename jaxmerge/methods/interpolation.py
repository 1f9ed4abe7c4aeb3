"""Geometric (spherical) merges: slerp, nuslerp, multislerp, karcher, nearswap.

Each method is mergekit 0.1.5's definition (`mergekit/merge_methods/slerp.py`,
`nuslerp.py`, `multislerp.py`, `karcher.py`, `nearswap.py`): same parameters,
defaults, base handling, thresholds and fallbacks. The work is done in jitted
JAX kernels in float32 at least (float64 stays float64) and the result has the
inputs' dtype. Parameters that mergekit lets vary per layer (`t`, weights, eps,
max_iter, tol) are traced values, so a gradient of `t` over layers compiles
once per tensor shape; only boolean options are static.

References: slerp, Shoemake, 1985, "Animating rotation with quaternion curves"
(SIGGRAPH '85); nuslerp and multislerp, Goddard et al., 2024, mergekit,
arXiv:2403.13257 and https://goddard.blog/posts/multislerp-wow-what-a-cool-idea;
karcher, Wang, Ye & Yin, 2026, arXiv:2603.04972 (Karcher, 1977, Riemannian
centre of mass); nearswap, alchemonaut, 2024,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.core._dtypes import compute_dtype, separate_pass
from jaxmerge.core._kernels import kernel
from jaxmerge.core.sign import sum_tasks
from jaxmerge.methods._table import REQUIRED, BasePolicy, Method, MethodError, Param, Scope, non_base, split_inputs

# mergekit's slerp() defaults (not parameters of its merge method).
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
NUSLERP_EPS = 1e-8  # colinear when 1 - cos^2 <= eps^2
NUSLERP_NORM_EPS = 1e-7  # clamp of the norms in nuslerp's _normalize


def _norm(x, axis=None, keepdims=False):
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def _safe(x, bad):
    """`x` where not `bad`, else 1: keeps the unselected branch of a `where` finite."""
    return jnp.where(bad, jnp.ones_like(x), x)


# --------------------------------------------------------------------------- slerp


@kernel
def slerp(t, v0, v1):
    """Spherical linear interpolation of two whole tensors (mergekit's `slerp`).

    With a = v0, b = v1 flattened, cos(theta) = <a/|a|, b/|b|> (norms at or below
    eps = 1e-8 taken as 1, clamped to [-1, 1]):

        slerp(t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

    and the linear (1 - t) a + t b when |cos(theta)| > 0.9995 (collinear or
    antipodal). The inputs are not normalised: the result keeps their scale.
    Shoemake, 1985, Animating rotation with quaternion curves, SIGGRAPH '85.

    Args:
      t: interpolation factor (a traced scalar; t = 0 gives v0, t = 1 gives v1).
      v0, v1: same-shape arrays (v0 is the base in the merge method).

    Returns:
      The interpolated array, in v0's dtype.
    """
    cd = compute_dtype(v0.dtype)
    t = jnp.asarray(t, cd)

    def widened(x0, x1):
        return x0.reshape(-1).astype(cd), x1.reshape(-1).astype(cd)

    if v0.size == 0:
        a, b = widened(v0, v1)
        return ((1 - t) * a + t * b).reshape(v0.shape).astype(v0.dtype)
    # Three passes over the inputs (norms, dot, result), each widening half-precision inputs itself
    # (separate_pass), so that XLA writes no float32 copy of either.
    a, b = widened(*separate_pass(v0, v1))
    norm_a, norm_b = _norm(a), _norm(b)
    norm_a = jnp.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = jnp.where(norm_b > SLERP_EPS, norm_b, 1)
    x0, x1, norm_a, norm_b = separate_pass(v0, v1, norm_a, norm_b)  # not (v0, v1): XLA would merge the two
    a, b = widened(x0, x1)
    # Normalise before the product, as mergekit does, so the raw dot cannot overflow.
    dot = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1, 1)
    linear = jnp.abs(dot) > SLERP_DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(linear, 0, dot))
    sin_theta = _safe(jnp.sin(theta), linear)
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    a, b = widened(v0, v1)
    return (coef_a * a + coef_b * b).reshape(v0.shape).astype(v0.dtype)


def _slerp_merge(inputs, base_index, *, key, t):
    models, base = split_inputs(inputs, base_index)
    return slerp(t, base, models[0])


# --------------------------------------------------------------------------- nuslerp


@kernel(static_argnames=("row_wise", "flatten"))
def nuslerp(t, v0, v1, *, row_wise=False, flatten=True):
    """mergekit's `nuslerp`: slerp of unnormalised vectors along rows, columns or the whole tensor.

    With u = v / max(|v|, 1e-7) along the chosen axis and cos(theta) = <u0, u1>:

        nuslerp(t) = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)

    and (1 - t) v0 + t v1 where 1 - cos^2(theta) <= 1e-16 (colinear).

    Args:
      t: interpolation factor (traced scalar).
      v0, v1: same-shape arrays.
      row_wise: without `flatten`, interpolate along axis 0 (columns of a
        matrix) instead of the last axis (rows).
      flatten: interpolate the flattened tensors as one vector (mergekit's default).

    Returns:
      The interpolated array, in v0's dtype.
    """
    return _nuslerp(t, v0, v1, None, row_wise=row_wise, flatten=flatten)


def _nuslerp(t, m0, m1, base, *, row_wise, flatten):
    """`nuslerp` of (m0, m1), or of (m0 - base, m1 - base) added to base, in passes over the inputs (each
    norm, the cosine, the result) that widen half-precision inputs and take the differences themselves
    (`separate_pass`): XLA writes no float32 copy of a vector or of the base. Returns base's dtype, else
    m0's."""
    anchor = m0 if base is None else base
    cd, out_shape, dtype = compute_dtype(anchor.dtype), anchor.shape, anchor.dtype
    t = jnp.asarray(t, cd)
    # torch reduces a 0-d tensor over dim -1 (or 0) as over its one entry: the flattened vector.
    flatten = flatten or anchor.ndim == 0
    # The axis of the vectors: the whole tensor flattened, rows (the last axis) or columns (axis 0).
    axis = 0 if row_wise and not flatten else -1
    based = () if base is None else (base,)

    def vector(x, *b):
        x = x.astype(cd)
        if b:
            x = x - b[0].astype(cd)
        return x.reshape(-1) if flatten else x

    def norm(x):  # a pass of its own: a widened base shared by two reductions would be written out
        return jnp.maximum(_norm(vector(*separate_pass(x, *based)), axis=axis, keepdims=True), NUSLERP_NORM_EPS)

    n0, n1 = norm(m0), norm(m1)
    a0, a1, *b, n0, n1 = separate_pass(m0, m1, *based, n0, n1)
    cos_theta = jnp.clip(jnp.sum((vector(a0, *b) / n0) * (vector(a1, *b) / n1), axis=axis, keepdims=True), -1, 1)
    colinear = (1 - cos_theta * cos_theta) <= NUSLERP_EPS**2
    theta = jnp.arccos(jnp.where(colinear, 0, cos_theta))
    sin_theta = _safe(jnp.sin(theta), colinear)
    x0, x1 = vector(m0, *based), vector(m1, *based)
    spherical = (jnp.sin((1 - t) * theta) * x0 + jnp.sin(t * theta) * x1) / sin_theta
    result = jnp.where(colinear, (1 - t) * x0 + t * x1, spherical).reshape(out_shape)
    if base is not None:
        result = base.astype(cd) + result
    return result.astype(dtype)


@kernel(static_argnames=("row_wise", "flatten"))
def _nuslerp_kernel(weights, m0, m1, base, *, row_wise, flatten):
    # mergekit: t = w1 / (w0 + w1), 0.5 when the weights sum to (almost) 0.
    total = weights[0] + weights[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, weights[1] / _safe(total, total == 0))
    return _nuslerp(t, m0, m1, base, row_wise=row_wise, flatten=flatten)


def _nuslerp_merge(inputs, base_index, *, key, weight, nuslerp_flatten, nuslerp_row_wise):
    models, base = split_inputs(inputs, base_index)
    weights = np.asarray(non_base(weight, base_index), np.float32)
    return _nuslerp_kernel(weights, models[0], models[1], base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


def _count_models(bound) -> int:
    # `weight` is required, so only the base's slot holds None.
    return sum(w is not None for w in bound["weight"])


def _check_nuslerp(bound, num_inputs):
    n = _count_models(bound)
    if n != 2:
        raise MethodError(f"method nuslerp takes exactly 2 models besides the base, got {n}")


# --------------------------------------------------------------------------- multislerp


@kernel(static_argnames=("normalize_weights",))
def _multislerp_kernel(tensors, weights, base, eps, *, normalize_weights):
    """mergekit's `multislerp` of `tensors` (minus `base`, added back), in passes over the inputs.

    mergekit maps the units u_i = x_i / (|x_i| + eps) to the tangent plane at
    their normalised weighted mean m = s / |s|, s = sum_i w_i u_i, sums the
    projections u_i - <u_i, m> m with the weights and maps that sum back with
    the exponential map, scaled by sum_i w_i |x_i|. The weighted sum of the
    projections is the projection of s, which lies along m: it is zero, its
    norm plus eps is eps, and the result is

        cos(eps) (sum_i w_i |x_i|) s / |s|,   s = sum_i (w_i / (|x_i| + eps)) x_i.

    mergekit computes the zero and keeps its rounding noise; this closed form
    needs one pass per model for its norm, one for |s| and one for the result,
    each widening half-precision inputs and subtracting the base itself
    (`separate_pass`): no float32 copy of a model, a unit vector or the base.

    Args:
      tensors: the models (2 or more), same shape and dtype.
      weights: float array (len(tensors),).
      base: the base (same shape) or None.
      eps: mergekit's eps (added to every norm; a weighted mean of units
        shorter than eps is degenerate).
      normalize_weights: divide the weights by their sum first.

    Returns:
      (the result in the models' dtype, degenerate: |s| < eps, where two models
      fall back to w_0 x_0 + w_1 x_1 as in mergekit, which raises for more).
    """
    cd = compute_dtype(tensors[0].dtype)
    shape, dtype, n = tensors[0].shape, tensors[0].dtype, len(tensors)
    based = () if base is None else (base,)

    def vector(x, *b):  # x - base, widened, flat
        x = x.reshape(-1).astype(cd)
        return x - b[0].reshape(-1).astype(cd) if b else x

    def weighted_sum(coefs, xs, *b):
        return sum(c * vector(x, *b) for c, x in zip(coefs, xs))

    w = weights.astype(cd)
    if normalize_weights:
        w = w / jnp.sum(w)
    eps = jnp.asarray(eps, cd)
    norms = [_norm(vector(*separate_pass(x, *based))) for x in tensors]
    coefs = [w[i] / (norms[i] + eps) for i in range(n)]  # s = sum_i coefs_i x_i
    passed = separate_pass(*tensors, *based, *coefs)
    xs, b, cs = passed[:n], passed[n : n + len(based)], passed[n + len(based) :]
    mean_norm = _norm(weighted_sum(cs, xs, *b))  # |s|
    degenerate = mean_norm < eps
    scale = jnp.cos(eps) * sum(w[i] * norms[i] for i in range(n)) / _safe(mean_norm, degenerate)
    result = weighted_sum([scale * c for c in coefs], tensors, *based)
    if n == 2:  # mergekit's fallback for a zero weighted mean: linear interpolation
        result = jnp.where(degenerate, weighted_sum(w, tensors, *based), result)
    if base is not None:
        result = result + base.reshape(-1).astype(cd)
    return result.reshape(shape).astype(dtype), degenerate


def _multislerp_merge(inputs, base_index, *, key, weight, normalize_weights, eps):
    models, base = split_inputs(inputs, base_index)
    if len(models) == 1:  # mergekit returns the one model itself, base or not
        return models[0]
    weights = np.asarray(non_base(weight, base_index), np.float32)
    result, degenerate = _multislerp_kernel(tuple(models), weights, base, eps, normalize_weights=normalize_weights)
    # mergekit raises here for 3+ models; the check costs one device sync, so only where it can fire.
    if len(models) > 2 and bool(degenerate):
        raise MethodError(
            "multislerp: the weighted mean of the normalised models is zero (antipodal models whose "
            "weights cancel); use different weights"
        )
    return result


def _check_multislerp(bound, num_inputs):
    n = _count_models(bound)
    if n < 1:
        raise MethodError("method multislerp takes at least 1 model besides the base, got 0")
    weights = [w for w in bound["weight"] if w is not None]
    if n > 1 and bound["normalize_weights"] and sum(weights) == 0:
        raise MethodError(
            f"multislerp: weight sums to 0 ({weights}), so normalize_weights cannot divide by it; "
            "set normalize_weights: false"
        )


# --------------------------------------------------------------------------- karcher


@kernel
def karcher_mean(tensors, max_iter=10, tol=1e-5):
    """mergekit's `karcher_merge_tensors` with equal weights 1/n: Karcher mean on the unit sphere.

    With units u_i = x_i / |x_i| of the models whose norm exceeds `tol` and
    alphas a_i = 1/n renormalised over them, start at the normalised weighted
    mean m (u_first if its norm is below tol) and repeat up to `max_iter` times

        v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  theta_i = arccos<m, u_i>
        m <- cos|v| m + sin|v| v / |v|   (then renormalised)

    skipping terms with theta_i < tol and stopping when |v| < tol. The result is
    (sum_i |x_i| / n) m. Wang, Ye & Yin, 2026, arXiv:2603.04972.

    The iteration runs on coefficients, not tensors: m and v stay combinations of
    the units, m = sum_i c_i u_i. Inner products with m and its length come from
    the units' Gram matrix (one pass over the models for all of it) wherever that
    is as exact as a pass over the tensors: coefficients of order one and a length
    not far below them (a short mean of near-antipodal units would lose float32
    digits to cancellation; there a read-only pass over the models decides). |v|,
    the length of a short difference of near-parallel units, always takes that
    pass. The mean is written once, at the end.

    Args:
      tensors: a tuple of same-shape arrays.
      max_iter: most fixed-point steps (traced).
      tol: threshold on norms, angles and the step (traced).

    Returns:
      The mean, in the inputs' dtype.
    """
    cd = compute_dtype(tensors[0].dtype)
    shape, dtype = tensors[0].shape, tensors[0].dtype
    n = len(tensors)
    tol = jnp.asarray(tol, cd)
    # One array per model, never stacked; sums over the models unrolled: XLA:CPU's reduction over
    # the leading axis of stacked tensors is ~1300x slower (3 x 4096² float32: 28.7 s against 0.022 s).
    flat = [x.reshape(-1).astype(cd) for x in tensors]
    products = {(i, j): jnp.sum(flat[i] * flat[j]) for i in range(n) for j in range(i, n)}
    inner = jnp.stack([jnp.stack([products[min(i, j), max(i, j)] for j in range(n)]) for i in range(n)])
    norms = jnp.sqrt(jnp.diagonal(inner))
    inverse = jnp.where(norms == 0, 0, 1 / _safe(norms, norms == 0))  # a zero tensor's unit is zero
    gram = inner * inverse[:, None] * inverse[None, :]

    def small(a, b):  # n x n algebra; HIGHEST: no reduced-precision (TF32) matmul on accelerators
        return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)

    def combine(coef):  # sum_i coef_i u_i, entry by entry, from the models
        return sum_tasks([(coef[i] * inverse[i]) * flat[i] for i in range(n)])

    def length(coef):  # |sum_i coef_i u_i|
        squared = small(coef, small(gram, coef))
        # Trusted when cancellation costs at most 16x float32's rounding of the Gram entries.
        return lax.cond(squared >= jnp.sum(jnp.abs(coef)) ** 2 / 16, lambda: jnp.sqrt(squared),
                        lambda: _norm(combine(coef)))

    def dots_with(coef):  # <u_j, sum_i coef_i u_i> for every j
        def from_tensors():
            mean = combine(coef)
            return jnp.stack([jnp.sum(flat[j] * mean) * inverse[j] for j in range(n)])

        return lax.cond(jnp.sum(jnp.abs(coef)) <= 4, lambda: small(gram, coef), from_tensors)

    valid = norms > tol
    alphas = jnp.where(valid, 1.0 / n, 0).astype(cd)
    alphas = alphas / _safe(jnp.sum(alphas), ~jnp.any(valid))
    mean_norm = length(alphas)
    first_valid = (jnp.arange(n) == jnp.argmax(valid)).astype(cd)
    coef = jnp.where(mean_norm < tol, first_valid, alphas / _safe(mean_norm, mean_norm == 0))

    def step(state):
        i, coef, _ = state
        dots = jnp.clip(dots_with(coef), -1, 1)
        theta = jnp.arccos(dots)
        skip = (theta < tol) | ~valid
        factor = jnp.where(skip, 0, alphas * theta / _safe(jnp.sin(theta), skip))
        tangent = factor - jnp.sum(factor * dots) * coef  # v = sum_i tangent_i u_i
        tangent_norm = _norm(combine(tangent))
        done = tangent_norm < tol

        def move():
            moved = jnp.cos(tangent_norm) * coef + jnp.sin(tangent_norm) * (tangent / tangent_norm)
            unit_norm = length(moved)
            return jnp.where(unit_norm > tol, moved / _safe(unit_norm, unit_norm <= tol), moved)

        # lax.cond: the last step (converged) makes no move.
        return i + 1, lax.cond(done, lambda: coef, move), done

    _, coef, _ = lax.while_loop(
        lambda s: (s[0] < max_iter) & ~s[2], step, (jnp.asarray(0, jnp.int32), coef, jnp.asarray(False))
    )
    result = combine((jnp.sum(norms) / n) * coef)
    # No model above tol: mergekit returns zeros.
    return jnp.where(jnp.any(valid), result, 0).reshape(shape).astype(dtype)


def _karcher_merge(inputs, base_index, *, key, max_iter, tol):
    if len(inputs) == 1:
        return inputs[0]
    return karcher_mean(tuple(inputs), max_iter, tol)


# --------------------------------------------------------------------------- nearswap


@kernel
def nearswap(t, a, b):
    """mergekit's `nearswap`: move a towards b where they are already close.

        w = clip(t / max(|a - b|, 1e-6), 0, 1),   result = w b + (1 - w) a

    Entries closer than t take b; the others move by t towards b.
    alchemonaut, 2024, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.

    Args:
      t: the distance scale (traced scalar).
      a: the base; b: the other model.

    Returns:
      The merged array, in a's dtype.
    """
    cd = compute_dtype(a.dtype)
    x, y = a.astype(cd), b.astype(cd)
    w = jnp.clip(jnp.asarray(t, cd) / jnp.maximum(jnp.abs(x - y), 1e-6), 0, 1)
    return (w * y + (1 - w) * x).astype(a.dtype)


def _nearswap_merge(inputs, base_index, *, key, t):
    models, base = split_inputs(inputs, base_index)
    return nearswap(t, base, models[0])


# --------------------------------------------------------------------------- table

NUSLERP_WEIGHT = Param("weight", float, REQUIRED, Scope.PER_MODEL, doc="the model's weight; t = w2 / (w1 + w2)")
MERGEKIT_PAPER = "Goddard et al., 2024, Arcee's MergeKit, arXiv:2403.13257"

METHODS = (
    Method(
        name="slerp",
        merge=_slerp_merge,
        params=(Param("t", float, REQUIRED, doc="interpolation factor: 0 gives the base, 1 the other model"),),
        base=BasePolicy.REQUIRED,
        min_models=2,
        max_models=2,
        paper="Shoemake, 1985, Animating rotation with quaternion curves, SIGGRAPH '85",
        summary="spherical interpolation from the base to the other model",
    ),
    Method(
        name="nuslerp",
        merge=_nuslerp_merge,
        params=(
            NUSLERP_WEIGHT,
            Param("nuslerp_flatten", bool, True, doc="interpolate each tensor as one vector"),
            Param("nuslerp_row_wise", bool, False, doc="without flatten: along columns (axis 0) instead of rows"),
        ),
        base=BasePolicy.OPTIONAL,
        min_models=2,
        max_models=3,
        paper=MERGEKIT_PAPER + " (NuSLERP)",
        summary="slerp of two models (or their task vectors with a base) by weight",
        check=_check_nuslerp,
    ),
    Method(
        name="multislerp",
        merge=_multislerp_merge,
        params=(
            Param("weight", float, REQUIRED, Scope.PER_MODEL, doc="the model's weight"),
            Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
            Param("eps", float, 1e-8, doc="stabilises the norms"),
        ),
        base=BasePolicy.OPTIONAL,
        min_models=1,
        paper="Goddard, 2025, Multi-SLERP, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary="barycentric slerp of any number of models (task vectors with a base)",
        check=_check_multislerp,
    ),
    Method(
        name="karcher",
        merge=_karcher_merge,
        params=(
            Param("max_iter", int, 10, doc="most fixed-point iterations"),
            Param("tol", float, 1e-5, doc="convergence and zero-norm threshold"),
        ),
        base=BasePolicy.IGNORED,
        min_models=1,
        paper="Wang, Ye & Yin, 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold, arXiv:2603.04972",
        summary="Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
    ),
    Method(
        name="nearswap",
        merge=_nearswap_merge,
        params=(Param("t", float, REQUIRED, doc="distance below which the other model's entries are taken"),),
        base=BasePolicy.REQUIRED,
        min_models=2,
        max_models=2,
        paper="alchemonaut, 2024, NearSwap, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary="take the other model's entries where they are within t of the base, move by t elsewhere",
    ),
)
