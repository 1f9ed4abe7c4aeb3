"""Peak memory of a streamed Orbax merge against restoring the checkpoints whole.

    python -m benchmarks.orbax_memory [--gb 1] [--dir /tmp/jaxmerge-orbax-bench]

Writes 3 synthetic float32 Orbax checkpoints of about `--gb` GB each (16 leaves,
nested like a Flax NNX state: `layer{i}/kernel/value`), then runs, each in its
own child process, and reports the child's peak RSS (`os.wait4` ru_maxrss) and
wall time:

* streamed: `jaxmerge.engine.orbax.merge_orbax` with ties (density 0.2);
* restore: `StandardCheckpointer().restore` of the three checkpoints whole,
  nothing else (the least a merge that loads whole models needs);
* in memory: restore whole, `jaxmerge.merge_params` (ties, density 0.2), save
  with `StandardCheckpointer`: what a JAX user does without `merge_orbax`.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TENSORS = 16
COLS = 4096


def make_inputs(root: Path, gb: float, count: int = 3) -> list[Path]:
    import orbax.checkpoint as ocp

    rows = int(gb * 1e9 / 4 / TENSORS / COLS)
    paths = []
    for i in range(count):
        path = root / f"model{i}"
        if not path.exists():
            rng = np.random.default_rng(i)
            tree = {
                f"layer{t}": {"kernel": {"value": rng.standard_normal((rows, COLS), dtype=np.float32)}}
                for t in range(TENSORS)
            }
            ckpt = ocp.StandardCheckpointer()
            ckpt.save(path.absolute(), tree)
            ckpt.wait_until_finished()  # the save is asynchronous
            del tree
        paths.append(path)
    return paths


def _child(mode: str, root: Path, gb: float) -> None:
    if mode == "make":
        make_inputs(root, gb)
        return
    import jax
    import orbax.checkpoint as ocp

    inputs = [(root / f"model{i}").absolute() for i in range(3)]
    out = (root / "merged").absolute()
    if mode == "streamed":
        from jaxmerge.engine.orbax import merge_orbax

        merge_orbax(inputs, out, method="ties", density=0.2)
        return
    ckpt = ocp.StandardCheckpointer()
    trees = [ckpt.restore(p) for p in inputs]
    jax.block_until_ready(trees)
    if mode == "in_memory":
        from jaxmerge import merge_params

        merged = merge_params(trees, method="ties", density=0.2)
        ckpt.save(out, merged)
        ckpt.wait_until_finished()


def _run(mode: str, root: Path, gb: float) -> tuple[float, int]:
    shutil.rmtree(root / "merged", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.orbax_memory", "--child", mode, "--dir", str(root), "--gb", str(gb)]
    )
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KB on Linux)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{mode} failed with exit code {code}")
    return time.perf_counter() - start, usage.ru_maxrss * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of each input checkpoint (default 1)")
    parser.add_argument(
        "--dir", default="/tmp/jaxmerge-orbax-bench", help="scratch directory (needs ~4.5x --gb of disk)"
    )
    parser.add_argument("--child", choices=["make", "streamed", "restore", "in_memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.child:
        _child(args.child, root, args.gb)
        return 0
    root.mkdir(parents=True, exist_ok=True)
    # In a child too: Linux counts the parent's resident pages at fork in a child's ru_maxrss,
    # so this process must stay small (no JAX, no arrays).
    _run("make", root, args.gb)
    inputs = [root / f"model{i}" for i in range(3)]
    size = sum(f.stat().st_size for f in inputs[0].rglob("*") if f.is_file())
    largest = size / TENSORS
    print(
        f"3 Orbax checkpoints of {size / 1e9:.2f} GB ({TENSORS} float32 leaves of {largest / 1e6:.0f} MB),"
        " ties density 0.2"
    )
    for mode in ("streamed", "restore", "in_memory"):
        wall, peak = _run(mode, root, args.gb)
        ratio = peak / largest
        print(f"{mode:<10} peak RSS {peak / 1e9:6.2f} GB ({ratio:5.1f} x largest leaf)  wall {wall:6.1f} s")
    shutil.rmtree(root / "merged", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
