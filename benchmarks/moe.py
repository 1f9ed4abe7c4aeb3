"""Mixtures of experts: `jaxmerge moe` against mergekit 0.1.5's `mergekit-moe` on the same configuration.

    python -m benchmarks.moe [--size llama|tinyllama|small|tiny] [--experts 4] [--rounds 2] [--gate-mode cheap_embed]
                             [--name moe]

Builds offline (transformers, no downloads) a Llama-shaped base and `--experts`
fine-tunes (base + N(0, 0.01) noise) in bfloat16, as LLMs ship, with a word-level
tokenizer of the model's vocabulary; writes one mergekit-moe configuration
(every expert with its own prompts, routers from `--gate-mode`); then runs
mergekit-moe and `jaxmerge moe` (no compilation cache: every run compiles), taking
turns round by round, each in a child process whose peak RSS is its own
(os.wait4). Each round also measures the I/O floor (`benchmarks.floor`: read as many
bytes of the inputs as the output holds, base first, then write them, fsync included;
the output's tensors are the base's and the experts' MLPs, each read once): the least
any tool can spend. Reports median wall seconds and peak RSS, the ratios in the same
rounds, and whether the two outputs load as the same model (every tensor after
transformers' loading, max |difference| of the routers).

Results go to benchmarks/results/moe.json and moe.md (`--name` for others), and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.floor import io_floor_in_child
from benchmarks.vs_mergekit import REPO, cache_env, machine_line, run_child

# (hidden, intermediate, layers, vocab): "llama" is the size (hidden 1024, bf16).
SIZES = {"tiny": (64, 128, 2, 512), "small": (256, 688, 4, 8000), "llama": (1024, 2816, 8, 32000),
         "tinyllama": (2048, 5632, 22, 32000)}  # TinyLlama-1.1B's shape: 2.2 GB an expert


def _build(root: Path, size: str, experts: int) -> None:
    """The base, the fine-tunes and the tokenizer (in a child: the timing process never holds the models)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, inter, layers, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(experts + 1):
        path = root / ("base" if i == 0 else f"ft{i}")
        if i:
            gen = torch.Generator().manual_seed(i)
            model.load_state_dict({k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                                   for k, v in state.items()})
        model.save_pretrained(path)
        fast.save_pretrained(path)


def build(root: Path, size: str, experts: int, gate_mode: str) -> Path:
    """The models (built once per size) and the configuration file; returns its path."""
    folder = root / f"{size}-{experts}"
    if not (folder / f"ft{experts}" / "config.json").exists():
        code = f"from pathlib import Path; from benchmarks.moe import _build; _build(Path({str(folder)!r}), {size!r}, {experts})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    lines = [f"base_model: {folder / 'base'}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts_per_token: 2",
             "experts:"]
    for i in range(1, experts + 1):
        words = " ".join(f"w{10 * i + j}" for j in range(5))
        lines += [f"  - source_model: {folder / f'ft{i}'}", f'    positive_prompts: ["{words}"]']
    config = folder / f"moe-{gate_mode}.yml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _agreement(ours: Path, theirs: Path) -> dict:
    """Load both outputs with transformers: do all tensors agree (routers to rounding)? In bfloat16, the
    outputs' dtype: two float32 copies of a TinyLlama-sized MoE would not fit in this machine's memory."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained({str(ours)!r}, dtype=torch.bfloat16).state_dict()
b = AutoModelForCausalLM.from_pretrained({str(theirs)!r}, dtype=torch.bfloat16).state_dict()
gate = [k for k in a if k.endswith("mlp.gate.weight")]
print(json.dumps({{"same_tensors": set(a) == set(b),
                  "experts_and_rest_equal": all(torch.equal(a[k], b[k]) for k in a if k not in gate),
                  "router_max_abs_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in gate)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(root: Path, size: str, experts: int, gate_mode: str, rounds: int) -> dict:
    config = build(root, size, experts, gate_mode)
    env = cache_env(None)
    mergekit = shutil.which("mergekit-moe") or str(Path(sys.executable).parent / "mergekit-moe")
    tools = {
        "mergekit": lambda out: [mergekit, str(config), str(out), "--quiet", "--random-seed", "0"],
        "jaxmerge": lambda out: [sys.executable, "-m", "jaxmerge", "moe", str(config), str(out), "--force", "--quiet"],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
    inputs = sorted(f for model in config.parent.iterdir() if model.is_dir()
                    for f in model.iterdir() if f.suffix == ".safetensors")
    floors: list[float] = []
    for r in range(rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))  # alternate who goes first
        for name in order:
            out = root / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # the removal's disk work (ext4 discards here) is done before the clock starts, for both
            runs[name].append(run_child(tools[name](out), env))
            print(f"round {r + 1} {name}: {runs[name][-1][0]:.1f} s, {runs[name][-1][1]:.2f} GB", flush=True)
        output_bytes = sum(f.stat().st_size for f in (root / "out-jaxmerge").iterdir() if f.is_file())
        # The output's tensors each come from one input tensor (the routers aside): read as much as is written.
        floors.append(io_floor_in_child(inputs, root / "floor.bin", output_bytes, output_bytes))
        print(f"round {r + 1} I/O floor: {floors[-1]:.1f} s", flush=True)
    med = {name: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for name, v in runs.items()}
    hidden, inter, layers, vocab = SIZES[size]
    return {
        "size": size, "shape": {"hidden": hidden, "intermediate": inter, "layers": layers, "vocab": vocab},
        "experts": experts, "gate_mode": gate_mode, "dtype": "bfloat16", "rounds": rounds,
        "input_gb_each": round(sum(f.stat().st_size for f in (config.parent / "base").glob("*.safetensors")) / 1e9, 3),
        "output_gb": round(sum(f.stat().st_size for f in (root / "out-jaxmerge").glob("*.safetensors")) / 1e9, 3),
        "runs": runs,
        "median_wall_s": {k: round(v[0], 2) for k, v in med.items()},
        "median_peak_rss_gb": {k: round(v[1], 3) for k, v in med.items()},
        "speedup": round(med["mergekit"][0] / med["jaxmerge"][0], 2),
        "memory_ratio": round(med["jaxmerge"][1] / med["mergekit"][1], 3),
        "io_floor_s": round(statistics.median(floors), 3), "floors": floors,
        "jaxmerge_over_floor": round(med["jaxmerge"][0] / statistics.median(floors), 2),
        "agreement": _agreement(root / "out-jaxmerge", root / "out-mergekit"),
    }


def markdown(results: list[dict], machine: str, date: str, command: str) -> str:
    lines = [f"# jaxmerge moe vs mergekit-moe\n\n{machine}; {date}; `{command}`\n",
             "| model | experts | gates | mergekit | jaxmerge | speed-up | I/O floor | jaxmerge / floor "
             "| peak RSS mergekit | jaxmerge | memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["shape"]
        lines.append(
            f"| Llama h{s['hidden']} x{s['layers']} bf16 ({r['input_gb_each']} GB each) | {r['experts']} | {r['gate_mode']} "
            f"| {r['median_wall_s']['mergekit']} s | {r['median_wall_s']['jaxmerge']} s | {r['speedup']}x "
            f"| {r['io_floor_s']} s | {r['jaxmerge_over_floor']}x "
            f"| {r['median_peak_rss_gb']['mergekit']} GB | {r['median_peak_rss_gb']['jaxmerge']} GB | {r['memory_ratio']}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="llama")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--gate-mode", default="cheap_embed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/jaxmerge-bench-moe"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="moe", help="result files NAME.json and NAME.md (default moe)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    result = bench(args.root, args.size, args.experts, args.gate_mode, args.rounds)
    date = time.strftime("%Y-%m-%d")
    command = "python -m benchmarks.moe " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"machine": machine_line(), "date": date, "command": command.strip(), "results": [result]}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown([result], record["machine"], date, record["command"])
    (args.results / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
