"""The method table: complete, documented, and the one source of names and parameters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmerge.methods import _table as table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_method_is_documented():
    for method in table.all_methods():
        assert method.summary and re.search(r"arXiv:\d{4}\.\d{4,5}|\d{4}", method.paper), method.name
        assert method.min_models >= 1
        assert method.max_models is None or method.max_models >= method.min_models
        for p in method.params:
            assert p.doc, f"{method.name}.{p.name} has no doc"
            assert p.kind in (float, int, bool, str)


def test_readme_lists_every_method():
    text = README.read_text()
    missing = [m.name for m in table.all_methods() if f"| `{m.name}` |" not in text]
    assert not missing, f"README's method table lacks {missing}"


def test_methods_command_lists_the_table():
    out = subprocess.run([sys.executable, "-m", "jaxmerge", "methods"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^(\w+): ", out.stdout, flags=re.M)
    assert listed == list(table.names())
    one = subprocess.run([sys.executable, "-m", "jaxmerge", "methods", "ties"], capture_output=True, text=True)
    assert one.stdout.startswith("ties: ") and "density (float, per model, default 1.0" in one.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxmerge", "methods", "average"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown merge method 'average'" in bad.stderr


def test_a_name_is_declared_once():
    method = table.get("ties")
    with pytest.raises(ValueError, match="declared twice"):
        table.register(method)


@pytest.mark.parametrize(
    "param, value, message",
    [
        (table.Param("t", float, low=0.0, high=1.0, doc="x"), 1.5, r"m: t must be in \[0, 1\], got 1.5"),
        (table.Param("t", float, low=0.0, low_open=True, doc="x"), 0.0, r"m: t must be in \(0, inf\), got 0.0"),
        (table.Param("t", float, doc="x"), "heavy", "m: t must be a number, got 'heavy'"),
        (table.Param("t", float, doc="x"), True, "m: t must be a number, got True"),
        (table.Param("n", int, doc="x"), 2.5, "m: n must be an integer, got 2.5"),
        (table.Param("f", bool, doc="x"), "yes", "m: f must be true or false, got 'yes'"),
        (table.Param("s", str, choices=("a", "b"), doc="x"), "c", r"m: s must be one of \['a', 'b'\], got 'c'"),
    ],
)
def test_param_check_names_parameter_and_value(param, value, message):
    with pytest.raises(table.MethodError, match=message):
        param.check(value, f"m: {param.name}")


def test_bind_fills_defaults_and_checks_counts():
    ties = table.get("ties")
    bound = ties.bind({"density": [0.2, 0.3]}, num_inputs=3, base_index=0)
    assert bound["density"] == (1.0, 0.2, 0.3) and bound["weight"] == (1.0, 1.0, 1.0)
    assert bound["majority_sign_method"] == "total" and bound["lambda"] == 1.0
    with pytest.raises(table.MethodError, match="method ties has no parameter 'densty'"):
        ties.bind({"densty": 0.2}, num_inputs=3, base_index=0)
    needs_base = table.Method(name="m", merge=lambda *a, **k: None, params=(), base=table.BasePolicy.REQUIRED)
    with pytest.raises(table.MethodError, match="method m needs a base model"):
        needs_base.check_inputs(2, has_base=False)
    two = table.Method(name="two", merge=lambda *a, **k: None, params=(), base=table.BasePolicy.REQUIRED,
                       min_models=2, max_models=2)
    with pytest.raises(table.MethodError, match=r"method two takes exactly 2 models \(the base included\), got 3"):
        two.check_inputs(3, has_base=True)


# --- entry-wise methods: one compiled kernel per tensor size ------------------------------------

# Each rule of the task-vector kernel: both semantics, and mergekit's options off where they default on.
_SHAPE_VARIANTS = [{}, {"semantics": "mergekit"}, {"semantics": "mergekit", "rescale": False},
                   {"semantics": "mergekit", "normalize": False}]


def _entrywise_cases():
    """(method, parameters) for every method and parameter set that `Method.merges_entrywise` accepts."""
    cases = []
    for method in table.all_methods():
        for extra in _SHAPE_VARIANTS:
            try:
                bound = method.bind(extra, 4, base_index=0)
            except table.MethodError:
                continue  # a parameter the method has not, or rescale with PEFT's semantics
            if method.merges_entrywise(bound):
                cases.append(pytest.param(method.name, extra, id=f"{method.name}-{extra or 'defaults'}"))
    return cases


@pytest.mark.parametrize("name, extra", _entrywise_cases())
def test_entrywise_methods_merge_any_reshape_alike(name, extra):
    """What `Method.entrywise` promises, bit for bit: a matrix and its flat row view (`flat_rows_shape`,
    what the checkpoint merge uses for every shape of that size) give the same merged entries. Quarter-integer
    values make many magnitudes tie, so the tie break (lowest flat index first) is exercised too."""
    import jax
    import numpy as np

    from jaxmerge.core.selection import flat_rows_shape

    method = table.get(name)
    has_base = method.base is not table.BasePolicy.IGNORED
    n_models = 3
    base_index = 0 if has_base else None
    params = {"density": 0.3, **extra} if "density" in method.param_names else dict(extra)
    if "weight" in method.param_names:
        params["weight"] = [1.0, 0.5, -0.7] if not has_base else [0.9, 0.5, -0.7]
    bound = method.bind(params, num_inputs=n_models + has_base, base_index=base_index)
    assert method.merges_entrywise(bound)
    rng = np.random.default_rng(3)
    shape = (96, 512)
    view = flat_rows_shape(96 * 512)
    assert view == (3, 16384)
    base = rng.integers(-8, 9, shape) * np.float32(0.25)
    inputs = ([base] if has_base else []) + [base + rng.integers(-4, 5, shape) * np.float32(0.25) for _ in range(n_models)]
    key = jax.random.key(5) if method.random else None
    merged = [
        np.asarray(table.merge_tensor(method, [jax.numpy.asarray(x.reshape(s)) for x in inputs], base_index, bound,
                                      key=key)).reshape(-1)
        for s in (shape, view)
    ]
    assert not np.array_equal(merged[0], inputs[-1].reshape(-1))  # the merge did something
    np.testing.assert_array_equal(merged[1], merged[0])


def test_entrywise_is_declared_where_it_holds_and_only_there():
    assert {p.values[0] for p in _entrywise_cases()} >= {"linear", "ties", "dare_ties", "task_arithmetic"}
    expected = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                "breadcrumbs", "breadcrumbs_ties"}
    declared = {m.name for m in table.all_methods() if m.entrywise is not None}
    assert declared == expected
    ties = table.get("ties")
    assert ties.merges_entrywise(ties.bind({"density": 0.2, "semantics": "mergekit"}, 4, base_index=0))
    dare = table.get("dare_ties")
    # mergekit's DARE restores each tensor's L1 norm (a float sum in shape order); PEFT's divides by the density.
    assert not dare.merges_entrywise(dare.bind({"density": 0.2, "semantics": "mergekit"}, 4, base_index=0))
    assert dare.merges_entrywise(dare.bind({"density": 0.2, "semantics": "peft"}, 4, base_index=0))
    della = table.get("della")
    assert not della.merges_entrywise(della.bind({"density": 0.5}, 4, base_index=0))  # ranks within rows
