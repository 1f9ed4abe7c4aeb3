"""What the engine reads tensors from: a `TensorSource`, and `open_checkpoint` to get one for a path.

A source names its tensors with their specs up front (`tensors`) and hands
out one tensor at a time (`read_host`), so the engine never holds more than
the tensors it is merging. Safetensors checkpoints are sources
(`jaxmerge.formats.safetensors_io.Checkpoint`); so are PyTorch `.bin`
checkpoints (`jaxmerge.formats.torch_bin`), and sources derived from others
(a LoRA adapter folded into its model's tensors, embedding rows aligned to
a merged vocabulary) wrap the source they derive from.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jaxmerge.formats.orbax import is_orbax_checkpoint, is_safetensors
from jaxmerge.formats.safetensors_io import DTYPE_NAMES, Checkpoint, CheckpointError, TensorInfo, copy_to_host, resolve_files

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


@runtime_checkable
class TensorSource(Protocol):
    """Tensors read one at a time (see the module docstring)."""

    path: Path  # where errors point (a file or directory)
    tensors: dict[str, TensorInfo]  # name -> spec, in the file's order

    def read_host(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a NumPy array of `tensors[name]`'s shape and dtype; `into` as `Checkpoint.read_host`."""
        ...


class ArraySource:
    """Tensors computed in memory, read like a checkpoint's (a `TensorSource`).

    For outputs that no input holds: a mixture of experts' router weights, zero
    biases an output architecture needs. The arrays are small next to the model;
    each read copies one into the engine's buffer. They may also be computed
    later: with `specs`, `arrays` is a function called on the first read (from
    the engine's reader thread), so a slow computation (the routers waiting for
    the prompts' token ids) overlaps the tensors streamed before.
    """

    def __init__(self, label: str | os.PathLike, arrays: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]],
                 specs: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None):
        """Args:
          label: what errors name as this source's path ("router weights").
          arrays: tensor name -> floating NumPy array (float64/32/16 or ml_dtypes bfloat16); or, with
            `specs`, a function returning that dict, called once, on the first read.
          specs: name -> (shape, dtype) of every array the function will return (required with one).

        Raises:
          CheckpointError: a dtype no checkpoint holds; on the first read, a computed array that is
            missing or differs from its spec.
        """
        self.path = Path(label)
        self._lock = threading.Lock()
        if callable(arrays):
            if specs is None:
                raise TypeError("ArraySource: computed arrays need their specs")
            self._compute, self._arrays = arrays, None
        else:
            self._compute, self._arrays = None, {name: np.ascontiguousarray(a) for name, a in arrays.items()}
            specs = {name: (a.shape, a.dtype) for name, a in self._arrays.items()}
        self.tensors = {name: TensorInfo(name, tuple(shape), _code(np.dtype(dtype), name))
                        for name, (shape, dtype) in specs.items()}

    def read_host(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """A copy of array `name` (in `into` when it fits, as `Checkpoint.read_host`)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        return copy_to_host(self._computed()[name], into)

    def materialize(self) -> None:
        """Compute the arrays now, if they are computed and not yet (a dry run checks they can be)."""
        self._computed()

    def _computed(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._arrays is None:
                arrays = {name: np.ascontiguousarray(a) for name, a in self._compute().items()}
                for name, info in self.tensors.items():
                    got = arrays.get(name)
                    if got is None or tuple(got.shape) != info.shape or _code(got.dtype, name) != info.dtype:
                        what = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
                        raise CheckpointError(f"{self.path}: tensor {name} was computed as {what}, "
                                              f"its spec is {info.dtype} {list(info.shape)}")
                self._arrays = arrays
            return self._arrays


def _code(dtype: np.dtype, name: str) -> str:
    if dtype.name == "bfloat16":
        return DTYPE_NAMES["bfloat16"]
    if dtype not in _CODES:
        raise CheckpointError(f"tensor {name}: dtype {dtype} is not a floating dtype a checkpoint holds")
    return _CODES[dtype]


def open_checkpoint(path: str | os.PathLike | TensorSource) -> TensorSource:
    """A source for `path`: a safetensors file, index or directory, a PyTorch `.bin` checkpoint
    (a file, `pytorch_model.bin.index.json`, or a directory with no safetensors), or an Orbax
    checkpoint of a Flax model under its Hugging Face names (`jaxmerge.formats.flax_hf`); an opened
    source as it is."""
    if isinstance(path, TensorSource):
        return path
    from jaxmerge.formats import torch_bin  # noqa: PLC0415 - torch is imported only for .bin checkpoints

    if torch_bin.is_torch_bin(Path(path)):
        return torch_bin.TorchBinCheckpoint(path)
    if _is_flax_orbax(path):
        from jaxmerge.formats.flax_hf import FlaxCheckpoint  # noqa: PLC0415 - Orbax is imported only for these

        return FlaxCheckpoint(path)
    return Checkpoint(path)


def byte_ranges(tensors: Iterable[tuple[TensorSource, str]]) -> list[tuple[Path, int, int]]:
    """The (file, offset, bytes) ranges that reading these (source, tensor name) pairs reads from disk, for
    the engine to read ahead (`jaxmerge.engine._prefetch`). Sources that read their tensors some other way
    (computed, folded, Orbax) have no `byte_range` and add none: they are read without prefetching."""
    ranges = []
    for source, name in tensors:
        byte_range = getattr(source, "byte_range", None)
        found = byte_range(name) if byte_range is not None else None
        if found is not None:
            ranges.append(found)
    return ranges


def _is_flax_orbax(path: str | os.PathLike) -> bool:
    """An Orbax checkpoint, and no safetensors beside it (a directory holding both is read as safetensors)."""
    return is_orbax_checkpoint(path) and not is_safetensors(Path(path))


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint path stands for (safetensors or `.bin`, single or sharded; every file of an
    Orbax checkpoint), for records."""
    from jaxmerge.formats import torch_bin  # noqa: PLC0415

    if _is_flax_orbax(path):
        return sorted(f for f in Path(path).rglob("*") if f.is_file())
    found = torch_bin.resolve_bin_files(path) if torch_bin.is_torch_bin(Path(path)) else resolve_files(path)
    return sorted(set(found.values())) if isinstance(found, dict) else list(found)
