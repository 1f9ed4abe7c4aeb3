"""Streamed checkpoint merging and the `jaxmerge merge` command."""

import json
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxmerge
from tiny_models import write_safetensors_models
from jaxmerge.engine.stream import merge_checkpoints
from jaxmerge.methods.pytree import path_key
from jaxmerge.formats.safetensors_io import Checkpoint


def write_models(root, n=3, seed=0, shapes=None, dtype=np.float32):
    shapes = shapes or {"embed.weight": (50, 16), "layers.0.w": (16, 16), "layers.0.b": (16,)}
    return write_safetensors_models(root, n, shapes, seed=seed, dtype=dtype)


def read_all(path):
    c = Checkpoint(path)
    return {name: c.read(name) for name in c.tensors}


def cli(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxmerge", "merge", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_each_tensor_is_the_core_merge_of_task_vectors(tmp_path, method):
    *models, base = write_models(tmp_path, n=4, dtype=ml_dtypes.bfloat16)
    w = [1.0, 0.5, -0.7]
    density = {} if method == "task_arithmetic" else {"density": 0.3}
    merge_checkpoints(models, tmp_path / "out", method=method, weights=w, base=base, seed=5, progress=False, **density)
    out = read_all(tmp_path / "out")
    inputs = [read_all(m) for m in models]
    b = read_all(base)
    for name, merged in out.items():
        if name == "position_ids":
            np.testing.assert_array_equal(merged, np.arange(10))
            continue
        # Task vectors are taken in float32 (bfloat16 deltas are not rounded); one rounding at the end.
        f32 = lambda x: jax.numpy.asarray(x, jax.numpy.float32)  # noqa: E731
        tasks = [f32(t[name]) - f32(b[name]) for t in inputs]
        args = (tasks, w) if method == "task_arithmetic" else (tasks, w, 0.3)
        kwargs = {"key": path_key(jax.random.key(5), name)} if method.startswith("dare") else {}
        expected = np.asarray((f32(b[name]) + getattr(jaxmerge, method)(*args, **kwargs)).astype(b[name].dtype))
        assert merged.dtype == b[name].dtype
        np.testing.assert_array_equal(merged, expected)


def test_sharded_output_with_index_and_recorded_recipe(tmp_path):
    models = write_models(tmp_path)
    merge_checkpoints(models, tmp_path / "out", method="ties", density=0.5, max_shard_size=2000, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:  # the library's own reader accepts every file
        with safe_open(str(tmp_path / "out" / shard), framework="numpy") as f:
            meta = f.metadata()
            assert meta["jaxmerge_version"] == jaxmerge.__version__
            assert json.loads(meta["jaxmerge_recipe"])["method"] == "ties"
            for k in f.keys():
                f.get_tensor(k)
    # A sharded checkpoint is also a valid input, and merging it again is reproducible.
    merge_checkpoints([tmp_path / "out"] * 2, tmp_path / "again", method="task_arithmetic", weights=[0.5, 0.5], progress=False)
    np.testing.assert_array_equal(read_all(tmp_path / "again")["layers.0.w"], read_all(tmp_path / "out")["layers.0.w"])


def test_cli_matches_api_and_recipe_with_per_model_density(tmp_path):
    models = write_models(tmp_path)
    result = cli(*models, "--method", "dare_ties", "--weights", "1,0.5,0.7", "--density", "0.4", "--seed", "2", "--output", tmp_path / "cli", "--quiet")
    assert result.returncode == 0, result.stderr
    merge_checkpoints(models, tmp_path / "api", method="dare_ties", weights=[1, 0.5, 0.7], density=0.4, seed=2, progress=False)
    a, b = read_all(tmp_path / "cli"), read_all(tmp_path / "api")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    recipe = tmp_path / "recipe.yaml"
    # mergekit's schema; model paths are relative to the working directory, as in mergekit.
    recipe.write_text(
        "merge_method: ties\nparameters: {density: 0.5}\njaxmerge: {semantics: peft}\nmodels:\n"
        "  - {model: model0.safetensors, parameters: {weight: 1.0, density: 0.2}}\n"
        "  - {model: model1.safetensors, parameters: {weight: 0.5}}\n"
        "  - {model: model2.safetensors, parameters: {weight: 0.7, density: 0.9}}\n"
    )
    result = cli(recipe, "--output", "from_recipe", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = read_all(tmp_path / "from_recipe")
    inputs = [read_all(m) for m in models]
    pruned = [jaxmerge.magnitude_based_pruning(t["layers.0.w"], d) for t, d in zip(inputs, (0.2, 0.5, 0.9))]
    with pytest.warns(UserWarning, match="no pruning"):  # pruned already: ties at density 1
        expected = jaxmerge.ties(pruned, [1.0, 0.5, 0.7], 1.0)
    np.testing.assert_array_equal(out["layers.0.w"], np.asarray(expected))


def test_dry_run_writes_nothing_and_existing_output_needs_force(tmp_path):
    models = write_models(tmp_path)
    result = cli(*models, "--method", "ties", "--density", "0.2", "--output", tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "estimated peak memory" in result.stdout and "layers.0.w" in result.stdout and "[16, 16]" in result.stdout
    assert not (tmp_path / "out").exists()
    assert cli(*models, "--method", "ties", "--density", "0.2", "--output", tmp_path / "out", "--quiet").returncode == 0
    first = read_all(tmp_path / "out")["layers.0.w"]
    again = cli(*models, "--method", "ties", "--density", "0.9", "--output", tmp_path / "out", "--quiet")
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    np.testing.assert_array_equal(read_all(tmp_path / "out")["layers.0.w"], first)
    assert cli(*models, "--method", "ties", "--density", "0.9", "--output", tmp_path / "out", "--force", "--quiet").returncode == 0
    assert not np.array_equal(read_all(tmp_path / "out")["layers.0.w"], first)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    good = write_models(tmp_path)
    (tmp_path / "bad").mkdir()
    rng = np.random.default_rng(1)
    missing = tmp_path / "bad" / "missing.safetensors"
    save_file({"embed.weight": rng.standard_normal((50, 16)).astype(np.float32), "layers.0.w": rng.standard_normal((16, 16)).astype(np.float32), "position_ids": np.arange(10)}, str(missing))
    shape = tmp_path / "bad" / "shape.safetensors"
    save_file({"embed.weight": rng.standard_normal((50, 16)).astype(np.float32), "layers.0.w": rng.standard_normal((16, 8)).astype(np.float32), "layers.0.b": np.zeros(16, np.float32), "position_ids": np.arange(10)}, str(shape))
    dtype = tmp_path / "bad" / "dtype.safetensors"
    save_file({"embed.weight": rng.standard_normal((50, 16)).astype(np.float16), "layers.0.w": rng.standard_normal((16, 16)).astype(np.float32), "layers.0.b": np.zeros(16, np.float32), "position_ids": np.arange(10)}, str(dtype))
    truncated = tmp_path / "bad" / "truncated.safetensors"
    truncated.write_bytes(good[0].read_bytes()[:-100])
    cases = [
        ((good[0], missing), "layers.0.b is missing"),
        ((good[0], shape), "layers.0.w has shape [16, 8]"),
        ((good[0], dtype), "embed.weight has dtype F16"),
        ((good[0], truncated), "truncated"),
        ((good[0], tmp_path / "nope.safetensors"), "no such file"),
    ]
    for inputs, message in cases:
        result = cli(*inputs, "--method", "task_arithmetic", "--output", tmp_path / "o", "--quiet")
        assert result.returncode == 2 and message in result.stderr, (message, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    for extra, message in [
        (["--weights", "1,2,3"], "3 weights for 2 inputs"),
        (["--method", "average"], "unknown merge method 'average'"),
        (["--output", tmp_path / "bad" / "inside"], None),
    ]:
        args = [good[0], good[1], "--method", "task_arithmetic", "--output", tmp_path / "o", *extra]
        result = cli(*args, "--quiet")
        if message:
            assert result.returncode == 2 and message in result.stderr, result.stderr
    inside = cli(tmp_path / "bad", good[0], "--method", "task_arithmetic", "--output", tmp_path / "bad" / "merged")
    assert inside.returncode == 2 and "inside input" in inside.stderr
    assert not (tmp_path / "o").exists()


def _start_slow_merge(tmp_path):
    shapes = {f"layer{i}.w": (128, 256) for i in range(400)}  # many tensors: seconds of work after the first write
    models = write_models(tmp_path, shapes=shapes)
    proc = subprocess.Popen([sys.executable, "-m", "jaxmerge", "merge", *map(str, models), "--method", "ties", "--density", "0.2", "--output", str(tmp_path / "out"), "--quiet"])
    deadline = time.time() + 120
    while time.time() < deadline:
        temps = list(tmp_path.glob(".out.jaxmerge-tmp-*"))
        if temps and any(temps[0].iterdir()):
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the merge never started writing")


@pytest.mark.slow
def test_killed_merge_leaves_no_partial_output(tmp_path):
    proc = _start_slow_merge(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "SIGTERM left temporary files"
    # SIGKILL cannot be caught: no output appears, and the next run removes the stale temporary.
    proc = _start_slow_merge(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert not (tmp_path / "out").exists()
    models = sorted(tmp_path.glob("model*.safetensors"))
    assert cli(*models, "--method", "task_arithmetic", "--output", tmp_path / "out", "--quiet").returncode == 0
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("argv, code", [(["methods", "ties"], 0), (["methods", "average"], 2)])
def test_the_command_flushes_runs_exit_handlers_and_keeps_its_exit_code(argv, code):
    """`jaxmerge` exits without interpreter teardown (`cli.run`): its output, exit handlers and code survive."""
    script = ("import atexit, sys\natexit.register(lambda: print('exit handler ran'))\n"
              f"sys.argv = ['jaxmerge', *{argv!r}]\nfrom jaxmerge.cli import run\nrun()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == code, out.stderr
    assert out.stdout.endswith("exit handler ran\n")
    if code == 0:
        assert out.stdout.startswith("ties: ") and "density" in out.stdout  # block-buffered stdout, flushed
    else:
        assert "unknown merge method 'average'" in out.stderr


def _resident(path) -> np.ndarray:
    """Which of the file's pages are in the page cache (Linux mincore on a mapping that touches none)."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = os.path.getsize(path), os.sysconf("SC_PAGE_SIZE")
    vec = (ctypes.c_ubyte * -(-size // page))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return np.frombuffer(vec, np.uint8) & 1 == 1


def test_written_pages_are_dropped_from_the_page_cache_once_on_disk(tmp_path, monkeypatch):
    """The writer recycles its page cache: pieces more than the lag behind leave it, the last ones stay;
    the file reads back the same. With recycle_lag=-1 every page stays (what the assertions tell apart)."""
    import os

    from jaxmerge.formats import safetensors_io
    from jaxmerge.formats.safetensors_io import ShardWriter, TensorInfo

    if safetensors_io._sync_file_range is None:
        pytest.skip("no sync_file_range here (not Linux): the writer keeps its pages")
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * (1 << 20))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident(probe).any():
        pytest.skip(f"{tmp_path}'s filesystem keeps clean pages cached (tmpfs?): nothing to recycle")

    piece = 64 << 10
    monkeypatch.setattr(safetensors_io, "_WRITEBACK_BYTES", piece)
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((64, 1024)).astype(np.float32) for i in range(8)}  # 256 KB each
    infos = [TensorInfo(name, a.shape, "F32") for name, a in tensors.items()]
    resident = {}
    for lag in (4 * piece, -1):
        path = tmp_path / f"lag{lag}.safetensors"
        writer = ShardWriter(path, infos, {"format": "pt"}, recycle_lag=lag)
        for name, a in tensors.items():
            writer.write(name, a)
            time.sleep(0.05)  # a merge computes between tensors: the disk catches up
        writer.close()
        resident[lag] = _resident(path)  # before reading it back, which caches it again
        with safe_open(str(path), "np") as f:
            for name, a in tensors.items():
                np.testing.assert_array_equal(f.get_tensor(name), a)
    kept, recycled = resident[-1], resident[4 * piece]
    assert kept.mean() > 0.9  # (the kernel may evict clean pages of its own accord)
    pages_per_piece = piece // os.sysconf("SC_PAGE_SIZE")
    # The pages more than the lag and a piece or two behind left the cache; dropping them does not wait
    # for the disk, so a page still being written may stay (and usually leaves at the next call).
    assert recycled[: -8 * pages_per_piece].mean() < 0.1
    assert recycled[-4 * pages_per_piece :].mean() > 0.9
