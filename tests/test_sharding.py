"""Sharded merging: 8 simulated CPU devices, and two processes on 127.0.0.1.

Device counts are fixed when JAX starts, so each check runs in a fresh interpreter.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge

HERE = Path(__file__).parent


def test_every_function_on_1d_and_2d_meshes_equals_single_device():
    result = subprocess.run([sys.executable, str(HERE / "sharding_checks.py")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "all sharding checks passed" in result.stdout


def test_cli_devices_flag_gives_the_single_device_result(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    inputs = []
    for i in range(3):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": rng.standard_normal((64, 48)).astype(np.float32), "v": rng.standard_normal(37).astype(np.float32)}, str(path))
        inputs.append(str(path))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    outputs = {}
    for devices in ("1", "4"):
        out = tmp_path / f"out{devices}"
        cmd = [sys.executable, "-m", "jaxmerge", "merge", *inputs, "--method", "dare_ties", "--density", "0.3", "--devices", devices, "--output", str(out), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        from jaxmerge.formats.safetensors_io import Checkpoint

        ckpt = Checkpoint(out)
        outputs[devices] = {n: ckpt.read(n) for n in ckpt.tensors}
    for name in outputs["1"]:
        np.testing.assert_array_equal(outputs["1"][name], outputs["4"][name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_each_holding_half_of_the_shards(tmp_path):
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), port, str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    assert all("local shards 2" in log for log in logs)  # each process holds half of the 4 devices' shards
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
    expected = np.asarray(jaxmerge.ties(host, [1.0, 0.5, 0.7], 0.2))
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"result_{i}.npy"), expected)


@pytest.mark.slow
def test_every_table_method_on_a_mesh_equals_single_device():
    # tests/sharding_methods_check.py: merge_params with mesh=8 devices against no mesh, for each method.
    result = subprocess.run([sys.executable, str(HERE / "sharding_methods_check.py")], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all method sharding checks passed" in result.stdout
    from jaxmerge.methods import _table

    assert result.stdout.count("ok ") == len(_table.names())


@pytest.mark.parametrize("call", [
    lambda t: jaxmerge.ties(t, [1.0, 0.5, -0.7], 0.2),
    lambda t: jaxmerge.magnitude_prune(t, [1.0, 0.5, -0.7], 0.3),
    lambda t: jaxmerge.dare_ties(t, [1.0, 0.5, -0.7], 0.3, key=jax.random.key(1)),
    lambda t: jaxmerge.task_arithmetic(t, [1.0, 0.5, -0.7]),
], ids=["ties", "magnitude_prune", "dare_ties", "task_arithmetic"])
def test_arrays_on_an_explicit_mesh_merge_and_stay_on_it(call):
    """`jax.make_mesh` gives explicit axes (JAX >= 0.8): ties' selection sorts a sample along a sharded
    axis, which explicit sharding refuses; the kernels run on auto axes and hand the result back."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("x",))
    assert mesh.axis_types == (AxisType.Explicit,)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("x"))) for x in host]
    merged = call(sharded)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(call(host)))
    assert merged.sharding.mesh == mesh  # usable beside the caller's other arrays
    assert (merged + sharded[0]).sharding.mesh == mesh


def test_explicit_mesh_arrays_under_jit_and_grad_and_through_merge_params():
    """Under jit and grad the arguments are tracers, which keep their mesh: the kernels see one mesh, as
    before the conversion existed; merge_params(mesh=explicit) returns leaves on the caller's mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("x",))
    rng = np.random.default_rng(1)
    host = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)]
    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("x"))) for x in host]
    weights = jnp.asarray([1.0, 0.5, -0.7])
    expected = np.asarray(jaxmerge.task_arithmetic(host, [1.0, 0.5, -0.7]))

    np.testing.assert_allclose(np.asarray(jax.jit(lambda w: jaxmerge.task_arithmetic(sharded, w))(weights)), expected,
                               rtol=1e-6)
    grad = jax.grad(lambda w: jnp.sum(jaxmerge.task_arithmetic(sharded, w) * sharded[0]))(weights)
    np.testing.assert_allclose(np.asarray(grad), [np.sum(x * host[0]) for x in host], rtol=1e-5)

    base = {"w": sharded[0]}
    merged = jaxmerge.merge_params([{"w": x} for x in sharded[1:]], [1.0, 0.5], method="task_arithmetic",
                                   base=base, mesh=mesh)
    assert merged["w"].sharding.mesh == mesh
    np.testing.assert_allclose(np.asarray(merged["w"] - base["w"]),
                               (host[1] - host[0]) + 0.5 * (host[2] - host[0]), rtol=1e-5, atol=1e-6)
