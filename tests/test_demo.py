"""`jaxmerge demo`: seeded, prints the table, saves the plot.

Each run compiles ~100 kernels (most of its time): the runs are separate processes sharing one
compilation cache (`shared_compile_cache`), so the first compiles and the second loads.
"""

import subprocess
import sys

import pytest

SEED = 3


@pytest.fixture(scope="module")
def command_run(tmp_path_factory, shared_compile_cache):
    """`jaxmerge demo --quick --seed 3` run once: (its completed process, its output directory)."""
    output_dir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "demo", "--quick", "--seed", str(SEED), "--output-dir", str(output_dir)],
        capture_output=True, text=True, timeout=600, env=shared_compile_cache,
    )
    return result, output_dir


def test_two_runs_with_one_seed_give_the_same_table(command_run, shared_compile_cache):
    # First run: the command; second run: the Python API in another process. The command prints
    # format_table's table first, then a blank line and the plot's path.
    result, _ = command_run
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.split("\n\nplot saved to ")[0]
    api = f"from jaxmerge import demo; print(demo.format_table(demo.run(demo.Settings.quick(seed={SEED}))))"
    second_run = subprocess.run(
        [sys.executable, "-c", api], capture_output=True, text=True, timeout=600, env=shared_compile_cache,
    )
    assert second_run.returncode == 0, second_run.stderr[-2000:]
    second = second_run.stdout.removesuffix("\n")
    assert first == second
    for row in ("base (pretrained)", "specialist digits 0-3", "task_arithmetic", "ties d=0.2", "dare_ties d=0.8",
                "task_arithmetic tuned (lambda=", "ties tuned (", "tsv_m", "iso_c", "wudi", "AdaMerging task-wise", "AdaMerging layer-wise"):
        assert row in first


def test_command_prints_table_and_writes_plot(command_run):
    result, output_dir = command_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert "average" in result.stdout and "plot saved to" in result.stdout
    png = output_dir / "merge_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output_dir.glob(".*.tmp"))
