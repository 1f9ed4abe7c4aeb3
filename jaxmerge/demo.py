"""`jaxmerge demo`: a small, real merging experiment that needs no download.

A two-layer MLP (plain JAX + optax) is pretrained on a small shared slice of
scikit-learn's handwritten digits, then fine-tuned into three specialists,
each on one group of digits (0-3, 4-6, 7-9). The specialists' task vectors are
merged with the task-vector methods at a few densities, with their scaling
coefficient and density tuned on a validation split in one compiled call
(`jaxmerge.search_coefficients`), with the data-free subspace methods (TSV-M,
Iso-C, WUDI), and with AdaMerging (coefficients learned by entropy
minimisation on the unlabeled validation inputs, `jaxmerge.adamerging`). Each
model is scored on each task's held-out test digits: the shape of the
TIES-Merging paper's comparison table (Yadav et al., 2023, arXiv:2306.01708),
in miniature. The validation half of the held-out digits is used only for
tuning; the table reports the other half.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.learn import adamerging, search_coefficients
from jaxmerge.methods.pytree import merge_params

TASKS = {"digits 0-3": (0, 1, 2, 3), "digits 4-6": (4, 5, 6), "digits 7-9": (7, 8, 9)}
HIDDEN = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much training the demo does (`quick` is sized for CI)."""

    pretrain_steps: int = 150
    finetune_steps: int = 300
    densities: tuple[float, ...] = (0.2, 0.5, 0.8)
    adamerging_steps: int = 200
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> Settings:
        return cls(pretrain_steps=100, finetune_steps=120, densities=(0.2, 0.8), adamerging_steps=60, seed=seed)


def load_data(seed: int):
    """Digits split into train/held-out, scaled to [0, 1]; the shared pretraining slice is 5% of train.

    Returns:
      (x_train, y_train), (x_held, y_held), shared: the held-out 40% is split
      in half by `validation_split` (tuning) and test (the table).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    shared = rng.choice(len(x_train), size=len(x_train) // 20, replace=False)
    return (x_train, y_train), (x_test, y_test), shared


def init_params(key, sizes=(64, HIDDEN, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"layer{i}": {
            "w": jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m),
            "b": jnp.zeros((n,), jnp.float32),
        }
        for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def logits(params, x):
    h = jax.nn.relu(x @ params["layer0"]["w"] + params["layer0"]["b"])
    return h @ params["layer1"]["w"] + params["layer1"]["b"]


def loss_fn(params, x, y):
    return -jnp.mean(jax.nn.log_softmax(logits(params, x))[jnp.arange(y.shape[0]), y])


def train(params, x, y, steps: int, seed: int, desc: str, learning_rate: float = 3e-3, batch: int = 64):
    """Adam on minibatches, with a tqdm progress bar."""
    import optax
    from tqdm.auto import tqdm

    opt = optax.adam(learning_rate)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
        idx = rng.integers(0, len(x), size=min(batch, len(x)))
        params, state = step(params, state, x[idx], y[idx])
    return params


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y))


def validation_split(held):
    """Held-out digits -> (validation, test): alternate entries, so both keep every digit."""
    x, y = held
    return (x[0::2], y[0::2]), (x[1::2], y[1::2])


def task_average_accuracy(params, x, y) -> jax.Array:
    """Mean over the tasks of each task's accuracy (traceable: the search's validation metric)."""
    correct = jnp.argmax(logits(params, x), axis=-1) == y
    per_task = [jnp.sum(jnp.where(np.isin(y, d), correct, False)) / np.isin(y, d).sum() for d in TASKS.values()]
    return jnp.mean(jnp.stack(per_task))


def per_task_accuracy(params, test) -> dict[str, float]:
    x, y = test
    scores = {}
    for name, digits in TASKS.items():
        keep = np.isin(y, digits)
        scores[name] = accuracy(params, x[keep], y[keep])
    scores["average"] = float(np.mean([scores[name] for name in TASKS]))
    return scores


def merge_recipes(densities):
    """(label, method, weights, density): sum-style methods scale each task vector by 0.5,
    TIES-style methods average agreeing entries (weight 1), as in the TIES paper."""
    recipes = [("task_arithmetic", "task_arithmetic", 0.5, None)]
    for d in densities:
        recipes += [
            (f"magnitude_prune d={d}", "magnitude_prune", 0.5, d),
            (f"ties d={d}", "ties", 1.0, d),
            (f"dare_linear d={d}", "dare_linear", 0.5, d),
            (f"dare_ties d={d}", "dare_ties", 1.0, d),
        ]
    return recipes


LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # the papers' grid of scaling coefficients, in miniature


def tuned_and_learned(base, specialists, validation, settings: Settings, key):
    """(label, merged params) of the tuned, data-free subspace and learned merges."""
    xv, yv = validation
    evaluate = lambda params: task_average_accuracy(params, xv, yv)  # noqa: E731
    out = []
    ta = search_coefficients(evaluate, base, specialists, method="task_arithmetic", grid={"lambda": LAMBDAS})
    out.append((f"task_arithmetic tuned (lambda={ta.best['lambda']:g})", ta.params))
    ties = search_coefficients(
        evaluate, base, specialists, method="ties",
        grid={"lambda": LAMBDAS + (1.2, 1.5), "density": settings.densities},
    )
    out.append((f"ties tuned (lambda={ties.best['lambda']:g}, d={ties.best['density']:g})", ties.params))
    for method in ("tsv_m", "iso_c", "wudi"):
        # The MLP's kernels are (in, out), as Flax stores them: WUDI must be told (TSV-M and Iso-C need not).
        layout = {"layout": "in_out"} if method == "wudi" else {}
        out.append((method, merge_params(specialists, method=method, base=base, **layout)))
    # AdaMerging: per-task entropy on the unlabeled validation inputs (labels unused), summed over tasks.
    batches = {name: [xv[np.isin(yv, digits)]] for name, digits in TASKS.items()}
    for granularity in ("task", "layer"):
        learned = adamerging(
            logits, base, specialists, batches, granularity=granularity, steps=settings.adamerging_steps,
            learning_rate=1e-2, key=key,
        )
        out.append((f"AdaMerging {granularity}-wise", learned.params))
    return out


def run(settings: Settings) -> list[tuple[str, dict[str, float]]]:
    """Train, fine-tune, merge and score. Returns (model name, scores) rows."""
    (x_train, y_train), held, shared = load_data(settings.seed)
    validation, test = validation_split(held)
    key = jax.random.key(settings.seed)
    base = train(init_params(key), x_train[shared], y_train[shared], settings.pretrain_steps, settings.seed, "pretrain")
    rows = [("base (pretrained)", per_task_accuracy(base, test))]
    specialists = []
    for i, (name, digits) in enumerate(TASKS.items()):
        keep = np.isin(y_train, digits)
        tuned = train(base, x_train[keep], y_train[keep], settings.finetune_steps, settings.seed + i + 1, f"fine-tune {name}")
        specialists.append(tuned)
        rows.append((f"specialist {name}", per_task_accuracy(tuned, test)))
    merge_key = jax.random.fold_in(key, 1)
    for label, method, weight, density in merge_recipes(settings.densities):
        merged = merge_params(
            specialists, [weight] * len(specialists), method=method, base=base, density=density, key=merge_key
        )
        rows.append((label, per_task_accuracy(merged, test)))
    for label, merged in tuned_and_learned(base, specialists, validation, settings, merge_key):
        rows.append((label, per_task_accuracy(merged, test)))
    return rows


def references(rows) -> dict[str, float]:
    """The base's average accuracy and the specialists' on their own tasks (the plot's reference lines)."""
    scores = dict(rows)
    own = [scores[f"specialist {name}"][name] for name in TASKS]
    return {"base": scores["base (pretrained)"]["average"], "individual": float(np.mean(own))}


def format_table(rows) -> str:
    names = list(TASKS) + ["average"]
    width = max(len(label) for label, _ in rows) + 2
    lines = ["model".ljust(width) + "".join(n.rjust(12) for n in names)]
    lines.append("-" * len(lines[0]))
    for label, scores in rows:
        lines.append(label.ljust(width) + "".join(f"{100 * scores[n]:11.1f}%" for n in names))
    return "\n".join(lines)


def save_plot(rows, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in rows]
    names = list(TASKS)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    y = np.arange(len(rows))
    height = 0.8 / (len(names) + 1)
    for i, name in enumerate(names):
        ax.barh(y + i * height, [100 * s[name] for _, s in rows], height, label=name, alpha=0.7)
    ax.barh(y + len(names) * height, [100 * s["average"] for _, s in rows], height, label="average", color="black")
    ax.set_yticks(y + 0.4 - height / 2, labels)
    ax.invert_yaxis()
    ref = references(rows)
    ax.axvline(100 * ref["base"], color="gray", linestyle="--", linewidth=1, label=f"base average {100 * ref['base']:.1f}%")
    ax.axvline(
        100 * ref["individual"], color="green", linestyle=":", linewidth=1.2,
        label=f"specialists on own task {100 * ref['individual']:.1f}%",
    )
    ax.set_xlabel("test accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_title("jaxmerge demo: three digit specialists merged into one model")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG
    return path


def main(quick: bool = False, seed: int = 0, output_dir: str = "jaxmerge-demo") -> int:
    started = time.perf_counter()
    settings = Settings.quick(seed) if quick else Settings(seed=seed)
    rows = run(settings)
    print(format_table(rows))
    plot = save_plot(rows, Path(output_dir) / "merge_accuracy.png")
    print(f"\nplot saved to {plot.resolve()}")
    print(f"finished in {time.perf_counter() - started:.1f} s on {jax.devices()[0].platform}")
    return 0
