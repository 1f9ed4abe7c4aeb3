"""`jaxmerge extract-lora` against mergekit 0.1.5's `mergekit-extract-lora` on a Llama-shaped bf16 fine-tune.

    python -m benchmarks.extract_lora [--size default] [--layers 2] [--ranks 16,64,128] [--rounds 3]
                                      [--dir /tmp/jaxmerge-extract-lora] [--output PATH]

Builds offline (transformers, random initialisation, nothing downloaded) a Llama-shaped base in
bfloat16, as LLMs ship, and a fine-tune = base + a low-rank-plus-noise delta on every projection
(rank 48 at scale 2e-3 per entry, plus N(0, 2e-4) noise; the embeddings and norms get noise only), so
that the rank matters: rank 16 misses most of the delta, 64 and 128 leave the noise. Then, for each
rank, round by round, taking turns (this VM drifts between stretches, and other jobs may share its
cores):

* `mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank R` (full
  `torch.linalg.svd` of every matrix in float32, on the CPU);
* `jaxmerge extract-lora --model FT --base BASE --output OUT --max-rank R` (the default `auto`
  decomposition: randomized where the sketch is at most a quarter of the smaller side), without a
  compilation cache (every run compiles) and cached (the kernels loaded from a persistent
  compilation cache that one untimed run fills first, as a user's second run finds them).

Each tool runs in a child process (the command line, as a user runs it); its peak RSS is that child's
own (os.wait4). Medians of the rounds are reported. The relative Frobenius error of each tool's
adapter against the true delta (fine-tune - base of the saved bf16 tensors, in float32) is
sqrt(sum of ||delta - s B A||^2 / sum of ||delta||^2) over the decomposed modules (both tools save the
embeddings whole), with the scaling s = alpha / r each adapter's config gives; the worst module's
error is kept too. The two adapters must decompose the same modules, or the run fails.

Sizes: "default" is TinyLlama's width (hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
vocabulary 32000) with 2 layers instead of 22: on the slower hosts this 2-core VM had before
2026-12-06's afternoon one full SVD of a 5632 x 2048 matrix took ~37 s with torch under load, a
22-layer mergekit run over an hour, and the default 2 layers kept one mergekit run to ~6 minutes (the whole default run, 3
rounds of 3 ranks, about an hour; use --rounds 1 for a quicker look). Every layer is alike, so the
SVD time of both tools scales with --layers, but jaxmerge compiles each matrix shape once whatever
the depth: 2 layers understate the first run's speed-up. `--layers 22` is TinyLlama-1.1B's depth
(mergekit took ~5 minutes a run on a faster host of 2026-12-06; results/extract_lora_tinyllama.json).
"tiny" (hidden 64, 2 layers) is the smoke test's size.

The load average (`os.getloadavg`) before and after is recorded. Results go to
benchmarks/results/extract_lora.json (machine, date, command), a Markdown table beside it
(extract_lora.md), and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.vs_mergekit import REPO, cache_env, machine_line, run_child

# (hidden, intermediate, attention heads, KV heads, vocabulary); layers come from --layers.
SIZES = {
    "tiny": (64, 160, 4, 2, 512),
    "default": (2048, 5632, 32, 4, 32000),
}
DELTA_RANK = 48  # the fine-tune's low-rank part
LOW_RANK_SCALE = 2e-3  # entries of the low-rank part, about
NOISE_SCALE = 2e-4  # N(0, NOISE_SCALE) on every weight


def build_models(root: Path, size: str, layers: int) -> tuple[Path, Path]:
    """The base and the fine-tune (bf16), built in a child process so that no timed process forks from one
    that held them (a child's peak RSS would count its parent's)."""
    folder = root / f"{size}-{layers}l"
    base, ft = folder / "base", folder / "ft"
    if not ((base / "config.json").exists() and (ft / "config.json").exists()):
        code = (f"from pathlib import Path; from benchmarks.extract_lora import _build; "
                f"_build(Path({str(folder)!r}), {size!r}, {layers})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return base, ft


def _build(folder: Path, size: str, layers: int) -> None:
    """`build_models`' work, in the child process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv_heads, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            delta = NOISE_SCALE * torch.randn(p.shape, generator=gen)
            if p.ndim == 2 and "layers." in name:  # a projection: low rank + noise
                m, n = p.shape
                u = torch.randn(m, DELTA_RANK, generator=gen)
                v = torch.randn(DELTA_RANK, n, generator=gen)
                delta += (LOW_RANK_SCALE / DELTA_RANK ** 0.5) * (u @ v)
            p.copy_((p.float() + delta).to(torch.bfloat16))
    model.save_pretrained(folder / "ft")


def mergekit_cmd(base: Path, ft: Path, out: Path, rank: int) -> list[str]:
    exe = shutil.which("mergekit-extract-lora") or str(Path(sys.executable).parent / "mergekit-extract-lora")
    return [exe, "--model", str(ft), "--base-model", str(base), "--out-path", str(out), "--max-rank", str(rank),
            "--quiet"]


def jaxmerge_cmd(base: Path, ft: Path, out: Path, rank: int) -> list[str]:
    return [sys.executable, "-m", "jaxmerge", "extract-lora", "--model", str(ft), "--base", str(base),
            "--output", str(out), "--max-rank", str(rank), "--force", "--quiet"]


_ERRORS = """
import json, sys
import torch
from safetensors.torch import load_file
from pathlib import Path

def weights(model):
    out = {}
    for f in sorted(Path(model).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out

base, ft = weights(sys.argv[1]), weights(sys.argv[2])
result = {}
for adapter in sys.argv[3:]:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    lora = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    err2 = total2 = 0.0
    modules = {}
    for name in lora:
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len("base_model.model."):-len(".lora_A.weight")]
        r = config["rank_pattern"].get(module, config["r"])
        scale = config["alpha_pattern"].get(module, config["lora_alpha"]) / r
        a, b = lora[name].double(), lora[name.replace("lora_A", "lora_B")].double()
        delta = ft[module + ".weight"].double() - base[module + ".weight"].double()
        e2, t2 = float(((delta - scale * (b @ a)) ** 2).sum()), float((delta ** 2).sum())
        err2, total2 = err2 + e2, total2 + t2
        modules[module] = (e2 / t2) ** 0.5
    worst = max(modules, key=modules.get)
    result[adapter] = {"relative_error": (err2 / total2) ** 0.5, "worst_module": worst,
                       "worst_relative_error": modules[worst], "modules": sorted(modules),
                       "r": config["r"], "modules_to_save": sorted(config.get("modules_to_save") or [])}
print(json.dumps(result))
"""


def errors(base: Path, ft: Path, adapters: list[Path]) -> dict[str, dict]:
    """Each adapter's relative Frobenius error against the true delta (in a child process)."""
    result = subprocess.run([sys.executable, "-c", _ERRORS, str(base), str(ft), *map(str, adapters)],
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"measuring the errors failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(root: Path, base: Path, ft: Path, rank: int, rounds: int) -> dict:
    """One rank: `rounds` alternating runs of both tools, their medians, peaks and errors."""
    load_before = os.getloadavg()
    cache = root / "xla-cache"
    envs = {"mergekit": cache_env(None), "jaxmerge": cache_env(None), "jaxmerge_cached": cache_env(cache)}
    outs = {"mergekit": root / f"mergekit-r{rank}", "jaxmerge": root / f"jaxmerge-r{rank}",
            "jaxmerge_cached": root / f"jaxmerge-cached-r{rank}"}
    commands = {"mergekit": lambda: mergekit_cmd(base, ft, outs["mergekit"], rank),
                "jaxmerge": lambda: jaxmerge_cmd(base, ft, outs["jaxmerge"], rank),
                "jaxmerge_cached": lambda: jaxmerge_cmd(base, ft, outs["jaxmerge_cached"], rank)}
    # The cached runs load this rank's kernels from a cache that one untimed run fills.
    shutil.rmtree(cache, ignore_errors=True)
    run_child(commands["jaxmerge_cached"](), envs["jaxmerge_cached"])
    walls = {tool: [] for tool in outs}
    peaks = {tool: [] for tool in outs}
    for _ in range(rounds):
        for tool in outs:
            shutil.rmtree(outs[tool], ignore_errors=True)
            wall, peak = run_child(commands[tool](), envs[tool])
            walls[tool].append(wall)
            peaks[tool].append(peak)
    errs = errors(base, ft, [outs["mergekit"], outs["jaxmerge"]])
    mk, jx = errs[str(outs["mergekit"])], errs[str(outs["jaxmerge"])]
    if mk["modules"] != jx["modules"] or mk["modules_to_save"] != jx["modules_to_save"]:
        raise SystemExit(f"rank {rank}: the adapters differ in modules: mergekit {mk['modules']} "
                         f"{mk['modules_to_save']}, jaxmerge {jx['modules']} {jx['modules_to_save']}")
    med = {tool: float(np.median(w)) for tool, w in walls.items()}
    row = {
        "rank": rank, "walls_s": walls, "peaks_gb": peaks, "medians_s": med,
        "peak_gb": {tool: max(p) for tool, p in peaks.items()},
        "speedup": med["mergekit"] / med["jaxmerge"], "speedup_cached": med["mergekit"] / med["jaxmerge_cached"],
        "relative_error": {"mergekit": mk["relative_error"], "jaxmerge": jx["relative_error"]},
        "worst_module": {"mergekit": [mk["worst_module"], mk["worst_relative_error"]],
                         "jaxmerge": [jx["worst_module"], jx["worst_relative_error"]]},
        "error_ratio": jx["relative_error"] / mk["relative_error"] if mk["relative_error"] else None,
        "modules": len(jx["modules"]),
        "load_before": load_before, "load_after": os.getloadavg(),
    }
    print(f"rank {rank:>4} | mergekit {med['mergekit']:7.1f} s {row['peak_gb']['mergekit']:5.2f} GB "
          f"error {mk['relative_error']:.5f} | jaxmerge {med['jaxmerge']:6.1f} s {row['peak_gb']['jaxmerge']:5.2f} GB "
          f"error {jx['relative_error']:.5f}, cached {med['jaxmerge_cached']:6.1f} s | {row['speedup']:5.1f}x faster "
          f"({row['speedup_cached']:.1f}x cached), error x{row['error_ratio'] or 0:.4f} "
          f"| load {load_before[0]:.1f} -> {row['load_after'][0]:.1f}", flush=True)
    return row


def markdown(result: dict) -> str:
    """The results as a Markdown table (what the JSON holds, rounded)."""
    m = result["model"]
    lines = [
        f"# jaxmerge extract-lora vs mergekit-extract-lora ({result['machine']}, {result['date']})",
        "",
        f"Llama-shaped, {m['dtype']}: hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} layers, "
        f"vocabulary {m['vocab']} ({m['gb']:.2f} GB a model); fine-tune = base + rank-{DELTA_RANK} delta + noise.",
        f"Medians of {result['rounds']} alternating rounds, each tool in its own process (peak RSS: that process's); "
        "jaxmerge without a compilation cache, and cached: its kernels loaded from a persistent compilation "
        "cache filled by an earlier run (the command's default). Error: relative Frobenius error against the "
        "true delta over the decomposed modules.",
        f"Command: `{result['command']}`",
        "",
        "| rank | mergekit s | jaxmerge s | cached s | speedup (cached) | peak GB mergekit / jaxmerge | error mergekit "
        "| error jaxmerge | error ratio | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rank']} | {r['medians_s']['mergekit']:.1f} | {r['medians_s']['jaxmerge']:.1f} "
            f"| {r['medians_s']['jaxmerge_cached']:.1f} | {r['speedup']:.1f}x ({r['speedup_cached']:.1f}x) "
            f"| {r['peak_gb']['mergekit']:.2f} / {r['peak_gb']['jaxmerge']:.2f} "
            f"| {r['relative_error']['mergekit']:.5f} | {r['relative_error']['jaxmerge']:.5f} "
            f"| {r['error_ratio'] or 0:.4f} | {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2; TinyLlama has 22)")
    parser.add_argument("--ranks", default="16,64,128", help="comma-separated --max-rank values (default 16,64,128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/jaxmerge-extract-lora")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/extract_lora.json)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, ft = build_models(root, args.size, args.layers)
    hidden, inter, _, _, vocab = SIZES[args.size]
    rows = [bench(root, base, ft, int(rank), args.rounds) for rank in args.ranks.split(",")]
    out = Path(args.output or Path(__file__).parent / "results" / "extract_lora.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
        "command": shlex.join(["python", "-m", "benchmarks.extract_lora",
                               *(argv if argv is not None else sys.argv[1:])]),
        "model": {"size": args.size, "hidden": hidden, "intermediate": inter, "layers": args.layers, "vocab": vocab,
                  "dtype": "bfloat16", "gb": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9,
                  "delta": f"rank {DELTA_RANK} x {LOW_RANK_SCALE} + N(0, {NOISE_SCALE})"},
        "rounds": args.rounds, "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
    raise SystemExit(0)
