"""Learned and searched merging coefficients.

* `adamerging`: AdaMerging's entropy minimisation over task- or layer-wise
  coefficients (Yang et al., 2024, arXiv:2310.02575), with its TIES variant
  (AdaMerging++).
* `search_coefficients`: a grid search of a method's lambda (and density),
  evaluated in one compiled, vmapped call.
"""

from jaxmerge.learn.adamerging import (
    AdaMergingResult,
    adamerging,
    entropy,
    entropy_loss,
    merge_with_coefficients,
    prepare_task_vectors,
)
from jaxmerge.learn.search import SearchResult, search_coefficients

__all__ = [
    "AdaMergingResult",
    "SearchResult",
    "adamerging",
    "entropy",
    "entropy_loss",
    "merge_with_coefficients",
    "prepare_task_vectors",
    "search_coefficients",
]
