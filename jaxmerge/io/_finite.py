"""The NaN/inf check every checkpoint merge runs on its inputs (unless allowed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def finite_flags(leaves):
    """One flag per input: every entry is finite.

    `x * 0` is 0 for finite entries and NaN for NaN and inf, so the sum is NaN
    exactly when some entry is not finite (no overflow: the summands are 0); a
    sum reduction is 2-3x faster on CPUs than `all(isfinite(x))`.

    Args:
      leaves: a tuple of same- or different-shape float arrays.

    Returns:
      A bool array of shape (len(leaves),).
    """
    return jnp.isfinite(jnp.stack([jnp.sum(x * 0, dtype=jnp.float32) for x in leaves]))
