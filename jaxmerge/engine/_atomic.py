"""Write a whole output directory or nothing: build it beside the target, rename it into place.

The rules every writer gets from `atomic_directory`:

* The output is built in a temporary directory beside it,
  `.<name>.jaxmerge-tmp-<host>-<pid>-<token>`, and renamed into place only when complete.
  A run killed with SIGKILL leaves that temporary behind; the next jaxmerge run
  writing anywhere in the same directory removes it (its process is gone).
* Without `force` the final rename never replaces anything: two merges racing
  for one output both work, exactly one rename wins, the other fails with
  FileExistsError and removes its temporary. On Linux the kernel decides
  (renameat2 with RENAME_NOREPLACE); elsewhere, or on file systems that lack
  it, the name is claimed first with `mkdir` (exclusive on every POSIX system)
  and the complete temporary is renamed over that empty claim.
* With `force` an existing output is swapped out atomically (renameat2 with
  RENAME_EXCHANGE where supported) and removed only once the new one is in
  place. An output path that is a symbolic link is replaced itself: the link
  is removed and the directory it pointed to is left exactly as it was (the
  user's data is never deleted through a link).
* Errors of the file system (read-only, full, no permission) become one
  `CheckpointError` naming the output and the cause; with `expected_bytes` the
  free space is checked before anything is written.
* SIGTERM stops the writer at the next tensor: one line on stderr says what was
  interrupted and that nothing was written, and the process exits with 143.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from jaxmerge.formats.safetensors_io import CheckpointError

_TMP_TAG = ".jaxmerge-tmp-"
_OLD_TAG = ".jaxmerge-old-"
# The host goes into the temporary's name so that a run never removes another
# machine's live temporary on a shared file system (its pid means nothing here).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


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


def temporary_name(target: Path) -> Path:
    """A fresh name to build the output `target` in: `.<name>.jaxmerge-tmp-<host>-<pid>-<token>`
    (the token keeps two writers of one process, threads say, apart)."""
    return target.parent / f".{target.name}{_TMP_TAG}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner(leftover: Path) -> tuple[str, int] | None:
    """(host, pid) of a temporary's name, or None when it is not one of ours."""
    parts = leftover.name.rsplit(_TMP_TAG, 1)[1].split("-")
    if len(parts) == 1 and parts[0].isdigit():  # `<pid>`: older versions, on this host
        return _HOST, int(parts[0])
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries that dead jaxmerge runs (SIGKILL, power loss) left in `target`'s directory.

    Any output's temporary in the directory is removed when it was made on this
    host by a process that no longer runs; live runs and other hosts' are kept.
    """
    try:
        leftovers = list(target.parent.glob(f".*{_TMP_TAG}*"))
    except OSError:
        return
    for leftover in leftovers:
        owner = _owner(leftover)
        if owner is None or owner[0] != _HOST or owner[1] == os.getpid() or _pid_alive(owner[1]):
            continue
        _remove(leftover)


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree; errors are ignored."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


# --- renaming without replacing ------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when the system or file system lacks it.

    Raises:
      OSError: the rename failed (FileExistsError for RENAME_NOREPLACE onto an existing name).
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` only if `target` does not exist (FileExistsError otherwise)."""
    if _rename_flags(tmp, target, _RENAME_NOREPLACE):
        return
    # Portable fallback: mkdir is exclusive, and rename(2) may replace only an empty directory.
    os.mkdir(target)
    try:
        os.rename(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(target)  # our empty claim, unless someone wrote into it meanwhile
        raise


def _replace(tmp: Path, target: Path) -> None:
    """Put `tmp` in place of `target`, whatever `target` is; the old entry is removed afterwards."""
    for _ in range(3):  # another writer may remove or create `target` between the steps
        if os.path.lexists(target):
            try:
                if _rename_flags(tmp, target, _RENAME_EXCHANGE):
                    _remove(tmp)  # it now holds the previous output (or the link)
                    return
                old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}"
                os.rename(target, old)
            except FileNotFoundError:
                continue
            try:
                _place(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    _place(old, target)  # put the previous output back
                raise
            _remove(old)
            return
        try:
            _place(tmp, target)
            return
        except FileExistsError:
            continue
    raise FileExistsError(f"{target} keeps being replaced by another process")


# --- SIGTERM ---------------------------------------------------------------------------------

_terminate = threading.Event()
_completed: set[Path] = set()  # outputs placed by atomic_directory in this process


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


def _say(line: str) -> None:
    print(f"jaxmerge: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sigterm_before_writing(output: str | os.PathLike) -> Iterator[None]:
    """For the command line's planning phase: SIGTERM prints one line and exits 143 at once.

    Before `atomic_directory` starts nothing exists to clean up, so the handler
    exits directly (os._exit: no Python code runs after it). `atomic_directory`
    installs its own handler while it writes and puts this one back after; a
    SIGTERM after the output was placed says the output is kept.
    """
    def handler(signum, frame):
        if Path(output).absolute() in _completed:  # the merge finished between atomic_directory and return
            _say(f"SIGTERM arrived after {output} was complete; the output is kept")
        else:
            _say(f"interrupted by SIGTERM before writing {output}; nothing was written")
        os._exit(128 + signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the context manager -----------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _write_error(target: Path, err: OSError) -> CheckpointError:
    cause = err.strerror or str(err)
    name = str(err.filename or "")
    # A file of the output (or its temporary) adds nothing to the output's name; an input's would.
    where = f" ({name})" if name and _TMP_TAG not in name and Path(name) != target else ""
    return CheckpointError(f"{target}: cannot write the output: {cause}{where}; nothing was written")


def check_free_space(target: Path, expected_bytes: int) -> None:
    """Raise CheckpointError when `target`'s directory has less than `expected_bytes` free."""
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return  # no statistics (some network file systems): the writes will tell
    if free < expected_bytes:
        raise CheckpointError(
            f"{target}: not enough free space: the output needs {_size(expected_bytes)}, "
            f"{target.parent} has {_size(free)} free; nothing was written"
        )


def checked_target(target: str | os.PathLike, force: bool) -> Path:
    """`target` made absolute; FileExistsError when it exists and `force` is False."""
    target = Path(target).absolute()
    if os.path.lexists(target) and not force:
        raise FileExistsError(f"{target} exists; pass --force (force=True) to replace it")
    return target


def make_temporary(target: Path, tmp: Path, expected_bytes: int | None = None) -> None:
    """Create `tmp` beside `target` (and `target`'s directory), after removing stale temporaries.

    Raises:
      CheckpointError: one line naming `target` and the cause (no room for
        `expected_bytes`, a read-only or full file system, no permission).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"{target}: cannot create the output's directory {target.parent}: {err.strerror or err}"
        ) from None
    remove_stale_temporaries(target)
    if expected_bytes is not None:
        check_free_space(target, expected_bytes)
    try:
        tmp.mkdir()
    except OSError as err:
        raise _write_error(target, err) from None


def move_into_place(tmp: Path, target: Path, force: bool) -> None:
    """Rename the complete `tmp` to `target` (replacing it with `force`); on failure `tmp` is removed.

    Raises:
      FileExistsError: `target` appeared meanwhile and `force` is False.
      CheckpointError: the file system refused (one line naming `target`).
    """
    try:
        (_replace if force else _place)(tmp, target)
    except FileExistsError:
        _remove(tmp)
        raise FileExistsError(
            f"{target} was created by another process while this merge ran; nothing was written "
            "(pass --force to replace it)"
        ) from None
    except OSError as err:
        _remove(tmp)
        raise _write_error(target, err) from None


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike, *, force: bool = False, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block completes.

    Args:
      target: the output directory.
      force: replace an existing `target` (it is removed only after the new one
        is in place; a symbolic link is replaced itself, its target left untouched).
      expected_bytes: the output's planned size: the free space of `target`'s
        directory is checked against it before anything is written.

    Raises:
      FileExistsError: `target` exists (or appeared while the block ran) and `force` is False.
      CheckpointError: the file system refused (read-only, full, no permission):
        one line naming `target` and the cause; the temporary is removed.
      SystemExit(143): SIGTERM arrived (one line on stderr says so).
    """
    target = checked_target(target, force)
    with _sigterm_recorded():
        tmp = temporary_name(target)
        make_temporary(target, tmp, expected_bytes)
        try:
            yield tmp
            stop_if_terminated()
        except BaseException as err:
            _remove(tmp)
            if _terminate.is_set():
                _say(f"interrupted by SIGTERM while writing {target}; nothing was written")
                raise SystemExit(128 + signal.SIGTERM) from None
            if isinstance(err, OSError):
                raise _write_error(target, err) from None
            raise
        move_into_place(tmp, target, force)
        _completed.add(target)
        if _terminate.is_set():
            _say(f"SIGTERM arrived after {target} was complete; the output is kept")
            raise SystemExit(128 + signal.SIGTERM)
