"""`c360ml` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from c360ml.config import Settings, load_settings

console = Console(width=None if sys.stdout.isatty() else 160)


def _print_rows(title: str, rows: list[dict]) -> None:
    """Print a list of flat dicts as a table (the summary every long command ends with)."""
    if not rows:
        console.print(f"[bold]{title}[/]: nothing to report")
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(
            str(col), justify="right" if isinstance(rows[0][col], int | float) else "left"
        )
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    console.print(table)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.synth import generate_increment, generate_lake

    if args.increment:
        summary = generate_increment(settings, seed=args.seed)
    else:
        summary = generate_lake(
            settings,
            customers=args.customers,
            seed=args.seed,
            start=args.start,
            end=args.end,
            fmt=args.format,
            fresh=args.fresh,
        )
    _print_rows("generated", summary.rows())
    console.print(f"landing: {settings.lake / 'landing'}  truth: {settings.truth}")


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion.ingest import ingest_landing

    summary = ingest_landing(settings)
    _print_rows("ingest: landing -> bronze", summary.rows())


def cmd_build(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion import build

    steps: dict[str, Callable] = {
        "silver": build.build_silver,
        "unify": build.build_unify,
        "gold": build.build_gold,
    }
    order = ["ingest", "silver", "unify", "gold"] if args.layer == "all" else [args.layer]
    if args.layer == "gold":
        order = ["unify", "gold"]  # gold is keyed by unify's ids: unify always runs first
    for step in order:
        started = time.perf_counter()
        if step == "ingest":
            cmd_ingest(args, settings)
            continue
        summary = steps[step](settings)
        _print_rows(f"{step} ({time.perf_counter() - started:.1f}s)", summary.rows())


def cmd_describe(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion.build import describe_layer

    for name, rows in describe_layer(settings, args.layer).items():
        _print_rows(f"{args.layer}/{name}", rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c360ml", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic Dynamics 365 + Dataverse lake")
    gen.add_argument("--customers", type=int, default=None, help="persons (default: demo size)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: demo seed)")
    gen.add_argument("--start", default=None, help="first day of history, YYYY-MM-DD")
    gen.add_argument("--end", default=None, help="last day of history, YYYY-MM-DD")
    gen.add_argument("--format", choices=["csv", "delta"], default="csv", help="export format")
    gen.add_argument("--increment", action="store_true", help="append the next sync folder")
    gen.add_argument("--fresh", action="store_true", help="remove the existing lake first")
    gen.set_defaults(func=cmd_generate)

    ing = sub.add_parser("ingest", help="landing -> bronze (only what is new)")
    ing.set_defaults(func=cmd_ingest)

    bld = sub.add_parser("build", help="build lake layers")
    bld.add_argument("layer", choices=["silver", "unify", "gold", "all"])
    bld.set_defaults(func=cmd_build)

    dsc = sub.add_parser("describe", help="show the tables and columns of a layer")
    dsc.add_argument("layer", choices=["bronze", "silver", "gold"])
    dsc.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings()
        args.func(args, settings)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
