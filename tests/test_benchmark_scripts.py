"""The benchmark scripts run (tiny sizes): their timings are reported, never asserted, but a
script that no longer runs, or whose two tools stopped agreeing on the inputs, must fail here."""

from __future__ import annotations

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
