"""How far a bfloat16 TIES merge of each tool is from the float32 result (issue 26's note on semantics).

    python -m benchmarks.ties_numerics --dir /tmp/jaxmerge-vs-mergekit [--size tinyllama] [--tensors N]

Reads the outputs that `python -m benchmarks.vs_mergekit --methods ties` left in DIR
(out-jaxmerge: `jaxmerge merge`; out-mergekit: `mergekit-yaml`, both from the same bfloat16 recipe)
and, for N tensors spread over the model, computes the reference: mergekit 0.1.5's own `ties` method
(its registry, `TensorGroup`) on the same inputs widened to float32, rounded once to the output's
dtype. Reports,
per tool, the share of entries that differ from the reference and the largest difference relative to
the tensor's largest magnitude.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def compare(directory: Path, size: str = "tinyllama", tensors: int = 8) -> dict:
    import torch
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from safetensors import safe_open

    from benchmarks.methods import PARAMS

    models = directory / f"{size}-bfloat16"
    inputs = [models / name / "model.safetensors" for name in ("base", "ft0", "ft1", "ft2")]
    outputs = {"jaxmerge": directory / "out-jaxmerge", "mergekit": directory / "out-mergekit"}

    def tensor(path: Path, name: str) -> torch.Tensor:
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        for file in files:
            with safe_open(file, "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise KeyError(f"{path}: no tensor {name}")

    with safe_open(inputs[0], "pt") as f:
        names = sorted(n for n in f.keys() if n.endswith(".weight") and len(f.get_slice(n).get_shape()) == 2)
    chosen = [names[i] for i in np.linspace(0, len(names) - 1, tensors).round().astype(int)]
    params = dict(PARAMS["ties"])
    rows, totals = [], {tool: [0, 0] for tool in outputs}
    for name in chosen:
        group = TensorGroup.from_tensors([tensor(p, name).float() for p in inputs], base_index=0)
        exact = registry.get("ties")([group], parameters=params)[0]
        scale = float(exact.abs().max())
        row = {"tensor": name, "entries": exact.numel()}
        for tool, out in outputs.items():
            ours = tensor(out, name)
            reference = exact.to(ours.dtype).float()  # rounded once, to the output's dtype
            ours = ours.float()
            differ = int((ours != reference).sum())
            row[tool] = {"differ": differ, "max_rel": float((ours - reference).abs().max()) / scale}
            totals[tool][0] += differ
            totals[tool][1] += reference.numel()
        rows.append(row)
        print(name, {t: row[t] for t in outputs}, flush=True)
    summary = {tool: {"share_differ": d / n, "max_rel": max(r[tool]["max_rel"] for r in rows)} for tool, (d, n) in totals.items()}
    print(json.dumps(summary, indent=1))
    return {"tensors": rows, "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/jaxmerge-vs-mergekit")
    parser.add_argument("--size", default="tinyllama")
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--output", default=None, help="JSON path (default: stdout only)")
    args = parser.parse_args(argv)
    result = compare(Path(args.dir), args.size, args.tensors)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
