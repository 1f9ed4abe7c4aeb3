"""Kernels compiled ahead of their inputs (`jaxmerge.core._kernels`) and the thread that does it (`jaxmerge.engine._ahead`)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.core._kernels import compiling_ahead, kernel
from jaxmerge.engine._ahead import THREAD_NAME, AheadCompiler

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Count XLA compilations (or persistent-cache loads) while the block runs."""

    def __enter__(self):
        self.count = 0

        def listener(event, seconds, **kwargs):
            if event == _BACKEND_COMPILE:
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def _scale_and_add(x, y, *, twice):
    return x * (2 if twice else 1) + y


def test_a_kernel_is_its_jitted_function_outside_compiling_ahead():
    fn = kernel(_scale_and_add, static_argnames=("twice",))
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    np.testing.assert_array_equal(fn(x, y, twice=True), jax.jit(_scale_and_add, static_argnames="twice")(x, y, twice=True))
    assert fn.__name__ == "_scale_and_add"
    assert "mul" in fn.lower(x, y, twice=True).as_text()  # jax.jit's attributes pass through


def test_compiling_ahead_on_abstract_inputs_leaves_nothing_to_compile_for_real_ones():
    fn = kernel(_scale_and_add, static_argnames=("twice",))
    shape = (13, 29)  # a shape no other test compiles this function for
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
    with Compiles() as ahead, compiling_ahead():
        out = jax.eval_shape(lambda x, y: fn(x, y, twice=True), abstract, abstract)
    assert out.shape == shape and ahead.count == 1
    x = np.ones(shape, np.float32)  # NumPy: making a JAX array of a new shape compiles a fill
    with Compiles() as real:
        result = fn(x, x, twice=True)
    assert real.count == 0
    np.testing.assert_array_equal(result, np.full(shape, 3.0))
    with Compiles() as other:  # control: a shape not prepared compiles
        fn(np.ones((13, 30), np.float32), np.ones((13, 30), np.float32), twice=True)
    assert other.count == 1


def test_only_the_outermost_kernel_compiles_ahead():
    inner = kernel(lambda x: x * 3)
    outer = kernel(lambda x: inner(x) + 1)
    with Compiles() as ahead, compiling_ahead():
        jax.eval_shape(outer, jax.ShapeDtypeStruct((7, 11), jnp.float32))
    assert ahead.count == 1
    with Compiles() as real:
        np.testing.assert_array_equal(outer(np.ones((7, 11), np.float32)), np.full((7, 11), 4.0))
    assert real.count == 0


def test_ahead_compiler_prepares_each_signature_once_in_order_in_its_thread():
    done, threads = [], set()

    def prepare(tag):
        def run():
            threads.add(threading.current_thread().name)
            done.append(tag)
        return run

    jobs = [("a", prepare("a1")), ("b", prepare("b")), ("a", prepare("a2")), ("c", prepare("c"))]
    with AheadCompiler(jobs) as ahead:
        for signature in ("a", "b", "c", "unknown"):
            ahead.wait(signature)
    assert done == ["a1", "b", "c"] and threads == {THREAD_NAME}


def test_a_failed_preparation_releases_its_waiters_and_the_rest_still_run():
    done = []

    def fail():
        raise ValueError("no such shape")

    with AheadCompiler([("bad", fail), ("good", lambda: done.append("good"))]) as ahead:
        ahead.wait("bad")
        ahead.wait("good")
    assert done == ["good"]


def test_leaving_early_stops_the_thread_and_releases_every_waiter():
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)

    ahead = AheadCompiler([("slow", slow), ("never", lambda: pytest.fail("ran after the stop"))])
    with ahead:
        started.wait(5)
        release.set()
    ahead.wait("never")  # returns: released although never prepared


def _row_counts(x, *, exact):
    return (x >= 3).sum(axis=1, dtype=jnp.uint32)


def test_exact_sums_run_on_the_cpu_without_the_tree_rewrite_and_give_the_same_bits():
    """A call its kernel declares exact (`kernel(exact_sums=...)`) runs the program compiled without XLA:CPU's
    tree-reduction rewrite; other calls run the default one; both give the same bits on exact sums."""
    fn = kernel(_row_counts, static_argnames="exact", exact_sums=lambda args, kwargs: kwargs["exact"])
    exact_program, default_program = fn._exact_sums[0], fn._jitted
    x = jnp.asarray(np.random.default_rng(0).integers(0, 8, (16, 4096)).astype(np.float32))
    result = fn(x, exact=True)
    assert exact_program._cache_size() == 1 and default_program._cache_size() == 0
    np.testing.assert_array_equal(result, default_program(x, exact=True))
    fn(x, exact=False)
    assert exact_program._cache_size() == 1 and default_program._cache_size() == 2
    # The default program sums each long row as a tree of windows; the exact one does not.
    assert "reduce-window" in default_program.lower(x, exact=True).compile().as_text()
    assert "reduce-window" not in fn.lower(x, exact=True).compile().as_text()


def test_exact_sums_inside_another_jit_and_compiled_ahead():
    """Traced inside another function the default program serves (a nested jit takes no compiler options);
    compiled ahead on abstract inputs, the program a real call then runs is the one prepared."""
    fn = kernel(_row_counts, static_argnames="exact", exact_sums=lambda args, kwargs: kwargs["exact"])
    x = np.ones((8, 3000), np.float32)
    np.testing.assert_array_equal(jax.jit(lambda x: fn(x + 2, exact=True) * 2)(x), np.full(8, 6000))
    abstract = jax.ShapeDtypeStruct((9, 3001), jnp.float32)
    with Compiles() as ahead, compiling_ahead():
        jax.eval_shape(lambda x: fn(x, exact=True), abstract)
    assert ahead.count == 1
    with Compiles() as real:
        np.testing.assert_array_equal(fn(np.full((9, 3001), 3, np.float32), exact=True), np.full(9, 3001))
    assert real.count == 0
