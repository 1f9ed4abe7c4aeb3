"""Merging one checkpoint with several processes, on one host or many, over JAX's distributed runtime.

A model of hundreds of GB needs more than one machine's disks and cores. With
`jax.distributed.initialize` (`initialize` here, or the cluster's own
auto-detection), N processes reading the same inputs from shared storage each
merge a disjoint share of the output shards (`assign_shards`: whole shards,
largest first, to the process with the fewest bytes so far) and write them into
one temporary directory beside the output (`shared_atomic_directory`). When
every process has succeeded, process 0 writes the index, the recipe and the
model files and renames the directory into place; if any process fails,
nothing is placed and every process reports it. Each tensor is merged exactly
as in one process (same plan, same per-tensor keys), so the output is bit for
bit that of a one-process merge.

The runtime is JAX's own: the coordination (barriers, the temporary's name,
success flags) goes through `jax.experimental.multihost_utils`; no scheduler
of ours. A shard is the unit of work, so N processes need at least N output
shards to all be busy (`--max-shard-size`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxmerge.engine._atomic import _HOST, _TMP_TAG, _remove, _write_error, checked_target, make_temporary, move_into_place
from jaxmerge.formats.safetensors_io import CheckpointError


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a group of `num_processes` merging processes (`jax.distributed.initialize`).

    Args:
      coordinator: "host:port" of process 0's coordination service (every process gives the same).
      num_processes: the group's size.
      process_id: this process's index, 0 .. num_processes - 1.

    Raises:
      CheckpointError: a bad value (named), before anything starts.
    """
    if not isinstance(coordinator, str) or ":" not in coordinator:
        raise CheckpointError(f"--coordinator must be host:port, got {coordinator!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise CheckpointError(f"--num-processes must be an integer >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise CheckpointError(f"--process-id must be in [0, {num_processes - 1}], got {process_id!r}")
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or jax.default_backend() == "cpu":
        # CPU processes exchange the coordination values through gloo (JAX's CPU collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


@dataclass(frozen=True)
class Processes:
    """This process's place in the group, and the group's coordination primitives."""

    index: int
    count: int

    def all_true(self, flag: bool) -> bool:
        """Every process's `flag` is true (a barrier: each process waits for all)."""
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
        return bool(np.asarray(flags).all())

    def from_first(self, values: np.ndarray) -> np.ndarray:
        """Process 0's `values` on every process (same shape and dtype everywhere)."""
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(values))


def current() -> Processes | None:
    """The group this process belongs to, or None when it merges alone."""
    import jax

    if jax.process_count() <= 1:
        return None
    return Processes(jax.process_index(), jax.process_count())


def assign_shards(shard_bytes: Sequence[int], count: int) -> list[int]:
    """The process of each output shard: largest first, to the least-loaded process (lowest index on ties).

    Deterministic: every process computes the same assignment from the same plan.
    """
    loads = [0] * count
    owner = [0] * len(shard_bytes)
    for shard in sorted(range(len(shard_bytes)), key=lambda s: (-shard_bytes[s], s)):
        process = min(range(count), key=lambda p: (loads[p], p))
        owner[shard] = process
        loads[process] += shard_bytes[shard]
    return owner


def _shared_name(target: Path, processes: Processes) -> Path:
    """Process 0's temporary name (its host and pid, as `temporary_name`), known to every process."""
    host = _HOST.encode()[:64].ljust(64, b" ")
    mine = np.frombuffer(host, np.uint8).astype(np.int32)
    numbers = np.asarray([os.getpid(), secrets.randbits(31)], np.int64)
    host0 = bytes(processes.from_first(mine).astype(np.uint8)).decode().rstrip()
    pid0, token = (int(x) for x in processes.from_first(numbers))
    return target.parent / f".{target.name}{_TMP_TAG}{host0}-{pid0}-{token:08x}"


@contextlib.contextmanager
def shared_atomic_directory(
    target: str | os.PathLike, processes: Processes, *, force: bool = False, finalize: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """`jaxmerge.engine._atomic.atomic_directory` for a group: every process writes into one temporary.

    Every process enters and leaves together. After the block, if every
    process succeeded, process 0 calls `finalize(tmp)` (the index and the model
    files) and moves the directory into place; otherwise process 0 removes it.

    Raises:
      FileExistsError: `target` exists and `force` is False (every process sees it).
      CheckpointError: the temporary could not be made, or another process
        failed (this process's own error is re-raised as it was).
    """
    target = checked_target(target, force)
    tmp = _shared_name(target, processes)
    made = None
    if processes.index == 0:
        try:
            make_temporary(target, tmp)
        except CheckpointError as err:
            made = err
    if not processes.all_true(made is None):
        raise made or CheckpointError(f"{target}: process 0 could not create the temporary output {tmp}")
    error: BaseException | None = None
    try:
        yield tmp
    except BaseException as err:  # noqa: BLE001 - every process must reach the vote below
        error = err
    if not processes.all_true(error is None):
        if processes.index == 0:
            _remove(tmp)
        processes.all_true(True)  # the temporary is gone before anyone reports
        if isinstance(error, OSError):
            raise _write_error(target, error) from None
        if error is not None:
            raise error
        raise CheckpointError(f"{target}: another merging process failed; nothing was written")
    if processes.index == 0:
        try:
            if finalize is not None:
                finalize(tmp)
        except BaseException as err:  # noqa: BLE001 - every process must reach the vote below
            _remove(tmp)
            error = err
        else:
            try:
                move_into_place(tmp, target, force)  # removes tmp itself on failure
            except BaseException as err:  # noqa: BLE001
                error = err
    if not processes.all_true(error is None):
        if error is not None:
            raise error
        raise CheckpointError(f"{target}: process 0 could not finish the output; nothing was written")
