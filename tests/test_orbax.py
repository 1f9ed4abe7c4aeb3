"""Orbax checkpoints of Flax NNX models, merged from disk leaf by leaf (`jaxmerge.engine.orbax`).

The oracle is `jaxmerge.merge_params` on the same trees held in memory: the
streamed merge must give the same bits, restore into the NNX model and run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
nnx = pytest.importorskip("flax.nnx")

from jaxmerge import merge_params  # noqa: E402
from jaxmerge.engine import orbax as jo  # noqa: E402
from jaxmerge.engine.orbax import merge_orbax  # noqa: E402
from jaxmerge.formats.orbax import OrbaxCheckpoint, is_orbax_checkpoint  # noqa: E402
from jaxmerge.formats.safetensors_io import CheckpointError  # noqa: E402
from jaxmerge.methods._table import MethodError  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.7]
HIDDEN = 64


class MLP(nnx.Module):
    """A small MLP with a Dropout (its RNG key and counter are non-float leaves of the state)."""

    def __init__(self, rngs, hidden=HIDDEN, extra=False, dtype=jnp.float32):
        self.l1 = nnx.Linear(8, hidden, rngs=rngs, param_dtype=dtype)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 4, rngs=rngs, param_dtype=dtype)
        if extra:
            self.l3 = nnx.Linear(4, 4, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x))))


def finetuned(seed: int, **kw) -> MLP:
    """The base model (same init) with its parameters moved: a stand-in for fine-tuning."""
    model = MLP(nnx.Rngs(0), **kw)
    if seed:
        params = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        moved = [x + (0.05 * jax.random.normal(k, x.shape)).astype(x.dtype) for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model


def save(path, model_or_state) -> str:
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(path), state)
    ckpt.wait_until_finished()
    return str(path)


def saved_layout(state):
    """An NNX state as Orbax lays it out on disk: nested dicts, each Variable's array under 'value'."""
    return jax.tree.map(lambda x: {"value": x}, nnx.to_pure_dict(state))


def restore(path, target=None):
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), target)


def _bits(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), "key"
    return np.asarray(x), x.dtype


def assert_same_bits(got, expected):
    got_flat, _ = jax.tree_util.tree_flatten_with_path(got)
    exp_flat, _ = jax.tree_util.tree_flatten_with_path(expected)
    assert [jax.tree_util.keystr(p) for p, _ in got_flat] == [jax.tree_util.keystr(p) for p, _ in exp_flat]
    for (path, a), (_, b) in zip(got_flat, exp_flat):
        (a, da), (b, db) = _bits(a), _bits(b)
        assert da == db, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax_models")
    base = finetuned(0)
    tuned = [finetuned(i) for i in (1, 2, 3)]
    return SimpleNamespace(
        root=root,
        base_state=nnx.state(base),
        states=[nnx.state(m) for m in tuned],
        base=save(root / "base", base),
        inputs=[save(root / f"ft{i}", m) for i, m in enumerate(tuned)],
    )


METHODS = [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("task_arithmetic", {})]


@pytest.mark.parametrize("method, params", METHODS)
def test_merge_from_disk_equals_merge_params_bit_for_bit(models, tmp_path, method, params):
    out = tmp_path / "merged"
    plan = merge_orbax(models.inputs, out, method=method, base=models.base, weights=WEIGHTS, seed=7, **params)
    assert is_orbax_checkpoint(out)
    expected = merge_params(
        [saved_layout(s) for s in models.states], WEIGHTS, method=method,
        base=saved_layout(models.base_state), key=jax.random.key(7), **params,
    )
    assert_same_bits(restore(out), expected)
    # The merge really changed the parameters (the comparison is not between two copies of the base).
    kernel = restore(out)["l1"]["kernel"]["value"]
    assert not np.array_equal(kernel, nnx.to_pure_dict(models.base_state)["l1"]["kernel"])
    recipe = ocp.StandardCheckpointer().metadata(os.path.abspath(out)).custom_metadata["jaxmerge_recipe"]
    assert recipe["method"] == method and recipe["seed"] == 7 and recipe["parameters"]["weight"] == WEIGHTS
    assert len(plan.leaves) == 6


def test_result_restores_into_the_nnx_model_and_runs(models, tmp_path):
    out = tmp_path / "merged"
    merge_orbax(models.inputs, out, method="ties", base=models.base, weights=WEIGHTS, density=0.5)
    # The JAX user's path: an abstract model, its state restored from the merged checkpoint.
    abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    model = nnx.merge(graphdef, restore(out, abstract_state))
    model.eval()
    x = jax.random.normal(jax.random.key(0), (5, 8))
    y = model(x)
    # The same merge on the NNX states in memory, put into a module by nnx.update.
    reference = MLP(nnx.Rngs(9))
    nnx.update(reference, merge_params(models.states, WEIGHTS, method="ties", base=models.base_state, density=0.5))
    reference.eval()
    assert y.shape == (5, 4) and np.all(np.isfinite(y))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(reference(x)))


def test_leaves_are_read_a_group_at_a_time(models, tmp_path, monkeypatch):
    whole = tmp_path / "whole_floor"
    merge_orbax(models.inputs, whole, method="ties", base=models.base, density=0.5)
    monkeypatch.setattr(jo, "GROUP_FLOOR_BYTES", 0)  # groups of at most the largest leaf's bytes
    requests = []
    read = OrbaxCheckpoint.read

    def spy(self, names, shardings=None):
        requests.append([self.leaves[n] for n in names])
        return read(self, names, shardings)

    monkeypatch.setattr(OrbaxCheckpoint, "read", spy)
    out = tmp_path / "streamed"
    plan = merge_orbax(models.inputs, out, method="ties", base=models.base, density=0.5)
    arrays = [leaf for leaf in plan.leaves if leaf.array]
    assert len(requests) > 4  # several restores per source, never one of the whole tree
    for leaves in requests:
        assert len(leaves) < len(arrays)
        assert sum(leaf.nbytes for leaf in leaves) <= plan.largest
    assert_same_bits(restore(out), restore(whole))


def test_sharded_merge_restores_onto_the_mesh_and_saves_sharded(models, tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import jax, numpy as np, orbax.checkpoint as ocp
        from jaxmerge.core.sharding import leaf_sharding, make_mesh
        from jaxmerge.engine.orbax import merge_orbax
        from jaxmerge.formats.orbax import OrbaxCheckpoint

        base, out1, out4, *inputs = sys.argv[1:]
        assert len(jax.devices()) == 4
        mesh = make_mesh(4)
        seen = []
        read = OrbaxCheckpoint.read
        def spy(self, names, shardings=None):
            got = read(self, names, shardings)
            seen.extend(x.sharding for x in got if isinstance(x, jax.Array) and x.ndim == 2)
            return got
        OrbaxCheckpoint.read = spy
        merge_orbax(inputs, out4, method="dare_ties", base=base, density=0.5, seed=3, mesh=mesh)
        assert seen and all(isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh for s in seen), seen
        assert any(s.spec != jax.sharding.PartitionSpec() for s in seen)
        OrbaxCheckpoint.read = read
        merge_orbax(inputs, out1, method="dare_ties", base=base, density=0.5, seed=3)
        ckpt = ocp.StandardCheckpointer()
        a, b = ckpt.restore(out1), ckpt.restore(out4)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        meta = ocp.PyTreeCheckpointer().metadata(out4).item_metadata.tree["l1"]["kernel"]["value"]
        assert type(meta.sharding).__name__ == "NamedShardingMetadata", meta.sharding
        assert dict(zip(meta.sharding.axis_names, meta.sharding.shape)) == {"devices": 4}
        print("sharded orbax merge ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = [os.path.abspath(p) for p in (models.base, tmp_path / "one", tmp_path / "four", *models.inputs)]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "sharded orbax merge ok" in result.stdout


# --- bad input: one line, before any array is read, nothing written ----------------------------------

@pytest.fixture
def no_reads(monkeypatch):
    def fail(self, names, shardings=None):
        raise AssertionError("an array was read before the inputs were checked")

    monkeypatch.setattr(OrbaxCheckpoint, "read", fail)


def _fails(inputs, out, match, error=CheckpointError, **kw):
    kw.setdefault("method", "ties")
    kw.setdefault("density", 0.5)
    with pytest.raises(error, match=match) as info:
        merge_orbax(inputs, out, **kw)
    assert "\n" not in str(info.value)
    assert not os.path.lexists(out)
    assert not list(out.parent.glob(".*jaxmerge-tmp*"))
    return str(info.value)


def test_shape_mismatch_names_the_leaf_and_both_shapes(models, tmp_path, no_reads):
    other = save(tmp_path / "narrow", finetuned(4, hidden=32))
    message = _fails([models.inputs[0], other], tmp_path / "out", "shape")
    assert "['l1']['bias']['value']" in message and "[32]" in message and "[64]" in message and "narrow" in message


def test_dtype_mismatch_names_the_leaf_and_both_dtypes(models, tmp_path, no_reads):
    other = save(tmp_path / "bf16", finetuned(4, dtype=jnp.bfloat16))
    message = _fails([models.inputs[0], other], tmp_path / "out", "dtype", base=models.base)
    assert "['l1']['bias']['value']" in message and "bfloat16" in message and "float32" in message


def test_missing_leaf_names_the_leaf(models, tmp_path, no_reads):
    bigger = save(tmp_path / "bigger", finetuned(4, extra=True))
    message = _fails([models.inputs[0], bigger], tmp_path / "out", "missing")
    assert "['l3']" in message and "bigger" in message
    message = _fails([models.inputs[0]], tmp_path / "out", "missing", base=bigger)
    assert "['l3']" in message


def test_not_an_orbax_checkpoint(models, tmp_path, no_reads):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.npy").write_bytes(b"x")
    _fails([models.inputs[0], plain], tmp_path / "out", r"plain: not an Orbax checkpoint \(no _METADATA file\)")
    _fails([models.inputs[0], tmp_path / "absent"], tmp_path / "out", "absent: no such directory")
    # A CheckpointManager step directory: the item inside is named.
    step = tmp_path / "ckpt" / "100"
    shutil.copytree(models.inputs[1], step / "default")
    _fails([models.inputs[0], step], tmp_path / "out", r"holds the item\(s\) \['default'\]")


def test_safetensors_mixed_with_orbax_is_refused(models, tmp_path, no_reads):
    from safetensors.numpy import save_file

    st = tmp_path / "st"
    st.mkdir()
    save_file({"l1.kernel": np.zeros((8, HIDDEN), np.float32)}, str(st / "model.safetensors"))
    mixed = "safetensors checkpoint; Orbax and safetensors inputs cannot be mixed"
    _fails([models.inputs[0], st], tmp_path / "out", mixed)
    _fails([models.inputs[0]], tmp_path / "out", "safetensors checkpoint", base=st / "model.safetensors")


def test_bad_parameter_and_output_inside_an_input(models, tmp_path, no_reads):
    _fails(models.inputs, tmp_path / "out", "ties: density must be in", error=MethodError, density=-0.5)
    _fails(models.inputs, tmp_path / "out", "got 2 weights for 3 inputs", weights=[1.0, 1.0])
    inside = tmp_path / "copy"
    shutil.copytree(models.inputs[0], inside)
    _fails([inside, models.inputs[1]], inside / "merged", "lies inside input")


def test_a_merge_failing_midway_leaves_no_output(models, tmp_path):
    # A model run once in training mode has advanced its dropout RNG: a non-float leaf that differs.
    used = finetuned(5)
    used(jnp.ones((1, 8)))
    other = save(tmp_path / "used", used)
    message = _fails([models.inputs[0], other], tmp_path / "out", "non-float leaf")
    assert "['drop']['rngs']" in message


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        merge_orbax(models.inputs, out, method="task_arithmetic")
    assert (out / "keep").exists()
    merge_orbax(models.inputs, out, method="task_arithmetic", force=True)
    assert is_orbax_checkpoint(out) and not (out / "keep").exists()
    assert not list(tmp_path.glob(".*jaxmerge-*"))


def test_is_orbax_checkpoint(models, tmp_path):
    assert is_orbax_checkpoint(models.base)
    assert not is_orbax_checkpoint(tmp_path)
    assert not is_orbax_checkpoint(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    assert not is_orbax_checkpoint(tmp_path / "f")


# --- the command line and recipes -------------------------------------------------------------

def _cli(argv, capsys):
    from jaxmerge.cli import main

    code = main(["merge", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected(models, method, weights, **params):
    return merge_params(
        [saved_layout(s) for s in models.states], weights, method=method,
        base=saved_layout(models.base_state), key=jax.random.key(7), **params,
    )


def test_cli_merges_orbax_checkpoints_bit_for_bit(models, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, err = _cli(
        [*models.inputs, "--base", models.base, "--method", "dare_ties", "--density", "0.5",
         "--weights", "0.5,0.3,0.7", "--seed", "7", "--output", out, "--quiet"], capsys,
    )
    assert code == 0, err
    assert "merged into" in stdout
    assert_same_bits(restore(out), _expected(models, "dare_ties", WEIGHTS, density=0.5))


def test_cli_dry_run_plans_orbax_and_writes_nothing(models, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, err = _cli([*models.inputs, "--method", "ties", "--density", "0.2", "--output", out, "--dry-run"], capsys)
    assert code == 0, err
    assert "Orbax checkpoints with ties" in stdout and "['l1']['kernel']['value']" in stdout
    assert not os.path.lexists(out)


def test_recipe_of_orbax_checkpoints_with_filters_and_base_listed(models, tmp_path, capsys):
    # mergekit's schema: the base listed among the models, per-model weights, a density filtered by leaf path.
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(textwrap.dedent(f"""\
        merge_method: ties
        base_model: {models.base}
        models:
          - model: {models.base}
          - model: {models.inputs[0]}
            parameters: {{weight: 0.5}}
          - model: {models.inputs[1]}
            parameters: {{weight: 0.3}}
          - model: {models.inputs[2]}
            parameters: {{weight: 0.7}}
        parameters:
          density:
            - filter: l1
              value: 0.3
            - value: 0.6
        jaxmerge: {{seed: 7}}
        """))
    out = tmp_path / "merged"
    code, _, err = _cli([recipe, "--output", out, "--quiet"], capsys)
    assert code == 0, err
    # Oracle: merge_params at each density, leaf by leaf as the filter says (recipes mean mergekit's ties).
    low = _expected(models, "ties", WEIGHTS, density=0.3, semantics="mergekit")
    high = _expected(models, "ties", WEIGHTS, density=0.6, semantics="mergekit")
    expected = {name: (low if name == "l1" else high)[name] for name in low}
    assert_same_bits(restore(out), expected)
    assert not np.array_equal(low["l2"]["kernel"]["value"], high["l2"]["kernel"]["value"])  # the filter matters


@pytest.mark.parametrize("body, message", [
    ("slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 1]\n", "slices: Orbax checkpoints have no layer stacks"),
    ("modules:\n  default:\n    models:\n      - model: {a}\n", "modules: Orbax checkpoints have no layer stacks"),
    ("models:\n  - model: {a}\n  - model: {b}\ntokenizer_source: union\n", "tokenizer_source: not supported for Orbax checkpoints"),
    ("models:\n  - model: {a}\n  - model: {st}\n", "is not an Orbax checkpoint, and Orbax and safetensors models cannot be mixed"),
    ("models:\n  - model: {a}\n  - model: {b}\ndtype: bfloat16\n", "dtype: not supported for Orbax checkpoints"),
    ("models:\n  - model: {a}\n    parameters: {{weight: [0.1, 0.9]}}\n  - model: {b}\n", "a gradient"),
])
def test_bad_orbax_recipes_fail_in_one_line(models, tmp_path, capsys, body, message):
    from safetensors.numpy import save_file

    st = tmp_path / "st"
    st.mkdir()
    save_file({"w": np.zeros((2,), np.float32)}, str(st / "model.safetensors"))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\n" + body.format(a=models.inputs[0], b=models.inputs[1], st=st))
    out = tmp_path / "out"
    code, _, err = _cli([recipe, "--output", out], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not os.path.lexists(out)


def test_cli_orbax_errors_exit_2(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _cli([*models.inputs, "--method", "ties", "--output", out, "--max-shard-size", "1GB"], capsys)
    assert code == 2 and "--max-shard-size applies to safetensors" in err
    code, _, err = _cli([*models.inputs, "--method", "slerp", "--output", out], capsys)
    assert code == 2 and "slerp" in err and err.count("\n") == 1
    assert not os.path.lexists(out)


def test_nonfinite_leaf_stops_unless_allowed(models, tmp_path, capsys):
    state = nnx.state(finetuned(4))
    bad = nnx.to_pure_dict(state)
    bad["l2"]["kernel"] = bad["l2"]["kernel"].at[0, 0].set(jnp.nan)
    nnx.replace_by_pure_dict(state, bad)
    broken = save(tmp_path / "broken", state)
    out = tmp_path / "out"
    code, _, err = _cli([models.inputs[0], broken, "--method", "task_arithmetic", "--output", out, "--quiet"], capsys)
    assert code == 2 and "broken: leaf ['l2']['kernel']['value'] holds NaN or inf" in err, err
    assert not os.path.lexists(out)
    code, _, err = _cli([models.inputs[0], broken, "--method", "task_arithmetic", "--output", out, "--quiet",
                         "--allow-nonfinite"], capsys)
    assert code == 0, err
    assert np.isnan(restore(out)["l2"]["kernel"]["value"][0, 0])
