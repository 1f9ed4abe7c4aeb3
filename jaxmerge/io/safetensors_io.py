"""Read safetensors checkpoints one tensor at a time, write them as tensors finish.

Reading uses the `safetensors` library (memory-mapped, one tensor at a time).
Writing is streamed: the library's writers need every tensor of a file alive
at once, which would make peak memory grow with the shard size. The format is
simple (an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte offsets, then the raw bytes), so once the plan
fixes every shape and dtype the header is written first and each tensor's bytes
follow as soon as it is merged. The tests read every file back with the
library's own reader.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

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


class CheckpointError(ValueError):
    """A checkpoint or adapter cannot be merged; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size * DTYPES[self.dtype].itemsize


def _index_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from a sharded checkpoint's index JSON.

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
        raise CheckpointError(f"{path}: not a readable safetensors index ({err})") from None
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
            end = _data_end(file)
            if end is not None and size < end:
                raise CheckpointError(f"{file}: truncated: {size} bytes, the header needs {end}")
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


def _data_end(file: Path) -> int | None:
    """Byte length the header promises (8 + header + largest end offset)."""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


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


class ShardWriter:
    """Write one safetensors file whose tensors arrive one at a time, in plan order."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str]):
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
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the close flushes the buffer: on a full disk it fails again; the file is discarded anyway


def _check_room(path: Path, size: int) -> None:
    """Fail before writing a file of `size` bytes that cannot fit (the caller names the output)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # no statistics: the writes will tell
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device: {path.name} needs {size} bytes, {free} are free")


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, shards: list[list[TensorInfo]], names: list[str], metadata: dict[str, str]) -> None:
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": {t.name: name for shard, name in zip(shards, names) for t in shard},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
