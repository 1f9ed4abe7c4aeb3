"""The I/O floor of a merge: read every input once, write one output-sized file, fsync included.

A merge cannot do less I/O than this. The output is written the way
`jaxmerge merge` writes its shards (`jaxmerge.formats.safetensors_io.StreamedFile`:
write-back as it goes, pages recycled) and the inputs are read the way it reads
them (`jaxmerge.formats._pread.read_into`), so the floor is not slower than the
reader and writer it bounds. `io_floor_in_child` runs it in a child process: the
benchmarks' parents stay free of JAX, whose memory a later child's peak RSS
would otherwise count (a child's ru_maxrss starts from its parent's at fork).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def io_floor(inputs: list[Path], out: Path, out_bytes: int | None = None, read_bytes: int | None = None,
             threads: int | None = None) -> float:
    """Seconds to read `inputs` once and write `out_bytes` of them to `out` (then removed).

    Args:
      inputs: the files a merge reads.
      out: a path for the output-sized file.
      out_bytes: its size (default: the first input's, a merge's output); larger than the first input
        (a mixture of experts is larger than each model), the inputs' bytes are written in turn.
      read_bytes: how much of the inputs, in order, the tool must read (default all; a mixture of
        experts reads only each expert's MLP tensors and the base's others: as many bytes as it writes).
      threads: reading threads (default: as many as jaxmerge reads with; 1: the floor as measured before
        jaxmerge read in parallel, for comparisons with earlier results).

    One reused 64 MB buffer: no allocation per block, so this is the I/O alone
    (page-cache copies and the disk's write-back), not Python's allocator. Read
    as `jaxmerge merge` reads its inputs (`jaxmerge.formats._pread.read_into`:
    large ranges in pieces read by several threads at once), so that the floor
    is not slower than the reader it bounds either.
    """
    from jaxmerge.formats import _pread
    from jaxmerge.formats.safetensors_io import StreamedFile

    def read_range(path, offset, view):
        _pread.read_into(path, offset, view, threads)

    buf = bytearray(64 << 20)
    view = memoryview(buf)
    target = Path(inputs[0]).stat().st_size if out_bytes is None else int(out_bytes)
    total = sum(Path(p).stat().st_size for p in inputs)
    if target > 0 and total == 0:
        raise ValueError(f"io_floor: the inputs are empty, nothing to write {target} bytes from")
    start = time.perf_counter()
    read_files(inputs, view, total if read_bytes is None else int(read_bytes), read_range=read_range)
    dst = StreamedFile(out)
    written = 0
    try:
        for path in itertools.cycle(inputs):
            size, at = Path(path).stat().st_size, 0
            while written < target and at < size:
                n = min(len(view), size - at, target - written)
                read_range(path, at, view[:n])
                dst.write(view[:n])
                at, written = at + n, written + n
            if written >= target:
                break
    except BaseException:
        dst.abort()
        Path(out).unlink(missing_ok=True)
        raise
    dst.close()
    elapsed = time.perf_counter() - start
    Path(out).unlink()
    return elapsed


def read_files(paths: list[Path], view: memoryview, limit: int | None = None, read_range=None) -> int:
    """Read `paths` in order (at most `limit` bytes in all) into the reused buffer `view`; returns the bytes read.

    `read_range(path, offset, view)` fills `view` from `offset` on (default: one thread's `readinto`;
    `io_floor` passes jaxmerge's reader, which a parent process that must stay free of JAX cannot import).
    """
    read_range = read_range or _readinto
    to_read = sum(Path(p).stat().st_size for p in paths) if limit is None else limit
    done = 0
    for path in paths:
        size, at = Path(path).stat().st_size, 0
        while done < to_read and at < size:
            n = min(len(view), size - at, to_read - done)
            read_range(path, at, view[:n])
            at, done = at + n, done + n
    return done


def _readinto(path: Path, offset: int, view: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while len(view) and (n := f.readinto(view)):
            view = view[n:]


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file once, so that the next timed run finds them in the page cache.

    A run that needs more memory than the page cache leaves free (mergekit's ~12 GB on the
    1.1B-shaped models, on a 24 GB machine) evicts the inputs, and the tool timed after it
    reads them from disk: twice the read time in one measured round. Returns the bytes read.
    """
    return read_files(paths, memoryview(bytearray(64 << 20)))


def io_floor_in_child(inputs: list[Path], out: Path, out_bytes: int | None = None,
                      read_bytes: int | None = None, threads: int | None = None) -> float:
    """`io_floor` in a fresh Python process (see the module's docstring)."""
    code = ("import json, sys; from pathlib import Path; from benchmarks.floor import io_floor; "
            "args = json.loads(sys.argv[1]); print(io_floor([Path(p) for p in args[0]], Path(args[1]), *args[2:]))")
    arg = json.dumps([[str(p) for p in inputs], str(out), out_bytes, read_bytes, threads])
    done = subprocess.run([sys.executable, "-c", code, arg], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the I/O floor's process failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])
