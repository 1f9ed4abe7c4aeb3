"""AdaMerging: learn the merging coefficients by minimising the prediction entropy on unlabeled data.

Yang et al., 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", arXiv:2310.02575. The merged model is

    merged = base + sum_k lambda_k * tau_k                      (task-wise)
    merged[l] = base[l] + sum_k lambda_{l,k} * tau_k[l]         (layer-wise)

and the coefficients lambda minimise the Shannon entropy of the merged model's
predictions on unlabeled test inputs (a surrogate of the loss the paper shows
to be well correlated with it), summed over the tasks, with Adam.

Task vectors `tau_k` (`prepare_task_vectors`) are computed ONCE, before any
coefficient is learned; they do not depend on lambda:

* "task_arithmetic": `tau_k = finetuned_k - base` (AdaMerging).
* "ties": AdaMerging++ (the paper's TIES variant, its code's
  `ties_merging_split` with the "dis-sum" merge): each task vector is trimmed
  to its `density` largest-magnitude entries, a sign is elected per entry
  from the trimmed vectors (`majority_sign_method`, TIES' "total" by default),
  and entries that disagree with it are zeroed; the merge is the lambda-weighted
  SUM of these vectors (no division by the number of agreeing tasks: lambda
  takes that role). Unlike the paper's code, which trims over the whole
  flattened model, trimming is per tensor (per leaf), as everywhere in jaxmerge,
  PEFT and mergekit; `k = int(density * size)` as PEFT.
* "dare_linear" / "dare_ties": DARE's drop and rescale by 1/density (Yu et
  al., 2023, arXiv:2311.03099), without / with the sign election above. Masks
  are those of `merge_params` with the same `key` (leaf key
  `path_key(key, path)`, task i `jax.random.split(leaf_key, T)[i]`), so at fixed
  lambda "dare_linear" equals `merge_params(method="dare_linear", weights=lambda)`.

A "layer" is a floating-point leaf of the parameter pytree. Layer-wise
coefficients are an (L, T) array whose row l belongs to the l-th floating leaf
in `jax.tree_util.tree_flatten(base)` order (`AdaMergingResult.leaf_paths`
names them). Non-float leaves (step counters) must be equal in every model and
are passed through.

`merge_params` converts its weights on the host (`float(...)`), so it cannot
take traced coefficients; the lambda-weighted sum is written once here
(`merge_with_coefficients`) with the core's compute dtypes and unrolled sums.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.core import _validation as v
from jaxmerge.core._dtypes import compute_dtype
from jaxmerge.core.merging import Rule, sparsify_task
from jaxmerge.core.selection import density_to_k, masked
from jaxmerge.core.sign import elected_sign, sum_tasks
from jaxmerge.methods import _table as table
from jaxmerge.methods.pytree import path_key

GRANULARITIES = ("task", "layer")
# The task-vector methods whose preprocessing (sparsify, sign mask) AdaMerging does once;
# how each sparsifies and whether it votes is read from its declaration in the method table.
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class AdaMergingResult:
    """What `adamerging` learned.

    Attributes:
      params: the merged pytree at the final coefficients.
      coefficients: task-wise, shape (T,); layer-wise, shape (L, T), row l for
        the floating leaf `leaf_paths[l]`.
      entropy_history: (steps,) NumPy array; entry i is the loss (entropy,
        summed over tasks) on step i's batch at the coefficients before update i.
      leaf_paths: `jax.tree_util.keystr` of every floating leaf, in row order.
    """

    params: Any
    coefficients: jax.Array
    entropy_history: np.ndarray
    leaf_paths: tuple[str, ...]


def entropy(logits: jax.Array) -> jax.Array:
    """Mean Shannon entropy (nats) of softmax(logits) over the last axis: AdaMerging's loss.

    Args:
      logits: (..., num_classes) unnormalised log-probabilities.

    Returns:
      A scalar: `mean over the leading axes of -sum_c p_c log p_c`, computed in
      float32 at least (log_softmax, so large logits do not overflow).
    """
    if jnp.ndim(logits) < 1:
        raise ValueError(f"logits must have a class axis, got shape {jnp.shape(logits)}")
    x = jnp.asarray(logits)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    log_p = jax.nn.log_softmax(x, axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _tree_columns(base: Any, finetuned: Any, where: str):
    """Flatten `base` and every tree of `finetuned`, checking paths, shapes and non-float leaves.

    Returns:
      (paths, base leaves, treedef, columns) with `columns[t][j]` the j-th leaf of `finetuned[t]`.
    """
    if not isinstance(finetuned, (list, tuple)):
        raise TypeError(f"{where}: finetuned must be a list or tuple of pytrees, got {type(finetuned).__name__}")
    if not finetuned:
        raise ValueError(f"{where}: finetuned must hold at least one pytree, got an empty {type(finetuned).__name__}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    base_leaves = [leaf for _, leaf in flat]
    if not base_leaves:
        raise ValueError(f"{where}: base has no leaves")
    columns = []
    for t, tree in enumerate(finetuned):
        other = jax.tree_util.tree_flatten_with_path(tree)[0]
        other_paths = [jax.tree_util.keystr(p) for p, _ in other]
        if other_paths != paths:
            for a, b in itertools.zip_longest(paths, other_paths):
                if a != b:
                    raise ValueError(f"{where}: finetuned[{t}] differs from base: it has leaf {b} where base has {a}")
        leaves = [leaf for _, leaf in other]
        for j, (leaf, ref) in enumerate(zip(leaves, base_leaves)):
            if jnp.shape(leaf) != jnp.shape(ref):
                raise ValueError(
                    f"{where}: finetuned[{t}] leaf {paths[j]} has shape {jnp.shape(leaf)} where base has {jnp.shape(ref)}"
                )
            if not _is_float(ref) and not np.array_equal(np.asarray(leaf), np.asarray(ref)):
                raise ValueError(f"{where}: non-float leaf {paths[j]} of finetuned[{t}] differs from base's")
        columns.append(leaves)
    return paths, base_leaves, treedef, columns


def _process_leaf(models, base, density, k, key, sparsify, consensus):
    """One leaf's task vectors `model - base`, sparsified and sign-masked (see the module docstring)."""
    cd = compute_dtype(base.dtype)
    taus = [m.astype(cd) - base.astype(cd) for m in models]
    if sparsify is not None:
        rule = Rule(sparsify=sparsify, rescale="inverse_density" if sparsify == "random" else None)
        keys = jax.random.split(key, len(taus)) if key is not None else [None] * len(taus)
        taus = [sparsify_task(t, rule, density, k, None, None, keys[i], False) for i, t in enumerate(taus)]
    if consensus is not None:
        # TIES' vote on the unweighted, sparsified vectors (PEFT's and AdaMerging++'s); zeros never agree.
        sign = elected_sign(taus, consensus)
        taus = [masked(t, jnp.sign(t) == sign) for t in taus]
    return taus


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus"))
def _process_leaves(models, bases, density, ks, keys, *, sparsify, consensus):
    """Every floating leaf in one compiled call: `models[j]` holds leaf j of each model."""
    return [_process_leaf(m, b, density, k, key, sparsify, consensus) for m, b, k, key in zip(models, bases, ks, keys)]


def _method_options(method: str, method_params: dict, key, where: str):
    """Validate `method` and its parameters: (sparsify, consensus, density, key)."""
    v.check_choice("method", method, METHODS)
    recipe = table.get(method).merge.recipe  # jaxmerge.methods.task_arithmetic.TaskVectorRecipe
    sparsify, votes = recipe.sparsify, recipe.consensus
    allowed = (("density",) if sparsify else ()) + (("majority_sign_method",) if votes else ())
    unknown = sorted(set(method_params) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: method {method} has no parameter {unknown[0]!r} (its parameters: {list(allowed) or 'none'})")
    density = method_params.get("density")
    if sparsify:
        if density is None:
            raise ValueError(f"{where}: method {method} needs density (AdaMerging++ keeps density=0.2)")
        v.check_density(density)
        density = float(density)
    consensus = v.check_choice("majority_sign_method", method_params.get("majority_sign_method", "total"),
                               v.SIGN_METHODS) if votes else None
    if sparsify == "random":
        key = v.check_key(key)
    return sparsify, consensus, density, key if sparsify == "random" else None


def prepare_task_vectors(base: Any, finetuned: Sequence[Any], *, method: str = "task_arithmetic",
                         key: jax.Array | None = None, **method_params: Any) -> list[Any]:
    """The task vectors AdaMerging weights, computed once (see the module docstring for each method).

    Args:
      base: the pretrained model's pytree.
      finetuned: same-structure pytrees, one per task.
      method: "task_arithmetic", "ties" (AdaMerging++), "dare_linear" or "dare_ties".
      key: `jax.random.key`, required by the DARE methods (leaf keys as `merge_params`).
      **method_params: `density` (sparsifying methods; required) and
        `majority_sign_method` ("total" or "frequency"; sign-electing methods).

    Returns:
      A list of T pytrees of `base`'s structure, floating leaves in float32 at
      least (float64 kept); non-float leaves are zeros.

    Raises:
      ValueError/TypeError: unknown method or parameter, bad density or key, structures that differ.
    """
    where = "prepare_task_vectors"
    options = _method_options(method, method_params, key, where)
    return _prepare(_tree_columns(base, finetuned, where), *options)


def _prepare(columns_info, sparsify, consensus, density, key) -> list[Any]:
    """`prepare_task_vectors` on validated arguments (`_tree_columns`, `_method_options`)."""
    paths, base_leaves, treedef, columns = columns_info
    floats = [j for j, leaf in enumerate(base_leaves) if _is_float(leaf)]
    sizes = [int(np.prod(jnp.shape(base_leaves[j]), dtype=np.int64)) for j in floats]
    processed = _process_leaves(
        [[jnp.asarray(col[j]) for col in columns] for j in floats],
        [jnp.asarray(base_leaves[j]) for j in floats],
        np.float32(1.0 if density is None else density),
        [density_to_k(density, n) if sparsify == "magnitude" else 0 for n in sizes],
        [path_key(key, paths[j]) if key is not None else None for j in floats],
        sparsify=sparsify, consensus=consensus,
    )
    # Non-float leaves get zero task vectors (they are passed through from the base).
    out = [[jnp.zeros_like(leaf) for leaf in base_leaves] for _ in columns]
    for taus, j in zip(processed, floats):
        for row, tau in zip(out, taus):
            row[j] = tau
    return [jax.tree_util.tree_unflatten(treedef, row) for row in out]


def merge_with_coefficients(base: Any, task_vectors: Sequence[Any], coefficients: jax.Array, granularity: str) -> Any:
    """`base + sum_k lambda_k * tau_k`, task- or layer-wise: the one place the weighted sum is written.

    Pure and traceable in `coefficients` (jit, grad, vmap).

    Args:
      base: the pretrained pytree.
      task_vectors: T pytrees of `base`'s structure (`prepare_task_vectors`).
      coefficients: (T,) for granularity "task"; (L, T) for "layer", row l for
        the l-th floating leaf of `base` in `jax.tree_util.tree_flatten` order.
      granularity: "task" or "layer".

    Returns:
      A pytree of `base`'s structure and dtypes: each floating leaf
      `base + sum_k c_k * tau_k`, summed in float32 at least and rounded once;
      non-float leaves are `base`'s.

    Raises:
      ValueError: bad granularity, structures or coefficient shape.
    """
    v.check_choice("granularity", granularity, GRANULARITIES)
    if not isinstance(task_vectors, (list, tuple)) or not task_vectors:
        raise ValueError(f"task_vectors must be a non-empty list of pytrees, got {type(task_vectors).__name__} {task_vectors!r:.80}")
    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    tv_leaves = []
    for t, tv in enumerate(task_vectors):
        leaves, tv_def = jax.tree_util.tree_flatten(tv)
        if tv_def != treedef:
            raise ValueError(f"task_vectors[{t}] has structure {tv_def}, base has {treedef}")
        tv_leaves.append(leaves)
    float_leaves = [j for j, leaf in enumerate(base_leaves) if _is_float(leaf)]
    n_tasks = len(task_vectors)
    expected = (n_tasks,) if granularity == "task" else (len(float_leaves), n_tasks)
    if jnp.shape(coefficients) != expected:
        raise ValueError(
            f"coefficients must have shape {expected} for granularity {granularity!r} "
            f"({n_tasks} tasks, {len(float_leaves)} floating leaves), got {jnp.shape(coefficients)}"
        )
    coefficients = jnp.asarray(coefficients)
    merged = list(base_leaves)
    for row, j in enumerate(float_leaves):
        ref = base_leaves[j]
        cd = compute_dtype(jnp.result_type(ref))
        c = (coefficients if granularity == "task" else coefficients[row]).astype(cd)
        # Unrolled adds: XLA:CPU fuses them (a reduction over a stacked task axis is much slower).
        delta = sum_tasks([c[t] * tv_leaves[t][j].astype(cd) for t in range(n_tasks)])
        merged[j] = (jnp.asarray(ref).astype(cd) + delta).astype(jnp.result_type(ref))
    return jax.tree_util.tree_unflatten(treedef, merged)


def entropy_loss(apply_fn: Callable, base: Any, task_vectors: Sequence[Any], coefficients: jax.Array,
                 batch: Any, granularity: str) -> jax.Array:
    """AdaMerging's objective at `coefficients`: entropy of the merged model's predictions.

    Args:
      apply_fn: `apply_fn(params, x) -> logits` (..., num_classes), or, with a
        dict `batch`, a dict task -> such a function (task-specific heads).
      base, task_vectors, coefficients, granularity: as `merge_with_coefficients`.
      batch: one input batch, or a dict task -> batch: the entropies of the
        tasks are then summed (the paper's sum of per-task losses).

    Returns:
      A scalar loss, differentiable in `coefficients`.
    """
    params = merge_with_coefficients(base, task_vectors, coefficients, granularity)
    if isinstance(batch, Mapping):
        heads = apply_fn if isinstance(apply_fn, Mapping) else dict.fromkeys(batch, apply_fn)
        return sum_tasks([entropy(heads[task](params, x)) for task, x in batch.items()])
    return entropy(apply_fn(params, batch))


def _stream(batches: Any, name: str) -> Iterator[Any]:
    """Cycle through `batches`, having checked that it holds a batch.

    A sequence is cycled; another re-iterable (a data loader) is iterated again
    when it runs out; a one-shot iterator is read as it goes (nothing is
    cached, so an endless stream costs no memory) and raises if it runs out.
    """
    if isinstance(batches, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of input batches, not one array of shape {batches.shape}; "
                        f"pass [x] for a single batch")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{name} must be an iterable of input batches, got {type(batches).__name__}")
    if isinstance(batches, Sequence):
        if len(batches) == 0:
            raise ValueError(f"{name} must hold at least one batch, got an empty {type(batches).__name__}")
        return itertools.cycle(batches)
    it = iter(batches)
    first = next(it, _EMPTY)
    if first is _EMPTY:
        raise ValueError(f"{name} must hold at least one batch, got an empty iterable")

    def gen(it):
        yield first
        count = 1
        while True:
            for x in it:
                count += 1
                yield x
            if iter(batches) is batches:
                raise ValueError(f"{name} ran out after {count} batches; pass a sequence (it is cycled), "
                                 "a re-iterable or an endless iterator")
            it = iter(batches)

    return gen(it)


_EMPTY = object()


def _batch_stream(batches: Any) -> Iterator[Any]:
    if isinstance(batches, Mapping):
        if not batches:
            raise ValueError("batches must hold at least one task, got an empty dict")
        streams = {task: _stream(b, f"batches[{task!r}]") for task, b in batches.items()}
        return ({task: next(s) for task, s in streams.items()} for _ in itertools.count())
    return _stream(batches, "batches")


def _check_apply_fn(apply_fn, batches) -> None:
    if isinstance(apply_fn, Mapping):
        if not isinstance(batches, Mapping) or set(apply_fn) != set(batches):
            got = list(batches) if isinstance(batches, Mapping) else type(batches).__name__
            raise ValueError(f"apply_fn as a dict needs batches as a dict with the same tasks: "
                             f"apply_fn has {list(apply_fn)}, batches has {got}")
        for task, fn in apply_fn.items():
            if not callable(fn):
                raise TypeError(f"apply_fn[{task!r}] must be callable, got {type(fn).__name__}")
    elif not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")


def _initial(init, shape, dtype, bounds) -> jax.Array:
    try:
        arr = np.asarray(init, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"init must be a number or an array of shape {shape}, got {init!r}") from None
    if arr.ndim != 0 and arr.shape != shape:
        raise ValueError(f"init must be a number or an array of shape {shape}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"init must be finite, got {init!r}")
    if bounds is not None and (np.any(arr < bounds[0]) or np.any(arr > bounds[1])):
        raise ValueError(f"init must lie in bounds {bounds}, got init={init!r}")
    return jnp.asarray(np.broadcast_to(arr, shape), dtype)


def _check_bounds(bounds):
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be None or a (low, high) pair of numbers, got {bounds!r}") from None
    if not lo < hi:
        raise ValueError(f"bounds must have low < high, got bounds={bounds!r}")
    return lo, hi


def adamerging(
    apply_fn: Callable[[Any, Any], jax.Array],
    base: Any,
    finetuned: Sequence[Any],
    batches: Any,
    *,
    granularity: str = "task",
    method: str = "task_arithmetic",
    init: Any = 0.3,
    steps: int = 100,
    learning_rate: float = 1e-3,
    optimizer: Any = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    key: jax.Array | None = None,
    **method_params: Any,
) -> AdaMergingResult:
    """Learn task- or layer-wise merging coefficients by entropy minimisation (AdaMerging, arXiv:2310.02575).

    Args:
      apply_fn: `apply_fn(params, x) -> logits` with classes on the last axis;
        traced (pure JAX). With a dict `batches`, also a dict task ->
        function: each task's own head, as the paper's task-specific
        classifiers (the heads are not merged; only `params` is).
      base: the pretrained model's pytree.
      finetuned: same-structure pytrees, one per task (T).
      batches: unlabeled inputs: a sequence (or iterable) of batches, or a dict
        task -> such a sequence, whose per-task entropies are summed (the
        paper). Cycled for `steps` (a one-shot iterator must last them); one
        batch of each task per step. A batch
        may be any pytree `apply_fn` takes; each new batch shape compiles the
        step once more, so keep one shape (drop a ragged last batch).
      granularity: "task" (one lambda per task) or "layer" (one per task and
        floating leaf: an (L, T) array, row order `AdaMergingResult.leaf_paths`).
      method: "task_arithmetic" (AdaMerging), "ties" (AdaMerging++: lambda
        weights TIES-trimmed, sign-elected task vectors, summed), "dare_linear"
        or "dare_ties"; see the module docstring.
      init: initial lambda, a number or an array of the coefficients' shape (paper: 0.3).
      steps: optimisation steps (> 0).
      learning_rate: Adam's learning rate (paper: 1e-3); unused with `optimizer`.
      optimizer: an optax `GradientTransformation` replacing Adam.
      bounds: (low, high): lambda is projected into it after every update (the
        paper's code clamps to [0, 1]; projecting, rather than clamping in the
        forward pass, keeps a gradient at the bounds). None: unbounded.
      key: `jax.random.key` for the DARE methods; ignored otherwise.
      **method_params: `density`, `majority_sign_method` (see `prepare_task_vectors`).

    Returns:
      An `AdaMergingResult`: merged params, coefficients, entropy history.

    Raises:
      ValueError/TypeError, before any work, naming the argument: unknown
        granularity or method, empty or mismatched `finetuned`, empty `batches`,
        `steps` <= 0, bad learning rate, init, bounds or optimizer.
    """
    import optax

    _check_apply_fn(apply_fn, batches)
    v.check_choice("granularity", granularity, GRANULARITIES)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
    if optimizer is None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.floating)) \
                or not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got learning_rate={learning_rate!r}")
        optimizer = optax.adam(learning_rate)
    elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    bounds = _check_bounds(bounds)
    options = _method_options(method, method_params, key, "adamerging")
    columns_info = _tree_columns(base, finetuned, "adamerging")
    paths, base_leaves = columns_info[:2]
    floats = [(p, leaf) for p, leaf in zip(paths, base_leaves) if _is_float(leaf)]
    float_paths = tuple(p for p, _ in floats)
    n_tasks = len(finetuned)
    shape = (n_tasks,) if granularity == "task" else (len(floats), n_tasks)
    # float32 coefficients at least; float64 ones for a float64 model (x64).
    dtype = jnp.promote_types(jnp.result_type(*[leaf for _, leaf in floats] or [jnp.float32]), jnp.float32)
    coefficients = _initial(init, shape, dtype, bounds)
    stream = _batch_stream(batches)  # checks emptiness before the task vectors are computed

    task_vectors = _prepare(columns_info, *options)
    base = jax.tree_util.tree_map(jnp.asarray, base)  # one transfer, not one per step
    state = optimizer.init(coefficients)
    step = _make_step(apply_fn, optimizer, granularity, bounds)
    history = []
    for _ in range(steps):
        coefficients, state, loss = step(coefficients, state, base, task_vectors, next(stream))
        history.append(loss)  # kept on device: no host sync per step
    params = _merge_jit(base, task_vectors, coefficients, granularity=granularity)
    return AdaMergingResult(params, coefficients, np.asarray(jnp.stack(history)), float_paths)


def _make_step(apply_fn, optimizer, granularity, bounds):
    """The jitted update: loss, gradient through the merge, optimizer step, projection into `bounds`."""
    import optax

    @jax.jit
    def step(coefficients, state, base, task_vectors, batch):
        loss, grads = jax.value_and_grad(entropy_loss, argnums=3)(
            apply_fn, base, task_vectors, coefficients, batch, granularity
        )
        updates, state = optimizer.update(grads, state, coefficients)
        coefficients = optax.apply_updates(coefficients, updates)
        if bounds is not None:
            coefficients = jnp.clip(coefficients, bounds[0], bounds[1])
        return coefficients, state, loss

    return step


_merge_jit = jax.jit(merge_with_coefficients, static_argnames=("granularity",))
