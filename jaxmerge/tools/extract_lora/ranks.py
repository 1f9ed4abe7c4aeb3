"""Rank rules of `jaxmerge extract-lora` (beyond mergekit): a rank per module from its spectrum.

`--rank-by energy:F` keeps, per module, the smallest rank whose singular values hold >= F of the
task vector's energy; `--rank-budget N` spends N LoRA parameters where they remove the most error
(`allocate_budget`). Both rest on Eckart & Young (1936): the best rank-k approximation keeps
exactly the top k singular values, so rank k removes sigma_k^2 from the squared Frobenius error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["ENERGY_RTOL", "RankRule", "Spectrum", "allocate_budget", "check_budget", "choose_ranks", "energy_rank",
           "rank_rule"]


def _rank_above(s, rank: int, sv_epsilon: float) -> int:
    """`rank` lowered to the number of singular values above `sv_epsilon` (mergekit's --sv-epsilon; 0: off)."""
    return rank if sv_epsilon <= 0 else min(rank, int(np.sum(np.asarray(s) > sv_epsilon)))


# Energies are compared with this relative slack: the kept and total energies are float32 sums
# (relative round-off ~4e-8 measured on a 5632 x 2048 matrix), so `energy:1` on a delta of exact
# rank k gives k rather than the cap; a threshold F is met by energies >= F (1 - 1e-6).
ENERGY_RTOL = 1e-6


@dataclass(frozen=True)
class RankRule:
    """How each module's rank is chosen (always capped by max-rank and, when > 0, sv-epsilon).

    Attributes:
      kind: "max-rank" (mergekit's: every module min(max-rank, min(m, n))), "energy" or "budget".
      energy: for "energy": the fraction of each task vector's energy kept, in (0, 1].
      budget: for "budget": the total LoRA parameters, sum over modules of rank * (rows + cols).
    """

    kind: str = "max-rank"
    energy: float = 0.0
    budget: int = 0

    @property
    def needs_spectrum(self) -> bool:
        """The ranks depend on singular values: a first pass computes them before any factor."""
        return self.kind != "max-rank"

    def describe(self, max_rank: int, sv_epsilon: float = 0.0) -> str:
        """One line for the report and the card, e.g. "energy >= 0.9 per module, at most rank 128"."""
        if self.kind == "energy":
            text = f"energy >= {self.energy:g} per module (smallest rank keeping it), at most rank {max_rank}"
        elif self.kind == "budget":
            text = (f"budget of {self.budget} LoRA parameters (sum of rank x (rows + cols)), spent greedily by "
                    f"error removed per parameter, at most rank {max_rank} per module")
        else:
            text = f"max-rank {max_rank} (min(max-rank, min(rows, cols)) per module)"
        return text + (f", singular values > {sv_epsilon:g}" if sv_epsilon > 0 else "")


def rank_rule(rank_by: str | None = None, rank_budget: int | None = None) -> RankRule:
    """The rule for `--rank-by TEXT` / `--rank-budget N` (at most one of them).

    Args:
      rank_by: None or "max-rank" (mergekit's fixed rank), or "energy:F" with 0 < F <= 1: per module,
        the smallest rank whose singular values keep >= F of the task vector's energy
        (sum of squared singular values / squared Frobenius norm).
      rank_budget: a total of LoRA parameters (>= 1) spread over the modules (`allocate_budget`).

    Returns:
      The `RankRule`.

    Raises:
      ValueError: both given, unknown rule text, F outside (0, 1], or a budget below 1 (one line).
    """
    if rank_by is not None and rank_budget is not None:
        raise ValueError("give --rank-by or --rank-budget, not both")
    if rank_budget is not None:
        if isinstance(rank_budget, bool) or not isinstance(rank_budget, (int, np.integer)) or rank_budget < 1:
            raise ValueError(f"--rank-budget must be a number of LoRA parameters >= 1, got {rank_budget!r}")
        return RankRule("budget", budget=int(rank_budget))
    if rank_by is None or str(rank_by).strip() == "max-rank":
        return RankRule()
    name, sep, value = str(rank_by).strip().partition(":")
    if name.strip() != "energy" or not sep:
        raise ValueError(f"--rank-by {rank_by!r} is not a rule: use energy:F (0 < F <= 1, e.g. energy:0.9) or max-rank")
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:  # also refuses nan
        raise ValueError(f"--rank-by {rank_by!r}: the energy kept must be a fraction in (0, 1], e.g. energy:0.9")
    return RankRule("energy", energy=fraction)


class Spectrum(NamedTuple):
    """What the rank rules know of one module before its factors are computed."""

    values: np.ndarray  # its top `cap` singular values, descending (cap = min(max-rank, min(m, n)))
    total: float  # ||delta||_F^2, the task vector's energy
    cost: int  # LoRA parameters per unit of rank: rows + cols of the decomposed matrix


def energy_rank(values: np.ndarray, total: float, fraction: float) -> int:
    """The smallest k with sum(values[:k]^2) >= fraction * total (Eckart-Young: the best rank-k
    approximation keeps exactly the top k singular values' energy), or len(values) where even all
    of them fall short (the cap decides). 0 for a zero delta.

    Args:
      values: singular values, descending.
      total: the squared Frobenius norm of the matrix.
      fraction: the energy to keep, in (0, 1].

    Returns:
      The rank.
    """
    if total <= 0:
        return 0
    kept = np.cumsum(np.asarray(values, np.float64) ** 2)
    enough = np.flatnonzero(kept >= fraction * total * (1 - ENERGY_RTOL))
    return int(enough[0]) + 1 if enough.size else len(kept)


def allocate_budget(spectra: Sequence[Spectrum], budget: int) -> list[int]:
    """Ranks that spend at most `budget` LoRA parameters where they remove the most error.

    Rank k of a module costs `cost` (rows + cols) parameters and, by Eckart-Young, removes
    sigma_k^2 from the squared Frobenius error. Each candidate rank is taken in decreasing order of
    error removed per parameter, sigma_k^2 / cost, when it still fits; a module's sigmas are
    non-increasing, so its ranks are taken in order (a prefix) and the result is a set of ranks.

    Optimality (a separable problem with non-increasing marginal gains): the ranks taken up to the
    first one that does not fit are the optimum of the continuous relaxation at the parameters they
    spend, hence the best allocation of that many parameters (Dantzig's greedy for the fractional
    knapsack). When every module has the same rows + cols, that is the optimum for `budget` itself.
    Otherwise integer costs can leave budget that no allocation of the same ranks fills; the ranks
    that still fit are then added, and the result is within one rank's gain (the first that did not
    fit) of the best allocation of `budget`.

    Args:
      spectra: per module, its `Spectrum` (values capped by max-rank, sv-epsilon applied).
      budget: the parameters to spend (>= 1).

    Returns:
      Each module's rank, in `spectra`'s order (0: the module is not worth its parameters).
    """
    candidates = [(-(float(s) ** 2) / sp.cost, i, k) for i, sp in enumerate(spectra)
                  for k, s in enumerate(np.asarray(sp.values, np.float64)) if s > 0]
    candidates.sort()  # best ratio first; ties by module, then rank (keeps each module's ranks in order)
    ranks = [0] * len(spectra)
    left = int(budget)
    for _, i, k in candidates:
        cost = spectra[i].cost
        if k == ranks[i] and cost <= left:  # a later rank of a module whose earlier one did not fit never fits
            ranks[i] += 1
            left -= cost
    return ranks


def choose_ranks(rule: RankRule, spectra: dict[str, Spectrum], sv_epsilon: float = 0.0) -> dict[str, int]:
    """Each module's rank under `rule`, from the first pass's spectra.

    Args:
      rule: the `RankRule`.
      spectra: module -> `Spectrum` (values already capped at min(max-rank, min(m, n))).
      sv_epsilon: when > 0, singular values <= it are never kept (mergekit's --sv-epsilon), whatever the rule.

    Returns:
      module -> rank (0: nothing kept; the module is dropped).
    """
    capped = {name: sp._replace(values=np.asarray(sp.values)[: _rank_above(sp.values, len(sp.values), sv_epsilon)])
              for name, sp in spectra.items()}
    if rule.kind == "energy":
        return {name: energy_rank(sp.values, sp.total, rule.energy) for name, sp in capped.items()}
    if rule.kind == "budget":
        return dict(zip(capped, allocate_budget(list(capped.values()), rule.budget)))
    return {name: len(sp.values) for name, sp in capped.items()}


def check_budget(rule: RankRule, costs: dict[str, int]) -> None:
    """Refuse a budget that cannot pay for rank 1 of even the cheapest module (before any SVD).

    Raises:
      ValueError: one line naming the cheapest module and its cost.
    """
    if rule.kind != "budget" or not costs:
        return
    name = min(costs, key=costs.get)
    if rule.budget < costs[name]:
        raise ValueError(f"--rank-budget {rule.budget} is below the smallest module's cost: rank 1 of {name} takes "
                         f"{costs[name]} LoRA parameters (rows + cols)")
