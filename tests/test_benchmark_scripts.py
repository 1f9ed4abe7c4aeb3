"""The benchmark scripts run (tiny sizes): their timings are reported, never asserted, but a
script that no longer runs, or whose two tools stopped agreeing on the inputs, must fail here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mergekit")


def test_methods_benchmark_times_both_tools_on_tiny_tensors(capsys):
    from benchmarks import methods

    rows = methods.run(size=64, repeats=1, names=["ties", "slerp", "model_stock"])
    assert [r["method"] for r in rows] == ["ties", "slerp", "model_stock"]
    for row in rows:
        assert row["mergekit_s"] > 0 and row["jaxmerge_s"] > 0 and row["first_call_s"] > 0
        assert row["speedup"] == pytest.approx(row["mergekit_s"] / row["jaxmerge_s"])
    assert [r["models"] for r in rows] == [3, 1, 3]  # slerp takes the base and one model
    assert "mergekit" in capsys.readouterr().out


@pytest.mark.slow
def test_quality_benchmark_quick_run(tmp_path):
    from benchmarks import quality

    out = tmp_path / "quality.json"
    results = quality.main(["--quick", "--out", str(out)])
    methods = results["methods"]
    assert out.exists() and len(results["tasks"]) >= 6
    # A testbed worth merging: fine-tunes beat the base, and a data-free merge recovers part of the gap.
    base, individual = methods["base (pretrained)"]["average"], methods["individual (fine-tuned)"]["average"]
    assert individual > base + 0.1
    assert base < methods["task_arithmetic"]["average"] < individual
    for row in methods.values():
        assert len(row["per_task"]) == len(results["tasks"])


def test_write_recycling_benchmark_times_both_writers(tmp_path):
    from benchmarks import write_recycling

    result = write_recycling.run(tensor_bytes=1 << 20, tensors=3, rounds=2, gap=0, directory=str(tmp_path))
    assert set(result["seconds"]) == {"keep", "recycle"}  # and the two files compared equal
    assert all(len(s) == 2 and min(s) > 0 for s in result["seconds"].values())


def test_fresh_buffers_benchmark_times_both_allocations(tmp_path):
    from benchmarks import fresh_buffers

    result = fresh_buffers.run(nbytes=5 << 20, rounds=2, gap=0, directory=str(tmp_path))  # and the bytes agreed
    for seconds in (result["fresh_s"], result["again_s"]):
        assert set(seconds) == {"numpy", "mapped"} and all(len(s) == 2 and min(s) > 0 for s in seconds.values())


def test_parallel_reads_benchmark_times_one_thread_and_several(tmp_path, monkeypatch):
    from benchmarks import parallel_reads
    from jaxmerge.formats import _pread

    monkeypatch.setattr(_pread, "reading_threads", lambda: 2)
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)
    files = []
    for i, size in enumerate((300_000, 123_457)):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes())
    result = parallel_reads.run(files, range_bytes=65_536, rounds=2)  # and both ways read the same bytes
    assert set(result["seconds"]) == {"one thread", "2 threads"}
    assert all(len(s) == 2 and min(s) > 0 for s in result["seconds"].values())
    assert result["gb"] == pytest.approx(423_457 / 1e9)
    assert _pread.reading_threads() == 2  # put back


@pytest.mark.slow
def test_extract_lora_benchmark_tiny(tmp_path):
    """Both extractors on a tiny bf16 Llama: timed, and their adapters' errors against the true delta agree."""
    from benchmarks import extract_lora

    out = tmp_path / "extract_lora.json"
    result = extract_lora.main(["--size", "tiny", "--ranks", "4", "--rounds", "1", "--dir", str(tmp_path / "work"),
                                "--output", str(out)])
    assert out.exists() and out.with_suffix(".md").exists()
    assert "benchmarks.extract_lora" in result["command"] and result["machine"]
    (row,) = result["rows"]
    assert row["rank"] == 4 and row["modules"] == 2 * 7
    assert all(min(w) > 0 for w in row["walls_s"].values()) and all(min(p) > 0 for p in row["peaks_gb"].values())
    errors = row["relative_error"]
    assert 0 < errors["mergekit"] < 1 and 0 < errors["jaxmerge"] < 1
    assert errors["jaxmerge"] <= 1.01 * errors["mergekit"]  # randomized within 1% of the exact SVD's


def test_byte_compile_writes_a_pyc_for_every_module_of_the_tree(tmp_path):
    """The timed jaxmerge trees are byte-compiled once, as an installed package is, not by every run."""
    import importlib.util

    from benchmarks.vs_mergekit import byte_compile

    (tmp_path / "jaxmerge" / "sub").mkdir(parents=True)
    for name in ("jaxmerge/__init__.py", "jaxmerge/sub/__init__.py", "jaxmerge/sub/mod.py"):
        (tmp_path / name).write_text("X = 1\n")
    byte_compile(tmp_path)
    for name in ("jaxmerge/__init__.py", "jaxmerge/sub/__init__.py", "jaxmerge/sub/mod.py"):
        assert Path(importlib.util.cache_from_source(str(tmp_path / name))).is_file(), name


@pytest.mark.parametrize("method", ["slerp", "ties", "della", "nuslerp", "karcher", "model_stock", "linear"])
def test_vs_mergekit_recipes_are_valid_for_both_tools(tmp_path, method):
    """`benchmarks.vs_mergekit` writes one recipe per method that mergekit's schema and jaxmerge's both take."""
    import json

    import yaml
    from mergekit.config import MergeConfiguration

    from benchmarks.vs_mergekit import write_recipe
    from jaxmerge.methods import _table as table
    from jaxmerge.recipes.schema import load_recipe

    models = []
    for name in ("base", "ft0", "ft1", "ft2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
        models.append(tmp_path / name)
    path = tmp_path / "recipe.yml"
    write_recipe(path, method, models[0], models[1:], "bfloat16")
    ours = load_recipe(path, strict=True)  # strict: no key that jaxmerge would only warn about
    theirs = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    assert ours.merge_method == theirs.merge_method == method
    spec = table.get(method)
    named = {str(m) for m in theirs.referenced_models()}
    assert (str(models[0]) in named) == (spec.base is not table.BasePolicy.IGNORED or method == "slerp")
    if spec.max_models is not None:
        assert len(named) <= spec.max_models
    if method == "slerp":  # the model cards' recipe: every layer, t a gradient per layer for attention and MLP
        assert [s.layer_range for s in theirs.slices[0].sources] == [(0, 5), (0, 5)]
        first = theirs.parameters["t"][0]
        assert (first.filter, first.value) == ("self_attn", [0, 0.5, 0.3, 0.7, 1])


def test_ties_numerics_compares_each_output_with_mergekits_float32_ties(tmp_path):
    """benchmarks.ties_numerics on tiny float32 inputs: jaxmerge's TIES (mergekit semantics) equals
    mergekit's own `ties` there (no ties at the threshold), and a perturbed output is counted."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from benchmarks.ties_numerics import compare
    from jaxmerge.engine.stream import merge_checkpoints

    rng = np.random.default_rng(0)
    base = {f"layers.{i}.weight": rng.standard_normal((32, 16), dtype=np.float32) for i in range(3)}
    models = tmp_path / "t-bfloat16"
    paths = []
    for i, name in enumerate(("base", "ft0", "ft1", "ft2")):
        (models / name).mkdir(parents=True)
        noise = 0 if i == 0 else 0.1
        save_file({k: v + noise * rng.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()},
                  str(models / name / "model.safetensors"))
        paths.append(models / name)
    merge_checkpoints(paths[1:], tmp_path / "out-jaxmerge", method="ties", base=paths[0], weights=[1.0, 0.5, 0.7],
                      density=0.2, semantics="mergekit", progress=False)
    (tmp_path / "out-mergekit").mkdir()
    merged = load_file(str(tmp_path / "out-jaxmerge" / "model.safetensors"))
    merged["layers.0.weight"][0, :4] += 1.0  # four entries off in one tensor
    save_file(merged, str(tmp_path / "out-mergekit" / "model.safetensors"))
    result = compare(tmp_path, size="t", tensors=3)
    assert result["summary"]["jaxmerge"]["share_differ"] == 0
    assert result["summary"]["mergekit"]["share_differ"] == pytest.approx(4 / (3 * 32 * 16))


def test_randomized_svd_error_benchmark_tiny(tmp_path, capsys):
    """The error table runs on small matrices: one row per family and rank, ratios at least 1 (exact is optimal)."""
    from benchmarks import randomized_svd_error

    out = tmp_path / "error.json"
    result = randomized_svd_error.main(["--sizes", "128x64", "--ranks", "4,16,32", "--seeds", "1",
                                        "--output", str(out)])
    rows = result["rows"]
    assert json.loads(out.read_text())["rows"] == rows
    assert {r["rank"] for r in rows} == {4, 16}  # 32 > 64 / 4: not a randomized case
    assert len(rows) == 2 * len(randomized_svd_error.families(128, 64))
    assert all(r["worst_error_ratio"] >= 1 - 1e-6 for r in rows)
    assert all(1 <= i <= 3 for r in rows for i in r["iterations"])  # at least one power iteration, at most q
    assert "worst, gaussian" in capsys.readouterr().out


@pytest.mark.slow
def test_moe_benchmark_tiny_times_both_tools_and_the_floor(tmp_path):
    """Both tools build the same tiny MoE, timed, with an I/O floor that reads and writes the output's bytes."""
    from benchmarks import moe

    assert moe.main(["--size", "tiny", "--experts", "2", "--rounds", "1", "--root", str(tmp_path / "work"),
                     "--results", str(tmp_path), "--name", "tiny"]) == 0
    (result,) = json.loads((tmp_path / "tiny.json").read_text())["results"]
    (floor,) = result["floors"]
    assert all(w > 0 for w in result["median_wall_s"].values()) and floor > 0
    assert result["jaxmerge_over_floor"] == pytest.approx(result["median_wall_s"]["jaxmerge"] / floor, rel=0.02)
    assert "I/O floor" in (tmp_path / "tiny.md").read_text()


def test_warm_page_cache_reads_every_byte_once(tmp_path):
    """The benchmarks read the inputs before each timed run; `read_files` reads in buffer-sized chunks
    up to its limit, across files, and leaves them as they are."""
    from benchmarks.floor import read_files, warm_page_cache

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 3000)
    assert warm_page_cache([a, b]) == 4000
    assert read_files([a, b], memoryview(bytearray(7))) == 4000  # many chunks
    assert read_files([a, b], memoryview(bytearray(7)), limit=1203) == 1203  # past the first file, then stops
    assert a.read_bytes() == b"a" * 1000 and b.read_bytes() == b"b" * 3000


def test_io_floor_reads_and_writes_the_bytes_asked(tmp_path, monkeypatch):
    from benchmarks.floor import io_floor
    from jaxmerge.formats import _pread, safetensors_io

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 3000)
    counted = {"read": 0, "written": b"", "threads": set()}

    class CountingFile(safetensors_io.StreamedFile):
        def write(self, data):
            counted["written"] += bytes(data)
            return super().write(data)

    real_read_into = _pread.read_into

    def counting_read_into(path, offset, view, threads=None):  # the floor reads as jaxmerge reads
        real_read_into(path, offset, view, threads)
        counted["read"] += len(view)
        counted["threads"].add(threads)

    monkeypatch.setattr(safetensors_io, "StreamedFile", CountingFile)
    monkeypatch.setattr(_pread, "read_into", counting_read_into)
    assert io_floor([a, b], tmp_path / "out.bin", out_bytes=2500, read_bytes=1200) > 0
    # 1200 read first, then the written bytes read again from the inputs in turn: a (1000), then b (1500).
    assert counted["written"] == b"a" * 1000 + b"b" * 1500
    assert counted["read"] == 1200 + 2500  # no read past what is asked
    assert counted["threads"] == {None}  # as many threads as jaxmerge reads with
    assert io_floor([a, b], tmp_path / "out.bin", out_bytes=2500, read_bytes=1200, threads=1) > 0
    assert counted["threads"] == {None, 1} and counted["read"] == 2 * (1200 + 2500)
    assert not (tmp_path / "out.bin").exists()  # removed after timing
    monkeypatch.undo()
    assert a.read_bytes() == b"a" * 1000 and b.read_bytes() == b"b" * 3000
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="inputs are empty"):
        io_floor([empty], tmp_path / "out.bin", out_bytes=10)


def _docs_generator(monkeypatch):
    """docs/hooks/generate.py (the benchmark page's tables), loaded with stand-ins for mkdocs where the
    docs extra is not installed: CI runs the tests before it installs it, and the table renderers use
    none of mkdocs (the stand-ins only let the module's imports and decorator run)."""
    import importlib.util
    import sys
    import types

    try:
        import mkdocs  # noqa: F401
    except ImportError:
        stand_ins = {name: types.ModuleType(name) for name in
                     ("mkdocs", "mkdocs.exceptions", "mkdocs.plugins", "mkdocs.structure", "mkdocs.structure.files")}
        stand_ins["mkdocs.exceptions"].PluginError = type("PluginError", (Exception,), {})
        stand_ins["mkdocs.plugins"].event_priority = lambda priority: (lambda f: f)
        stand_ins["mkdocs.structure.files"].File = stand_ins["mkdocs.structure.files"].Files = object
        for name, module in stand_ins.items():
            monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("generate", Path(__file__).parents[1] / "docs/hooks/generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def test_vs_mergekit_tables_show_the_one_thread_floor_where_measured(monkeypatch):
    """Results from before the parallel reader have one floor; later ones show the one-thread floor in brackets."""
    import copy

    from benchmarks.vs_mergekit import markdown

    old = json.loads((Path(__file__).parents[1] / "benchmarks/results/vs_mergekit_tinyllama_night2.json").read_text())
    row = old["rows"][0]
    assert f"| {row['floor_s']:.2f} |" in markdown(old) and "one reading thread" in markdown(old)
    new = copy.deepcopy(old)
    for r in new["rows"]:
        r["floor_one_thread_s"] = r["floor_s"] * 1.5
        r["x_floor_one_thread_cached"] = r["jaxmerge_cached_s"] / r["floor_one_thread_s"]
    assert f"| {row['floor_s']:.2f} ({row['floor_s'] * 1.5:.2f}) |" in markdown(new)
    generate = _docs_generator(monkeypatch)
    assert "in brackets" not in generate._bench_vs_mergekit(old)
    page = generate._bench_vs_mergekit(new)
    assert "in brackets, the floor with one reading thread" in page
    assert f"{row['floor_s']:.2f} ({row['floor_s'] * 1.5:.2f})" in page
    assert f"{row['x_floor_cached']:.1f} ({new['rows'][0]['x_floor_one_thread_cached']:.1f})" in page


def test_the_parallel_reads_result_has_a_table_of_its_own(monkeypatch):
    generate = _docs_generator(monkeypatch)
    path = Path(__file__).parents[1] / "benchmarks/results/parallel_reads.json"
    data = json.loads(path.read_text())
    page = generate._render_bench(path)
    assert "| reading | median s | GB/s | every round s |" in page
    for name, median in data["median_s"].items():
        assert f"| {name} | {median:.3f} | {data['gb_per_s'][name]:.1f} |" in page


def test_each_timed_run_starts_without_the_previous_output(tmp_path):
    """`vs_mergekit.remove_output` clears a tool's last output (nested files too) and accepts a missing one."""
    from benchmarks.vs_mergekit import remove_output

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"x" * 100)
    (out / "sub" / "f").write_text("y")
    remove_output(out)
    assert not out.exists() and tmp_path.exists()
    remove_output(out)  # nothing there: nothing to do
    assert not out.exists()


def test_cold_reads_benchmark_evicts_the_inputs_before_every_timed_run(tmp_path, monkeypatch):
    """`benchmarks.cold_reads`: a warm-up, then per round reading ahead, without (JAXMERGE_READ_AHEAD_BYTES=0)
    and the I/O floor, each with the inputs out of the page cache; the medians and ratios of those runs."""
    import os

    from benchmarks import cold_reads

    readahead = cold_reads._readahead()
    models = []
    for i in range(2):
        models.append(tmp_path / f"m{i}")
        models[-1].mkdir()
        with open(models[-1] / "model.safetensors", "wb") as f:
            f.write(np.random.default_rng(i).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
            os.fsync(f.fileno())
    files = [m / "model.safetensors" for m in models]

    probe = tmp_path / "probe.bin"  # can this file system drop a file from the page cache at all?
    with open(probe, "wb") as f:
        f.write(b"\1" * (1 << 20))
        os.fsync(f.fileno())
    if readahead.cached_fraction(probe) is None:
        pytest.skip("mincore cannot tell cached pages here")
    if cold_reads.evict([probe]) != 0.0:
        pytest.skip("this file system keeps files in memory")

    def cached() -> float:
        return max(readahead.cached_fraction(path) for path in files)

    events = []
    seconds = iter([9.0, 2.0, 3.0, 2.2, 3.1])

    def run_child(cmd, env):
        assert cmd[1:4] == ["-m", "jaxmerge", "merge"]
        events.append(("merge", env.get("JAXMERGE_READ_AHEAD_BYTES"), cached()))
        for p in files:
            p.read_bytes()  # as a merge would: the files are cached again afterwards
        return next(seconds), 0.5

    def floor(inputs, out):
        assert inputs == files
        events.append(("floor", None, cached()))
        return 1.0

    monkeypatch.setattr(cold_reads, "recipe_models", lambda recipe: models)
    monkeypatch.setattr(cold_reads, "run_child", run_child)
    monkeypatch.setattr(cold_reads, "io_floor_in_child", floor)
    result = cold_reads.run(tmp_path / "recipe.yml", rounds=2, work=tmp_path / "work")
    assert [e[:2] for e in events] == [("merge", None)] + [("merge", None), ("merge", "0"), ("floor", None)] * 2
    assert [e[2] for e in events[1:]] == [0.0] * 6  # out of the page cache at every timed run
    assert result["seconds"] == {"read ahead": [2.0, 2.2], "no read-ahead": [3.0, 3.1], "I/O floor": [1.0, 1.0]}
    assert result["speed_up"] == pytest.approx(3.05 / 2.1)
    assert result["x_floor"]["read ahead"] == pytest.approx(2.1)
    assert result["most_still_cached_after_evicting"] == 0.0


def test_the_cold_reads_result_has_a_table_of_its_own(monkeypatch):
    generate = _docs_generator(monkeypatch)
    data = {"date": "2026-12-06", "machine": "m", "command": "c", "recipe": "r.yml", "inputs_gb": 8.8, "rounds": 3,
            "median_s": {"read ahead": 12.5, "no read-ahead": 16.0, "I/O floor": 7.0},
            "seconds": {"read ahead": [12.5, 12.4, 13.0], "no read-ahead": [16.0, 15.5, 17.0], "I/O floor": [7, 7, 7]},
            "speed_up": 16.0 / 12.5, "x_floor": {"read ahead": 12.5 / 7, "no read-ahead": 16 / 7},
            "most_still_cached_after_evicting": 0.0}
    page = generate._bench_cold_reads(data)
    assert "| read ahead | 12.500 | 12.50, 12.40, 13.00 |" in page
    assert "1.28x faster than without" in page and "1.79x the I/O floor" in page


def test_vs_mergekit_runs_both_tools_on_the_device_under_test():
    """Without `--cuda` jaxmerge is held to the CPU (also where a GPU exists) and mergekit gets no `--cuda`; with
    it, mergekit-yaml computes on the GPU and JAX runs on its CUDA backend."""
    from benchmarks.vs_mergekit import device_env, machine_line, mergekit_cmd

    recipe, out = Path("r.yml"), Path("out")
    assert "--cuda" not in mergekit_cmd(recipe, out)
    assert mergekit_cmd(recipe, out, cuda=True)[-1] == "--cuda"
    assert device_env({"A": "1"}, cuda=False) == {"A": "1", "JAX_PLATFORMS": "cpu"}
    assert device_env({"JAX_PLATFORMS": "cpu"}, cuda=True)["JAX_PLATFORMS"] == "cuda"
    assert machine_line().endswith("CPU only") and machine_line("NVIDIA H100").endswith("GPU NVIDIA H100")


def test_vs_mergekit_cuda_stops_before_building_models_where_no_gpu_is_seen(tmp_path, capsys):
    """`--cuda` on a machine where torch or JAX sees no GPU stops with one line naming which, before any model
    is built (the benchmark would otherwise time the CPU and call it the GPU)."""
    import torch

    from benchmarks import vs_mergekit

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check passes where torch sees one (JAX's side is then the question)")
    with pytest.raises(SystemExit) as stop:
        vs_mergekit.main(["--cuda", "--dir", str(tmp_path / "work"), "--output", str(tmp_path / "r.json")])
    message = str(stop.value)
    assert message.startswith("--cuda: torch sees no GPU") and len(message.splitlines()) == 1, message
    assert not (tmp_path / "work").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("seen, expected", [
    ({"torch": None, "jax": "H100", "jax_backend": "gpu"}, "--cuda: torch sees no GPU"),
    ({"torch": "NVIDIA H100", "jax": None, "jax_backend": "cpu"}, "--cuda: JAX has no GPU backend (jax.default_backend() is 'cpu')"),
    ({"torch": "NVIDIA H100", "jax": "NVIDIA H100", "jax_backend": "gpu"}, None),
], ids=["no-torch-gpu", "no-jax-gpu", "both"])
def test_vs_mergekit_gpu_check_names_the_tool_that_sees_no_gpu(monkeypatch, seen, expected):
    """`gpu_name` reads what a child process's torch and JAX see: the GPU's name, or one line naming the tool
    that would have run on the CPU."""
    import subprocess

    from benchmarks import vs_mergekit

    monkeypatch.setattr(vs_mergekit.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout="some log line\n" + json.dumps(seen) + "\n", stderr=""))
    if expected is None:
        assert vs_mergekit.gpu_name() == "NVIDIA H100"
        return
    with pytest.raises(SystemExit) as stop:
        vs_mergekit.gpu_name()
    assert str(stop.value).startswith(expected) and len(str(stop.value).splitlines()) == 1, stop.value
