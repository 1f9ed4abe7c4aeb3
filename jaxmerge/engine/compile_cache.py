"""A persistent XLA compilation cache for the command line: the second run of a merge skips compiling.

JAX compiles each kernel once per process (per shape and dtype). A merge of a
Llama-shaped model compiles a dozen kernels; on a CPU that is seconds, often
more than the merge itself. With `enable_compile_cache()` the compiled
executables are kept on disk and later processes load them instead.

The directory is `$JAXMERGE_COMPILE_CACHE_DIR`, else
`$XDG_CACHE_HOME/jaxmerge/xla`, else `~/.cache/jaxmerge/xla`.
`JAXMERGE_COMPILE_CACHE=0` turns the cache off. A cache directory set for JAX
itself (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update("jax_compilation_cache_dir", ...)`)
is left as it is.

JAX's warning holds: the cache is trusted (a loaded executable runs as code),
so the directory is created private to the user (mode 0700) and must not be
writable by others.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

_OFF = {"0", "false", "no", "off"}


def default_cache_dir() -> Path:
    """$JAXMERGE_COMPILE_CACHE_DIR, else $XDG_CACHE_HOME/jaxmerge/xla, else ~/.cache/jaxmerge/xla."""
    explicit = os.environ.get("JAXMERGE_COMPILE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / "jaxmerge" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Keep JAX's compiled kernels on disk so that later processes load instead of compiling.

    Call it before the first JAX computation of the process (the command line
    does so first thing): JAX decides once per process whether to use a cache.
    Every kernel is cached, however fast it compiled (the merge kernels take
    0.1-2 s each on a CPU).

    Args:
      path: the cache directory; None: `default_cache_dir()`.

    Returns:
      The directory in use, or None when the cache is off: JAXMERGE_COMPILE_CACHE=0,
      or the directory cannot be created (logged; the merge runs uncached).
      When JAX's own cache directory is set already, that one is used and returned.
    """
    if os.environ.get("JAXMERGE_COMPILE_CACHE", "").strip().lower() in _OFF:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        logger.warning("compilation cache off: cannot create %s (%s)", directory, err.strerror or err)
        return None
    if not os.access(directory, os.W_OK):
        logger.warning("compilation cache off: %s is not writable", directory)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no size floor (JAX's default of 0 lets it pick one); our kernels' executables are small.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX decides whether to use a cache at its first compilation: forget a decision taken before now.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return directory
