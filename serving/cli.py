"""The ``gearbox`` command line. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from rich.console import Console

from gearbox.compression import (
    EXAMPLES,
    GearboxError,
    ModelRepository,
    compress,
    load_spec,
    ray_session,
    resolve_recipes,
)
from gearbox.compression.pipeline import DEFAULT_MAX_ACCURACY_DROP
from gearbox.serving.console import RichProgress, rejected_reasons, variant_table

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gearbox",
        description="Compress models into variants on Ray and serve them over the "
        "Open Inference Protocol.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress_cmd = commands.add_parser(
        "compress", help="compress a registered model into variants and publish them"
    )
    source = compress_cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example model")
    source.add_argument("--spec", metavar="MODULE:FUNCTION", help="function returning a ModelSpec")
    compress_cmd.add_argument("--repo", required=True, metavar="DIR", help="model repository")
    compress_cmd.add_argument(
        "--variants",
        metavar="A,B,…|all",
        help="variants to build (default: fp32,int8,pruned,distilled; 'all': every technique)",
    )
    compress_cmd.add_argument(
        "--max-accuracy-drop",
        type=_fraction,
        default=DEFAULT_MAX_ACCURACY_DROP,
        metavar="X",
        help="largest absolute quality drop below fp32 a ready variant may have (default 0.02)",
    )
    compress_cmd.add_argument(
        "--address", metavar="RAY", help="Ray cluster to use ('auto': the one on this machine)"
    )

    variants_cmd = commands.add_parser("variants", help="show a repository's variants")
    variants_cmd.add_argument("--repo", required=True, metavar="DIR", help="model repository")
    variants_cmd.add_argument("model", nargs="?", help="only this model")
    return parser


def _compress(args: argparse.Namespace, out: Console, err: Console) -> int:
    recipes = resolve_recipes(args.variants)
    spec = load_spec(EXAMPLES[args.example] if args.example else args.spec)
    repository = ModelRepository(args.repo)
    repository.ensure_writable()  # fail in a second, before Ray starts (compress checks again)
    with ray_session(args.address), RichProgress(err) as progress:
        report = compress(
            spec,
            repository,
            recipes,
            max_accuracy_drop=args.max_accuracy_drop,
            progress=progress,
        )
    out.print(variant_table(spec.name, report.published))
    for line in rejected_reasons(report.published):
        out.print(line, highlight=False)
    out.print(
        f"published {len(report.published)} variant(s) of '{spec.name}' to {repository.root} "
        f"in {report.seconds:.0f} s",
        highlight=False,
    )
    if report.failed:
        name, reason = next(iter(report.failed.items()))
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        raise GearboxError(f"variant '{name}' failed: {reason}{more}")
    return 0


def _variants(args: argparse.Namespace, out: Console, err: Console) -> int:
    repository = ModelRepository(args.repo)
    models = [args.model] if args.model else repository.models()
    if not models:
        err.print(f"repository {repository.root} holds no models", highlight=False)
    for model in models:
        manifests = repository.variants(model)
        out.print(variant_table(model, manifests))
        for line in rejected_reasons(manifests):
            out.print(line, highlight=False)
    return 0


COMMANDS = {"compress": _compress, "variants": _variants}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Like `python -m`, let --spec name modules in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Tables are wide; a pipe or a log gets the full width rather than rich's 80 columns.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return COMMANDS[args.command](args, out, err)
    except GearboxError as exc:
        print(f"gearbox: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gearbox: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("GEARBOX_DEBUG"):
            traceback.print_exc()
        print(f"gearbox: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
