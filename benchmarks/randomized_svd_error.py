"""How far `jaxmerge extract-lora`'s randomized SVD is from the exact truncated SVD, and how many power
iterations it runs (issue 27: "within 1% of the exact error, state the rule").

    python -m benchmarks.randomized_svd_error [--sizes 384x256,1024x512] [--ranks 8,16,32,64,128]
        [--seeds 2] [--output benchmarks/results/randomized_svd_error.json]

For each matrix family, size and rank (rank <= min(m, n) / 4; the randomized SVD is asked for
explicitly, while `--decomposition auto` takes it only where rank + oversampling <= min(m, n) / 4),
the factors of `jaxmerge.tools.extract_lora.decompose(..., decomposition="randomized")` are compared
with the exact truncated SVD (float64 singular values of the same float32 matrix): the ratio of the
Frobenius errors, worst over seeds. Families: Gaussian (a flat spectrum, the hardest), power laws
j^-0.5 and j^-2, exponential decay, low rank + noise, and a block of 48 comparable singular values
(a random rank-48 product) over small noise (a rank cutting through the block leaves the sketch little
to converge to). (The results file of 2026-12-06 names that family "flat block of 48 + small noise".)
The figures are reported, never asserted; tests/test_extract_lora.py asserts the 1% bound on small sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _with_spectrum(rng, m: int, n: int, values: np.ndarray) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((m, len(values))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(values))))
    return ((u * values) @ v.T).astype(np.float32)


def families(m: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The test matrices of one size (float32)."""
    rng = np.random.default_rng(seed)
    j = np.arange(1, n + 1, dtype=np.float64)
    return {
        "gaussian": rng.standard_normal((m, n)).astype(np.float32),
        "power-law j^-0.5": _with_spectrum(rng, m, n, j ** -0.5),
        "power-law j^-2": _with_spectrum(rng, m, n, j ** -2.0),
        "exponential e^-j/20": _with_spectrum(rng, m, n, np.exp(-j / 20)),
        "rank 16 + noise": (rng.standard_normal((m, 16)) @ rng.standard_normal((16, n))
                            + 0.3 * rng.standard_normal((m, n))).astype(np.float32),
        "rank-48 block + small noise": (0.05 * rng.standard_normal((m, 48)) @ rng.standard_normal((48, n))
                                           + 0.01 * rng.standard_normal((m, n))).astype(np.float32),
    }


def run(sizes: list[tuple[int, int]], ranks: list[int], seeds: int = 2) -> list[dict]:
    """One row per (family, size, rank): the worst error ratio over `seeds` sketches and the iterations run."""
    import jax

    import jaxmerge.tools.extract_lora as xl
    from jaxmerge.tools.extract_lora import svd

    rows = []
    for m, n in sizes:
        for family, x in families(m, n).items():
            x64 = x.astype(np.float64)
            exact_tail = np.linalg.svd(x64, compute_uv=False)
            for rank in (r for r in ranks if r <= min(m, n) // 4):
                exact = float(np.sqrt((exact_tail[rank:] ** 2).sum()))
                ratios, iterations = [], []
                for seed in range(seeds):
                    key = jax.random.key(seed)
                    (a, b), _ = xl.decompose(x, rank, decomposition="randomized", key=key)
                    err = float(np.linalg.norm(x64 - np.asarray(b, np.float64) @ np.asarray(a, np.float64)))
                    ratios.append(err / exact)
                    done = svd._randomized_svd(jax.numpy.asarray(x), key, rank, xl.oversampling(rank),
                                               xl.POWER_ITERATIONS)[3]
                    iterations.append(int(done))
                rows.append({"family": family, "shape": [m, n], "rank": rank, "oversampling": xl.oversampling(rank),
                             "worst_error_ratio": max(ratios), "iterations": sorted(set(iterations))})
                print(f"{family:32s} {m}x{n} rank {rank:3d}: error / exact {max(ratios):.4f}, "
                      f"iterations {sorted(set(iterations))}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="384x256,1024x512")
    parser.add_argument("--ranks", default="8,16,32,64,128")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = run(sizes, [int(r) for r in args.ranks.split(",")], args.seeds)
    worst = {}
    for row in rows:
        if row["worst_error_ratio"] > worst.get(row["family"], {"worst_error_ratio": 0})["worst_error_ratio"]:
            worst[row["family"]] = row
    for family, row in worst.items():
        print(f"worst, {family}: +{100 * (row['worst_error_ratio'] - 1):.2f}% "
              f"({row['shape'][0]}x{row['shape'][1]}, rank {row['rank']})")
    result = {"command": "python -m benchmarks.randomized_svd_error " + " ".join(argv or []), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
