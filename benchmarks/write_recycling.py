"""Writing a merged checkpoint with and without recycling its page cache (`ShardWriter`).

    python -m benchmarks.write_recycling [--tensor-mb 125] [--tensors 5] [--rounds 5] [--gap 3] [--dir D]

Each round writes the same safetensors file (`--tensors` float32 tensors of
`--tensor-mb` MB: the default is about a Llama-shaped 0.64 GB checkpoint's
size) twice, each time in a fresh child process, taking turns:

* keep: every written page stays in the page cache (`recycle_lag=-1`,
  jaxmerge's writer before 2026-12-03);
* recycle: the pages of pieces 32 MB behind, once on disk, are dropped from the page cache
  (the default), so the next pieces reuse their pages.

The time is the writer's, header to `fsync` at `close`. `--gap` seconds pass
before each child: on a VM whose host takes freed guest memory back after a
few seconds (this project's test machine), a merge command starts with cold
memory, and the gap reproduces that. The two files are compared byte for byte.

Results go to benchmarks/results/write_recycling.json and stdout.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = {"keep": -1, "recycle": None}


def write_once(path: Path, mode: str, tensor_bytes: int, tensors: int) -> float:
    """Write the file in this process; return the writer's seconds (header to fsync)."""
    from jaxmerge.formats.safetensors_io import ShardWriter, TensorInfo

    data = np.arange(tensor_bytes // 4, dtype=np.float32)  # touched before the clock starts, like a merge result
    infos = [TensorInfo(f"t{i}", data.shape, "F32") for i in range(tensors)]
    start = time.perf_counter()
    writer = ShardWriter(path, infos, {"format": "pt"}, recycle_lag=MODES[mode])
    for info in infos:
        writer.write(info.name, data)
    writer.close()
    return time.perf_counter() - start


def run(tensor_bytes: int = 125 << 20, tensors: int = 5, rounds: int = 5, gap: float = 3.0,
        directory: str | None = None) -> dict:
    """Alternate the two modes in child processes; medians and every round's seconds.

    `directory` (default: the system's temporary one) must be on a disk, not tmpfs, to measure anything.
    """
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        paths = {mode: Path(tmp) / f"{mode}.safetensors" for mode in MODES}
        for round_ in range(rounds):
            for mode in MODES:
                time.sleep(gap)
                code = ("from pathlib import Path; from benchmarks.write_recycling import write_once; "
                        f"print(write_once(Path({str(paths[mode])!r}), {mode!r}, {tensor_bytes}, {tensors}))")
                out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                     check=True)
                seconds[mode].append(float(out.stdout.split()[-1]))
                if round_ < rounds - 1:
                    # Like a merge command's output, nothing of it is freed when the next one starts writing
                    # (rewriting the same file would hand the old file's pages to the new one).
                    paths[mode].unlink()
        if not filecmp.cmp(paths["keep"], paths["recycle"], shallow=False):
            raise SystemExit("the two writers' files differ")
    return {
        "file_gb": tensors * tensor_bytes / 1e9, "rounds": rounds, "gap_s": gap,
        "median_s": {mode: float(np.median(s)) for mode, s in seconds.items()}, "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-mb", type=float, default=125)
    parser.add_argument("--tensors", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap", type=float, default=3.0, help="seconds before each child (default 3)")
    parser.add_argument("--dir", default=None, help="where to write (a disk, not tmpfs; default: the temp dir)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "write_recycling.json"))
    args = parser.parse_args(argv)
    result = run(int(args.tensor_mb * (1 << 20)) // 4 * 4, args.tensors, args.rounds, args.gap, args.dir)
    keep, recycle = result["median_s"]["keep"], result["median_s"]["recycle"]
    print(f"{result['file_gb']:.2f} GB file, medians of {args.rounds} alternating rounds: "
          f"keep {keep:.2f} s, recycle {recycle:.2f} s ({keep / recycle:.1f}x)")
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
