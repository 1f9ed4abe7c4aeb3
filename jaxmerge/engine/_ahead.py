"""Compile a streamed merge's kernels in a background thread while its inputs are read.

A checkpoint merge meets a handful of distinct kernel signatures (a Llama:
one per tensor size), each costing a trace, a lowering and a compilation or a
persistent-cache load before its first tensor can be merged (0.4-0.6 s each on
2 cores with the cache, 1-4 s without). Only shapes and dtypes are needed,
so `AheadCompiler` prepares them in plan order in its own thread
(`jaxmerge.core._kernels.compiling_ahead`), overlapping the reads, merges and
writes of the tensors before. The merge of a tensor first
waits until its signature is prepared (never compiling it twice at once); a
preparation that fails is skipped, and the merge itself then compiles, or
raises the error where it belongs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence

from jaxmerge.core._kernels import compiling_ahead

logger = logging.getLogger(__name__)

THREAD_NAME = "jaxmerge-compiler"


class AheadCompiler:
    """Run `prepare` callables once per signature, in order, in one background thread.

    Args:
      jobs: `(signature, prepare)` pairs in the order the merge will need them;
        a signature seen before is skipped. `prepare()` runs inside
        `compiling_ahead()`, typically `jax.eval_shape` of the tensor's merge.
    """

    def __init__(self, jobs: Sequence[tuple[Hashable, Callable[[], object]]]):
        self._jobs: list[tuple[Hashable, Callable[[], object]]] = []
        self._ready: dict[Hashable, threading.Event] = {}
        for signature, prepare in jobs:
            if signature not in self._ready:
                self._ready[signature] = threading.Event()
                self._jobs.append((signature, prepare))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.seconds = 0.0  # busy seconds of the thread (complete once it is joined: after the `with` block)

    def __enter__(self) -> AheadCompiler:
        if self._jobs:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def wait(self, signature: Hashable) -> None:
        """Block until `signature` is prepared (or skipped); unknown signatures return at once."""
        event = self._ready.get(signature)
        if event is not None:
            event.wait()

    def _run(self) -> None:
        try:
            for signature, prepare in self._jobs:
                if self._stop.is_set():
                    return
                start = time.perf_counter()
                try:
                    with compiling_ahead():
                        prepare()
                except Exception as err:  # noqa: BLE001 - the merge itself compiles, or raises, later
                    logger.debug("compiling ahead for %s failed: %r", signature, err)
                finally:
                    self.seconds += time.perf_counter() - start
                    self._ready[signature].set()
        finally:
            # Stopped early or not: nobody may wait for a signature that will never be prepared.
            for event in self._ready.values():
                event.set()
