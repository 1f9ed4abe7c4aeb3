"""Argument checks shared by every public function.

Each check raises before any device work starts, with a message that names the
argument and the offending value, so a bad call fails fast and says why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PRUNE_METHODS = ("magnitude", "random")
SIGN_METHODS = ("total", "frequency")


def is_concrete(value: Any) -> bool:
    """True when `value` is known now (not a tracer inside someone's `jax.jit`)."""
    return not isinstance(value, jax.core.Tracer)


def check_density(density: Any) -> Any:
    """Validate a density and warn, as PEFT does, when it disables pruning.

    Args:
      density: a Python number, a NumPy/JAX scalar, or a traced scalar.

    Returns:
      `density` unchanged. Traced densities cannot be inspected and pass as they are.

    Raises:
      ValueError: density is negative or NaN.
      TypeError: density is not a scalar.
    """
    if not is_concrete(density):
        if jnp.ndim(density) != 0:
            raise TypeError(f"density must be a scalar, got an array of shape {jnp.shape(density)}")
        return density
    # float("0.5") would succeed: a string (or a bool) is a caller's mistake, not a density.
    if isinstance(density, (str, bytes, bool, np.bool_)):
        raise TypeError(f"density must be a number, got {type(density).__name__} {density!r}")
    if np.ndim(density) != 0:
        raise TypeError(f"density must be a scalar, got an array of shape {np.shape(density)}")
    kind = getattr(density, "dtype", None)
    if kind is not None and np.dtype(kind).kind not in "iuf" and not jnp.issubdtype(kind, jnp.floating):
        raise TypeError(f"density must be a number, got dtype {kind}")
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise TypeError(f"density must be a number, got {density!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"density must be in [0, 1], got density={density!r}")
    if value >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            UserWarning,
            stacklevel=3,
        )
    return density


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")
    return value


def check_key(key: Any, name: str = "key") -> jax.Array:
    """Validate a PRNG key: a typed `jax.random.key` or a legacy uint32[2] key."""
    if key is None:
        raise ValueError(
            f"{name} is required for random pruning: pass {name}=jax.random.key(seed) "
            "so that the result is reproducible"
        )
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be a single key, got a key array of shape {key.shape}")
        return key
    arr = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if arr.dtype != jnp.uint32 or arr.ndim != 1:
        raise TypeError(
            f"{name} must be a jax.random.key(...) or a legacy uint32 key, got {type(key).__name__} "
            f"with dtype {getattr(arr, 'dtype', None)} and shape {getattr(arr, 'shape', None)}"
        )
    return jax.random.wrap_key_data(arr)


def as_float_array(x: Any, name: str) -> jax.Array:
    """Turn one task tensor into a JAX array of a floating dtype.

    Integer inputs are promoted to float32 (PEFT effectively computes them in
    float once weights or masks touch them). Booleans are rejected: a mask is not
    a task vector.
    """
    arr = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if arr.dtype == jnp.bool_:
        raise TypeError(f"{name} must hold numbers, got dtype bool (a mask is not a task tensor)")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


def as_tasks(task_tensors: Any) -> tuple[jax.Array, ...] | jax.Array:
    """Validate `task_tensors`: a sequence of same-shape arrays, or one array stacked on axis 0.

    A stacked array is returned as it is (the kernels index it inside `jit`, so
    no per-task copy is made); a sequence comes back as a tuple of arrays of
    one floating dtype.

    Raises:
      ValueError: empty input, or tasks whose shapes differ (both shapes named).
      TypeError: not an array or a sequence of arrays, or boolean data.
    """
    if isinstance(task_tensors, (list, tuple)):
        if len(task_tensors) == 0:
            raise ValueError("task_tensors must hold at least one task tensor, got an empty sequence")
        tasks = tuple(as_float_array(t, f"task_tensors[{i}]") for i, t in enumerate(task_tensors))
        first = tasks[0]
        for i, t in enumerate(tasks[1:], start=1):
            if t.shape != first.shape:
                raise ValueError(
                    f"task_tensors must all have one shape: task_tensors[0] has shape {first.shape}, "
                    f"task_tensors[{i}] has shape {t.shape}"
                )
        dtype = jnp.result_type(*tasks)
        return tuple(t if t.dtype == dtype else t.astype(dtype) for t in tasks)
    if isinstance(task_tensors, (jax.Array, np.ndarray)):
        stacked = as_float_array(task_tensors, "task_tensors")
        if stacked.ndim == 0 or stacked.shape[0] == 0:
            raise ValueError(
                f"task_tensors stacked on axis 0 must hold at least one task, got shape {stacked.shape}"
            )
        return stacked
    raise TypeError(
        "task_tensors must be a list or tuple of arrays, or one array with tasks on axis 0, "
        f"got {type(task_tensors).__name__}"
    )


def is_partitioned(*arrays) -> bool:
    """True when a concrete input spans several devices (static choice of partition-friendly code)."""
    for a in arrays:
        for x in a if isinstance(a, tuple) else (a,):
            if isinstance(x, jax.Array) and is_concrete(x) and len(x.sharding.device_set) > 1:
                return True
    return False


def num_tasks(tasks: tuple[jax.Array, ...] | jax.Array) -> int:
    return len(tasks) if isinstance(tasks, tuple) else tasks.shape[0]


def task_shape(tasks: tuple[jax.Array, ...] | jax.Array) -> tuple[int, ...]:
    return tasks[0].shape if isinstance(tasks, tuple) else tasks.shape[1:]


def unstack(tasks: tuple[jax.Array, ...] | jax.Array) -> tuple[jax.Array, ...]:
    """One array per task (inside `jit` the slices fuse into their consumers)."""
    return tasks if isinstance(tasks, tuple) else tuple(tasks[i] for i in range(tasks.shape[0]))


def as_weights(weights: Any, num_tasks: int) -> jax.Array:
    """Validate per-task weights: a 1-D array or a sequence with one weight per task."""
    try:
        # Host weights stay NumPy: the kernel call moves them (an eager transfer costs more).
        w = weights if isinstance(weights, jax.Array) else np.asarray(weights)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence of numbers or a 1-D array, got {weights!r}") from None
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D with one weight per task, got shape {w.shape}")
    if w.shape[0] != num_tasks:
        raise ValueError(
            f"weights must have one weight per task: got {w.shape[0]} weights for {num_tasks} task tensors"
        )
    if w.dtype == jnp.bool_ or not (
        jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)
    ):
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    return w


def warn_if_half_overflow(result: Any, name: str = "the merged tensor") -> Any:
    """Warn when a float16 result holds inf: the merge is computed in float32 and
    its value exceeded float16's range (|x| > 65504) when cast back, or an input held inf.

    PEFT, given float32 weights, returns such a result in float32; jaxmerge keeps
    the inputs' dtype, so the warning says how to keep the values (merge float32
    copies). Only concrete float16 results are checked (bfloat16 has float32's
    range; traced results cannot be inspected), so other dtypes cost nothing.

    Args:
      result: the merged array.
      name: what to call it in the warning.

    Returns:
      `result` unchanged.
    """
    if (
        isinstance(result, jax.Array)
        and is_concrete(result)
        and result.dtype == jnp.float16
        and bool(jnp.isinf(result).any())
    ):
        warnings.warn(
            f"{name} holds inf in float16: the weighted merge exceeds float16's range (65504) or an input "
            "holds inf; merge float32 copies (x.astype(jnp.float32)) to keep finite values",
            RuntimeWarning,
            stacklevel=3,
        )
    return result
