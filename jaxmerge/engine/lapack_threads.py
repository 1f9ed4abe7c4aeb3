"""LAPACK's own thread pool, limited for the length of a run where it only competes with XLA's.

On the CPU, jaxlib computes `jnp.linalg`'s factorizations (QR, SVD, eigh) with SciPy's LAPACK,
OpenBLAS in SciPy's wheels, which keeps a thread pool of its own beside XLA's. Where the
factorizations are small and sit between large XLA matrix products, as in a randomized SVD (the QR
of an m x (rank + p) sketch, the eigensolve of its (rank + p)^2 Gram matrix), the two pools take
turns on the same cores and each waits on the other: on the 2-core CI VM, `jaxmerge extract-lora`'s
randomized kernel ran 1.3-1.8x faster with LAPACK on one thread (5632 x 2048 at rank 64: 167 ms
against 236 ms; 2048 x 2048: 64 against 117 ms), while a full SVD of a 2048 x 2048 matrix, all
LAPACK, ran 1.4x slower on one (1.93 s against 1.38 s). So the limit is the caller's choice, per
run: `limit_lapack_threads(1)` around the run, `None` to leave the pool as it is. (Measured on 2
cores only; with many cores XLA's pool grows as LAPACK's does.)

The limit is set through threadpoolctl, on every BLAS library loaded in the process (OpenBLAS, MKL,
BLIS), before the run's first kernel, and restored when the run ends, after its last result is read.
(After an error a kernel dispatched ahead may still be running then; within the pool's own size,
OpenBLAS's `goto_set_num_threads` only changes the count a call reads when it starts.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import jax

logger = logging.getLogger(__name__)

__all__ = ["limit_lapack_threads"]


_lock = threading.Lock()
_limited = False  # a run holds the limit now (in some thread)


@contextlib.contextmanager
def limit_lapack_threads(threads: int | None) -> Iterator[None]:
    """Run the body with the CPU LAPACK behind `jnp.linalg` on at most `threads` threads.

    Args:
      threads: the limit; None leaves the thread pool as it is (as does a backend other than
        the CPU, whose factorizations do not run on the host's LAPACK).

    The caller must have every result of the body computed before it exits (read them back):
    JAX dispatches asynchronously, and a kernel still running after the exit would run with the
    restored pool. Of runs that overlap (in several threads) the first holds the limit, from the
    thread that set it (the pool is process-wide, and threadpoolctl lets one thread change it at a
    time); the others run under it while it lasts and unlimited after: the pool is always given
    back as it was, only their speed changes.
    """
    global _limited
    if threads is None or jax.default_backend() != "cpu":
        yield
        return
    try:
        # jaxlib takes its LAPACK functions from this module when the first factorization is lowered;
        # load it now so that the limit reaches its library.
        import scipy.linalg.cython_lapack  # noqa: F401  (imported for its side effect)
        from threadpoolctl import threadpool_limits
    except ImportError as err:  # pragma: no cover - both come with jaxmerge's dependencies
        logger.info("LAPACK's threads are not limited: %s", err)
        yield
        return
    with _lock:
        holder, _limited = not _limited, True
    if not holder:
        yield
        return
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        with _lock:
            _limited = False
