"""The `jaxmerge` command line (also `python -m jaxmerge`)."""

from __future__ import annotations

import argparse
import atexit
import os
import re
import sys
import warnings


def _demo(args: argparse.Namespace) -> int:
    from jaxmerge import demo

    return demo.main(quick=args.quick, seed=args.seed, output_dir=args.output_dir)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


_NUMBERS = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)?)*,?")


def _join_weights(argv: list[str]) -> list[str]:
    """`--weights -0.5,1,0.7` and `--weights -0.5 1 0.7` -> `--weights=-0.5,1,0.7`.

    argparse takes `-0.5,...` for an option and stops at the first value; the
    numbers after --weights are joined into one argument first.
    """
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--weights":
            j = i + 1
            while j < len(argv) and _NUMBERS.fullmatch(argv[j]):
                j += 1
            if j > i + 1:
                out.append("--weights=" + ",".join(a.strip(",") for a in argv[i + 1 : j]))
                i = j
                continue
        out.append(argv[i])
        i += 1
    return out


_RECIPE_FLAGS = ("method", "weights", "density", "base", "majority_sign_method", "param", "svd_rank", "svd_clamp")


def _merge(args: argparse.Namespace) -> int:
    from jaxmerge.engine._atomic import sigterm_before_writing
    from jaxmerge.engine.compile_cache import enable_compile_cache
    from jaxmerge.formats.safetensors_io import CheckpointError

    # Before any JAX work: later runs load the merge kernels instead of compiling them
    # (~/.cache/jaxmerge/xla; JAXMERGE_COMPILE_CACHE=0 turns it off).
    enable_compile_cache()

    group = None
    try:
        # Warnings (a recipe's ignored parameters, a density that prunes nothing) are one line each.
        _warnings_as_lines("merge")
        if args.density is not None and args.density >= 1:
            warnings.warn(f"--density {args.density:g} is 1 or more: nothing is pruned", UserWarning, stacklevel=1)
        # SIGTERM while planning (opening checkpoints, resolving Hub ids) says so in one line;
        # atomic_directory takes over while the output is written.
        with sigterm_before_writing(args.output or "the output"):
            group = _join_group(args)  # first: a process that fails below still takes part in the vote
            return _merge_checked(args, group)
    except (CheckpointError, ValueError, FileExistsError, TypeError) as err:
        if group is not None and not group.voted:
            group.ready(False)  # tell the other processes, which wait for this one's vote
        print(f"jaxmerge merge: error: {err}", file=sys.stderr)
        return 2


def _warnings_as_lines(command: str) -> None:
    """Show every warning as one line `jaxmerge COMMAND: warning: ...` on stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"jaxmerge {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def _merge_checked(args: argparse.Namespace, group: _Group | None) -> int:
    """The merge command's work; errors are raised for `_merge` to print."""
    from pathlib import Path

    from jaxmerge.tools.adapters import COMBINATION_TYPES, merge_lora
    from jaxmerge.recipes.orbax import merge_orbax_recipe, plan_orbax_recipe, uses_orbax
    from jaxmerge.recipes.schema import load_recipe, recipe_from_flags
    from jaxmerge.recipes.plan import merge_recipe, plan_recipe
    from jaxmerge.formats.safetensors_io import CheckpointError

    if len(args.inputs) == 1 and args.inputs[0].endswith((".yaml", ".yml")):
        for name in _RECIPE_FLAGS:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise CheckpointError(f"{flag} does not combine with a recipe: set it in {args.inputs[0]}")
        recipe = load_recipe(args.inputs[0], strict=args.strict)
    else:
        if any(p.endswith((".yaml", ".yml")) for p in args.inputs):
            raise CheckpointError("give one recipe.yml alone, or checkpoints with --method")
        if args.method is None:
            raise CheckpointError("--method is required for checkpoints (or give one recipe.yml)")
        adapters = [Path(p) / "adapter_config.json" for p in args.inputs]
        if any(a.exists() for a in adapters):
            if group is not None:
                raise CheckpointError("multi-process merging applies to checkpoints; LoRA adapters merge in one process")
            return _merge_adapters(args, adapters, COMBINATION_TYPES, merge_lora)
        params = {"density": args.density, "majority_sign_method": args.majority_sign_method, **dict(args.param or [])}
        recipe = recipe_from_flags(
            args.inputs, method=args.method, weights=args.weights, base=args.base, params=params,
            seed=args.seed or 0, max_shard_size=args.max_shard_size or "5GB",
        )
    if args.output is None:
        raise CheckpointError("--output is required")
    orbax = uses_orbax(recipe)
    if orbax and args.max_shard_size is not None:
        raise CheckpointError("--max-shard-size applies to safetensors outputs; Orbax writes its own files")
    if args.dry_run:
        if orbax:
            plan = plan_orbax_recipe(recipe, args.output, seed=args.seed)
        else:
            _, plan = plan_recipe(recipe, args.output, seed=args.seed, max_shard_size=args.max_shard_size)
        if Path(args.output).exists() and not args.force:
            raise FileExistsError(f"{args.output} exists; pass --force to replace it")
        print(plan.describe())
        print("dry run: nothing written")
        return 0
    mesh = None
    if args.devices is not None:
        from jaxmerge.core.sharding import make_mesh

        mesh = make_mesh(args.devices)
    processes = None
    if group is not None:
        if orbax:
            raise CheckpointError("multi-process merging applies to safetensors checkpoints; Orbax checkpoints merge in one process (use --devices)")
        if not group.ready(True):
            raise CheckpointError("another merging process failed before merging; nothing was written")
        processes = group.processes
    if orbax:
        merge_orbax_recipe(
            recipe, args.output, seed=args.seed, force=args.force, progress=not args.quiet, mesh=mesh,
            allow_nonfinite=args.allow_nonfinite,
        )
    else:
        merge_recipe(
            recipe, args.output, seed=args.seed, max_shard_size=args.max_shard_size, force=args.force,
            progress=not args.quiet, mesh=mesh, allow_nonfinite=args.allow_nonfinite, processes=processes,
        )
    print(f"merged into {Path(args.output).resolve()}")
    return 0


_GROUP_FLAGS = ("coordinator", "num_processes", "process_id")


class _Group:
    """This process's merging group (--coordinator ...) and its one vote before merging."""

    def __init__(self, processes):
        self.processes = processes
        self.voted = False

    def ready(self, ok: bool) -> bool:
        """Vote whether this process can merge; True when every process can."""
        self.voted = True
        return self.processes.all_true(ok)


def _join_group(args: argparse.Namespace) -> _Group | None:
    """With --coordinator/--num-processes/--process-id: join the merging group (None: merge alone)."""
    from jaxmerge.formats.safetensors_io import CheckpointError

    given = [name for name in _GROUP_FLAGS if getattr(args, name) is not None]
    if not given:
        return None
    if len(given) < len(_GROUP_FLAGS):
        missing = [f"--{n.replace('_', '-')}" for n in _GROUP_FLAGS if n not in given]
        raise CheckpointError(f"multi-process merging needs --coordinator, --num-processes and --process-id; missing {', '.join(missing)}")
    if args.dry_run:
        raise CheckpointError("--dry-run plans in one process; leave out --coordinator, --num-processes and --process-id")
    from jaxmerge.engine import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    processes = distributed.current()
    return _Group(processes) if processes is not None else None


def _merge_adapters(args, adapters, combination_types, merge_lora) -> int:
    """PEFT LoRA adapter directories, merged as PEFT's add_weighted_adapter does."""
    from jaxmerge.formats.safetensors_io import CheckpointError

    if not all(a.exists() for a in adapters):
        raise CheckpointError("inputs mix LoRA adapter directories and checkpoints: merge one kind at a time")
    if args.method not in combination_types:
        raise CheckpointError(f"for LoRA adapters --method is a combination type, one of {list(combination_types)}; got {args.method!r}")
    if args.param:
        raise CheckpointError("--param applies to checkpoints; LoRA adapters take --density, --majority-sign-method, --svd-rank, --svd-clamp")
    if args.output is None:
        raise CheckpointError("--output is required")
    weights = args.weights if args.weights is not None else [1.0] * len(adapters)
    if args.dry_run:
        print(f"merge {len(adapters)} LoRA adapters with {args.method} into {args.output} "
              f"(weights {weights}, density {args.density}, seed {args.seed or 0}); nothing written")
        return 0
    merge_lora(
        args.inputs, weights, args.output, combination_type=args.method, density=args.density,
        majority_sign_method=args.majority_sign_method or "total", svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp, seed=args.seed or 0, force=args.force,
    )
    print(f"merged into {__import__('pathlib').Path(args.output).resolve()}")
    return 0


def _multi(args: argparse.Namespace) -> int:
    """`jaxmerge multi FILE.yml -I DIR`: mergekit-multi's files (jaxmerge/tools/multi.py)."""
    from jaxmerge.engine.compile_cache import enable_compile_cache
    from jaxmerge.tools import multi

    enable_compile_cache()
    _warnings_as_lines("multi")
    force = args.force or not args.lazy
    try:
        stages = multi.load_multi(args.config_file, intermediate_dir=args.intermediate_dir, out_path=args.out_path,
                                  strict=args.strict)
        plans = multi.check_stages(stages, force=force, seed=args.seed, max_shard_size=args.max_shard_size)
        if args.dry_run:
            for stage in stages:
                plan, label = plans[stage.name], stage.where.split(": ", 1)[1]
                if plan == "skip":
                    print(f"{label}: {stage.output} is complete; skipped (--force reruns it)")
                elif plan is None:
                    print(f"{label}: into {stage.output} after {', '.join(stage.needs)} (planned once they exist)")
                else:
                    print(f"{label}: " + plan.describe())
            print("dry run: nothing written")
            return 0
        multi.run_stages(stages, force=force, seed=args.seed, max_shard_size=args.max_shard_size,
                         progress=not args.quiet, allow_nonfinite=args.allow_nonfinite)
    except (ValueError, OSError) as err:
        print(f"jaxmerge multi: error: {err}", file=sys.stderr)
        return 2
    return 0


def _moe(args: argparse.Namespace) -> int:
    """`jaxmerge moe CONFIG.yml OUT`: mergekit-moe's configurations (jaxmerge/tools/moe)."""
    from pathlib import Path

    from jaxmerge.engine._atomic import sigterm_before_writing
    from jaxmerge.engine.compile_cache import enable_compile_cache
    from jaxmerge.tools import moe

    enable_compile_cache()
    _warnings_as_lines("moe")
    output = args.output or args.out_path
    try:
        if output is None:
            raise ValueError("give the output directory: jaxmerge moe CONFIG.yml OUT (or --output OUT)")
        if args.output and args.out_path and args.output != args.out_path:
            raise ValueError(f"two outputs given: {args.out_path} and --output {args.output}")
        options = dict(seed=args.seed, allow_all_same=args.allow_all_same, strict=args.strict,
                       max_shard_size=args.max_shard_size)
        with sigterm_before_writing(output):
            if args.dry_run:
                plan, merged = moe.dry_run(args.config_file, output, **options)
                print(f"{plan.architecture.name} with {len(plan.config.experts)} experts"
                      f" ({plan.config.experts_per_token} per token), gates from {plan.config.gate_mode}")
                print(merged.describe())
                print("dry run: nothing written")
                return 0
            plan, _ = moe.build_moe(args.config_file, output, force=args.force, progress=not args.quiet,
                                    allow_nonfinite=args.allow_nonfinite, **options)
    except (ValueError, OSError) as err:
        print(f"jaxmerge moe: error: {err}", file=sys.stderr)
        return 2
    print(f"{plan.architecture.name} mixture of {len(plan.config.experts)} experts written to {Path(output).resolve()}")
    return 0


def _extract_lora(args: argparse.Namespace) -> int:
    """`jaxmerge extract-lora --model FT --base BASE --output OUT`: mergekit-extract-lora (jaxmerge/tools/extract_lora/)."""
    from jaxmerge.engine._atomic import sigterm_before_writing
    from jaxmerge.engine.compile_cache import enable_compile_cache
    from jaxmerge.formats.safetensors_io import CheckpointError
    from jaxmerge.tools import extract_lora as xl

    # Before any JAX work, as for merge: later runs load the SVD kernels instead of compiling them.
    enable_compile_cache()

    def warn(line: str) -> None:
        if not args.quiet:
            print(f"jaxmerge extract-lora: warning: {line}", file=sys.stderr)

    options = dict(
        max_rank=args.max_rank, distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
        modules_to_save=args.modules_to_save or [], include_regexes=args.include_regexes or [],
        exclude_regexes=args.exclude_regexes or [], sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable, decomposition=args.decomposition, seed=args.seed,
        rank_by=args.rank_by, rank_budget=args.rank_budget,
    )
    try:
        with sigterm_before_writing(args.output):
            plan = xl.extract_lora_adapter(
                args.model, args.base, args.output, force=args.force, progress=not args.quiet, warn=warn,
                invocation=xl.command_line(args.model, args.base, args.output, **options), **options,
            )
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"jaxmerge extract-lora: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(xl.format_report(plan))
    from pathlib import Path

    print(f"LoRA adapter extracted to {Path(args.output).resolve()} (report: {xl.REPORT_FILE})")
    return 0


def _param(text: str) -> tuple[str, object]:
    """NAME=VALUE for --param: numbers, true/false, or a string; the method table checks it."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    import yaml

    return name.strip(), yaml.safe_load(value)


def _methods(args: argparse.Namespace) -> int:
    from jaxmerge.methods import _table as table

    methods = table.all_methods()
    if args.name:
        try:
            methods = (table.get(args.name),)
        except table.MethodError as err:
            print(f"jaxmerge methods: error: {err}", file=sys.stderr)
            return 2
    if args.markdown:
        print("| method | what it does | base | models | parameters (default) | paper |")
        print("| --- | --- | --- | --- | --- | --- |")
    for m in methods:
        models = f"{m.min_models}+" if m.max_models is None else (
            str(m.min_models) if m.min_models == m.max_models else f"{m.min_models}-{m.max_models}"
        )
        if args.markdown:
            params = ", ".join(
                f"`{p.name}`" + ("" if p.required else f" ({'auto' if p.default is None else p.default})") + ("*" if p.scope.value != "shared" else "")
                for p in m.params
            )
            print(f"| `{m.name}` | {m.summary}{' (random)' if m.random else ''} | {m.base.value} | {models} | {params} | {m.paper} |")
            continue
        flags = [f"base {m.base.value}", f"models {models}"] + (["random (seeded)"] if m.random else [])
        print(f"{m.name}: {m.summary} [{', '.join(flags)}]")
        print(f"  paper: {m.paper}")
        for p in m.params:
            print(f"  {p.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmerge",
        description="Model merging (TIES, DARE, task arithmetic) in JAX.",
    )
    from jaxmerge import __version__

    parser.add_argument("--version", action="version", version=f"jaxmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train three small digit classifiers, merge them with every method, print a table and save a plot",
        description=(
            "Pretrain a small MLP on scikit-learn's digits, fine-tune three specialists "
            "(digits 0-3, 4-6, 7-9), merge them with every jaxmerge method at a few densities, "
            "print per-task accuracy and save a bar chart. Needs no download."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="fewer training steps and densities (CI-sized)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, training and DARE masks (default 0)")
    demo.add_argument(
        "--output-dir", default="jaxmerge-demo", help="where the plot is written (default ./jaxmerge-demo)"
    )
    demo.set_defaults(run=_demo)

    merge = commands.add_parser(
        "merge",
        help="merge checkpoints (safetensors, .bin, Orbax), mergekit recipes or PEFT LoRA adapters from disk",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Merge models from disk, tensor by tensor, without loading whole models.\n\n"
            "INPUTS are checkpoints (Hugging Face model directories, Hub repo ids, a .safetensors\n"
            "file or a sharded checkpoint's index JSON; PyTorch .bin files, read without running\n"
            "their code), Orbax checkpoint directories (the output\n"
            "is then an Orbax checkpoint) or PEFT LoRA adapter directories, merged\n"
            "with --method; or one recipe.yml in mergekit's configuration schema (see\n"
            "jaxmerge/recipes/schema.py: models, slices, modules, tokenizers, chat templates,\n"
            "MODEL+LORA references), which sets the method and its parameters itself.\n\n"
            "The output appears only when complete (built in a temporary directory beside it);\n"
            "inputs are opened read-only. Model directories give a loadable model directory:\n"
            "config.json, generation_config.json, tokenizer, README.md and the recipe\n"
            "(mergekit_config.yml). The recipe, seed, jaxmerge version and the inputs' absolute\n"
            "paths and sizes are recorded (jaxmerge_recipe.json), so a merge can be repeated bit for bit."
        ),
        epilog=(
            "examples:\n"
            "  jaxmerge merge ft_a/ ft_b/ ft_c/ --base base/ --method ties --density 0.2 --output merged/\n"
            "  jaxmerge merge orbax_a/ orbax_b/ --base orbax_base/ --method ties --density 0.2 --output merged_orbax/\n"
            "  jaxmerge merge lora_a/ lora_b/ --method dare_ties --weights 1,0.7 --density 0.5 --output lora_merged/\n"
            "  jaxmerge merge mergekit_config.yml --output merged/\n"
            "  jaxmerge merge recipe.yml --output merged/ --dry-run"
        ),
    )
    merge.add_argument("inputs", nargs="+", metavar="INPUT", help="checkpoints, adapter directories, or one recipe.yaml")
    merge.add_argument(
        "--method",
        help="required for checkpoints and adapters without a recipe. Checkpoints: any method of `jaxmerge methods`; "
        "adapters: a LoRA combination type (linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, "
        "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)",
    )
    merge.add_argument(
        "--weights", type=_floats,
        help="one weight per input, comma or space separated, negatives allowed: --weights -0.5,1,0.7 (default: 1 each)",
    )
    merge.add_argument(
        "--density", type=float,
        help="fraction of each task vector kept by the pruning methods: >= 0, and 1 or more keeps everything",
    )
    merge.add_argument("--majority-sign-method", choices=["total", "frequency"], help="sign election of ties/dare_ties (default total)")
    merge.add_argument("--seed", type=int, help="seed of the random methods' masks (default 0, or the recipe's jaxmerge.seed)")
    merge.add_argument("--base", help="base checkpoint: task vectors are input - base, the result base + merge")
    merge.add_argument("--output", help="output directory (created atomically)")
    merge.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    merge.add_argument(
        "--param", action="append", type=_param, metavar="NAME=VALUE",
        help="any other parameter of the method, e.g. --param t=0.5 --param normalize=false (see `jaxmerge methods`)",
    )
    merge.add_argument("--svd-rank", type=int, help="rank of the *_svd LoRA types (default: the largest input rank)")
    merge.add_argument("--svd-clamp", type=float, help="quantile at which *_svd factors are clamped")
    merge.add_argument("--devices", type=int, help="shard each tensor over this many devices (JAX's SPMD; checkpoints only)")
    merge.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help="merge with several processes (hosts reading shared storage): process 0's address; each process "
        "writes its share of the output shards (see README, 'Past one machine')",
    )
    merge.add_argument("--num-processes", type=int, help="processes in the merging group (with --coordinator)")
    merge.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1 (with --coordinator)")
    merge.add_argument("--force", action="store_true", help="replace an existing output")
    merge.add_argument(
        "--strict", action="store_true",
        help="refuse what mergekit accepts and ignores (a parameter the method does not take, a slice's "
        "residual_weight) instead of warning",
    )
    merge.add_argument(
        "--allow-nonfinite", action="store_true",
        help="merge inputs holding NaN or inf (by default such a tensor stops the merge, naming the file and tensor)",
    )
    merge.add_argument("--dry-run", action="store_true", help="print the plan (tensors, shapes, dtypes, peak memory); write nothing")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(run=_merge)

    multi = commands.add_parser(
        "multi",
        help="run a mergekit-multi file: several named recipes, later ones merging earlier ones' outputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Merge the recipes of a mergekit-multi file (YAML documents separated by ---, each a recipe\n"
            "with a name) in dependency order. Merge NAME is written to INTERMEDIATE_DIR/NAME, and a\n"
            "recipe naming NAME as a model (NAME or NAME+LORA) reads that output; the one recipe without\n"
            "a name, if any, is written to --out-path. Merges whose output is complete (config.json and\n"
            "weights) are skipped. The whole file is checked before the first merge (names, cycles,\n"
            "recipes, models); a failing merge stops the run and the merges before it stay."
        ),
        epilog=(
            "examples:\n"
            "  jaxmerge multi multi.yml --intermediate-dir merges/\n"
            "  jaxmerge multi multi.yml -I merges/ --out-path final/ --dry-run"
        ),
    )
    multi.add_argument("config_file", metavar="FILE.yml", help="the multi-merge file (mergekit-multi's format)")
    multi.add_argument(
        "-I", "--intermediate-dir", "--output-dir", dest="intermediate_dir", required=True, metavar="DIR",
        help="where each named merge is written (DIR/NAME)",
    )
    multi.add_argument("--out-path", help="where the unnamed (final) merge is written; required when the file has one")
    multi.add_argument(
        "--lazy", action=argparse.BooleanOptionalAction, default=True,
        help="skip merges whose output is complete (default); --no-lazy reruns them, as --force",
    )
    multi.add_argument("--force", action="store_true", help="rerun every merge, replacing its output")
    multi.add_argument("--seed", type=int, help="seed of the random methods' masks (default: each recipe's jaxmerge.seed, or 0)")
    multi.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    multi.add_argument("--strict", action="store_true", help="refuse what mergekit accepts and ignores, as `merge --strict`")
    multi.add_argument("--allow-nonfinite", action="store_true", help="merge inputs holding NaN or inf")
    multi.add_argument("--dry-run", action="store_true", help="check the file and print each merge's plan; write nothing")
    multi.add_argument("--quiet", action="store_true", help="no progress bars")
    multi.set_defaults(run=_multi)

    moe = commands.add_parser(
        "moe",
        help="build a mixture of experts from dense fine-tunes of one base (a mergekit-moe configuration)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Assemble a Mixtral, Qwen MoE, Qwen3 MoE or DeepSeek MoE model from a mergekit-moe\n"
            "configuration, unchanged: each expert's MLP becomes an expert of every layer, the rest comes\n"
            "from base_model, and the routers are initialised from the experts' prompts (gate_mode\n"
            "hidden, hidden_avg, hidden_last: the base model's hidden states, through transformers;\n"
            "cheap_embed: mean token embeddings) or at random from --seed (random, uniform_random).\n"
            "Models are Hugging Face directories, Hub ids, or Orbax checkpoints of Flax models laid out\n"
            "as transformers' Flax classes name them, with their config.json (and tokenizer) inside.\n"
            "Streamed tensor by tensor; the output directory appears only when complete."
        ),
        epilog=(
            "examples:\n"
            "  jaxmerge moe moe.yml out/\n"
            "  jaxmerge moe moe.yml --output out/ --dry-run"
        ),
    )
    moe.add_argument("config_file", metavar="CONFIG.yml", help="the mergekit-moe configuration")
    moe.add_argument("out_path", nargs="?", metavar="OUT", help="the output directory (or --output)")
    moe.add_argument("--output", help="the output directory (created atomically)")
    moe.add_argument("--seed", type=int, default=0, help="seed of random gates and of noise_scale's noise (default 0)")
    moe.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                     action="store_true", help="build even when every expert is the same model (as mergekit-moe)")
    moe.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    moe.add_argument("--strict", action="store_true", help="refuse keys mergekit-moe ignores instead of warning")
    moe.add_argument("--allow-nonfinite", action="store_true", help="copy inputs holding NaN or inf")
    moe.add_argument("--force", action="store_true", help="replace an existing output")
    moe.add_argument("--dry-run", action="store_true", help="check everything, compute the routers, print the plan; write nothing")
    moe.add_argument("--quiet", action="store_true", help="no progress bar")
    moe.set_defaults(run=_moe)

    methods = commands.add_parser(
        "methods",
        help="list every merge method with its parameters and paper",
        description="List the method table: each method's parameters (type, scope, default, range), base policy, "
        "model count and paper. These names and parameters are what recipes, --method/--param and merge_params take.",
    )
    methods.add_argument("name", nargs="?", help="show one method only")
    methods.add_argument("--markdown", action="store_true", help="print the table as Markdown (as in the README)")
    methods.set_defaults(run=_methods)

    extract = commands.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tune and its base (mergekit-extract-lora)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Factor each weight's task vector (fine-tune - base) by truncated SVD into a PEFT LoRA\n"
            "adapter (B @ A, scaling 1) with mergekit-extract-lora's rules and options: which modules\n"
            "are decomposed, which are saved whole (embeddings, norms: modules_to_save), the ranks,\n"
            "rank_pattern/alpha_pattern and lora_alpha. Streamed tensor by tensor; the adapter directory\n"
            "(adapter_config.json, adapter_model.safetensors, README.md, extract_lora_report.json)\n"
            "appears only when complete. --model and --base take model directories, Hub ids,\n"
            "safetensors or .bin checkpoints, or MODEL+LORA."
        ),
        epilog=(
            "examples:\n"
            "  jaxmerge extract-lora --model ft/ --base base/ --output lora/\n"
            "  jaxmerge extract-lora --model ft/ --base base/ --output lora/ --max-rank 32 -e 'lm_head' --decomposition exact\n"
            "  jaxmerge extract-lora --model ft/ --base base/ --output lora/ --rank-by energy:0.9\n"
            "  jaxmerge extract-lora --model ft/ --base base/ --output lora/ --rank-budget 50000000 --max-rank 256"
        ),
    )
    extract.add_argument("--model", required=True, help="the fine-tuned model")
    extract.add_argument("--base", "--base-model", dest="base", required=True, help="the base model")
    extract.add_argument("--output", "--out-path", dest="output", required=True, help="the adapter directory (created atomically)")
    extract.add_argument("--max-rank", type=int, default=128, help="largest rank of each module's LoRA (default 128)")
    extract.add_argument(
        "--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
        help="split the singular values between A and B as sqrt(S) each (default), or put them on A",
    )
    extract.add_argument(
        "--embed-lora", action=argparse.BooleanOptionalAction, default=False,
        help="decompose the embeddings too, instead of saving them whole in modules_to_save (default: whole)",
    )
    extract.add_argument("--save-module", dest="modules_to_save", action="append", metavar="NAME",
                         help="save modules named NAME (full name or last component) whole; repeatable")
    extract.add_argument("--include-regex", "-i", dest="include_regexes", action="append", metavar="REGEX",
                         help="decompose only modules whose name matches (re.search); repeatable")
    extract.add_argument("--exclude-regex", "-e", dest="exclude_regexes", action="append", metavar="REGEX",
                         help="leave out modules whose name matches; repeatable")
    extract.add_argument("--sv-epsilon", type=float, default=0.0,
                         help="also drop singular values <= this, lowering a module's rank (default 0: off)")
    extract.add_argument("--rank-by", metavar="RULE", default=None,
                         help="rank per module from its spectrum: energy:F keeps the smallest rank whose singular "
                         "values hold >= F (0 < F <= 1) of the task vector's energy, capped by --max-rank")
    extract.add_argument("--rank-budget", type=int, metavar="N", default=None,
                         help="spend N LoRA parameters in all (sum of rank x (rows + cols)) where they remove the most "
                         "error, each module capped by --max-rank (not with --rank-by)")
    extract.add_argument("--skip-undecomposable", action="store_true",
                         help="leave out modules that cannot be decomposed (norms) instead of saving them whole")
    extract.add_argument(
        "--decomposition", choices=["auto", "exact", "randomized"], default="auto",
        help="exact: full SVD (mergekit's); randomized: Halko et al. (2011), oversampling rank / 2, up to 3 "
        "power iterations; auto (default): randomized when rank + oversampling <= a quarter of the smaller side",
    )
    extract.add_argument("--seed", type=int, default=0, help="seed of the randomized sketches (default 0)")
    extract.add_argument("--force", action="store_true", help="replace an existing output")
    extract.add_argument("--quiet", action="store_true", help="no progress bar, warnings or per-module table")
    extract.set_defaults(run=_extract_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_weights(list(sys.argv[1:] if argv is None else argv)))
    return args.run(args)


def run() -> None:
    """The `jaxmerge` command: `main()`, then the exit handlers, then exit without interpreter teardown.

    Python's teardown after a merge (freeing every module, JAX's compiled kernels
    and XLA's and LLVM's static state) took 0.6-0.7 s on a 2-core VM, about 6% of a
    0.64 GB model's merge; by then the command has closed, fsynced and renamed
    everything it writes. The registered exit handlers (logging, JAX's clean-up,
    `jax.distributed`'s shutdown) still run: 0.13-0.16 s. Errors, including
    argparse's SystemExit, leave the ordinary way. `main()` itself returns, for
    callers in the same process.
    """
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said on it
    os._exit(code or 0)


if __name__ == "__main__":
    run()
