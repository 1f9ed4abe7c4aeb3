"""Jitted kernels that can be compiled before their inputs exist.

A whole-model merge spends seconds turning each kernel into an executable for
the shapes it meets: tracing, lowering, then compiling or loading from the
persistent compilation cache (Llama-shaped TIES: about half a second per
shape). None of that needs the tensors' values, only their shapes and dtypes,
so a checkpoint merge does it in a background thread while the inputs are
read (`jaxmerge.engine._ahead`): it runs a method on abstract inputs
(`jax.eval_shape`) inside `compiling_ahead()`, where every `kernel` lowers and
compiles itself for the abstract arguments it is called with.
`jit(f).lower(...).compile()` fills the caches that the later call with real
arrays of those shapes uses, so that call only runs.

Every jitted kernel of the core and the methods is declared with `kernel`
instead of `jax.jit`; outside `compiling_ahead()` it is the jitted function
(`lower`, `trace` and the other attributes of `jax.jit`'s result included).

The kernel boundary is also where arrays sharded on a mesh with explicit axes
(`jax.make_mesh`'s default since JAX 0.8) meet kernels written for XLA's
automatic partitioning: they are run on the same mesh with auto axes
(`sharding.auto_axes`; same devices and shards) and the results are handed
back on the caller's mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxmerge.core.sharding import auto_axes, explicit_mesh, onto_mesh

_AHEAD = contextvars.ContextVar("jaxmerge_compiling_ahead", default=False)


@contextlib.contextmanager
def compiling_ahead() -> Iterator[None]:
    """Within this block (this thread only), each `kernel` called compiles itself for its arguments' shapes first."""
    token = _AHEAD.set(True)
    try:
        yield
    finally:
        _AHEAD.reset(token)


def _abstract(value: Any) -> Any:
    """Tracers (of `jax.eval_shape`) as `jax.ShapeDtypeStruct`s; everything else as it is."""
    if isinstance(value, jax.core.Tracer):
        aval = value.aval
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
    return value


class Kernel:
    """A `jax.jit`-ed function that compiles itself ahead when called inside `compiling_ahead()`."""

    def __init__(self, jitted: Callable[..., Any]):
        self._jitted = jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        explicit = explicit_mesh(jax.tree_util.tree_leaves((args, kwargs)))
        if explicit is not None:
            # Sorts and reductions over sharded axes have no sharding rule on explicit axes: run on auto ones.
            args, kwargs = onto_mesh((args, kwargs), auto_axes(explicit))
            return onto_mesh(self(*args, **kwargs), explicit)
        if not _AHEAD.get():
            return self._jitted(*args, **kwargs)
        # Kernels called inside this one are part of its executable: only the outermost compiles.
        token = _AHEAD.set(False)
        try:
            abstract_args, abstract_kwargs = jax.tree_util.tree_map(_abstract, (args, kwargs))
            self._jitted.lower(*abstract_args, **abstract_kwargs).compile()
            return self._jitted(*args, **kwargs)
        finally:
            _AHEAD.reset(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)

    def __repr__(self) -> str:
        return f"kernel({self._jitted!r})"


def kernel(fn: Callable[..., Any] | None = None, /, **jit_options: Any):
    """`jax.jit(fn, **jit_options)` that can compile ahead (see the module docstring); a decorator.

    Args:
      fn: the function; None returns a decorator taking it (`@kernel(static_argnames=...)`).
      **jit_options: passed to `jax.jit` (`static_argnames`, ...).

    Returns:
      A `Kernel`: called like the jitted function.
    """
    if fn is None:
        return functools.partial(kernel, **jit_options)
    return Kernel(jax.jit(fn, **jit_options))
