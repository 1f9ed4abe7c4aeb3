"""AdaMerging (Yang et al., 2024, arXiv:2310.02575): entropy, gradients, the TIES variant, a real run, errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxmerge import merge_params
from jaxmerge.learn import adamerging, entropy, entropy_loss, merge_with_coefficients, prepare_task_vectors
from tiny_models import mlp_trees


def tanh_mlp(params, x):
    """Smooth (no ReLU kinks), so central differences converge."""
    return jnp.tanh(x @ params["l0"]["w"] + params["l0"]["b"]) @ params["l1"]["w"] + params["l1"]["b"]


def tiny_family(seed=0, n_tasks=2, scale=0.5):
    rng = np.random.default_rng(seed)
    base, finetuned = mlp_trees(rng, n_tasks, scale)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    return base, finetuned, x


def test_entropy_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 5)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.mean(-np.sum(p * np.log(p), -1))
    np.testing.assert_allclose(float(entropy(logits)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(entropy(np.zeros((3, 6)))), np.log(6), rtol=1e-6)  # uniform: log C
    assert float(entropy(np.array([[1e4, 0.0]]))) == pytest.approx(0.0, abs=1e-6)  # no overflow


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradient_matches_central_differences(granularity):
    base, finetuned, x = tiny_family()
    tvs = prepare_task_vectors(base, finetuned)
    heads = {"a": lambda p, z: tanh_mlp(p, z)[:, :3], "b": lambda p, z: tanh_mlp(p, z)}
    batch = {"a": x[:8], "b": x[8:]}
    shape = (2,) if granularity == "task" else (4, 2)
    c = jnp.asarray(np.random.default_rng(1).uniform(0.2, 0.6, shape), jnp.float32)

    loss = jax.jit(lambda c: entropy_loss(heads, base, tvs, c, batch, granularity))
    grad = np.asarray(jax.jit(jax.grad(lambda c: entropy_loss(heads, base, tvs, c, batch, granularity)))(c))
    eps = 1e-2
    fd = np.zeros(shape)
    for idx in np.ndindex(*shape):
        e = np.zeros(shape, np.float32)
        e[idx] = eps
        fd[idx] = (float(loss(c + e)) - float(loss(c - e))) / (2 * eps)
    assert np.abs(grad).max() > 1e-2  # a gradient worth checking
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-3 * np.abs(fd).max())


def test_task_wise_merge_equals_merge_params():
    base, finetuned, _ = tiny_family(n_tasks=3)
    c = [0.2, 0.7, -0.4]
    ours = merge_with_coefficients(base, prepare_task_vectors(base, finetuned), jnp.asarray(c), "task")
    ref = merge_params(finetuned, c, method="task_arithmetic", base=base)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ours, ref)
    # Layer-wise rows that all equal c give the same model; one changed row changes only its leaf.
    rows = np.tile(np.asarray(c, np.float32), (4, 1))
    same = merge_with_coefficients(base, prepare_task_vectors(base, finetuned), jnp.asarray(rows), "layer")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), same, ref)
    rows[1] = [1.0, 0.0, 0.0]  # row 1 is the second leaf in tree_flatten order: l0/w
    changed = merge_with_coefficients(base, prepare_task_vectors(base, finetuned), jnp.asarray(rows), "layer")
    np.testing.assert_allclose(changed["l0"]["w"], finetuned[0]["l0"]["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(changed["l0"]["b"], ref["l0"]["b"], rtol=1e-6, atol=1e-6)


def one_shape_family(seed=4, shape=(6, 5), n_tasks=3):
    """Every leaf one shape: the top-k and DARE kernels compile once."""
    rng = np.random.default_rng(seed)
    base = {"a": rng.standard_normal(shape).astype(np.float32), "b": rng.standard_normal(shape).astype(np.float32)}
    finetuned = [{k: b + rng.standard_normal(shape).astype(np.float32) for k, b in base.items()} for _ in range(n_tasks)]
    return base, finetuned, rng


def test_dare_task_vectors_use_merge_params_masks():
    base, finetuned, _ = one_shape_family(n_tasks=2)
    key = jax.random.key(3)
    tvs = prepare_task_vectors(base, finetuned, method="dare_linear", density=0.5, key=key)
    ours = merge_with_coefficients(base, tvs, jnp.asarray([0.3, 0.6]), "task")
    ref = merge_params(finetuned, [0.3, 0.6], method="dare_linear", base=base, density=0.5, key=key)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, ref)


def test_ties_variant_is_trim_elect_then_weighted_sum():
    """AdaMerging++: lambda weights the trimmed, sign-masked task vectors (summed, no disjoint mean)."""
    base, finetuned, rng = one_shape_family()
    density, c = 0.4, np.array([0.5, 0.2, 0.9], np.float32)
    tvs = prepare_task_vectors(base, finetuned, method="ties", density=density)
    merged = merge_with_coefficients(base, tvs, jnp.asarray(c), "task")
    for name in base:
        taus = [ft[name] - base[name] for ft in finetuned]
        k = int(density * taus[0].size)
        trimmed = []
        for t in taus:
            keep = np.zeros(t.size, bool)
            keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
            trimmed.append(np.where(keep.reshape(t.shape), t, 0))
        sign = np.where(np.sum(trimmed, 0) >= 0, 1, -1)
        processed = [np.where(np.sign(t) == sign, t, 0) for t in trimmed]
        for got, want in zip(tvs, processed):
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(merged[name], base[name] + sum(ci * p for ci, p in zip(c, processed)), rtol=1e-5, atol=1e-5)

    # The learner runs on these vectors: its params are the merge at its coefficients.
    x = rng.standard_normal((8, 6)).astype(np.float32)
    apply = lambda p, z: z @ p["a"] + z @ p["b"]  # noqa: E731
    result = adamerging(apply, base, finetuned, iter([x, x[::-1], 0.5 * x]),  # a one-shot iterator, read as it goes
                        method="ties", density=density, steps=3, learning_rate=0.05)
    assert result.entropy_history.shape == (3,)
    assert not np.allclose(result.coefficients, 0.3)
    again = merge_with_coefficients(base, tvs, result.coefficients, "task")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), result.params, again)
    with pytest.raises(ValueError, match="batches ran out after 2 batches"):
        adamerging(apply, base, finetuned, iter([x, x]), method="ties", density=density, steps=3)


@pytest.fixture(scope="module")
def digits():
    """The demo's MLP: pretrained briefly on a shared slice, three specialists fine-tuned on digit groups."""
    import optax

    from jaxmerge import demo

    (x_train, y_train), (x_test, y_test), shared = demo.load_data(0)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(demo.loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def train(p, x, y, steps, seed):
        s, rng = opt.init(p), np.random.default_rng(seed)
        for _ in range(steps):
            i = rng.integers(0, len(x), 64)
            p, s = step(p, s, x[i], y[i])
        return p

    base = train(demo.init_params(jax.random.key(0)), x_train[shared], y_train[shared], 100, 0)
    tasks = {name: np.asarray(d) for name, d in demo.TASKS.items()}
    finetuned = [train(base, x_train[np.isin(y_train, d)], y_train[np.isin(y_train, d)], 60, i + 1)
                 for i, d in enumerate(tasks.values())]
    # Task-specific heads (the paper's per-task classifiers): each task's own classes.
    heads = {name: (lambda d: lambda p, x: demo.logits(p, x)[:, d])(d) for name, d in tasks.items()}
    test = {name: (x_test[np.isin(y_test, d)], y_test[np.isin(y_test, d)]) for name, d in tasks.items()}
    logits = jax.jit(lambda params: {n: heads[n](params, test[n][0]) for n in tasks})  # compiled once
    return base, finetuned, tasks, heads, test, logits


def _entropy_and_accuracy(params, tasks, heads, test, logits):
    """Summed per-task entropy and mean per-task accuracy on every test input, each task with its head."""
    out = logits(params)
    ent = sum(float(entropy(out[n])) for n in tasks)
    acc = np.mean([np.mean(d[np.argmax(np.asarray(out[n]), -1)] == test[n][1]) for n, d in tasks.items()])
    return ent, float(acc)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_lowers_entropy_and_raises_accuracy(digits, granularity):
    base, finetuned, tasks, heads, test, logits = digits
    batch = 48  # one shape: one compilation of the step
    batches = {n: [x[s:s + batch] for s in range(0, len(x) - batch + 1, batch)] for n, (x, _) in test.items()}
    result = adamerging(heads, base, finetuned, batches, granularity=granularity, init=0.3, steps=30,
                        learning_rate=1e-2)
    # init=0.3: task arithmetic at 0.3 (merge_with_coefficients equals merge_params: tested above).
    initial = merge_with_coefficients(base, prepare_task_vectors(base, finetuned), jnp.full(3, 0.3), "task")
    ent0, acc0 = _entropy_and_accuracy(initial, tasks, heads, test, logits)
    ent1, acc1 = _entropy_and_accuracy(result.params, tasks, heads, test, logits)
    assert ent1 < ent0 - 0.02, (ent0, ent1)
    assert acc1 >= acc0, (acc0, acc1)
    assert result.coefficients.shape == ((3,) if granularity == "task" else (4, 3))
    assert result.leaf_paths == ("['layer0']['b']", "['layer0']['w']", "['layer1']['b']", "['layer1']['w']")
    assert np.all((np.asarray(result.coefficients) >= 0) & (np.asarray(result.coefficients) <= 1))
    assert result.entropy_history.shape == (30,) and np.all(np.isfinite(result.entropy_history))


def _never_called(params, x):
    raise AssertionError("apply_fn ran although the arguments are bad")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(granularity="neuron"), ValueError, "granularity"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=-3), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(batches=[]), ValueError, "batches"),
        (dict(batches={}), ValueError, "batches"),
        (dict(batches={"a": []}), ValueError, r"batches\['a'\]"),
        (dict(batches=iter([])), ValueError, "batches"),
        (dict(batches=np.zeros((4, 5), np.float32)), TypeError, "batches"),
        (dict(method="slerp"), ValueError, "method"),
        (dict(method="ties"), ValueError, "density"),
        (dict(method="dare_linear", density=0.5), ValueError, "key"),
        (dict(method="task_arithmetic", density=0.5), ValueError, "density"),
        (dict(init=[0.3, 0.3, 0.3]), ValueError, "init"),
        (dict(init=2.0), ValueError, "init"),
        (dict(learning_rate=0.0), ValueError, "learning_rate"),
        (dict(bounds=(1.0, 0.0)), ValueError, "bounds"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(finetuned=[]), ValueError, "finetuned"),
        (dict(apply_fn={"a": _never_called}), ValueError, "apply_fn"),
    ],
)
def test_bad_arguments_name_themselves_before_any_work(change, error, match):
    base, finetuned, x = tiny_family()
    kwargs = dict(apply_fn=_never_called, base=base, finetuned=finetuned, batches=[x])
    kwargs.update(change)
    with pytest.raises(error, match=match):
        adamerging(kwargs.pop("apply_fn"), kwargs.pop("base"), kwargs.pop("finetuned"), kwargs.pop("batches"), **kwargs)


def test_mismatched_structures_are_named():
    base, finetuned, x = tiny_family()
    missing = [finetuned[0], {"l0": finetuned[1]["l0"]}]
    with pytest.raises(ValueError, match=r"finetuned\[1\]"):
        adamerging(_never_called, base, missing, [x])
    reshaped = [finetuned[0], {**finetuned[1], "l1": {"w": np.zeros((6, 3), np.float32), "b": finetuned[1]["l1"]["b"]}}]
    with pytest.raises(ValueError, match=r"finetuned\[1\] leaf \['l1'\]\['w'\] has shape \(6, 3\)"):
        adamerging(_never_called, base, reshaped, [x])
    with pytest.raises(ValueError, match=r"coefficients must have shape \(4, 2\)"):
        merge_with_coefficients(base, prepare_task_vectors(base, finetuned), jnp.zeros((2,)), "layer")
