"""model_stock, sce, ram, ramplus_tl, arcee_fusion and passthrough against mergekit 0.1.5 (the oracle).

Every method must equal mergekit's own merge method object on the same float32
tensors within float32 tolerance, through the method table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

import jaxmerge
from jaxmerge.methods import _table as table

SHAPES = [(32, 48), (100,), (4, 6, 5)]


def models(shape, n=3, seed=0, sparse=False):
    """A base and n models near it; `sparse` leaves most entries of each task vector exactly 0."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    out = []
    for i in range(n):
        delta = rng.standard_normal(shape).astype(np.float32) * (i + 1) * 0.1
        if sparse:
            delta *= rng.random(shape) < 0.4
        out.append(base + delta)
    return base, out


def mergekit_merge(name, base, tensors, parameters=None):
    inputs = [torch.from_numpy(t) for t in ([] if base is None else [base]) + tensors]
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else 0)
    return registry.get(name)([group], parameters=parameters or {})[0].numpy()


def ours(name, base, tensors, params=None, base_index=0):
    """Through the table, the base at `base_index` among the inputs."""
    spec = table.get(name)
    inputs = list(tensors)
    if base is not None:
        inputs.insert(base_index, base)
    else:
        base_index = None
    spec.check_inputs(len(inputs), base is not None)
    bound = spec.bind(params or {}, len(inputs), base_index=base_index)
    return np.asarray(table.merge_tensor(spec, inputs, base_index, bound))


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_model_stock_equals_mergekit(shape, filter_wise, n):
    base, tensors = models(shape, n=n)
    close(ours("model_stock", base, tensors, {"filter_wise": filter_wise}),
          mergekit_merge("model_stock", base, tensors, {"filter_wise": filter_wise}))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_of_bfloat16_writes_no_float32_copy(filter_wise):
    """Each norm and inner product of model_stock is a pass of its own over the bfloat16 inputs that takes
    the offsets itself, so the compiled kernel holds no float32 copy of an offset (it held one per model)."""
    import jax
    import jax.numpy as jnp

    from jaxmerge.methods import adaptive

    shape = (512, 256)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    compiled = jax.jit(adaptive._model_stock_kernel, static_argnames=("filter_wise",)).lower(
        x, (x, x, x), filter_wise=filter_wise).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < shape[0] * shape[1] * 4


def test_model_stock_base_anywhere_and_singular_filter():
    base, tensors = models((8, 16))
    theirs = mergekit_merge("model_stock", base, tensors)
    close(ours("model_stock", base, tensors, base_index=2), theirs)
    # Opposite offsets: cos = -1, 1 + (N - 1) cos = 0 for N = 2: both keep the base (not the models' mean).
    a = base + 0.1
    b = base - 0.3
    close(ours("model_stock", base, [a, b]), mergekit_merge("model_stock", base, [a, b]))
    close(ours("model_stock", base, [a, b]), base)


def test_model_stock_through_merge_params():
    base, tensors = models((16, 24), n=3, seed=1)
    bias_base, bias = models((24,), n=3, seed=2)
    trees = [{"w": t, "b": b} for t, b in zip(tensors, bias)]
    merged = jaxmerge.merge_params(trees, method="model_stock", base={"w": base, "b": bias_base}, filter_wise=True)
    close(np.asarray(merged["w"]), mergekit_merge("model_stock", base, tensors, {"filter_wise": True}))
    close(np.asarray(merged["b"]), mergekit_merge("model_stock", bias_base, bias, {"filter_wise": True}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.05, 0.0, 1.5])
def test_sce_equals_mergekit(shape, select_topk):
    base, tensors = models(shape, sparse=select_topk == 0.3)
    params = {"select_topk": select_topk}
    close(ours("sce", base, tensors, params), mergekit_merge("sce", base, tensors, params))


def test_sce_single_model_int8_mask_and_no_model():
    base, tensors = models((20, 30))
    for params in ({"select_topk": 0.5}, {"select_topk": 0.5, "int8_mask": True}, {}):
        close(ours("sce", base, tensors[:1], params), mergekit_merge("sce", base, tensors[:1], params))
        close(ours("sce", base, tensors, params), mergekit_merge("sce", base, tensors, params))
    close(ours("sce", base, []), mergekit_merge("sce", base, []))


def test_sce_top_k_uses_linear_selection(monkeypatch):
    """The variance ranking goes through the exact linear-time selection, never a sort."""
    import jax

    from jaxmerge.methods import adaptive

    seen = []
    real = adaptive.top_k_magnitude_mask
    monkeypatch.setattr(adaptive, "top_k_magnitude_mask", lambda x, k, p=False: seen.append(x.shape) or real(x, k, p))
    base, tensors = models((12, 13), seed=5)
    jax.clear_caches()
    close(ours("sce", base, tensors, {"select_topk": 0.4}), mergekit_merge("sce", base, tensors, {"select_topk": 0.4}))
    assert seen == [(12, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_equals_mergekit(shape, epsilon):
    base, tensors = models(shape, sparse=True)
    close(ours("ram", base, tensors, {"epsilon": epsilon}), mergekit_merge("ram", base, tensors, {"epsilon": epsilon}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"r": 0.5, "alpha": 3.0}, {"r": 2.0, "alpha": 0.5, "epsilon": 0.05}])
def test_ramplus_tl_equals_mergekit(shape, params):
    base, tensors = models(shape, sparse=True, seed=3)
    # One model equal to the base: no change at all, rho = 0 / epsilon.
    tensors = tensors + [base.copy()]
    close(ours("ramplus_tl", base, tensors, params), mergekit_merge("ramplus_tl", base, tensors, params))


@pytest.mark.parametrize("shape", SHAPES + [(200, 300)])
def test_arcee_fusion_equals_mergekit(shape):
    base, (model,) = models(shape, n=1, seed=4)
    # Some rows unchanged (kl = 0) and some entries far off, so the threshold selects a subset.
    model = model.copy()
    if model.ndim > 1:
        model[0] = base[0]
    model.reshape(-1)[::7] += 1.0
    theirs = mergekit_merge("arcee_fusion", base, [model])
    mine = ours("arcee_fusion", base, [model])
    close(mine, theirs)
    kept = np.count_nonzero(mine != base)
    assert 0 < kept < base.size


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_arcee_fusion_small_tensors(shape):
    """Few entries: a quartile off by one rank moves the threshold past entries."""
    for seed in range(12):
        base, (model,) = models(shape, n=1, seed=seed)
        model = base + (model - base) * np.random.default_rng(seed).exponential(5, shape).astype(np.float32)
        close(ours("arcee_fusion", base, [model]), mergekit_merge("arcee_fusion", base, [model]))


def test_arcee_fusion_signed_importance():
    """Quartiles over importances that include negatives (a kl rounded below 0 is the same case)."""
    from jaxmerge.methods.adaptive import _kth_smallest

    x = np.random.default_rng(6).standard_normal(1000).astype(np.float32)
    x[::3] = 0.0
    x[5:40] = -0.25
    for rank in (0, 1, 249, 499, 500, 749, 998, 999):
        assert float(_kth_smallest(x, rank)) == np.sort(x)[rank], rank


@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
def test_passthrough_equals_mergekit(scale):
    _, (x,) = models((7, 9), n=1)
    params = {} if scale is None else {"scale": scale}
    close(ours("passthrough", None, [x], params), mergekit_merge("passthrough", None, [x], params))


def test_passthrough_keeps_dtype():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    import jax.numpy as jnp

    out = table.merge_tensor(table.get("passthrough"), [jnp.asarray(x, jnp.bfloat16)], None, {"scale": (0.5,)})
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), x * 0.5)


def test_table_mirrors_mergekit_specs():
    for name in ("model_stock", "sce", "ram", "ramplus_tl", "arcee_fusion", "passthrough"):
        spec = registry.get(name).spec
        mine = table.get(name)
        assert [p.name for p in mine.params] == [p.name for p in spec.parameters], name
        assert [p.default for p in mine.params] == [p.default for p in spec.parameters], name
        assert mine.base.value == spec.contract.base.value, name
        assert mine.min_models == spec.contract.min_inputs and mine.max_models == spec.contract.max_inputs, name
        scopes = {"shared": "shared", "input": "per_input", "non_base": "per_model"}
        assert [p.scope.value for p in mine.params] == [scopes[p.scope.value] for p in spec.parameters], name


def test_bad_inputs_raise_one_line():
    base, tensors = models((8, 8))
    trees = [{"x": t} for t in tensors]
    with pytest.raises(table.MethodError, match=r"method model_stock takes at least 3 models \(the base included\), got 2"):
        jaxmerge.merge_params(trees[:1], method="model_stock", base={"x": base})
    with pytest.raises(table.MethodError, match="method model_stock needs a base model"):
        jaxmerge.merge_params(trees, method="model_stock")
    with pytest.raises(table.MethodError, match=r"method arcee_fusion takes exactly 2 models \(the base included\), got 3"):
        jaxmerge.merge_params(trees[:2], method="arcee_fusion", base={"x": base})
    with pytest.raises(table.MethodError, match="method passthrough takes exactly 1 models, got 2"):
        jaxmerge.merge_params(trees[:2], method="passthrough")
    with pytest.raises(table.MethodError, match=r"sce: select_topk must be in \[0, inf\), got -0.5"):
        jaxmerge.merge_params(trees, method="sce", base={"x": base}, select_topk=-0.5)
    with pytest.raises(table.MethodError, match=r"ramplus_tl: epsilon must be in \(0, inf\), got 0"):
        jaxmerge.merge_params(trees, method="ramplus_tl", base={"x": base}, epsilon=0)
    with pytest.raises(table.MethodError, match=r"ramplus_tl: alpha must be in \[0, inf\), got -1"):
        jaxmerge.merge_params(trees, method="ramplus_tl", base={"x": base}, alpha=-1)
    with pytest.raises(table.MethodError, match=r"ram: epsilon must be in \[0, inf\), got -0.1"):
        jaxmerge.merge_params(trees, method="ram", base={"x": base}, epsilon=-0.1)
    with pytest.raises(table.MethodError, match="model_stock: filter_wise must be true or false, got 'rows'"):
        jaxmerge.merge_params(trees, method="model_stock", base={"x": base}, filter_wise="rows")
    with pytest.raises(table.MethodError, match="method arcee_fusion has no parameter 'density'"):
        jaxmerge.merge_params(trees[:1], method="arcee_fusion", base={"x": base}, density=0.5)
    with pytest.raises(table.MethodError, match="passthrough: scale: got 2 values for 1 models"):
        jaxmerge.merge_params(trees[:1], method="passthrough", scale=[1.0, 2.0])


def test_numeric_parameters_do_not_recompile():
    """Per-layer values of mergekit's varying parameters are traced, not static."""
    from jaxmerge.methods import adaptive

    base, tensors = models((10, 10), seed=7)
    for name, kernel, values in (
        ("sce", adaptive._sce_kernel, [{"select_topk": s} for s in (0.2, 0.4, 0.9, 1.0)]),
        ("ramplus_tl", adaptive._ram_kernel, [{"r": r, "alpha": a} for r, a in ((0.1, 0.2), (0.3, 1.0), (1.0, 0.1))]),
    ):
        ours(name, base, tensors, values[0])
        size = kernel._cache_size()
        for params in values[1:]:
            close(ours(name, base, tensors, params), mergekit_merge(name, base, tensors, params))
        assert kernel._cache_size() == size, name
