"""prune, magnitude_based_pruning, random_pruning against PEFT."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft

import jaxmerge as jm
from jaxmerge.core import pruning
from conftest import (
    DENSITIES,
    FLOAT_DTYPES,
    SHAPES,
    assert_same_magnitude_selection,
    distinct_magnitude_tasks,
    random_tasks,
    to_numpy,
    to_torch,
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_magnitude_prune_equals_peft_bit_for_bit_float32(shape, density):
    (x,) = random_tasks(shape, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = np.asarray(jm.prune(x, density, "magnitude"))
        theirs = peft.prune(to_torch(x), density, "magnitude").numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.float32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_pruning_half_precision_matches_peft_up_to_ties(dtype, density):
    (x,) = random_tasks((33, 65), 1, dtype=dtype)
    ours = jm.magnitude_based_pruning(x, density)
    theirs = peft.magnitude_based_pruning(to_torch(x), density)
    assert ours.dtype == x.dtype
    assert int(jnp.count_nonzero(ours)) == int(density * x.size)
    assert_same_magnitude_selection(ours, theirs, x, int(density * x.size))
    # With distinct magnitudes the selection is unambiguous: equal bit for bit.
    (y,) = distinct_magnitude_tasks((33, 65), 1, dtype=dtype)
    np.testing.assert_array_equal(
        to_numpy(jm.magnitude_based_pruning(y, density)), to_numpy(peft.magnitude_based_pruning(to_torch(y), density))
    )


def test_density_at_least_one_warns_and_returns_input():
    (x,) = random_tasks((8, 8), 1)
    with pytest.warns(UserWarning, match="no pruning"):
        out = jm.prune(x, 1.0, "magnitude")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_bad_density_raises_naming_the_value(bad):
    (x,) = random_tasks((8,), 1)
    with pytest.raises(ValueError, match="density"):
        jm.prune(x, bad, "magnitude")
    with pytest.raises(ValueError, match=r"density=-0\.1|density=nan"):
        jm.magnitude_based_pruning(x, bad)


def test_unknown_method_and_missing_key():
    (x,) = random_tasks((8,), 1)
    with pytest.raises(ValueError, match=r"method.*'sideways'"):
        jm.prune(x, 0.5, "sideways")
    with pytest.raises(ValueError, match="key is required"):
        jm.prune(x, 0.5, "random")
    with pytest.raises(TypeError):
        jm.random_pruning(x, 0.5, True, key=3.0)


def test_integer_input_is_promoted_and_bool_rejected():
    x = jnp.arange(-5, 5)
    out = jm.magnitude_based_pruning(x, 0.3)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [-5, -4, 0, 0, 0, 0, 0, 0, 0, 4])
    with pytest.raises(TypeError, match="bool"):
        jm.magnitude_based_pruning(jnp.ones(4, bool), 0.5)


# --- random pruning -------------------------------------------------------------------------


def test_random_pruning_is_reproducible_and_key_dependent():
    (x,) = random_tasks((256, 256), 1)
    a = jm.random_pruning(x, 0.3, True, key=jax.random.key(1))
    b = jm.random_pruning(x, 0.3, True, key=jax.random.key(1))
    c = jm.random_pruning(x, 0.3, True, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_random_pruning_mask_is_the_documented_derivation():
    (x,) = random_tasks((63, 65), 1)  # odd size: the last word's high half goes unused
    key = jax.random.key(7)
    out = jm.random_pruning(x, 0.4, False, key=key)
    n = x.size
    words = np.asarray(jax.random.bits(key, ((n + 1) // 2,), jnp.uint32))
    halves = np.concatenate([words & 0xFFFF, words >> 16])[:n]
    mask = (halves < round(0.4 * 65536)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(out), np.where(mask, x, 0))


def test_random_mask_extremes():
    key = jax.random.key(0)
    assert bool(pruning.random_mask(key, 1.0, (1000,)).all())
    assert not bool(pruning.random_mask(key, 0.0, (1000,)).any())


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_kept_fraction_within_six_sigma_and_mean_preserved(density):
    n = 512 * 512
    x = jnp.ones((512, 512), jnp.float32)
    out = np.asarray(jm.random_pruning(x, density, True, key=jax.random.key(3)))
    kept = np.count_nonzero(out)
    sigma = np.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) <= 6 * sigma
    # Rescaled mean of a constant tensor: 1 in expectation, binomial spread / density.
    assert abs(out.mean() - 1.0) <= 6 * sigma / (n * density)
    # PEFT's kept fraction under the same bound (statistical equivalence).
    torch.manual_seed(0)
    theirs = peft.random_pruning(torch.ones(512, 512), density, rescale=True)
    assert abs(int(torch.count_nonzero(theirs)) - n * density) <= 6 * sigma


def test_density_zero_with_rescale_gives_zeros_not_nan():
    (x,) = random_tasks((16,), 1)
    out = np.asarray(jm.random_pruning(x, 0.0, True, key=jax.random.key(0)))
    np.testing.assert_array_equal(out, np.zeros(16, np.float32))
    # The deliberate difference: PEFT divides 0 by 0 here.
    assert torch.isnan(peft.random_pruning(to_torch(x), 0.0, rescale=True)).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_random_pruning_keeps_dtype(dtype):
    (x,) = random_tasks((32, 32), 1, dtype=dtype)
    out = jm.prune(x, 0.5, "random", rescale=True, key=jax.random.key(0))
    assert out.dtype == x.dtype
    kept = np.asarray(out.astype(jnp.float32)) != 0
    np.testing.assert_allclose(
        to_numpy(out)[kept], to_numpy(x)[kept] * 2, rtol=1e-2 if dtype != jnp.float32 else 1e-6
    )


def test_uniform_index_is_the_exact_floor_of_word_times_count():
    """DELLA's partner index: floor(word * count / 2**32) in 32-bit arithmetic, exact (checked in 64-bit)."""
    from jaxmerge.core.pruning import _uniform_index

    key = jax.random.key(3)
    words = np.asarray(jax.random.bits(key, (4096,), jnp.uint32)).astype(np.uint64)
    for count in (1, 2, 7, 4095, 65535):
        got = np.asarray(_uniform_index(key, (4096,), count))
        np.testing.assert_array_equal(got, (words * np.uint64(count)) >> np.uint64(32))
        assert got.min() >= 0 and got.max() < count
    big = np.asarray(_uniform_index(key, (4096,), 70000))  # randint past 2**16
    assert big.min() >= 0 and big.max() < 70000 and len(np.unique(big)) > 3000


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (63, 65), (3, 5, 1024)])
@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_random_words_are_jax_random_bits(shape, seed):
    """The fused threefry (`_random.random_words`) is `jax.random.bits` word for word, jitted or not:
    every seeded DARE or DELLA merge keeps its output."""
    from jaxmerge.core._random import random_words

    key = jax.random.key(seed)
    expected = np.asarray(jax.random.bits(key, shape, jnp.uint32))
    np.testing.assert_array_equal(np.asarray(random_words(key, shape)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(random_words, static_argnums=1)(key, shape)), expected)
    legacy = jax.random.wrap_key_data(jax.random.key_data(key))
    np.testing.assert_array_equal(np.asarray(random_words(legacy, shape)), expected)


def test_random_words_defer_to_jax_for_other_keys_and_counters():
    """Keys of another implementation and JAX's other counter layout take `jax.random.bits` itself."""
    from jaxmerge.core import _random

    rbg = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(
        np.asarray(_random.random_words(rbg, (100,))), np.asarray(jax.random.bits(rbg, (100,), jnp.uint32)))
    key = jax.random.key(3)
    assert _random._computes_jax_bits(key, 100)
    assert not _random._computes_jax_bits(key, 2**32)
    with jax.threefry_partitionable(False):
        assert not _random._computes_jax_bits(key, 100)
        np.testing.assert_array_equal(
            np.asarray(_random.random_words(key, (4, 33))), np.asarray(jax.random.bits(key, (4, 33), jnp.uint32)))


def test_magnitude_pruning_compiles_without_the_tree_rewrite_and_gives_the_same_bits():
    """`magnitude_based_pruning`'s kernel sums only the selection's exact counts, so on the CPU it runs the
    program compiled without XLA's tree-reduction rewrite (`kernel(exact_sums=...)`): the same bits as the
    default program, ties at the threshold included."""
    from jaxmerge.core import pruning
    from jaxmerge.core.selection import density_to_k

    x = jnp.asarray(np.random.default_rng(3).standard_normal((301, 703)).round(1), jnp.float32)  # a shape of its own
    exact_program = pruning._magnitude_kernel._exact_sums[0]
    before = exact_program._cache_size()
    got = pruning.magnitude_based_pruning(x, 0.3)
    assert exact_program._cache_size() == before + 1
    np.testing.assert_array_equal(got, pruning._magnitude_kernel._jitted(x, density_to_k(0.3, x.size), False))
