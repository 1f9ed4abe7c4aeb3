"""PyTorch `.bin` checkpoints (`torch.save` state dicts) as tensor sources, loaded without running their code.

A `.bin` file is a pickle, and unpickling can call any function the file
names. Every load here goes through `torch.load(..., weights_only=True)`,
PyTorch's restricted unpickler, which rebuilds tensors and plain containers
and refuses every other global before anything is called; what comes back must
then be a flat dict of str -> tensor.

Memory: files in the zip format (`torch.save`'s default since PyTorch 1.6)
are loaded with `mmap=True`: the unpickling reads only the small pickle, the
tensors are views of the mapped file, paged in when `read_host` copies one
out. Legacy (pre-zip) files cannot be mapped (torch.load raises "mmap can only
be used with files saved with `torch.save(..., _use_new_zipfile_serialization=True)`"),
so they are loaded whole, still through the restricted unpickler. Either
way at most one shard is held at a time: a sharded checkpoint is read shard
by shard, and the engine reads tensors in file order.

torch is imported only here, only when a `.bin` checkpoint is opened.
"""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxmerge.formats.safetensors_io import CheckpointError, TensorInfo, _index_files, copy_to_host

SUFFIXES = (".bin", ".pt", ".pth")
# torch dtype name (str(dtype) without "torch.") -> safetensors code
TORCH_CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def is_torch_bin(path: Path) -> bool:
    """True for a PyTorch checkpoint: a `.bin`/`.pt`/`.pth` file, a `*.bin.index.json`, or a
    directory with no safetensors file but `pytorch_model*.bin` files or their index."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
            return False
        return any(path.glob("pytorch_model*.bin")) or any(path.glob("*.bin.index.json"))
    return path.suffix.lower() in SUFFIXES or path.name.lower().endswith(".bin.index.json")


def resolve_bin_files(path: str | os.PathLike) -> dict[str, Path] | list[Path]:
    """The files of a PyTorch checkpoint.

    Args:
      path: a `.bin` file, an index JSON, or a directory holding `pytorch_model*.bin` or a `*.bin.index.json`.

    Returns:
      tensor name -> shard (from an index, every entry inside the index's directory), or the files to read.
    """
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.bin.index.json"))
        if indexes:
            return _index_files(indexes[0], "PyTorch .bin")
        files = sorted(p.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{p}: no pytorch_model*.bin file or index in this directory")
        return files
    if p.name.endswith(".index.json"):
        return _index_files(p, "PyTorch .bin")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return [p]


def _torch(file: Path):
    try:
        import torch  # noqa: PLC0415 - jaxmerge's core does not need torch
    except ImportError:
        raise CheckpointError(f"{file}: .bin checkpoints need torch (pip install torch)") from None
    return torch


def _why(err: BaseException) -> str:
    """The informative line of a torch.load error (its weights_only message is a paragraph of advice)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return "; ".join(useful or lines[:1]) or type(err).__name__


def load_state_dict(file: Path) -> dict:
    """A `.bin` file's flat dict of str -> tensor, through PyTorch's restricted unpickler.

    Args:
      file: the file (zip format: memory-mapped; legacy format: loaded whole).

    Returns:
      name -> CPU tensor, in the file's order.

    Raises:
      CheckpointError: one line naming the file (and key): torch missing, a pickle the restricted
        unpickler refuses (no code from it has run), or anything but a flat dict of tensors.
    """
    torch = _torch(file)
    try:
        mmap = zipfile.is_zipfile(file)  # legacy files cannot be mapped
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror or err})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files; each becomes one line
        raise CheckpointError(f"{file}: not a PyTorch weights file that loads safely ({_why(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict of tensor name -> tensor")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{file}: key {key!r} is a {type(key).__name__}, tensor names must be strings")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{file}: {key!r} holds a {type(value).__name__}, not a tensor (only a flat dict of tensors is a checkpoint)"
            )
        if value.layout != torch.strided or str(value.dtype).removeprefix("torch.") not in TORCH_CODES:
            raise CheckpointError(f"{file}: tensor {key} has dtype {value.dtype} and layout {value.layout}, "
                                  f"which has no safetensors equivalent")
    return state


def _code(tensor) -> str:
    return TORCH_CODES[str(tensor.dtype).removeprefix("torch.")]


class TorchBinCheckpoint:
    """A PyTorch `.bin` checkpoint (one file, or shards through an index) as a `TensorSource`."""

    def __init__(self, path: str | os.PathLike):
        """Read every tensor's spec now (one shard loaded at a time); data is copied out on demand.

        Args:
          path: a `.bin`/`.pt`/`.pth` file, a `*.bin.index.json`, or a directory (see `resolve_bin_files`).

        Raises:
          CheckpointError: one line naming the file and tensor that cannot be read.
        """
        self.path = Path(path)
        found = resolve_bin_files(self.path)
        files = sorted(set(found.values())) if isinstance(found, dict) else found
        self.tensors: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._loaded: tuple[Path, dict] | None = None  # the one shard held (mapped, or whole for legacy files)
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{file}: no such file (named by {self.path})")
            self._loaded = None  # one shard at a time, also while opening
            state = load_state_dict(file)
            for name, tensor in state.items():
                if isinstance(found, dict) and found.get(name) != file:
                    continue  # the index assigns this tensor to another shard (or to none)
                if name in self._file_of:
                    raise CheckpointError(f"{file}: tensor {name} is also in {self._file_of[name]}")
                self.tensors[name] = TensorInfo(name, tuple(tensor.shape), _code(tensor))
                self._file_of[name] = file
            self._loaded = (file, state)
        if isinstance(found, dict):
            missing = sorted(set(found) - set(self.tensors))
            if missing:
                raise CheckpointError(f"{self.path}: the index lists {missing[0]} but no shard holds it")

    def _tensor(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        with self._lock:
            if self._loaded is None or self._loaded[0] != file:
                self._loaded = None  # drop the previous shard before mapping the next
                self._loaded = (file, load_state_dict(file))
            tensor = self._loaded[1].get(name)
        if tensor is None or tuple(tensor.shape) != self.tensors[name].shape or _code(tensor) != self.tensors[name].dtype:
            raise CheckpointError(f"{file}: tensor {name} changed since the checkpoint was opened")
        return tensor

    def read_host(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a NumPy array (bfloat16 via ml_dtypes), copied out of the file into a 64-byte-aligned buffer.

        Args:
          name: the tensor.
          into: optional 1-D contiguous 64-byte-aligned uint8 buffer of at least the tensor's size to
            copy into (as `Checkpoint.read_host`); None or unsuitable: a fresh buffer.

        Returns:
          An array of `tensors[name]`'s shape and dtype, owned by the caller (never a view of the mapped file).
        """
        tensor = self._tensor(name).detach()
        torch = _torch(self._file_of[name])
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: same bits through uint16
            source = tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        else:
            source = tensor.numpy()
        return copy_to_host(source, into)  # pages of the mapped file come in here

    def close(self) -> None:
        """Drop the shard held (its mapping closes when no tensor refers to it)."""
        with self._lock:
            self._loaded = None
