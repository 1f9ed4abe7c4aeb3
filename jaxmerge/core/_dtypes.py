"""Which dtype work is done in, and which integer type counts elements."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulate in float32 at least: float16/bfloat16 inputs are widened, float64 kept."""
    if jnp.dtype(dtype) == jnp.float64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def uint_like(dtype: jnp.dtype) -> jnp.dtype:
    """The unsigned integer type with the same width as a float type (for bit patterns)."""
    return {4: jnp.dtype(jnp.uint32), 8: jnp.dtype(jnp.uint64)}[jnp.dtype(dtype).itemsize]


def count_dtype() -> jnp.dtype:
    """Element counts: uint32 (exact to 2**32 - 1 entries) unless x64 is enabled."""
    return jnp.dtype(jnp.uint64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.uint32)


def max_count() -> int:
    return int(jnp.iinfo(count_dtype()).max)
