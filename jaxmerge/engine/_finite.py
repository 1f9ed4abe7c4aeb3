"""The NaN/inf check every checkpoint merge runs on its inputs (unless allowed)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxmerge.core._kernels import kernel
from jaxmerge.formats.safetensors_io import CheckpointError


@kernel
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


def raise_unless_finite(flags, sources: Sequence[tuple[object, str]]) -> None:
    """Stop the merge at the first input whose flag is false: one line naming its file and tensor.

    Args:
      flags: from `finite_flags`.
      sources: one (file or directory, "tensor NAME" / "leaf PATH") per flag.
    """
    flags = np.asarray(flags)
    if not flags.all():
        path, what = sources[int(np.argmin(flags))]
        raise CheckpointError(
            f"{path}: {what} holds NaN or inf; pass --allow-nonfinite (allow_nonfinite=True) to merge it anyway"
        )
