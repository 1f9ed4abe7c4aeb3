"""Exact linear-time top-k by magnitude (jaxmerge.core.selection)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxmerge.core import selection
from jaxmerge.core._dtypes import count_dtype

mask_fn = jax.jit(selection.top_k_magnitude_mask)
# The two algorithms behind it, each on every size (top_k_magnitude_mask picks by size).
ALGORITHMS = {
    "bitwise": jax.jit(lambda x, k: selection._bitwise_mask(x, jnp.asarray(k, count_dtype()))),
    "counting": jax.jit(lambda x, k: selection._counting_mask(x, jnp.asarray(k, count_dtype()), False)),
}


def reference_mask(x, k):
    """Stable descending sort of |x|: ties keep the lowest flat index, NaN ranks above inf."""
    a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    a = np.where(np.isnan(a), np.inf, a)
    # NaN above inf: rank key (is_nan, value)
    nan = np.isnan(np.abs(np.asarray(x, np.float64)).ravel())
    order = np.lexsort((np.arange(a.size), -a, ~nan))
    mask = np.zeros(a.size, bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(x))


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (4, 3, 5, 5), (1000, 1001), (3, 4099)])
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_exact_count_and_largest_magnitudes(shape, density):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    k = int(density * x.size)
    expected = reference_mask(x, k)
    np.testing.assert_array_equal(np.asarray(mask_fn(x, k)), expected)
    for name, algorithm in ALGORITHMS.items():
        np.testing.assert_array_equal(np.asarray(algorithm(x, k)), expected, err_msg=name)


@pytest.mark.parametrize(
    "values, k",
    [
        ([1, 2, 2, 2, 3, 0, 0, -2], 3),  # ties at the threshold: lowest indices kept
        ([5, -5, 5, -5, 5], 2),  # all tied
        ([0.0] * 10, 4),  # all zero
        ([np.nan, 1, np.inf, -5, 0], 2),  # NaN ranks first, then inf (as torch.topk)
        ([1e-45, 2.8e-45, 1e-40, 0, 0], 2),  # subnormals (XLA:CPU flushes them in float ops)
        ([1e-45, 1e-45, 1e-40, 0, 0], 2),  # tied subnormals
        # The k-th largest is subnormal and the largest below a normal bracket end: its float max is flushed.
        ([1, 1, 1, 1e-45, 1e-45], 4),
        ([1, 1, 1, 3e-45, 2e-45], 4),
        ([5.0] * 10 + [1e-40] * 3, 11),
        ([-3.0e38, 3.0e38, 1.0, -np.inf], 2),  # extremes
    ],
)
@pytest.mark.parametrize("algorithm", ["top_k_magnitude_mask", *ALGORITHMS])
def test_edge_values(values, k, algorithm):
    x = np.array(values, np.float32)
    fn = ALGORITHMS.get(algorithm, mask_fn)
    np.testing.assert_array_equal(np.asarray(fn(x, k)), reference_mask(x, k))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("with_base", [False, True], ids=["array", "difference"])
def test_nan_ranks_first_in_a_large_tensor(dtype, with_base):
    """NaN ranks above inf in tensors large enough for XLA:CPU's vectorised max and min reductions,
    which may skip NaN (in float32 they did, so the search took its counts' fast path and kept 3
    entries for k = 1): a summing pass finds it."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1024, 2048)), dtype).at[3, 5].set(jnp.nan).at[700, 9].set(jnp.nan)
    x = x.at[5, 5].set(jnp.inf)
    base = jnp.asarray(0.5 * rng.standard_normal((1024, 2048)), dtype) if with_base else None
    values = np.asarray(difference(x, base if with_base else jnp.zeros_like(x)))
    for k in (1, 2, 3, 4, 1000):
        got = selection.top_k_magnitude_mask(x, k, base=base)
        np.testing.assert_array_equal(np.asarray(got), reference_mask(values, k), err_msg=f"k={k}")


# Task vectors given as their terms: `top_k_magnitude_mask(model, k, base=base)` selects on model - base
# taken in each pass; the mask must be the one of that difference computed whole (as the merge kernels take it).
difference = jax.jit(lambda m, b: m.astype(jnp.float32) - b.astype(jnp.float32))
PAIR_ALGORITHMS = {
    "top_k_magnitude_mask": jax.jit(lambda m, b, k: selection.top_k_magnitude_mask(m, k, base=b)),
    "bitwise": jax.jit(lambda m, b, k: selection._bitwise_mask((m, b), jnp.asarray(k, count_dtype()))),
    "counting": jax.jit(lambda m, b, k: selection._counting_mask((m, b), jnp.asarray(k, count_dtype()), False)),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(7,), (33, 65), (512, 700)])
def test_a_difference_selects_as_its_task_vector(dtype, shape):
    import ml_dtypes

    dt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(6)
    base = (0.02 * rng.standard_normal(shape)).astype(dt)
    model = (base.astype(np.float32) + 0.01 * rng.standard_normal(shape)).astype(dt)
    delta = difference(model, base)
    for density in (0.0, 1e-3, 0.2, 0.5, 0.999, 1.0):
        k = int(density * delta.size)
        expected = np.asarray(mask_fn(delta, k))
        np.testing.assert_array_equal(expected, reference_mask(np.asarray(delta), k))
        for name, algorithm in PAIR_ALGORITHMS.items():
            np.testing.assert_array_equal(np.asarray(algorithm(model, base, k)), expected, err_msg=(name, density))


@pytest.mark.parametrize(
    "model, base, k",
    [
        ([np.nan, 1, 2, 3], [0, 0, 0, 0], 2),  # NaN in the model ranks first
        ([1, 2, 3, 4], [0, np.nan, 0, 0], 2),  # NaN in the base
        ([np.inf, 1, -np.inf, 3], [np.inf, 0, 1, 0], 2),  # inf - inf is NaN; inf - 1 is inf
        ([3.0e38, 1, 0, 0], [-3.0e38, 0, 0, 0], 1),  # the difference overflows to inf
        ([2.0**-125, 2.0**-126, 0, 1e-45], [-(2.0**-126), 0, 1e-45, 0], 2),  # near and below the normals
        ([1e-40, 3e-41, 0, 0], [0, 0, 1e-42, 0], 1),  # subnormal terms only
        ([5, 5, 5, 5, 1], [1, 1, 1, 1, 1], 2),  # ties in the difference: lowest indices
        ([1, 2, 3], [1, 2, 3], 2),  # all zero
    ],
)
@pytest.mark.parametrize("algorithm", list(PAIR_ALGORITHMS))
def test_a_difference_at_edge_values(model, base, k, algorithm):
    model, base = np.array(model, np.float32), np.array(base, np.float32)
    expected = np.asarray(mask_fn(difference(model, base), k))
    assert expected.sum() == k
    np.testing.assert_array_equal(np.asarray(PAIR_ALGORITHMS[algorithm](model, base, k)), expected)


def test_a_difference_with_nan_from_infinite_terms():
    """inf - inf is NaN although each term is free of NaN: the counts must take the exact integer path
    (NaN ranks above inf), as they do on the difference computed whole."""
    rng = np.random.default_rng(8)
    model = rng.standard_normal((64, 512)).astype(np.float32)
    base = rng.standard_normal((64, 512)).astype(np.float32)
    where = rng.random(model.shape) < 0.05
    model[where], base[where] = np.inf, np.inf
    for k in (10, int(0.05 * model.size), int(0.2 * model.size)):
        expected = np.asarray(mask_fn(difference(model, base), k))
        with np.errstate(invalid="ignore"):  # inf - inf
            np.testing.assert_array_equal(expected, reference_mask(model - base, k))
        for name, algorithm in PAIR_ALGORITHMS.items():
            np.testing.assert_array_equal(np.asarray(algorithm(model, base, k)), expected, err_msg=(name, k))


def test_a_difference_needs_terms_of_one_shape():
    with pytest.raises(ValueError, match="base has shape"):
        selection.top_k_magnitude_mask(jnp.ones((4, 4)), 3, base=jnp.ones(16))


def test_many_ties_in_a_large_tensor():
    # bfloat16-like data: few distinct values, ties everywhere; the tie break crosses rows.
    rng = np.random.default_rng(2)
    x = rng.integers(-20, 20, size=(512, 700)).astype(np.float32)
    for density in (0.1, 0.37, 0.5, 0.93):
        k = int(density * x.size)
        expected = reference_mask(x, k)
        np.testing.assert_array_equal(np.asarray(mask_fn(x, k)), expected)
        np.testing.assert_array_equal(np.asarray(ALGORITHMS["bitwise"](x, k)), expected)


def _bfloat16_deltas(rng, n):
    """A bfloat16 fine-tune's task vector, taken in float32: a staircase of few values with large ties."""
    from ml_dtypes import bfloat16

    base = (0.02 * rng.standard_normal(n)).astype(np.float32)
    tuned = base + 0.01 * rng.standard_normal(n).astype(np.float32)
    return tuned.astype(bfloat16).astype(np.float32) - base.astype(bfloat16).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda r, n: r.standard_normal(n),
        lambda r, n: r.laplace(size=n),
        lambda r, n: r.standard_t(2, n),
        lambda r, n: np.where(r.random(n) < 0.5, 0, r.standard_normal(n)),
        lambda r, n: r.standard_normal(n) * 1e-30,  # below the fast-count range
        lambda r, n: np.linspace(-1, 1, n),
        lambda r, n: (r.standard_normal((n // 64, 4)) @ r.standard_normal((4, 64))).ravel(),  # LoRA B @ A
        _bfloat16_deltas,
    ],
    ids=["normal", "laplace", "student2", "half_zero", "tiny", "ramp", "low_rank", "bf16_deltas"],
)
def test_search_on_weight_like_distributions(make):
    x = make(np.random.default_rng(3), 64 * 4096).astype(np.float32)
    for density in (1e-3, 0.2, 0.5, 0.9, 0.999):
        k = int(density * x.size)
        np.testing.assert_array_equal(np.asarray(mask_fn(x, k)), reference_mask(x, k))


@pytest.mark.parametrize("make, discrete", [
    (lambda r, n: r.standard_normal(n), False),
    (lambda r, n: (r.standard_normal((n // 64, 4)) @ r.standard_normal((4, 64))).ravel(), False),
    (_bfloat16_deltas, True),
    (lambda r, n: np.round(r.standard_normal(n) * 8) / 8, True),  # quantized weights
], ids=["normal", "low_rank", "bf16_deltas", "quantized"])
def test_the_search_snaps_to_sample_values_only_on_discrete_data(make, discrete):
    """Snapping probes to sample values lands on the steps of discrete data; on continuous data it
    would throw away secant steps, so the sample decides (`_sample_start`'s last result)."""
    x = jnp.asarray(make(np.random.default_rng(5), 64 * 4096).astype(np.float32))
    layout = selection._BitLayout(jnp.float32)
    rows, _, _ = selection._magnitude_rows(x, layout)
    k = jnp.asarray(int(0.2 * x.size), count_dtype())
    assert bool(selection._sample_start(rows, x.size, k, layout)[3]) is discrete


def _probes_per_search(monkeypatch, model_dtype) -> list[int]:
    """The probes of 9 searches (3 noise levels x 3 densities) on the deltas `model - base` of 2048 x 2048
    models stored in `model_dtype`, each search's T and count checked against a sort."""
    probes = []
    monkeypatch.setattr(selection, "_PROBE_HOOK", lambda *args: probes.append(args))
    # A fresh function: traced (and compiled) once here, with the hook in place.
    search = jax.jit(lambda x, k: selection.kth_largest_magnitude_bits(x, k))
    counts = []
    for noise in (0.0005, 0.002, 0.01):
        rng = np.random.default_rng(1)
        base = (0.02 * rng.standard_normal((2048, 2048))).astype(model_dtype)
        tuned = (base.astype(np.float32) + noise * rng.standard_normal(base.shape)).astype(model_dtype)
        x = tuned.astype(np.float32) - base.astype(np.float32)
        magnitudes = np.sort(np.abs(x).ravel())[::-1]
        for density in (0.05, 0.2, 0.5):
            k = int(density * x.size)
            probes.clear()
            bits, count = search(jnp.asarray(x), jnp.asarray(k, count_dtype()))
            assert int(bits) == int(magnitudes[k - 1].view(np.uint32))
            assert int(count) == int((np.abs(x) >= magnitudes[k - 1]).sum())
            counts.append(len(probes))
    return counts


def test_the_search_steps_onto_the_spikes_of_discrete_data(monkeypatch):
    """bfloat16 deltas put most entries on a few values, T usually among them: the search reads them
    from the sample (`_discrete_next_probe`). Secant steps alone took 63 probes for these 9 searches
    (2 to 11 each); the sample's steps 27 (2 to 5); with the pair passes, which count t + 1 with t
    after the first probe, 20 (2 to 3)."""
    from ml_dtypes import bfloat16

    counts = _probes_per_search(monkeypatch, bfloat16)
    assert max(counts) <= 4 and sum(counts) <= 24, counts


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.sampled_from([(5,), (17,), (8, 9), (300,)]),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True),
    ),
    density=st.floats(0, 1),
)
def test_property_matches_stable_sort(x, density):
    k = int(density * x.size)
    for name, algorithm in ALGORITHMS.items():
        np.testing.assert_array_equal(np.asarray(algorithm(x, k)), reference_mask(x, k), err_msg=name)


def test_traced_k_and_keep_values():
    x = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)
    f = jax.jit(selection.keep_top_k_magnitude)
    for k in (0, 1, 100, 4096):
        out = np.asarray(f(x, k))
        np.testing.assert_array_equal(out, np.where(reference_mask(x, k), x, 0))


def test_density_to_k_matches_python_float_arithmetic():
    # PEFT computes k = int(density * numel) in Python floats; a float32 product can differ.
    for n in (10, 999_999_937, 3_000_000_000, 2**32 - 1):
        for d in (0.1, 0.2, 1 / 3, 0.7, 0.999999):
            assert int(selection.density_to_k(d, n)) == int(d * n), (d, n)


def test_counts_past_2_pow_31_are_exact():
    """Counting arithmetic beyond a signed 32-bit count, proved on the arithmetic alone.

    A 2**31-entry tensor does not fit this 24 GiB test machine next to its
    temporaries, so this checks the two places where counts accumulate: per-row
    counts (exact floats, rows < 2**24 entries) added up in `count_dtype()`, and k itself.
    """
    cdt = count_dtype()
    assert cdt in (jnp.uint32, jnp.uint64)
    # 200 rows of 16384*1024 ones each = 3.36e9 > 2**31 - 1.
    row_sums = jnp.full((200,), 16384.0 * 1024, jnp.float32)
    total = jax.jit(lambda r: r.astype(cdt).sum(dtype=cdt))(row_sums)
    assert int(total) == 200 * 16384 * 1024
    # The search's bracket update compares counts near 2**32 correctly.
    k = jnp.asarray(3_000_000_000, cdt)
    assert bool(jnp.asarray(3_000_000_001, cdt) >= k) and not bool(jnp.asarray(2_999_999_999, cdt) >= k)
    assert float(selection._signed_diff(jnp.asarray(2**31 + 5, cdt), k)) == pytest.approx(2**31 + 5 - 3e9)


def test_too_large_for_the_count_type_is_refused():
    with pytest.raises(ValueError, match="larger than"):
        selection.top_k_magnitude_mask(jax.ShapeDtypeStruct((2**16, 2**16), jnp.float32), 1)


def test_fast_count_is_exact_at_extreme_thresholds():
    """The fast count sums gaps t - t_prev (a power of two) per row and scales by
    1/gap: exact at the smallest fast threshold, at binade edges (where the gap
    halves) and at the largest finite one, with full rows of 16384 counted."""
    layout = selection._BitLayout(jnp.float32)
    as_bits = lambda f: int(np.float32(f).view(np.uint32))  # noqa: E731
    largest = np.finfo(np.float32).max
    for tb in (layout.fast_lo_bits, layout.fast_lo_bits + 1, as_bits(1.0), as_bits(1.0) + 1, as_bits(largest)):
        assert bool(selection._fast_threshold(jnp.uint32(tb), layout, True))
        t = np.uint32(tb).view(np.float32)
        t_prev, t_next = np.uint32(tb - 1).view(np.float32), np.uint32(min(tb + 1, as_bits(largest))).view(np.float32)
        rows = np.stack([
            np.full(16384, t), np.full(16384, -t), np.full(16384, t_prev),
            np.resize(np.array([t, -t_next, t_prev, 0.0, -largest], np.float32), 16384),
        ]).astype(np.float32)
        counts = selection.row_counts_at_least(jnp.asarray(rows), jnp.uint32(tb), layout, jnp.asarray(True))
        expected = (np.abs(rows).view(np.uint32) >= tb).sum(axis=1)
        np.testing.assert_array_equal(np.asarray(counts), expected, err_msg=f"threshold bits {tb:#x}")


def test_a_bracket_of_few_entries_is_settled_in_its_rows():
    """`_settle_in_rows` finds T, count(T) and the per-row ties from the few rows holding the
    bracket's entries: with ties at T among continuous values, and at T = 0 (lo = 0, zeros tied)."""
    layout = selection._BitLayout(jnp.float32)
    cdt = selection.count_dtype()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 1024)).astype(np.float32)
    bits = np.abs(x).view(np.uint32)
    order = np.sort(bits.ravel())[::-1]
    k = 70_000
    x.ravel()[rng.choice(x.size, 5, replace=False)] = order[k - 1].view(np.float32)  # 5 more ties at T
    with_zeros = x.copy()
    with_zeros.ravel()[rng.choice(x.size, 30, replace=False)] = 0.0
    cases = []
    for data, k in ((x, 70_000), (with_zeros, with_zeros.size - 10)):
        b = np.abs(data).view(np.uint32)
        flat = np.sort(b.ravel())[::-1]
        t = flat[k - 1]
        lo = 0 if t == 0 else int(flat[k + 20])  # about 20 entries below T, 20 above it
        hi = int(flat[max(k - 25, 0)]) if t else int(flat[flat > 0].min())
        cases.append((data, k, t, lo, hi))
    settle = jax.jit(selection._settle_in_rows, static_argnums=(7,))
    for data, k, t, lo, hi in cases:
        b = np.abs(data).view(np.uint32)
        rows_lo, rows_hi = (b >= lo).sum(axis=1), (b >= hi).sum(axis=1)
        assert 0 < rows_lo.sum() - rows_hi.sum() <= selection._BLOCK_ROWS
        threshold, count_ge, tied = settle(
            jnp.asarray(data), jnp.uint32(lo), jnp.uint32(hi), jnp.asarray(rows_hi.sum(), cdt),
            jnp.asarray(rows_lo, cdt), jnp.asarray(rows_hi, cdt), jnp.asarray(k, cdt), layout)
        assert int(threshold) == t
        assert int(count_ge) == int((b >= t).sum())
        np.testing.assert_array_equal(np.asarray(tied), (b == t).sum(axis=1))


def test_the_search_settles_continuous_data_in_few_probes(monkeypatch):
    """float32 deltas of float32 models: values sparse near T, where secant steps crept up on it a few
    entries at a time (52 probes for these 9 searches, up to 9, each then a finishing pass or two).
    A count close to k now aims past it, and a bracket of at most 64 entries is settled in its rows:
    42 probes (4 to 5), no finishing pass."""
    counts = _probes_per_search(monkeypatch, np.float32)
    assert max(counts) <= 6 and sum(counts) <= 45, counts


def test_pair_counts_are_exact_at_extreme_thresholds():
    """The pair pass packs count(t) + 4096 * count(t + 1) into one float32 row sum: exact with rows of
    4095 entries all counted at both (16,773,120 gaps, just below 2**24), at the smallest threshold
    it takes, across a binade edge (t + 1 a power of two) and at the largest finite t + 1. Where the
    gaps below and above t differ (t a power of two), t + 1 is inf, or a NaN is about, it is not taken."""
    layout = selection._BitLayout(jnp.float32)
    as_bits = lambda f: int(np.float32(f).view(np.uint32))  # noqa: E731
    largest = np.finfo(np.float32).max
    taken = (layout.fast_lo_bits + 1, as_bits(1.0) + 1, as_bits(np.nextafter(np.float32(2), np.float32(0))),
             as_bits(0.0123), as_bits(largest) - 1)
    for tb in taken:
        assert bool(selection._pair_threshold(jnp.uint32(tb), layout, True)), hex(tb)
        t, t_prev, t_next = (np.uint32(b).view(np.float32) for b in (tb, tb - 1, tb + 1))
        rows = np.stack([
            np.full(4095, t_next), np.full(4095, -t), np.full(4095, t_prev),
            np.resize(np.array([t, -t_next, t_prev, 0.0, -largest, t_next], np.float32), 4095),
        ]).astype(np.float32)
        at_t, at_next = selection.row_counts_at_least_pair(jnp.asarray(rows), jnp.uint32(tb), layout)
        bits = np.abs(rows).view(np.uint32)
        np.testing.assert_array_equal(np.asarray(at_t), (bits >= tb).sum(axis=1), err_msg=f"t bits {tb:#x}")
        np.testing.assert_array_equal(np.asarray(at_next), (bits > tb).sum(axis=1), err_msg=f"t bits {tb:#x}")
    for tb in (as_bits(1.0), as_bits(2.0), layout.fast_lo_bits, layout.fast_lo_bits - 1, as_bits(largest)):
        assert not bool(selection._pair_threshold(jnp.uint32(tb), layout, True)), hex(tb)
    assert not bool(selection._pair_threshold(jnp.uint32(as_bits(0.0123)), layout, False))


def test_rows_fit_the_pair_counts_unless_sharded():
    """The search cuts unsharded tensors into rows of at most 4095 entries (a row-major reshape),
    the pair passes' limit; a sharded tensor keeps its own rows up to 16384, never re-laid out."""
    for shape, rows, sharded_rows in [((2048, 5632), (4096, 2816), (2048, 5632)), ((64, 2048), (64, 2048), (64, 2048)),
                                      ((4096, 4096), (8192, 2048), (4096, 4096)), ((3, 5, 7, 311), (105, 311), (105, 311))]:
        x = jnp.zeros(shape, jnp.float32)
        assert selection._as_rows(x).shape == rows, shape
        assert selection._as_rows(x, partitioned=True).shape == sharded_rows, shape


@pytest.mark.parametrize("pair", [False, True], ids=["array", "difference"])
def test_tie_counts_are_exact_in_and_out_of_the_fast_range(pair):
    """The search returns, per row, the entries tied at its threshold T (where count(T) > k), as the
    difference of two per-row counts it made (T and the next pattern held): exact at T = 0, subnormal
    T, the smallest fast threshold, binade edges, the largest finite value (next is inf: integer
    path), inf, and with a NaN present (every count on the integer path)."""
    layout = selection._BitLayout(jnp.float32)
    cdt = selection.count_dtype()
    as_bits = lambda f: int(np.float32(f).view(np.uint32))  # noqa: E731
    largest = np.finfo(np.float32).max
    tiny_sub = np.float32(1e-40)
    for t in (np.float32(0), tiny_sub, np.uint32(layout.fast_lo_bits).view(np.float32), np.float32(1.0),
              np.float32(2.0), np.nextafter(np.float32(2.0), np.float32(0)), largest, np.float32(np.inf)):
        tb = as_bits(abs(t))
        t_next = np.uint32(min(tb + 1, as_bits(np.inf))).view(np.float32)
        t_prev = np.uint32(max(tb - 1, 0)).view(np.float32)
        # Rows of 4095: the longest the search keeps as they are and counts in pairs.
        rows = np.stack([
            np.full(4095, t), np.full(4095, -t), np.full(4095, t_prev),
            np.resize(np.array([t, -t_next, t_prev, 0.0, -t, largest, tiny_sub], np.float32), 4095),
        ]).astype(np.float32)
        with_nan = rows.copy()
        with_nan[3, 5] = np.nan
        for data in (rows, with_nan):
            x = jnp.asarray(data)
            if pair:  # the difference as XLA takes it (a subnormal difference may be flushed to zero)
                x, data = (x, jnp.zeros_like(x)), np.asarray(difference(x, jnp.zeros_like(x)))
            bits = np.abs(data).view(np.uint32)
            if (bits == tb).sum() < 2:  # flushed to zero: no tie at t to break
                continue
            k = int((bits > tb).sum()) + 1  # T = t, with ties to break
            prepared, bound_bits, fast_ok = selection._magnitude_rows(x, layout)
            threshold, count_ge, tied = jax.jit(selection._search, static_argnums=(3, 5))(
                prepared, bound_bits, fast_ok, data.size, jnp.asarray(k, cdt), layout)
            assert int(threshold) == tb, f"t={t!r}"
            assert int(count_ge) == int((bits >= tb).sum()), f"t={t!r}"
            np.testing.assert_array_equal(np.asarray(tied), (bits == tb).sum(axis=1), err_msg=f"t={t!r}")
