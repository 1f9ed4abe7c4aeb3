"""Reading a merge's inputs with one thread against `jaxmerge.formats._pread`'s several.

    python -m benchmarks.parallel_reads [--files F ...] [--mb 512] [--range-mb 22] [--rounds 7]

A merge reads each tensor from every input into one reused buffer (the
arena of `jaxmerge.engine.stream`), the inputs one after the other. This
reads the files the same way: range by range (`--range-mb`, by default a
TinyLlama-shaped 5632 x 2048 bfloat16 matrix), each range of every file in
turn into its own part of one populated buffer, once with one thread and once with
`reading_threads()` threads (`read_into`), taking turns in one process with
the files in the page cache (the cost measured is the copy's, not the
disk's). Without `--files`, four files of `--mb` MB of random bytes are made
in `--dir`. The bytes read are compared.

Results go to benchmarks/results/parallel_reads.json and stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def read_all(files: list[Path], range_bytes: int, buf: np.ndarray, threads: int, digest=None) -> float:
    """Seconds of one pass over `files` with `threads` reading threads, file i's ranges into part i of
    `buf` (`len(files) * range_bytes`); `digest` (a hashlib object), when given, takes a sample of every
    range read (a pass that checks the bytes, not one to time)."""
    from jaxmerge.formats import _pread

    sizes = [f.stat().st_size for f in files]
    parts = [buf[i * range_bytes : (i + 1) * range_bytes] for i in range(len(files))]
    start = time.perf_counter()
    for offset in range(0, max(sizes), range_bytes):
        for file, size, part in zip(files, sizes, parts):
            n = min(range_bytes, size - offset)
            if n > 0:
                _pread.read_into(file, offset, memoryview(part)[:n], threads)
                if digest is not None:
                    digest.update(part[:n:4099].tobytes())
    return time.perf_counter() - start


def run(files: list[Path], range_bytes: int, rounds: int) -> dict:
    """Alternate one thread and the default number; medians and every round's seconds."""
    from jaxmerge.formats import _pread
    from jaxmerge.formats.safetensors_io import aligned_empty

    threads = {"one thread": 1, f"{_pread.reading_threads()} threads": _pread.reading_threads()}
    buf = aligned_empty(range_bytes * len(files))
    buf[:] = 0  # touched: the copies, not the first page faults
    seconds: dict[str, list[float]] = {k: [] for k in threads}
    digests = set()
    for count in threads.values():  # the bytes must agree (and the files are then in the page cache)
        digest = hashlib.sha1()
        read_all(files, range_bytes, buf, count, digest)
        digests.add(digest.hexdigest())
    if len(digests) != 1:
        raise SystemExit("the two ways read different bytes")
    for _ in range(rounds):
        for name, count in threads.items():
            seconds[name].append(read_all(files, range_bytes, buf, count))
    total = sum(f.stat().st_size for f in files)
    medians = {k: float(np.median(v)) for k, v in seconds.items()}
    return {
        "files": [str(f) for f in files], "gb": total / 1e9, "range_mb": range_bytes / (1 << 20), "rounds": rounds,
        "median_s": medians, "gb_per_s": {k: total / 1e9 / v for k, v in medians.items()}, "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", default=None, help="files to read (default: four made of random bytes)")
    parser.add_argument("--mb", type=float, default=512, help="size of each made file (default 512)")
    parser.add_argument("--range-mb", type=float, default=22, help="bytes read at once (default 22: 5632 x 2048 bf16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to make the files (default: the temp dir)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "parallel_reads.json"))
    args = parser.parse_args(argv)
    from benchmarks.vs_mergekit import machine_line

    range_bytes = int(args.range_mb * (1 << 20))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = [Path(f) for f in args.files or []]
        if not files:
            rng = np.random.default_rng(0)
            for i in range(4):
                files.append(Path(tmp) / f"input{i}.bin")
                files[-1].write_bytes(rng.integers(0, 256, int(args.mb * (1 << 20)), dtype=np.uint8).tobytes())
        result = run(files, range_bytes, args.rounds)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
              "command": "python -m benchmarks.parallel_reads " + " ".join(argv if argv is not None else sys.argv[1:]),
              **result}
    line = ", ".join(f"{k} {v:.3f} s ({result['gb_per_s'][k]:.1f} GB/s)" for k, v in result["median_s"].items())
    print(f"{result['gb']:.1f} GB in {result['range_mb']:.0f} MB ranges, medians of {args.rounds} alternating rounds: "
          f"{line}")
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
