"""The NaN/inf check every checkpoint merge runs on its inputs (unless allowed)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core._dtypes import compute_dtype
from jaxmerge.core._kernels import kernel
from jaxmerge.formats.safetensors_io import CheckpointError


@kernel
def finite_flags(leaves):
    """One flag per input: every entry is finite.

    The sum of a tensor's entries (float32 at least) is finite when every entry
    is, and NaN or inf when one is not; only a sum of huge finite values can
    also overflow. So each tensor is summed (one fast reduction that widens
    half-precision entries as it reads them: ~2 ms for 11.5M bfloat16 entries
    on 2 CPU cores, where `all(isfinite(x))` takes ~10 ms and `sum(x * 0)`
    ~15 ms), and only a tensor whose sum is not finite is checked entry by
    entry with `sum(x * 0)` (`lax.cond`: for that tensor only; it compiles in
    less time than `all(isfinite(x))`, 0.15 s against 0.25 s per shape pair).

    Args:
      leaves: a tuple of same- or different-shape float arrays.

    Returns:
      A bool array of shape (len(leaves),).
    """

    def finite(x):
        total = jnp.sum(x, dtype=compute_dtype(x.dtype))

        def entry_by_entry():  # x * 0 is 0 where x is finite and NaN where it is not: no overflow
            return jnp.isfinite(jnp.sum(x * 0, dtype=total.dtype))

        return jax.lax.cond(jnp.isfinite(total), lambda: jnp.bool_(True), entry_by_entry)

    return jnp.stack([finite(x) for x in leaves])


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
