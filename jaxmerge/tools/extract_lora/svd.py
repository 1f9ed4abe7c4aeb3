"""The SVD kernels of `jaxmerge extract-lora`: exact and randomized truncated SVD, jitted, and one matrix's
LoRA factors with what they keep (`ModuleReport`).

Truncation keeps the top singular triplets, the best approximation of its rank in the Frobenius
norm (Eckart & Young, 1936). The randomized SVD is Halko, Martinsson & Tropp (2011,
arXiv:0909.4061), Algorithms 4.4 and 5.1 (see the package docstring for the oversampling and
power-iteration rule and its measured error).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core._kernels import kernel
from jaxmerge.engine.lapack_threads import limit_lapack_threads
from jaxmerge.formats.safetensors_io import CheckpointError

__all__ = ["CONVERGED", "DECOMPOSITIONS", "DEFAULT_MAX_RANK", "EXACT_THREADED_FROM", "POWER_ITERATIONS", "LoraFactors",
           "ModuleReport", "choose_decomposition", "decompose", "lapack_threads", "oversampling"]

DECOMPOSITIONS = ("auto", "exact", "randomized")
DEFAULT_MAX_RANK = 128  # mergekit-extract-lora's --max-rank
POWER_ITERATIONS = 3  # q of the randomized SVD, at most
CONVERGED = 0.01  # stop iterating once an iteration lowers the squared error by less than this share of it
# Below this share of the total energy, the remaining squared error is within float32's rounding of the
# total (total - captured cancels): no gain can be told from noise there, so the iterations go on to q.
RESOLVABLE = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bfloat16 passes for float32 matmuls on accelerators
# An exact SVD of a matrix whose smaller side is at least this runs faster on LAPACK's own threads (see
# `lapack_threads`).
EXACT_THREADED_FROM = 512


def oversampling(rank: int) -> int:
    """p, the randomized SVD's extra sketch columns: max(10, rank // 2) (the sketch has rank + p columns).

    Half the rank, with the adaptive power iterations, kept the error within 0.7% of the exact truncated
    SVD's on every case measured (see the package docstring), as p = rank did, for 3/4 of its matrix
    products; a quarter of the rank reached 1.25% on a block of 48 comparable singular values cut by the rank.
    """
    return max(10, int(rank) // 2)


def choose_decomposition(shape: Sequence[int], rank: int, decomposition: str = "auto") -> str:
    """"exact" or "randomized" for a matrix of `shape` truncated to `rank`.

    `auto`: randomized when the sketch (rank + `oversampling(rank)` columns) is at most a quarter of
    the smaller side, exact otherwise. "exact" and "randomized" are returned as they are.
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {list(DECOMPOSITIONS)}, got {decomposition!r}")
    if decomposition != "auto":
        return decomposition
    return "randomized" if 4 * (rank + oversampling(rank)) <= min(shape) else "exact"


def lapack_threads(decompositions: Iterable[tuple[str, Sequence[int]]]) -> int | None:
    """The limit on LAPACK's threads for a run of these (method, shape) decompositions
    (`jaxmerge.engine.lapack_threads.limit_lapack_threads`): 1, unless one is an exact SVD of a
    matrix whose smaller side is at least `EXACT_THREADED_FROM` (None: LAPACK's threads as they are).

    A randomized SVD spends its time in XLA's matrix products and calls LAPACK only for small
    factorizations, which one thread does faster than two pools sharing the cores; an exact SVD is
    all LAPACK, which uses its threads well from a side of about 512. Measured on the 2-core CI VM,
    one LAPACK thread against the default (two), `_lora_kernel` at rank 64 on a bfloat16 delta:
    randomized 2048 x 2048 64 / 117 ms, 5632 x 2048 167 / 236 ms, 4096 x 4096 at rank 128 401 / 576
    ms; exact 256 x 2048 42 / 50 ms, 512 x 2048 138 / 130 ms, 1024 x 2048 592 / 490 ms, 2048 x 2048
    1934 / 1381 ms.
    """
    for method, shape in decompositions:
        if method == "exact" and min(shape) >= EXACT_THREADED_FROM:
            return None
    return 1


# --- the decompositions (jitted) -----------------------------------------------------------------

def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _captured_energy(y: jax.Array, rank: int) -> jax.Array:
    """The sum of the top `rank` squared singular values of y (the eigenvalues of its small Gram matrix)."""
    return jnp.sum(jnp.linalg.eigvalsh(_matmul(y, y.T))[-rank:])


def _randomized_svd(x: jax.Array, key: jax.Array, rank: int, oversample: int, power_iterations: int):
    """Halko, Martinsson & Tropp (2011) Alg. 4.4 (randomized subspace iteration) + Alg. 5.1 (direct SVD),
    with at most `power_iterations` iterations: it stops after an iteration that lowered the squared
    error of the rank-`rank` approximation by less than `CONVERGED` of what remains (the sketch has
    converged; the next iteration would change little), unless what remains is too small a share of
    the total (`RESOLVABLE`) for float32 to measure a gain against it. Each iteration's Q^T x is both the next
    iteration's first product and the projected matrix the error is read from, so the check costs
    only a (width x width) eigensolve. Q^T x, not x^T Q: XLA:CPU multiplies the large matrix in its
    own layout 13-16% faster over the whole decomposition (5632 x 2048 at rank 64, either orientation).

    Returns (U (m, rank), S (rank,), Vh (rank, n), the number of iterations run).
    """
    m, n = x.shape
    width = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (n, width), x.dtype)
    total = jnp.sum(x * x)
    q, _ = jnp.linalg.qr(_matmul(x, omega))
    y = _matmul(q.T, x)  # (width, n)
    state = (0, q, y, _captured_energy(y, rank), jnp.asarray(jnp.inf, x.dtype))

    def more(state):
        done, _, _, captured, gain = state
        remaining = total - captured
        return (done < power_iterations) & ((gain > CONVERGED * remaining) | (remaining < RESOLVABLE * total))

    def iterate(state):
        done, _, y, captured, _ = state
        z, _ = jnp.linalg.qr(y.T)
        q, _ = jnp.linalg.qr(_matmul(x, z))
        y = _matmul(q.T, x)
        now = _captured_energy(y, rank)
        return done + 1, q, y, now, now - captured

    done, q, y, _, _ = jax.lax.while_loop(more, iterate, state)
    u_small, s, vh = jnp.linalg.svd(y, full_matrices=False)
    return _matmul(q, u_small)[:, :rank], s[:rank], vh[:rank], done


def _compute_dtype(*dtypes) -> jnp.dtype:
    wide = any(jnp.dtype(d) == jnp.float64 for d in dtypes) and jax.config.jax_enable_x64
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _svd(x, key, rank, method, oversample, power_iterations):
    if method == "exact":
        u, s, vh = jnp.linalg.svd(x, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    return _randomized_svd(x, key, rank, oversample, power_iterations)[:3]


@kernel(static_argnames=("rank", "method", "distribute_scale", "transpose", "oversample", "power_iterations",
                         "out_dtype"))
def _lora_kernel(finetuned, base, key, keep, *, rank, method, distribute_scale, transpose, oversample,
                 power_iterations, out_dtype):
    """(A, B, singular values, ||delta - B A||^2, ||delta||^2) for one matrix; the error is the saved factors'.

    `rank` (static) is the SVD's truncation; `keep` (traced, <= rank) the rank kept: the factors'
    rows/columns past it are zero, and the caller slices them off. Ranks lowered by --sv-epsilon
    thus share one compiled kernel per matrix shape.
    """
    compute = _compute_dtype(finetuned.dtype, base.dtype)
    x = finetuned.astype(compute) - base.astype(compute)
    if transpose:
        x = x.T
    u, s, vh = _svd(x, key, rank, method, oversample, power_iterations)
    kept = jnp.arange(rank) < keep
    s, u = jnp.where(kept, s, 0), jnp.where(kept[None, :], u, 0)
    if distribute_scale:
        root = jnp.sqrt(s)
        a, b = root[:, None] * vh, u * root[None, :]
    else:
        a, b = s[:, None] * vh, u
    a, b = a.astype(out_dtype), b.astype(out_dtype)
    residual = x - _matmul(b.astype(compute), a.astype(compute))
    return a, b, s, jnp.sum(residual * residual), jnp.sum(x * x)


@kernel(static_argnames=("rank", "method", "transpose", "oversample", "power_iterations"))
def _singular_values(finetuned, base, key, *, rank, method, transpose, oversample, power_iterations):
    """(the top `rank` singular values of the delta, ||delta||_F^2): the first pass of the rank rules
    and --sv-epsilon, with the same sketch as `_lora_kernel`'s (same key), hence the same values."""
    compute = _compute_dtype(finetuned.dtype, base.dtype)
    x = finetuned.astype(compute) - base.astype(compute)
    if transpose:
        x = x.T
    if method == "exact":
        s = jnp.linalg.svd(x, compute_uv=False)[:rank]
    else:
        s = _randomized_svd(x, key, rank, oversample, power_iterations)[1]
    return s, jnp.sum(x * x)


class LoraFactors(NamedTuple):
    """One matrix's LoRA factors: delta ~= b @ a (scaling 1)."""

    a: jax.Array  # (rank, n)
    b: jax.Array  # (m, rank)


@dataclass(frozen=True)
class ModuleReport:
    """What the extraction kept of one module.

    Attributes:
      name: the module (or pytree path).
      shape: the delta's shape as decomposed (an embedding's is transposed: (dim, vocab)).
      rank: the rank kept.
      decomposition: "exact" or "randomized".
      energy_kept: sum of the kept singular values squared / ||delta||_F^2 (1 for a zero delta).
      relative_error: ||delta - B A||_F / ||delta||_F of the factors as saved (0 for a zero delta).
      kind: "linear", "conv", "embedding" or "matrix" (pytrees).
    """

    name: str
    shape: tuple[int, ...]
    rank: int
    decomposition: str
    energy_kept: float
    relative_error: float
    kind: str = "matrix"

    def as_dict(self) -> dict:
        return {"module": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
                "decomposition": self.decomposition, "energy_kept": self.energy_kept,
                "relative_error": self.relative_error}


def _report(name, shape, rank, method, kind, s, err2, total2) -> ModuleReport:
    s = np.asarray(s, np.float64)
    err2, total2 = float(err2), float(total2)
    if not (math.isfinite(err2) and math.isfinite(total2) and np.isfinite(s).all()):
        raise CheckpointError(f"{name}: the delta holds NaN or inf; nothing was written")
    if total2 == 0.0:
        return ModuleReport(name, tuple(shape), rank, method, 1.0, 0.0, kind)
    energy = min(1.0, float(np.sum(s[:rank] ** 2)) / total2)
    return ModuleReport(name, tuple(shape), rank, method, energy, math.sqrt(max(err2, 0.0) / total2), kind)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"--max-rank (rank) must be an integer >= 1, got {rank!r}")
    return int(rank)


def _check_epsilon(sv_epsilon) -> float:
    if not isinstance(sv_epsilon, (int, float)) or isinstance(sv_epsilon, bool) or not sv_epsilon >= 0 \
            or not math.isfinite(sv_epsilon):
        raise ValueError(f"--sv-epsilon must be a number >= 0, got {sv_epsilon!r}")
    return float(sv_epsilon)


def decompose(delta, rank: int, *, decomposition: str = "auto", distribute_scale: bool = True,
              key: jax.Array | None = None) -> tuple[LoraFactors, ModuleReport]:
    """Factor one matrix, delta ~= B @ A, at `rank` (capped at min(m, n)).

    Args:
      delta: a 2-D array.
      rank: the rank kept (>= 1).
      decomposition: "auto", "exact" or "randomized" (see the module docstring).
      distribute_scale: A = sqrt(S) Vh, B = U sqrt(S) (True) or A = S Vh, B = U (False).
      key: the randomized sketch's PRNG key (default key(0)).

    Returns:
      (LoraFactors(a, b) in delta's dtype, ModuleReport).
    """
    delta = jnp.asarray(delta)
    if delta.ndim != 2:
        raise ValueError(f"decompose takes a matrix, got shape {delta.shape}")
    rank = min(_check_rank(rank), min(delta.shape))
    method = choose_decomposition(delta.shape, rank, decomposition)
    key = jax.random.key(0) if key is None else key
    with limit_lapack_threads(lapack_threads([(method, delta.shape)])):
        a, b, s, err2, total2 = _lora_kernel(delta, jnp.zeros((), delta.dtype), key, rank, rank=rank, method=method,
                                             distribute_scale=distribute_scale, transpose=False,
                                             oversample=oversampling(rank), power_iterations=POWER_ITERATIONS,
                                             out_dtype=jnp.dtype(delta.dtype).name)
        report = _report("matrix", delta.shape, rank, method, "matrix", s, err2, total2)  # waits for the kernel
    return LoraFactors(a, b), report


def _finite(s: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(s).all():
        raise CheckpointError(f"{name}: the delta holds NaN or inf; nothing was written")
    return s
