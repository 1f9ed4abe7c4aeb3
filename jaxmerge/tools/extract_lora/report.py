"""What `jaxmerge extract-lora` tells: the per-module report (JSON and printed), the command line and the
README card (mergekit's LoRA card)."""

from __future__ import annotations

import shlex

import numpy as np
import yaml

from jaxmerge import __version__
from jaxmerge.tools.extract_lora.plan import ExtractionPlan
from jaxmerge.tools.extract_lora.svd import DEFAULT_MAX_RANK

__all__ = ["REPORT_FILE", "command_line", "format_report", "report_dict"]

REPORT_FILE = "extract_lora_report.json"


def report_dict(plan: ExtractionPlan) -> dict:
    """The report written as extract_lora_report.json."""
    done = [r for r in plan.reports if r.rank > 0]
    worst = max(done, key=lambda r: r.relative_error, default=None)
    return {
        "jaxmerge_version": __version__,
        "model": plan.model,
        "base": plan.base,
        "options": plan.options,
        "module_types": plan.module_types,
        "r": plan.config()["r"],
        "rank_rule": plan.rank_rule,
        "lora_parameters": plan.lora_parameters,
        "modules": [r.as_dict() for r in plan.reports],
        "modules_to_save": plan.modules_to_save,
        "saved_whole": [w.outputs[0].name for w in plan.work if w.action == "save"],
        "skipped": plan.skipped,
        "summary": {
            "decomposed": len(done),
            "mean_energy_kept": float(np.mean([r.energy_kept for r in done])) if done else None,
            "worst_relative_error": worst.relative_error if worst else None,
            "worst_module": worst.name if worst else None,
        },
    }


def format_report(plan: ExtractionPlan) -> str:
    """The per-module table the command prints."""
    width = max((len(r.name) for r in plan.reports), default=6)
    lines = [f"{'module':<{width}}  {'shape':>12}  {'rank':>5}  {'energy kept':>11}  {'rel. error':>10}  decomposition"]
    for r in plan.reports:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}}  {shape:>12}  {r.rank:>5}  {100 * r.energy_kept:>10.2f}%  "
                     f"{r.relative_error:>10.4f}  {r.decomposition}")
    summary = report_dict(plan)["summary"]
    lines.append(f"ranks: {plan.rank_rule}; {plan.lora_parameters} LoRA parameters")
    lines.append(f"{summary['decomposed']} modules decomposed (r {plan.config()['r']}), mean energy kept "
                 f"{100 * (summary['mean_energy_kept'] or 0):.2f}%, worst relative error "
                 f"{summary['worst_relative_error'] or 0:.4f} ({summary['worst_module']}); "
                 f"{len(plan.modules_to_save)} module names saved whole"
                 + (f", {len(plan.skipped)} modules skipped" if plan.skipped else ""))
    return "\n".join(lines)


def _python_invocation(plan: ExtractionPlan) -> str:
    return f"jaxmerge.tools.extract_lora.extract_lora_adapter({plan.model!r}, {plan.base!r}, {str(plan.output)!r}, " + \
        ", ".join(f"{k}={v!r}" for k, v in plan.options.items()) + ")"


def command_line(model: str, base: str, output: str, **options) -> str:
    """The `jaxmerge extract-lora` command for these options (non-defaults only), for the card."""
    words = ["jaxmerge", "extract-lora", "--model", str(model), "--base", str(base), "--output", str(output)]
    defaults = {"max_rank": DEFAULT_MAX_RANK, "distribute_scale": True, "embed_lora": False, "sv_epsilon": 0.0,
                "skip_undecomposable": False, "decomposition": "auto", "seed": 0, "rank_by": None,
                "rank_budget": None}
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name in ("modules_to_save", "include_regexes", "exclude_regexes"):
            flag = {"modules_to_save": "--save-module", "include_regexes": "--include-regex",
                    "exclude_regexes": "--exclude-regex"}[name]
            for item in value or ():
                words += [flag, item]
        elif name in defaults and value == defaults[name]:
            continue
        elif isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _card(plan: ExtractionPlan, invocation: str) -> str:
    """README.md: mergekit's LoRA card (`generate_card_lora`), naming jaxmerge and the decomposition."""
    hub = [h for h in (plan.hub_ids.get("base"), plan.hub_ids.get("model")) if h]
    meta = yaml.dump({"base_model": hub, "tags": ["jaxmerge", "peft"], "library_name": "peft"})

    def link(ref: str, hub_id: str | None) -> str:
        return f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else ref

    details = (f"This LoRA adapter was extracted from {link(plan.model, plan.hub_ids.get('model'))} "
               f"and uses {link(plan.base, plan.hub_ids.get('base'))} as a base.")
    if plan.base_vocab and plan.final_vocab and plan.base_vocab != plan.final_vocab:
        verb = "extended" if plan.final_vocab > plan.base_vocab else "reduced"
        details += (f"\n\n [!WARNING]\n> The vocabulary size has been {verb} from the base model's {plan.base_vocab} "
                    f"to {plan.final_vocab}. To load this adapter, you must first call "
                    f"`model.resize_token_embeddings({plan.final_vocab})`.")
    summary = report_dict(plan)["summary"]
    methods = sorted({r.decomposition for r in plan.reports if r.rank > 0})
    details += (f"\n\n{summary['decomposed']} modules were decomposed ({' and '.join(methods)} SVD, rank up to "
                f"{plan.config()['r']}); they keep {100 * (summary['mean_energy_kept'] or 0):.2f}% of the task "
                f"vector's energy on average (per-module figures in `{REPORT_FILE}`). Ranks: {plan.rank_rule}; "
                f"{plan.lora_parameters} LoRA parameters.")
    name = plan.output.name or "Untitled LoRA Model (1)"
    return (f"---\n{meta}---\n# {name}\n\nThis is a LoRA extracted from a language model. It was extracted using "
            f"jaxmerge (`jaxmerge extract-lora`, mergekit-extract-lora's rules).\n\n## LoRA Details\n\n{details}\n\n"
            f"### Parameters\n\nThe following command was used to extract this LoRA adapter:\n\n```sh\n"
            f"{invocation}\n```\n")
