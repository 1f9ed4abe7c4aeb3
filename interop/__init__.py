"""Torch side of jaxmerge: PEFT's merge API on torch tensors, computed by jaxmerge.

`from interop.merge_utils import ties, dare_ties, ...` is a drop-in for
`from peft.utils.merge_utils import ...`. `to_jax` and `to_torch` convert
through DLPack without copies where the layout allows.
"""

from interop._convert import to_jax, to_torch

__all__ = ["to_jax", "to_torch"]
