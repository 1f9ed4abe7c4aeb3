"""Every method of the table against mergekit 0.1.5's own method, on the same tensors, in one run.

    python -m benchmarks.methods [--size 4096] [--repeats 5] [--methods ties,slerp,...]

Inputs: a base and three models of size x size float32 (the models are the
base plus N(0, 0.01) noise, as fine-tunes are); methods that take exactly two
inputs get the base and the first model. mergekit runs its registered method
on a `TensorGroup` (CPU, torch 2.13); jaxmerge runs the table's tensor
function (`jaxmerge.methods.pytree.merge_leaf`) after its first call
(compilation reported apart). The two take turns round by round
(`benchmarks.compare.paired_medians`); medians and their ratio are reported.
Also run by `python -m benchmarks.compare` (its "methods" section).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks.compare import machine, paired_medians

# Parameters given to both tools (mergekit's names); per-model ones as one value per non-base model.
PARAMS = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": [1.0, 0.5, 0.7]},
    "ties": {"weight": [1.0, 0.5, 0.7], "density": 0.2},
    "dare_linear": {"weight": [1.0, 0.5, 0.7], "density": 0.2},
    "dare_ties": {"weight": [1.0, 0.5, 0.7], "density": 0.2},
    "breadcrumbs": {"weight": [1.0, 0.5, 0.7], "density": 0.2, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": [1.0, 0.5, 0.7], "density": 0.2, "gamma": 0.01},
    "della": {"weight": [1.0, 0.5, 0.7], "density": 0.2, "epsilon": 0.1},
    "della_linear": {"weight": [1.0, 0.5, 0.7], "density": 0.2, "epsilon": 0.1},
    "slerp": {"t": 0.3},
    "nearswap": {"t": 0.001},
    "sce": {"select_topk": 0.2},
    "model_stock": {},
    "karcher": {},
    "multislerp": {"weight": 1.0},
    "nuslerp": {"weight": 1.0},
    "arcee_fusion": {},
    "ram": {},
    "ramplus_tl": {},
}


def inputs(size: int, count: int):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((size, size), dtype=np.float32)
    return base, [base + 0.01 * rng.standard_normal((size, size), dtype=np.float32) for _ in range(count)]


def one_method(name: str, base, models, repeats: int) -> dict | None:
    import torch
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    from jaxmerge.methods import _table as table
    from jaxmerge.methods.pytree import bind_method, merge_leaf

    spec = table.get(name)
    params = dict(PARAMS.get(name, {}))
    if spec.max_models is not None:
        models = models[: spec.max_models - (spec.base is not table.BasePolicy.IGNORED)]
    with_base = spec.base is not table.BasePolicy.IGNORED
    ours_params = dict(params)
    if "semantics" in spec.param_names:
        ours_params["semantics"] = "mergekit"
    for key, value in list(ours_params.items()):
        if isinstance(value, list):
            ours_params[key] = value[: len(models)]
            params[key] = value[: len(models)]
    spec, bound = bind_method(name, ours_params, len(models), with_base)
    key = jax.random.key(0) if spec.random else None
    jax_models = [jax.device_put(m) for m in models]
    jax_base = jax.device_put(base) if with_base else None

    def ours():
        merge_leaf(jax_models, spec, bound, base=jax_base, key=key).block_until_ready()

    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    tensors = ([torch.from_numpy(base)] if with_base else []) + [torch.from_numpy(m) for m in models]
    group = TensorGroup.from_tensors(tensors, base_index=0 if with_base else None)
    method = registry.get(name)

    def theirs():
        method([group], parameters=params)

    medians = paired_medians({"jaxmerge": ours, "mergekit": theirs}, repeats, warmup=1, min_total_s=0)
    row = {
        "method": name, "models": len(models), "mergekit_s": medians["mergekit"], "jaxmerge_s": medians["jaxmerge"],
        "speedup": medians["mergekit"] / medians["jaxmerge"], "first_call_s": first,
    }
    print(f"{name:>17} {len(models)} models | mergekit {row['mergekit_s']:7.3f} s | jaxmerge {row['jaxmerge_s']:7.3f} s "
          f"| {row['speedup']:6.1f}x | first call {first:.2f} s", flush=True)
    return row


def run(size: int = 4096, repeats: int = 5, names: list[str] | None = None) -> list[dict]:
    from mergekit.merge_methods import registry

    from jaxmerge.methods import _table as table

    theirs = {m.spec.name for m in registry.registered_methods()}
    names = names or [n for n in table.names() if n in theirs and n != "passthrough"]
    base, models = inputs(size, 3)
    print(f"methods vs mergekit 0.1.5: base + up to 3 models of {size}x{size} float32")
    return [one_method(n, base, models, repeats) for n in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", help="comma-separated subset (default: every method both tools have)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.size, args.repeats, args.methods.split(",") if args.methods else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "size": args.size, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
