"""Overlap reading, merging and writing of a streamed merge; count the seconds of each phase.

`run_ordered(items, read, dispatch, write, depth=...)` runs three stages over
`items`, each in plan order:

* a reader thread: `read(item)` (file reads release the GIL),
* the calling thread: `dispatch(item, read_result)`; JAX computations are
  dispatched asynchronously, so this returns before the merge is computed,
* a writer thread: `write(item, dispatched)`, which waits for the result and
  writes it (file writes release the GIL);
* with `ranges`, a thread that asks the OS to read the next items' inputs into
  the page cache while earlier ones merge (`jaxmerge.engine._prefetch`): at
  every depth, 0 included, since the disk needs none of the cores.

Memory is bounded by `depth`: at most `depth` items are in flight between the
start of their read and the end of their write (a semaphore taken by the
reader, given back by the writer). For a merge each item holds its inputs, the
kernel's work buffers and its output, so the peak is about
`depth x (inputs + work + output)` of the largest tensor; depth 1 is the
serial merge's peak, with the read, merge and write of one tensor still in
three threads; depth 0 runs everything in the calling thread, one item after
the other (no threads).

Errors keep the plan's order: the error of the earliest item wins, whichever
stage raised it, as a serial loop would raise it; the other stages stop at
their next item and are joined before `run_ordered` raises, so nothing is left
writing into a directory the caller is about to remove.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from jaxmerge.engine._ahead import THREAD_NAME as AHEAD_THREAD
from jaxmerge.engine._prefetch import ByteRange, Prefetch

# JAX's compilation events (trace to jaxpr, lowering to MLIR, XLA compile or persistent-cache load).
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class PhaseProfile:
    """Busy seconds per phase of one merge, and a few counts; thread-safe, cheap (two clock reads a phase).

    Phases of `merge_checkpoints`:
      read: reading the inputs' bytes (reader thread);
      dispatch: handing the merge to JAX (calling thread), compilation excluded;
      compile: tracing, lowering and compiling, or loading from the persistent
        compilation cache (JAX's own monitoring events), in the stages' threads;
      compile_ahead: the busy seconds of the background thread that prepares
        the kernels before their inputs are read (`jaxmerge.engine._ahead`), overlapped;
      compile_wait: the calling thread waiting for that thread;
      wait: waiting for merge results (writer thread): the kernels' time that
        the other phases did not hide;
      write: writing the output bytes; sync: the final fsync of each shard;
      plan: opening the inputs and checking the merge; finish: the index,
        the recorded recipe and the caller's other files.
    With overlap the phases run at the same time, so they add up to more than
    `wall`; with depth 0 (serial) they add up to about `wall`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    @contextlib.contextmanager
    def compiles(self) -> Iterator[None]:
        """Count JAX compilations (and their seconds) while the block runs, in any thread."""
        def on_duration(event: str, seconds: float, **kwargs: Any) -> None:
            if event in _COMPILE_EVENTS:
                # The background compiler's seconds are its own phase (`jaxmerge.engine._ahead`, timed there):
                # its events nest (an abstract trace holds the kernels' compilations) and would count twice.
                if threading.current_thread().name != AHEAD_THREAD:
                    self.add("compile", seconds)
                if event == _BACKEND_COMPILE:
                    self.count("compiles")

        def on_event(event: str, **kwargs: Any) -> None:
            if event == _CACHE_HIT:
                self.count("compile_cache_hits")

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        try:
            yield
        finally:
            jax.monitoring.unregister_event_duration_listener(on_duration)
            jax.monitoring.unregister_event_listener(on_event)

    def as_dict(self) -> dict[str, float | int]:
        """`{phase}_s` seconds (rounded to ms) and counts; `dispatch_s` excludes compilation."""
        with self._lock:
            seconds = dict(self.seconds)
            counts = dict(self.counts)
        # Compilation happens inside dispatch (the calling thread): report it apart.
        if "dispatch" in seconds:
            seconds["dispatch"] = max(0.0, seconds["dispatch"] - seconds.get("compile", 0.0))
        out: dict[str, float | int] = {f"{k}_s": round(v, 3) for k, v in sorted(seconds.items())}
        out.update(sorted(counts.items()))
        return out

    def line(self) -> str:
        d = self.as_dict()
        order = ["wall_s", "plan_s", "read_s", "dispatch_s", "compile_s", "compile_ahead_s", "compile_wait_s", "wait_s",
                 "write_s", "sync_s", "finish_s"]
        bits = [f"{k[:-2]} {d[k]:.2f} s" for k in order if k in d]
        bits += [f"{k} {v}" for k, v in d.items() if not k.endswith("_s")]
        return ", ".join(bits)


class _Failure:
    """An exception raised by one stage for item `index` (BaseException: SystemExit and KeyboardInterrupt too)."""

    def __init__(self, index: int, error: BaseException):
        self.index, self.error = index, error


_END = object()


def run_ordered(
    items: Sequence[Any],
    read: Callable[[Any], Any],
    dispatch: Callable[[Any, Any], Any],
    write: Callable[[Any, Any], None],
    *,
    depth: int = 2,
    between: Callable[[], None] | None = None,
    ranges: Sequence[Sequence[ByteRange]] | None = None,
    read_ahead: int | None = None,
) -> int:
    """`write(item, dispatch(item, read(item)))` for every item in order, the stages overlapped.

    Args:
      items: the work, in the order it must be read, dispatched and written.
      read, dispatch, write: the stages (see the module docstring).
      depth: items in flight at most (0: serial in the calling thread, no threads).
      between: called before each item by every stage (e.g. `stop_if_terminated`);
        what it raises stops the run like a stage's error.
      ranges: optional, per item, the (file, offset, bytes) ranges `read` reads: a background
        thread asks the kernel to read them into the page cache ahead of the reader
        (`jaxmerge.engine._prefetch`), so the disk works while earlier items merge.
      read_ahead: bytes to advise ahead of the reader (default, with ranges, `_prefetch.default_read_ahead()`;
        0: none).

    Returns:
      The bytes of `ranges` the OS was asked to read ahead (0 when they were all in memory).

    Raises:
      The error of the earliest item that failed, in whichever stage.
    """
    with Prefetch(ranges or (), read_ahead) as prefetch:
        _run_stages(items, read, dispatch, write, depth, between, prefetch)
    return prefetch.advised


def _run_stages(items, read, dispatch, write, depth: int, between, prefetch: Prefetch) -> None:
    """`run_ordered`'s stages; the reader tells `prefetch` which item it starts."""
    if depth <= 0:
        for index, item in enumerate(items):
            if between is not None:
                between()
            prefetch.reading(index)
            write(item, dispatch(item, read(item)))
        return

    slots = threading.Semaphore(depth)
    abort = threading.Event()  # stop every stage at its next item (an error or an interrupt)
    stop_reading = threading.Event()  # an item failed before the writer: read nothing more
    inbox: queue.SimpleQueue = queue.SimpleQueue()  # reader -> caller: (index, item, read result) | _Failure | _END
    outbox: queue.SimpleQueue = queue.SimpleQueue()  # caller -> writer: (index, item, dispatched) | _END
    failures: list[_Failure] = []
    lock = threading.Lock()

    def fail(index: int, error: BaseException) -> None:
        with lock:
            failures.append(_Failure(index, error))
        abort.set()

    def reader() -> None:
        try:
            for index, item in enumerate(items):
                while not slots.acquire(timeout=0.05):
                    if abort.is_set() or stop_reading.is_set():
                        return
                if abort.is_set() or stop_reading.is_set():
                    return
                try:
                    if between is not None:
                        between()
                    prefetch.reading(index)
                    inbox.put((index, item, read(item)))
                except BaseException as err:  # noqa: BLE001 - handed to the caller, in order
                    inbox.put(_Failure(index, err))
                    return
        finally:
            inbox.put(_END)

    def writer() -> None:
        while True:
            got = outbox.get()
            if got is _END or abort.is_set():
                return
            index, item, dispatched = got
            try:
                if between is not None:
                    between()
                write(item, dispatched)
            except BaseException as err:  # noqa: BLE001 - re-raised by the caller
                fail(index, err)
                return
            finally:
                del dispatched, got
                slots.release()

    threads = [threading.Thread(target=reader, name="jaxmerge-reader", daemon=True),
               threading.Thread(target=writer, name="jaxmerge-writer", daemon=True)]
    for t in threads:
        t.start()
    try:
        while not abort.is_set():
            got = inbox.get()
            if got is _END:
                break
            if isinstance(got, _Failure):
                # Earlier items are with the writer: let it finish them (one may fail first).
                with lock:
                    failures.append(got)
                stop_reading.set()
                break
            index, item, result = got
            try:
                if between is not None:
                    between()
                dispatched = dispatch(item, result)
            except BaseException as err:  # noqa: BLE001 - raised below, after earlier items
                with lock:
                    failures.append(_Failure(index, err))
                stop_reading.set()
                break
            del result, got
            outbox.put((index, item, dispatched))
            del dispatched
    except BaseException:
        # KeyboardInterrupt (or anything raised while waiting): stop at once, then re-raise.
        abort.set()
        outbox.put(_END)
        for t in threads:
            t.join()
        raise
    outbox.put(_END)
    # On a failure the reader stops at its next item; the writer finishes the items before it.
    threads[1].join()
    abort.set()
    threads[0].join()
    if failures:
        first = min(failures, key=lambda f: f.index)
        raise first.error
