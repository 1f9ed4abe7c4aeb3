"""Task-vector methods of the table against mergekit 0.1.5 (the oracle) and PEFT on NaN/inf.

Deterministic methods must equal mergekit's own merge method on the same
tensors within float32 tolerance; random ones match in distribution (kept
share, L1 rescale) and are reproducible by key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

import jaxmerge
from jaxmerge.methods import _table as table

SHAPES = [(32, 48), (100,), (4, 6, 5)]


def models(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    return base, [base + rng.standard_normal(shape).astype(np.float32) * (i + 1) * 0.1 for i in range(n)]


def mergekit_merge(name, base, tensors, parameters):
    inputs = [torch.from_numpy(t) for t in ([] if base is None else [base]) + tensors]
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else 0)
    return registry.get(name)([group], parameters=parameters)[0].numpy()


def jaxmerge_merge(name, base, tensors, weights=None, key=None, **params):
    trees = [{"x": t} for t in tensors]
    merged = jaxmerge.merge_params(
        trees, weights, method=name, base=None if base is None else {"x": base}, key=key, **params
    )
    return np.asarray(merged["x"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "name, params",
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": [0.3, 0.5, 0.2], "normalize": False}),
        ("ties", {"density": 0.001}),  # mergekit keeps max(1, int(density * n))
        ("ties", {"density": 0.4, "lambda": 1.3, "int8_mask": True}),
        ("magnitude_prune", {"density": 0.25}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
        ("breadcrumbs", {"density": 0.8, "gamma": 0.3}),  # outlier removal reduced to keep the density
        ("breadcrumbs_ties", {"density": [0.4, 0.6, 0.5], "gamma": 0.1}),
        ("dare_ties", {"density": 1.0}),  # no drop: deterministic
    ],
)
def test_equals_mergekit(name, params, shape):
    base, tensors = models(shape)
    weights = [1.0, 0.5, -0.7]
    ours_params = dict(params)
    if "semantics" in table.get(name).param_names:
        ours_params["semantics"] = "mergekit"
    key = jax.random.key(0) if table.get(name).random else None
    ours = jaxmerge_merge(name, base, tensors, weights, key=key, **ours_params)
    if name == "magnitude_prune":  # PEFT's method, no mergekit twin: ties without the vote
        theirs = mergekit_merge("task_arithmetic", base, [base + _mk_magnitude(t - base, 0.25) for t in tensors], {"weight": weights})
    else:
        theirs = mergekit_merge(name, base, tensors, {"weight": weights, **params})
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)


def _mk_magnitude(delta, density):
    from mergekit.sparsify import magnitude

    return magnitude(torch.from_numpy(delta), density).numpy()


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_mergekit(normalize):
    _, tensors = models((16, 24))
    weights = [1.0, 0.5, 0.7]
    ours = jaxmerge_merge("linear", None, tensors, weights, normalize=normalize)
    theirs = mergekit_merge("linear", None, tensors, {"weight": weights, "normalize": normalize})
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_peft_and_mergekit_ties_agree_on_unit_weights():
    base, tensors = models((32, 48))
    peft_like = jaxmerge_merge("ties", base, tensors, [1.0, 1.0, 1.0], density=0.3)
    mergekit_like = jaxmerge_merge("ties", base, tensors, [1.0, 1.0, 1.0], density=0.3, semantics="mergekit")
    np.testing.assert_allclose(peft_like, mergekit_like, rtol=1e-6, atol=1e-6)
    # With unequal weights they differ: the vote and the divisor are not the same.
    a = jaxmerge_merge("ties", base, tensors, [1.0, 0.2, 3.0], density=0.3)
    b = jaxmerge_merge("ties", base, tensors, [1.0, 0.2, 3.0], density=0.3, semantics="mergekit")
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_l1_rescale_and_kept_share(name):
    base, (model,) = models((256, 256), n=1)
    delta = model - base
    key = jax.random.key(3)
    params = {"density": 0.3} | ({"semantics": "mergekit"} if name == "dare_linear" else {})
    pruned = jaxmerge_merge(name, base, [model], [1.0], key=key, **params) - base
    kept = np.count_nonzero(pruned) / pruned.size
    assert abs(kept - 0.3) < 0.01, kept  # binomial sd at 65536 entries is 0.0018
    np.testing.assert_allclose(np.abs(pruned).sum(), np.abs(delta).sum(), rtol=1e-4)
    # mergekit's own sparsifier on the same delta: the same kept share and norm.
    theirs = mergekit_merge(name, base, [model], {"weight": [1.0], "density": 0.3}) - base
    assert abs(np.count_nonzero(theirs) / theirs.size - kept) < 0.015
    np.testing.assert_allclose(np.abs(theirs).sum(), np.abs(pruned).sum(), rtol=1e-3)
    again = jaxmerge_merge(name, base, [model], [1.0], key=key, **params) - base
    np.testing.assert_array_equal(pruned, again)
    other = jaxmerge_merge(name, base, [model], [1.0], key=jax.random.key(4), **params) - base
    assert not np.array_equal(pruned != 0, other != 0)


def test_della_keeps_large_entries_more_often():
    base, (model,) = models((64, 2048), n=1)
    pruned = jaxmerge_merge("della_linear", base, [model], [1.0], key=jax.random.key(0), density=0.5, epsilon=0.4, rescale=False)
    delta = model - base
    order = np.argsort(np.abs(delta), axis=1)
    kept = np.take_along_axis(pruned - base != 0, order, axis=1)
    # Keep probability rises linearly from 0.1 (smallest) to 0.9 (largest) along each row.
    lowest, highest = kept[:, :200].mean(), kept[:, -200:].mean()
    assert abs(lowest - 0.14) < 0.03 and abs(highest - 0.86) < 0.03, (lowest, highest)


def test_della_keep_probability_is_linear_in_rank_and_ties_share_their_mean_rank():
    """The partner draw keeps each entry with mergekit's probability (density - eps) + 2 eps (rank - 1)/(n - 1):
    checked bin by bin of ranks over 64 rows, and for tied magnitudes (the mean of their ranks)."""
    from jaxmerge.core.pruning import della_drop

    rows, n, density, eps = 64, 2048, 0.5, 0.4
    rng = np.random.default_rng(5)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    draws = 8  # 8 keys: 8 x 64 x 128 = 65536 entries a bin, binomial sd <= 0.002
    kept = np.stack([np.asarray(della_drop(jnp.asarray(x), density, eps, jax.random.key(k))) != 0 for k in range(draws)])
    ranks = np.argsort(np.argsort(np.abs(x), axis=1), axis=1)  # 0 .. n-1 within each row
    bins = 16
    for b in range(bins):
        in_bin = (ranks >= b * n // bins) & (ranks < (b + 1) * n // bins)
        expected = (density - eps) + 2 * eps * ranks[in_bin].mean() / (n - 1)
        observed = kept[:, in_bin].mean()
        assert abs(observed - expected) < 0.01, (b, observed, expected)
    # Ties: four magnitudes, 512 entries each, in shuffled positions; each value's share follows its mean rank.
    values = np.repeat(np.array([0.5, -1.0, 2.0, -3.0], np.float32), n // 4)
    tied = np.stack([rng.permutation(values) for _ in range(rows)])
    kept = np.stack([np.asarray(della_drop(jnp.asarray(tied), density, eps, jax.random.key(100 + k))) != 0
                     for k in range(draws)])
    for group, magnitude in enumerate([0.5, 1.0, 2.0, 3.0]):
        mean_rank = group * n // 4 + (n // 4 - 1) / 2
        expected = (density - eps) + 2 * eps * mean_rank / (n - 1)
        observed = kept[:, np.abs(tied) == magnitude].mean()
        assert abs(observed - expected) < 0.01, (magnitude, observed, expected)
    # A 1-D tensor is one row; a row of one entry is kept with density - epsilon.
    single = np.asarray(della_drop(jnp.ones((1, 1)), density, eps, jax.random.key(0)))
    assert single.shape == (1, 1)
    lone = np.mean([np.asarray(della_drop(jnp.ones((40000, 1)), density, eps, jax.random.key(1))) != 0])
    assert abs(lone - (density - eps)) < 0.01, lone


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_della_draws_the_same_with_a_runtime_density(density):
    """The words are drawn in a branch taken only for 0 < density < 1 when the density is a runtime
    value (the CLI's kernels); a constant density folds the branch away. Both give one result, and
    density 0 and 1 drop everything and nothing."""
    from jaxmerge.core.pruning import della_drop

    x = jnp.asarray(np.random.default_rng(5).standard_normal((64, 48)), jnp.float32)
    key = jax.random.key(11)
    constant = np.asarray(jax.jit(lambda x, k: della_drop(x, density, 0.0 if density in (0, 1) else 0.2, k))(x, key))
    runtime = np.asarray(jax.jit(della_drop)(x, jnp.float32(density), jnp.float32(0.0 if density in (0, 1) else 0.2), key))
    np.testing.assert_array_equal(runtime, constant)
    if density == 0.0:
        assert not runtime.any()
    elif density == 1.0:
        np.testing.assert_array_equal(runtime, np.asarray(x))
    else:
        assert 0.2 < np.count_nonzero(runtime) / runtime.size < 0.4


def test_della_epsilon_out_of_range_is_one_line():
    base, tensors = models((8, 8))
    with pytest.raises(table.MethodError, match=r"della: epsilon must keep density \+/- epsilon in \(0, 1\)"):
        jaxmerge_merge("della", base, tensors, key=jax.random.key(0), density=0.2, epsilon=0.3)


def test_parameter_errors_name_method_parameter_and_value():
    base, tensors = models((8, 8))
    with pytest.raises(table.MethodError, match=r"breadcrumbs: gamma must be in \[0, 1\], got 1.5"):
        jaxmerge_merge("breadcrumbs", base, tensors, density=0.5, gamma=1.5)
    with pytest.raises(table.MethodError, match="ties: normalize applies with semantics mergekit"):
        jaxmerge_merge("ties", base, tensors, density=0.5, normalize=False)
    with pytest.raises(table.MethodError, match=r"ties: density: got 2 values for 3 models"):
        jaxmerge_merge("ties", base, tensors, density=[0.5, 0.5])
    with pytest.raises(table.MethodError, match="ties: normalize must be true or false, got 'yes'"):
        jaxmerge_merge("ties", base, tensors, density=0.5, semantics="mergekit", normalize="yes")


@pytest.mark.parametrize("fn", ["ties", "dare_ties", "task_arithmetic", "magnitude_prune", "dare_linear"])
def test_nan_and_inf_propagate_as_in_peft(fn):
    from peft.utils import merge_utils as peft

    rng = np.random.default_rng(0)
    tasks = rng.standard_normal((3, 6, 7)).astype(np.float32)
    tasks[0, 1, 2] = np.nan
    tasks[1, 4, 4] = np.inf
    tasks[2, 0, 0] = -np.inf
    weights = [1.0, 0.5, 0.7]
    # Density 1 keeps everything, so DARE's random mask plays no part and PEFT is exact.
    density = {"task_arithmetic": ()}.get(fn, (1.0,))
    key = {"key": jax.random.key(0)} if fn.startswith("dare") else {}
    ours = np.asarray(getattr(jaxmerge, fn)(list(tasks), weights, *density, **key))
    theirs = getattr(peft, fn)([torch.from_numpy(t) for t in tasks], torch.tensor(weights), *density).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert np.isnan(ours[1, 2]), "a NaN in one task must not vanish from the merge"
