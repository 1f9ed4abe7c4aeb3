"""Shared test helpers: PEFT as the reference, inputs, and tolerant comparisons."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Tests run on the CPU unless a GPU test asks otherwise; keep XLA from grabbing all memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# `jaxmerge merge` keeps compiled kernels in ~/.cache/jaxmerge/xla; tests (and the commands they run)
# leave the user's cache alone unless a test turns it on (tests/test_pipeline.py, test_cli_uses_*).
os.environ.setdefault("JAXMERGE_COMPILE_CACHE", "0")
# Most of the suite's time is XLA compiling thousands of small programs that then run on tiny inputs
# (about 80% of its CPU time, measured). JAX's `jax_disable_most_optimizations` keeps XLA's graph
# passes (fusion, layout) and turns LLVM's optimisation level down to 0, which halves compile time
# (tests/test_kernels.py, test_selection.py and test_sign.py: 85 s -> 48 s on 2 cores, every PEFT
# comparison still bit for bit). Child processes (the commands tests run) inherit it. The demo and
# the notebooks run as users' code compiles (tests/test_demo.py); JAXMERGE_TEST_XLA_OPTIMIZE=1 runs
# the whole suite so.
if os.environ.get("JAXMERGE_TEST_XLA_OPTIMIZE", "0") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# XLA:CPU maps each compiled kernel's code into its own memory areas (~200 for a TIES kernel,
# measured), and Linux caps a process at vm.max_map_count (65530 by default): a suite that compiles
# thousands of kernels in one process crashed inside XLA's compiler (SIGSEGV at 95% of the suite).
# Dropping JAX's caches frees them; it is done once the process nears the cap.
_MAP_AREAS_BEFORE_CLEARING = 30000


def _map_areas() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such cap to stay under
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_kernels():
    yield
    if _map_areas() > _MAP_AREAS_BEFORE_CLEARING:
        import gc

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def shared_compile_cache(tmp_path_factory) -> dict[str, str]:
    """An environment for child processes (commands, notebook kernels) that share one XLA compile cache.

    `jaxmerge demo` and both notebooks compile the same demo kernels (~100 executables, most of a
    quick demo's ~50 s on 2 CPU cores; a run that loads them takes ~15 s). With JAX's persistent
    compilation cache in a directory of this test session only, the first process compiles them and
    the later ones load them: the same executables (JAX keys them by program, compile options,
    devices and versions), so the same code runs. The variables go to the children only: this
    process's JAX keeps its in-memory caches, and the user's caches are left alone.
    """
    return dict(
        os.environ,
        JAX_DISABLE_MOST_OPTIMIZATIONS="0",  # compiled as for users (see the top of this file)
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # every kernel, however fast it compiles
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",  # no size floor
    )


SHAPES = [(1,), (7,), (33, 65), (2, 3, 4), (4, 3, 5, 5)]
DENSITIES = [0.0, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0]
FLOAT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def torch_dtype(dtype):
    import torch

    return {
        jnp.dtype(jnp.float32): torch.float32,
        jnp.dtype(jnp.bfloat16): torch.bfloat16,
        jnp.dtype(jnp.float16): torch.float16,
        jnp.dtype(jnp.float64): torch.float64,
    }[jnp.dtype(dtype)]


def to_torch(x):
    """A torch copy of a JAX/NumPy array (through float32 for bfloat16, which NumPy lacks)."""
    import torch

    arr = jnp.asarray(x)
    return torch.from_numpy(np.array(arr.astype(jnp.float32))).to(torch_dtype(arr.dtype))


def to_numpy(t):
    """float64 NumPy copy of a torch tensor or JAX array."""
    if hasattr(t, "detach"):
        return t.detach().float().double().numpy() if t.dtype != __import__("torch").float64 else t.numpy()
    return np.asarray(jnp.asarray(t).astype(jnp.float32)).astype(np.float64)


def random_tasks(shape, n_tasks=3, dtype=jnp.float32, seed=0):
    """Continuous random task tensors: no ties in |x| (with overwhelming probability in float32)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(n_tasks)]


def distinct_magnitude_tasks(shape, n_tasks=3, dtype=jnp.bfloat16, seed=0):
    """Task tensors whose magnitudes are distinct representable values of `dtype`.

    Random half-precision tensors tie at the pruning threshold, where PEFT's
    topk picks arbitrarily; distinct magnitudes make the selection unambiguous.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    grid = np.unique(np.asarray(jnp.asarray(np.geomspace(1e-4, 1e4, 400_000), jnp.float32).astype(dtype).astype(jnp.float32)))
    assert grid.size >= size, "not enough distinct values for this shape"
    tasks = []
    for _ in range(n_tasks):
        values = rng.choice(grid, size, replace=False) * rng.choice([-1.0, 1.0], size)
        tasks.append(jnp.asarray(values.reshape(shape).astype(np.float32)).astype(dtype))
    return tasks


def assert_same_magnitude_selection(ours, theirs, x, k):
    """Both prunings keep k entries and may differ only among entries tied at the threshold."""
    ours, theirs, x = (np.asarray(to_numpy(a)) for a in (ours, theirs, x))
    kept_ours, kept_theirs = ours != 0, theirs != 0
    a = np.abs(x)
    nonzero = np.count_nonzero(a)
    assert kept_ours.sum() == min(k, nonzero) or kept_ours.sum() <= k
    differ = kept_ours != kept_theirs
    if differ.any():
        threshold = np.sort(a.ravel())[::-1][k - 1]
        assert np.all(a[differ] == threshold), "selections differ away from the threshold"
    both = kept_ours & kept_theirs
    np.testing.assert_array_equal(ours[both], theirs[both])


def normal_floats(low, high):
    """Zero or a float32 of magnitude in [low, high]: XLA flushes subnormal results to zero
    (a documented difference from PEFT), so inputs stay clear of that range."""
    from hypothesis import strategies as st

    magnitude = st.floats(float(np.float32(low)), float(np.float32(high)), width=32)
    return st.one_of(st.just(0.0), magnitude, magnitude.map(lambda m: -m))


@pytest.fixture
def key():
    return jax.random.key(0)



# Parallel runs: pyproject.toml's addopts give `-n 2 --dist loadfile` (pytest-xdist). Under loadfile a
# file's tests run together on one worker, so a module's fixtures (tiny models, mergekit's runs) are
# built once and its kernels compiled once, as in a serial run. The scheduler below is loadfile with
# two changes (GROUPS). tests/test_demo.py and tests/test_notebooks.py run on one worker: they run the
# same demo kernels and share them through `shared_compile_cache`, a directory of one worker's session
# (the demo compiles them, the notebooks load them). tests/test_sharding.py's tests share nothing and
# two of them run for minutes (subprocesses with 8 simulated devices): each test is a unit of its own.
# And units start longest first (LONGEST_FIRST, then file order; xdist's loadfile starts the files with
# the most tests), so that no long unit is left to run alone at the end. (xdist's loadgroup, which
# reads xdist_group marks, groups nothing with pytest >= 9.2: it renames items through an attribute
# that pytest no longer reads, and so runs like `--dist load`, test by test.)
GROUPS = {"test_demo.py": "demo-kernels", "test_notebooks.py": "demo-kernels", "test_sharding.py": "each test"}
# Seconds of each unit on two busy workers, measured 2026-12-05 with XLA's full optimisation (1892 s in all).
LONGEST_FIRST = [
    "tests/test_sharding.py::test_every_function_on_1d_and_2d_meshes_equals_single_device",  # 300
    "tests/test_sharding.py::test_every_table_method_on_a_mesh_equals_single_device",  # 290
    "demo-kernels",  # 300
    "tests/test_mergekit_recipes.py",  # 230
    "tests/test_merging.py",  # 210
    "tests/test_checkpoints.py",  # 210
    "tests/test_pipeline.py",  # 190
]
_RANK = {unit: i for i, unit in enumerate(LONGEST_FIRST)}

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # no pytest-xdist: serial runs only (`-n` is then unknown: pass `-o addopts=""`)
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _LoadFileGroups(LoadScopeScheduling):
        """`--dist loadfile` with GROUPS and LONGEST_FIRST (see above)."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # not by test count: LONGEST_FIRST picks (below)
            self._seen: dict[str, int] = {}

        def _split_scope(self, nodeid: str) -> str:
            file, _, rest = nodeid.partition("::")
            group = GROUPS.get(file.rsplit("/", 1)[-1])
            if group == "each test":
                return f"{file}::{rest.split('[', 1)[0]}"
            return group or file

        def _assign_work_unit(self, node) -> None:
            for scope in self.workqueue:  # units in collection order
                self._seen.setdefault(scope, len(LONGEST_FIRST) + len(self._seen))
            first = min(self.workqueue, key=lambda scope: _RANK.get(scope, self._seen[scope]))
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    @pytest.hookimpl(tryfirst=True)  # before xdist's own, which gives its plain loadfile
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            return _LoadFileGroups(config, log)
        return None  # xdist's own scheduler for any other --dist
