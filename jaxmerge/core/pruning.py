"""Sparsify one task tensor: keep its largest-magnitude entries, or a random subset.

Magnitude pruning is the "trim" step of TIES-Merging (Yadav et al., 2023,
arXiv:2306.01708); random pruning with rescaling is the "drop and rescale" of
DARE (Yu et al., 2023, "Language Models are Super Mario", arXiv:2311.03099).
Semantics follow `peft.utils.merge_utils` (PEFT 0.21).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.core import _validation as v
from jaxmerge.core._dtypes import compute_dtype
from jaxmerge.core._kernels import kernel
from jaxmerge.core._random import random_words
from jaxmerge.core.selection import density_to_k, keep_top_k_magnitude, masked, top_k_magnitude_mask

_MASK_LEVELS = 1 << 16


def random_mask(key: jax.Array, density, shape) -> jax.Array:
    """Keep-mask for DARE: each entry kept with probability `density` (rounded to a multiple of 2**-16).

    One 32-bit threefry word serves two entries: with n entries and
    `words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)`, the flat
    entries take `concatenate([words & 0xFFFF, words >> 16])[:n]` in turn, and
    an entry is kept where its 16 bits are below `round(density * 2**16)`.
    That halves the random bits of `jax.random.bernoulli` (the mask is the
    dominant cost of DARE: 121 ms instead of 213 ms per 16.7M entries on
    XLA:CPU), stays on threefry (same mask on every backend) and quantises the
    keep probability by at most 2**-17, far below the binomial noise of any
    tensor under 10**9 entries.

    Args:
      key: a `jax.random.key`.
      density: keep probability in [0, 1] (traced is fine); >= 1 keeps all.
      shape: the mask's shape.

    Returns:
      A bool array of `shape`.
    """
    return random_levels(key, shape) < _level(density)


def random_levels(key: jax.Array, shape) -> jax.Array:
    """Uniform integers in [0, 2**16), one per entry of `shape`, two per 32-bit threefry word (uint32).

    The flat entries take `concatenate([words & 0xFFFF, words >> 16])[:n]`, with
    `words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)` (see `random_mask`), computed by
    `_random.random_words` (the same words, hashed in the pass that uses them).
    """
    n = 1
    for dim in shape:
        n *= dim
    words = random_words(key, ((n + 1) // 2,))
    # The two halves as the rows of a (2, words) array: the concatenation above, without a concatenate
    # (which XLA:CPU fuses into a per-entry branch that does not vectorise: DARE's drop took 2x longer).
    halves = (words[None, :] >> np.asarray([[0], [16]], np.uint32)) & np.uint32(0xFFFF)
    return halves.reshape(-1)[:n].reshape(shape)


def _level(probability) -> jax.Array:
    """round(probability * 2**16) as uint32, probability clipped to [0, 1]: `random_levels` below it
    happen with that probability, to within 2**-17."""
    p = jnp.clip(jnp.asarray(probability, jnp.float32), 0, 1)
    return jnp.round(p * _MASK_LEVELS).astype(jnp.uint32)


def _uniform_index(key: jax.Array, shape, count: int) -> jax.Array:
    """Integers uniform in [0, count) (int32): one 32-bit word each, mapped by floor(word * count / 2**32)
    for count < 2**16 (each value's probability within count / 2**32 of 1 / count, relative); larger
    counts take `jax.random.randint` (two words each, exact)."""
    if count >= 1 << 16:
        return jax.random.randint(key, shape, 0, count, jnp.int32)
    words = random_words(key, shape)  # jax.random.bits(key, shape, jnp.uint32)
    c = jnp.uint32(count)
    # floor(word * c / 2**32) in 32-bit arithmetic: (hi * c + floor(lo * c / 2**16)) / 2**16, which
    # stays below 2**32 for c < 2**16.
    return (((words >> 16) * c + (((words & 0xFFFF) * c) >> 16)) >> 16).astype(jnp.int32)


def drop_and_rescale(x: jax.Array, density, key: jax.Array, rescale: bool) -> jax.Array:
    """Random pruning of one tensor (traceable; no validation). See `random_pruning`.

    Dropped entries are `x * 0`, as in PEFT: a NaN or inf stays NaN (`selection.masked`).
    """
    kept = masked(x, random_mask(key, density, x.shape))
    if not rescale:
        return kept
    cd = compute_dtype(x.dtype)
    d = jnp.asarray(density, cd)
    # density == 0 keeps nothing; return zeros rather than PEFT's 0/0 = NaN.
    inverse = jnp.where(d > 0, 1 / jnp.where(d > 0, d, 1), 0)
    return (kept.astype(cd) * inverse).astype(x.dtype)


def rescale_l1(x: jax.Array, kept: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Scale `kept` (a sparsified `x`) back to the L1 norm of `x`: mergekit's `rescale`.

    As mergekit's `rescaled_masked_tensor` with `RescaleNorm.l1`: unchanged when
    either norm is below `eps`.
    """
    cd = compute_dtype(x.dtype)
    before = jnp.sum(jnp.abs(x.astype(cd)))
    after = jnp.sum(jnp.abs(kept.astype(cd)))
    scale = jnp.where((before < eps) | (after < eps), 1, before / jnp.where(after < eps, 1, after))
    return (kept.astype(cd) * scale).astype(x.dtype)


def keep_magnitude_band(x: jax.Array, k, k_top, partitioned: bool = False) -> jax.Array:
    """Keep the `k` largest-magnitude entries that follow the `k_top` largest (Model Breadcrumbs).

    Two exact linear-time selections (`jaxmerge.core.selection`): the
    `k_top + k` largest, less the `k_top` largest outliers.
    """
    cdt = jnp.asarray(k).dtype
    upper = top_k_magnitude_mask(x, jnp.asarray(k, cdt) + jnp.asarray(k_top, cdt), partitioned)
    outliers = top_k_magnitude_mask(x, k_top, partitioned)
    return masked(x, upper & ~outliers)


def della_drop(x: jax.Array, density, epsilon, key: jax.Array) -> jax.Array:
    """DELLA's MagPrune (Deep et al., 2024, arXiv:2406.11617), as mergekit's `della_magprune`.

    Within each row (axis 1; a 1-D tensor is one row) an entry is kept with
    probability `p = density - epsilon + 2 * epsilon * r`, where
    r = (rank - 1) / (row length - 1) is its rank by magnitude: larger entries are
    kept more often. Density >= 1 keeps everything, density <= 0 nothing.

    mergekit sorts each row to know r. Here no sort: each entry compares itself
    with one other entry of its row drawn uniformly at random, its partner, which
    is smaller in magnitude with probability exactly r (a tie counts as smaller
    with probability 1/2). With u ~ U(0, 1), an entry is kept where
    u < density - epsilon, or where u falls in [density - epsilon, density + epsilon)
    and its partner is smaller: probability (density - epsilon) + 2 * epsilon * r,
    independently for every entry, which is the law of mergekit's mask (a
    Bernoulli(p) per entry) in linear time instead of a sort per row. As DARE's
    mask (`random_mask`), u takes 2**16 levels, so the band's edges are rounded to
    multiples of 2**-16, and the partner's index comes from one 32-bit word (each
    index within (row length) / 2**32 of uniform, relative). Tied magnitudes get
    the mean of their ranks in expectation (mergekit's argsort gives them their
    positions' ranks).

    Args:
      x: the task tensor.
      density: the mean keep probability (traced is fine).
      epsilon: half the spread of keep probabilities between the smallest and
        largest entry of a row.
      key: a `jax.random.key`: 16 random bits (u, in 2**16 levels as `random_mask`'s) and one
        partner index per entry.

    Returns:
      x with the dropped entries zeroed (no rescaling), same shape and dtype.
    """
    cd = compute_dtype(x.dtype)
    rows = x[None] if x.ndim < 2 else x
    shape = rows.shape
    magnitude = jnp.abs(rows.astype(cd))
    d, eps = jnp.asarray(density, cd), jnp.asarray(epsilon, cd)
    band_key, partner_key = jax.random.split(key)
    # u in 2**16 levels, two entries per random word as DARE's mask (`random_mask`): three words per
    # entry with a float uniform and randint took 0.9 s per 16.7M entries on 2 cores; 1.5 words here.
    low, high = _level(d - eps), _level(d + eps)
    if shape[1] > 1:
        # A uniform partner among the row's other entries: draw from n - 1 and skip the entry itself.
        # Levels and partners below 2**16 travel as 16 bits (half the memory of the branch's output).
        index_type = jnp.uint16 if shape[1] - 1 <= 1 << 16 else jnp.int32

        def draw():
            partner = _uniform_index(partner_key, shape, shape[1] - 1)
            return random_levels(band_key, shape).astype(jnp.uint16), partner.astype(index_type)

        def no_draw():  # density 0 or >= 1: nothing random is read (see the last line)
            return jnp.zeros(shape, jnp.uint16), jnp.zeros(shape, index_type)

        # Drawn in a branch of their own: XLA writes the words out in one vectorised pass there,
        # instead of hashing inside the gather's loop below, which does not vectorise (the CLI's
        # della on a TinyLlama-shaped bfloat16 model: 61-66 s -> 24 s). A constant density folds the
        # branch away.
        u, partner = lax.cond((d > 0) & (d < 1), draw, no_draw)
        u, partner = u.astype(jnp.uint32), partner.astype(jnp.int32)
        column = lax.broadcasted_iota(jnp.int32, shape, 1)
        partner = partner + (partner >= column).astype(jnp.int32)
        other = jnp.take_along_axis(magnitude, partner, axis=1)
        # Inside the band, u's lower half is a coin independent of the partner (fair to within one
        # level): it settles ties. Below the band the wrapped difference does not matter: kept anyway.
        coin = (u - low) * 2 < high - low
        smaller = (other < magnitude) | ((other == magnitude) & coin)
    else:
        u = random_levels(band_key, shape)
        smaller = jnp.zeros(shape, bool)  # a row of one entry has rank 0: p = density - epsilon
    keep = (u < low) | ((u < high) & smaller)
    kept = masked(rows, keep)
    kept = jnp.where(d >= 1, rows, jnp.where(d <= 0, jnp.zeros((), rows.dtype), kept))
    return kept.reshape(x.shape)


def _always(args: tuple, kwargs: dict) -> bool:
    return True


# Its only sums are the selection's exact counts (`kernel(exact_sums=...)`).
@kernel(static_argnames=("partitioned",), exact_sums=_always)
def _magnitude_kernel(x, k, partitioned=False):
    return keep_top_k_magnitude(x, k, partitioned)


@kernel(static_argnames=("rescale",))
def _random_kernel(x, density, key, rescale):
    return drop_and_rescale(x, density, key, rescale)


def magnitude_based_pruning(tensor: jax.Array, density: float) -> jax.Array:
    """Keep the `int(density * tensor.size)` entries of largest magnitude, zero the rest.

    Exactly k entries are kept; ties at the threshold keep the lowest flat
    indices. Runs in linear time (no sort, no top_k): see `jaxmerge.core.selection`.

    Args:
      tensor: the tensor to prune (float; integers are promoted to float32).
      density: fraction of entries to keep, in [0, 1]. May be traced.

    Returns:
      The pruned tensor, same shape and dtype.
    """
    x = v.as_float_array(tensor, "tensor")
    v.check_density(density)
    return _magnitude_kernel(x, density_to_k(density, x.size), v.is_partitioned(x))


def random_pruning(tensor: jax.Array, density: float, rescale: bool, *, key: jax.Array) -> jax.Array:
    """Keep each entry with probability `density` (DARE's drop), optionally rescaled by 1/density.

    Args:
      tensor: the tensor to prune.
      density: keep probability in [0, 1]. May be traced.
      rescale: divide the kept entries by `density` to preserve the expectation.
        At density 0 the result is zeros (PEFT returns NaN there, from 0/0).
      key: a `jax.random.key`; the mask is `random_mask(key, density, tensor.shape)`.

    Returns:
      The pruned tensor, same shape and dtype.
    """
    x = v.as_float_array(tensor, "tensor")
    v.check_density(density)
    key = v.check_key(key)
    return _random_kernel(x, density, key, bool(rescale))


def prune(
    tensor: jax.Array,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Prune `tensor` by `method` ("magnitude" or "random"), as PEFT's `prune`.

    A concrete density >= 1 returns the tensor unchanged, with a warning.

    Args:
      tensor: the tensor to prune.
      density: fraction to keep, in [0, 1].
      method: "magnitude" (`magnitude_based_pruning`) or "random" (`random_pruning`).
      rescale: with "random", divide by density.
      key: required with "random".

    Returns:
      The pruned tensor.
    """
    v.check_choice("method", method, v.PRUNE_METHODS)
    x = v.as_float_array(tensor, "tensor")
    if method == "random":
        key = v.check_key(key)
    v.check_density(density)
    if v.is_concrete(density) and float(density) >= 1:
        return x
    if method == "magnitude":
        return _magnitude_kernel(x, density_to_k(density, x.size), v.is_partitioned(x))
    return _random_kernel(x, density, key, bool(rescale))
