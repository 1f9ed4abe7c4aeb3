"""Whole-model merges: `jaxmerge merge` against mergekit 0.1.5 on the same models and recipe.

    python -m benchmarks.vs_mergekit [--sizes llama] [--dtypes float32] [--methods ties]
                                     [--rounds 3] [--baseline DIR] [--cuda]

Builds Llama-shaped models offline with transformers (a base and three
fine-tunes: base + small noise), writes one mergekit recipe per method, and
runs, taking turns round by round (this VM drifts by up to 25% between
stretches, and other jobs may share its cores):

* mergekit-yaml (on the CPU; with `--cuda`, `mergekit-yaml --cuda`);
* the warm I/O floor (`benchmarks.floor`): read every input once, write one
  output-sized file the way jaxmerge writes its shards, fsync included; after
  mergekit, as jaxmerge runs, while the host takes back mergekit's memory;
* `jaxmerge merge` on the same recipe without a compilation cache (every run
  compiles: JAXMERGE_COMPILE_CACHE=0), and with a persistent compilation cache
  warmed by an earlier run (`jaxmerge.engine.compile_cache`);
* with `--baseline DIR`, `jaxmerge merge` from another source tree (e.g.
  `git archive <commit> jaxmerge | tar -x -C DIR`), without a cache: the
  version before a change, in the same rounds.

Both jaxmerge trees are byte-compiled first (`byte_compile`), as pip compiles an installed package.
Every timed run writes a new output: each tool's previous output is removed before the timer starts
(`remove_output`), as the floor writes a new file.
Each tool runs in a child process; its peak RSS is that child's own (os.wait4).
Medians are reported, with ratios against mergekit and against the floor
measured in the same rounds. jaxmerge's phase profile (read, dispatch,
compile, wait, write, sync: `merge_checkpoints`' `plan.profile`, through
$JAXMERGE_PROFILE) is kept for every run. jaxmerge's very first run (cold
imports, compilation, no cache) is reported apart, as is the run that fills
the empty cache.

Then one child process merges the recipe several times in turn with
`depth=0` (serial: read, merge, write one tensor after the other) and the
default depth (overlapped): the in-process steady state, compilation excluded
(the first merge of each is a warm-up), with its phase profile.

The load average (`os.getloadavg`) before and after each configuration is
recorded: other processes on the machine slow every tool.

Devices: without `--cuda` both tools compute on the CPU, jaxmerge too on a
machine with a GPU (JAX_PLATFORMS=cpu). With `--cuda` mergekit does its
arithmetic on the GPU (`--cuda`) and jaxmerge runs on JAX's CUDA backend
(JAX_PLATFORMS=cuda); the benchmark first checks, in a child process, that
torch and JAX both see a GPU, and stops with one line saying which does not.

Results go to benchmarks/results/vs_mergekit.json, a Markdown table beside it
(vs_mergekit.md), and stdout.
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
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.floor import io_floor_in_child, warm_page_cache

# Llama shapes: (hidden, intermediate, layers, vocab). "llama" is the 0.67 GB float32 model of issue 13;
# "tinyllama" is TinyLlama-1.1B's shape (2.2 GB a model in bfloat16, the size and dtype people merge).
SIZES = {
    "small": (256, 688, 4, 8000),
    "llama": (1024, 2816, 8, 32000),
    "large": (1536, 4096, 8, 32000),
    "tinyllama": (2048, 5632, 22, 32000),
}
# Attention heads and key/value heads where they are not hidden // 128 and hidden // 256.
HEADS = {"tinyllama": (32, 4)}


def build_models(root: Path, size: str, dtype: str) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes (base + N(0, 0.01) noise), saved with transformers.

    Built in a child process: a child's peak RSS (os.wait4) counts the memory
    its parent held when it forked, so the models must never be held by the
    process that times the tools.
    """
    folder = root / f"{size}-{dtype}"
    paths = [folder / name for name in ("base", "ft0", "ft1", "ft2")]
    if not all((p / "config.json").exists() for p in paths):
        code = f"from pathlib import Path; from benchmarks.vs_mergekit import _build; _build(Path({str(root)!r}), {size!r}, {dtype!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return paths[0], paths[1:]


def _build(root: Path, size: str, dtype: str) -> tuple[Path, list[Path]]:
    """`build_models`' work, in the child process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, vocab = SIZES[size]
    folder = root / f"{size}-{dtype}"
    paths = [folder / name for name in ("base", "ft0", "ft1", "ft2")]
    if all((p / "config.json").exists() for p in paths):
        return paths[0], paths[1:]
    heads, kv_heads = HEADS.get(size, (max(1, hidden // 128), max(1, hidden // 256)))
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):  # no random initialisation of a model whose tensors are set below
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu").to(torch_dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in base.state_dict().values():  # N(0, 0.02) as transformers initialises Llama
            tensor.copy_(0.02 * torch.randn(tensor.shape, generator=gen))
    base.save_pretrained(paths[0])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, path in enumerate(paths[1:]):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, tensor in base.state_dict().items():  # one tensor at a time: memory stays near one model
                tensor.copy_(state[k].float() + 0.01 * torch.randn(tensor.shape, generator=gen))
        base.save_pretrained(path)
    return paths[0], paths[1:]


def write_recipe(path: Path, method: str, base: Path, models: list[Path], dtype: str) -> None:
    """One mergekit recipe for `method`, which both tools run unchanged.

    slerp is the recipe of most slerp model cards: base + one model over all
    layers, `t` a gradient per layer for attention and MLP, 0.5 elsewhere.
    Every other method takes `benchmarks.methods.PARAMS` (per-model values for
    the models in turn) and as many models as it accepts, with the base where
    the method uses one.
    """
    from benchmarks.methods import PARAMS
    from jaxmerge.methods import _table as table

    if method == "slerp":
        layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
        path.write_text(textwrap.dedent(f"""\
            slices:
              - sources:
                  - model: {base}
                    layer_range: [0, {layers}]
                  - model: {models[0]}
                    layer_range: [0, {layers}]
            merge_method: slerp
            base_model: {base}
            parameters:
              t:
                - filter: self_attn
                  value: [0, 0.5, 0.3, 0.7, 1]
                - filter: mlp
                  value: [1, 0.5, 0.7, 0.3, 0]
                - value: 0.5
            dtype: {dtype}
            """))
        return
    spec = table.get(method)
    uses_base = spec.base is not table.BasePolicy.IGNORED
    if spec.max_models is not None:
        models = models[: spec.max_models - uses_base]
    params = PARAMS.get(method, {})
    # One value for the merge (mergekit's shared parameters, e.g. nearswap's t, sce's select_topk) at the
    # top: mergekit does not read those from a model's entry ("Missing required parameter").
    scopes = {p.name: p.scope for p in spec.params}
    shared = {k: v for k, v in params.items() if scopes.get(k) is table.Scope.SHARED}
    lines = [f"merge_method: {method}", f"dtype: {dtype}"] + ([f"base_model: {base}"] if uses_base else [])
    if shared:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in shared.items()]
    lines.append("models:")
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        per_model = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items() if k not in shared}
        if per_model:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in per_model.items()]
    path.write_text("\n".join(lines) + "\n")


def recipe_models(recipe: Path) -> list[Path]:
    """The model directories a recipe reads (mergekit's own reading of it), each once."""
    import yaml
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    return sorted({Path(str(m.model.path)) for m in config.referenced_models()})


REPO = Path(__file__).resolve().parents[1]


def run_group(cmds: list[list[str]], env: dict | None = None, cwd: Path = REPO) -> tuple[float, list[float]]:
    """Start every command at once: seconds from the first start to the last exit, and each one's peak RSS (GB).

    `python -m` puts the working directory first on sys.path, ahead of
    PYTHONPATH: a child runs the jaxmerge of `cwd` (this checkout, or --baseline's tree).
    """
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd) for c in cmds]
    peaks = []
    for cmd, proc in zip(cmds, procs):
        _, status, usage = os.wait4(proc.pid, 0)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{cmd[0]} failed: {err[-2000:]}")
        peaks.append(usage.ru_maxrss / 1e6)  # Linux: kilobytes
    return time.perf_counter() - start, peaks


def run_child(cmd: list[str], env: dict | None = None, cwd: Path = REPO) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process (`run_group` of one)."""
    wall, peaks = run_group([cmd], env, cwd)
    return wall, peaks[0]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (virtual machines of one kind differ in it), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_line(gpu: str | None = None) -> str:
    """What the results tables say about the machine: CPU model, architecture, usable cores, and the GPU
    both tools computed on (`gpu_name`), else "CPU only"."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {platform.machine()}, {cores} cores, " + (f"GPU {gpu}" if gpu else "CPU only")


_GPU_CHECK = textwrap.dedent(
    """
    import json
    import jax, torch
    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
    print(json.dumps({"torch": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                      "jax": gpus[0].device_kind if gpus else None, "jax_backend": jax.default_backend()}))
    """
)


def gpu_name() -> str:
    """The GPU that `--cuda` runs both tools on, checked in a child process (as the tools will see it).

    Raises:
      SystemExit: one line naming the tool that sees no GPU (torch for mergekit, JAX for jaxmerge).
    """
    env = {k: v for k, v in _clean_env().items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", _GPU_CHECK], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"--cuda: checking for a GPU failed: {last}")
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    if seen["torch"] is None:
        raise SystemExit("--cuda: torch sees no GPU (torch.cuda.is_available() is False), so mergekit would run on "
                         "the CPU; install a CUDA build of torch")
    if seen["jax"] is None:
        raise SystemExit(f"--cuda: JAX has no GPU backend (jax.default_backend() is {seen['jax_backend']!r}), so "
                         "jaxmerge would run on the CPU; install jax[cuda12]")
    return seen["torch"]


def device_env(env: dict, cuda: bool) -> dict:
    """`env` with JAX on the device under test: the CPU (also where a GPU exists), or CUDA with `--cuda`."""
    return {**env, "JAX_PLATFORMS": "cuda" if cuda else "cpu"}


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def jaxmerge_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "jaxmerge", "merge", str(recipe), "--output", str(out), "--force", "--quiet"]


def mergekit_cmd(recipe: Path, out: Path, cuda: bool = False) -> list[str]:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    return [exe, str(recipe), str(out), "--quiet", "--random-seed", "0"] + (["--cuda"] if cuda else [])


def _clean_env() -> dict:
    """The environment without any JAX or jaxmerge cache, depth or profile setting."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXMERGE_"))}


def cache_env(cache: Path | None) -> dict:
    """No compilation cache (None), or the persistent cache in `cache`.

    Both the jaxmerge switch (honoured once the command line calls
    `enable_compile_cache`) and JAX's own variables are set, so the setting
    holds with or without that call.
    """
    env = _clean_env()
    if cache is None:
        env["JAXMERGE_COMPILE_CACHE"] = "0"
        return env
    env.update({
        "JAXMERGE_COMPILE_CACHE_DIR": str(cache), "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    })
    return env


def remove_output(out: Path) -> None:
    """Remove a tool's previous output before its next timed run, outside the time.

    Replacing a 2.2 GB output costs 0.3-0.65 s on this VM, whose disk is mounted with `discard`
    (unlinking the file discards its blocks: 0.36 s for 2.2 GB), and the runs would pay it for the
    run before them: jaxmerge's `--force` removes the old directory once the new one is in place,
    mergekit truncates the files it rewrites. The floor writes a new file, so the tools do too.
    """
    shutil.rmtree(out, ignore_errors=True)
    if out.exists():
        raise SystemExit(f"cannot remove the previous output {out}")


def run_jaxmerge(recipe: Path, out: Path, env: dict, profile_file: Path) -> tuple[float, float, dict]:
    """Wall, peak RSS and the merge's phase profile ({} when the jaxmerge run does not write one)."""
    profile_file.unlink(missing_ok=True)
    wall, peak = run_child(jaxmerge_cmd(recipe, out), {**env, "JAXMERGE_PROFILE": str(profile_file)})
    profile = json.loads(profile_file.read_text()) if profile_file.exists() else {}
    profile.pop("output", None)
    return wall, peak, profile


_IN_PROCESS = textwrap.dedent(
    """
    import json, os, sys
    from jaxmerge.recipes.schema import load_recipe
    from jaxmerge.recipes.plan import merge_recipe
    recipe, out, reps, depths = load_recipe(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
    results = {d: [] for d in depths}
    for rep in range(reps + 1):  # the first merge of each depth is a warm-up (compilation)
        for d in depths:
            os.environ["JAXMERGE_PIPELINE_DEPTH"] = d
            plan = merge_recipe(recipe, out, force=True, progress=False)
            if rep:
                results[d].append(plan.profile)
    print(json.dumps(results))
    """
)


def in_process(recipe: Path, out: Path, reps: int, depths: list[int], cuda: bool = False) -> dict:
    """Per depth, the profiles of `reps` merges in one process after a warm-up merge."""
    result = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(recipe), str(out), str(reps), ",".join(map(str, depths))],
                            capture_output=True, text=True, env=device_env(cache_env(None), cuda), cwd=REPO)
    if result.returncode:
        raise SystemExit(f"in-process merges failed: {result.stderr[-2000:]}")
    return {int(d): runs for d, runs in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def median_profile(profiles: list[dict]) -> dict:
    keys = sorted({k for p in profiles for k in p})
    return {k: float(np.median([p[k] for p in profiles if k in p])) for k in keys}


def bench(root: Path, size: str, dtype: str, method: str, rounds: int, baseline: Path | None, reps: int,
          cuda: bool = False) -> dict:
    load_before = os.getloadavg()
    base, models = build_models(root, size, dtype)
    recipe = root / f"{size}-{dtype}-{method}.yml"
    write_recipe(recipe, method, base, models, dtype)
    files = [f for m in recipe_models(recipe) for f in weight_files(m)]  # the floor reads what the merge reads
    out_j, out_m = root / "out-jaxmerge", root / "out-mergekit"
    profile_file = root / "profile.json"
    env_nocache = device_env(cache_env(None), cuda)
    cache = Path(tempfile.mkdtemp(prefix="jaxmerge-cc-"))
    env_cache = device_env(cache_env(cache), cuda)
    env_baseline = {**env_nocache, "PYTHONPATH": str(baseline)} if baseline else None
    # First runs (the page cache is warm for both): no cache at all, then filling an empty cache.
    io_floor_in_child(files, root / "floor.bin")
    remove_output(out_j)
    first_wall, first_peak, first_profile = run_jaxmerge(recipe, out_j, env_nocache, profile_file)
    remove_output(out_j)
    fill_wall, _, fill_profile = run_jaxmerge(recipe, out_j, env_cache, profile_file)
    tools = ["floor", "floor_one_thread", "mergekit", "jaxmerge", "jaxmerge_cached"] + (["baseline"] if baseline else [])
    walls = {k: [] for k in tools}
    peaks = {k: [] for k in tools if not k.startswith("floor")}
    profiles = {"jaxmerge": [], "jaxmerge_cached": []}
    for _ in range(rounds):
        # Every timed run starts with the inputs in the page cache (see `warm_page_cache`) and writes a
        # new output, as the floor writes a new file (`remove_output`).
        remove_output(out_m)
        w, p = run_child(mergekit_cmd(recipe, out_m, cuda), env_nocache)
        walls["mergekit"].append(w), peaks["mergekit"].append(p)
        # The floor where jaxmerge runs, after mergekit: the host is still taking back mergekit's memory
        # (up to 12 GB) then, which slows every process; measured before mergekit it was the faster.
        warm_page_cache(files)
        walls["floor"].append(io_floor_in_child(files, root / "floor.bin"))
        # The floor as measured before jaxmerge read its inputs with several threads (2026-12-06): one
        # reading thread, for comparisons with earlier results.
        warm_page_cache(files)
        walls["floor_one_thread"].append(io_floor_in_child(files, root / "floor.bin", threads=1))
        for tool, env in (("jaxmerge", env_nocache), ("jaxmerge_cached", env_cache)):
            remove_output(out_j)
            warm_page_cache(files)
            w, p, prof = run_jaxmerge(recipe, out_j, env, profile_file)
            walls[tool].append(w), peaks[tool].append(p), profiles[tool].append(prof)
        if baseline:
            remove_output(out_j)
            warm_page_cache(files)
            w, p = run_child(jaxmerge_cmd(recipe, out_j), env_baseline, cwd=baseline)
            walls["baseline"].append(w), peaks["baseline"].append(p)
    steady = in_process(recipe, out_j, reps, [0, 2], cuda) if reps else {}
    shutil.rmtree(cache, ignore_errors=True)
    load_after = os.getloadavg()
    med = {k: float(np.median(v)) for k, v in walls.items()}
    row = {
        "size": size, "dtype": dtype, "method": method,
        "model_gb": round(sum(f.stat().st_size for f in weight_files(base)) / 1e9, 3),
        "walls_s": walls, "peaks_gb": peaks, "medians_s": med,
        "mergekit_s": med["mergekit"], "jaxmerge_s": med["jaxmerge"], "jaxmerge_cached_s": med["jaxmerge_cached"],
        "floor_s": med["floor"], "floor_one_thread_s": med["floor_one_thread"],
        "speedup": med["mergekit"] / med["jaxmerge"], "speedup_cached": med["mergekit"] / med["jaxmerge_cached"],
        "x_floor": med["jaxmerge"] / med["floor"], "x_floor_cached": med["jaxmerge_cached"] / med["floor"],
        "x_floor_one_thread_cached": med["jaxmerge_cached"] / med["floor_one_thread"],
        "peak_gb": {k: max(v) for k, v in peaks.items()},
        "rss_ratio": max(peaks["jaxmerge"]) / max(peaks["mergekit"]),
        "first_run_s": first_wall, "first_run_peak_gb": first_peak, "first_run_profile": first_profile,
        "cache_fill_run_s": fill_wall, "cache_fill_profile": fill_profile,
        "profile_nocache": median_profile(profiles["jaxmerge"]), "profile_cached": median_profile(profiles["jaxmerge_cached"]),
        "in_process": {f"depth{d}": {"walls_s": [p["wall_s"] for p in runs], "median": median_profile(runs)}
                       for d, runs in steady.items()},
        "load_before": load_before, "load_after": load_after,
    }
    if baseline:
        row["baseline_s"] = med["baseline"]
        row["baseline_ratio"] = med["baseline"] / med["jaxmerge"]
    line = (
        f"{size:>6} {dtype:>8} {method:>15} {row['model_gb']:6.2f} GB | mergekit {med['mergekit']:6.1f} s "
        f"{row['peak_gb']['mergekit']:5.2f} GB | jaxmerge {med['jaxmerge']:5.1f} s, cached {med['jaxmerge_cached']:5.1f} s, "
        f"{row['peak_gb']['jaxmerge']:5.2f} GB | {row['speedup']:5.1f}x / {row['speedup_cached']:5.1f}x faster | "
        f"floor {med['floor']:5.2f} s (one reading thread {med['floor_one_thread']:5.2f} s) | first run {first_wall:.1f} s"
    )
    if baseline:
        line += f" | baseline {med['baseline']:.1f} s"
    for d, runs in steady.items():
        line += f" | in-process depth {d}: {float(np.median([p['wall_s'] for p in runs])):.2f} s"
    print(line + f" | load {load_before[0]:.1f} -> {load_after[0]:.1f}", flush=True)
    return row


def _floor_cell(row: dict) -> str:
    """The floor's seconds, and in brackets the one-reading-thread floor's where the run measured it."""
    if "floor_one_thread_s" not in row:
        return f"{row['floor_s']:.2f}"
    return f"{row['floor_s']:.2f} ({row['floor_one_thread_s']:.2f})"


def markdown(result: dict) -> str:
    """The results as Markdown tables (what the JSON holds, rounded)."""
    lines = [
        f"# jaxmerge merge vs mergekit-yaml ({result['machine']}, {result['date']})",
        "",
        f"Medians of {result['rounds']} alternating rounds, each tool in its own process (peak RSS: that process's).",
        "jaxmerge: no compilation cache (every run compiles); cached: persistent compilation cache, warmed.",
        "Floor: reading every input once and writing one output-sized file (page cache warm), fsync included,",
        "reading as jaxmerge reads (several threads); in brackets with one reading thread, as measured before.",
        "",
        "| model | dtype | method | GB/model | mergekit s | jaxmerge s | cached s | floor s | speedup (cached) "
        "| x floor (cached) | peak GB mergekit / jaxmerge | first run s | cache fill s | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['method']} | {r['model_gb']:.2f} | {r['mergekit_s']:.1f} | {r['jaxmerge_s']:.2f} "
            f"| {r['jaxmerge_cached_s']:.2f} | {_floor_cell(r)} | {r['speedup']:.1f}x ({r['speedup_cached']:.1f}x) "
            f"| {r['x_floor']:.1f} ({r['x_floor_cached']:.1f}) | {r['peak_gb']['mergekit']:.2f} / {r['peak_gb']['jaxmerge']:.2f} "
            f"| {r['first_run_s']:.1f} | {r['cache_fill_run_s']:.1f} | {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        )
    if any("baseline_s" in r for r in result["rows"]):
        lines += ["", "Baseline (`--baseline`, no cache, same rounds):", "",
                  "| model | dtype | method | baseline s | jaxmerge s | baseline / jaxmerge | peak GB baseline / jaxmerge |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if "baseline_s" in r:
                lines.append(f"| {r['size']} | {r['dtype']} | {r['method']} | {r['baseline_s']:.2f} | {r['jaxmerge_s']:.2f} "
                             f"| {r['baseline_ratio']:.2f}x | {r['peak_gb']['baseline']:.2f} / {r['peak_gb']['jaxmerge']:.2f} |")
    phases = ["wall_s", "read_s", "dispatch_s", "compile_s", "wait_s", "write_s", "sync_s"]
    lines += ["", "Phase profile, seconds (medians; overlapped phases add up to more than the wall; "
              "wait: merge results not ready when the writer wanted them):", "",
              "| model | dtype | method | run | " + " | ".join(p[:-2] for p in phases) + " | compiles | cache hits |",
              "|---|---|---|---|" + "---|" * (len(phases) + 2)]
    for r in result["rows"]:
        runs = [("CLI first run", r["first_run_profile"]), ("CLI, no cache", r["profile_nocache"]),
                ("CLI, cached", r["profile_cached"])]
        runs += [(f"in-process, depth {k[5:]}", v["median"]) for k, v in r["in_process"].items()]
        for label, prof in runs:
            if not prof:
                continue
            cells = [f"{prof[p]:.2f}" if p in prof else "-" for p in phases]
            lines.append(f"| {r['size']} | {r['dtype']} | {r['method']} | {label} | " + " | ".join(cells)
                         + f" | {prof.get('compiles', 0):.0f} | {prof.get('compile_cache_hits', 0):.0f} |")
    return "\n".join(lines) + "\n"


def byte_compile(tree: Path) -> None:
    """Byte-compile a jaxmerge source tree, as pip does an installed package (mergekit's is).

    Where PYTHONDONTWRITEBYTECODE is set (this VM sets it), a source tree is otherwise compiled again
    by every process that imports it: ~0.13 s of each jaxmerge run here (the merge's imports,
    0.80-0.85 s against 0.70-0.72 s byte-compiled), which an installed jaxmerge does not spend.
    """
    import compileall

    compileall.compile_dir(str(tree / "jaxmerge"), quiet=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="llama", help=f"comma-separated, of {sorted(SIZES)} (default llama)")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--methods", default="ties",
                        help="comma-separated mergekit methods (benchmarks.methods.PARAMS' names; default ties)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="in-process merges per depth after the warm-up (0: none)")
    parser.add_argument("--baseline", default=None, help="a jaxmerge source tree to time as well (PYTHONPATH)")
    parser.add_argument("--dir", default="/tmp/jaxmerge-vs-mergekit")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/vs_mergekit.json)")
    parser.add_argument("--cuda", action="store_true",
                        help="both tools on the GPU: mergekit-yaml --cuda, jaxmerge on JAX's CUDA backend")
    args = parser.parse_args(argv)
    gpu = gpu_name() if args.cuda else None  # before any model is built
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    baseline = Path(args.baseline).resolve() if args.baseline else None
    for tree in (REPO, baseline):
        if tree is not None:
            byte_compile(tree)
    rows = [
        bench(root, size, dtype, method, args.rounds, baseline, args.reps, args.cuda)
        for size in args.sizes.split(",") for dtype in args.dtypes.split(",") for method in args.methods.split(",")
    ]
    out = Path(args.output or Path(__file__).parent / "results" / "vs_mergekit.json")
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_line(gpu), "cuda": args.cuda,
        "command": "python -m benchmarks.vs_mergekit " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "reps": args.reps, "baseline": str(baseline) if baseline else None, "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
