"""The GPU path: `jaxmerge merge` on JAX's CUDA backend gives the CPU's result.

Each merge runs in a child process, as a user runs the command, once with
JAX_PLATFORMS=cuda and once with JAX_PLATFORMS=cpu, on the same small checkpoints.
Where no child process's JAX sees a GPU (no device, or no jax[cuda12]), every test
here skips and says so. The masks (magnitude selection, DARE's drops from JAX's
counter-based PRNG) are exact on both backends; the floating arithmetic around them
may round differently (fused multiply-adds, transcendental functions), so values are
compared to a few units in the last place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import tiny_models as tm

_BACKEND = "import jax; print(jax.default_backend())"


@pytest.fixture(scope="module")
def gpu_env() -> dict:
    """The environment of a child process that merges on the GPU; skips where its JAX sees none."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", _BACKEND], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode:
        pytest.skip(f"JAX did not start in a child process: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    backend = result.stdout.strip().splitlines()[-1]
    if backend != "gpu":
        pytest.skip(f"no GPU for JAX in this environment (jax.default_backend() is {backend!r}; a GPU and "
                    "jax[cuda12] are needed)")
    return {**env, "JAX_PLATFORMS": "cuda"}


def _merge(args: list[str], out: Path, env: dict) -> dict[str, np.ndarray]:
    from jaxmerge.formats.safetensors_io import Checkpoint

    cmd = [sys.executable, "-m", "jaxmerge", "merge", *args, "--output", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = Checkpoint(out)
    return {name: np.asarray(ckpt.read(name), np.float32) for name in ckpt.tensors}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "linear"])
def test_a_merge_on_the_gpu_equals_the_cpus(gpu_env, tmp_path, method, dtype):
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    base, *models = (str(p) for p in tm.write_safetensors_models(tmp_path / "in", 4, {"w": (300, 70), "v": (37,)},
                                                                 dtype=np_dtype))
    args = {
        "ties": [*models, "--base", base, "--method", "ties", "--density", "0.3"],
        "dare_ties": [*models, "--base", base, "--method", "dare_ties", "--density", "0.3", "--seed", "3"],
        "slerp": [models[0], "--base", base, "--method", "slerp", "--param", "t=0.3"],
        "linear": [*models, "--method", "linear"],
    }[method]
    on_gpu = _merge(args, tmp_path / "gpu", gpu_env)
    on_cpu = _merge(args, tmp_path / "cpu", {**gpu_env, "JAX_PLATFORMS": "cpu"})
    assert on_gpu.keys() == on_cpu.keys()
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -23
    for name in on_cpu:
        scale = np.abs(on_cpu[name]).max()
        np.testing.assert_allclose(on_gpu[name], on_cpu[name], rtol=4 * ulp, atol=4 * ulp * scale, err_msg=name)
