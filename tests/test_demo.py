"""`jaxmerge demo`: seeded, prints the table, saves the plot."""

import subprocess
import sys

from jaxmerge import demo


def test_two_runs_with_one_seed_give_the_same_table():
    first = demo.format_table(demo.run(demo.Settings.quick(seed=3)))
    second = demo.format_table(demo.run(demo.Settings.quick(seed=3)))
    assert first == second
    for row in ("base (pretrained)", "specialist digits 0-3", "task_arithmetic", "ties d=0.2", "dare_ties d=0.8",
                "task_arithmetic tuned (lambda=", "ties tuned (", "tsv_m", "iso_c", "wudi", "AdaMerging task-wise", "AdaMerging layer-wise"):
        assert row in first


def test_command_prints_table_and_writes_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "average" in result.stdout and "plot saved to" in result.stdout
    png = tmp_path / "merge_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
