"""Keep the disk busy while a streamed merge computes: advise the next tensors' inputs ahead of the reader.

`Prefetch(ranges)` runs one background thread over the items of a run in
their order and asks the kernel to read each item's byte ranges into the page
cache (`jaxmerge.formats._readahead.advise`), at most `read_ahead` bytes ahead of
the item the reader is on; the reader calls `reading(index)` as it starts
each item. Without it a merge whose inputs are not in memory reads each
tensor only when its turn comes, with the disk idle while the tensor before
merges and is written; on a 2-core machine the merge runs serially (threads
overlapping the stages slowed cached merges), and the disk needs no core.
Files nearly all in memory already (`CACHED`) are left alone, so a cached
merge pays a few `mincore` calls per file and nothing else.

Figures: `benchmarks/cold_reads.py` and the benchmarks page.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxmerge.formats import _readahead
from jaxmerge.formats.safetensors_io import CheckpointError

ByteRange = tuple[Path, int, int]  # (file, offset, bytes)
DEFAULT_READ_AHEAD = 1 << 30  # bytes ahead of the reader, at most a quarter of the memory available
CACHED = 0.99  # a file with this fraction of its pages in memory is left alone

_log = logging.getLogger(__name__)


def default_read_ahead() -> int:
    """Bytes to advise ahead of the reader: $JAXMERGE_READ_AHEAD_BYTES (0 turns prefetching off), else
    `DEFAULT_READ_AHEAD` or a quarter of the memory available, whichever is less (prefetched pages that
    the kernel must evict again before they are read would cost two reads)."""
    text = os.environ.get("JAXMERGE_READ_AHEAD_BYTES", "").strip()
    if text:
        try:
            read_ahead = int(text)
        except ValueError:
            read_ahead = -1
        if read_ahead < 0:
            raise CheckpointError(f"JAXMERGE_READ_AHEAD_BYTES must be a number of bytes >= 0, got {text!r}")
        return read_ahead
    available = _available_memory()
    return DEFAULT_READ_AHEAD if available is None else min(DEFAULT_READ_AHEAD, available // 4)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Prefetch:
    """A background thread that advises each item's byte ranges, at most `read_ahead` bytes ahead of the reader.

    Use as a context manager around the run; the reader calls `reading(i)` before it reads item i.
    Leaving the context stops the thread (within one piece of advice) and waits for it. Items are
    advised in order, from the one after the reader's; `read_ahead` counts from the start of the
    reader's item, and the next item is always allowed, whatever its size. Each file is open only
    while it is looked at or advised. Nothing it does changes what the reader reads, only how soon
    the bytes are in memory.
    """

    def __init__(self, ranges: Sequence[Sequence[ByteRange]], read_ahead: int | None = None):
        """Args:
          ranges: per item, in reading order, the (file, offset, bytes) ranges it reads.
          read_ahead: bytes ahead of the reader's item (default `default_read_ahead()`, read only when
            there are ranges); 0 advises nothing.
        """
        self._ranges = [list(r) for r in ranges]
        if read_ahead is None:
            read_ahead = default_read_ahead() if any(self._ranges) else 0
        self._read_ahead = read_ahead
        # Byte offset of each item's start in the run, so bytes ahead are a difference of two entries.
        self._starts = list(itertools.accumulate((sum(n for _, _, n in r) for r in self._ranges), initial=0))
        self._reader = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.advised = 0  # bytes handed to the kernel (the merge's profile: read_ahead_mb)

    def __enter__(self) -> Prefetch:
        if self._read_ahead > 0 and any(self._ranges) and _readahead.supported():
            self._thread = threading.Thread(target=self._run, name="jaxmerge-prefetch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def reading(self, index: int) -> None:
        """The reader starts item `index`: what may be advised moves on with it."""
        with self._cond:
            self._reader = max(self._reader, index)
            self._cond.notify_all()

    def _may_advise(self, index: int) -> bool:
        return index <= self._reader + 1 or self._starts[index + 1] - self._starts[self._reader] <= self._read_ahead

    def _run(self) -> None:
        try:
            # Each file opened only while it is looked at or advised: a sharded model's hundreds of files
            # must not hold descriptors the reader needs.
            uncached = set()
            for path in dict.fromkeys(p for ranges in self._ranges for p, _, _ in ranges):
                if self._stop:
                    return
                if not _looks_cached(path):
                    uncached.add(path)
            if not uncached:
                return  # every input is in memory: nothing to read ahead
            index = 0
            while index < len(self._ranges):
                with self._cond:
                    while not self._stop and not self._may_advise(index):
                        self._cond.wait()
                    if self._stop:
                        return
                    index = max(index, self._reader + 1)  # the reader reads its own item and those before
                if index >= len(self._ranges):
                    return
                for path, offset, nbytes in self._ranges[index]:
                    if path in uncached:
                        _advise_range(path, offset, nbytes, lambda: self._stop)
                        self.advised += nbytes
                index += 1
        except Exception as err:  # noqa: BLE001 - advice only: the reader reads without it
            _log.debug("reading ahead stopped: %r", err)


def _looks_cached(path: Path) -> bool:
    """Nearly all of `path` is in the page cache already (`CACHED`); False where the OS cannot tell:
    advice on cached pages costs little."""
    fraction = _readahead.cached_fraction(path)
    return fraction is not None and fraction >= CACHED


def _advise_range(path: Path, offset: int, nbytes: int, stop: Callable[[], bool] | None = None) -> None:
    """`_readahead.advise` on `path`, open only meanwhile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _readahead.advise(fd, offset, nbytes, stop)
    finally:
        os.close(fd)
