"""Drop-in for `peft.utils.merge_utils` (PEFT 0.21): torch tensors in and out, jaxmerge underneath.

Same eleven names, positional and keyword arguments and defaults as PEFT.
What differs, deliberately:

* Random methods draw their JAX key from torch's default generator (or the
  optional keyword-only `generator`), so `torch.manual_seed(s)` before a call
  reproduces the result exactly. The masks are JAX's, not `torch.bernoulli`'s:
  equal in distribution to PEFT's, not element for element.
* Results carry no autograd history (inputs with `requires_grad` are accepted).
* `weights` may also be a Python list (PEFT needs a tensor).
* `random_pruning` with `density=0, rescale=True` returns zeros (PEFT: NaN).
* Integer tensors are computed in float32 (exact up to 2**24 in magnitude).

Returned dtypes equal PEFT's for the same inputs (see the README's table):
pruning keeps the input dtype; weighted merges return the promotion of the
task and weight dtypes; `ties`, `dare_ties` and `disjoint_merge` return at
least float32, because PEFT divides by a float32 count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
import torch

import jaxmerge
from interop._convert import to_jax, to_torch


def _device_of(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> torch.device:
    """The one device all inputs live on; a clear error otherwise."""
    devices = {}
    for t, name in zip(tensors, names):
        devices.setdefault(t.device, name)
    if len(devices) > 1:
        found = ", ".join(f"{name} on {device}" for device, name in devices.items())
        raise ValueError(f"all tensors must be on one device, got {found}")
    return next(iter(devices))


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _task_list(task_tensors, name: str = "task_tensors") -> list[torch.Tensor]:
    if isinstance(task_tensors, torch.Tensor):
        return list(task_tensors.unbind(0)) if task_tensors.dim() > 0 else [task_tensors]
    if not isinstance(task_tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors or a stacked tensor, got {type(task_tensors).__name__}")
    return [_as_tensor(t, f"{name}[{i}]") for i, t in enumerate(task_tensors)]


def _weights_tensor(weights) -> torch.Tensor:
    return weights if isinstance(weights, torch.Tensor) else torch.tensor(weights)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Integers are computed in float32 (JAX narrows int64 without x64)."""
    return dtype if dtype.is_floating_point else torch.float32


def _to_jax_as(t: torch.Tensor, dtype: torch.dtype) -> jax.Array:
    """Zero-copy import, after a dtype conversion where one is needed."""
    if t.dtype == torch.bool:
        raise TypeError("task tensors must hold numbers, got dtype torch.bool (a mask is not a task tensor)")
    return to_jax(t if t.dtype == dtype else t.detach().to(dtype))


def _weights_to_jax(weights: torch.Tensor):
    """Host weights as NumPy (the kernel call moves them; a DLPack import costs ~40 us more)."""
    if weights.device.type == "cpu" and weights.dtype != torch.bfloat16:  # NumPy has no bfloat16
        return weights.numpy()
    return to_jax(weights)


def _jax_key(generator: torch.Generator | None) -> jax.Array:
    """A JAX threefry key from two 32-bit words drawn from torch's generator.

    Drawn from torch's default CPU generator unless `generator` is given, so
    `torch.manual_seed(s)` makes the next call reproducible.
    """
    words = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64)
    return jax.random.wrap_key_data(np.asarray(words.numpy(), np.uint32), impl="threefry2x32")


def _finish(result: jax.Array, dtype: torch.dtype, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Back to torch in PEFT's dtype, never sharing memory with an input."""
    out = to_torch(result)
    if out.dtype != dtype:
        out = out.to(dtype)
    input_pointers = {t.data_ptr() for t in inputs}
    if out.data_ptr() in input_pointers:
        out = out.clone()
    return out


def _merge_dtype(tasks: Sequence[torch.Tensor], weights: torch.Tensor, divides: bool) -> torch.dtype:
    """PEFT's result dtype: tasks * weights promoted (and with float32 when it divides by a count)."""
    dtype = torch.promote_types(tasks[0].dtype, weights.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    if divides:
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reshape `weights` with trailing singleton dims to broadcast against `task_tensors` (as PEFT)."""
    weights = _weights_tensor(weights)
    rank_only = jax.ShapeDtypeStruct(tuple(task_tensors.shape), jax.numpy.float32)
    reshaped = jaxmerge.reshape_weight_task_tensors(rank_only, to_jax(weights))
    return _finish(reshaped, weights.dtype, [weights]).to(weights.device)


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (see `jaxmerge.magnitude_based_pruning`)."""
    tensor = _as_tensor(tensor, "tensor")
    pruned = jaxmerge.magnitude_based_pruning(_to_jax_as(tensor, _compute_dtype(tensor.dtype)), density)
    return _finish(pruned, tensor.dtype, [tensor])


def random_pruning(
    tensor: torch.Tensor, density: float, rescale: bool, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability `density`, optionally rescaled (see `jaxmerge.random_pruning`)."""
    tensor = _as_tensor(tensor, "tensor")
    x = _to_jax_as(tensor, _compute_dtype(tensor.dtype))
    pruned = jaxmerge.random_pruning(x, density, rescale, key=_jax_key(generator))
    dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.float32
    return _finish(pruned, dtype, [tensor])


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PEFT's `prune`: by magnitude or at random; density >= 1 returns a copy of the input, with a warning."""
    tensor = _as_tensor(tensor, "tensor")
    jaxmerge.core._validation.check_choice("method", method, jaxmerge.core._validation.PRUNE_METHODS)
    jaxmerge.core._validation.check_density(density)  # warns, as PEFT, when density >= 1
    if float(density) >= 1:
        return tensor.detach().clone()
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator=generator)


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """Bool mask of entries agreeing with the elected sign (tasks stacked on dim 0)."""
    tensor = _as_tensor(tensor, "tensor")
    jaxmerge.core._validation.check_choice("method", method, jaxmerge.core._validation.SIGN_METHODS)
    mask = jaxmerge.calculate_majority_sign_mask(_to_jax_as(tensor, _compute_dtype(tensor.dtype)), method)
    return _finish(mask, torch.bool, [tensor])


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the task values selected by the mask (dim 0 stacks the tasks)."""
    task_tensors = _as_tensor(task_tensors, "task_tensors")
    majority_sign_mask = _as_tensor(majority_sign_mask, "majority_sign_mask")
    _device_of([task_tensors, majority_sign_mask], ["task_tensors", "majority_sign_mask"])
    dtype = torch.promote_types(_compute_dtype(task_tensors.dtype), torch.float32)
    merged = jaxmerge.disjoint_merge(_to_jax_as(task_tensors, dtype), to_jax(majority_sign_mask))
    return _finish(merged, dtype, [task_tensors, majority_sign_mask])


def _merge(name, task_tensors, weights, *args, divides, generator=None, random=False):
    tasks = _task_list(task_tensors)
    if not tasks:
        raise ValueError("task_tensors must hold at least one task tensor, got an empty sequence")
    weights = _weights_tensor(weights)
    _device_of([*tasks, weights], [f"task_tensors[{i}]" for i in range(len(tasks))] + ["weights"])
    dtype = _merge_dtype(tasks, weights, divides)
    jax_tasks = [_to_jax_as(t, dtype) for t in tasks]
    kwargs = {"key": _jax_key(generator)} if random else {}
    merged = getattr(jaxmerge, name)(jax_tasks, _weights_to_jax(weights.detach().to(dtype)), *args, **kwargs)
    return _finish(merged, dtype, [*tasks, weights])


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of task tensors (see `jaxmerge.task_arithmetic`)."""
    return _merge("task_arithmetic", task_tensors, weights, divides=False)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude-prune each task, then the weighted sum (see `jaxmerge.magnitude_prune`)."""
    return _merge("magnitude_prune", task_tensors, weights, density, divides=False)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES-Merging (see `jaxmerge.ties`)."""
    return _merge("ties", task_tensors, weights, density, majority_sign_method, divides=True)


def dare_linear(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale, then the weighted sum; randomness from torch's generator."""
    return _merge("dare_linear", task_tensors, weights, density, divides=False, generator=generator, random=True)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES' election and disjoint merge; randomness from torch."""
    return _merge(
        "dare_ties", task_tensors, weights, density, majority_sign_method,
        divides=True, generator=generator, random=True,
    )


__all__ = list(jaxmerge.PEFT_FUNCTIONS)
