"""Reading ahead: the OS helpers (`formats._readahead`), how far ahead `engine._prefetch.Prefetch` goes, and the
merge and extract-lora runs that hand it their inputs' byte ranges."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmerge.engine import _pipeline, _prefetch
from jaxmerge.engine._prefetch import Prefetch, default_read_ahead
from jaxmerge.engine.stream import merge_checkpoints
from jaxmerge.formats import _readahead
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError
from tiny_models import write_safetensors_models

needs_readahead = pytest.mark.skipif(not _readahead.supported() or _readahead._libc() is None,
                                     reason="no posix_fadvise or mincore on this platform")


def _evicted_file(path: Path, nbytes: int) -> int:
    """A file of `nbytes` written, synced and dropped from the page cache; returns a read descriptor."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache; no privilege needed
    return fd


@needs_readahead
def test_advice_reads_an_evicted_file_into_memory(tmp_path):
    size, path = 4 << 20, tmp_path / "f.bin"
    fd = _evicted_file(path, size)
    try:
        before = _readahead.cached_fraction(path)
        if before is None or before > 0.5:
            pytest.skip(f"this file system keeps the file in memory or cannot tell (cached fraction {before})")
        assert _readahead.cached_fraction(path) == before  # looking reads nothing
        _readahead.advise(fd, 0, size)
        deadline = time.monotonic() + 10
        while _readahead.cached_fraction(path) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Every page, up to the last: one call of 4 MB could have stopped at the device's cap.
        assert _readahead.cached_fraction(path) == 1.0
    finally:
        os.close(fd)


@needs_readahead
def test_the_cached_fraction_counts_what_is_in_memory(tmp_path):
    size, path = 8 << 20, tmp_path / "f.bin"
    fd = _evicted_file(path, size)
    try:
        if _readahead.cached_fraction(path) != 0:
            pytest.skip("this file system keeps the file in memory or cannot tell")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        os.preadv(fd, [bytearray(size // 4)], 0)  # the first quarter read: now in memory
        assert _readahead.cached_fraction(path) == 0.25  # 2048 pages: every one looked at
        assert 0.2 <= _readahead.cached_fraction(path, samples=8) <= 0.3  # 8 windows of 16
        (tmp_path / "empty").write_bytes(b"")
        assert _readahead.cached_fraction(tmp_path / "empty") == 1.0
    finally:
        os.close(fd)


def test_the_cached_fraction_is_unknown_where_mincore_would_not_tell(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100_000)
    # Since Linux 5.0 mincore calls every page of a file cached unless the caller owns it or may write it.
    monkeypatch.setattr(_readahead.os, "geteuid", lambda: os.getuid() + 12345)
    monkeypatch.setattr(_readahead.os, "access", lambda p, mode: False)
    assert _readahead.cached_fraction(path) is None
    monkeypatch.setattr(_readahead.os, "access", lambda p, mode: True)  # writable: it tells
    assert _readahead.cached_fraction(path) is not None or _readahead._libc() is None
    monkeypatch.undo()
    monkeypatch.setattr(_readahead, "_libc", lambda: None)  # no mincore
    assert _readahead.cached_fraction(path) is None


def test_a_file_is_advised_unless_nearly_all_cached(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100_000)
    for fraction, cached in ((1.0, True), (_prefetch.CACHED, True), (0.5, False), (None, False)):
        monkeypatch.setattr(_readahead, "cached_fraction", lambda p, samples=64, f=fraction: f)
        assert _prefetch._looks_cached(path) == cached, fraction


def test_advice_goes_in_pieces_every_device_reads_whole(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: calls.append((offset, n)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", 3, raising=False)
    _readahead.advise(7, 1000, 3 * _readahead.PIECE + 5)
    assert calls == [(1000, _readahead.PIECE), (1000 + _readahead.PIECE, _readahead.PIECE),
                     (1000 + 2 * _readahead.PIECE, _readahead.PIECE), (1000 + 3 * _readahead.PIECE, 5)]
    calls.clear()
    _readahead.advise(7, 0, 10 * _readahead.PIECE, stop=lambda: len(calls) >= 2)
    assert len(calls) == 2  # asked before every piece


class _Recorder:
    """Stands in for the OS: every file uncached, each advice recorded as (file, offset, bytes)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

        def advise_range(path, offset, nbytes, stop=None):
            with self.lock:
                self.calls.append((str(path), offset, nbytes))

        monkeypatch.setattr(_prefetch, "_looks_cached", lambda path: False)
        monkeypatch.setattr(_prefetch, "_advise_range", advise_range)
        monkeypatch.setattr(_readahead, "supported", lambda: True)

    def advised(self) -> list[tuple[str, int, int]]:
        with self.lock:
            return list(self.calls)

    def wait_for(self, count: int, timeout: float = 10.0, settle: float = 0.1) -> list:
        deadline = time.monotonic() + timeout
        while len(self.advised()) < count and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(settle)  # anything advised past the expected would show now
        return self.advised()


def _items(path: Path, count: int, size: int) -> list[list[tuple[Path, int, int]]]:
    path.write_bytes(b"\0" * (count * size))
    return [[(path, i * size, size)] for i in range(count)]


def test_prefetch_stays_within_its_bytes_ahead_of_the_reader(tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    items = _items(tmp_path / "f.bin", 10, 100)
    with Prefetch(items, read_ahead=350) as prefetch:
        prefetch.reading(0)
        # From item 0's start, items 1 and 2 end within 350 bytes, item 3 does not.
        assert [offset for _, offset, _ in recorder.wait_for(2)] == [100, 200]
        prefetch.reading(5)
        # Items 3-5 were passed (the reader reads them itself); 6 and 7 fit from item 5's start.
        assert [offset for _, offset, _ in recorder.wait_for(4)] == [100, 200, 600, 700]
        prefetch.reading(9)
        assert [offset for _, offset, _ in recorder.wait_for(4)] == [100, 200, 600, 700]
    assert not prefetch._thread.is_alive() and prefetch.advised == 400


def test_the_next_item_is_advised_even_when_larger_than_the_read_ahead(tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    items = _items(tmp_path / "f.bin", 4, 1000)
    prefetch = Prefetch(items, read_ahead=10)
    prefetch.reading(1)  # before the thread starts: it begins after item 1
    with prefetch:
        assert [offset for _, offset, _ in recorder.wait_for(1)] == [2000]


def test_cached_inputs_start_no_advice_and_the_thread_ends(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_readahead, "advise", lambda *args: calls.append(args))
    monkeypatch.setattr(_readahead, "cached_fraction", lambda path, samples=64: 1.0)
    monkeypatch.setattr(_readahead, "supported", lambda: True)
    with Prefetch(_items(tmp_path / "f.bin", 5, 100), read_ahead=1 << 20) as prefetch:
        prefetch._thread.join(timeout=10)
        assert not prefetch._thread.is_alive()  # it ended on its own: nothing to do
    assert calls == [] and prefetch.advised == 0
    assert _open_files_under(tmp_path) == []


def _open_files_under(folder: Path) -> list[str]:
    """Files under `folder` this process holds a descriptor of ([] where /proc/self/fd is missing)."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


@pytest.mark.parametrize("error", [OSError(22, "Invalid argument"), ValueError("odd"), MemoryError()])
def test_an_error_stops_the_advice_not_the_run(tmp_path, monkeypatch, caplog, error):
    _Recorder(monkeypatch)
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args))

    def refuse(path, offset, nbytes, stop=None):
        raise error

    monkeypatch.setattr(_prefetch, "_advise_range", refuse)
    items = _items(tmp_path / "f.bin", 5, 100)
    with caplog.at_level("DEBUG", logger="jaxmerge.engine._prefetch"):
        with Prefetch(items, read_ahead=1 << 20) as prefetch:
            prefetch.reading(0)
            prefetch._thread.join(timeout=10)
            assert not prefetch._thread.is_alive()
    assert uncaught == [] and "reading ahead stopped" in caplog.text
    assert prefetch.advised == 0


def test_a_vanished_file_stops_the_advice_not_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(_readahead, "supported", lambda: True)
    items = _items(tmp_path / "f.bin", 5, 100)
    (tmp_path / "f.bin").unlink()
    with caplog.at_level("DEBUG", logger="jaxmerge.engine._prefetch"):
        with Prefetch(items, read_ahead=1 << 20) as prefetch:
            prefetch._thread.join(timeout=10)
            assert not prefetch._thread.is_alive()
    assert "reading ahead stopped" in caplog.text


def test_leaving_stops_the_thread_inside_a_large_item(tmp_path, monkeypatch):
    """Advice can wait on a full device queue: leaving the run must not wait for a whole embedding."""
    monkeypatch.setattr(_prefetch, "_looks_cached", lambda path: False)
    monkeypatch.setattr(_readahead, "supported", lambda: True)
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: (calls.append(args), time.sleep(0.01)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", 3, raising=False)
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    items = [[(path, 0, 1)], [(path, 0, 1000 * _readahead.PIECE)]]  # item 1: 1000 pieces, ~10 s
    with Prefetch(items, read_ahead=1 << 40):
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
    assert time.monotonic() - started < 2 and 0 < len(calls) < 1000


def test_no_thread_without_ranges_or_read_ahead(tmp_path, monkeypatch):
    monkeypatch.setattr(_readahead, "supported", lambda: True)
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "bad")  # not even read without ranges
    with Prefetch([], None) as prefetch:
        assert prefetch._thread is None
    monkeypatch.delenv("JAXMERGE_READ_AHEAD_BYTES")
    with Prefetch([[], []], read_ahead=1 << 20) as prefetch:
        assert prefetch._thread is None
    with Prefetch(_items(tmp_path / "f.bin", 2, 10), read_ahead=0) as prefetch:
        assert prefetch._thread is None


@pytest.mark.parametrize("depth", [0, 2])
def test_the_pipeline_tells_the_prefetch_each_item_in_order(depth, monkeypatch):
    seen = []
    monkeypatch.setattr(Prefetch, "reading", lambda self, index: seen.append(index))
    out = []
    _pipeline.run_ordered(list(range(6)), lambda i: i, lambda i, r: r * 2, lambda i, d: out.append(d),
                          depth=depth, ranges=[[] for _ in range(6)], read_ahead=1 << 20)
    assert seen == list(range(6)) and out == [0, 2, 4, 6, 8, 10]


def test_read_ahead_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "12345")
    assert default_read_ahead() == 12345
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "0")
    assert default_read_ahead() == 0
    for bad in ("lots", "-1"):
        monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", bad)
        with pytest.raises(CheckpointError, match=f"JAXMERGE_READ_AHEAD_BYTES.*{bad}"):
            default_read_ahead()
    monkeypatch.delenv("JAXMERGE_READ_AHEAD_BYTES")
    assert 0 < default_read_ahead() <= _prefetch.DEFAULT_READ_AHEAD


def test_a_bad_read_ahead_stops_the_merge_before_it_writes(tmp_path, monkeypatch):
    models = write_safetensors_models(tmp_path / "in", 2, {"w": (8, 8)}, seed=0)
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "much")
    with pytest.raises(CheckpointError, match="JAXMERGE_READ_AHEAD_BYTES"):
        merge_checkpoints(models, tmp_path / "out", method="linear", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_merge_advises_its_inputs_ranges_ahead_and_writes_the_same_bytes(tmp_path, monkeypatch, depth):
    shapes = {f"layers.{i}.w": (64, 32) for i in range(6)} | {"norm": (32,)}
    models = write_safetensors_models(tmp_path / "in", 3, shapes, seed=1, dtype=np.float32)
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "0")
    reference = merge_checkpoints(models, tmp_path / "ref", method="linear", progress=False, depth=depth)
    assert reference.read_ahead == 0 and "read_ahead_mb" not in reference.profile
    recorder = _Recorder(monkeypatch)
    items = len(Checkpoint(models[0]).tensors)
    reading = Prefetch.reading

    def reading_after_the_advice(self, index):
        reading(self, index)
        if index + 1 < items:  # the next item's 3 ranges are always allowed: wait for them (tiny reads race)
            recorder.wait_for(3 * (index + 1), settle=0)

    monkeypatch.setattr(Prefetch, "reading", reading_after_the_advice)
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", str(1 << 30))
    plan = merge_checkpoints(models, tmp_path / "out", method="linear", progress=False, depth=depth)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    ranges = {(str(c.byte_range(n)[0]), *c.byte_range(n)[1:]) for c in map(Checkpoint, models) for n in c.tensors}
    advised = recorder.advised()
    # Every input tensor but those of the first item read (the reader's own) is advised, once.
    assert len(advised) == len(set(advised)) == len(ranges) - len(models)
    assert set(advised) <= ranges
    assert plan.read_ahead == 1 << 30
    assert plan.profile["read_ahead_mb"] == 1  # a few KB advised: shown as at least 1 MB


def test_byte_ranges_hold_the_tensors_bytes_in_single_and_sharded_checkpoints(tmp_path, monkeypatch):
    shapes = {f"layers.{i}.w": (64, 32) for i in range(6)}
    models = write_safetensors_models(tmp_path / "in", 2, shapes, seed=3, dtype=np.float32)
    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", "0")
    plan = merge_checkpoints(models, tmp_path / "sharded", method="linear", progress=False, max_shard_size=20_000)
    assert len(plan.shards) > 1
    for source in (Checkpoint(models[0]), Checkpoint(tmp_path / "sharded")):
        files = set()
        for name in source.tensors:
            path, offset, nbytes = source.byte_range(name)
            with open(path, "rb") as f:
                f.seek(offset)
                assert f.read(nbytes) == source.read_host(name).tobytes(), name
            files.add(path)
        assert len(files) == (1 if source.path == models[0] else len(plan.shards))
    assert Checkpoint(models[0]).byte_range("nothing") is None


def test_extract_lora_advises_both_models_ranges(tmp_path, monkeypatch):
    from jaxmerge.tools.extract_lora import extract_lora_adapter

    monkeypatch.setenv("JAXMERGE_READ_AHEAD_BYTES", str(1 << 30))

    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (64, 32) for i in range(4)}
    base, ft = write_safetensors_models(tmp_path / "in", 2, shapes, seed=2, dtype=np.float32)
    recorder = _Recorder(monkeypatch)
    extract_lora_adapter(ft, base, tmp_path / "adapter", max_rank=4, module_types="names")
    files = {str(Checkpoint(p)._file_of[n]) for p in (base, ft) for n in shapes}
    advised = recorder.advised()
    assert advised and {path for path, _, _ in advised} == files


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@needs_readahead
def test_no_descriptor_is_held_between_advice(tmp_path, monkeypatch):
    """A sharded model's hundreds of files must not hold descriptors the reader needs."""
    monkeypatch.setattr(_prefetch, "_looks_cached", lambda path: False)
    advised = []
    real = _prefetch._advise_range
    monkeypatch.setattr(_prefetch, "_advise_range", lambda *args: (real(*args), advised.append(args[:3])))
    items = []
    for i in range(40):
        (tmp_path / f"shard{i}.bin").write_bytes(b"\1" * 4096)
        items.append([(tmp_path / f"shard{i}.bin", 0, 4096)])
    with Prefetch(items, read_ahead=3 * 4096) as prefetch:
        deadline = time.monotonic() + 10
        while len(advised) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        assert len(advised) == 2 and prefetch._thread.is_alive()  # waiting for the reader
        assert _open_files_under(tmp_path) == []
