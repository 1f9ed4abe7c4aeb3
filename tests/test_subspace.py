"""TSV-M, Iso-C, Iso-CTS and WUDI against FusionBench 0.2.33's own functions.

The oracle's outputs are in tests/reference/subspace_reference.npz, written by
tests/reference/make_subspace_reference.py (FusionBench needs its own venv;
the script's docstring says how). Tolerances:

* TSV-M, Iso-C, Iso-CTS: max |jaxmerge - FusionBench| <= 5e-5 * max |FusionBench|
  per tensor: float32 SVDs by different LAPACK paths agree to a few ulps of the
  largest singular value times the condition of the subspaces (seen: <= 1.2e-5).
* WUDI: max |jaxmerge - FusionBench| <= 1e-3 * max |FusionBench - start| (the
  distance the optimiser moved from the sum of the task vectors; seen: <= 1.3e-5).
  Adam's step m/(sqrt(v) + eps) does not scale with the gradient, so a rounding
  difference in a near-zero gradient entry moves that entry by up to ~lr for a
  step; the bound is relative to the optimiser's own travel, not to the values.
  The WUDI loss of both results also agrees to 1e-5 relative.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge.methods import _table as table
from jaxmerge.methods import subspace as sub

REFERENCE = Path(__file__).parent / "reference" / "subspace_reference.npz"
SCRIPT = REFERENCE.with_name("make_subspace_reference.py")
# SHA-256 of the reference's inputs (see inputs_digest): regenerating the file
# from other inputs (seed, shapes, scale) fails test_reference_inputs_are_pinned.
INPUTS_SHA256 = "30efa89827fc416e99d8dde512e31aebe11e48c64a2b99096d5f95bab7fa2c11"
TENSORS = ("w1", "w2", "w3", "b")
SETS = ("t3", "t4")
# The parameters the reference was made with (tests/reference/make_subspace_reference.py).
TSVM_ALPHA_LIST = {"t3": [0.5, 1.5, -0.25], "t4": [1.0, 0.25, 2.0, 0.75]}
TSVM_ALPHA = 0.7
WUDI_FAST = {"lr": 1e-3, "iter_num": 50}
RTOL = 5e-5
WUDI_RTOL = 1e-3


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


def inputs_digest(arrays):
    """The reference script's digest: names, shapes, dtypes and bytes of the `in_*` arrays, sorted."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k.startswith("in_")):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype.str};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def assert_close(got, want, rtol=RTOL, what=""):
    got = np.asarray(got, np.float64)
    err = np.max(np.abs(got - want))
    scale = np.max(np.abs(want))
    assert got.shape == want.shape, what
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


# --------------------------------------------------------------------------- the reference file


def test_reference_inputs_are_pinned(ref):
    assert str(ref["inputs_sha256"]) == INPUTS_SHA256
    assert inputs_digest(ref) == INPUTS_SHA256
    assert sorted(k for k in ref if k.startswith("in_")) == sorted(f"in_{s}_{n}" for s in SETS for n in TENSORS)
    assert ref["in_t3_w1"].shape == (3, 32, 24) and ref["in_t4_w3"].shape == (4, 12, 20)


def test_reference_script_makes_these_inputs(ref):
    spec = importlib.util.spec_from_file_location("make_subspace_reference", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports NumPy only; torch and FusionBench load in main()
    made = script.make_inputs()
    assert script.inputs_digest(made) == INPUTS_SHA256
    for name, value in made.items():
        np.testing.assert_array_equal(value, ref[name])


# --------------------------------------------------------------------------- against FusionBench


@pytest.mark.parametrize("s", SETS)
def test_tsv_m_matches_fusionbench(ref, s):
    for n in TENSORS:
        x = ref[f"in_{s}_{n}"]
        assert_close(sub.tsv_m(x), ref[f"tsv_m_{s}_{n}"], what=f"tsv_m {s} {n}")
        assert_close(sub.tsv_m(list(x), alpha=TSVM_ALPHA), ref[f"tsv_m_alpha_{s}_{n}"], what=f"alpha {s} {n}")
        assert_close(sub.tsv_m(x, TSVM_ALPHA_LIST[s]), ref[f"tsv_m_list_{s}_{n}"], what=f"alpha list {s} {n}")


@pytest.mark.parametrize("s", SETS)
def test_iso_c_matches_fusionbench(ref, s):
    for n in TENSORS:
        assert_close(sub.iso_c(ref[f"in_{s}_{n}"]), ref[f"iso_c_{s}_{n}"], what=f"iso_c {s} {n}")


@pytest.mark.parametrize("s", SETS)
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_fusionbench(ref, s, fraction):
    for n in TENSORS:
        got = sub.iso_cts(ref[f"in_{s}_{n}"], common_space_fraction=fraction)
        assert_close(got, ref[f"iso_cts_{fraction:g}_{s}_{n}"], what=f"iso_cts {fraction} {s} {n}")


@pytest.mark.parametrize("case, params", [("wudi", {}), ("wudi_fast", WUDI_FAST)])
def test_wudi_matches_fusionbench(ref, case, params):
    for n in TENSORS:
        x = ref[f"in_t3_{n}"]
        want = ref[f"{case}_t3_{n}"]
        got = np.asarray(sub.wudi(x, **params))
        if x.ndim == 2:  # the bias is the mean
            assert_close(got, want, what=n)
            continue
        start = x.sum(0, dtype=np.float64)
        travel = np.max(np.abs(want - start))
        assert travel > 1e-3, "the optimiser must move for this test to mean anything"
        assert np.max(np.abs(got - want)) <= WUDI_RTOL * travel, n
        ours, theirs = float(sub.wudi_loss(jnp.asarray(got), x)), float(sub.wudi_loss(jnp.asarray(want), x))
        assert abs(ours - theirs) <= 1e-5 * theirs, n
        assert ours < float(sub.wudi_loss(jnp.asarray(start, jnp.float32), x))


# --------------------------------------------------------------------------- properties


def test_wudi_gradient_is_the_losss(ref):
    """The kernel's closed-form gradient 2 (tau G - C) is jax.grad of the paper's loss."""
    for n in ("w1", "w3"):
        x = jnp.asarray(ref[f"in_t3_{n}"])
        for tau in (x.sum(0), jnp.asarray(ref[f"wudi_fast_t3_{n}"])):
            auto = jax.grad(sub.wudi_loss)(tau, x)
            gram, target = sub.wudi_gradient_terms(x)
            closed = 2 * (tau @ gram - target)
            np.testing.assert_allclose(closed, auto, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(auto))))


def test_batch_dims_merges_each_matrix(ref):
    x = np.stack([ref["in_t3_w2"], ref["in_t3_w2"][::-1] * 2.0], axis=1)  # (T, L=2, 16, 16)
    for fn, kw in [(sub.tsv_m, {}), (sub.iso_c, {}), (sub.iso_cts, {"common_space_fraction": 0.5}),
                   (sub.wudi, {"iter_num": 20, "lr": 1e-4})]:
        both = fn(x, batch_dims=1, **kw)
        for layer in range(2):
            np.testing.assert_allclose(both[layer], fn(x[:, layer], **kw), rtol=1e-5, atol=1e-7)
        # Without batch_dims a 3-D tensor is not a matrix: the mean.
        np.testing.assert_allclose(fn(x, **kw), x.mean(0), rtol=1e-6, atol=1e-9)


def test_shapes_dtypes_and_edge_cases(ref):
    x = jnp.asarray(ref["in_t3_w1"], jnp.bfloat16)
    for fn in (sub.tsv_m, sub.iso_c, sub.iso_cts, sub.wudi):
        out = fn(x)
        assert out.dtype == jnp.bfloat16 and out.shape == (32, 24)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
    one = ref["in_t3_w1"][:1]
    np.testing.assert_allclose(sub.tsv_m(one), one[0], atol=1e-6)  # one task: its own full SVD
    np.testing.assert_allclose(sub.wudi(ref["in_t3_w1"], iter_num=0), ref["in_t3_w1"].sum(0), rtol=1e-6)
    # A frozen layer (zero task vectors) stays zero; FusionBench returns NaN for WUDI there.
    zeros = np.zeros((3, 8, 6), np.float32)
    for fn in (sub.tsv_m, sub.iso_c, sub.iso_cts, sub.wudi):
        np.testing.assert_array_equal(fn(zeros), np.zeros((8, 6)))
    mixed = ref["in_t3_w3"].copy()
    mixed[1] = 0  # one model left a layer untouched: it weighs nothing in WUDI's loss
    assert np.all(np.isfinite(np.asarray(sub.wudi(mixed, iter_num=10))))


def test_iso_cts_sizes():
    assert sub.iso_cts_sizes(24, 3, 0.8) == (18, 2)  # int(19.2) = 19, round(5 / 3) * 3 = 6
    assert sub.iso_cts_sizes(16, 3, 0.8) == (13, 1)
    assert sub.iso_cts_sizes(16, 40, 0.8) == (16, 0)
    with pytest.raises(ValueError, match="iso_cts: common_space_fraction 0.0 gives a negative common space"):
        sub.iso_cts_sizes(16, 6, 0.0)  # round(16 / 6) * 6 = 18 > 16


def test_bad_arguments_name_function_and_value(ref):
    x = ref["in_t3_w2"]
    with pytest.raises(ValueError, match=r"iso_cts: common_space_fraction must be .* got 1.5"):
        sub.iso_cts(x, common_space_fraction=1.5)
    with pytest.raises(ValueError, match="iso_cts: common_space_fraction 0.0 gives a negative"):
        sub.iso_cts(np.zeros((6, 16, 16), np.float32), common_space_fraction=0.0)
    with pytest.raises(ValueError, match=r"wudi: lr must be a finite number > 0, got 0"):
        sub.wudi(x, lr=0)
    with pytest.raises(ValueError, match=r"wudi: iter_num must be an integer >= 0, got 2.5"):
        sub.wudi(x, iter_num=2.5)
    with pytest.raises(ValueError, match=r"tsv_m: batch_dims must be an integer in \[0, 2\], got 3"):
        sub.tsv_m(x, batch_dims=3)
    with pytest.raises(ValueError, match="one weight per task"):
        sub.tsv_m(x, [1.0, 2.0])


# --------------------------------------------------------------------------- through the method table


def _trees(ref, s="t3"):
    base = {name: np.full(ref[f"in_{s}_{name}"].shape[1:], 0.5, np.float32) for name in TENSORS}
    models = [
        {name: base[name] + ref[f"in_{s}_{name}"][i] for name in TENSORS}
        for i in range(ref[f"in_{s}_w1"].shape[0])
    ]
    return base, models


def test_merge_params_tsv_m_with_base(ref):
    base, models = _trees(ref)
    merged = jaxmerge.merge_params(models, method="tsv_m", base=base)
    for name in TENSORS:
        assert_close(np.asarray(merged[name]) - base[name], ref[f"tsv_m_t3_{name}"], rtol=1e-4, what=name)
    scaled = jaxmerge.merge_params(models, TSVM_ALPHA_LIST["t3"], method="tsv_m", base=base, alpha=0.5)
    for name in TENSORS:
        want = 0.5 * np.asarray(ref[f"tsv_m_list_t3_{name}"], np.float64)
        assert_close(np.asarray(scaled[name]) - base[name], want, rtol=1e-4, what=name)


@pytest.mark.parametrize(
    "method, params, key",
    [("iso_c", {"scaling_factor": 1.0}, "iso_c_t3"), ("iso_cts", {"common_space_fraction": 0.5}, "iso_cts_0.5_t3"),
     ("wudi", WUDI_FAST, "wudi_fast_t3")],
)
def test_merge_params_other_methods(ref, method, params, key):
    base, models = _trees(ref)
    merged = jaxmerge.merge_params(models, method=method, base=base, **params)
    tvs = [{n: ref[f"in_t3_{n}"][i] for n in TENSORS} for i in range(3)]
    without_base = jaxmerge.merge_params(tvs, method=method, **params)  # the trees as task vectors
    for name in TENSORS:
        want = ref[f"{key}_{name}"]
        tol = 2e-4 if method != "wudi" else 1e-3
        assert_close(np.asarray(merged[name]) - base[name], want, rtol=tol, what=f"{method} {name}")
        assert_close(without_base[name], want, rtol=tol, what=f"{method} {name} without base")


def test_table_declares_fusionbench_parameters():
    assert table.get("tsv_m").param_names == ("weight", "alpha")
    assert table.get("iso_c").param_names == ("scaling_factor",)
    assert table.get("iso_cts").param("common_space_fraction").default == 0.8
    wudi = table.get("wudi")
    assert (wudi.param("iter_num").default, wudi.param("lr").default) == (400, 1e-5)
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        method = table.get(name)
        assert method.base is table.BasePolicy.REQUIRED and method.task_vectors and method.min_models == 1


def test_table_errors_are_one_line(ref):
    base, models = _trees(ref)
    with pytest.raises(table.MethodError, match=r"merge_params: iso_cts: common_space_fraction must be in \[0, 1\]"):
        jaxmerge.merge_params(models, method="iso_cts", base=base, common_space_fraction=2)
    with pytest.raises(table.MethodError, match=r"merge_params: wudi: lr must be in \(0, inf\), got 0"):
        jaxmerge.merge_params(models, method="wudi", base=base, lr=0)
    six = [models[0]] * 6
    with pytest.raises(table.MethodError, match="iso_cts: common_space_fraction 0.0 gives a negative common space"):
        jaxmerge.merge_params(six, method="iso_cts", base=base, common_space_fraction=0.0)


# --- layout: (out, in) torch weights or (in, out) Flax kernels --------------------------------

@pytest.mark.parametrize("method, params", [("wudi", {"iter_num": 20, "lr": 1e-3}), ("iso_cts", {})])
def test_in_out_layout_merges_the_transposed_matrices(method, params):
    from jaxmerge.methods import subspace

    rng = np.random.default_rng(5)
    taus = [rng.standard_normal((12, 7)).astype(np.float32) for _ in range(3)]
    fn = getattr(subspace, method)
    torch_layout = np.asarray(fn(taus, **params))
    flax_layout = np.asarray(fn([t.T for t in taus], layout="in_out", **params))
    np.testing.assert_allclose(flax_layout.T, torch_layout, rtol=1e-5, atol=1e-6)
    # The side matters: merging the (in, out) matrices as if they were (out, in) gives another result.
    as_stored = np.asarray(fn([t.T for t in taus], **params))
    assert not np.allclose(as_stored.T, torch_layout, rtol=1e-3, atol=1e-4)


def test_layout_through_merge_params_and_a_bad_value():
    from jaxmerge import merge_params
    from jaxmerge.methods._table import MethodError

    rng = np.random.default_rng(6)
    base = {"kernel": rng.standard_normal((7, 12)).astype(np.float32)}
    trees = [{"kernel": base["kernel"] + rng.standard_normal((7, 12)).astype(np.float32)} for _ in range(2)]
    got = merge_params(trees, method="wudi", base=base, iter_num=10, lr=1e-3, layout="in_out")["kernel"]
    from jaxmerge.methods.subspace import wudi

    expected = base["kernel"] + np.asarray(wudi([(t["kernel"] - base["kernel"]).T for t in trees], iter_num=10, lr=1e-3)).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="layout"):
        merge_params(trees, method="wudi", base=base, layout="rows")


def test_tsv_m_weights_can_be_traced():
    import jax
    import jax.numpy as jnp

    from jaxmerge import merge_params

    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((8, 6)).astype(np.float32)}
    trees = [{"w": base["w"] + rng.standard_normal((8, 6)).astype(np.float32)} for _ in range(2)]
    f = jax.jit(lambda w: merge_params(trees, w, method="tsv_m", base=base)["w"])
    np.testing.assert_allclose(f(jnp.asarray([0.5, 1.0])), merge_params(trees, [0.5, 1.0], method="tsv_m", base=base)["w"], rtol=1e-5, atol=1e-5)
