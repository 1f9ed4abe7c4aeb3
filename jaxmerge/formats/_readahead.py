"""Ask the OS to read byte ranges of a file into its page cache ahead of time, without waiting.

A merge whose inputs are not in the page cache (the first merge of models
that do not all fit in memory) otherwise reads each tensor only when its turn
comes, with the disk idle while the tensor before it merges and is written.
`advise` hands a range to the kernel (`posix_fadvise(POSIX_FADV_WILLNEED)`),
which reads it in the background by DMA: no copy, and no thread of ours waits
for the disk. The kernel reads at most `max(read_ahead_kb, max_sectors_kb)`
of the device per call (measured: the first 8 MB of a 512 MB request on this
VM), so ranges are advised in pieces of 128 KiB, Linux's default
`read_ahead_kb`, which every device reads whole.

`cached_fraction` tells how much of a file is in memory already (`mincore` on
a mapping of it, which reads nothing), so that a merge of cached inputs
advises nothing. A non-blocking one-byte read (`preadv(..., RWF_NOWAIT)`)
would not do: where the page is missing it starts reading it and the
readahead window after it, so probing changes what it measures (probes every
8 MB slowed a cold TinyLlama-shaped ties merge from 12.7 s to 15.0 s, and
after 64 probes per file a second look found much of each file cached).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

import numpy as np

PIECE = 128 << 10  # bytes per advice: every Linux device reads at least this much per call
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
    except (OSError, AttributeError):
        return None
    mmap_, mincore, munmap = functions
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    mincore.restype = ctypes.c_int
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    munmap.restype = ctypes.c_int
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return mmap_, mincore, munmap


def cached_fraction(fd: int, size: int, samples: int = SAMPLES) -> float | None:
    """The fraction of the file's pages in the page cache, from `mincore` on `samples` windows of 16 pages
    spread over it (all of it when smaller); nothing is read.

    Args:
      fd: a descriptor open for reading.
      size: the file's size in bytes.
      samples: windows looked at (each `mincore` walks only its window's pages: ~0.5 ms in all for 64
        windows, against ~45 ms for every page of a 2.2 GB file, measured).

    Returns:
      A fraction in [0, 1] (1 for an empty file); None where the OS cannot tell.
    """
    functions = _libc()
    if functions is None or not hasattr(mmap, "PROT_READ"):
        return None
    if size == 0:
        return 1.0
    mmap_, mincore, munmap = functions
    page = mmap.PAGESIZE
    pages = -(-size // page)
    address = mmap_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)  # address space only: nothing is read
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        window = min(pages, _WINDOW_PAGES)
        starts = sorted({int(i) for i in np.linspace(0, pages - window, max(1, min(samples, pages // window)))})
        vector = np.zeros(window, np.uint8)
        resident = 0
        for first in starts:
            if mincore(address + first * page, min(window * page, size - first * page), vector.ctypes.data) != 0:
                return None
            resident += int(np.count_nonzero(vector & 1))
    finally:
        munmap(address, size)
    return resident / (len(starts) * window)


def advise(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to read `nbytes` of `fd` from `offset` into the page cache in the background.

    Args:
      fd: a descriptor open for reading.
      offset, nbytes: the byte range.

    Raises:
      OSError: the kernel refused the advice (the caller stops advising).
    """
    for piece in range(offset, offset + nbytes, PIECE):
        os.posix_fadvise(fd, piece, min(PIECE, offset + nbytes - piece), os.POSIX_FADV_WILLNEED)
