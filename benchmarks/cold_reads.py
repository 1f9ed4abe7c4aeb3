"""A merge whose inputs are not in memory: reading ahead (`jaxmerge.engine._prefetch`) against not.

    python -m benchmarks.cold_reads --recipe R.yml [--rounds 3] [--output F.json]

The first merge of models that do not all fit in memory reads them from disk.
Before every timed run each input file is dropped from the page cache
(`posix_fadvise(POSIX_FADV_DONTNEED)`, which needs no privilege for files
nobody is writing; `mincore`, which reads nothing, confirms it), then `jaxmerge merge`
runs with reading ahead (the default) and without it
(`JAXMERGE_READ_AHEAD_BYTES=0`, the merge as it was before), taking turns, with
the compilation cache warm (one run fills it first). The I/O floor
(`benchmarks.floor`: read every input once, write one output) is measured from
a cold cache the same way. Python, JAX and the compiled kernels stay in memory:
only the models are cold, as after a download that did not fit.

Results go to `--output` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.floor import io_floor_in_child
from benchmarks.vs_mergekit import (REPO, cache_env, jaxmerge_cmd, machine_line, recipe_models, remove_output,
                                    run_child, weight_files)

VARIANTS = {"read ahead": {}, "no read-ahead": {"JAXMERGE_READ_AHEAD_BYTES": "0"}}


def _readahead():
    """`jaxmerge.formats._readahead` loaded from its file: importing it through the package would bring
    JAX into this parent process, whose benchmarks' children must not inherit it."""
    spec = importlib.util.spec_from_file_location("_cold_reads_readahead",
                                                  REPO / "jaxmerge" / "formats" / "_readahead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evict(files: list[Path]) -> float:
    """Drop `files` from the page cache; returns the largest fraction of a file still cached (`mincore`,
    which reads nothing: probing by non-blocking reads would start reading the pages it finds missing)."""
    readahead = _readahead()
    worst = 0.0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        fraction = readahead.cached_fraction(path)
        if fraction is None:
            raise SystemExit(f"{path}: cannot tell which of its pages are cached (no mincore, or a file this "
                             "user neither owns nor may write)")
        worst = max(worst, fraction)
    return worst


def run(recipe: Path, rounds: int, work: Path) -> dict:
    files = [f for model in recipe_models(recipe) for f in weight_files(model)]
    env = cache_env(work / "cache")
    out = work / "out"
    run_child(jaxmerge_cmd(recipe, out), env)  # fills the compilation cache
    seconds: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "I/O floor"]}
    still_cached = []
    for _ in range(rounds):
        for name, extra in VARIANTS.items():
            remove_output(out)
            still_cached.append(evict(files))
            seconds[name].append(run_child(jaxmerge_cmd(recipe, out), {**env, **extra})[0])
        remove_output(out)
        still_cached.append(evict(files))
        seconds["I/O floor"].append(io_floor_in_child(files, work / "floor.bin"))
    remove_output(out)
    medians = {k: float(np.median(v)) for k, v in seconds.items()}
    return {
        "recipe": str(recipe), "inputs_gb": sum(f.stat().st_size for f in files) / 1e9, "rounds": rounds,
        "median_s": medians, "seconds": seconds,
        "speed_up": medians["no read-ahead"] / medians["read ahead"],
        "x_floor": {k: medians[k] / medians["I/O floor"] for k in VARIANTS},
        "most_still_cached_after_evicting": max(still_cached),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, type=Path, help="a mergekit recipe of safetensors models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the outputs and the compilation cache go (default: temp)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cold_reads.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = run(args.recipe.resolve(), args.rounds, Path(tmp))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
              "command": "python -m benchmarks.cold_reads " + " ".join(argv if argv is not None else sys.argv[1:]),
              **result}
    m = result["median_s"]
    print(f"{result['inputs_gb']:.1f} GB of inputs out of the page cache, medians of {args.rounds} alternating rounds: "
          f"read ahead {m['read ahead']:.2f} s, without {m['no read-ahead']:.2f} s ({result['speed_up']:.2f}x), "
          f"I/O floor {m['I/O floor']:.2f} s")
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
