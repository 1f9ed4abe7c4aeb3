"""The `jaxmerge` command line (also `python -m jaxmerge`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from jaxmerge import demo

    return demo.main(quick=args.quick, seed=args.seed, output_dir=args.output_dir)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
