"""One merging process against two on this host: `jaxmerge merge` over JAX's distributed runtime.

    python -m benchmarks.processes [--size llama] [--dtype float32] [--method ties]
                                   [--rounds 3] [--max-shard-size 200MB]

Builds the Llama-shaped models of `benchmarks.vs_mergekit` (a base and three
fine-tunes), writes its recipe, and runs, taking turns round by round:

* `jaxmerge merge` alone;
* the same command in two processes on 127.0.0.1 (`--coordinator`,
  `--num-processes 2`, `--process-id`), each merging and writing its share
  of the output shards (`jaxmerge.engine.distributed`).

Both use one persistent compilation cache, warmed before the rounds, so the
figures compare the merging itself rather than compilation (every process of
a group compiles the kernels of its own shards). The wall of the group is
from starting the first process to the last one's exit; peak RSS is each
process's own (os.wait4). The two outputs are compared byte for byte.

On one host the processes share its cores and disk: this measures the
overhead of the group (joining the runtime, planning in every process,
coordinating the output) and any gain from merging in parallel. Across hosts
each process brings its own cores and disks.

Results go to benchmarks/results/processes.json and stdout.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.vs_mergekit import SIZES, build_models, cache_env, machine_line, run_group, write_recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_cmd(recipe: Path, out: Path, shard_size: str, *group: str) -> list[str]:
    return [sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(out), "--force", "--quiet",
            "--max-shard-size", shard_size, *group]


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors*"))
    return names == sorted(p.name for p in b.glob("*.safetensors*")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-shard-size", default="200MB", help="at least two shards are needed for two processes")
    parser.add_argument("--dir", default="/tmp/jaxmerge-vs-mergekit")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/processes.json)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, models = build_models(root, args.size, args.dtype)
    recipe = root / f"{args.size}-{args.dtype}-{args.method}.yml"
    write_recipe(recipe, args.method, base, models, args.dtype)
    cache = Path(tempfile.mkdtemp(prefix="jaxmerge-cc-"))
    env = {**cache_env(cache), "JAX_PLATFORMS": "cpu"}
    one_out, two_out = root / "out-one-process", root / "out-two-processes"

    def one() -> tuple[float, list[float]]:
        return run_group([merge_cmd(recipe, one_out, args.max_shard_size)], env)

    def two() -> tuple[float, list[float]]:
        group = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
        return run_group(
            [merge_cmd(recipe, two_out, args.max_shard_size, *group, "--process-id", str(i)) for i in range(2)], env
        )

    one(), two()  # warm the compilation cache (both groups' kernels) and the page cache
    walls = {"one": [], "two": []}
    peaks = {"one": [], "two": []}
    for _ in range(args.rounds):
        for name, run in (("one", one), ("two", two)):
            wall, peak = run()
            walls[name].append(wall)
            peaks[name].append(peak)
    identical = same_output(one_out, two_out)
    shutil.rmtree(cache, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in walls.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
        "size": args.size, "dtype": args.dtype, "method": args.method, "rounds": args.rounds,
        "max_shard_size": args.max_shard_size, "shards": len(list(one_out.glob("*.safetensors"))),
        "walls_s": walls, "peaks_gb": peaks, "medians_s": med, "two_over_one": med["two"] / med["one"],
        "identical_output": identical, "load_after": os.getloadavg(),
    }
    out = Path(args.output or Path(__file__).parent / "results" / "processes.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{args.size} {args.dtype} {args.method}, {result['shards']} shards: one process {med['one']:.2f} s "
        f"(peak {max(peaks['one'][0]):.2f} GB), two processes {med['two']:.2f} s "
        f"(peaks {' / '.join(f'{p:.2f}' for p in peaks['two'][0])} GB): {result['two_over_one']:.2f}x the wall; "
        f"outputs identical: {identical}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
