"""`jaxmerge.engine.lapack_threads`: LAPACK's thread pool limited for a run and given back after it.

Each test starts from a pool of two threads (`threadpool_limits(2)` around it), so that the limit to
one is seen whatever the host's own count (one core, OPENBLAS_NUM_THREADS=1)."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from jaxmerge.engine.lapack_threads import limit_lapack_threads

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the limit applies to the CPU's LAPACK only")


def _blas_threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.fixture
def two_threads():
    jnp.linalg.qr(jnp.ones((4, 3))).Q.block_until_ready()  # jaxlib's LAPACK is loaded
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and set(before.values()) == {2}, before
        yield before


def test_the_limit_holds_inside_and_is_lifted_after(two_threads):
    with limit_lapack_threads(1):
        inside = _blas_threads()
        q = jnp.linalg.qr(jnp.arange(12.0).reshape(4, 3) ** 2).Q.block_until_ready()
    assert set(inside) == set(two_threads) and set(inside.values()) == {1}
    assert _blas_threads() == two_threads
    assert q.shape == (4, 3)


def test_none_leaves_the_pool_as_it_is(two_threads):
    with limit_lapack_threads(None):
        assert _blas_threads() == two_threads
    assert _blas_threads() == two_threads


def test_the_limit_is_lifted_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with limit_lapack_threads(1):
            raise RuntimeError("inside")
    assert _blas_threads() == two_threads


def test_overlapping_runs_never_leave_the_pool_limited(two_threads):
    """This thread's run holds the limit; a run in another thread, started inside it, runs under it, then
    unlimited once the holder has left, and leaves the pool as it was. (Saving and restoring per run would
    leave the pool at the second run's saved count, 1, for good.)"""
    b_inside, a_left = threading.Event(), threading.Event()
    seen = {}

    def run_b():
        with limit_lapack_threads(1):
            seen["both inside"] = set(_blas_threads().values())
            b_inside.set()
            a_left.wait(10)
            seen["after the holder left"] = set(_blas_threads().values())

    other = threading.Thread(target=run_b)
    with limit_lapack_threads(1):
        other.start()
        b_inside.wait(10)
    a_left.set()
    other.join(30)
    assert seen == {"both inside": {1}, "after the holder left": {2}}
    assert _blas_threads() == two_threads
    with limit_lapack_threads(1):  # the next run holds it again
        assert set(_blas_threads().values()) == {1}
    assert _blas_threads() == two_threads


def test_runs_in_two_other_threads_give_the_pool_back():
    """Runs A then B in two worker threads, A leaving first. threadpoolctl lets one thread change the pool:
    with a limit per run, B's (saved while A's held: 1) was restored once A had left, and the pool stayed
    on one thread for good."""
    jnp.linalg.qr(jnp.ones((4, 3))).Q.block_until_ready()
    before = _blas_threads()
    if max(before.values(), default=1) < 2:
        pytest.skip("the BLAS pool has one thread here: a limit to one cannot be told from it")
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()

    def run_a():
        with limit_lapack_threads(1):
            a_inside.set()
            b_inside.wait(10)
        a_left.set()

    def run_b():
        a_inside.wait(10)
        with limit_lapack_threads(1):
            b_inside.set()
            a_left.wait(10)

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert _blas_threads() == before
