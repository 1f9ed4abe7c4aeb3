"""Bad input and faults (issue 16): one clear line, exit 2, nothing left, nothing read outside its place.

Covered here: sharded indexes naming files outside their directory, two writers
racing for one output, read-only and full file systems, --force onto a
symlinked output, SIGKILL and SIGTERM, broken LoRA configs, and the Python
API's density type, zero-size tensors (against PEFT) and float16 overflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmerge.engine import _atomic
from jaxmerge.formats import safetensors_io
from jaxmerge.engine._atomic import atomic_directory
from jaxmerge.tools.adapters import load_adapter
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}


def cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxmerge", "merge", *map(str, args), "--quiet"],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout,
    )


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def tensors(seed: int, shape=(8, 4)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal(shape).astype(np.float32), "b.weight": rng.standard_normal(shape[::-1]).astype(np.float32)}


def write_models(directory: Path, count: int = 2, shape=(8, 4)) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"model{i}.safetensors"
        save_file(tensors(i, shape), str(path))
        paths.append(path)
    return paths


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".jaxmerge-" in p.name)


# --- sharded index entries outside the index's directory ---------------------------------


def _sharded(tmp_path: Path, entry_for_b: str) -> Path:
    """A two-shard checkpoint whose index sends tensor b.weight to `entry_for_b`."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    data = tensors(0)
    save_file({"a.weight": data["a.weight"]}, str(ckpt / "part1.safetensors"))
    # A valid shard outside: the old code merged it (exit 0).
    save_file({"b.weight": data["b.weight"]}, str(tmp_path / "outside.safetensors"))
    index = {"metadata": {}, "weight_map": {"a.weight": "part1.safetensors", "b.weight": entry_for_b}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt / "model.safetensors.index.json"


def _entry(kind: str, tmp_path: Path) -> str:
    if kind == "parent":
        return "../outside.safetensors"
    if kind == "passwd":
        return "../../../../../../../../etc/passwd"
    if kind == "absolute":
        return str(tmp_path / "outside.safetensors")
    if kind == "link":
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        os.symlink(tmp_path / "outside.safetensors", tmp_path / "ckpt" / "link.safetensors")
        return "link.safetensors"
    if kind == "linked_dir":
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        os.symlink(tmp_path, tmp_path / "ckpt" / "sub")
        return "sub/outside.safetensors"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parent", "passwd", "absolute", "link", "linked_dir"])
def test_index_entry_outside_its_directory_is_refused_before_opening(tmp_path, monkeypatch, kind):
    entry = _entry(kind, tmp_path)
    index = _sharded(tmp_path, entry)
    opened = []
    real_open = safetensors_io.safe_open
    monkeypatch.setattr(safetensors_io, "safe_open", lambda f, **kw: opened.append(f) or real_open(f, **kw))
    for path in (index, index.parent):
        with pytest.raises(CheckpointError) as err:
            Checkpoint(path)
        message = str(err.value)
        assert str(index) in message and repr(entry) in message and "\n" not in message
    assert opened == [], "a shard was opened before the index was checked"


def test_index_entry_outside_fails_on_the_command_line(tmp_path):
    index = _sharded(tmp_path, "../outside.safetensors")
    other = write_models(tmp_path / "others", 1)[0]
    result = cli(index, other, "--method", "task_arithmetic", "--output", tmp_path / "out")
    line = one_line(result)
    assert result.returncode == 2 and str(index) in line and "../outside.safetensors" in line
    assert not (tmp_path / "out").exists()


def test_index_inside_and_hub_cache_links_still_load(tmp_path):
    # Plain shards beside the index.
    index = _sharded(tmp_path, "part2.safetensors")
    save_file({"b.weight": tensors(0)["b.weight"]}, str(index.parent / "part2.safetensors"))
    assert set(Checkpoint(index).tensors) == {"a.weight", "b.weight"}
    # The Hugging Face cache: snapshots/<rev>/<file> are links into ../../blobs/.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name, blob in (("part1.safetensors", "1111"), ("part2.safetensors", "2222")):
        os.replace(index.parent / name, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snap / name)
    os.replace(index, snap / index.name)
    assert set(Checkpoint(snap).tensors) == {"a.weight", "b.weight"}


# --- two writers, one output --------------------------------------------------------------


def _no_renameat2(monkeypatch, portable: bool):
    if portable:
        monkeypatch.setattr(_atomic, "_renameat2", None)  # the mkdir-claim fallback


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "mkdir-claim"])
def test_output_created_meanwhile_is_not_replaced(tmp_path, monkeypatch, portable):
    _no_renameat2(monkeypatch, portable)
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="another process"):
        with atomic_directory(out) as mine:
            (mine / "who").write_text("loser")
            with atomic_directory(out) as theirs:  # another writer finishes first
                (theirs / "who").write_text("winner")
    assert (out / "who").read_text() == "winner"
    assert leftovers(tmp_path) == []


_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from jaxmerge.engine import _atomic
    out, go, me, portable = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    if portable:
        _atomic._renameat2 = None
    try:
        with _atomic.atomic_directory(out) as tmp:
            for i in range(20):
                (tmp / f"part{i}").write_text(me)
            while not go.exists():
                time.sleep(0.005)
    except FileExistsError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    """
)


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "mkdir-claim"])
def test_racing_writers_exactly_one_wins(tmp_path, portable):
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(go), f"w{i}", str(int(portable))],
                         stderr=subprocess.PIPE, text=True, env=ENV)
        for i in range(4)
    ]
    deadline = time.time() + 60
    while len([p for p in tmp_path.iterdir() if ".jaxmerge-tmp-" in p.name]) < 4 and time.time() < deadline:
        time.sleep(0.01)
    go.touch()  # all four are past the existence check: the renames race
    codes = [p.wait(timeout=60) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2, 2, 2], (codes, errors)
    winner = f"w{codes.index(0)}"
    assert {(out / f"part{i}").read_text() for i in range(20)} == {winner}  # complete, one writer's
    assert all(len(e.strip().splitlines()) == 1 for c, e in zip(codes, errors) if c)
    assert [p.name for p in tmp_path.iterdir() if p.name != "go"] == ["out"]


def test_two_cli_merges_on_one_output(tmp_path):
    models = write_models(tmp_path / "in")
    args = [*models, "--method", "task_arithmetic", "--output", tmp_path / "out"]
    cmd = [sys.executable, "-m", "jaxmerge", "merge", *map(str, args), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and str(tmp_path / "out") in loser
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in tensors(0):
        np.testing.assert_allclose(merged[name], tensors(0)[name] + tensors(1)[name], rtol=1e-6)
    assert leftovers(tmp_path) == []


# --- read-only and full file systems --------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only); remount(ro=True) makes it read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")

    class Mount:
        path = mnt

        @staticmethod
        def remount_ro():
            r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")

    try:
        yield Mount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_read_only_output(tmp_path, tmpfs):
    (tmpfs.path / "existing").mkdir()
    tmpfs.remount_ro()
    models = write_models(tmp_path / "in")
    for out in (tmpfs.path / "out", tmpfs.path / "new" / "out"):
        result = cli(*models, "--method", "task_arithmetic", "--output", out)
        line = one_line(result)
        assert result.returncode == 2 and str(out) in line and "Read-only file system" in line, line
    assert sorted(p.name for p in tmpfs.path.iterdir()) == ["existing"]


def test_full_disk_output_is_refused_before_writing(tmp_path, tmpfs):
    models = write_models(tmp_path / "in", shape=(256, 256))  # 2 x 256 KiB of float32: more than the mount
    result = cli(*models, "--method", "task_arithmetic", "--output", tmpfs.path / "out")
    line = one_line(result)
    # The plan's output size is checked against the free space before any byte is written.
    assert result.returncode == 2 and str(tmpfs.path / "out") in line and "not enough free space" in line, line
    assert list(tmpfs.path.iterdir()) == []


def test_full_disk_while_writing_and_planned_size(tmpfs):
    out = tmpfs.path / "out"
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        with atomic_directory(out) as tmp:
            (tmp / "big").write_bytes(b"\0" * (1 << 20))  # the disk fills mid-write: OSError inside the block
    assert str(out) in str(err.value)
    with pytest.raises(CheckpointError, match="not enough free space") as err:
        with atomic_directory(out, expected_bytes=1 << 20):
            pytest.fail("the block ran although the plan does not fit")
    assert str(out) in str(err.value) and "1.0 MB" in str(err.value)
    assert list(tmpfs.path.iterdir()) == []


def test_float16_overflow_stops_the_merge_unless_allowed(tmp_path):
    big = {"w": np.full((4, 4), 40000.0, np.float16)}  # finite; twice it is not
    models = []
    for i in range(2):
        models.append(tmp_path / f"m{i}.safetensors")
        save_file(big, str(models[-1]))
    out = tmp_path / "out"
    result = cli(*models, "--method", "task_arithmetic", "--output", out)
    line = one_line(result)
    assert result.returncode == 2 and "tensor w" in line and "float16's range" in line and "--allow-nonfinite" in line, line
    assert not out.exists() and leftovers(tmp_path) == []
    result = cli(*models, "--method", "task_arithmetic", "--output", out, "--allow-nonfinite")
    assert result.returncode == 0, result.stderr
    from jaxmerge.formats.safetensors_io import Checkpoint

    assert np.isinf(Checkpoint(out).read("w")).all()


# --- --force onto a symlinked output --------------------------------------------------------


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "rename-fallback"])
def test_force_onto_symlink_replaces_the_link_and_keeps_its_target(tmp_path, monkeypatch, portable):
    _no_renameat2(monkeypatch, portable)
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("user data")
    out = tmp_path / "out"
    out.symlink_to(real, target_is_directory=True)
    with atomic_directory(out, force=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert out.is_dir() and not out.is_symlink() and (out / "model.safetensors").read_text() == "new"
    assert (real / "keep.txt").read_text() == "user data"
    assert leftovers(tmp_path) == []
    # A directory output is replaced whole, and nothing is left beside it either.
    with atomic_directory(out, force=True) as tmp:
        (tmp / "second").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["second"] and leftovers(tmp_path) == []


def test_force_onto_symlink_on_the_command_line(tmp_path):
    models = write_models(tmp_path / "in")
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("user data")
    (tmp_path / "out").symlink_to(real)
    result = cli(*models, "--method", "task_arithmetic", "--output", tmp_path / "out", "--force")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "model.safetensors").is_file()
    assert (real / "keep.txt").read_text() == "user data" and leftovers(tmp_path) == []


# --- SIGKILL and SIGTERM --------------------------------------------------------------------

_KILLED = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from jaxmerge.engine._atomic import atomic_directory
    with atomic_directory(Path(sys.argv[1])) as tmp:
        (tmp / "half").write_bytes(b"x" * 1000)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("ready", flush=True)
        time.sleep(60)
    """
)


def test_sigkill_temporary_is_removed_by_the_next_run_in_the_directory(tmp_path):
    models = write_models(tmp_path / "in")
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "a"), "kill"], env=ENV)
    assert killed.returncode == -signal.SIGKILL
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".a.jaxmerge-tmp-")]
    assert len(stale) == 1 and (stale[0] / "half").exists()
    # A live writer's temporary must survive the cleanup.
    live = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path / "c"), "wait"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert live.stdout.readline().strip() == "ready"
        result = cli(*models, "--method", "task_arithmetic", "--output", tmp_path / "b")  # another output, same directory
        assert result.returncode == 0, result.stderr
        assert not stale[0].exists(), "the stale temporary of a killed run was kept"
        assert [p.name.split("jaxmerge-tmp-")[0] for p in tmp_path.iterdir() if "jaxmerge-tmp-" in p.name] == [".c."]
        assert not (tmp_path / "a").exists()
    finally:
        live.kill()
        live.wait()


def _merge_with_sigterm(tmp_path, patch: str) -> str:
    """Run `jaxmerge merge` with `patch` (Python that sends SIGTERM at some point) applied first.

    Asserts exit 143, no output and no temporary left; returns the one stderr line.
    """
    models = write_models(tmp_path / "in")
    out = tmp_path / "out"
    script = textwrap.dedent(patch) + "\nfrom jaxmerge.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["merge", *map(str, models), "--method", "task_arithmetic", "--output", str(out), "--quiet"]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=120)
    line = one_line(result)
    assert result.returncode == 143
    assert str(out) in line
    assert not out.exists() and leftovers(tmp_path) == []
    return line


def test_sigterm_says_what_was_interrupted_and_exits_143(tmp_path):
    line = _merge_with_sigterm(tmp_path, """
        import os, signal, sys
        from jaxmerge.formats import safetensors_io
        write = safetensors_io.ShardWriter.write
        def write_then_term(self, name, array):
            write(self, name, array)
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` mid-merge
        safetensors_io.ShardWriter.write = write_then_term
        """)
    assert "SIGTERM" in line and "nothing was written" in line


def test_sigterm_while_planning_says_nothing_was_written(tmp_path):
    line = _merge_with_sigterm(tmp_path, """
        import os, signal, sys, time
        from jaxmerge.recipes import plan as recipe_plan
        init = recipe_plan.RecipePlanner.__init__
        def init_then_term(self, recipe):
            init(self, recipe)
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` while checkpoints are opened
            time.sleep(30)
        recipe_plan.RecipePlanner.__init__ = init_then_term
        """)
    assert "SIGTERM before writing" in line and "nothing was written" in line


# --- LoRA adapter configs -------------------------------------------------------------------


def _adapter(directory: Path, config) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file(
        {"base_model.model.q.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
         "base_model.model.q.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}


@pytest.mark.parametrize(
    "config, key",
    [
        ({k: v for k, v in GOOD.items() if k != "r"}, "'r'"),
        ([GOOD], "JSON list"),
        ({k: v for k, v in GOOD.items() if k != "lora_alpha"}, "'lora_alpha'"),
        ({**GOOD, "r": "4"}, "'r'"),
        ({**GOOD, "lora_alpha": None}, "'lora_alpha'"),
        ({**GOOD, "rank_pattern": {"q": "8"}}, "rank_pattern['q']"),
        ({**GOOD, "target_modules": 5}, "'target_modules'"),
    ],
    ids=["no-r", "list", "no-alpha", "r-string", "alpha-null", "rank-pattern", "targets"],
)
def test_broken_lora_config_names_file_and_key(tmp_path, config, key):
    adapter = _adapter(tmp_path / "ad", config)
    with pytest.raises(CheckpointError) as err:
        load_adapter(adapter)
    message = str(err.value)
    assert str(adapter / "adapter_config.json") in message and key in message and "\n" not in message


def test_broken_lora_config_on_the_command_line(tmp_path):
    good = _adapter(tmp_path / "good", GOOD)
    bad = _adapter(tmp_path / "bad", {k: v for k, v in GOOD.items() if k != "r"})
    result = cli(good, bad, "--method", "linear", "--output", tmp_path / "out")
    line = one_line(result)
    assert result.returncode == 2 and str(bad / "adapter_config.json") in line and "'r'" in line
    assert not (tmp_path / "out").exists()


# --- Python API ------------------------------------------------------------------------------


def _api_calls():
    import jaxmerge.core.merging as jm
    import jaxmerge.core.pruning as jp

    key = jax.random.key(0)
    return {
        "magnitude_prune": lambda t, w, d: jm.magnitude_prune(list(t), w, d),
        "ties": lambda t, w, d: jm.ties(list(t), w, d),
        "dare_linear": lambda t, w, d: jm.dare_linear(list(t), w, d, key=key),
        "dare_ties": lambda t, w, d: jm.dare_ties(list(t), w, d, key=key),
        "magnitude_based_pruning": lambda t, w, d: jp.magnitude_based_pruning(t[0], d),
        "random_pruning": lambda t, w, d: jp.random_pruning(t[0], d, True, key=key),
        "prune": lambda t, w, d: jp.prune(t[0], d, "magnitude"),
    }


@pytest.mark.parametrize("name", list(_api_calls()))
def test_density_given_as_a_string_is_a_type_error(name):
    tasks, weights = np.ones((2, 3, 4), np.float32), np.ones(2, np.float32)
    with pytest.raises(TypeError, match="density"):
        _api_calls()[name](tasks, weights, "0.5")


def _peft_calls():
    import torch
    from peft.utils import merge_utils as pm

    return {
        "task_arithmetic": lambda t, w: pm.task_arithmetic(list(t), w),
        "magnitude_prune": lambda t, w: pm.magnitude_prune(list(t), w, 0.5),
        "ties": lambda t, w: pm.ties(list(t), w, 0.5),
        "dare_linear": lambda t, w: pm.dare_linear(list(t), w, 0.5),
        "dare_ties": lambda t, w: pm.dare_ties(list(t), w, 0.5),
        "magnitude_based_pruning": lambda t, w: pm.magnitude_based_pruning(t[0], 0.5),
        "random_pruning": lambda t, w: pm.random_pruning(t[0], 0.5, True),
        "prune": lambda t, w: pm.prune(t[0], 0.5, "magnitude"),
        "calculate_majority_sign_mask": lambda t, w: pm.calculate_majority_sign_mask(t, "total"),
        "disjoint_merge": lambda t, w: pm.disjoint_merge(t, torch.ones(t.shape, dtype=torch.bool)),
    }


def _jax_calls():
    import jaxmerge.core.merging as jm
    import jaxmerge.core.sign as js

    calls = {name: (lambda t, w, f=f: f(t, w, 0.5)) for name, f in _api_calls().items()}
    calls["task_arithmetic"] = lambda t, w: jm.task_arithmetic(list(t), w)
    calls["calculate_majority_sign_mask"] = lambda t, w: js.calculate_majority_sign_mask(t, "total")
    calls["disjoint_merge"] = lambda t, w: js.disjoint_merge(t, np.ones(t.shape, bool))
    return calls


@pytest.mark.parametrize("shape", [(3, 0), (3, 0, 4), (3, 2, 0)])
@pytest.mark.parametrize("name", list(_jax_calls()))
def test_zero_size_tasks_give_peft_empty_result(name, shape):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _peft_calls()[name](torch.zeros(shape), torch.tensor([1.0, 0.5, 0.3]))
        got = _jax_calls()[name](np.zeros(shape, np.float32), np.array([1.0, 0.5, 0.3], np.float32))
    assert tuple(got.shape) == tuple(expected.shape)
    assert str(got.dtype) == str(expected.dtype).removeprefix("torch.")


def test_float16_overflow_after_weighting_warns():
    import jaxmerge.core.merging as jm
    from jaxmerge.core._validation import warn_if_half_overflow

    big = np.full((4,), 6e4, np.float16)
    with pytest.warns(RuntimeWarning, match="float16"):
        result = jm.task_arithmetic([big, big], [1.0, 1.0])  # 1.2e5 > 65504
    assert result.dtype == np.float16 and np.isinf(np.asarray(result)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range, or not float16: silent
        jm.task_arithmetic([big, big], [0.5, 0.5])
        warn_if_half_overflow(jax.numpy.asarray(big.astype(np.float32)) * 1e30)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_finite_flags_name_each_input_with_a_nan_or_inf(dtype):
    """One flag per input; a fast sum decides, and only a sum that overflowed is checked entry by entry,
    so huge finite values are not taken for inf."""
    import jax.numpy as jnp

    from jaxmerge.engine._finite import finite_flags

    big = float(jnp.finfo(dtype).max)
    clean = jnp.linspace(-1, 1, 1000, dtype=dtype)
    leaves = (
        clean,
        clean.at[17].set(jnp.nan),
        clean.at[0].set(jnp.inf),
        clean.at[999].set(-jnp.inf),
        jnp.full((64,), big, dtype),  # finite, but its sum overflows
        jnp.full((64,), big, dtype).at[5].set(jnp.nan),
        jnp.zeros((0,), dtype),
    )
    assert np.asarray(finite_flags(leaves)).tolist() == [True, False, False, False, True, False, True]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_host_finite_reads_nan_and_inf_from_the_bits(dtype, monkeypatch):
    """The host check of tensors copied without a kernel: NaN (any payload, either sign) and +-inf anywhere,
    in any chunk, are found; the largest finite values, subnormals and -0 are not taken for them."""
    import ml_dtypes

    from jaxmerge.engine import _finite

    monkeypatch.setattr(_finite, "_HOST_CHUNK", 7)  # several chunks and a short last one
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    info = ml_dtypes.finfo(np_dtype)
    clean = np.array([0.0, -0.0, 1.0, -2.5, float(info.max), -float(info.max), float(info.smallest_subnormal),
                      float(info.tiny)] * 3, np_dtype).reshape(4, 6)
    assert _finite.host_finite(clean) and _finite.host_finite(clean[:, ::2])  # a strided view too
    assert _finite.host_finite(np.zeros((0, 3), np_dtype))
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np_dtype.itemsize]
    quiet_nan_with_payload = np.array([np.nan], np_dtype).view(uint) | uint(1)
    for bad in (np.nan, -np.nan, np.inf, -np.inf, quiet_nan_with_payload.view(np_dtype)[0]):
        for position in (0, 6, 7, 23):
            x = clean.copy().reshape(-1)
            x[position] = bad
            assert not _finite.host_finite(x.reshape(4, 6)), (bad, position)


def test_a_copied_tensor_with_nan_stops_the_merge_unless_allowed(tmp_path):
    """Passthrough without a scale writes the input's bytes with no kernel; its NaN is still one line, naming
    the file and tensor, and nothing is written; allowed, the bytes are copied as they are."""
    from jaxmerge.engine.stream import merge_checkpoints
    from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    x[1, 2] = np.nan
    save_file({"a": np.ones(5, np.float32), "w": x}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"in\.safetensors: tensor w holds NaN or inf"):
        merge_checkpoints([tmp_path / "in.safetensors"], out, method="passthrough", progress=False)
    assert not out.exists()
    merge_checkpoints([tmp_path / "in.safetensors"], out, method="passthrough", progress=False, allow_nonfinite=True)
    got = Checkpoint(out).read_host("w")
    assert got.tobytes() == x.tobytes()


def test_only_unchanged_tensors_skip_the_kernels(tmp_path, monkeypatch):
    """Passthrough without a scale and without a cast runs no merge kernel (the bytes are written as read);
    a scale or a dtype change still goes through `merge_leaf`."""
    from jaxmerge.engine import stream

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((6, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    save_file(tensors, str(tmp_path / "in.safetensors"))

    def no_kernel(*args, **kwargs):
        raise AssertionError("merge_leaf ran")

    monkeypatch.setattr(stream, "merge_leaf", no_kernel)
    stream.merge_checkpoints([tmp_path / "in.safetensors"], tmp_path / "copy", method="passthrough", progress=False)
    copied = Checkpoint(tmp_path / "copy")
    assert {k: copied.read_host(k).tobytes() for k in copied.tensors} == {k: v.tobytes() for k, v in tensors.items()}
    for name, kwargs in (("scaled", {"scale": 0.5}), ("cast", {"out_dtype": "float16"}), ("computed", {"dtype": "float16"})):
        with pytest.raises(AssertionError, match="merge_leaf ran"):
            stream.merge_checkpoints([tmp_path / "in.safetensors"], tmp_path / name, method="passthrough",
                                     progress=False, **kwargs)
        assert not (tmp_path / name).exists()
