"""jaxmerge against PEFT on identical inputs, measured in one run.

    python -m benchmarks.compare                # full table (about 3 minutes on 2 cores)
    python -m benchmarks.compare --quick        # 1024x1024 only
    python -m benchmarks.compare --json out.json

For each function and input shape it reports: PEFT's median, jaxmerge's median
(steady state, after compilation), their ratio, jaxmerge's first call (compile
included), the ratio to the read-once floor (NumPy sum of the inputs, same
run), XLA's peak memory for the call (arguments + temporaries + output, from
the compiled program's memory analysis) relative to the input bytes, and the
torch interop path's median with the share of the speed-up it keeps, and the
DLPack conversions' own time as a share of the interop call. jaxmerge, the
floor and the interop call are timed taking turns (`paired_medians`), so their
ratios come from the same stretch of machine time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import jax
import jax.numpy as jnp
import numpy as np

import jaxmerge
from benchmarks.vs_mergekit import cpu_name
from jaxmerge.core import merging

FUNCTIONS = ["ties", "magnitude_prune", "dare_ties", "dare_linear", "task_arithmetic"]
DENSITY = 0.2


def paired_medians(calls: dict, repeats: int, warmup: int = 2, min_total_s: float = 1.0) -> dict:
    """Median wall time of each call, the calls taking turns round by round.

    Taking turns puts every call in the same stretch of machine time, so a
    slow spell (other processes, memory bandwidth) shifts all of them alike and
    their ratios stay stable; separate runs drifted by up to 25% here. Rounds
    go on past `repeats` until about `min_total_s` has been spent, so that
    sub-millisecond calls get enough samples.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    start = time.perf_counter()
    while len(times[next(iter(calls))]) < repeats or (
        time.perf_counter() - start < min_total_s and len(times[next(iter(calls))]) < 1000
    ):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `repeats` calls, after `warmup` untimed calls (fresh buffers page-fault)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_result(name, tasks, weights):
    """A call of the jaxmerge function returning its (possibly not yet ready) result."""
    args = (tasks, weights) if name == "task_arithmetic" else (tasks, weights, DENSITY)
    kwargs = {"key": jax.random.key(0)} if name.startswith("dare") else {}
    return lambda: getattr(jaxmerge, name)(*args, **kwargs)


def jax_call(name, tasks, weights):
    """The same call, waiting for the result (what a timing must include)."""
    result = jax_result(name, tasks, weights)
    return lambda: result().block_until_ready()


def torch_call(module, name, tasks, weights):
    args = (tasks, weights) if name == "task_arithmetic" else (tasks, weights, DENSITY)
    return lambda: getattr(module, name)(*args)


def peak_memory_ratio(name, tasks, weights) -> float:
    """XLA's memory analysis of the compiled kernel: (arguments + temporaries + output) / input bytes."""
    sparsify = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_ties": "random", "dare_linear": "random"}.get(name)
    sign = "total" if name in ("ties", "dare_ties") else None
    k = jaxmerge.core.selection.density_to_k(DENSITY, tasks[0].size)
    key = jax.random.key(0) if sparsify == "random" else None
    compiled = merging._merge_kernel.lower(
        tuple(tasks), jnp.asarray(weights), jnp.float32(DENSITY), k, key, sparsify=sparsify, sign_method=sign
    ).compile()
    stats = compiled.memory_analysis()
    input_bytes = sum(t.nbytes for t in tasks)
    if stats is None:
        return float("nan")
    total = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
    return total / input_bytes


def conversion_seconds(torch_tasks, call, repeats: int) -> float:
    """Median time of the DLPack conversions alone: every input to JAX, one fresh result back.

    The result is computed outside the timed region; a first export is timed
    (JAX caches a buffer's DLPack capsule after that).
    """
    import interop

    times = []
    for _ in range(repeats + 1):
        result = call().block_until_ready()  # to_torch would otherwise wait for the computation
        start = time.perf_counter()
        for t in torch_tasks:
            interop.to_jax(t)
        interop.to_torch(result)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(configs, repeats: int, peft_repeats: int, with_interop: bool = True):
    import torch
    from peft.utils import merge_utils as peft

    from interop import merge_utils as interop_merge

    rows = []
    for shape, num_tasks in configs:
        rng = np.random.default_rng(0)
        host = [rng.standard_normal(shape).astype(np.float32) for _ in range(num_tasks)]
        weights = np.linspace(1.0, 0.5, num_tasks).astype(np.float32)
        if num_tasks == 3:
            weights = np.array([1.0, 0.5, 0.7], np.float32)
        tasks = [jnp.asarray(h) for h in host]
        # Allocated by torch, as a PEFT user's tensors are (64-byte aligned, so
        # DLPack hands them to JAX without a copy). NumPy's large arrays are only
        # 16-byte aligned: torch.from_numpy views of them are measured apart.
        torch_tasks = [torch.from_numpy(h).clone() for h in host]
        numpy_backed = [torch.from_numpy(h) for h in host]
        torch_weights = torch.from_numpy(weights)
        for name in FUNCTIONS:
            call = jax_call(name, tasks, weights)
            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
            paired = {"jaxmerge": call, "floor": lambda: sum(host[1:], host[0].copy())}
            if with_interop:
                torch.manual_seed(0)
                paired["interop"] = torch_call(interop_merge, name, torch_tasks, torch_weights)
            medians = paired_medians(paired, repeats)
            ours, floor = medians["jaxmerge"], medians["floor"]
            theirs = median_seconds(torch_call(peft, name, torch_tasks, torch_weights), peft_repeats, warmup=1)
            row = {
                "function": name,
                "shape": "x".join(map(str, shape)),
                "tasks": num_tasks,
                "peft_s": theirs,
                "jaxmerge_s": ours,
                "speedup": theirs / ours,
                "first_call_s": first,
                "floor_s": floor,
                "ratio_to_floor": ours / floor,
                "peak_memory_x_inputs": peak_memory_ratio(name, tasks, weights),
            }
            if with_interop:
                row["interop_s"] = medians["interop"]
                row["interop_keeps_speedup"] = (theirs / row["interop_s"]) / (theirs / ours)
                row["conversion_s"] = conversion_seconds(torch_tasks, jax_result(name, tasks, weights), repeats)
                row["conversion_share"] = row["conversion_s"] / row["interop_s"]
                if name == "ties":
                    from_numpy = torch_call(interop_merge, name, numpy_backed, torch_weights)
                    row["interop_numpy_backed_s"] = median_seconds(from_numpy, repeats)
            rows.append(row)
            print(format_row(row), flush=True)
    for r in rows:
        if "interop_numpy_backed_s" in r:
            print(
                f"# interop ties {r['shape']} x{r['tasks']} on torch.from_numpy views of NumPy memory "
                f"(16-byte aligned, JAX copies them): {r['interop_numpy_backed_s']:.3f} s",
                flush=True,
            )
    return rows


HEADER = (
    f"{'function':<16}{'shape':>10}{'tasks':>6}{'PEFT s':>9}{'jaxmerge s':>11}{'speedup':>9}"
    f"{'first s':>9}{'x floor':>9}{'mem x in':>9}{'interop s':>10}{'keeps':>7}{'conv %':>8}"
)


def format_row(r) -> str:
    interop = (
        f"{r['interop_s']:>10.3f}{100 * r['interop_keeps_speedup']:>6.0f}%{100 * r['conversion_share']:>7.2f}%"
        if "interop_s" in r else ""
    )
    return (
        f"{r['function']:<16}{r['shape']:>10}{r['tasks']:>6}{r['peft_s']:>9.3f}{r['jaxmerge_s']:>11.3f}"
        f"{r['speedup']:>8.1f}x{r['first_call_s']:>9.2f}{r['ratio_to_floor']:>9.1f}{r['peak_memory_x_inputs']:>9.2f}"
        + interop
    )


def base_machine() -> dict:
    """The date, machine and JAX backend every benchmark records."""
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def machine() -> dict:
    """`base_machine` plus the torch and PEFT versions (the comparisons' anchors)."""
    import torch
    from peft import __version__ as peft_version

    return {**base_machine(), "torch": torch.__version__, "peft": peft_version}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 3 tasks of 1024x1024")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats for jaxmerge (median)")
    parser.add_argument("--peft-repeats", type=int, default=3, help="timed repeats for PEFT (median)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--large-only", action="store_true", help="only 3 tasks of 4096x4096")
    parser.add_argument(
        "--no-methods", action="store_true",
        help="skip the section timing every method of the table against mergekit's own (benchmarks.methods)",
    )
    args = parser.parse_args(argv)
    configs = [((1024, 1024), 3)] if args.quick else [((4096, 4096), 3), ((1024, 1024), 3), ((1024, 1024), 16)]
    if args.large_only:
        configs = [((4096, 4096), 3)]
    info = machine()
    print(f"# {info['date']} {info['processor']} x{info['cpu_count']} | jax {info['jax']} ({info['device']}) | torch {info['torch']} | peft {info['peft']} | density {DENSITY}")
    print(HEADER)
    rows = run(configs, args.repeats, args.peft_repeats)
    method_rows = []
    if not args.no_methods:
        from benchmarks import methods  # imports this module: loaded only here

        # One row per method of the table that mergekit also has, on a base + 3 models of the large size.
        method_rows = methods.run(1024 if args.quick else 4096, repeats=5)
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": info, "density": DENSITY, "rows": rows, "methods": method_rows}, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
