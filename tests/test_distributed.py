"""Two merging processes on 127.0.0.1 over JAX's distributed runtime give the one-process output, byte for byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmerge.engine.distributed import assign_shards

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_assign_shards_balances_bytes_largest_first():
    # 5 -> p0, 4 -> p1, 3 -> p1 (7), 2 -> p0 (7), 1 -> p0 on the tie: loads 8 and 7
    assert assign_shards([5, 1, 4, 2, 3], 2) == [0, 0, 1, 0, 1]
    assert assign_shards([1, 1, 1], 1) == [0, 0, 0]
    owners = assign_shards([10] + [1] * 10, 3)
    assert owners[0] == 0 and set(owners[1:]) == {1, 2}  # the big shard alone on process 0


def _inputs(root: Path) -> list[str]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = {f"layers.{i}.w": (96, 64) for i in range(6)} | {"embed": (200, 64), "norm": (64,)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    paths = []
    for i in range(4):
        tensors = base if i == 0 else {n: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for n, x in base.items()}
        path = root / f"m{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "model.safetensors"))
        paths.append(str(path))
    return paths


def _merge(inputs, out, *extra):
    return [sys.executable, "-m", "jaxmerge", "merge", *inputs[1:], "--base", inputs[0], "--method", "dare_ties",
            "--density", "0.3", "--seed", "4", "--max-shard-size", "60KB", "--output", str(out), "--quiet", *extra]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "jaxmerge_recipe.json"}


@pytest.mark.slow
def test_two_processes_write_the_one_process_output(tmp_path):
    inputs = _inputs(tmp_path / "in")
    # Same output name in two directories: the model card names the output.
    single = subprocess.run(_merge(inputs, tmp_path / "one" / "merged"), capture_output=True, text=True, env=ENV, timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = [
        subprocess.Popen(
            _merge(inputs, tmp_path / "two" / "merged", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    one, two = _files(tmp_path / "one" / "merged"), _files(tmp_path / "two" / "merged")
    assert len([n for n in one if n.endswith(".safetensors")]) >= 4  # several shards: both processes had work
    assert one == two
    assert not [p for p in (tmp_path / "two").iterdir() if "jaxmerge-tmp" in p.name]


@pytest.mark.slow
def test_a_failing_process_leaves_no_output_and_both_say_so(tmp_path):
    inputs = _inputs(tmp_path / "in")
    # Process 1 is given a bad density: it stops while planning, and process 0, waiting for its vote, stops too.
    port = _free_port()
    good = _merge(inputs, tmp_path / "out", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0")
    bad = _merge(inputs, tmp_path / "out", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1")
    bad[bad.index("--density") + 1] = "-1"  # a bad value: process 1 stops before any work
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for cmd in (good, bad)]
    results = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == 2 and "density" in results[1][1]
    assert procs[0].returncode == 2 and "another merging process" in results[0][1] and "nothing was written" in results[0][1], results[0][1][-2000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "jaxmerge-tmp" in p.name]
