"""Geometric methods (slerp, nuslerp, multislerp, karcher, nearswap) against mergekit 0.1.5, the oracle.

Every result is compared with mergekit's own merge method (`registry.get(name)`)
on the same float32 tensors, through `jaxmerge.merge_params` or the table's
`merge_tensor` (for a base that is not first); bad input must raise MethodError
naming the method, the parameter and the value.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

import jaxmerge
from jaxmerge.methods import _table as table
from jaxmerge.methods import interpolation

SHAPES = [(24, 40), (100,), (3, 5, 4), (1,)]
RTOL, ATOL = 2e-5, 2e-6


def rand(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def mergekit_merge(name, tensors, base_index, parameters):
    group = TensorGroup.from_tensors([torch.from_numpy(t.copy()) for t in tensors], base_index=base_index)
    return registry.get(name)([group], parameters=parameters)[0].numpy()


def ours(name, tensors, base=None, **params):
    trees = [{"w": t} for t in tensors]
    merged = jaxmerge.merge_params(trees, method=name, base=None if base is None else {"w": base}, **params)
    return np.asarray(merged["w"])


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ slerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, -0.25, 1.5])
def test_slerp_equals_mergekit(shape, t):
    base, other = rand(shape, 0), rand(shape, 1, 2.0)
    got = ours("slerp", [other], base, t=t)
    close(got, mergekit_merge("slerp", [base, other], 0, {"t": t}))
    if t in (0.0, 1.0):  # end points are the models themselves
        close(got, base if t == 0.0 else other)


@pytest.mark.parametrize(
    "case",
    ["collinear", "antipodal", "nearly_collinear", "cos_0.9996", "cos_-0.9996", "cos_0.9994", "orthogonal",
     "zero_base", "tiny", "large"],
)
@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_slerp_edge_cases_equal_mergekit(case, t):
    a = rand((8, 16), 2)
    b = {
        "collinear": 2.5 * a,
        "antipodal": -3.0 * a,
        "nearly_collinear": a + 1e-3 * rand((8, 16), 3),  # |cos| > 0.9995: linear fallback
        "zero_base": rand((8, 16), 4),
        "tiny": 1e-9 * rand((8, 16), 5),  # norm below eps: taken as 1
        "large": 1e18 * rand((8, 16), 6),  # normalised before the dot: no overflow
    }.get(case)
    if b is None:  # at a given angle from a: just above / below mergekit's dot threshold 0.9995
        cos = {"orthogonal": 0.0, "cos_0.9996": 0.9996, "cos_-0.9996": -0.9996, "cos_0.9994": 0.9994}[case]
        x = a.reshape(-1).astype(np.float64)
        y = rand(a.size, 7).astype(np.float64)
        y -= x * (y @ x) / (x @ x)
        y *= np.linalg.norm(x) / np.linalg.norm(y)
        b = (1.7 * (cos * x + math.sqrt(1 - cos * cos) * y)).astype(np.float32).reshape(a.shape)
    if case == "zero_base":
        a = np.zeros_like(a)
    got = ours("slerp", [b], a, t=t)
    theirs = mergekit_merge("slerp", [a, b], 0, {"t": t})
    scale = max(1.0, float(np.abs(theirs).max()))
    close(got, theirs, atol=ATOL * scale)
    assert np.isfinite(got).all()


def test_slerp_base_in_second_slot_is_the_start_point():
    base, other = rand((6, 7), 8), rand((6, 7), 9)
    spec = table.get("slerp")
    bound = spec.bind({"t": 0.2}, 2, base_index=1)
    got = np.asarray(table.merge_tensor(spec, [jnp.asarray(other), jnp.asarray(base)], 1, bound))
    close(got, mergekit_merge("slerp", [other, base], 1, {"t": 0.2}))


def test_slerp_t_is_traced_one_compile_per_shape():
    base, other = rand((5, 9), 10), rand((5, 9), 11)
    before = interpolation.slerp._cache_size()
    for t in np.linspace(0.0, 1.0, 7):  # a gradient of t over layers
        ours("slerp", [other], base, t=float(t))
    assert interpolation.slerp._cache_size() - before <= 1


# ------------------------------------------------------------------------ nuslerp


@pytest.mark.parametrize("shape", [(24, 40), (100,), (3, 5, 4)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0, 0.0], [1.0, -1.0], [2.0, 5.0]])
def test_nuslerp_equals_mergekit(shape, with_base, flatten, row_wise, weights):
    base = rand(shape, 12) if with_base else None
    models = [rand(shape, 13), rand(shape, 14, 0.5)]
    params = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = ours("nuslerp", models, base, **params)
    tensors = ([base] if with_base else []) + models
    close(got, mergekit_merge("nuslerp", tensors, 0 if with_base else None, params), atol=1e-5)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_of_0d_tensors_equals_mergekit(with_base, flatten, row_wise):
    """torch reduces a 0-d tensor over dim -1 or 0 as over its one entry, so mergekit merges scalars
    row- and column-wise too (jaxmerge raised "axis -1 is out of bounds")."""
    base = np.asarray(rand((), 12), np.float32) if with_base else None
    models = [np.asarray(rand((), 13), np.float32), np.asarray(rand((), 14, 0.5), np.float32)]
    params = {"weight": [0.3, 0.7], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = ours("nuslerp", models, base, **params)
    tensors = ([base] if with_base else []) + models
    assert got.shape == ()
    close(got, mergekit_merge("nuslerp", tensors, 0 if with_base else None, params), atol=1e-6)


def test_nuslerp_colinear_rows_fall_back_to_linear():
    a = rand((4, 10), 15)
    b = a * np.array([[2.0], [-1.0], [0.5], [3.0]], np.float32)  # every row colinear
    b[2] = rand(10, 16)  # but one
    params = {"weight": [0.6, 0.4], "nuslerp_flatten": False}
    got = ours("nuslerp", [a, b], **params)
    close(got, mergekit_merge("nuslerp", [a, b], None, params))
    close(got[0], 0.6 * a[0] + 0.4 * b[0])


# ------------------------------------------------------------------------ multislerp


@pytest.mark.parametrize("shape", [(24, 40), (100,), (3, 5, 4)])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_equals_mergekit(shape, n, with_base, normalize):
    base = rand(shape, 17) if with_base else None
    models = [rand(shape, 18 + i, 1.0 + i) for i in range(n)]
    weights = [0.5, 1.5, 0.7, 1.1][:n]
    params = {"weight": weights, "normalize_weights": normalize}
    got = ours("multislerp", models, base, **params)
    tensors = ([base] if with_base else []) + models
    close(got, mergekit_merge("multislerp", tensors, 0 if with_base else None, params), atol=1e-5)


@pytest.mark.parametrize("eps", [1e-8, 0.3])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("weights,normalize", [([0.5, 1.5, 0.7], True), ([0.5, -1.5, 0.7], False),
                                               ([-1.0, -0.5, -0.2], True)])
def test_multislerp_closed_form_equals_mergekit_in_float64(eps, n, weights, normalize):
    """jaxmerge evaluates multislerp's closed form (the weighted sum of the tangent projections is zero,
    so the exponential map gives cos(eps) times the normalised mean): mergekit run in float64, where
    that zero carries no rounding noise, agrees to float32 rounding, with negative weights too, and a
    large eps shows its cos(eps)."""
    base = rand((64, 48), 30)
    models = [base + rand((64, 48), 31 + i, 0.1 * (i + 1)) for i in range(n)]
    params = {"weight": weights[:n], "eps": eps, "normalize_weights": normalize}
    got = ours("multislerp", models, base, **params)
    group = TensorGroup.from_tensors([torch.from_numpy(t.astype(np.float64)) for t in [base, *models]], base_index=0)
    want = registry.get("multislerp")([group], parameters=params)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_multislerp_of_bfloat16_deltas_writes_no_float32_copy(n, with_base):
    """multislerp reads its bfloat16 inputs in passes (each model's norm, the mean's norm, the result),
    each widening them and taking the deltas itself: the compiled kernel holds no float32 copy of a
    model, a delta or a unit vector (it held one per model and more: 7x slower at 5632 x 2048)."""
    import jax

    shape = (512, 256)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    compiled = jax.jit(interpolation._multislerp_kernel, static_argnames=("normalize_weights",)).lower(
        (x,) * n, jax.ShapeDtypeStruct((n,), jnp.float32), x if with_base else None, 1e-8,
        normalize_weights=True).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < math.prod(shape) * 4


def test_multislerp_antipodal_pair_falls_back_to_linear_and_three_raise():
    a = rand((5, 6), 22)
    params = {"weight": [1.0, 1.0], "eps": 1e-8}
    got = ours("multislerp", [a, -2 * a], **params)
    close(got, mergekit_merge("multislerp", [a, -2 * a], None, params))
    close(got, -0.5 * a)  # 0.5 a + 0.5 (-2 a)
    three = [a, -a, 0 * a]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_merge("multislerp", three, None, {"weight": [1.0, 1.0, 1.0]})
    with pytest.raises(table.MethodError, match="multislerp: the weighted mean"):
        ours("multislerp", three, weight=[1.0, 1.0, 1.0])


# ------------------------------------------------------------------------ karcher


@pytest.mark.parametrize("shape", [(24, 40), (100,), (3, 5, 4)])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (50, 1e-7), (3, 0.5)])
def test_karcher_equals_mergekit(shape, n, max_iter, tol):
    models = [rand(shape, 23 + i, 1.0 + 0.5 * i) for i in range(n)]
    params = {"max_iter": max_iter, "tol": tol}
    got = ours("karcher", models, **params)
    close(got, mergekit_merge("karcher", models, None, params), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["one_zero", "all_zero", "identical", "tiny_below_tol"])
def test_karcher_edge_cases_equal_mergekit(case):
    a, b = rand((7, 9), 30), rand((7, 9), 31)
    models = {
        "one_zero": [a, np.zeros_like(a), b],
        "all_zero": [np.zeros_like(a), np.zeros_like(a)],
        "identical": [a, a.copy(), 3 * a],
        "tiny_below_tol": [a, 1e-8 * b],
    }[case]
    got = ours("karcher", models)
    close(got, mergekit_merge("karcher", models, None, {}), rtol=1e-4, atol=1e-5)


def _karcher_float64(models, max_iter=10, tol=1e-5):
    """mergekit's Karcher iteration (equal weights) in float64 NumPy, on tensors: the reference."""
    flat = [np.asarray(m, np.float64).reshape(-1) for m in models]
    norms = np.array([np.linalg.norm(x) for x in flat])
    units = [x / n for x, n in zip(flat, norms)]
    mean = sum(units) / len(units)
    mean /= np.linalg.norm(mean)
    steps = 0
    for _ in range(max_iter):
        dots = np.clip([u @ mean for u in units], -1, 1)
        theta = np.arccos(dots)
        tangent = sum(t / np.sin(t) / len(units) * (u - d * mean) for u, d, t in zip(units, dots, theta))
        length = np.linalg.norm(tangent)
        if length < tol:
            break
        mean = np.cos(length) * mean + np.sin(length) * tangent / length
        mean /= np.linalg.norm(mean)
        steps += 1
    return (norms.sum() / len(units) * mean).reshape(models[0].shape), steps


@pytest.mark.parametrize("spread", [1.0, 0.5])
def test_karcher_steps_on_coefficients_match_a_float64_run_of_the_iteration(spread):
    """The mean moves as a combination of the units (inner products from their Gram matrix, the step's
    length from the tensors): after several steps it equals the iteration run on float64 tensors to float32
    precision, for models far apart (spread 1) and closer (0.5; closer still, the first step is the last)."""
    g = [rand((64, 96), 40 + i) for i in range(3)]
    models = [g[0], g[0] + spread * g[1], g[0] + spread * (0.3 * g[1] + 2 * g[2])]
    want, steps = _karcher_float64(models)
    assert steps >= 2  # the iteration moves: not the normalised mean it starts from
    got = np.asarray(ours("karcher", models), np.float64)
    assert np.abs(got - want).max() <= 5e-7 * np.abs(want).max()


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_karcher_of_near_antipodal_models_keeps_float32_precision(eps):
    """A short mean (a, -a + eps b: its length ~eps) is where inner products from the units' Gram matrix
    would lose digits to cancellation (4e-2 off at eps 1e-3); the lengths then come from the tensors, and
    the result is as close to the float64 run as float32 allows there (~1e-7 / eps)."""
    a, b, c = rand((64, 96), 30), rand((64, 96), 31), rand((64, 96), 32)
    for models in ([a, -a + eps * b], [a, -a + eps * b, 0.5 * a + c]):
        want, _ = _karcher_float64(models)
        got = np.asarray(ours("karcher", models), np.float64)
        assert np.abs(got - want).max() <= 0.2 / eps * 1e-6 * np.abs(want).max(), len(models)


def test_karcher_ignores_a_base():
    models = [rand((10,), 32), rand((10,), 33)]
    close(ours("karcher", models, base=rand((10,), 34)), ours("karcher", models))


# ------------------------------------------------------------------------ nearswap


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 10.0, -1.0])
def test_nearswap_equals_mergekit(shape, t):
    base = rand(shape, 35)
    other = base + rand(shape, 36, 0.3)
    if other.size > 1:
        other.reshape(-1)[0] = base.reshape(-1)[0]  # an equal entry: |a - b| clamped to 1e-6
    got = ours("nearswap", [other], base, t=t)
    close(got, mergekit_merge("nearswap", [base, other], 0, {"t": t}))


@pytest.mark.parametrize("t", [1e-7, 1e-5, 3e-4])
def test_nearswap_small_differences_equal_mergekit(t):
    base = np.zeros(6, np.float32)
    other = np.array([0.0, 5e-7, -2e-6, 1e-4, -1e-3, 1.0], np.float32)  # around the 1e-6 clamp
    got = ours("nearswap", [other], base, t=t)
    np.testing.assert_allclose(got, mergekit_merge("nearswap", [base, other], 0, {"t": t}), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "name, n, with_base, params, message",
    [
        ("slerp", 1, False, {"t": 0.5}, "method slerp needs a base model"),
        ("slerp", 2, True, {"t": 0.5}, r"method slerp takes exactly 2 models \(the base included\), got 3"),
        ("slerp", 1, True, {}, "merge_params: slerp: t is required"),
        ("slerp", 1, True, {"t": "half"}, "merge_params: slerp: t must be a number, got 'half'"),
        ("slerp", 1, True, {"t": math.nan}, "merge_params: slerp: t must be a number, got nan"),
        ("slerp", 1, True, {"t": 0.5, "dot_threshold": 0.9}, "method slerp has no parameter 'dot_threshold'"),
        ("nearswap", 1, False, {"t": 0.1}, "method nearswap needs a base model"),
        ("nearswap", 1, True, {}, "merge_params: nearswap: t is required"),
        ("nearswap", 1, True, {"t": True}, "merge_params: nearswap: t must be a number, got True"),
        ("nuslerp", 3, False, {"weight": 1.0}, r"method nuslerp takes at most 3 models|nuslerp takes exactly 2 models besides the base, got 3"),
        ("nuslerp", 1, True, {"weight": 1.0}, "method nuslerp takes exactly 2 models besides the base, got 1"),
        ("nuslerp", 2, False, {}, r"merge_params: nuslerp: weight is required"),
        ("nuslerp", 2, False, {"weight": [1.0, 2.0, 3.0]}, "merge_params: nuslerp: weight: got 3 values for 2 models"),
        ("nuslerp", 2, False, {"weight": 1.0, "nuslerp_flatten": "no"}, "nuslerp: nuslerp_flatten must be true or false, got 'no'"),
        ("multislerp", 2, False, {}, "merge_params: multislerp: weight is required"),
        ("multislerp", 2, False, {"weight": [1.0, -1.0]}, r"multislerp: weight sums to 0 \(\[1.0, -1.0\]\)"),
        ("karcher", 2, False, {"max_iter": 2.5}, "merge_params: karcher: max_iter must be an integer, got 2.5"),
        ("karcher", 2, False, {"weight": [1.0, 2.0]}, "method karcher has no parameter 'weight'"),
    ],
)
def test_bad_input_raises_method_error(name, n, with_base, params, message):
    models = [rand((4,), 40 + i) for i in range(n)]
    base = rand((4,), 39) if with_base else None
    with pytest.raises(table.MethodError, match=message):
        ours(name, models, base, **params)


def test_table_mirrors_mergekit_contracts():
    """Defaults, required parameters and model counts as mergekit's ParameterSpec / InputContract."""
    for name in ("slerp", "nuslerp", "multislerp", "karcher", "nearswap"):
        theirs = registry.get(name).spec
        mine = table.get(name)
        assert set(mine.param_names) == {p.name for p in theirs.parameters}, name
        for p in theirs.parameters:
            q = mine.param(p.name)
            assert q.required == p.required, (name, p.name)
            if not p.required:
                assert q.default == p.default, (name, p.name)
            assert (q.scope is table.Scope.SHARED) == (p.scope.value == "shared"), (name, p.name)
        assert mine.base.value == theirs.contract.base.value, name


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_of_bfloat16_deltas_writes_no_float32_copy(row_wise, flatten, with_base):
    """nuslerp reads its bfloat16 inputs in passes (each norm, the cosine, the result), each pass widening
    them and taking the deltas itself, so the compiled kernel holds no float32 copy of a delta or of a
    model (it held two)."""
    import jax

    shape = (512, 256)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    weights = jax.ShapeDtypeStruct((2,), jnp.float32)
    compiled = jax.jit(interpolation._nuslerp_kernel, static_argnames=("row_wise", "flatten")).lower(
        weights, x, x, x if with_base else None, row_wise=row_wise, flatten=flatten).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < math.prod(shape) * 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_slerp_of_half_precision_writes_no_float32_copy(dtype):
    """slerp reads its inputs three times (norms, dot, result); each pass widens them itself, so the
    compiled kernel holds no float32 copy of an input (`separate_pass`: such copies tripled its time)."""
    import jax

    shape = (512, 256)
    x = jax.ShapeDtypeStruct(shape, dtype)
    compiled = jax.jit(interpolation.slerp).lower(0.3, x, x).compile()
    one_float32_copy = math.prod(shape) * 4
    if dtype == jnp.bfloat16:  # XLA:CPU's reductions widen bfloat16 as they read, not float16 (measured)
        assert compiled.memory_analysis().temp_size_in_bytes < one_float32_copy
    # The same values as with the inputs widened first (where XLA does keep float32 copies).
    rng = np.random.default_rng(0)
    v0 = jnp.asarray(rng.standard_normal(shape), dtype)
    v1 = jnp.asarray(rng.standard_normal(shape), dtype)
    widened_first = interpolation.slerp(0.3, v0.astype(jnp.float32), v1.astype(jnp.float32)).astype(dtype)
    np.testing.assert_allclose(np.asarray(interpolation.slerp(0.3, v0, v1), np.float32),
                               np.asarray(widened_first, np.float32), rtol=1e-2, atol=1e-3)
