"""Whole-model merges: `jaxmerge merge` against mergekit 0.1.5 on the same models and recipe.

    python -m benchmarks.vs_mergekit [--sizes small,llama] [--dtypes float32,bfloat16]
                                     [--methods ties,dare_ties,task_arithmetic] [--rounds 3]

Builds Llama-shaped models offline with transformers (a base and three
fine-tunes: base + small noise), writes one mergekit recipe per method, and
runs, taking turns round by round (this VM drifts by up to 25% between
stretches): mergekit-yaml (CPU), `jaxmerge merge` on the same recipe, and the
warm I/O floor (read every input once, write one output-sized file). Each
tool runs in a child process; its peak RSS is that child's own (os.wait4).
Medians are reported, with ratios against mergekit and against the floor
measured in the same rounds. jaxmerge's first run (compilation included) is
reported apart, and again with a persistent compilation cache
(JAX_COMPILATION_CACHE_DIR) warmed by an earlier run.

Results go to benchmarks/results/vs_mergekit-<machine>.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama shapes: (hidden, intermediate, layers, vocab). "llama" is the 0.67 GB float32 model of issue 13.
SIZES = {
    "small": (256, 688, 4, 8000),
    "llama": (1024, 2816, 8, 32000),
    "large": (1536, 4096, 8, 32000),
}


def build_models(root: Path, size: str, dtype: str) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes (base + N(0, 0.01) noise), saved with transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, vocab = SIZES[size]
    folder = root / f"{size}-{dtype}"
    paths = [folder / name for name in ("base", "ft0", "ft1", "ft2")]
    if all((p / "config.json").exists() for p in paths):
        return paths[0], paths[1:]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )
    torch_dtype = getattr(torch, dtype)
    base = LlamaForCausalLM(config).to(torch_dtype)
    base.save_pretrained(paths[0])
    state = base.state_dict()
    for i, path in enumerate(paths[1:]):
        gen = torch.Generator().manual_seed(i + 1)
        tuned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch_dtype) for k, v in state.items()}
        base.load_state_dict(tuned)
        base.save_pretrained(path)
    return paths[0], paths[1:]


def write_recipe(path: Path, method: str, base: Path, models: list[Path], dtype: str) -> None:
    params = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.2}, "task_arithmetic": {}}[method]
    lines = [f"merge_method: {method}", f"base_model: {base}", f"dtype: {dtype}", "models:"]
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        lines.append("    parameters:")
        lines.append(f"      weight: {[1.0, 0.5, 0.7][i]}")
        for k, v in params.items():
            lines.append(f"      {k}: {v}")
    path.write_text("\n".join(lines) + "\n")


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1e6


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def io_floor(inputs: list[Path], out: Path) -> float:
    """Read every input file once and write one file of the first input's size, in 64 MB blocks."""
    start = time.perf_counter()
    block = 64 << 20
    for path in inputs:
        with open(path, "rb") as f:
            while f.read(block):
                pass
    with open(inputs[0], "rb") as src, open(out, "wb") as dst:
        while chunk := src.read(block):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    out.unlink()
    return time.perf_counter() - start


def jaxmerge_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(out), "--force", "--quiet"]


def mergekit_cmd(recipe: Path, out: Path) -> list[str]:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    return [exe, str(recipe), str(out), "--quiet", "--random-seed", "0"]


def bench(root: Path, size: str, dtype: str, method: str, rounds: int) -> dict:
    base, models = build_models(root, size, dtype)
    recipe = root / f"{size}-{dtype}-{method}.yml"
    write_recipe(recipe, method, base, models, dtype)
    files = [f for m in [base, *models] for f in weight_files(m)]
    out_j, out_m = root / "out-jaxmerge", root / "out-mergekit"
    env_nocache = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cache = Path(tempfile.mkdtemp(prefix="jaxmerge-cc-"))
    env_cache = {**env_nocache, "JAX_COMPILATION_CACHE_DIR": str(cache),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    # First runs: cold compile, then warm-cache compile (the page cache is warm for both).
    io_floor(files, root / "floor.bin")
    first_wall, _ = run_child(jaxmerge_cmd(recipe, out_j), env_nocache)
    run_child(jaxmerge_cmd(recipe, out_j), env_cache)  # fills the persistent cache
    cached_wall, _ = run_child(jaxmerge_cmd(recipe, out_j), env_cache)
    walls = {"mergekit": [], "jaxmerge": [], "floor": []}
    peaks = {"mergekit": [], "jaxmerge": []}
    for _ in range(rounds):
        walls["floor"].append(io_floor(files, root / "floor.bin"))
        w, p = run_child(mergekit_cmd(recipe, out_m), env_nocache)
        walls["mergekit"].append(w), peaks["mergekit"].append(p)
        w, p = run_child(jaxmerge_cmd(recipe, out_j), env_nocache)
        walls["jaxmerge"].append(w), peaks["jaxmerge"].append(p)
    shutil.rmtree(cache, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in walls.items()}
    row = {
        "size": size, "dtype": dtype, "method": method,
        "model_gb": round(sum(f.stat().st_size for f in weight_files(base)) / 1e9, 3),
        "walls_s": walls, "peaks_gb": peaks,
        "mergekit_s": med["mergekit"], "jaxmerge_s": med["jaxmerge"], "floor_s": med["floor"],
        "speedup": med["mergekit"] / med["jaxmerge"], "x_floor": med["jaxmerge"] / med["floor"],
        "rss_ratio": max(peaks["jaxmerge"]) / max(peaks["mergekit"]),
        "first_run_s": first_wall, "first_run_with_compile_cache_s": cached_wall,
    }
    print(
        f"{size:>6} {dtype:>8} {method:>15} {row['model_gb']:6.2f} GB | mergekit {med['mergekit']:6.1f} s "
        f"{max(peaks['mergekit']):5.2f} GB | jaxmerge {med['jaxmerge']:6.1f} s {max(peaks['jaxmerge']):5.2f} GB | "
        f"{row['speedup']:5.1f}x faster, RSS {row['rss_ratio']:.2f}x | floor {med['floor']:5.2f} s, "
        f"{row['x_floor']:4.1f}x floor | first run {first_wall:.1f} s, with compile cache {cached_wall:.1f} s",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,llama")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="ties,dare_ties,task_arithmetic")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/jaxmerge-vs-mergekit")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/vs_mergekit-<machine>.json)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        bench(root, size, dtype, method, args.rounds)
        for size in args.sizes.split(",") for dtype in args.dtypes.split(",") for method in args.methods.split(",")
    ]
    machine = f"cpu-{os.cpu_count()}core"
    out = Path(args.output or Path(__file__).parent / "results" / f"vs_mergekit-{machine}.json")
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "rounds": args.rounds, "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
