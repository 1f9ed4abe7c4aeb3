"""search_coefficients: the compiled, vmapped grid equals a Python loop over merge_params, in one trace."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxmerge import merge_params
from jaxmerge.learn import search_coefficients
from tiny_models import mlp_trees


def mlp_family(seed=0, n_tasks=3):
    rng = np.random.default_rng(seed)
    base, finetuned = mlp_trees(rng, n_tasks)
    x = jnp.asarray(rng.standard_normal((32, 5)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 4, 32))
    return base, finetuned, x, y


def mlp(params, x):
    return jnp.tanh(x @ params["l0"]["w"] + params["l0"]["b"]) @ params["l1"]["w"] + params["l1"]["b"]


def counting(fn):
    """`fn` with a Python counter of how often it is traced (or called eagerly)."""
    calls = []

    def wrapped(params):
        calls.append(1)
        return fn(params)

    return wrapped, calls


def neg_loss(apply, x, y):
    # A continuous score (higher is better): sensitive to every entry of the merge.
    return lambda params: jnp.mean(jax.nn.log_softmax(apply(params, x))[jnp.arange(y.shape[0]), y])


def loop(evaluate, base, finetuned, method, grid, key=None, **params):
    """The reference: merge_params and evaluate at each point, in Python."""
    names = list(grid)
    scores = np.zeros([len(grid[n]) for n in names])
    for idx in np.ndindex(*scores.shape):
        point = {n: float(grid[n][i]) for n, i in zip(names, idx)}
        merged = merge_params(finetuned, method=method, base=base, key=key, **params, **point)
        scores[idx] = float(evaluate(merged))
    return scores


def test_task_arithmetic_grid_equals_the_loop_and_best_is_the_argmax():
    base, finetuned, x, y = mlp_family()
    evaluate, calls = counting(neg_loss(mlp, x, y))
    grid = {"lambda": [0.0, 0.2, 0.5, 0.9, 1.3]}
    result = search_coefficients(evaluate, base, finetuned, grid=grid, weight=[1.0, 0.5, 0.8])
    assert len(calls) == 1  # one trace (and compilation) for the whole grid
    expected = loop(jax.jit(neg_loss(mlp, x, y)), base, finetuned, "task_arithmetic", grid, weight=[1.0, 0.5, 0.8])
    assert result.scores.shape == (5,)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected) > 0.1  # the grid matters: a wrong lambda would show
    i = int(np.argmax(expected))
    assert result.best == {"lambda": grid["lambda"][i]}
    assert result.best_score == pytest.approx(expected[i], rel=1e-5)
    ref = merge_params(finetuned, [1.0, 0.5, 0.8], method="task_arithmetic", base=base, **{"lambda": grid["lambda"][i]})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), result.params, ref)


def test_mergekit_semantics_and_chunked_map_equal_the_loop():
    base, finetuned, x, y = mlp_family(seed=1, n_tasks=2)
    grid = {"lambda": [0.3, 0.6, 1.0, 1.4, 2.0]}
    params = dict(weight=[0.5, 1.5], semantics="mergekit", normalize=True)
    expected = loop(jax.jit(neg_loss(mlp, x, y)), base, finetuned, "task_arithmetic", grid, **params)
    evaluate, calls = counting(neg_loss(mlp, x, y))
    # Chunks of 2 over 5 points: one chunked map and a remainder, still one compilation.
    result = search_coefficients(evaluate, base, finetuned, grid=grid, batch_size=2, **params)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) <= 2


def linear(params, x):
    return x @ params["w"]


@pytest.fixture(scope="module")
def one_leaf():
    """A one-tensor model: the exact top-k compiles once (its compilation dominates on CPU)."""
    rng = np.random.default_rng(2)
    base = {"w": rng.standard_normal((10, 5)).astype(np.float32)}
    finetuned = [{"w": base["w"] + rng.standard_normal((10, 5)).astype(np.float32)} for _ in range(3)]
    x = jnp.asarray(rng.standard_normal((40, 10)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 5, 40))
    return base, finetuned, x, y


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della"])
def test_lambda_by_density_grid_is_one_compilation_and_equals_the_loop(one_leaf, method):
    base, finetuned, x, y = one_leaf
    key = jax.random.key(7) if method in ("dare_linear", "della") else None
    # float32 0.58 * 50 is 29.000002 but Python's int(0.58 * 50) is 28: k must be the host's, as merge_params.
    grid = {"density": [0.1, 0.58, 1.0], "lambda": [0.4, 1.0, 1.7]}
    if method == "della":  # DELLA keeps density +/- epsilon inside (0, 1)
        grid["density"] = [0.2, 0.58, 0.8]
    evaluate, calls = counting(neg_loss(linear, x, y))
    result = search_coefficients(evaluate, base, finetuned, method=method, grid=grid, key=key)
    assert len(calls) == 1
    assert result.scores.shape == (3, 3)  # axes in the grid's key order: density, then lambda
    expected = loop(jax.jit(neg_loss(linear, x, y)), base, finetuned, method, grid, key=key)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected[:, 1]) > 1e-3  # density changes the score
    i, j = np.unravel_index(int(np.argmax(expected)), expected.shape)
    assert result.best == {"density": grid["density"][i], "lambda": grid["lambda"][j]}


def _never_called(params):
    raise AssertionError("evaluate ran although the grid is bad")


@pytest.mark.parametrize(
    "method, grid, error, match",
    [
        ("task_arithmetic", {"lambda": [1.0], "alpha": [0.1]}, ValueError, "'alpha'"),
        ("task_arithmetic", {"lambda": [1.0], "density": [0.5]}, ValueError, "'density'"),
        ("ties", {"density": [0.5]}, ValueError, "'lambda'"),
        ("task_arithmetic", {"lambda": []}, ValueError, r"grid\['lambda'\]"),
        ("task_arithmetic", {"lambda": [[0.1, 0.2]]}, ValueError, r"grid\['lambda'\]"),
        ("task_arithmetic", {"lambda": [0.1, float("nan")]}, ValueError, r"grid\['lambda'\]"),
        ("task_arithmetic", {"lambda": ["big"]}, TypeError, r"grid\['lambda'\]"),
        ("ties", {"lambda": [1.0], "density": [0.5, -0.1]}, ValueError, r"grid\['density'\]"),
        ("task_arithmetic", [("lambda", [1.0])], TypeError, "grid"),
        ("slerp", {"lambda": [1.0]}, ValueError, "method"),
    ],
)
def test_bad_grid_names_the_key_before_any_work(method, grid, error, match):
    base, finetuned, _, _ = mlp_family()
    with pytest.raises(error, match=match):
        search_coefficients(_never_called, base, finetuned, method=method, grid=grid)


def test_other_bad_arguments():
    base, finetuned, x, y = mlp_family()
    with pytest.raises(ValueError, match="density"):  # given twice
        search_coefficients(_never_called, base, finetuned, method="ties", grid={"lambda": [1.0], "density": [0.5]}, density=0.2)
    with pytest.raises(ValueError, match="key"):
        search_coefficients(_never_called, base, finetuned, method="dare_ties", grid={"lambda": [1.0]}, density=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        search_coefficients(_never_called, base, finetuned, grid={"lambda": [1.0]}, batch_size=0)
    with pytest.raises(ValueError, match=r"finetuned\[1\]"):
        search_coefficients(_never_called, base, [finetuned[0], {"l0": finetuned[1]["l0"]}], grid={"lambda": [1.0]})
    with pytest.raises(TypeError, match="scalar"):
        search_coefficients(lambda p: mlp(p, x)[0], base, finetuned, grid={"lambda": [0.5, 1.0]})
