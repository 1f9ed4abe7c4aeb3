"""Reading a tensor into fresh memory: NumPy's allocation against `aligned_empty`'s memory map.

    python -m benchmarks.fresh_buffers [--mb 262] [--rounds 7] [--gap 3] [--dir D]

A merge reads each tensor's inputs into a host buffer (`_Arenas` in
`jaxmerge.engine.stream`); the first tensors touch that memory for the first
time. Each round, in fresh child processes taking turns, reads one file of
`--mb` MB (in the page cache: the cost measured is the memory's, not the
disk's) into

* numpy: `np.empty`, which asks the kernel for transparent huge pages
  (madvise) on arrays from 4 MB (jaxmerge's buffers before 2026-12-06);
* mapped: `jaxmerge.formats.safetensors_io.aligned_empty`, an anonymous map
  populated in one call, in 4 KB pages,

then reads it again into the same, now touched, buffer. The default size is
a TinyLlama-shaped bfloat16 model's embedding and output matrix pair, the
largest inputs a two-model merge of it holds at once. `--gap` seconds pass
before each child, as between merge commands (this VM's host takes freed
memory back after a few seconds). The bytes read are compared.

Results go to benchmarks/results/fresh_buffers.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KINDS = ("numpy", "mapped")


def read_once(path: Path, kind: str) -> tuple[float, float, str]:
    """(seconds into fresh memory, seconds into the same memory again, digest) in this process."""
    import hashlib

    from jaxmerge.formats.safetensors_io import aligned_empty

    nbytes = path.stat().st_size

    def read_into(buf: np.ndarray) -> None:
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(buf), 0
            while done < nbytes:
                done += f.readinto(view[done:])

    start = time.perf_counter()
    buf = np.empty(nbytes, np.uint8) if kind == "numpy" else aligned_empty(nbytes)
    read_into(buf)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    read_into(buf)
    again = time.perf_counter() - start
    return fresh, again, hashlib.sha1(buf[:: 4096].tobytes()).hexdigest()


def run(nbytes: int = 262 << 20, rounds: int = 7, gap: float = 3.0, directory: str | None = None) -> dict:
    """Alternate the two kinds of buffer in child processes; medians and every round's seconds."""
    fresh: dict[str, list[float]] = {k: [] for k in KINDS}
    again: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "tensors.bin"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
        digests = set()
        for _ in range(rounds):
            for kind in KINDS:
                time.sleep(gap)
                code = ("from pathlib import Path; from benchmarks.fresh_buffers import read_once; "
                        f"print(*read_once(Path({str(path)!r}), {kind!r}))")
                out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.split()
                fresh[kind].append(float(out[0]))
                again[kind].append(float(out[1]))
                digests.add(out[2])
        if len(digests) != 1:
            raise SystemExit("the buffers read different bytes")
    return {
        "mb": nbytes / (1 << 20), "rounds": rounds, "gap_s": gap,
        "median_fresh_s": {k: float(np.median(v)) for k, v in fresh.items()},
        "median_again_s": {k: float(np.median(v)) for k, v in again.items()},
        "fresh_s": fresh, "again_s": again,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=262)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gap", type=float, default=3.0, help="seconds before each child (default 3)")
    parser.add_argument("--dir", default=None, help="where to put the file read (default: the temp dir)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fresh_buffers.json"))
    args = parser.parse_args(argv)
    from benchmarks.vs_mergekit import machine_line

    result = run(int(args.mb * (1 << 20)), args.rounds, args.gap, args.dir)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
              "command": "python -m benchmarks.fresh_buffers " + " ".join(argv if argv is not None else sys.argv[1:]),
              **result}
    f, a = result["median_fresh_s"], result["median_again_s"]
    print(f"{result['mb']:.0f} MB, medians of {args.rounds} alternating rounds: fresh numpy {f['numpy']:.3f} s, "
          f"mapped {f['mapped']:.3f} s ({f['numpy'] / f['mapped']:.1f}x); again numpy {a['numpy']:.3f} s, "
          f"mapped {a['mapped']:.3f} s")
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
