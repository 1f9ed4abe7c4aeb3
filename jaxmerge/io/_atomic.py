"""Write a whole output directory or nothing: build it beside the target, rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

_TMP_TAG = ".jaxmerge-tmp-"


def lies_inside(output: str | os.PathLike, source: str | os.PathLike) -> bool:
    """True when writing `output` would write into (or over) an input: `source` itself,
    or, for a directory, anywhere below it."""
    out, src = Path(output).resolve(), Path(source).resolve()
    return out == src or (src.is_dir() and src in out.parents)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries of earlier runs on `target` whose process is gone (killed with SIGKILL, say)."""
    for leftover in target.parent.glob(f".{target.name}{_TMP_TAG}*"):
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


_terminate = threading.Event()


def stop_if_terminated() -> None:
    """Raise SystemExit(143) if SIGTERM arrived; writers call this between tensors.

    The signal handler only records the request: an exception raised inside a
    handler can land in a callback whose exceptions Python ignores (JAX's
    garbage-collection hook, say) and be lost.
    """
    if _terminate.is_set():
        raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_recorded() -> Iterator[None]:
    """Record SIGTERM for `stop_if_terminated` (handlers can only be set in the main thread)."""
    _terminate.clear()
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _terminate.set())
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block completes.

    Args:
      target: the output directory.
      force: replace an existing `target` (it is removed only after the new one is in place).

    Raises:
      FileExistsError: `target` exists and `force` is False.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force (force=True) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _sigterm_recorded():
            yield tmp
            stop_if_terminated()
            if target.exists():
                old = target.parent / f".{target.name}.jaxmerge-old-{os.getpid()}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
