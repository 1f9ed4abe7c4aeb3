"""How well do the merging methods merge? A multi-task testbed that needs no download.

    python -m benchmarks.quality                      # full run (3-6 minutes on 2 busy cores)
    python -m benchmarks.quality --quick              # CI size (under a minute), a subset of methods
    python -m benchmarks.quality --out results.json   # where to write the figures

The setting of the Task Arithmetic, TIES and AdaMerging papers (one CLIP
image encoder, 8 vision tasks, one fine-tune per task, per-task frozen
classification heads), in miniature, on scikit-learn's handwritten digits
(8x8 images shipped with scikit-learn, so nothing is downloaded):

* one pretrained network: an MLP body (64 -> 256 -> 256 -> 128, the last layer
  a linear projection, L2-normalised like CLIP's image embedding) trained to
  read the plain digits (shifted by up to a pixel);
* eight tasks, each its own input "domain" (the images rotated, mirrored,
  inverted, pixel-permuted, noisy, ...) and its own label set (the digit, its
  parity, digit >= 5, digit mod 3, digit group);
* per task a frozen head built before fine-tuning, the analogue of CLIP's
  zero-shot text head: class embeddings = mean pretrained feature of 2
  examples per class, logits = the pretrained logit scale x cosine; heads are
  never merged, each task is scored with its own;
* per task one full fine-tune of the body (Adam, small learning rate, head frozen);
* every merged body is scored on every task's test split. Hyperparameters
  (the scale lambda / alpha / scaling_factor, densities, WUDI's lr) are chosen
  on a validation split by mean accuracy; AdaMerging learns its coefficients
  on the unlabeled test inputs, as in its paper.

Reported per method: average test accuracy over the tasks, normalised
accuracy (merged / fine-tuned accuracy per task, averaged), per-task
accuracies, the chosen hyperparameters, the wall time of the final merge and
of the tuning sweep, and the machine (with its load average: other processes
share the cores, and compile times move with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.compare import base_machine
from jaxmerge.demo import init_params
from jaxmerge.methods.pytree import merge_params

# --------------------------------------------------------------------------- the tasks

_PERMUTATION = np.random.default_rng(1234).permutation(64)  # fixed: part of the task's definition


def _rotate(k):
    return lambda img, rng: np.rot90(img, k, axes=(1, 2))


def _noise(img, rng):
    return np.clip(img + rng.normal(0.0, 0.35, img.shape), 0.0, 1.0)


def _blocks(img, rng):
    # Swap the top and bottom halves, mirroring each: the quadrants change places diagonally.
    top, bottom = img[:, :4], img[:, 4:]
    return np.concatenate([bottom[:, :, ::-1], top[:, :, ::-1]], axis=1)


# name -> (input transform on (n, 8, 8) images, label function on digits, number of classes)
TASKS: dict[str, tuple[Callable, Callable, int]] = {
    "rot90/digit": (_rotate(1), lambda d: d, 10),
    "mirror/digit": (lambda img, rng: img[:, :, ::-1], lambda d: d, 10),
    "invert/digit": (lambda img, rng: 1.0 - img, lambda d: d, 10),
    "permuted/digit": (lambda img, rng: img.reshape(len(img), 64)[:, _PERMUTATION].reshape(img.shape), lambda d: d, 10),
    "rot180/parity": (_rotate(2), lambda d: d % 2, 2),
    "noise/>=5": (_noise, lambda d: (d >= 5).astype(np.int32), 2),
    "flipud/mod3": (lambda img, rng: img[:, ::-1], lambda d: d % 3, 3),
    "quadrants/group": (_blocks, lambda d: np.digitize(d, [4, 7]).astype(np.int32), 3),
}

SIZES = (64, 256, 256, 128)  # the body; each head reads its 128 normalised features


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much work the benchmark does (`quick` is sized for CI)."""

    pretrain_steps: int = 1500
    finetune_steps: int = 1000
    # A small learning rate keeps each fine-tune near the base, as the papers' (1e-5 for CLIP).
    finetune_lr: float = 1e-4
    head_shots: int = 2  # labeled examples per class for each frozen head
    # lambda (or alpha, scaling_factor): the scale of the merged task vector, chosen on validation.
    scales: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21)) + (2.5, 3.0)
    densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7)  # TIES, DARE-TIES
    breadcrumbs_densities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    wudi_lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    ada_steps: int = 500  # the paper's
    ada_batch: int = 64
    seed: int = 0
    methods: tuple[str, ...] | None = None  # rows to run (labels of `recipes` and `ADAMERGING`); None: all

    @classmethod
    def quick(cls, seed: int = 0) -> Settings:
        """A smoke test: less training, small grids, and only the methods that compile fast.

        Compiling the table's TIES/DARE/Breadcrumbs kernels for this model's
        five leaf shapes takes 15-50 s apiece on 2 busy cores (the merges
        themselves take milliseconds) and TSV-M takes seconds per merge, so
        `--quick` runs none of them.
        """
        return cls(
            pretrain_steps=600, finetune_steps=300, finetune_lr=3e-4, scales=(0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0),
            wudi_lrs=(1e-4,), ada_steps=50, seed=seed,
            methods=("task_arithmetic", "iso_c", "wudi", "adamerging (task-wise)"),
        )


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    x: np.ndarray  # (n, 64) float32
    y: np.ndarray  # (n,) int32


@dataclasses.dataclass
class Testbed:
    """Everything a merge is scored with: the base body, the frozen heads, the fine-tuned bodies, the data."""

    base: dict
    heads: dict[str, dict]
    finetuned: dict[str, dict]
    val: dict[str, Split]
    test: dict[str, Split]
    train_seconds: float


def load_digit_splits(seed: int):
    """Digit images (n, 8, 8) in [0, 1] and labels, split 60/10/30 into train/val/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=0.3, random_state=seed, stratify=labels)
    train, val = train_test_split(train, test_size=1 / 7, random_state=seed, stratify=labels[train])
    return {name: (images[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def task_split(task: str, images: np.ndarray, digits: np.ndarray, seed: int) -> Split:
    transform, label, _ = TASKS[task]
    rng = np.random.default_rng(seed)
    x = np.asarray(transform(images, rng), np.float32).reshape(len(images), 64)
    return Split(x, np.asarray(label(digits), np.int32))


# --------------------------------------------------------------------------- the network


def features(body, x):
    """The body: a ReLU MLP whose last layer is a linear projection, L2-normalised (CLIP's image embedding)."""
    h = x
    last = len(body) - 1
    for i in range(len(body)):
        h = h @ body[f"layer{i}"]["w"] + body[f"layer{i}"]["b"]
        if i < last:
            h = jax.nn.relu(h)
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)


def head_logits(head, f):
    """A CLIP-style head: `scale * cosine(feature, class embedding)`.

    The features are normalised, so a merge cannot make predictions more
    confident just by growing the features' norm (AdaMerging's entropy
    objective would otherwise reward exactly that).
    """
    w = head["w"] / (jnp.linalg.norm(head["w"], axis=0, keepdims=True) + 1e-6)
    return head["scale"] * (f @ w)


def logits(body, head, x):
    return head_logits(head, features(body, x))


def xent(logit, y):
    return -jnp.mean(jax.nn.log_softmax(logit)[jnp.arange(y.shape[0]), y])


def _pretrain_loss(params, fixed, x, y):
    return xent(logits(params["body"], params["head"], x), y)


def _finetune_loss(body, head, x, y):
    return xent(logits(body, head, x), y)


@jax.jit(static_argnames=("loss",))
def _adam_scan(params, fixed, x, y, idx, lr, *, loss):
    """`len(idx)` Adam steps on `loss(params, fixed, x[i], y[i])`, one minibatch of indices `i` per row of `idx`."""
    import optax

    opt = optax.adam(lr)

    def step(carry, i):
        params, state = carry
        grads = jax.grad(loss)(params, fixed, x[i], y[i])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
    return params


def adam_loop(loss, params, data: Split, steps: int, lr: float, seed: int, *, fixed=None, batch: int = 64):
    """Minimise `loss(params, fixed, x, y)` with Adam on random minibatches; returns the trained params.

    The loop is one `lax.scan` and the losses are module-level functions, so
    the program compiles once per loss and shape, not once per task (compiling
    costs seconds here, training a fraction of that). The minibatch indices are
    drawn up front with NumPy.
    """
    idx = np.random.default_rng(seed).integers(0, len(data.x), size=(steps, min(batch, len(data.x))))
    return _adam_scan(params, fixed, jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(idx, jnp.int32),
                      jnp.float32(lr), loss=loss)


@jax.jit
def _accuracies(body, heads, xs, ys):
    """Accuracy on every task (dicts task -> head, inputs, labels), one compiled call for all tasks."""
    return {t: jnp.mean(jnp.argmax(logits(body, heads[t], xs[t]), axis=-1) == ys[t]) for t in xs}


def scores(body, testbed: Testbed, split: str = "test") -> dict[str, float]:
    """Accuracy of `body` on every task, each with its own head."""
    data = testbed.test if split == "test" else testbed.val
    acc = _accuracies(body, testbed.heads, {t: d.x for t, d in data.items()}, {t: d.y for t, d in data.items()})
    return {t: float(acc[t]) for t in TASKS}


# --------------------------------------------------------------------------- building the testbed


def pretrain_data(images, digits, seed: int) -> Split:
    """The plain digits, shifted by up to one pixel (a little augmentation, none of the tasks' transforms)."""
    rng = np.random.default_rng(seed)
    copies = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            copies.append(np.roll(images, (dy, dx), axis=(1, 2)))
    x = np.concatenate(copies).reshape(-1, 64)
    y = np.tile(digits, 9)
    order = rng.permutation(len(y))
    return Split(x[order].astype(np.float32), y[order])


def few_shot(split: Split, shots: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(split.y == c), shots, replace=False) for c in np.unique(split.y)])
    return Split(split.x[keep], split.y[keep])


def build_testbed(settings: Settings, log=print) -> Testbed:
    started = time.perf_counter()
    seed = settings.seed
    splits = load_digit_splits(seed)
    key = jax.random.key(seed)

    # 1. Pretrain the body (with a throw-away 10-way head and a learned logit scale) on the plain digits.
    k_body, k_head = jax.random.split(key)
    body = init_params(k_body, SIZES)
    pre_head = {"w": jax.random.normal(k_head, (SIZES[-1], 10), jnp.float32), "scale": jnp.float32(10.0)}
    pre = pretrain_data(*splits["train"], seed)
    both = adam_loop(_pretrain_loss, {"body": body, "head": pre_head}, pre, settings.pretrain_steps, 1e-3, seed)
    base, scale = both["body"], both["head"]["scale"]

    data = {
        part: {t: task_split(t, *splits[part], seed + 101 * i + j) for i, t in enumerate(TASKS)}
        for j, part in enumerate(("train", "val", "test"))
    }

    # 2. Per task: a frozen head, the analogue of CLIP's zero-shot head: each
    # class's embedding is the mean pretrained feature of a few of its examples
    # (no training), read with the pretrained logit scale.
    heads = {}
    for i, (task, (_, _, classes)) in enumerate(TASKS.items()):
        shots = few_shot(data["train"][task], settings.head_shots, seed + i)
        f = np.asarray(features(base, shots.x))
        prototypes = np.stack([f[shots.y == c].mean(axis=0) for c in range(classes)], axis=1)
        heads[task] = {"w": jnp.asarray(prototypes), "scale": scale}

    # 3. Per task: fine-tune the whole body, the head frozen.
    finetuned = {}
    for i, task in enumerate(TASKS):
        finetuned[task] = adam_loop(_finetune_loss, base, data["train"][task], settings.finetune_steps,
                                    settings.finetune_lr, seed + 1000 + i, fixed=heads[task])
    elapsed = time.perf_counter() - started
    log(f"testbed built in {elapsed:.1f} s (pretrain {settings.pretrain_steps} steps, "
        f"{len(TASKS)} fine-tunes of {settings.finetune_steps} steps)")
    return Testbed(base, heads, finetuned, data["val"], data["test"], elapsed)


# --------------------------------------------------------------------------- merging methods


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row of the table: a `merge_params` method and the hyperparameters tuned on validation.

    `scale` names the parameter that multiplies the merged task vector
    (`lambda`, `alpha`, `scaling_factor`), or None. The merge is linear in it,
    so the sweep merges once per point of `grid` at scale 1 and rescales that
    task vector (exact, and one merge instead of one per scale); the
    chosen point is then merged again through `merge_params`, timed, and that
    model is the one scored.
    """

    label: str
    method: str
    scale: str | None
    grid: dict[str, tuple] = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)
    # Merge the matrices transposed, as (out, in): the torch layout the method was written for.
    out_in: bool = False


def recipes(settings: Settings) -> list[Recipe]:
    return [
        Recipe("task_arithmetic", "task_arithmetic", "lambda"),
        Recipe("ties", "ties", "lambda", {"density": settings.densities}),
        Recipe("dare_ties", "dare_ties", "lambda", {"density": settings.densities}),
        Recipe("breadcrumbs", "breadcrumbs", "lambda", {"density": settings.breadcrumbs_densities}, {"gamma": 0.01}),
        Recipe("tsv_m", "tsv_m", "alpha"),
        Recipe("iso_c", "iso_c", "scaling_factor"),
        # Iso-CTS and WUDI are not symmetric under transposition: FusionBench's
        # code (which jaxmerge follows) takes torch's (out, in) weights, this
        # MLP stores (in, out) as JAX does, so they merge the transposes. WUDI
        # is also run on the stored layout, to show what that costs.
        Recipe("iso_cts", "iso_cts", "scaling_factor", fixed={"common_space_fraction": 0.8}, out_in=True),
        # WUDI has no scale: its objective fixes the merged vector. Adam's step
        # size is absolute, so its lr is tuned to this model's task-vector scale.
        Recipe("wudi", "wudi", None, {"lr": settings.wudi_lrs}, {"iter_num": 400}, out_in=True),
        Recipe("wudi, (in, out) layout", "wudi", None, {"lr": settings.wudi_lrs}, {"iter_num": 400}),
    ]


def _transposed(tree):
    return jax.tree_util.tree_map(lambda a: a.T if a.ndim == 2 else a, tree)


def merge(recipe: Recipe, testbed: Testbed, key, params: dict):
    """`merge_params` of the fine-tuned bodies with `recipe`'s method (transposing around it if `out_in`)."""
    trees, base = [testbed.finetuned[t] for t in TASKS], testbed.base
    if not recipe.out_in:
        return merge_params(trees, method=recipe.method, base=base, key=key, **params)
    merged = merge_params([_transposed(t) for t in trees], method=recipe.method, base=_transposed(base),
                          key=key, **params)
    return _transposed(merged)


def _grid_points(grid: dict[str, tuple]) -> list[dict]:
    points = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def _scaled(base, merged_at_one, scale: float):
    return jax.tree_util.tree_map(lambda b, m: b + scale * (m - b), base, merged_at_one)


def run_recipe(recipe: Recipe, testbed: Testbed, settings: Settings, key) -> dict:
    """Tune `recipe` on the validation split (mean accuracy over tasks), then score the chosen merge on test."""
    started = time.perf_counter()
    best = (-1.0, None)
    for point in _grid_points(recipe.grid):
        params = {**recipe.fixed, **point}
        merged = merge(recipe, testbed, key, params)
        for scale in settings.scales if recipe.scale else (None,):
            candidate = merged if scale is None else _scaled(testbed.base, merged, scale)
            val = float(np.mean(list(scores(candidate, testbed, "val").values())))
            if val > best[0]:
                best = (val, params if scale is None else {**params, recipe.scale: scale})
    tuning_s = time.perf_counter() - started

    val_average, chosen = best
    started = time.perf_counter()
    merged = jax.block_until_ready(merge(recipe, testbed, key, chosen))
    merge_s = time.perf_counter() - started
    reported = {**chosen, "layout": "(out, in)"} if recipe.out_in else chosen
    return {"per_task": scores(merged, testbed), "hyperparameters": reported, "val_average": val_average,
            "merge_s": merge_s, "tuning_s": tuning_s}


# (label, granularity, extra arguments): AdaMerging and AdaMerging++ (its TIES variant, density 0.2 as the paper).
ADAMERGING = [
    ("adamerging (task-wise)", "task", {}),
    ("adamerging (layer-wise)", "layer", {}),
    ("adamerging++ (layer-wise)", "layer", {"method": "ties", "density": 0.2}),
]


def trim_retention(testbed: Testbed, density: float = 0.2) -> dict:
    """Each fine-tuned model's own-task accuracy when its task vector keeps only a fraction of its entries.

    "magnitude": the `density` largest-magnitude entries of each tensor
    (TIES' trim); "random": a random `density` of them, scaled by 1/density
    (DARE's drop). TIES rests on the first losing little, as it does for the
    papers' large models; NumPy, so no kernel is compiled for this check.
    """
    rng = np.random.default_rng(0)
    out = {"density": density, "magnitude": {}, "random": {}}
    for t in TASKS:
        for kind in ("magnitude", "random"):
            def trim(b, m):
                tau = np.asarray(m) - np.asarray(b)
                if kind == "magnitude":
                    k = int(density * tau.size)
                    cut = np.sort(np.abs(tau).ravel())[-k] if k else np.inf
                    tau = np.where(np.abs(tau) >= cut, tau, 0.0)
                else:
                    tau = np.where(rng.random(tau.shape) < density, tau / density, 0.0)
                return jnp.asarray(np.asarray(b) + tau, jnp.float32)

            out[kind][t] = scores(jax.tree_util.tree_map(trim, testbed.base, testbed.finetuned[t]), testbed)[t]
    for kind in ("magnitude", "random"):
        out[kind]["average"] = float(np.mean([out[kind][t] for t in TASKS]))
    return out


def run_adamerging(testbed: Testbed, settings: Settings, granularity: str, key, **method_params) -> dict:
    """AdaMerging (Yang et al., 2024): coefficients learned by entropy minimisation on unlabeled test inputs.

    Each task's entropy is computed with that task's own head (a dict of
    apply functions), on batches of its test inputs (labels unused), as in the paper.
    """
    from jaxmerge.learn import adamerging

    apply_fns = {t: (lambda body, x, head=testbed.heads[t]: logits(body, head, x)) for t in TASKS}
    batches = {}
    for t in TASKS:
        x = testbed.test[t].x
        n = len(x) // settings.ada_batch * settings.ada_batch  # one batch shape: drop the ragged end
        order = np.random.default_rng(settings.seed).permutation(len(x))[:n]
        batches[t] = list(x[order].reshape(-1, settings.ada_batch, x.shape[1]))
    started = time.perf_counter()
    res = adamerging(apply_fns, testbed.base, [testbed.finetuned[t] for t in TASKS], batches,
                     granularity=granularity, init=0.3, steps=settings.ada_steps, learning_rate=1e-3,
                     key=key, **method_params)
    jax.block_until_ready(res.params)
    elapsed = time.perf_counter() - started
    coefficients = np.round(np.asarray(res.coefficients), 3).tolist()
    return {"per_task": scores(res.params, testbed),
            "hyperparameters": {"granularity": granularity, "init": 0.3, "steps": settings.ada_steps,
                                "learning_rate": 1e-3, "batch": settings.ada_batch, **method_params,
                                "coefficients": coefficients},
            "entropy_first_last": [float(res.entropy_history[0]), float(res.entropy_history[-1])],
            "merge_s": elapsed, "tuning_s": 0.0}


# --------------------------------------------------------------------------- the report


def machine() -> dict:
    # Other processes share the cores: timings move with the load, so it is recorded.
    return {**base_machine(), "load_average_start": os.getloadavg()}


SHORT = {t: t.split("/")[0] for t in TASKS}  # column titles


def markdown_table(results: dict) -> str:
    names = list(TASKS)
    head = "| method | avg acc | norm. acc | " + " | ".join(names) + " | chosen | merge s | tuning s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, row in results["methods"].items():
        hp = {k: v for k, v in row["hyperparameters"].items() if k != "coefficients"}
        chosen = ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"
        lines.append(
            f"| {label} | {100 * row['average']:.1f} | {100 * row['normalized']:.1f} | "
            + " | ".join(f"{100 * row['per_task'][t]:.1f}" for t in names)
            + f" | {chosen} | {row['merge_s']:.2f} | {row['tuning_s']:.1f} |"
        )
    for label, reason in results["skipped"].items():
        lines.append(f"| {label} | skipped: {reason} |")
    return "\n".join(lines)


def _finish(row: dict, individual: dict[str, float]) -> dict:
    """Add the average and the normalised accuracy (merged / fine-tuned, per task, averaged)."""
    per_task = row["per_task"]
    return {"average": float(np.mean([per_task[t] for t in TASKS])),
            "normalized": float(np.mean([per_task[t] / individual[t] for t in TASKS])), **row}


def run(settings: Settings, log=print) -> dict:
    started = time.perf_counter()
    info = machine()
    testbed = build_testbed(settings, log)
    key = jax.random.key(settings.seed + 7)  # the DARE masks
    individual = {t: scores(testbed.finetuned[t], testbed)[t] for t in TASKS}
    rows = {
        "base (pretrained)": {"per_task": scores(testbed.base, testbed), "hyperparameters": {},
                              "merge_s": 0.0, "tuning_s": 0.0},
        "individual (fine-tuned)": {"per_task": individual, "hyperparameters": {}, "merge_s": 0.0, "tuning_s": 0.0},
    }
    wanted = (lambda label: True) if settings.methods is None else (lambda label: label in settings.methods)
    for recipe in recipes(settings):
        if wanted(recipe.label):
            rows[recipe.label] = run_recipe(recipe, testbed, settings, key)
            log(f"{recipe.label}: {100 * np.mean(list(rows[recipe.label]['per_task'].values())):.1f}% "
                f"(tuning {rows[recipe.label]['tuning_s']:.1f} s)")
    skipped = {}
    ada = [(label, granularity, extra) for label, granularity, extra in ADAMERGING if wanted(label)]
    try:
        import jaxmerge.learn  # noqa: F401
    except ImportError as err:
        reason = f"jaxmerge.learn is not importable ({err})"
        log(f"AdaMerging skipped: {reason}")
        skipped = {label: reason for label, _, _ in ada}
    else:
        for label, granularity, extra in ada:
            rows[label] = run_adamerging(testbed, settings, granularity, key, **extra)
            log(f"{label}: {100 * np.mean(list(rows[label]['per_task'].values())):.1f}% ({rows[label]['merge_s']:.1f} s)")
    return {
        "benchmark": "benchmarks.quality",
        "machine": info,
        "settings": dataclasses.asdict(settings),
        "seeds": {"data_split_and_training": settings.seed, "dare_key": settings.seed + 7,
                  "pixel_permutation": 1234},
        "tasks": {t: {"classes": TASKS[t][2], "val": len(testbed.val[t].y),
                      "test": len(testbed.test[t].y)} for t in TASKS},
        "architecture": {"body": list(SIZES), "heads": "per task, frozen: logit scale x cosine to class prototypes"},
        "diagnostics": {"trim_retention": trim_retention(testbed)},
        "methods": {label: _finish(row, individual) for label, row in rows.items()},
        "skipped": skipped,
        "testbed_s": testbed.train_seconds,
        "total_s": time.perf_counter() - started,
        "load_average_end": os.getloadavg(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="less training, smaller grids (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file (default benchmarks/results/quality.json, quality-quick.json with --quick)")
    args = parser.parse_args(argv)
    settings = Settings.quick(args.seed) if args.quick else Settings(seed=args.seed)
    results = run(settings)
    results["quick"] = args.quick
    info = results["machine"]
    print(f"\n# {info['date']} {info['processor']} x{info['cpu_count']} | jax {info['jax']} ({info['device']}) | "
          f"testbed {results['testbed_s']:.0f} s, total {results['total_s']:.0f} s\n")
    print(markdown_table(results))
    out = Path(args.out or f"benchmarks/results/quality{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)  # atomic: a reader never sees half a file
    print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    main()
