"""Exact top-k by magnitude in linear time, without sort or top_k.

TIES-Merging (Yadav et al., 2023, arXiv:2306.01708) keeps the `k` entries of
largest magnitude of each task vector. PEFT does this with `torch.topk`; a
naive JAX port (`jax.lax.top_k` or `jnp.sort` over a flattened 16.7M-entry
tensor) takes 7-10 s on XLA:CPU. Here the k-th largest magnitude is found by a
search over the float bit patterns instead:

* For non-negative floats, the order of the values equals the order of their
  bit patterns read as unsigned integers, so "the k-th largest |x|" is "the
  largest integer T with count(bits >= T) >= k".
* Each search step is one counting pass. A sorted sample of 16K entries gives a
  tight first bracket, and interpolation steps (bisection whenever a step fails
  to halve the bracket) close it in a handful of passes on real weights. On
  discrete data (bfloat16 deltas, quantized weights), where most entries sit on
  a few values, the steps go to the sample's values and just past them
  (`_discrete_next_probe`): 2-5 passes where interpolation alone took up to 17.
  There, after the first probe, a pass counts at t and t + 1 at once
  (`row_counts_at_least_pair`, ~1.2-1.5x a single count): where T is the
  probed value the bracket closes in that pass instead of the next (bfloat16
  TinyLlama deltas: 2 passes per selection where 3 were usual).
* On continuous data (float32 deltas) entries are sparse near T, and secant
  steps crept up on it a few entries at a time. A count within 32 of k now
  aims 16 entries past k, on the other side of T, and a bracket holding at
  most 64 entries is settled in the rows that hold them (`_settle_in_rows`:
  those rows gathered, T built bit by bit over them) instead of by more
  passes over the tensor and a finishing pass (float32 deltas: 4-5 probes
  where 4-9 and one or two finishing passes were needed). Not for
  half-precision inputs, whose deltas repeat (the branch costs compile time).
* The count itself uses an exact float identity that XLA vectorises well:
  for adjacent floats tp < t, `clip(a, tp, t) - tp` is exactly the gap
  t - tp (a power of two) where a >= t and exactly 0 elsewhere, so a row sum
  divided by the gap is the exact count. It is used where t and t - tp are
  normal numbers (XLA:CPU flushes subnormals); elsewhere, and when the tensor
  holds NaN, an integer count of the bit patterns is used.
* Every pass reads the input itself and takes |x| on the fly: no tensor-sized
  temporary is ever made (see `_magnitude_rows`). A task vector `model - base`
  can be given as its two terms (`top_k_magnitude_mask(model, k, base=base)`):
  every pass then takes the difference itself, so the task vector is never
  written out either (XLA writes out whatever enters a loop or a branch).

Ties at the threshold are broken towards the lowest flat index, so exactly k
entries are kept. Per-row tie counts and a prefix sum inside one row find the
cut; this runs only when ties exist (`lax.cond`). The tie counts are the
difference of two per-row counts the search made (at T and at the next pattern
anyone holds), so breaking ties costs no pass over the tensor.

Counts are unsigned 32-bit (64-bit with x64), exact for tensors of up to
2**32 - 1 entries, past the 2**31 limit of a signed count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.core._dtypes import compute_dtype, count_dtype, max_count, separate_pass, uint_like
from jaxmerge.core._kernels import kernel

_SAMPLE_SIZE = 16384
# Called on the host with (probe, count - k, bracket width) at every probe of the search when set at
# trace time (tests count probes with it; `print` shows them).
_PROBE_HOOK = None
_MIN_DENSITY = 1e-30
_DISCRETE_REPEATS = 4  # equal neighbours among the sample's 65 nearest the estimate: discrete data
# Rows keep float32 row sums of 0/1 exact (< 2**24) and XLA:CPU's reductions fast.
_MAX_ROW = 16384  # longer rows fall off XLA:CPU's fast reduction path (measured: 13x slower at 65536)
_MIN_ROW = 256
_PAD_ROW = 4096
# Rows up to this length take the search's pair counts (`row_counts_at_least_pair`): two counts packed
# into one float32 row sum, count(t) + 4096 * count(t + 1), exact below 2**24.
_PAIR_MAX_ROW = 4095
# A bracket holding at most this many entries is settled from the rows that hold them
# (`_settle_in_rows`) instead of by more passes over the tensor.
_BLOCK_ROWS = 64
# Continuous data: once a probe's count is this close to k, the next aims this far past k, on the
# other side, so that the bracket closes around few entries.
_CLOSE, _STEER = 32, 16
# Unsharded tensors up to this size take `_bitwise_mask`: its 31 counting passes cost milliseconds,
# less than the compile time they save (float32, 2 cores, measured: 0.23 ms against 0.18 ms at 2048
# entries, 1.0 against 0.4 ms at 16384, 3.7 against 1.1 ms at 65536).
_BITWISE_MAX = 65536


@functools.lru_cache(maxsize=None)
def _row_length(n: int, longest: int = _MAX_ROW) -> int | None:
    """Largest divisor of n in [_MIN_ROW, longest], or None if there is none."""
    for d in range(min(n, longest), _MIN_ROW - 1, -1):
        if n % d == 0:
            return d
    return None


def flat_rows_shape(n: int) -> tuple[int, int] | None:
    """The (rows, row length) view of n flat entries that the selection itself takes, or None.

    Row length: the largest divisor of n in [256, 16384]; None when n has
    none. Tensors of one size share this view whatever their shape (a matrix
    and its transpose), so entry-wise merges of them share one compiled kernel.
    """
    length = _row_length(n)
    return None if length is None else (n // length, length)


def _parts(x) -> tuple:
    """The terms of the values selected on: `(x,)`, or `(model, base)` for the difference model - base."""
    return x if isinstance(x, tuple) else (x,)


def _values(parts: tuple, dtype) -> jax.Array:
    """The values selected on, in `dtype`: x, or model - base taken in `dtype` (rounded once, as the
    merge kernels take their task vectors)."""
    if len(parts) == 1:
        return parts[0].astype(dtype)
    model, base = parts
    return model.astype(dtype) - base.astype(dtype)


def _as_rows(a: jax.Array, partitioned: bool = False) -> jax.Array:
    """View the magnitudes as rows short enough for exact float row sums.

    Rows of at most `_PAIR_MAX_ROW` entries come first (the search's pair
    counts need them): the tensor's own rows when its last axis has such a
    length, else the flat entries cut at such a divisor of the size (free: a
    row-major reshape). A sharded tensor (`partitioned`) keeps its own rows
    whenever they are short enough for a row sum, so it is never re-laid out
    (which would gather it across devices). Otherwise the flat entries are cut
    at a divisor of the size up to `_MAX_ROW`; padding (with zeros, which the
    fast count never counts) is a copy, used only for sizes without one.
    """
    own = a.shape[-1] if a.ndim >= 2 else 0
    if _MIN_ROW <= own <= (_MAX_ROW if partitioned else _PAIR_MAX_ROW):
        return a.reshape(-1, own)
    n = a.size
    length = _row_length(n, _PAIR_MAX_ROW)
    if length is not None and not partitioned:
        return a.reshape(-1, length)
    if _MIN_ROW <= own <= _MAX_ROW:
        return a.reshape(-1, own)
    length = _row_length(n)
    if length is None:
        pad = (-n) % _PAD_ROW
        return jnp.pad(a.reshape(-1), (0, pad)).reshape(-1, _PAD_ROW)
    return a.reshape(-1, length)


class _BitLayout:
    """Constants of a float type's bit layout."""

    def __init__(self, dtype: jnp.dtype):
        info = jnp.finfo(dtype)
        bias = 1 - info.minexp
        self.float = jnp.dtype(dtype)
        self.uint = uint_like(dtype)
        self.inf_bits = (2 * bias + 1) << info.nmant
        self.mantissa_mask = (1 << info.nmant) - 1
        # Smallest threshold for which t and the gap t - prev(t) are normal
        # numbers (one binade of margin), so flush-to-zero cannot bite.
        self.fast_lo_bits = (info.minexp + info.nmant + 2 + bias) << info.nmant


def _gap_where_at_least(rows, threshold_bits, layout: _BitLayout):
    """(clip(|x|, t_prev, t) - t_prev, t - t_prev) for t and its predecessor t_prev.

    The first is exactly the gap t - t_prev (a power of two) where |x| >= t
    and exactly 0 elsewhere. Valid where `_fast_threshold` holds.
    """
    t = lax.bitcast_convert_type(threshold_bits, layout.float)
    t_prev = lax.bitcast_convert_type(threshold_bits - 1, layout.float)
    return jnp.clip(_magnitudes(rows, layout), t_prev, t) - t_prev, t - t_prev


def _at_least_indicator(rows, threshold_bits, layout: _BitLayout):
    """Exactly 1.0 where |rows| >= t and 0.0 elsewhere, by arithmetic alone."""
    gaps, gap = _gap_where_at_least(rows, threshold_bits, layout)
    return gaps * (1 / gap)


def _fast_threshold(threshold_bits, layout: _BitLayout, fast_ok):
    """The indicator is exact here: no NaN in the tensor, t and its gap normal, t finite."""
    return fast_ok & (threshold_bits >= layout.fast_lo_bits) & (threshold_bits < layout.inf_bits)


def _magnitudes(rows, layout: _BitLayout):
    """|rows| (or |model - base| for a pair of rows) in the layout's float type, computed inside each
    pass that reads them."""
    return jnp.abs(_values(_parts(rows), layout.float))


def _magnitude_bits(rows, layout: _BitLayout):
    return lax.bitcast_convert_type(_magnitudes(rows, layout), layout.uint)


def row_counts_at_least(rows, threshold_bits, layout: _BitLayout, fast_ok):
    """Per row, the number of entries whose magnitude bits are >= `threshold_bits` (exact).

    Args:
      rows: values shaped (R, L), padded with zeros if needed (zeros are
        never counted: thresholds are >= 1); or a (model, base) pair of such
        rows, counted on their difference.
      threshold_bits: unsigned scalar, >= 1.
      layout: the float type's constants.
      fast_ok: bool scalar, False when the tensor holds NaN.

    Returns:
      (R,) counts in `count_dtype()`.
    """
    cdt = count_dtype()

    def fast(tb):
        # Each entry adds 0 or the gap, a power of two, so the row sums are
        # exact multiples of it (rows < 2**24 entries): scaling the sums replaces
        # a multiply per entry.
        gaps, gap = _gap_where_at_least(rows, tb, layout)
        return (gaps.sum(axis=1) * (1 / gap)).astype(cdt)

    def slow(tb):
        return (_magnitude_bits(rows, layout) >= tb).sum(axis=1, dtype=cdt)

    return lax.cond(_fast_threshold(threshold_bits, layout, fast_ok), fast, slow, threshold_bits)


def _pair_threshold(threshold_bits, layout: _BitLayout, fast_ok):
    """`row_counts_at_least_pair` is exact here: t and t + 1 are fast thresholds and t is not a power of
    two, so the gaps below and above t are the same power of two."""
    mantissa = threshold_bits & jnp.asarray(layout.mantissa_mask, layout.uint)
    return _fast_threshold(threshold_bits, layout, fast_ok) & _fast_threshold(threshold_bits + 1, layout, fast_ok) & (
        mantissa != 0)


def row_counts_at_least_pair(rows, threshold_bits, layout: _BitLayout):
    """Per row, the counts at `threshold_bits` and at the next pattern, in one pass (exact).

    For t and its neighbours t_prev < t < t_next one gap apart, each entry
    adds `clip(a, t_prev, t) - t_prev` (the gap where a >= t, else 0) plus
    4096 times `clip(a, t, t_next) - t` (the gap where a >= t_next, else 0).
    Every term is a multiple of the gap and a row sum stays below 2**24 gaps
    (rows of at most `_PAIR_MAX_ROW` entries), so the scaled sum is exactly
    count(t) + 4096 * count(t_next), unpacked with integer operations. The
    pass costs 1.2-1.5 single counts (a 5632 x 2048 bfloat16 difference, 2 CPU
    cores: 5.5 ms inside a TIES kernel, against 3.7 ms) and settles whether the
    bracket closes at t.

    Args:
      rows: as `row_counts_at_least` takes them, rows of at most `_PAIR_MAX_ROW` entries.
      threshold_bits: unsigned scalar where `_pair_threshold` holds.
      layout: the float type's constants.

    Returns:
      ((R,) counts at t, (R,) counts at t + 1), in `count_dtype()`.
    """
    cdt = count_dtype()
    t = lax.bitcast_convert_type(threshold_bits, layout.float)
    t_prev = lax.bitcast_convert_type(threshold_bits - 1, layout.float)
    t_next = lax.bitcast_convert_type(threshold_bits + 1, layout.float)
    a = _magnitudes(rows, layout)
    scale = np.float32(_PAIR_SCALE).astype(layout.float)
    packed = (jnp.clip(a, t_prev, t) - t_prev) + scale * (jnp.clip(a, t, t_next) - t)
    counts = (packed.sum(axis=1) * (1 / (t - t_prev))).astype(cdt)
    at_next = counts // cdt.type(_PAIR_SCALE)
    return counts - at_next * cdt.type(_PAIR_SCALE), at_next


_PAIR_SCALE = 4096  # above every row's count (rows <= _PAIR_MAX_ROW); 4095 * 4097 < 2**24


def _sample_start(rows, n: int, k, layout: _BitLayout):
    """First probe and local density, from a sorted strided sample of about 16K entries.

    The sample is a strided slice of the rows (no gather), so it partitions
    with a sharded tensor. Padding zeros may enter it; they only shift the guess.

    Returns:
      (bits of the sample's estimate of the k-th largest, estimated number of
      entries per unit of bit pattern near it, the sorted sample's bits, whether
      the data looks discrete: `_DISCRETE_REPEATS` or more equal neighbours among the
      sample's 65 values nearest to the estimate, as bfloat16 deltas or quantized
      weights have and continuous float32 deltas do not).
    """
    per_axis = int(np.sqrt(_SAMPLE_SIZE))
    shape = _parts(rows)[0].shape
    strides = (max(1, shape[0] // per_axis), max(1, shape[1] // per_axis))
    sample = tuple(r[:: strides[0], :: strides[1]].reshape(-1) for r in _parts(rows))
    s = sample[0].size
    # Sorting the bit patterns orders the magnitudes (NaN last) and is 5x faster
    # than a float sort on XLA:CPU.
    sample_bits = jnp.sort(_magnitude_bits(sample, layout))
    pos = jnp.round(s * (1 - k.astype(jnp.float32) / np.float32(n))).astype(jnp.int32)
    j = jnp.clip(pos, 0, s - 1)
    j_lo, j_hi = jnp.maximum(j - 32, 0), jnp.minimum(j + 32, s - 1)
    span = (sample_bits[j_hi] - sample_bits[j_lo]).astype(jnp.float32)
    density = (j_hi - j_lo).astype(jnp.float32) * np.float32(n / s) / jnp.maximum(span, 1.0)
    width = min(65, s)
    window = lax.dynamic_slice(sample_bits, (jnp.clip(j_lo, 0, s - width),), (width,))
    # Continuous float32 data repeats a value in the window by coincidence (once in ~5% of tensors with
    # a full sample, a standard normal); discrete data repeats dozens of times.
    discrete = jnp.sum(window[1:] == window[:-1]) >= _DISCRETE_REPEATS
    return sample_bits[j], jnp.maximum(density, _MIN_DENSITY), sample_bits, discrete


def _bound_bits(rows, layout: _BitLayout):
    """A bit pattern no magnitude reaches, for the search's first bracket, and whether the fast
    counts may be used (no magnitude is NaN, which they cannot count).

    Where the inputs are finite (one summing pass per input: `_all_finite`), no magnitude is NaN,
    not even a difference model - base that overflows to inf, so the pattern just above +inf's
    bounds them all. Otherwise the sign bit's pattern, above every magnitude's, NaN's included,
    and the exact integer counts.

    An exact maximum took a max, a min and that sum per input (XLA:CPU's vectorised float max
    and min may skip NaN, so a sum had to find it anyway): a 5632 x 2048 bfloat16 TIES kernel of
    3 models and a base made 15 such passes of ~0.8 ms, now 4 (one per input: the tasks share the
    base's), and took 46-53 ms instead of 42-45 (2 CPU cores). The search needs no tighter bound:
    its first probe comes from the sample, and at most doubling the bracket costs at most one more
    bisection step.

    Returns:
      (bound bits, fast counts allowed).
    """
    finite = functools.reduce(jnp.logical_and, [_all_finite(p, layout) for p in _parts(rows)])
    above_all = 1 << (8 * layout.uint.itemsize - 1)  # the sign bit: magnitudes have it clear
    bound = jnp.where(finite, jnp.asarray(layout.inf_bits + 1, layout.uint), jnp.asarray(above_all, layout.uint))
    return bound, finite


def _all_finite(x, layout: _BitLayout):
    """True when the sum of x is finite, so that no entry is NaN or inf (both propagate through a sum,
    where XLA:CPU's vectorised max and min may skip NaN); False also when huge finite values overflow
    it. One pass: ~0.7 ms per 11.5M bfloat16 entries on 2 CPU cores."""
    (x,) = separate_pass(x)  # its own widening: one shared with the counting passes would be written out
    return jnp.isfinite(jnp.sum(x, dtype=layout.float))


def _signed_diff(x, y):
    """x - y of two unsigned counts, as float32, without wrap-around."""
    return jnp.where(x >= y, (x - y).astype(jnp.float32), -((y - x).astype(jnp.float32)))


def _magnitude_rows(x, layout: _BitLayout, partitioned: bool = False):
    """The rows every pass reads, a bit pattern no magnitude reaches and whether the fast counts may be
    used (`_bound_bits`).

    The rows hold the signed values (a tuple: x's rows, or both terms' rows
    for a difference) and every pass takes |x| itself: an |x| computed once would be a
    tensor-sized temporary, and inside the search loop XLA hoists it out and
    copies it into the loop state (measured: +26 ms per 16.7M entries, more
    than the whole search).
    """
    rows = tuple(_as_rows(p, partitioned) for p in _parts(x))
    return (rows, *_bound_bits(rows, layout))


def kth_largest_magnitude_bits(x, k):
    """Find T, the bit pattern of the k-th largest magnitude |x|.

    The search keeps a bracket lo <= T < hi with count(lo) >= k > count(hi)
    and probes by secant steps on the two latest counts, starting from a
    sample estimate. It stops early when count(lo) == k (T is then the
    smallest entry >= lo) or count(hi) == k - 1 (T is the largest entry < hi).
    Out-of-bracket steps probe just inside the bracket; repeated stalls fall
    back to bisection, so it always ends (at most ~4 probes per bit).

    Args:
      x: floats, any shape (half precision is compared in float32).
      k: count scalar, 1 <= k <= x.size.

    Returns:
      (T, count(bits >= T)). The latter is >= k; it exceeds k only when
      entries tie at T (at T = 0 it counts the zeros that pad the rows).
    """
    layout = _BitLayout(compute_dtype(x.dtype))
    return _search(*_magnitude_rows(x, layout), x.size, k, layout)[:2]


def _snap_to_sample(t, lo, hi, sample_bits):
    """Move a probe onto the staircase of discrete data: a sample value, or one past it.

    With discrete data (bfloat16 weights' deltas, quantized models) the count is
    a staircase and T is likely one of the sample's values: secant steps approach
    such a step slowly, while probing the sample value v at or above t (count
    >= v) or u + 1 for the sample value u below t (count > u) lands on its
    edges. The nearer of the two inside the bracket (lo, hi) is taken, else t.
    """
    i = jnp.searchsorted(sample_bits, t)
    up = sample_bits[jnp.minimum(i, sample_bits.size - 1)]
    past = sample_bits[jnp.maximum(i - 1, 0)] + 1
    up_ok = (i < sample_bits.size) & (up > lo) & (up < hi)
    past_ok = (i > 0) & (past > lo) & (past < hi)
    up_nearer = (up - t) <= (t - jnp.minimum(past, t))
    return jnp.where(up_ok & (up_nearer | ~past_ok), up, jnp.where(past_ok, past, t))


def _discrete_next_probe(t, c, k, moved_lo, lo, hi, secant_t, sample_bits, n: int):
    """The next probe on discrete data (bfloat16 deltas, quantized weights), read from the sample.

    There count(t) is a staircase: most entries sit on a few values and T is
    usually one of them, tied many times. Secant steps in bit patterns cross
    such a step slowly, while the sorted sample holds every frequent value:

    * Past a spike: after a probe at a sample value t whose ties, as the sample
      estimates them, could hold all of count - k, probe t + 1. A count below k
      there closes the bracket (T = t).
    * Onto a spike: after a probe t with count < k, probe the sample value v
      below t if the entries the sample puts in [v, t) could make up k - count.
    * Otherwise, while count is two or more sample steps (n / sample size
      entries) from k, step along the sorted sample by the entries still to pass.

    Else the secant's probe stands. The search stays exact whatever is probed
    (proposals lie inside the bracket); only the number of probes changes:
    15 tensors of a TinyLlama-shaped bfloat16 model, 3 tasks, density 0.2:
    132 probes before, 49 with these steps (the search 1.33 s -> 0.56 s).

    Args:
      t, c: the probe just made and its count; moved_lo: c >= k.
      k: the count sought; lo, hi: the bracket after the probe.
      secant_t: the secant's next probe.
      sample_bits: the sorted sample's bit patterns; n: the tensor's size.

    Returns:
      The next probe.
    """
    s = sample_bits.size
    per_sample = np.float32(n / s)  # entries of the tensor that one sample entry stands for
    first = jnp.searchsorted(sample_bits, t, side="left")
    last = jnp.searchsorted(sample_bits, t, side="right")
    # The factors of 2 allow for the sample's error in estimating counts.
    ties = (last - first).astype(jnp.float32) * per_sample
    past_spike = moved_lo & (last > first) & (2 * ties >= _signed_diff(c, k)) & (t + 1 < hi)
    v = sample_bits[jnp.maximum(first - 1, 0)]
    gained = (first - jnp.searchsorted(sample_bits, v, side="left")).astype(jnp.float32) * per_sample
    onto_spike = ~moved_lo & (first > 0) & (v > lo) & (2 * gained >= _signed_diff(k, c))
    steps = jnp.ceil(jnp.abs(_signed_diff(c, k)) / per_sample).astype(jnp.int32)
    ranked = sample_bits[jnp.clip(jnp.where(moved_lo, first + steps - 1, first - steps), 0, s - 1)]
    ranked_ok = (steps >= 2) & (ranked > lo) & (ranked < hi)
    return jnp.where(past_spike, t + 1, jnp.where(onto_spike, v, jnp.where(ranked_ok, ranked, secant_t)))


def _largest_threshold(count_at_least, wanted, prefix, free_bits, uint):
    """The largest pattern T that is `prefix` with its lowest `free_bits` bits set, such that
    `count_at_least(T) >= wanted`: built one bit at a time from the top, one count per bit (the
    count falls as T grows, so each bit is kept exactly where the count still reaches `wanted`).

    Args:
      count_at_least: pattern -> count of entries at or above it.
      wanted: the count to reach.
      prefix: the bits T is known to have, its lowest `free_bits` bits clear.
      free_bits: int or int32 scalar, bits to search.
      uint: the patterns' unsigned type.
    """
    one = jnp.ones((), uint)

    def keep_bit(i, threshold):
        candidate = threshold | lax.shift_left(one, (free_bits - 1 - i).astype(uint))
        return jnp.where(count_at_least(candidate) >= wanted, candidate, threshold)

    return lax.fori_loop(0, free_bits, keep_bit, prefix)


def _settle_in_rows(rows, lo, hi, c_hi, rows_lo, rows_hi, k, layout: _BitLayout):
    """T and the search's results from the few rows that hold the bracket's entries.

    The entries in [lo, hi) are counted per row (`rows_lo - rows_hi`); where
    they lie in at most `_BLOCK_ROWS` rows, those rows are gathered and T, the
    (k - count(hi))-th largest of the entries in the bracket, is built one bit
    at a time from the top (a count over the gathered rows per bit below the
    patterns lo and hi share). This replaces the search's last probes and its
    finishing pass on continuous data, where entries are sparse near T and
    secant steps approach it a few entries at a time.

    Returns:
      (T, count(T), per row the entries tied at T).
    """
    cdt = count_dtype()
    uint = layout.uint
    num_rows = _parts(rows)[0].shape[0]
    row_ids = lax.iota(jnp.int32, num_rows)
    # The rows holding entries of the bracket, first to last (`top_k` of a score that falls with the
    # row index: it compiles in a fraction of `nonzero`'s time); scores of 0 pad (not counted).
    score = jnp.where(rows_lo > rows_hi, num_rows - row_ids, 0)
    held, index = lax.top_k(score, min(_BLOCK_ROWS, num_rows))
    valid = (held > 0)[:, None]
    gathered = tuple(p[index] for p in _parts(rows))
    bits = _magnitude_bits(gathered, layout)
    inside = valid & (bits >= lo) & (bits < hi)
    rank = k - c_hi  # T is the rank-th largest entry of the bracket, 1 <= rank <= its entries

    def count_at_least(tb):
        return jnp.sum(inside & (bits >= tb), dtype=cdt)

    # T shares lo's and hi's leading bits; only the bits below them are searched.
    free_bits = jnp.asarray(8 * uint.itemsize, jnp.int32) - lax.clz(lo ^ hi).astype(jnp.int32)
    prefix = lax.shift_left(lax.shift_right_logical(lo, free_bits.astype(uint)), free_bits.astype(uint))
    threshold = _largest_threshold(count_at_least, rank, prefix, free_bits, uint)
    count_ge = c_hi + count_at_least(threshold)
    tied_rows = jnp.sum(inside & (bits == threshold), axis=1, dtype=cdt)
    # Back to every row: a sum over the gathered rows of one-hot rows (padding adds 0).
    tied = jnp.sum(jnp.where(index[:, None] == row_ids, tied_rows[:, None], 0), axis=0, dtype=cdt)
    return threshold, count_ge, tied


def _search(rows, bound_bits, fast_ok, n: int, k, layout: _BitLayout, partitioned: bool = False):
    """`kth_largest_magnitude_bits` on prepared rows (see `_magnitude_rows`), and per row the number
    of entries tied at T where the tie break needs them (count(T) > k): the difference of two per-row
    counts the search has made anyway (the bracket's ends, or T and hi), so no pass of its own.

    Unless `partitioned` or the inputs are half-precision, a bracket whose entries lie in at most
    `_BLOCK_ROWS` rows is settled in those rows (`_settle_in_rows`)."""
    cdt = count_dtype()
    uint = layout.uint
    k = k.astype(cdt)

    def count(tb):  # the total and the per-row counts, which the tie break reuses
        per_row = row_counts_at_least(rows, tb, layout, fast_ok)
        return per_row.sum(dtype=cdt), per_row

    pairs = _parts(rows)[0].shape[1] <= _PAIR_MAX_ROW

    def count_pair(tb):  # count(t) and count(t + 1), in one pass
        at_t, at_next = row_counts_at_least_pair(rows, tb, layout)
        return at_t.sum(dtype=cdt), at_t, at_next.sum(dtype=cdt), at_next

    def count_one(tb):  # count(t) only; its copy in the second place is not read
        total, per_row = count(tb)
        return total, per_row, total, per_row

    def fast_threshold(tb):
        return _fast_threshold(tb, layout, fast_ok)

    # Half-precision inputs (bfloat16, float16) sit on a coarse grid: their values and deltas repeat, T
    # is tied thousands of times and brackets rarely hold few entries, so their kernels go without
    # the settling branch, which adds ~0.4 s to a TIES kernel's compilation (2 CPU cores).
    blocks = not partitioned and jnp.dtype(_parts(rows)[0].dtype).itemsize >= 4

    def few_entries(c_lo, c_hi):  # the bracket's entries fit the rows `_settle_in_rows` gathers
        return (c_lo - c_hi <= _BLOCK_ROWS) if blocks else jnp.bool_(False)

    def not_done(carry):
        lo, c_lo, hi, c_hi = carry[:4]
        return (hi - lo > 1) & (c_lo != k) & (c_hi != k - 1) & ~few_entries(c_lo, c_hi)

    def step(carry):
        lo, c_lo, hi, c_hi, t, prev_t, prev_c, density, outside, stall, rows_lo, rows_hi, first = carry
        width = hi - lo
        bisect = (stall >= 3) | (outside >= 2)
        below, above = t <= lo, t >= hi
        # Snapping lands on the steps of discrete data; on continuous data it only throws away a
        # secant step (float32 Llama deltas: 14-20 probes for 3 tasks without it, 16-22 with it).
        snap = discrete & (stall >= 1) & ~(bisect | below | above)
        t = jnp.where(snap, _snap_to_sample(t, lo, hi, sample_bits), t)
        t = jnp.where(bisect, lo + width // 2, jnp.where(below, lo + 1, jnp.where(above, hi - 1, t)))
        outside = jnp.where(bisect | ~(below | above), 0, outside + 1)
        stall = jnp.where(bisect, 0, stall)
        # On discrete data, probes after the first land on the sample's values, where T usually is:
        # count(t + 1) then settles whether T == t (the bracket closes at t). The pair pass counts it
        # with count(t) for half a pass, where it would take a probe of its own.
        paired = (discrete & ~first & _pair_threshold(t, layout, fast_ok)) if pairs else jnp.bool_(False)
        c, rows_t, c_next, rows_next = lax.cond(paired, count_pair, count_one, t) if pairs else (*count(t), None, None)
        moved_lo = c >= k
        lo, c_lo = jnp.where(moved_lo, t, lo), jnp.where(moved_lo, c, c_lo)
        hi, c_hi = jnp.where(moved_lo, hi, t), jnp.where(moved_lo, c_hi, c)
        rows_lo, rows_hi = jnp.where(moved_lo, rows_t, rows_lo), jnp.where(moved_lo, rows_hi, rows_t)
        if pairs:
            next_up = paired & moved_lo & (c_next >= k)  # T > t: lo moves on to t + 1 (t + 1 < hi)
            next_closes = paired & moved_lo & (c_next < k)  # T == t: hi comes down to t + 1
            lo, c_lo = jnp.where(next_up, t + 1, lo), jnp.where(next_up, c_next, c_lo)
            hi, c_hi = jnp.where(next_closes, t + 1, hi), jnp.where(next_closes, c_next, c_hi)
            rows_lo = jnp.where(next_up, rows_next, rows_lo)
            rows_hi = jnp.where(next_closes, rows_next, rows_hi)
            # The steps below go on from the nearer probe to T.
            t, c = jnp.where(next_up, t + 1, t), jnp.where(next_up, c_next, c)
        stall = jnp.where(hi - lo > width // 2, stall + 1, 0)
        # Secant estimate of the density (entries per bit-pattern unit) from the
        # two latest probes; counts fall as t grows.
        up = t > prev_t
        dt = jnp.where(up, t - prev_t, prev_t - t).astype(jnp.float32)
        dc = jnp.where(up, prev_c - c, c - prev_c).astype(jnp.float32)
        density = jnp.where((dt > 0) & (dc > 0), dc / jnp.maximum(dt, 1.0), density)
        # Next probe: move by (count - k) / density, towards T. On continuous data, a count within
        # _CLOSE of k aims _STEER entries past it, so that the next probe lands on the other side of T
        # and the bracket holds few entries (`_settle_in_rows`) rather than creeping up on T.
        miss = _signed_diff(c, k)
        steer = (~discrete & (jnp.abs(miss) <= _CLOSE)) if blocks else jnp.bool_(False)
        move = (miss + jnp.where(steer, jnp.sign(miss) * _STEER, 0)) / density
        new_width = (hi - lo).astype(jnp.float32)
        dist = jnp.minimum(jnp.ceil(jnp.abs(move)), new_width)
        offset = dist.astype(uint)
        next_t = jnp.where(
            moved_lo,
            jnp.where(dist >= new_width, hi, t + offset),
            jnp.where(dist >= new_width, lo, t - jnp.minimum(offset, t)),
        )
        discrete_t = _discrete_next_probe(t, c, k, moved_lo, lo, hi, next_t, sample_bits, n)
        next_t = jnp.where(discrete, discrete_t, next_t)
        if _PROBE_HOOK is not None:
            jax.debug.callback(_PROBE_HOOK, t, _signed_diff(c, k), width)
        return lo, c_lo, hi, c_hi, next_t, t, c, density, outside, stall, rows_lo, rows_hi, jnp.bool_(False)

    start, density, sample_bits, discrete = _sample_start(rows, n, k, layout)
    zero = jnp.zeros((), uint)
    num_rows, row_length = _parts(rows)[0].shape
    # count(0) is every entry of the rows, padding zeros included, as a counting pass at 0 finds it;
    # nothing reaches bound_bits.
    init = (
        zero, jnp.asarray(num_rows * row_length, cdt), bound_bits, jnp.zeros((), cdt),
        # prev = (start, 0): the first step has no secant pair and keeps the sample density.
        start, start, jnp.zeros((), cdt), density, jnp.int32(0), jnp.int32(0),
        jnp.full((num_rows,), row_length, cdt), jnp.zeros((num_rows,), cdt), jnp.bool_(True),
    )
    lo, c_lo, hi, c_hi, *_, rows_lo, rows_hi, _ = lax.while_loop(not_done, step, init)

    # A select feeding a reduction is XLA:CPU's slow path (~25 ms per 16.7M
    # entries); multiplying by the exact 0/1 indicator keeps it on the fast one.
    big = jnp.finfo(layout.float).max

    def smallest_at_least(_):
        # count(lo) == k: no entry lies in [lo, T), so T is the smallest entry >= lo.
        def fast(tb):
            ind = _at_least_indicator(rows, tb, layout)
            return lax.bitcast_convert_type((_magnitudes(rows, layout) * ind + (1 - ind) * big).min(), uint)

        def slow(tb):
            bits = _magnitude_bits(rows, layout)
            return jnp.where(bits >= tb, bits, jnp.asarray(jnp.iinfo(uint).max, uint)).min()

        # count(T) == k: nothing to break, so no tie counts.
        return lax.cond(fast_threshold(lo), fast, slow, lo), c_lo, jnp.zeros_like(rows_lo)

    def largest_below(_):
        # count(hi) == k - 1: T is the largest entry below hi.
        def fast(tb):
            # Entries >= hi become 0 (neutral: T >= 0); inf is clamped first so that inf * 0 is not NaN.
            below = jnp.minimum(_magnitudes(rows, layout), big) * (1 - _at_least_indicator(rows, tb, layout))
            found = lax.bitcast_convert_type(below.max(), uint)
            # T >= lo: a smaller maximum means XLA:CPU flushed a subnormal T to zero.
            return lax.cond(found >= lo, lambda: found, lambda: slow(tb))

        def slow(tb):
            bits = _magnitude_bits(rows, layout)
            return jnp.where(bits < tb, bits, jnp.zeros((), uint)).max()

        threshold = lax.cond(fast_threshold(hi), fast, slow, hi)
        count_ge, rows_ge = count(threshold)
        # No entry lies between T and hi, so the entries at T are those counted at T and not at hi.
        return threshold, count_ge, rows_ge - rows_hi

    def bracket_closed(_):  # hi == lo + 1: the entries at lo are those counted at lo and not at hi
        return lo, c_lo, rows_lo - rows_hi

    def settle_in_rows(_):
        return _settle_in_rows(rows, lo, hi, c_hi, rows_lo, rows_hi, k, layout)

    # A closed bracket first: it needs no pass (the others do), whatever the counts at its ends; then
    # one with few entries (a pass over a few rows); else a finishing pass over the tensor.
    branch = jnp.where(hi - lo <= 1, 2, jnp.where(few_entries(c_lo, c_hi), 3, jnp.where(
        c_lo == k, 0, jnp.where(c_hi == k - 1, 1, 2))))
    branches = (smallest_at_least, largest_below, bracket_closed) + ((settle_in_rows,) if blocks else ())
    return lax.switch(branch, branches, None)


def _tie_cut_index(rows, threshold, count_ge, tied, k, layout: _BitLayout, partitioned: bool):
    """Flat index P such that the entries tied at `threshold` with index < P are
    exactly the tied entries to keep (the lowest indices come first).

    A prefix sum of the per-row tie counts `tied` (the search's), and a prefix
    sum inside the one row where the last kept tie falls: no full-size cumsum
    (170 ms at 16.7M entries on XLA:CPU). `count_ge`: the number of entries of
    the rows at or above the threshold (the search's; the rows' padding zeros
    count at threshold 0, in `tied` too).
    """
    cdt = count_dtype()
    shape = _parts(rows)[0].shape
    need = k - (count_ge - tied.sum(dtype=cdt))  # tied entries to keep, >= 1
    tied_before = jnp.cumsum(tied, dtype=cdt) - tied
    row = jnp.sum(tied_before < need, dtype=jnp.int32) - 1
    rows_bits = _magnitude_bits(rows, layout)
    if partitioned:
        # A masked sum over rows: a dynamic slice would gather a sharded tensor onto every device.
        row_ids = lax.broadcasted_iota(jnp.int32, shape, 0)
        tied_in_row = ((rows_bits == threshold) & (row_ids == row)).sum(axis=0, dtype=cdt)
    else:
        # One row's slice: no extra pass over the tensor.
        tied_in_row = lax.dynamic_index_in_dim(rows_bits, row, 0, keepdims=False) == threshold
    rank_in_row = jnp.cumsum(tied_in_row, dtype=cdt)
    # Column of the last kept tie, plus one.
    column = jnp.sum(rank_in_row < need - tied_before[row], dtype=cdt) + 1
    return row.astype(cdt) * shape[1] + column


def _flat_index(shape) -> jax.Array:
    """Row-major flat index of every entry, as a count (exact below 2**32 without x64)."""
    cdt = count_dtype()
    index = jnp.zeros(shape, cdt)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(cdt, shape, axis) * cdt.type(stride)
        stride *= shape[axis]
    return index


# Jitted on its own so that a kernel selecting in several same-shaped tasks traces and lowers it
# once (XLA inlines it back into the kernel): TIES on the six shapes of a Llama traces and lowers
# in 0.6 s instead of 1.1 s and compiles in 3.8 s instead of 4.1 s on 2 cores.
@kernel(static_argnames="partitioned")
def top_k_magnitude_mask(x: jax.Array, k, partitioned: bool = False, base: jax.Array | None = None) -> jax.Array:
    """Boolean mask with exactly `k` True entries: those of largest |x| (or |x - base|).

    Ties at the threshold are broken towards the lowest flat (row-major) index.
    Unsharded tensors of up to 65536 entries (norms, biases, small models) take
    `_bitwise_mask`, a short program that compiles 2-4x faster than the search
    (0.3-0.6 s against 1.3-1.7 s on 2 cores, measured) at a few milliseconds of run
    time at most; larger ones take the search (`_counting_mask`). Both give the
    same mask.

    Args:
      x: a floating array.
      k: number of entries to keep, a count scalar (traced is fine), 0 <= k <= x.size.
      partitioned: x is sharded over several devices: use only operations that
        partition without gathering x (static; one extra pass in the tie break).
      base: optional, of x's shape: select on the task vector `x - base`, taken
        in x's compute dtype (`x.astype(cd) - base.astype(cd)`, as the merge
        kernels take it) inside every pass: the caller's task vector is then
        only computed where it is used, never written out whole (a float32
        tensor per task for bfloat16 models).

    Returns:
      A bool array of x's shape.
    """
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base has shape {base.shape}, x has {x.shape}")
    n = x.size
    if n == 0:  # nothing to select (PEFT returns the empty tensor)
        return jnp.zeros(x.shape, jnp.bool_)
    if n > max_count():
        raise ValueError(
            f"tensor of {n} entries is larger than {max_count()}, the largest count this "
            "configuration can represent; enable jax_enable_x64"
        )
    k = jnp.clip(jnp.asarray(k).astype(count_dtype()), 0, n)
    parts = (x,) if base is None else (x, base)
    if n <= _BITWISE_MAX and not partitioned:  # its flat prefix sum would gather a sharded x
        return _bitwise_mask(parts, k)
    return _counting_mask(parts, k, partitioned)



def _bitwise_mask(x: jax.Array, k) -> jax.Array:
    """`top_k_magnitude_mask` for small tensors, k a clipped count: the k-th largest magnitude's bit
    pattern T is built one bit at a time from the top (keep a bit where count(bits >= T) >= k still
    holds: one counting pass per bit), then the entries tied at T are kept in flat order by a
    prefix sum. No sample, no bracket, no branches: a program a fraction of the search's size."""
    parts = _parts(x)
    layout = _BitLayout(compute_dtype(parts[0].dtype))
    cdt = count_dtype()
    bits = _magnitude_bits(tuple(p.reshape(-1) for p in parts), layout)
    width = 8 * layout.uint.itemsize - 1  # |x| has a clear sign bit
    wanted = jnp.maximum(k, 1)  # k == 0 keeps nothing below (no entry lies above the largest)
    threshold = _largest_threshold(lambda tb: jnp.sum(bits >= tb, dtype=cdt), wanted, jnp.zeros((), layout.uint),
                                   width, layout.uint)
    above = bits > threshold
    tied = bits == threshold
    need = k - jnp.sum(above, dtype=cdt)  # 0 <= need: fewer than `wanted` entries lie above T
    keep = above | (tied & (jnp.cumsum(tied, dtype=cdt) <= need))
    return keep.reshape(parts[0].shape)


def _counting_mask(x: jax.Array, k, partitioned: bool) -> jax.Array:
    """`top_k_magnitude_mask` by the search of the module docstring, k a clipped count; x an array or
    a (model, base) pair."""
    first = _parts(x)[0]
    shape, n = first.shape, first.size
    cdt = count_dtype()
    # Half-precision values are widened inside each pass, never copied whole.
    layout = _BitLayout(compute_dtype(first.dtype))
    uint = layout.uint
    never = jnp.asarray(n, cdt)  # a cut index past the end: no tie is dropped

    # One preparation (rows and the bound's pass) serves the search and the tie break. Made outside
    # the branch: the same base's pass in several tasks' selections is then one to XLA.
    rows, bound_bits, fast_ok = _magnitude_rows(x, layout, partitioned)

    def select():
        threshold, count_ge, tied = _search(rows, bound_bits, fast_ok, n, jnp.maximum(k, 1), layout, partitioned)
        needs_tie_break = count_ge > k
        cut = lax.cond(
            needs_tie_break,
            lambda: _tie_cut_index(rows, threshold, count_ge, tied, k, layout, partitioned),
            lambda: never,
        )
        return threshold, cut

    def trivial():
        # k == n keeps everything (threshold 0); k == 0 keeps nothing (above any pattern).
        everything = jnp.zeros((), uint)
        nothing = jnp.asarray(jnp.iinfo(uint).max, uint)
        return jnp.where(k >= n, everything, nothing), never

    threshold, cut = lax.cond((k == 0) | (k >= n), trivial, select)
    # Entries tied at the threshold from the cut on need one more unit to pass.
    bits = _magnitude_bits(x, layout)
    above_cut = (_flat_index(shape) >= cut).astype(uint)
    # |x| has a clear sign bit, so no pattern reaches the all-ones "nothing" threshold.
    return bits >= threshold + above_cut


def masked(x: jax.Array, keep: jax.Array) -> jax.Array:
    """`x * keep` as torch computes it: dropped entries are `x * 0`, so NaN and inf become NaN.

    Written as a select of `x * 0` because XLA rewrites a product with a
    converted boolean into a select of 0, which would hide a NaN.
    """
    return jnp.where(keep, x, x * jnp.zeros((), x.dtype))


def keep_top_k_magnitude(x: jax.Array, k, partitioned: bool = False) -> jax.Array:
    """x with all but its k largest-magnitude entries zeroed as PEFT does (`masked`; exact count, see module doc)."""
    return masked(x, top_k_magnitude_mask(x, k, partitioned))


def density_to_k(density, n: int):
    """Number of entries to keep, exactly as PEFT computes it: int(density * n).

    A concrete density is converted on the host with Python float arithmetic
    (bit-for-bit PEFT's k); a traced density is converted in the graph, in the
    widest float type available. Densities >= 1 keep everything.

    Returns:
      A count scalar of `count_dtype()`: a NumPy scalar for a concrete
      density (it goes to the kernel without an eager device transfer), else traced.
    """
    cdt = count_dtype()
    if not isinstance(density, jax.core.Tracer):
        d = float(density)
        k = n if d >= 1 else int(d * n)
        return np.asarray(k, cdt)
    wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    k = jnp.floor(jnp.asarray(density, wide) * wide(n))
    return jnp.clip(k, 0, n).astype(cdt)

