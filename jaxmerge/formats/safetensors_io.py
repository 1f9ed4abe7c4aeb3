"""Read safetensors checkpoints one tensor at a time, write them as tensors finish.

Reading: the `safetensors` library checks each file's header when it is opened;
a tensor's bytes are then read with positioned reads into a 64-byte-aligned
host buffer (`Checkpoint.read_host`; a reused one skips the page faults of
fresh memory), which JAX takes as its own without a copy
(`jax.device_put(..., may_alias=True)`) and which a reader thread can fill
while other threads run (the reads release the GIL).
Writing is streamed: the library's writers need every tensor of a file alive
at once, which would make peak memory grow with the shard size. The format is
simple (an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte offsets, then the raw bytes), so once the plan
fixes every shape and dtype the header is written first and each tensor's bytes
follow as soon as it is merged. The tests read every file back with the
library's own reader.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxmerge.formats._pread import read_into

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The floating dtypes by name (mergekit's `dtype`/`out_dtype`, config.json's `dtype`) -> safetensors codes.
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class CheckpointError(ValueError):
    """A checkpoint or adapter cannot be merged; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and safetensors dtype code, as a header lists it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size * DTYPES[self.dtype].itemsize


def _index_files(path: Path, kind: str = "safetensors") -> dict[str, Path]:
    """tensor name -> file, from a sharded checkpoint's index JSON (`kind` names the format in errors).

    Every entry must name a file inside the index's own directory: an absolute
    path, a `..` component or a link resolving elsewhere is refused before any
    shard is opened (an index is data, and data must not pick what gets read).
    The one exception is the Hugging Face cache, whose snapshot files are links
    into the repository's `blobs` directory.
    """
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable {kind} index ({err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map must map tensor names to file names, got a JSON {type(weight_map).__name__}")
    return {name: _shard_path(path, name, filename) for name, filename in weight_map.items()}


def _shard_path(index: Path, tensor: str, entry) -> Path:
    """The shard file an index entry names, if it lies inside the index's directory."""
    if not isinstance(entry, str) or not entry.strip():
        raise CheckpointError(f"{index}: weight_map[{tensor!r}] must be a file name, got {entry!r}")
    where = f"{index}: weight_map[{tensor!r}] = {entry!r}"
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    if os.path.isabs(entry) or PureWindowsPath(entry).anchor or ".." in parts:
        raise CheckpointError(f"{where} names a file outside the index's directory; nothing was opened")
    file = index.parent / entry
    root = index.parent.resolve()
    resolved = file.resolve()
    if root not in resolved.parents and not _hub_blob(index.parent, resolved):
        raise CheckpointError(
            f"{where} resolves to {resolved}, outside the index's directory; nothing was opened"
        )
    return file


def _hub_blob(directory: Path, resolved: Path) -> bool:
    """True for the Hugging Face cache layout: <repo>/snapshots/<rev>/... linking into <repo>/blobs/."""
    for ancestor in (directory.absolute(), *directory.absolute().parents):
        if ancestor.name == "snapshots":
            return resolved.parent == (ancestor.parent / "blobs").resolve()
    return False


def resolve_files(path: str | os.PathLike) -> dict[str, Path] | list[Path]:
    """The files of a checkpoint: a .safetensors file, an index JSON, or a directory holding either."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return _index_files(indexes[0])
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: no .safetensors file or index in this directory")
        return files
    if p.name.endswith(".index.json"):
        return _index_files(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return [p]


class Checkpoint:
    """A safetensors checkpoint opened read-only: tensor specs now, data on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        found = resolve_files(self.path)
        files = sorted(set(found.values())) if isinstance(found, dict) else found
        self._file_of: dict[str, Path] = {}
        self._offset_of: dict[str, int] = {}  # absolute byte offset of the tensor's data in its file
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            size = file.stat().st_size if file.exists() else -1
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for name in f.keys():
                        s = f.get_slice(name)
                        self.tensors[name] = TensorInfo(name, tuple(s.get_shape()), s.get_dtype())
                        self._file_of[name] = file
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from None
            parsed = _read_header(file)
            if parsed is not None:
                start, header = parsed
                end = start + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if size < end:
                    raise CheckpointError(f"{file}: truncated: {size} bytes, the header needs {end}")
                for name, entry in header.items():
                    if name != "__metadata__" and self._file_of.get(name) == file:
                        self._offset_of[name] = start + int(entry["data_offsets"][0])
        if isinstance(found, dict):
            missing = sorted(set(found) - set(self.tensors))
            if missing:
                raise CheckpointError(f"{self.path}: the index lists {missing[0]} but no shard holds it")

    def read(self, name: str, framework: str = "numpy"):
        """One tensor: a NumPy array (bfloat16 via ml_dtypes), or with framework="flax" a JAX
        array read straight from the memory map (one copy, none through NumPy)."""
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        try:
            with safe_open(str(file), framework=framework) as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({err})") from None

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, bytes) of the tensor's data, for reading ahead (`jaxmerge.engine._prefetch`);
        None when its header was not parsed (`read_host` then reads through the library)."""
        offset = self._offset_of.get(name)
        if offset is None or name not in self.tensors:
            return None
        return self._file_of[name], offset, self.tensors[name].nbytes

    def read_host(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a NumPy array in a 64-byte-aligned host buffer, read with positioned reads
        (large tensors in pieces read by several threads at once: `jaxmerge.formats._pread`).

        The bytes are the file's, unconverted (bfloat16 via ml_dtypes). The
        alignment lets `jax.device_put(array, may_alias=True)` adopt the buffer
        on CPU without copying it; the reads release the GIL, so another
        thread can read ahead while the merge runs.

        Args:
          name: the tensor.
          into: optional 1-D contiguous uint8 buffer of at least the tensor's
            size, 64-byte aligned, to read into (reused buffers skip the page faults of
            fresh memory); None: a fresh buffer. The caller owns it: the
            returned array is a view of it.
        """
        file = self._file_of.get(name)
        info = self.tensors.get(name)
        if file is None or info is None:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        offset = self._offset_of.get(name)
        if offset is None or sys.byteorder != "little":  # unparsed header, or a big-endian host: the library's path
            return np.array(self.read(name))
        nbytes = info.nbytes
        buf = host_buffer(nbytes, into)
        try:
            read_into(file, offset, memoryview(buf))
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({err.strerror or err})") from None
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)


def host_buffer(nbytes: int, into: np.ndarray | None = None) -> np.ndarray:
    """`nbytes` of `into` when it can hold them (1-D contiguous uint8, ALIGN-aligned, long enough: a
    reused buffer, see `Checkpoint.read_host`), else a fresh aligned buffer."""
    if (into is not None and into.dtype == np.uint8 and into.ndim == 1 and into.flags.c_contiguous
            and into.nbytes >= nbytes and into.ctypes.data % ALIGN == 0):
        return into[:nbytes]
    return aligned_empty(nbytes)


def copy_to_host(array: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
    """`array` copied into `host_buffer(array.nbytes, into)`: what a source's `read_host` returns
    for a tensor it computed or read some other way."""
    out = host_buffer(array.nbytes, into).view(array.dtype).reshape(array.shape)
    np.copyto(out, array, casting="no")
    return out


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of `nbytes` whose data is ALIGN-byte aligned.

    From `_MAPPED_BYTES` on (and on Linux) the buffer is an anonymous memory map,
    its pages mapped in one call (MAP_POPULATE), rather than NumPy memory: NumPy
    asks for transparent huge pages on large arrays (madvise), and where the
    kernel's `transparent_hugepage/defrag` is `madvise` (Debian's and Ubuntu's
    default) each huge-page fault may first compact memory. Reading a 262 MB
    tensor pair into a fresh buffer, on the 2-core VM (medians of 7 fresh
    processes): 0.57 s into NumPy memory, 0.11 s into the map (0.04 and 0.02 s
    into the same buffers once touched); `benchmarks/fresh_buffers.py`.
    """
    if nbytes >= _MAPPED_BYTES and _MAP_FLAGS is not None:
        # Page-aligned; unmapped when the last array viewing it is collected.
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=_MAP_FLAGS), np.uint8)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


_MAPPED_BYTES = 1 << 22  # NumPy's own threshold for asking for huge pages
_MAP_FLAGS = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE) if hasattr(mmap, "MAP_POPULATE") else None


ALIGN = 64  # XLA:CPU adopts host buffers aligned to 64 bytes without copying them


def _read_header(file: Path) -> tuple[int, dict] | None:
    """(offset of the data, header dict) of a safetensors file, or None when unreadable."""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    try:
        for k, v in header.items():
            if k != "__metadata__":
                int(v["data_offsets"][0]), int(v["data_offsets"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return 8 + header_len, header


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must look like 5GB, 500MB or 1048576, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "").replace("B", "") or ""]
    return int(number * base**power)


def plan_shards(tensors: list[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Group tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class StreamedFile:
    """A file written front to back whose bytes go to disk as they come and leave the page cache once there.

    With `writeback` (the default, on Linux) the bytes are written in pieces
    of `_WRITEBACK_BYTES` and each piece is handed to the kernel's write-back
    at once (`sync_file_range`, which does not wait), so the disk writes
    overlap the rest of the merge and the `fsync` at `close` has little left
    to wait for. Pieces more than `recycle_lag` bytes behind (default
    `_RECYCLE_LAG`; negative: keep every page) are by then usually on disk,
    and their pages are dropped from the page cache (`_recycle`), so the next
    pieces reuse them: the file occupies a bounded share of the page cache
    (the lag and a few pieces) instead of its whole size, and writing it does
    not need fresh memory. On a VM whose host takes freed guest memory back
    (this project's test machine) fresh pages fill at ~0.35 GB/s: a 0.66 GB
    file took 1.87 s to write, 0.33 s recycled (`benchmarks/write_recycling.py`).
    The file's content is the same either way.
    """

    def __init__(self, path: str | os.PathLike, *, writeback: bool = True, recycle_lag: int | None = None):
        self._file = open(path, "wb")
        self._written = 0
        self._synced = 0  # bytes already handed to write-back
        self._recycled = 0  # bytes already on disk and dropped from the page cache
        self._writeback = writeback and _sync_file_range is not None
        self._recycle_lag = _RECYCLE_LAG if recycle_lag is None else recycle_lag

    def write(self, data) -> None:
        """Append `data` (any bytes-like object)."""
        view = memoryview(data).cast("B")
        if not self._writeback:
            self._file.write(view)
            self._written += view.nbytes
            return
        for start in range(0, view.nbytes, _WRITEBACK_BYTES):
            piece = view[start : start + _WRITEBACK_BYTES]
            self._file.write(piece)
            self._written += piece.nbytes
            if self._written - self._synced >= _WRITEBACK_BYTES:
                self._start_writeback()
                self._recycle()

    def _start_writeback(self) -> None:
        """Hand what is written so far to the disk, without waiting for it (the later fsync waits)."""
        self._file.flush()
        # An error here is only lost advice: close's fsync reports it.
        if _sync_file_range(self._file.fileno(), ctypes.c_int64(self._synced),
                            ctypes.c_int64(self._written - self._synced), _SYNC_FILE_RANGE_WRITE) == 0:
            self._synced = self._written

    def _recycle(self) -> None:
        """Drop the pages more than the lag behind that are on disk already from the page cache.

        `posix_fadvise(DONTNEED)` drops clean pages only and does not wait: pages
        still being written stay, and the next call covers them again (one lag
        further back). So a slow disk never holds up the writer, and a write-back
        error stays for `close`'s fsync to report (waiting here would consume it).
        """
        end = (self._synced - self._recycle_lag) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages: a part stays
        if self._recycle_lag < 0 or end - self._recycled < _WRITEBACK_BYTES:
            return
        start = max(0, self._recycled - self._recycle_lag) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            os.posix_fadvise(self._file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return  # advice only
        self._recycled = end

    def close(self) -> None:
        """Flush and fsync: the bytes are on disk when this returns."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without syncing (the file is to be discarded)."""
        try:
            self._file.close()
        except OSError:
            pass  # the close flushes the buffer: on a full disk it fails again; the file is discarded anyway


class ShardWriter:
    """Write one safetensors file whose tensors arrive one at a time, in plan order (a `StreamedFile`)."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str], *, writeback: bool = True,
                 recycle_lag: int | None = None):
        self.path = path
        self._pending = list(tensors)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        _check_room(path, 8 + len(raw) + offset)
        self._file = StreamedFile(path, writeback=writeback, recycle_lag=recycle_lag)
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        expected = self._pending.pop(0)
        if expected.name != name:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected.name})")
        data = np.ascontiguousarray(array, dtype=DTYPES[expected.dtype])
        if data.shape != expected.shape:
            raise RuntimeError(f"tensor {name} has shape {data.shape}, the plan says {expected.shape}")
        self._file.write(data.reshape(-1).view(np.uint8).data)  # a byte view: bfloat16 has no buffer format

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} tensors were never written")
        self._file.close()

    def abort(self) -> None:
        self._file.abort()


_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_BYTES = 16 << 20  # start write-back every 16 MB written
_RECYCLE_LAG = 32 << 20  # drop written pages this far behind: ~2 pieces stay in flight (measured: 0.3-0.6 s
#                          for 0.66 GB; a 128 MB lag 0.7 s, 256 MB 1.1 s: every page of the lag is fresh memory)


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _check_room(path: Path, size: int) -> None:
    """Fail before writing a file of `size` bytes that cannot fit (the caller names the output)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # no statistics: the writes will tell
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device: {path.name} needs {size} bytes, {free} are free")


def shard_names(count: int, stem: str = "model") -> list[str]:
    """Shard file names as transformers writes them: `model.safetensors`, or `model-00001-of-00003.safetensors`, ..."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, shards: list[list[TensorInfo]], names: list[str], metadata: dict[str, str]) -> None:
    """Write `model.safetensors.index.json`: the total size, `metadata` and each tensor's shard."""
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": {t.name: name for shard, name in zip(shards, names) for t in shard},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
