"""`jaxmerge.engine.lapack_threads`: LAPACK's thread pool limited for a run and given back after it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from threadpoolctl import threadpool_info

from jaxmerge.engine.lapack_threads import limit_lapack_threads

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the limit applies to the CPU's LAPACK only")


def _blas_threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_the_limit_holds_inside_and_is_lifted_after():
    jnp.linalg.qr(jnp.ones((4, 3))).Q.block_until_ready()  # jaxlib's LAPACK is loaded
    before = _blas_threads()
    assert before, "no BLAS library found in the process: the limit would reach nothing"
    with limit_lapack_threads(1):
        inside = _blas_threads()
        q = jnp.linalg.qr(jnp.arange(12.0).reshape(4, 3) ** 2).Q.block_until_ready()
    assert set(inside) == set(before) and set(inside.values()) == {1}
    assert _blas_threads() == before
    assert q.shape == (4, 3)


def test_none_leaves_the_pool_as_it_is():
    before = _blas_threads()
    with limit_lapack_threads(None):
        assert _blas_threads() == before
    assert _blas_threads() == before


def test_the_limit_is_lifted_after_an_error():
    before = _blas_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with limit_lapack_threads(1):
            raise RuntimeError("inside")
    assert _blas_threads() == before
