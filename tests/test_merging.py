"""task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties against PEFT."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from peft.utils import merge_utils as peft

import jaxmerge as jm
from jaxmerge.core.pruning import random_mask
from conftest import normal_floats
from conftest import DENSITIES, FLOAT_DTYPES, SHAPES, distinct_magnitude_tasks, random_tasks, to_numpy, to_torch

WEIGHTS = {"positive": [1.0, 0.5, 0.7], "negative": [-1.0, -0.3, -2.0], "mixed": [1.5, 0.0, -0.7]}
# XLA contracts w*x + acc into one fused multiply-add (single rounding), PEFT rounds
# twice: weighted sums agree to about one float32 ulp. TIES' where() blocks the
# contraction, so it matches bit for bit.
SUM_RTOL, SUM_ATOL = 2e-7, 1e-6


def peft_call(name, tasks, weights, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(peft, name)([to_torch(t) for t in tasks], torch.tensor(weights), *args)


def jm_call(name, tasks, weights, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(jm, name)(tasks, weights, *args, **kwargs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_task_arithmetic(shape, weights):
    tasks = random_tasks(shape)
    np.testing.assert_allclose(
        np.asarray(jm_call("task_arithmetic", tasks, weights)),
        peft_call("task_arithmetic", tasks, weights).numpy(),
        rtol=SUM_RTOL, atol=SUM_ATOL,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_magnitude_prune(shape, density, weights):
    tasks = random_tasks(shape)
    np.testing.assert_allclose(
        np.asarray(jm_call("magnitude_prune", tasks, weights, density)),
        peft_call("magnitude_prune", tasks, weights, density).numpy(),
        rtol=SUM_RTOL, atol=SUM_ATOL,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_bit_for_bit(shape, density, weights, method):
    tasks = random_tasks(shape)
    np.testing.assert_array_equal(
        np.asarray(jm_call("ties", tasks, weights, density, method)),
        peft_call("ties", tasks, weights, density, method).numpy(),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
def test_half_precision_inputs(dtype, name):
    tasks = distinct_magnitude_tasks((20, 33), dtype=dtype)
    args = () if name == "task_arithmetic" else (0.5,)
    ours = jm_call(name, tasks, [1.0, 0.5, 0.7], *args)
    assert ours.dtype == dtype  # the core keeps the input dtype, accumulating in float32
    # Reference: PEFT on exact float32 copies, which is what float32 accumulation computes.
    reference = peft_call(name, [t.astype(jnp.float32) for t in tasks], [1.0, 0.5, 0.7], *args)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(to_numpy(ours), reference.double().numpy(), rtol=max(eps, 2e-6), atol=max(eps * 1e-2, SUM_ATOL))


def test_stacked_input_and_weight_forms_agree():
    tasks = random_tasks((10, 12))
    stacked = jnp.stack(tasks)
    for weights in ([1.0, 0.5, 0.7], np.array([1.0, 0.5, 0.7]), jnp.array([1.0, 0.5, 0.7])):
        np.testing.assert_array_equal(np.asarray(jm.ties(stacked, weights, 0.3)), np.asarray(jm.ties(tasks, weights, 0.3)))


def test_integer_tasks_are_promoted_like_peft():
    tasks = [jnp.arange(-6, 6).reshape(3, 4) * s for s in (1, -2, 3)]
    ours = jm.ties(tasks, [1.0, 1.0, 1.0], 0.5)
    assert ours.dtype == jnp.float32
    theirs = peft.ties([torch.from_numpy(np.asarray(t)) for t in tasks], torch.ones(3), 0.5)
    # Integer inputs tie at the threshold; compare where both kept values.
    a, b = np.asarray(ours), theirs.numpy()
    assert a.shape == b.shape and np.isfinite(a).all()


# --- DARE --------------------------------------------------------------------------------


def test_dare_linear_at_density_one_equals_task_arithmetic(key):
    tasks = random_tasks((40, 50))
    with pytest.warns(UserWarning):
        dare = jm.dare_linear(tasks, [1.0, -0.5, 0.7], 1.0, key=key)
    np.testing.assert_array_equal(np.asarray(dare), np.asarray(jm.task_arithmetic(tasks, [1.0, -0.5, 0.7])))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_reproducible_per_key_and_per_task_subkeys(name):
    tasks = random_tasks((64, 64))
    w = [1.0, 0.5, 0.7]
    a = getattr(jm, name)(tasks, w, 0.3, key=jax.random.key(5))
    b = getattr(jm, name)(tasks, w, 0.3, key=jax.random.key(5))
    c = getattr(jm, name)(tasks, w, 0.3, key=jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_dare_linear_key_derivation_is_as_documented():
    tasks = random_tasks((32, 32))
    key, w = jax.random.key(11), [1.0, 0.5, 0.7]
    subkeys = jax.random.split(key, 3)
    expected = sum(
        np.where(np.asarray(random_mask(subkeys[i], 0.4, t.shape)), np.asarray(t) / np.float32(0.4), 0) * w[i]
        for i, t in enumerate(tasks)
    )
    np.testing.assert_allclose(np.asarray(jm.dare_linear(tasks, w, 0.4, key=key)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_linear_statistically_matches_peft(density):
    n = 256 * 256
    tasks = [jnp.ones((256, 256)), jnp.full((256, 256), 2.0)]
    ours = np.asarray(jm.dare_linear(tasks, [1.0, 1.0], density, key=jax.random.key(0)))
    torch.manual_seed(0)
    theirs = peft.dare_linear([torch.ones(256, 256), torch.full((256, 256), 2.0)], torch.ones(2), density).numpy()
    # Mean of the merge is 3 in expectation; spread of the mean: sqrt(5 (1-d)/d / n).
    sigma = np.sqrt(5 * (1 - density) / density / n)
    assert abs(ours.mean() - 3) <= 6 * sigma and abs(theirs.mean() - 3) <= 6 * sigma
    # Fraction of entries where both tasks were dropped: (1 - d)^2.
    p0 = (1 - density) ** 2
    bound = 6 * np.sqrt(p0 * (1 - p0) / n)
    assert abs((ours == 0).mean() - p0) <= bound and abs((theirs == 0).mean() - p0) <= bound


def test_dare_ties_statistics(key):
    tasks = [jnp.ones((256, 256)), -jnp.ones((256, 256)) * 0.5, jnp.ones((256, 256))]
    out = np.asarray(jm.dare_ties(tasks, [1.0, 1.0, 1.0], 0.5, key=key))
    # The elected sign is + wherever a positive task survived; negatives never count there.
    assert out.min() >= -1.0 - 1e-6
    assert np.isin(np.round(out, 5), [0.0, 2.0, -1.0]).all()


# --- jit, compilation, errors ----------------------------------------------------------------


class JitVariantsTest(chex.TestCase):
    """Each function gives the same result traced under jit as called eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("task_arithmetic", "task_arithmetic"),
        ("magnitude_prune", "magnitude_prune"),
        ("ties", "ties"),
        ("dare_linear", "dare_linear"),
        ("dare_ties", "dare_ties"),
    )
    def test_merges(self, name):
        tasks = random_tasks((17, 9))
        w = jnp.array([1.0, -0.5, 0.7])
        key = jax.random.key(3)
        if name == "task_arithmetic":
            fn = self.variant(lambda t, w: jm.task_arithmetic(t, w))
            got, want = fn(tasks, w), jm.task_arithmetic(tasks, w)
        elif name.startswith("dare"):
            fn = self.variant(lambda t, w, d, k: getattr(jm, name)(t, w, d, key=k))
            got, want = fn(tasks, w, 0.3, key), getattr(jm, name)(tasks, w, 0.3, key=key)
        else:
            fn = self.variant(lambda t, w, d: getattr(jm, name)(t, w, d))
            got, want = fn(tasks, w, 0.3), getattr(jm, name)(tasks, w, 0.3)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pruning_and_signs(self):
        (x,) = random_tasks((13, 11), 1)
        stacked = jnp.stack(random_tasks((13, 11)))
        key = jax.random.key(1)
        chex.assert_trees_all_equal(
            self.variant(lambda x, d: jm.magnitude_based_pruning(x, d))(x, 0.25), jm.magnitude_based_pruning(x, 0.25)
        )
        chex.assert_trees_all_equal(
            self.variant(lambda x, d, k: jm.random_pruning(x, d, True, key=k))(x, 0.25, key),
            jm.random_pruning(x, 0.25, True, key=key),
        )
        chex.assert_trees_all_equal(
            self.variant(lambda s: jm.calculate_majority_sign_mask(s, "frequency"))(stacked),
            jm.calculate_majority_sign_mask(stacked, "frequency"),
        )
        mask = jm.calculate_majority_sign_mask(stacked)
        chex.assert_trees_all_equal(self.variant(jm.disjoint_merge)(stacked, mask), jm.disjoint_merge(stacked, mask))


def test_density_sweep_compiles_once_per_shape_and_dtype():
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        tasks = random_tasks((23, 29), seed=9)
        jm.ties(tasks, [1.0, 0.5, 0.7], 0.05)  # warm-up: compiles the kernel (and small helpers)
        compiles.clear()
        for density in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            jm.ties(tasks, [1.0, 0.5, 0.7], density)
        assert compiles == []
        jm.ties([t.astype(jnp.bfloat16) for t in tasks], [1.0, 0.5, 0.7], 0.5)
        assert len(compiles) >= 1  # a new dtype does compile: the counter works
    finally:
        jax.monitoring.clear_event_listeners()


def test_errors_name_argument_and_value():
    tasks = random_tasks((4, 4))
    with pytest.raises(ValueError, match="2 weights for 3 task tensors"):
        jm.ties(tasks, [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        jm.task_arithmetic([tasks[0], jnp.zeros((4, 5))], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one task"):
        jm.task_arithmetic([], [])
    with pytest.raises(ValueError, match="key is required"):
        jm.dare_ties(tasks, [1.0] * 3, 0.5, key=None)
    with pytest.raises(ValueError, match=r"majority_sign_method.*'mean'"):
        jm.ties(tasks, [1.0] * 3, 0.5, "mean")
    with pytest.raises(ValueError, match=r"density=-1"):
        jm.magnitude_prune(tasks, [1.0] * 3, -1)
    with pytest.raises(TypeError, match="bool"):
        jm.task_arithmetic([jnp.ones(3, bool)], [1.0])


def test_inputs_are_not_modified():
    tasks = random_tasks((16, 16))
    before = [np.asarray(t).copy() for t in tasks]
    stacked = jnp.stack(tasks)
    jm.ties(tasks, [1.0, 0.5, 0.7], 0.3)
    jm.dare_ties(stacked, [1.0, 0.5, 0.7], 0.3, key=jax.random.key(0))
    for t, b in zip(tasks, before):
        np.testing.assert_array_equal(np.asarray(t), b)
    np.testing.assert_array_equal(np.asarray(stacked), np.stack(before))


def test_reshape_weight_task_tensors_matches_peft():
    stacked = jnp.zeros((3, 4, 5))
    w = jnp.array([1.0, 2.0, 3.0])
    ours = jm.reshape_weight_task_tensors(stacked, w)
    theirs = peft.reshape_weight_task_tensors(torch.zeros(3, 4, 5), torch.tensor([1.0, 2.0, 3.0]))
    assert ours.shape == tuple(theirs.shape) == (3, 1, 1)
    np.testing.assert_array_equal(np.asarray(ours).ravel(), [1, 2, 3])


@settings(max_examples=40, deadline=None)
@given(
    stacked=hnp.arrays(np.float32, st.sampled_from([(3, 6), (2, 5, 3), (4, 8)]),
                       elements=normal_floats(1e-3, 100), unique=True),
    density=st.floats(0, 1),
    weights=st.lists(normal_floats(1e-3, 2), min_size=4, max_size=4),
    method=st.sampled_from(["total", "frequency"]),
)
def test_property_ties_and_magnitude_prune_vs_peft(stacked, density, weights, method):
    # No ties in |x| within a task (PEFT's topk breaks those arbitrarily).
    for t in stacked:
        assume(np.unique(np.abs(t)).size == t.size)
    w = weights[: stacked.shape[0]]
    tasks = list(stacked)
    np.testing.assert_array_equal(
        np.asarray(jm_call("ties", tasks, w, density, method)), peft_call("ties", tasks, w, density, method).numpy()
    )
    np.testing.assert_allclose(
        np.asarray(jm_call("magnitude_prune", tasks, w, density)),
        peft_call("magnitude_prune", tasks, w, density).numpy(),
        rtol=SUM_RTOL, atol=1e-4,
    )


# Largest temporary allowed, in units of one task's bytes. float32: none tensor-sized.
# Half precision: the integer fallback count (taken only for NaN or subnormal
# thresholds) materialises one uint32 tensor, two half-precision task sizes; a
# float32 copy of every task (the old widening) would be 6.
TEMP_LIMIT = {jnp.float32: 0.25, jnp.bfloat16: 2.5}


@pytest.mark.parametrize("dtype", list(TEMP_LIMIT))
@pytest.mark.parametrize("sign_method", [None, "total"])
def test_magnitude_kernels_keep_no_tensor_sized_temporaries(sign_method, dtype):
    """Every pass takes |x| (and the widening of half precision) itself. A
    precomputed |x| is a tensor-sized temporary per task, which XLA hoists into
    the search loop's state (a copy per call that cost more than the whole
    search); this checks the compiled kernel's temporaries."""
    from jaxmerge.core import merging

    shape = (1024, 1024)
    tasks = tuple(jax.ShapeDtypeStruct(shape, dtype) for _ in range(3))
    k = jm.core.selection.density_to_k(0.2, shape[0] * shape[1])
    rule = merging.PEFT_TIES if sign_method else merging.Rule(sparsify="magnitude")
    compiled = merging._merge_kernel.lower(
        tasks, jnp.ones(3, jnp.float32), jnp.full(3, 0.2, jnp.float32), jnp.full(3, k), jnp.zeros(3, k.dtype),
        jnp.zeros(3, jnp.float32), jnp.float32(1), None, rule=rule,
    ).compile()
    one_task_bytes = jnp.dtype(dtype).itemsize * shape[0] * shape[1]
    assert compiled.memory_analysis().temp_size_in_bytes < TEMP_LIMIT[dtype] * one_task_bytes


@pytest.mark.parametrize("semantics", ["mergekit", "peft"])
@pytest.mark.parametrize("counts", ["constant", "runtime"])
def test_ties_with_a_base_writes_out_no_task_vector(semantics, counts):
    """TIES with a base (models and base in, the deltas taken in the kernel), its counts constants of the
    caller's trace or runtime values (the CLI's kernels): the selections read the models and the base
    and take each delta in every pass, so no float32 delta is written out whole. One float32-sized
    buffer remains, an integer pass of the search's exact path. Before: one delta per task (XLA writes
    out what enters the search's loop and branches) and, with constant counts, an |delta| per task
    that XLA:CPU hoisted out of the largest-magnitude pass (6 float32 tensors here)."""
    from jaxmerge.core.merging import Rule, _merge_kernel

    rule = Rule(sparsify="magnitude", consensus="total", vote="weighted" if semantics == "mergekit" else "pruned",
                divide="weights" if semantics == "mergekit" else "count")
    shape = (1024, 1024)
    model = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = np.full(3, int(0.2 * shape[0] * shape[1]), np.uint32)

    def merge(models, base, k):
        return _merge_kernel(models, jnp.asarray([1.0, 0.5, 0.7]), jnp.full(3, 0.2), k, jnp.zeros(3, jnp.uint32),
                             jnp.zeros(3), jnp.float32(1), None, base, rule=rule)

    if counts == "constant":
        compiled = jax.jit(lambda models, base: merge(models, base, k)).lower((model,) * 3, model).compile()
    else:
        compiled = jax.jit(merge).lower((model,) * 3, model, jax.ShapeDtypeStruct((3,), jnp.uint32)).compile()
    float32_task = 4 * shape[0] * shape[1]
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * float32_task


def test_which_merge_kernels_count_their_sums_exactly():
    """The merge kernel skips XLA:CPU's tree-reduction rewrite (`kernel(exact_sums=...)`) only where its one
    sum over entries is the magnitude selection's count: magnitude and band pruning without the L1 rescale."""
    from jaxmerge.core.merging import PEFT_TIES, Rule, _sums_are_exact

    exact = [PEFT_TIES, Rule(sparsify="magnitude"), Rule(sparsify="band", consensus="total", vote="weighted"),
             Rule(sparsify="magnitude", consensus="frequency", divide="weights")]
    not_exact = [Rule(), Rule(sparsify="random", rescale="inverse_density"), Rule(sparsify="random", rescale="l1"),
                 Rule(sparsify="magnitude", rescale="l1"), Rule(sparsify="della", consensus="total")]
    assert all(_sums_are_exact((), {"rule": r}) for r in exact)
    assert not any(_sums_are_exact((), {"rule": r}) for r in not_exact)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sparsify", ["magnitude", "band"])
def test_the_exact_sums_merge_kernel_gives_the_default_kernels_bits(dtype, sparsify):
    """TIES (and breadcrumbs-TIES) with a base, compiled with and without the tree-reduction rewrite, on
    models whose deltas tie at the threshold: the same bytes."""
    from jaxmerge.core.merging import Rule, _merge_kernel

    rng = np.random.default_rng(7)
    base = rng.standard_normal((300, 700)).astype(np.float32)
    models = tuple(jnp.asarray(base + 0.01 * rng.integers(-3, 4, base.shape), dtype) for _ in range(3))
    rule = Rule(sparsify=sparsify, consensus="total", vote="weighted", divide="weights")
    k = np.full(3, int(0.2 * base.size), np.uint32)
    args = (models, np.asarray([1.0, 0.5, 0.7], np.float32), np.full(3, 0.2, np.float32), k,
            np.full(3, int(0.01 * base.size), np.uint32), np.zeros(3, np.float32), np.float32(1), None,
            jnp.asarray(base, dtype))
    exact_program, default_program = _merge_kernel._exact_sums[0], _merge_kernel._jitted
    got = np.asarray(_merge_kernel(*args, rule=rule))
    assert exact_program._cache_size() >= 1  # the call above ran the exact-sums program
    np.testing.assert_array_equal(got, np.asarray(default_program(*args, rule=rule)))
