"""Read a byte range of a file into a buffer, in pieces read by several threads at once.

One thread copies the page cache into a merge's input buffer at ~8.6 GB/s on
the 2-core VM, two threads reading halves at once at ~12.5 GB/s (the four
TinyLlama-shaped bfloat16 checkpoints of a ties merge, 8.8 GB in 22 MB ranges,
medians of 7 alternating rounds: 1.02 s against 0.70 s;
`python -m benchmarks.parallel_reads`). In a cached ties merge of them the
read phase went from 1.82-1.83 s to 1.28-1.55 s (the kernels between the
reads leave the copies slower than alone). Positioned reads (`os.preadv`)
release the GIL and share one descriptor; where the platform has none
(Windows), one thread reads with `readinto`. The helper threads are one
shared pool, made again in a forked child (which has none of its parent's
threads).
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIN_PIECE = 2 << 20  # bytes: a smaller piece is read by the calling thread with the rest
_PAGE = 4096  # pieces start on page boundaries of the buffer

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def reading_threads() -> int:
    """Threads that read one range at once: the cores this process may use, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def pieces(nbytes: int, threads: int) -> list[tuple[int, int]]:
    """Split `nbytes` into at most `threads` (start, end) ranges of at least `MIN_PIECE` bytes.

    Args:
      nbytes: the size of the range.
      threads: the most pieces.

    Returns:
      Contiguous ranges covering [0, nbytes) in order; every start but the
      first is a multiple of the page size. One range when `nbytes` is small.
    """
    count = max(1, min(threads, nbytes // MIN_PIECE))
    step = -(-nbytes // count // _PAGE) * _PAGE
    bounds = [min(nbytes, i * step) for i in range(count)] + [nbytes]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, nbytes)]


def read_into(path: str | os.PathLike, offset: int, view: memoryview, threads: int | None = None) -> None:
    """Fill `view` with the `len(view)` bytes of `path` that start at `offset`.

    Args:
      path: the file.
      offset: the byte offset of the range in the file.
      view: a writable contiguous byte buffer (`memoryview` of a uint8 array).
      threads: the most threads reading it at once (default `reading_threads()`).

    Raises:
      OSError: the file cannot be read, or ends before the range does (EIO).
    """
    view = view.cast("B")
    if not hasattr(os, "preadv"):
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            _fill(lambda at, into: f.readinto(into), offset, view)
        return
    fd = os.open(path, os.O_RDONLY)
    futures = []
    try:
        ranges = pieces(len(view), threads or reading_threads())
        futures = [_readers().submit(_pread, fd, offset + a, view[a:b]) for a, b in ranges[1:]]
        a, b = ranges[0]
        _pread(fd, offset + a, view[a:b])
        for future in futures:
            future.result()
    finally:
        # No piece may still read when the descriptor is closed (its number could be reused).
        for future in futures:
            future.exception()
        os.close(fd)


def _pread(fd: int, offset: int, view: memoryview) -> None:
    _fill(lambda at, into: os.preadv(fd, [into], at), offset, view)


def _fill(read, offset: int, view: memoryview) -> None:
    """Call `read(file_offset, into)` until `view` is full; a read of 0 bytes means the file ended."""
    done = 0
    while done < len(view):
        got = read(offset + done, view[done:])
        if not got:
            raise OSError(errno.EIO, f"unexpected end of file after {offset + done} bytes")
        done += got


def _readers() -> ThreadPoolExecutor:
    """The shared pool of helper reading threads (created on first use, sized for this machine)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, reading_threads() - 1), thread_name_prefix="jaxmerge-read")
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child has none of the parent's threads: its pool would queue pieces nobody reads.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
