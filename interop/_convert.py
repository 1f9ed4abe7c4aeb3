"""torch <-> JAX conversion through DLPack, without copies where the layout allows."""

from __future__ import annotations

import jax
import torch


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """A JAX array viewing `tensor`'s memory (zero-copy) where possible.

    Zero-copy for contiguous CPU tensors aligned to 64 bytes and for CUDA
    tensors (the array then lives on the matching JAX GPU device). A copy is
    made, and is unavoidable, for non-contiguous views (transposes, slices with
    steps, expands), for misaligned CPU storage (JAX copies it), and for int64
    without x64 (JAX narrows it; ints are best converted to float first).
    Tensors with `requires_grad` are detached: the result carries no autograd history.

    Args:
      tensor: a torch tensor.

    Returns:
      A jax.Array with the same values, shape and dtype.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax expects a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return jax.dlpack.from_dlpack(t)


def to_torch(array: jax.Array) -> torch.Tensor:
    """A torch tensor viewing a JAX array's memory (zero-copy), on the same device.

    Args:
      array: a jax.Array (on CPU or a GPU).

    Returns:
      A torch.Tensor sharing the array's buffer.
    """
    if not isinstance(array, jax.Array):
        raise TypeError(f"to_torch expects a jax.Array, got {type(array).__name__}")
    return torch.from_dlpack(array)
