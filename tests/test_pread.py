"""`jaxmerge.formats._pread`: a file's byte range read in pieces by several threads, exactly."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from jaxmerge.formats import _pread
from jaxmerge.formats.safetensors_io import Checkpoint, CheckpointError, aligned_empty


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 16, (1 << 16) + 1])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_pieces_cover_the_range_in_order_page_aligned(nbytes, threads, monkeypatch):
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)
    got = _pread.pieces(nbytes, threads)
    assert got[0][0] == 0 and got[-1][1] == nbytes
    assert all(a < b for a, b in got) or nbytes == 0
    assert all(b == a for (_, b), (a, _) in zip(got, got[1:]))  # contiguous
    assert all(a % 4096 == 0 for a, _ in got)
    assert len(got) <= max(1, min(threads, nbytes // 4096))


def test_a_small_range_is_one_piece():
    assert _pread.pieces(_pread.MIN_PIECE * 2 - 1, 4) == [(0, _pread.MIN_PIECE * 2 - 1)]
    assert len(_pread.pieces(_pread.MIN_PIECE * 4, 4)) == 4


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("offset,size", [(0, 200_003), (7, 150_000), (123_456, 76_547), (5, 0), (199_999, 4)])
def test_read_into_reads_exactly_the_range(data_file, threads, offset, size, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)  # many pieces on a small file
    monkeypatch.setattr(_pread, "reading_threads", lambda: threads)
    buf = bytearray(size + 3)  # the bytes past the range stay as they were
    buf[size:] = b"xyz"
    _pread.read_into(path, offset, memoryview(buf)[:size])
    assert bytes(buf[:size]) == data[offset : offset + size] and bytes(buf[size:]) == b"xyz"
    assert path.read_bytes() == data  # read-only


def test_read_into_without_positioned_reads_reads_the_same(data_file, monkeypatch):
    """Platforms without os.preadv (Windows) read the range with one thread."""
    path, data = data_file
    monkeypatch.delattr(os, "preadv")
    buf = bytearray(50_000)
    _pread.read_into(path, 1234, memoryview(buf))
    assert bytes(buf) == data[1234:51234]


@pytest.mark.parametrize("preadv", [True, False])
def test_a_range_past_the_end_of_the_file_is_an_error_and_no_descriptor_leaks(data_file, preadv, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)
    monkeypatch.setattr(_pread, "reading_threads", lambda: 3)
    if not preadv:
        monkeypatch.delattr(os, "preadv")
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(OSError) as err:
        _pread.read_into(path, 100_000, memoryview(bytearray(100_004)))
    assert err.value.errno == errno.EIO and "unexpected end of file after 200003 bytes" in str(err.value)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_read_host_reads_a_tensor_in_pieces_bit_for_bit(tmp_path, monkeypatch):
    """A checkpoint's tensor read by 3 threads in 4 kB pieces equals the library's own read."""
    from safetensors.numpy import save_file

    tensors = {"a": np.arange(3, dtype=np.int8), "w": np.random.default_rng(1).standard_normal((301, 77)).astype(np.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)
    monkeypatch.setattr(_pread, "reading_threads", lambda: 3)
    ckpt = Checkpoint(tmp_path)
    into = aligned_empty(1 << 20)
    for name, value in tensors.items():
        got = ckpt.read_host(name, into)
        assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()


def test_read_host_names_the_file_when_it_was_cut_short_after_opening(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((1000, 100), np.float32)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    os.truncate(file, file.stat().st_size - 1000)  # replaced while a merge runs
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read tensor w \(unexpected end of file"):
        ckpt.read_host("w")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_reads_with_threads_of_its_own(data_file, monkeypatch):
    """The parent's pool has no threads in a forked child: the child makes its own instead of waiting."""
    path, data = data_file
    monkeypatch.setattr(_pread, "MIN_PIECE", 4096)
    monkeypatch.setattr(_pread, "reading_threads", lambda: 3)
    _pread.read_into(path, 0, memoryview(bytearray(100_000)))  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 if it read the bytes, 1 if not; an alarm ends a hang
        import signal

        signal.alarm(20)
        try:
            buf = bytearray(100_000)
            _pread.read_into(path, 5, memoryview(buf))
            os._exit(0 if bytes(buf) == data[5:100_005] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
