"""Ask the OS to read byte ranges of a file into its page cache ahead of time, without waiting.

A merge whose inputs are not in the page cache (the first merge of models
that do not all fit in memory) otherwise reads each tensor only when its turn
comes, with the disk idle while the tensor before it merges and is written.
`advise` hands a range to the kernel (`posix_fadvise(POSIX_FADV_WILLNEED)`),
which reads it in the background by DMA: no copy, and no thread of ours waits
for the disk. The kernel reads at most `max(read_ahead_kb, max_sectors_kb)`
of the device per call (measured: the first 8 MB of a 512 MB request on this
VM), so ranges are advised in pieces of 128 KiB, Linux's default
`read_ahead_kb`, which nearly every device reads whole.

`cached_fraction` tells how much of a file is in memory already (`mincore` on
a mapping of it, which reads nothing), so that a merge of cached inputs
advises nothing. A non-blocking one-byte read (`preadv(..., RWF_NOWAIT)`)
would not do: where the page is missing it starts reading it and the
readahead window after it, so probing changes what it measures (probes every
8 MB slowed a cold TinyLlama-shaped ties merge from 12.7 s to 15.0 s, and
after 64 probes per file a second look found much of each file cached).
Since Linux 5.0 `mincore` tells the truth about a file only to a process that
owns it or may write it (to others every page looks cached); elsewhere the
answer is "cannot tell" and the file is advised.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Bytes per advice: Linux's default read_ahead_kb. A device whose read_ahead_kb and max_sectors_kb are
# both lower (some USB and MMC ones) reads only that much of each piece: less read ahead, nothing wrong.
PIECE = 128 << 10
SAMPLES = 64  # windows of pages `cached_fraction` looks at
_WINDOW_PAGES = 16


def supported() -> bool:
    """This platform can advise ranges (`posix_fadvise(POSIX_FADV_WILLNEED)`)."""
    return hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")


@functools.lru_cache(maxsize=None)
def _libc():
    """libc's mmap, mincore and munmap through ctypes, or None where they cannot be had."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        functions = (libc.mmap, libc.mincore, libc.munmap)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    mmap_, mincore, munmap = functions
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    mincore.restype = ctypes.c_int
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    munmap.restype = ctypes.c_int
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return mmap_, mincore, munmap


def _mincore_tells(path: Path, st: os.stat_result) -> bool:
    """`mincore` reports the truth about this file to this process. Since Linux 5.0 it reports every page
    of a file mapping as cached unless the caller owns the file or may write it (root may)."""
    return st.st_uid == os.geteuid() or os.access(path, os.W_OK)


def cached_fraction(path: str | os.PathLike, samples: int = SAMPLES) -> float | None:
    """The fraction of the file's pages in the page cache, by `mincore` (nothing is read): every page
    of a file of at most `samples` x 16 pages, else `samples` windows of 16 pages spread over it.

    Args:
      path: the file.
      samples: windows looked at (each `mincore` walks only its window's pages: ~0.7 ms per 2.2 GB file
        for 64 windows, against ~45 ms for all of its pages, measured).

    Returns:
      A fraction in [0, 1] (1 for an empty file); None where the OS cannot tell (no `mincore`, a file
      this process neither owns nor may write, one larger than the address space).

    Raises:
      OSError: the file cannot be opened.
    """
    path = Path(path)
    functions = _libc()
    if functions is None or not hasattr(mmap, "PROT_READ"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if not _mincore_tells(path, st) or size > sys.maxsize:
            return None
        if size == 0:
            return 1.0
        return _resident(fd, size, samples, functions)
    finally:
        os.close(fd)


def _resident(fd: int, size: int, samples: int, functions) -> float | None:
    mmap_, mincore, munmap = functions
    page = mmap.PAGESIZE
    pages = -(-size // page)
    address = mmap_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)  # address space only: nothing is read
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        if pages <= samples * _WINDOW_PAGES:
            windows = [(0, pages)]
        else:
            starts = np.linspace(0, pages - _WINDOW_PAGES, samples).astype(np.int64)
            windows = [(int(first), _WINDOW_PAGES) for first in starts]
        vector = np.zeros(max(count for _, count in windows), np.uint8)
        resident = looked = 0
        for first, count in windows:
            length = min(count * page, size - first * page)
            if mincore(address + first * page, length, vector.ctypes.data) != 0:
                return None
            resident += int(np.count_nonzero(vector[:count] & 1))
            looked += count
    finally:
        munmap(address, size)
    return resident / looked


def advise(fd: int, offset: int, nbytes: int, stop: Callable[[], bool] | None = None) -> None:
    """Ask the kernel to read `nbytes` of `fd` from `offset` into the page cache in the background.

    Args:
      fd: a descriptor open for reading.
      offset, nbytes: the byte range.
      stop: optional, asked before each piece: True ends the advice there (a call may wait while the
        device's queue is full, so a large range takes as long as the disk needs to take it in).

    Raises:
      OSError: the kernel refused the advice (the caller stops advising).
    """
    for piece in range(offset, offset + nbytes, PIECE):
        if stop is not None and stop():
            return
        os.posix_fadvise(fd, piece, min(PIECE, offset + nbytes - piece), os.POSIX_FADV_WILLNEED)
