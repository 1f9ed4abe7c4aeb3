"""Adaptive methods of mergekit 0.1.5: model_stock, sce, ram, ramplus_tl, arcee_fusion, passthrough.

Each method's result is the one of mergekit 0.1.5's method of the same name
(`mergekit/merge_methods/*.py`) with the same parameters, scopes, defaults and
input contract; the heavy work is in jitted kernels whose numeric parameters
are traced values (mergekit lets every parameter vary per tensor, so a new value
must not recompile). Booleans that change the algorithm (`filter_wise`) are static.

Papers: Model Stock (Jang, Yun & Han, 2024, arXiv:2403.19522); SCE, from
FuseChat (Wan et al., 2024, arXiv:2408.07990); RAM / RAM+ (Reinforced Agent
Merging, mergekit's reference arXiv:2601.13572); Arcee Fusion (Arcee AI,
mergekit's reference https://arcee.ai, no paper).

Deliberate differences from mergekit:
* arcee_fusion takes its quartiles exactly over all entries; mergekit sorts a
  random sample of 1,000,000 entries (drawn with replacement) for larger
  tensors. Up to 1,000,000 entries both are the same order statistics.
* Ranges are checked (mergekit checks only the type): select_topk >= 0,
  epsilon >= 0 (ram) or > 0 (ramplus_tl, where it divides), r >= 0, alpha >= 0.
* Work is in float32 at least (half-precision inputs are widened), as every
  method of the table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.core import _validation as v
from jaxmerge.core._dtypes import compute_dtype, count_dtype, separate_pass
from jaxmerge.core._kernels import kernel
from jaxmerge.core.selection import kth_largest_magnitude_bits, masked, top_k_magnitude_mask
from jaxmerge.core.sign import elected_sign, sum_tasks
from jaxmerge.methods._table import BasePolicy, Method, Param, Scope, split_inputs
from jaxmerge.methods.task_arithmetic import INT8_MASK

MODEL_STOCK_PAPER = "Jang, Yun & Han, 2024, Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522"
SCE_PAPER = "Wan et al., 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging), arXiv:2408.07990"
RAM_PAPER = "Reinforced Agent Merging (RAM), 2026, arXiv:2601.13572 (mergekit's reference)"
MERGEKIT_PAPER = "Goddard et al., 2024, Arcee's MergeKit, arXiv:2403.13257"
ARCEE_FUSION_REF = f"Arcee AI, Arcee Fusion (https://arcee.ai, no paper), in {MERGEKIT_PAPER}"


def _as_1d(x):
    """A 0-d tensor as one entry (torch reduces a 0-d tensor over dim -1 as over that entry)."""
    return x.reshape(1) if x.ndim == 0 else x


# --- model_stock -------------------------------------------------------------


def _model_stock(inputs, base_index, *, key, filter_wise):
    """Model Stock (Jang et al., 2024, arXiv:2403.19522), mergekit's `model_stock`.

    With offsets d_i = w_i - w_0 of the N models from the base w_0, per filter
    (last-axis row; a 1-D tensor is one row) when `filter_wise`, else over the
    whole tensor:

        cos = mean_{i<j} clip(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)
        t = N cos / (1 + (N - 1) cos)        (0 where |1 + (N - 1) cos| < 1e-6)
        w = t * mean_i(w_i) + (1 - t) * w_0

    Args:
      inputs: the base and N >= 2 models, same shape.
      base_index: the base's slot.
      key: unused.
      filter_wise: one interpolation ratio per row instead of one per tensor.

    Returns:
      The merged tensor, in the inputs' dtype.
    """
    models, base = split_inputs(inputs, base_index)
    return _model_stock_kernel(base, tuple(models), filter_wise=bool(filter_wise))


@kernel(static_argnames=("filter_wise",))
def _model_stock_kernel(base, models, *, filter_wise):
    cd = compute_dtype(base.dtype)

    def shaped(x):  # widened, as filters (rows) or as one vector
        x = x.astype(cd)
        if filter_wise:
            return _as_1d(x)[None] if x.ndim <= 1 else x
        return x.reshape(-1)

    def offset(model, b):
        return shaped(model) - shaped(b)

    # Each norm and inner product is a pass of its own over the inputs (`separate_pass`), taking the
    # offsets itself: XLA writes no float32 copy of an offset (it wrote one per model).
    norms = [jnp.sqrt(jnp.sum(d * d, axis=-1)) for d in (offset(*separate_pass(m, base)) for m in models)]
    cos = []
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            a, b, m0 = separate_pass(models[i], models[j], base)
            product = jnp.maximum(norms[i] * norms[j], 1e-6)
            cos.append(jnp.clip(jnp.sum(offset(a, m0) * offset(b, m0), axis=-1) / product, -1, 1))
    cos_theta = (sum_tasks(cos) / len(cos))[..., None]
    count = len(models)
    denominator = 1 + (count - 1) * cos_theta
    # At the singularity mergekit keeps the base for that filter (t = 0).
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, count * cos_theta / jnp.where(singular, 1, denominator))
    average = sum_tasks([shaped(m) for m in models]) / count
    return (t * average + (1 - t) * shaped(base)).reshape(base.shape).astype(base.dtype)


# --- sce ---------------------------------------------------------------------


def _sce(inputs, base_index, *, key, select_topk, int8_mask=False):
    """SCE: Select, Calculate, Erase (Wan et al., 2024, FuseChat, arXiv:2408.07990), mergekit's `sce`.

    With task vectors tv_i = w_i - w_0:

      Select (only when select_topk < 1): keep in every tv_i the k entries of
        largest population variance across the models, var = Var_i(tv_i),
        k = int(nnz(var) * select_topk) (nothing when select_topk <= 0);
      Calculate: lambda_i = mean(tv_i^2) / sum_j mean(tv_j^2) (1/N when that sum < 1e-6);
      Erase: s = sign(sum_i tv_i) (+1 where the sum is >= 0), m_i = [sign(tv_i) = s];

        w = w_0 + sum_i lambda_i m_i tv_i / max(sum_i lambda_i m_i, 1e-6).

    Args:
      inputs: the base and N >= 0 models.
      base_index: the base's slot.
      key: unused.
      select_topk: fraction of the variance-ranked entries kept (>= 1: all).
      int8_mask: mergekit's mask storage type; no effect on the result.

    Returns:
      The merged tensor, in the inputs' dtype.
    """
    models, base = split_inputs(inputs, base_index)
    if not models:
        return base
    return _sce_kernel(base, tuple(models), select_topk, partitioned=v.is_partitioned(tuple(inputs)))


@kernel(static_argnames=("partitioned",))
def _sce_kernel(base, models, select_topk, *, partitioned):
    cd = compute_dtype(base.dtype)
    w0 = base.astype(cd)
    tvs = tuple(w.astype(cd) - w0 for w in models)
    count = len(tvs)

    def select(tvs):
        mean = sum_tasks(list(tvs)) / count
        var = sum_tasks([(t - mean) ** 2 for t in tvs]) / count
        nonzero = jnp.sum(var != 0, dtype=count_dtype())
        # torch: int64 count * Python float runs in float32, then int() truncates.
        d = jnp.asarray(select_topk, jnp.float32)
        k = jnp.where(d <= 0, 0, jnp.floor(nonzero.astype(jnp.float32) * d)).astype(count_dtype())
        keep = top_k_magnitude_mask(var, k, partitioned)  # var >= 0: its magnitude is itself
        return tuple(masked(t, keep) for t in tvs)

    tvs = lax.cond(select_topk < 1, select, lambda tvs: tvs, tvs)
    weights = jnp.stack([jnp.mean(t * t) for t in tvs])
    total = jnp.sum(weights)
    weights = jnp.where(jnp.abs(total) < 1e-6, jnp.full_like(weights, 1 / count), weights / total)
    sign = elected_sign(list(tvs), "total")
    erased = [weights[i] * (jnp.sign(t) == sign).astype(cd) for i, t in enumerate(tvs)]
    merged = sum_tasks([t * e for t, e in zip(tvs, erased)]) / jnp.maximum(sum_tasks(erased), 1e-6)
    return (w0 + merged).astype(base.dtype)


# --- ram, ramplus_tl ---------------------------------------------------------


def _ram(inputs, base_index, *, key, epsilon):
    """RAM (Reinforced Agent Merging, arXiv:2601.13572), mergekit's `ram`.

    With task vectors tv_i = w_i - w_0, m_i = [|tv_i| > epsilon] and c = sum_i m_i
    per entry, entries that one model alone changes are kept whole and shared
    ones averaged over the models that change them:

        w = w_0 + sum_i m_i tv_i ([c = 1] + [c > 1] / c)

    Args:
      inputs: the base and N >= 0 models.
      base_index: the base's slot.
      key: unused.
      epsilon: entries with |tv_i| <= epsilon count as unchanged.

    Returns:
      The merged tensor, in the inputs' dtype.
    """
    models, base = split_inputs(inputs, base_index)
    if not models:
        return base
    return _ram_kernel(base, tuple(models), epsilon, 0.0, 0.0, plus=False)


def _ramplus_tl(inputs, base_index, *, key, r, alpha, epsilon):
    """RAM+ tensor-local (arXiv:2601.13572), mergekit's `ramplus_tl`.

    As `ram`, with each model's unique entries reinforced by how much of its
    change the others share, counted within this tensor:

        rho_i = |{m_i and c > 1}| / max(|{m_i and c = 1}|, epsilon)
        lambda_i = 1 + r * clip(rho_i, 0, alpha)
        w = w_0 + sum_i m_i tv_i (lambda_i [c = 1] + [c > 1] / c)

    Args:
      inputs: the base and N >= 0 models.
      base_index: the base's slot.
      key: unused.
      r: reinforcement strength.
      alpha: upper bound of rho.
      epsilon: threshold of a change, and the floor of the unique count.

    Returns:
      The merged tensor, in the inputs' dtype.
    """
    models, base = split_inputs(inputs, base_index)
    if not models:
        return base
    return _ram_kernel(base, tuple(models), epsilon, r, alpha, plus=True)


@kernel(static_argnames=("plus",))
def _ram_kernel(base, models, epsilon, r, alpha, *, plus):
    cd = compute_dtype(base.dtype)
    w0 = base.astype(cd)
    tvs = [w.astype(cd) - w0 for w in models]
    changed = [jnp.abs(t) > jnp.asarray(epsilon, cd) for t in tvs]
    c = sum_tasks([m.astype(jnp.int32) for m in changed])
    overlap, unique = c > 1, c == 1
    shared_divisor = jnp.maximum(c, 1).astype(cd)
    scale = [jnp.ones((), cd)] * len(tvs)
    if plus:
        for i, m in enumerate(changed):
            shared = jnp.sum(m & overlap, dtype=count_dtype()).astype(jnp.float32)
            alone = jnp.sum(m & unique, dtype=count_dtype()).astype(jnp.float32)
            rho = shared / jnp.maximum(alone, jnp.asarray(epsilon, jnp.float32))
            scale[i] = (1 + r * jnp.clip(rho, 0, alpha)).astype(cd)
    parts = []
    for t, m, s in zip(tvs, changed, scale):
        # masked: x * 0 keeps NaN and inf visible, as mergekit's multiplication by the masks does.
        tz = masked(t, m)
        parts.append(masked(tz, unique) * s + masked(tz, overlap) / shared_divisor)
    return (w0 + sum_tasks(parts)).astype(base.dtype)


# --- arcee_fusion ------------------------------------------------------------


def _arcee_fusion(inputs, base_index, *, key):
    """Arcee Fusion (Arcee AI; mergekit's `arcee_fusion`): keep a model's outstanding changes.

    For the base w_0 and one model w_1, with softmax over the last axis (a 1-D
    tensor is one row):

        I = |w_1 - w_0| * sum_row p log(p / q),  p = softmax(w_1) + 1e-8, q = softmax(w_0) + 1e-8
        tau = Q(0.5) + 1.5 (Q(0.75) - Q(0.25)),  Q(q) = sorted(I)[floor(q (n - 1))]
        w = w_0 + (w_1 - w_0) [I >= tau]

    The order statistics are found exactly in linear time (no sort), over all
    entries (mergekit samples 1,000,000 entries of larger tensors).

    Args:
      inputs: the base and one model.
      base_index: the base's slot.
      key: unused.

    Returns:
      The merged tensor, in the inputs' dtype.
    """
    (model,), base = split_inputs(inputs, base_index)
    n = int(np.prod(base.shape, dtype=np.int64))
    # Python integers: floor(q (n - 1)) exactly (mergekit's float32 product is exact below 2**22 entries).
    ranks = ((n - 1) // 4, (n - 1) // 2, (3 * (n - 1)) // 4)
    return _arcee_fusion_kernel(base, model, ranks=ranks)


def _kth_smallest(x, rank):
    """sorted(x)[rank] (0-based, ascending) without sorting: one magnitude search.

    Negative entries are ranked by the magnitude search among the negatives
    alone, the others among the non-negatives alone (the zeros put in place of
    the excluded entries rank below every entry searched for).
    """
    n = x.size
    negative = x < 0
    c_neg = jnp.sum(negative, dtype=count_dtype())
    r = jnp.asarray(rank, count_dtype())
    as_float = lambda bits: lax.bitcast_convert_type(bits, x.dtype)  # noqa: E731

    def among_negatives():
        bits, _ = kth_largest_magnitude_bits(jnp.where(negative, x, 0), r + 1)
        return -as_float(bits)

    def among_the_rest():
        bits, _ = kth_largest_magnitude_bits(jnp.where(negative, 0, x), jnp.asarray(n, count_dtype()) - r)
        return as_float(bits)

    return lax.cond(r < c_neg, among_negatives, among_the_rest)


@kernel(static_argnames=("ranks",))
def _arcee_fusion_kernel(base, model, *, ranks):
    cd = compute_dtype(base.dtype)
    w0, w1 = _as_1d(base.astype(cd)), _as_1d(model.astype(cd))
    p = jax.nn.softmax(w1, axis=-1) + 1e-8
    q = jax.nn.softmax(w0, axis=-1) + 1e-8
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    diff = w1 - w0
    importance = jnp.abs(diff) * kl  # kl can round below 0, so the order statistics are signed
    q1, median, q3 = (_kth_smallest(importance, rank) for rank in ranks)
    threshold = median + 1.5 * (q3 - q1)
    merged = w0 + diff * (importance >= threshold).astype(cd)
    return merged.reshape(base.shape).astype(base.dtype)


# --- passthrough -------------------------------------------------------------


def _passthrough(inputs, base_index, *, key, scale):
    """mergekit's `passthrough`: the one input, times its `scale` when one is given.

    Args:
      inputs: one tensor.
      base_index: None (the base is not an input).
      key: unused.
      scale: one value per input (None: unscaled).

    Returns:
      x * scale, or x, in x's dtype.
    """
    (x,) = inputs
    if scale[0] is None:
        return x
    return _scale_kernel(x, scale[0])


@kernel
def _scale_kernel(x, scale):
    cd = compute_dtype(x.dtype)
    return (x.astype(cd) * jnp.asarray(scale, cd)).astype(x.dtype)


# --- the table ---------------------------------------------------------------

EPSILON_DOC = "task-vector entries with |value| <= epsilon count as unchanged"

METHODS = (
    Method(
        name="model_stock",
        merge=_model_stock,
        params=(Param("filter_wise", bool, False, doc="one interpolation ratio per row (filter) instead of per tensor"),),
        base=BasePolicy.REQUIRED,
        min_models=3,
        paper=MODEL_STOCK_PAPER,
        summary="interpolate the models' mean towards the base by the angle between their task vectors",
    ),
    Method(
        name="sce",
        merge=_sce,
        params=(
            INT8_MASK,
            Param("select_topk", float, 1.0, low=0.0,
                  doc="fraction of entries kept, ranked by variance across models (>= 1 keeps all)"),
        ),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=SCE_PAPER,
        summary="select high-variance entries, weight by task-vector energy, erase minority signs",
    ),
    Method(
        name="ram",
        merge=_ram,
        params=(Param("epsilon", float, 1e-5, low=0.0, doc=EPSILON_DOC),),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=RAM_PAPER,
        summary="keep changes made by one model whole, average those several models make",
    ),
    Method(
        name="ramplus_tl",
        merge=_ramplus_tl,
        params=(
            Param("r", float, 0.1, low=0.0, doc="reinforcement of each model's unique changes"),
            Param("alpha", float, 0.2, low=0.0, doc="upper bound of the shared/unique ratio rho"),
            Param("epsilon", float, 1e-5, low=0.0, low_open=True,
                  doc=EPSILON_DOC + "; also the floor of the unique count"),
        ),
        base=BasePolicy.REQUIRED,
        min_models=1,
        paper=RAM_PAPER,
        summary="ram with each model's unique changes scaled by 1 + r * clip(shared/unique, 0, alpha)",
    ),
    Method(
        name="arcee_fusion",
        merge=_arcee_fusion,
        params=(),
        base=BasePolicy.REQUIRED,
        min_models=2,
        max_models=2,
        paper=ARCEE_FUSION_REF,
        summary="keep the model's changes whose KL-weighted importance is an upper outlier",
    ),
    Method(
        name="passthrough",
        merge=_passthrough,
        params=(Param("scale", float, None, Scope.PER_INPUT, doc="multiplies the tensor (none: unchanged)"),),
        base=BasePolicy.IGNORED,
        min_models=1,
        max_models=1,
        paper=MERGEKIT_PAPER,
        summary="the one model's tensor, optionally scaled",
        identity=lambda bound: bound["scale"][0] is None,
    ),
)
