"""The overlapped checkpoint merge (reader, dispatch, writer threads), its profile and the compile cache."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxmerge.engine._pipeline import PhaseProfile, run_ordered
from jaxmerge.engine.stream import in_compile_order, machine_depth, merge_checkpoints
from jaxmerge.engine.compile_cache import default_cache_dir
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError, TensorInfo
from tiny_models import write_safetensors_models

SHAPES = {"embed.weight": (50, 16), "layers.0.w": (16, 16), "layers.0.b": (16,), "layers.1.w": (16, 16), "head": (50, 16)}


def write_models(root, n=4, dtype=np.float32, shapes=SHAPES, seed=0):
    return write_safetensors_models(root, n, shapes, seed=seed, dtype=dtype)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- run_ordered --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_stages_run_in_order_with_at_most_depth_items_in_flight(depth):
    lock = threading.Lock()
    live, peak, written = [0], [0], []

    def read(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.002 * (i % 3))  # uneven stages
        return i * 10

    def write(i, y):
        time.sleep(0.002 * ((i + 1) % 3))
        written.append((i, y))
        with lock:
            live[0] -= 1

    run_ordered(range(20), read, lambda i, x: x + 1, write, depth=depth)
    assert written == [(i, i * 10 + 1) for i in range(20)]
    assert peak[0] <= max(depth, 1)


def _threads():
    return [t for t in threading.enumerate() if t.name.startswith("jaxmerge-")]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("stages", [("read", "write"), ("write", "read"), ("dispatch", "read"), ("write", "dispatch")])
def test_the_earliest_failing_item_wins_whichever_stage(depth, stages):
    """Item 3 fails in one stage, item 5 in another: item 3's error is raised, as a serial loop would."""
    early, late = stages
    written = []

    def stage(name):
        def run(i, *rest):
            if (name, i) in ((early, 3), (late, 5)):
                raise ValueError(f"{name} {i}")
            return rest[0] if rest else i
        return run

    def write(i, y):
        stage("write")(i, y)
        written.append(i)

    with pytest.raises(ValueError, match=f"^{early} 3$"):
        run_ordered(range(10), stage("read"), stage("dispatch"), write, depth=depth)
    assert written == [0, 1, 2]  # everything before the failing item, nothing after
    assert not _threads()


def test_between_stops_every_stage_and_threads_are_joined():
    calls = []

    def between():
        if len(calls) >= 4:
            raise SystemExit(143)

    with pytest.raises(SystemExit):
        run_ordered(range(100), lambda i: calls.append(i) or i, lambda i, x: x, lambda i, y: None, depth=2, between=between)
    assert len(calls) < 10 and not _threads()


def test_profile_counts_phases_and_compilations():
    import jax
    import jax.numpy as jnp

    profile = PhaseProfile()
    with profile.compiles():
        with profile.phase("dispatch"):
            jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()  # a fresh function: one compilation
    d = profile.as_dict()
    assert d["compiles"] >= 1 and d["compile_s"] > 0 and 0 <= d["dispatch_s"]
    assert "compile" in profile.line()


# --- merge_checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_every_depth_writes_the_same_bytes(tmp_path, dtype):
    *models, base = write_models(tmp_path / "in", dtype=dtype)
    outputs = []
    for depth in (0, 1, 2, 3):
        out = tmp_path / f"out{depth}"
        plan = merge_checkpoints(models, out, base=base, method="dare_ties", density=0.4, weights=[1.0, 0.5, -0.3],
                                 seed=7, max_shard_size=3000, progress=False, depth=depth)
        assert plan.depth == depth and plan.profile["tensors"] == len(SHAPES) + 1
        outputs.append(files(out))
    assert len(outputs[0]) > 2  # sharded: several shards and an index
    assert all(o == outputs[0] for o in outputs[1:])


def test_reused_input_buffers_never_leak_into_another_tensor(tmp_path):
    """Many tensors of different sizes through reused host buffers, with a cast on read: same bytes at every depth."""
    shapes = {f"t{i:02d}": ((i % 5 + 1) * 8, (i % 3 + 1) * 4) for i in range(24)}
    *models, base = write_models(tmp_path / "in", dtype=ml_dtypes.bfloat16, shapes=shapes)
    outputs = []
    for depth in (0, 3):
        out = tmp_path / f"out{depth}"
        merge_checkpoints(models, out, base=base, method="ties", density=0.3, dtype="float32", out_dtype="bfloat16",
                          progress=False, depth=depth)
        outputs.append(files(out))
    assert outputs[0] == outputs[1]


def test_profile_is_returned_and_written(tmp_path, monkeypatch):
    models = write_models(tmp_path / "in", n=3)
    monkeypatch.setenv("JAXMERGE_PROFILE", str(tmp_path / "profile.json"))
    plan = merge_checkpoints(models, tmp_path / "out", method="ties", density=0.5, progress=False)
    written = json.loads((tmp_path / "profile.json").read_text())
    for key in ("wall_s", "read_s", "dispatch_s", "wait_s", "write_s", "sync_s", "tensors", "depth"):
        assert key in plan.profile and written[key] == plan.profile[key]
    assert plan.profile["depth"] == machine_depth()


def test_machine_depth_overlaps_only_with_a_spare_core(monkeypatch):
    """On XLA:CPU with 2 cores the merge is serial (no gain measured, less memory); with more it overlaps."""
    import jaxmerge.engine.stream as checkpoints

    monkeypatch.setattr(checkpoints.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(checkpoints.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert checkpoints.machine_depth() == 0
    monkeypatch.setattr(checkpoints.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert checkpoints.machine_depth() == 2
    monkeypatch.setattr(checkpoints.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(checkpoints.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert checkpoints.machine_depth() == 2


def test_depth_from_the_environment_and_bad_values(tmp_path, monkeypatch):
    models = write_models(tmp_path / "in", n=2)
    monkeypatch.setenv("JAXMERGE_PIPELINE_DEPTH", "0")
    assert merge_checkpoints(models, tmp_path / "a", method="linear", progress=False).depth == 0
    monkeypatch.setenv("JAXMERGE_PIPELINE_DEPTH", "many")
    with pytest.raises(CheckpointError, match="JAXMERGE_PIPELINE_DEPTH"):
        merge_checkpoints(models, tmp_path / "b", method="linear", progress=False)
    monkeypatch.delenv("JAXMERGE_PIPELINE_DEPTH")
    with pytest.raises(CheckpointError, match="depth"):
        merge_checkpoints(models, tmp_path / "c", method="linear", progress=False, depth=-1)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_tensors_are_merged_grouped_by_kernel_largest_group_first():
    """Each shard keeps its tensors; within it, tensors without a kernel come first, then each kernel's
    tensors together, the kernel with the most bytes in the whole plan first, in their own order."""
    def info(name, size):
        return TensorInfo(name, (size,), "F32")

    shards = [[info("a.norm", 4), info("a.up", 64), info("a.q", 16), info("ids", 8), info("b.norm", 4)],
              [info("b.up", 64), info("b.q", 16), info("c.q", 16), info("head", 96)]]
    kernel_of = {"a.norm": "norm", "b.norm": "norm", "a.up": "up", "b.up": "up", "a.q": "q", "b.q": "q",
                 "c.q": "q", "head": "head", "ids": None}
    ordered = in_compile_order(shards, kernel_of)
    # bytes per kernel: up 2 x 256, q 3 x 64, head 384, norm 2 x 16: up, head, q, norm
    assert [[t.name for t in shard] for shard in ordered] == [
        ["ids", "a.up", "a.q", "a.norm", "b.norm"], ["b.up", "head", "b.q", "c.q"]]
    assert shards[0][0].name == "a.norm"  # the plan's lists are not changed in place


def test_a_merge_writes_each_kernels_tensors_together(tmp_path):
    """The output's byte order groups the tensors of one kernel (first runs compile the rest meanwhile)."""
    shapes = {"a.norm": (16,), "a.up": (64, 32), "a.q": (32, 32), "b.norm": (16,), "b.up": (64, 32), "b.q": (32, 32)}
    models = write_safetensors_models(tmp_path / "in", 2, shapes, seed=1, dtype=np.float32)
    merge_checkpoints(models, tmp_path / "out", method="linear", progress=False)
    assert _byte_order(tmp_path / "out" / "model.safetensors") == [
        "position_ids", "a.up", "b.up", "a.q", "b.q", "a.norm", "b.norm"]  # the integers need no kernel
    merged = Checkpoint(tmp_path / "out" / "model.safetensors")
    inputs = [Checkpoint(m) for m in models]
    for name in shapes:  # the values do not depend on the order
        np.testing.assert_allclose(merged.read(name), (inputs[0].read(name) + inputs[1].read(name)) / 2, rtol=1e-6)


def _byte_order(path) -> list[str]:
    """The tensors of a safetensors file in the order of their bytes (the order they were merged in)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


@pytest.mark.parametrize("depth", [0, 2, 3])
def test_first_bad_tensor_in_plan_order_is_named(tmp_path, depth):
    """NaN in two float tensors and differing integers in a third: the one merged first (the output's
    byte order, `in_compile_order`) is reported whatever the depth, and nothing is written."""
    models = write_models(tmp_path / "in", n=3)
    merge_checkpoints(models, tmp_path / "clean", method="ties", density=0.5, progress=False, depth=depth)
    merged_order = _byte_order(tmp_path / "clean" / "model.safetensors")
    tensors = {k: Checkpoint(models[1]).read(k) for k in Checkpoint(models[1]).tensors}
    floats = [name for name in merged_order if tensors[name].dtype.kind == "f"]
    for name in (floats[0], floats[-1]):
        tensors[name] = tensors[name].copy()
        tensors[name].reshape(-1)[0] = np.nan
    tensors["position_ids"] = tensors["position_ids"] + 1
    save_file(tensors, str(models[1]))
    bad = [name for name in merged_order if name in (floats[0], floats[-1], "position_ids")]
    messages = {floats[0]: f"tensor {floats[0]} holds NaN", floats[-1]: f"tensor {floats[-1]} holds NaN",
                "position_ids": "position_ids .* differs"}
    with pytest.raises(CheckpointError, match=messages[bad[0]]):
        merge_checkpoints(models, tmp_path / "out", method="ties", density=0.5, progress=False, depth=depth)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(CheckpointError, match="position_ids .* differs"):  # NaN allowed, the integers still differ
        merge_checkpoints(models, tmp_path / "out", method="ties", density=0.5, progress=False, depth=depth,
                          allow_nonfinite=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    tensors["position_ids"] = tensors["position_ids"] - 1
    save_file(tensors, str(models[1]))
    with pytest.raises(CheckpointError, match=messages[floats[0]]):
        merge_checkpoints(models, tmp_path / "out", method="ties", density=0.5, progress=False, depth=depth)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not _threads()


def test_read_host_is_aligned_and_equals_the_library(tmp_path):
    (path,) = write_models(tmp_path, n=1, dtype=ml_dtypes.bfloat16)
    ckpt = Checkpoint(path)
    for name in ckpt.tensors:
        ours, theirs = ckpt.read_host(name), ckpt.read(name)
        assert ours.ctypes.data % 64 == 0 and ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))


@pytest.mark.parametrize("nbytes", [0, 1000, 8 << 20])
def test_fresh_buffers_are_aligned_writable_and_adopted_by_jax_without_a_copy(nbytes):
    import mmap

    import jax

    from jaxmerge.formats import safetensors_io

    buffer = safetensors_io.aligned_empty(nbytes)
    assert buffer.dtype == np.uint8 and buffer.nbytes == nbytes and (nbytes == 0 or buffer.ctypes.data % 64 == 0)
    # Large buffers are memory maps, not NumPy memory (which asks for huge pages: see aligned_empty).
    mapped = isinstance(getattr(buffer.base, "obj", None), mmap.mmap)
    assert mapped == (nbytes >= safetensors_io._MAPPED_BYTES and safetensors_io._MAP_FLAGS is not None)
    buffer[:] = 7
    floats = buffer[: nbytes // 4 * 4].view(np.float32)
    adopted = jax.device_put(floats, may_alias=True)
    assert nbytes == 0 or adopted.unsafe_buffer_pointer() == floats.ctypes.data
    np.testing.assert_array_equal(np.asarray(adopted).view(np.uint8), buffer[: floats.nbytes])


def test_input_truncated_after_planning_names_file_and_tensor(tmp_path, monkeypatch):
    models = write_models(tmp_path / "in", n=2)
    real = Checkpoint.read_host

    def shrink_then_read(self, name, into=None):
        if self.path == models[1]:
            with open(models[1], "r+b") as f:
                f.truncate(200)
        return real(self, name, into)

    monkeypatch.setattr(Checkpoint, "read_host", shrink_then_read)
    with pytest.raises(CheckpointError, match=f"{models[1]}: cannot read tensor"):
        merge_checkpoints(models, tmp_path / "out", method="linear", progress=False)
    assert not (tmp_path / "out").exists()


# --- the persistent compilation cache ----------------------------------------------------------

_CACHED_MERGE = textwrap.dedent(
    """
    import json, sys
    from jaxmerge.engine.compile_cache import enable_compile_cache
    where = enable_compile_cache(sys.argv[1])
    from jaxmerge.engine.stream import merge_checkpoints
    plan = merge_checkpoints(sys.argv[3:], sys.argv[2], method="ties", density=0.5, progress=False, force=True)
    print(json.dumps({"dir": str(where) if where else None, **plan.profile}))
    """
)


def _cached_merge(tmp_path, models, cache, **env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAXMERGE_"))}, **env}
    result = subprocess.run([sys.executable, "-c", _CACHED_MERGE, str(cache), str(tmp_path / "out"), *map(str, models)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_kernels_from_the_cache(tmp_path):
    models = write_models(tmp_path / "in", n=3)
    cache = tmp_path / "cache"
    first = _cached_merge(tmp_path, models, cache)
    assert first["dir"] == str(cache) and first["compiles"] > 0 and first.get("compile_cache_hits", 0) == 0
    entries = list(cache.iterdir())
    assert entries, "the first run wrote no cache entry"
    second = _cached_merge(tmp_path, models, cache)
    assert second.get("compile_cache_hits", 0) >= 1, second
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_cache_off_by_environment(tmp_path):
    models = write_models(tmp_path / "in", n=2)
    off = _cached_merge(tmp_path, models, tmp_path / "cache", JAXMERGE_COMPILE_CACHE="0")
    assert off["dir"] is None and not (tmp_path / "cache").exists() and "compile_cache_hits" not in off


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXMERGE_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "jaxmerge" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "jaxmerge" / "xla"
    monkeypatch.setenv("JAXMERGE_COMPILE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_cli_uses_the_compile_cache_by_default(tmp_path):
    models = write_models(tmp_path / "in", n=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAXMERGE_"))}
    env["JAXMERGE_COMPILE_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "jaxmerge", "merge", *map(str, models), "--method", "ties", "--density", "0.5",
           "--output", str(tmp_path / "out"), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "cache").iterdir()), "the command wrote no compiled kernel to the cache"
    off = subprocess.run([*cmd[:-2], str(tmp_path / "out2"), "--quiet"], capture_output=True, text=True,
                         env={**env, "JAXMERGE_COMPILE_CACHE_DIR": str(tmp_path / "cache2"), "JAXMERGE_COMPILE_CACHE": "0"}, timeout=300)
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "cache2").exists()


def test_tensors_of_one_size_share_a_kernel_and_merge_as_in_their_own_shape(tmp_path):
    """An entry-wise method merges a matrix and its transposed shape through one compiled kernel
    (`_merge_views`), with the bytes of merging each in its own shape (`merge_params`)."""
    import jax

    from jaxmerge import merge_params

    # Sizes no other test uses, so that the in-process kernel cache starts empty for them.
    shapes = {"up": (72, 336), "down": (336, 72), "norm": (72,)}
    *models, base = write_models(tmp_path / "in", shapes=shapes)
    plan = merge_checkpoints(models, tmp_path / "out", base=base, method="ties", density=0.3, weights=[1.0, 0.5, 0.7],
                             progress=False, depth=0)
    again = write_models(tmp_path / "in2", shapes={"other": (144, 168)}, seed=1)  # the same size, a third shape
    *others, other_base = again
    plan2 = merge_checkpoints(others, tmp_path / "out2", base=other_base, method="ties", density=0.3,
                              weights=[1.0, 0.5, 0.7], progress=False, depth=0)
    assert plan.profile["compiles"] > 0
    assert plan2.profile.get("compiles", 0) == 0  # every kernel of that size was compiled already

    def tree(path):
        ck = Checkpoint(path)
        return {name: ck.read(name) for name in shapes}

    expected = merge_params([tree(m) for m in models], [1.0, 0.5, 0.7], method="ties", base=tree(base), density=0.3)
    merged = Checkpoint(tmp_path / "out" / "model.safetensors")
    for name, shape in shapes.items():
        got = merged.read(name)
        assert got.shape == shape
        np.testing.assert_array_equal(got, np.asarray(jax.device_get(expected[name])))


def test_merge_kernels_are_compiled_ahead_in_their_own_thread(tmp_path, caplog):
    """Every kernel of a checkpoint merge is compiled by the background thread (`jaxmerge.engine._ahead`)
    before its tensor is dispatched: the dispatching thread compiles none, and the output is unchanged."""
    import logging

    import jax

    from jaxmerge.engine._ahead import THREAD_NAME

    # Sizes no other test uses (their flat sizes have no row view), so that every kernel compiles here.
    shapes = {"a": (53, 59), "b": (59, 61), "norm": (61,)}
    *models, base = write_models(tmp_path / "in", shapes=shapes)
    kwargs = dict(base=base, method="ties", density=0.3, weights=[1.0, 0.5, 0.7], progress=False)
    # Globally, not `with jax.log_compiles()`: that context holds for the calling thread only.
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            plan = merge_checkpoints(models, tmp_path / "out", depth=0, **kwargs)
    finally:
        jax.config.update("jax_log_compiles", False)
    kernels = [r for r in caplog.records if "Compiling jit(_merge_kernel)" in r.getMessage()
               or "Compiling jit(finite_flags)" in r.getMessage()]
    assert len(kernels) == 2 * len(shapes), [r.getMessage()[:60] for r in kernels]
    assert {r.threadName for r in kernels} == {THREAD_NAME}
    assert plan.profile["compile_ahead_s"] > 0 and "compile_wait_s" in plan.profile
    # The same merge with the kernels compiled by the dispatching thread itself (on a mesh nothing is
    # compiled ahead) writes the same bytes.
    from jaxmerge.core.sharding import make_mesh

    mesh = make_mesh(1)
    merge_checkpoints(models, tmp_path / "mesh", depth=0, mesh=mesh, **kwargs)
    assert files(tmp_path / "out") == files(tmp_path / "mesh")
