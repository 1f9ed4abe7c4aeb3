"""Task-vector methods: linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, magnitude pruning.

All but `linear` merge task vectors `model - base` with the one kernel of
`jaxmerge.core.merging` (sparsify, weight, optional sign election, sum,
optional normalisation, lambda) and return `base + merged`. Their semantics
are a parameter, `semantics`:

* "mergekit" (what a mergekit recipe means; mergekit 0.1.5's
  `GeneralizedTaskArithmeticMerge`): the deltas are weighted before the sign
  vote; `normalize` divides by the sum of the (agreeing) weights; `rescale`
  restores each sparsified tensor's L1 norm; magnitude pruning keeps
  `max(1, int(density * n))` entries.
* "peft" (the Python core's functions, `peft.utils.merge_utils`): the vote is
  on the unweighted pruned deltas and TIES divides by the number of agreeing
  tasks; DARE rescales by 1/density; pruning keeps `int(density * n)`.

On equal weights of 1 both give the same TIES.

Papers: linear / model soups (Wortsman et al., 2022, arXiv:2203.05482); task
arithmetic (Ilharco et al., 2023, arXiv:2212.04089); TIES (Yadav et al., 2023,
arXiv:2306.01708); DARE (Yu et al., 2023, arXiv:2311.03099); Model Breadcrumbs
(Davari & Belilovsky, 2023, arXiv:2312.06795); DELLA (Deep et al., 2024,
arXiv:2406.11617).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxmerge.core import merging
from jaxmerge.core._dtypes import compute_dtype, count_dtype
from jaxmerge.core._kernels import kernel
from jaxmerge.core.merging import Rule
from jaxmerge.methods._table import BasePolicy, Method, MethodError, Param, Scope, non_base, split_inputs, weight_array

SEMANTICS = ("mergekit", "peft")

WEIGHT = Param("weight", float, 1.0, Scope.PER_MODEL, doc="scales the model's task vector")
DENSITY = Param(
    "density", float, 1.0, Scope.PER_MODEL, low=0.0, doc="fraction of the task vector kept (>= 1 keeps all)"
)
LAMBDA = Param("lambda", float, 1.0, doc="scales the merged task vector")
INT8_MASK = Param("int8_mask", bool, False, doc="accepted for mergekit recipes; no effect on the result")
SIGN = Param(
    "majority_sign_method", str, "total", choices=("total", "frequency"),
    doc="sign election: sign of the sum (total) or of the sum of signs (frequency)",
)
SEMANTICS_PARAM = Param(
    "semantics", str, "peft", choices=SEMANTICS,
    doc="whose definition: peft (the core functions) or mergekit (a mergekit recipe's default)",
)


def _normalize(default: bool) -> Param:
    return Param(
        "normalize", bool, None,
        doc=f"divide by the sum of the (agreeing) weights; mergekit semantics only (default {str(default).lower()})",
    )


def _rescale(default: bool) -> Param:
    return Param(
        "rescale", bool, None,
        doc=f"restore each pruned tensor's L1 norm; mergekit semantics only (default {str(default).lower()})",
    )


@functools.lru_cache(maxsize=None)
def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _keep_counts(sparsify: str | None, semantics: str, densities, n: int, gammas=None):
    """Per-task (k, k_top): entries kept and, for breadcrumbs, largest entries dropped first."""
    ks, tops = [], []
    for i, d in enumerate(densities):
        if d >= 1 or sparsify not in ("magnitude", "band"):
            ks.append(n), tops.append(0)
        elif semantics == "peft":
            ks.append(int(d * n)), tops.append(0)
        elif sparsify == "magnitude":
            ks.append(0 if d <= 0 else max(1, int(d * n))), tops.append(0)
        else:  # mergekit's magnitude_outliers: keep ascending ranks [n_bot, n_bot + target)
            target = int(d * n)
            n_bot = max(0, n - target - int(gammas[i] * n))
            ks.append(target), tops.append(n - n_bot - target)
    cdt = count_dtype()
    return np.asarray(ks, cdt), np.asarray(tops, cdt)


@dataclass(frozen=True)
class TaskVectorRecipe:
    """What distinguishes one task-vector method: how it sparsifies, whether it votes, its defaults.

    Attributes:
      sparsify: None, "magnitude", "random", "band" (breadcrumbs) or "della".
      consensus: the method elects signs (TIES-style).
      default_normalize, default_rescale: mergekit's defaults of `normalize` and `rescale`.
    """

    sparsify: str | None
    consensus: bool
    default_normalize: bool
    default_rescale: bool

    def rule(self, *, semantics: str, majority_sign_method: str = "total", normalize=None, rescale=None) -> Rule:
        """The core kernel's `Rule` for bound parameters (see the module docstring for the two semantics)."""
        consensus = majority_sign_method if self.consensus else None
        if semantics == "peft":
            return Rule(
                sparsify=self.sparsify,
                rescale="inverse_density" if self.sparsify == "random" else None,
                consensus=consensus,
                vote="pruned",
                divide="count" if self.consensus else None,
            )
        normalize = self.default_normalize if normalize is None else normalize
        rescale = self.default_rescale if rescale is None else rescale
        return Rule(
            sparsify=self.sparsify,
            rescale="l1" if rescale and self.sparsify else None,
            consensus=consensus,
            vote="weighted",
            divide="weights" if normalize else None,
        )


def _task_vector_merge(recipe: TaskVectorRecipe):
    """The tensor function of one task-vector method (see the module docstring)."""

    def merge(inputs, base_index, *, key, weight, density=None, semantics="mergekit", normalize=None,
              rescale=None, majority_sign_method="total", gamma=None, epsilon=None, int8_mask=False, **shared):
        lam = shared.get("lambda", 1.0)
        models, base = split_inputs(inputs, base_index)
        if not models:
            return base
        weights = non_base(weight, base_index)
        densities = non_base(density, base_index) if density is not None else [1.0] * len(models)
        rule = recipe.rule(
            semantics=semantics, majority_sign_method=majority_sign_method, normalize=normalize, rescale=rescale
        )
        n = _size(models[0].shape)
        k, k_top = _keep_counts(recipe.sparsify, semantics, densities, n, gamma and non_base(gamma, base_index))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The density")  # density >= 1 is a valid "keep all"
            merged = merging.merge_task_vectors(
                models, weight_array(weights), list(densities), rule=rule, key=key,
                lam=lam, k=k, k_top=k_top, epsilon=0.0 if epsilon is None else list(non_base(epsilon, base_index)),
                # Without a base the inputs are task vectors already (merge_params, LoRA factors).
                base=base,
            )
        return merged

    merge.recipe = recipe  # read by jaxmerge.learn.adamerging: the same sparsification, done once
    return merge


def _check_semantics(name):
    def check(bound, num_inputs):
        if bound.get("semantics") == "peft":
            for option in ("normalize", "rescale"):
                if bound.get(option) is not None:
                    raise MethodError(
                        f"{name}: {option} applies with semantics mergekit; semantics peft has PEFT's fixed rule"
                    )
        for i, (d, e) in enumerate(zip(bound.get("density", ()), bound.get("epsilon", ()))):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise MethodError(f"{name}: epsilon must keep density +/- epsilon in (0, 1), got density {d} and epsilon {e} (model {i})")

    return check


def _entrywise(recipe: TaskVectorRecipe):
    """`Method.entrywise` of a task-vector method: None for DELLA (it ranks within rows), else every rule
    but the L1 rescale.

    Magnitude and band selection count entries in flat order (exact), DARE's
    bits follow the flat order, the vote and the divisions are per entry; the L1
    rescale sums each tensor in floats, in an order that follows its shape.
    """
    if recipe.sparsify == "della":
        return None

    def entrywise(bound) -> bool:
        rule = recipe.rule(semantics=bound.get("semantics", "mergekit"), normalize=bound.get("normalize"),
                           rescale=bound.get("rescale"))
        return rule.rescale != "l1"

    return entrywise


def _task_method(name, sparsify, consensus, default_normalize, default_rescale, paper, summary, *, peft=True, extra=()):
    params = [WEIGHT]
    if sparsify:
        params.append(DENSITY)
    params += [_normalize(default_normalize), _rescale(default_rescale), LAMBDA, INT8_MASK, *extra]
    if consensus:
        params.append(SIGN)
    if peft:
        params.append(SEMANTICS_PARAM)
    recipe = TaskVectorRecipe(sparsify, bool(consensus), default_normalize, default_rescale)
    return Method(
        name=name,
        merge=_task_vector_merge(recipe),
        params=tuple(params),
        base=BasePolicy.REQUIRED,
        random=sparsify in ("random", "della"),
        min_models=1,
        paper=paper,
        summary=summary,
        check=_check_semantics(name),
        task_vectors=True,
        entrywise=_entrywise(recipe),
    )


GAMMA = Param("gamma", float, 0.01, Scope.PER_MODEL, low=0.0, high=1.0, doc="fraction of largest entries dropped as outliers")
EPSILON = Param("epsilon", float, 0.15, Scope.PER_MODEL, low=0.0, doc="spread of DELLA's keep probabilities around density")

TIES_PAPER = "Yadav et al., 2023, TIES-Merging, arXiv:2306.01708"
DARE_PAPER = "Yu et al., 2023, Language Models are Super Mario (DARE), arXiv:2311.03099"
BREADCRUMBS_PAPER = "Davari & Belilovsky, 2023, Model Breadcrumbs, arXiv:2312.06795"
DELLA_PAPER = "Deep et al., 2024, DELLA-Merging, arXiv:2406.11617"


def _linear(inputs, base_index, *, key, weight, normalize):
    """Weighted mean of the models (no base): sum_i w_i x_i / sum_i w_i, as mergekit's `linear`."""
    cd = compute_dtype(inputs[0].dtype)
    return _linear_kernel(tuple(inputs), np.asarray(weight, np.float32), normalize=normalize, cd=jnp.dtype(cd))


@kernel(static_argnames=("normalize", "cd"))
def _linear_kernel(inputs, weights, *, normalize, cd):
    w = weights.astype(cd)
    total = merging.sum_tasks([x.astype(cd) * w[i] for i, x in enumerate(inputs)])
    if normalize:
        total = total / jnp.sum(w)
    return total.astype(inputs[0].dtype)


def _check_linear(bound, num_inputs):
    if bound["normalize"] and abs(sum(bound["weight"])) == 0:
        raise MethodError("linear: the weights sum to 0, so normalize cannot divide by them; set normalize: false")


METHODS = (
    Method(
        name="linear",
        merge=_linear,
        params=(
            Param("weight", float, 1.0, Scope.PER_INPUT, doc="the model's weight"),
            Param("normalize", bool, True, doc="divide by the sum of the weights"),
        ),
        base=BasePolicy.IGNORED,
        paper="Wortsman et al., 2022, Model soups, arXiv:2203.05482",
        summary="weighted average of the models",
        check=_check_linear,
        entrywise=lambda bound: True,
    ),
    _task_method("task_arithmetic", None, None, False, False,
                 "Ilharco et al., 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
                 "base + weighted sum of task vectors"),
    _task_method("ties", "magnitude", "total", True, False, TIES_PAPER,
                 "trim by magnitude, elect signs, disjoint merge"),
    _task_method("dare_linear", "random", None, False, True, DARE_PAPER,
                 "random drop and rescale, weighted sum"),
    _task_method("dare_ties", "random", "total", False, True, DARE_PAPER,
                 "random drop and rescale, TIES' sign election"),
    _task_method("magnitude_prune", "magnitude", None, False, False, TIES_PAPER,
                 "trim by magnitude, weighted sum (PEFT)", ),
    _task_method("breadcrumbs", "band", None, False, False, BREADCRUMBS_PAPER,
                 "drop the smallest and the largest (outlier) entries, weighted sum", peft=False, extra=(GAMMA,)),
    _task_method("breadcrumbs_ties", "band", "total", False, False, BREADCRUMBS_PAPER,
                 "breadcrumbs' band, TIES' sign election", peft=False, extra=(GAMMA,)),
    _task_method("della", "della", "total", True, True, DELLA_PAPER,
                 "magnitude-ranked random drop, TIES' sign election", peft=False, extra=(EPSILON,)),
    _task_method("della_linear", "della", None, False, True, DELLA_PAPER,
                 "magnitude-ranked random drop, weighted sum", peft=False, extra=(EPSILON,)),
)
