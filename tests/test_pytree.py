"""merge_params: whole pytrees through the core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.methods.pytree import merge_params, path_key


def trees(n=3, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda: {"dense": {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
                              "b": jnp.asarray(rng.standard_normal(6), jnp.float32)},
                    "step": jnp.asarray(7)}
    return [make() for _ in range(n)], make()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_each_leaf_equals_the_core_on_task_vectors(method):
    models, base = trees()
    w = [1.0, 0.5, -0.3]
    key = jax.random.key(4)
    density = {} if method == "task_arithmetic" else {"density": 0.5}
    merged = merge_params(models, w, method=method, base=base, key=key, **density)
    for path, name in ((("dense", "w"), "['dense']['w']"), (("dense", "b"), "['dense']['b']")):
        leaf = lambda t: t[path[0]][path[1]]
        tasks = [leaf(m) - leaf(base) for m in models]
        kwargs = {"key": path_key(key, name)} if method.startswith("dare") else {}
        args = (tasks, w) if method == "task_arithmetic" else (tasks, w, 0.5)
        expected = leaf(base) + getattr(jm, method)(*args, **kwargs)
        np.testing.assert_allclose(np.asarray(leaf(merged)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert int(merged["step"]) == 7


def test_leaf_keys_do_not_depend_on_other_leaves():
    models, _ = trees()
    key = jax.random.key(0)
    full = merge_params(models, [1.0] * 3, method="dare_linear", density=0.5, key=key)
    only_w = merge_params([{"dense": {"w": m["dense"]["w"]}} for m in models], [1.0] * 3, method="dare_linear", density=0.5, key=key)
    np.testing.assert_array_equal(np.asarray(full["dense"]["w"]), np.asarray(only_w["dense"]["w"]))


def test_structure_mismatch_names_the_path():
    models, base = trees()
    broken = dict(models[1], dense={"w": models[1]["dense"]["w"], "bias": models[1]["dense"]["b"]})
    with pytest.raises(ValueError, match=r"trees\[1\].*\['dense'\]\['bias'\]"):
        merge_params([models[0], broken], [1.0, 1.0], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"ties: density must be in \[0, inf\), got -0.5"):
        merge_params(models, [1.0] * 3, method="ties", density=-0.5)
    with pytest.raises(ValueError, match="method task_arithmetic has no parameter 'density'"):
        merge_params(models, [1.0] * 3, method="task_arithmetic", density=0.5)
    with pytest.raises(ValueError, match="key is required"):
        merge_params(models, [1.0] * 3, method="dare_ties", density=0.5)
    with pytest.raises(ValueError, match=r"unknown merge method 'average'"):
        merge_params(models, [1.0] * 3, method="average")


def test_flax_parameter_state():
    from flax import nnx

    models = [nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(i)), nnx.Param) for i in range(3)]
    merged = merge_params(models, [1.0, 1.0, 1.0], method="ties", density=0.5)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(models[0])
    kernels = [m["kernel"][...] for m in models]
    np.testing.assert_array_equal(np.asarray(merged["kernel"][...]), np.asarray(jm.ties(kernels, [1.0] * 3, 0.5)))
    # The merged state drops back into a module.
    module = nnx.Linear(4, 3, rngs=nnx.Rngs(9))
    nnx.update(module, merged)
    assert module(jnp.ones((2, 4))).shape == (2, 3)


def test_equinox_module():
    import equinox as eqx

    models = [eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(i)) for i in range(3)]
    params = [eqx.filter(m, eqx.is_array) for m in models]
    merged = merge_params(params, [1.0, 0.5, 0.7], method="dare_ties", density=0.5, key=jax.random.key(0))
    model = eqx.combine(merged, eqx.filter(models[0], eqx.is_array, inverse=True))
    assert model(jnp.ones(4)).shape == (2,)
    w = [m.layers[0].weight for m in models]
    key = path_key(jax.random.key(0), jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params[0])[0][0][0]))
    first = jax.tree_util.tree_leaves(merged)[0]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(jm.dare_ties(w, [1.0, 0.5, 0.7], 0.5, key=key)))


# --- traced weights: merge_params under jax.grad, jit and vmap ----------------------------------

def _grad_trees():
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((16, 12)), jnp.float32), "b": jnp.asarray(rng.standard_normal(12), jnp.float32)}
    trees = [jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * 0.3, base) for _ in range(3)]
    return base, trees


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
])
def test_grad_with_respect_to_weights_matches_finite_differences(method, params):
    # PEFT's semantics: the sign vote is on the unweighted deltas, so the loss is smooth in the weights.
    # (mergekit's vote is on weighted deltas: the loss jumps where a vote flips, and finite differences
    # across a jump say nothing about the gradient.)
    base, trees = _grad_trees()
    key = jax.random.key(1)
    target = jax.tree.map(lambda x: jnp.sin(x), base)

    def loss(w):
        merged = merge_params(trees, w, method=method, base=base, key=key, **params)
        return sum(jnp.sum((merged[n] - target[n]) ** 2) for n in merged)

    w = jnp.asarray([0.7, 0.4, 0.9], jnp.float32)
    grad = np.asarray(jax.grad(loss)(w))
    eps = 1e-2
    for i in range(3):
        step = np.zeros(3, np.float32)
        step[i] = eps
        numeric = (float(loss(w + step)) - float(loss(w - step))) / (2 * eps)
        assert grad[i] == pytest.approx(numeric, rel=2e-2, abs=1e-3), (method, i)
    assert np.abs(grad).max() > 0


def test_jit_and_vmap_over_weights_equal_concrete_calls():
    base, trees = _grad_trees()
    grid = jnp.asarray([[1.0, 0.5, 0.7], [0.2, 0.9, 0.4]], jnp.float32)
    batched = jax.vmap(lambda w: merge_params(trees, w, method="ties", base=base, density=0.4))(grid)
    jitted = jax.jit(lambda w: merge_params(trees, w, method="ties", base=base, density=0.4))(grid[1])
    for i in range(2):
        concrete = merge_params(trees, [float(x) for x in grid[i]], method="ties", base=base, density=0.4)
        for name in concrete:
            np.testing.assert_allclose(batched[name][i], concrete[name], rtol=1e-6, atol=1e-6)
    for name in jitted:
        np.testing.assert_allclose(jitted[name], merge_params(trees, [0.2, 0.9, 0.4], method="ties", base=base, density=0.4)[name], rtol=1e-6, atol=1e-6)


def test_traced_weights_with_a_method_that_needs_concrete_ones_name_it():
    base, trees = _grad_trees()
    with pytest.raises(TypeError, match="method multislerp needs concrete weights"):
        jax.jit(lambda w: merge_params(trees, w, method="multislerp", base=base))(jnp.ones(3))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_a_mesh_from_jax_make_mesh_with_explicit_axes_merges_as_unsharded(method):
    """`jax.make_mesh` gives explicit axes (JAX 0.10), on which the selection's sort was refused
    (ShardingTypeError): the leaves are merged on the same mesh with auto axes, and the result comes back
    on the caller's mesh (to be used beside the caller's arrays)."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(3)
    trees = [{"w": jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)} for _ in range(3)]
    key = jax.random.key(5)
    got = merge_params(trees, method=method, density=0.4, key=key, mesh=mesh)["w"]
    expected = merge_params(trees, method=method, density=0.4, key=key)["w"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert got.sharding.mesh == mesh and got.sharding.mesh.axis_types == (AxisType.Explicit,)
