"""jaxmerge: model merging (TIES, DARE, task arithmetic) as pure, jitted JAX functions.

Every function of `peft.utils.merge_utils` (PEFT 0.21) under the same name, with
the same arguments; random methods take an explicit keyword-only `key`.
"""

__version__ = "0.1.0"  # first: modules below read it while jaxmerge is being imported

from jaxmerge.core.merging import (
    dare_linear,
    dare_ties,
    magnitude_prune,
    reshape_weight_task_tensors,
    task_arithmetic,
    ties,
)
from jaxmerge.core.pruning import magnitude_based_pruning, prune, random_pruning
from jaxmerge.learn import adamerging, search_coefficients
from jaxmerge.methods.pytree import merge_params
from jaxmerge.core.sign import calculate_majority_sign_mask, disjoint_merge
from jaxmerge.tools.extract_lora import LoraFactors, extract_lora


# The eleven functions of peft.utils.merge_utils, by name (interop mirrors them).
PEFT_FUNCTIONS = (
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_based_pruning",
    "magnitude_prune",
    "prune",
    "random_pruning",
    "reshape_weight_task_tensors",
    "task_arithmetic",
    "ties",
)

__all__ = [*PEFT_FUNCTIONS, "LoraFactors", "adamerging", "extract_lora", "merge_params", "search_coefficients", "PEFT_FUNCTIONS"]
