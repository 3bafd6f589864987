"""`c360ml` command line: argument parsing and printing only; the work is in the library.

What a user sees: progress bars for long steps, the summary tables, warnings, and one line
per error. Everything the library logs (INFO and up, DEBUG with `--debug`) and whatever
third-party packages print to stderr go to the log file under `log_dir`, whose path is
printed at the end; `-v` also shows the log on the terminal, `--debug` tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from c360ml import progress
from c360ml.config import Settings, load_settings

console = Console(width=None if sys.stdout.isatty() else 160)
LOG_FILE = "c360ml.log"


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

    if args.shock is not None and not args.increment:
        raise ValueError("--shock needs --increment (a regime change applies to later syncs)")
    if args.absolute_locations and args.increment:
        raise ValueError(
            "--absolute-locations applies to the initial export; increments keep its form"
        )
    if args.profile is not None and args.increment:
        raise ValueError(
            "--profile applies to the initial export; increments keep the lake's profile"
        )
    if args.increment:
        summary = generate_increment(settings, seed=args.seed, shock=args.shock)
    else:
        summary = generate_lake(
            settings,
            customers=args.customers,
            seed=args.seed,
            start=args.start,
            end=args.end,
            fmt=args.format,
            fresh=args.fresh,
            absolute_locations=args.absolute_locations,
            profile=args.profile or "default",
        )
    _print_rows("generated", summary.rows())
    console.print(f"profile {summary.profile}", highlight=False)
    if args.shock is not None:
        from c360ml.synth.generate import read_meta

        shock = read_meta(settings.truth)["shocks"][-1]
        console.print(
            f"shock {shock['kind']} from {shock['date']}: {shock['exposed']:,} persons exposed, "
            f"{shock['dropouts_brought_forward']:,} dropouts brought forward, "
            f"{shock.get('purchases_skipped', 0):,} orders not placed",
            highlight=False,
        )
    console.print(f"landing: {summary.landing}  truth: {settings.truth}", highlight=False)


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion.ingest import IngestError, ingest_landing

    try:
        summary = ingest_landing(settings)
    except IngestError as exc:  # the other tables were ingested: show them, then the error
        _print_rows("ingest: landing -> bronze", exc.summary.rows())
        raise
    rows = summary.rows()
    _print_rows("ingest: landing -> bronze", rows)
    quarantined = sum(r.get("quarantined", 0) for r in rows)
    if quarantined:
        from c360ml.storage.lake import Lake

        where = Lake(settings.lake).uri("quarantine", "bronze")
        console.print(
            f"{quarantined:,} rows quarantined, each with its file, line and reason: {where}",
            highlight=False,
        )


def cmd_build(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion import build, erasure
    from c360ml.storage import lease

    if args.layer == "measures":
        return cmd_measures(args, settings)
    steps: dict[str, Callable] = {
        "silver": build.build_silver,
        "unify": build.build_unify,
        "gold": build.build_gold,
    }
    order = ["ingest", "silver", "unify", "gold"] if args.layer == "all" else [args.layer]
    if args.layer == "gold":
        order = ["unify", "gold"]  # gold is keyed by unify's ids: unify always runs first
    # One lease for all the steps: a refresh must not slip in between two of them.
    with (
        lease.exclusive(
            settings.lake,
            f"build {args.layer}",
            settings.lease_wait_seconds,
            settings.lease_ttl_seconds,
        ),
        progress.track(f"build {args.layer}", len(order)) as advance,
    ):
        if erasure.finish_pending(settings) is not None:
            print("finished the erasure a stopped refresh left")
        for step in order:
            started = time.perf_counter()
            if step == "ingest":
                cmd_ingest(args, settings)
            else:
                summary = steps[step](settings)
                _print_rows(f"{step} ({time.perf_counter() - started:.1f}s)", summary.rows())
            advance()


def _as_of(text: str | None):
    import pandas as pd

    if text is None:
        return None
    try:
        return pd.Timestamp(text, tz="UTC")
    except ValueError:
        raise ValueError(f"--as-of {text!r} is not a date (YYYY-MM-DD, UTC)") from None


def cmd_measures(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.refresh import build_measures_table

    result = build_measures_table(settings, _as_of(args.as_of))
    row = {"table": "gold/customer_measures", "rows": result.rows, "note": result.note}
    _print_rows(f"measures ({result.seconds:.1f}s)", [row])


def cmd_train(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.model.pipeline import run_training

    summary = run_training(
        settings,
        _as_of(args.as_of),
        args.tune,
        args.sample_rate,
        require_approval=args.require_approval or None,
    )
    _print_rows(f"train {settings.model_name}", summary.rows())
    console.print(f"MLflow: {settings.tracking_uri}  (UI: make mlflow-ui)")


def cmd_retrain(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.model.pipeline import retrain_if_needed

    if not args.if_needed:
        raise ValueError("retrain needs --if-needed (to train regardless, run `c360ml train`)")
    outcome = retrain_if_needed(settings, _as_of(args.as_of), args.require_approval or None)
    if not outcome.fired:
        console.print(f"no retrain: no trigger fired ({outcome.health})", highlight=False)
        return
    console.print(f"retrain: {'; '.join(outcome.fired)}", highlight=False)
    _print_rows(f"train {settings.model_name}", outcome.summary.rows())


def cmd_model(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.model import registry

    uri = settings.tracking_uri
    if args.action == "rollback":
        move = registry.rollback(uri, settings.model_name, args.to, args.reason)
    else:
        move = registry.approve(uri, settings.model_name, args.version, args.reason, args.force)
    replaced = f" (was v{move.replaced})" if move.replaced else ""
    console.print(
        f"{args.action}: {move.model_name} champion is now v{move.champion}{replaced}: "
        f"{move.reason}"
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import os
    import subprocess

    from c360ml.model.packaging import import_champion

    packaged = import_champion(settings)
    console.print(f"serving {settings.model_name} version {packaged.version} ({packaged.tag})")
    env = dict(os.environ)
    if args.dev:
        env["C360ML_DEV_NO_AUTH"] = "1"
        console.print("[bold red]DEVELOPMENT MODE: no authentication[/]")
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.service:RetentionService",
        "--port",
        str(args.port),
        "--host",
        args.host,
    ]
    subprocess.run(cmd, cwd=settings.root, env=env, check=True)


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.refresh import run_refresh
    from c360ml.report import build_report
    from c360ml.segments import segments_step

    summary = run_refresh(
        settings,
        _as_of(args.as_of),
        args.endpoint,
        args.explain,
        segments=segments_step,
        report=build_report,
    )
    _print_rows(f"refresh as of {summary.as_of}", summary.rows())
    _print_rows(
        "profiles",
        [{"status": k, "profiles": v} for k, v in summary.status_counts.items()]
        + [{"status": f"risk {k}", "profiles": v} for k, v in summary.risk_counts.items()],
    )
    for name, where in summary.outputs.items():
        console.print(f"{name}: {where}")


def cmd_segments(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.segments import run_segments

    endpoint = args.endpoint or settings.endpoint
    if not endpoint:
        raise ValueError("no scoring endpoint: pass --endpoint URL or set `endpoint` in settings")
    result = run_segments(settings, endpoint, _as_of(args.as_of))
    rows = result.moves.assign(
        consent_excluded=result.moves["segment"].map(result.consent_excluded)
    ).to_dict("records")
    _print_rows(f"segments as of {result.as_of}", rows)
    from c360ml.storage.lake import Lake

    console.print(f"journey exports: {Lake(settings.lake).uri('export', 'journeys')}")


def cmd_report(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.report import build_report

    console.print(f"report: {build_report(settings)}")


def cmd_describe(args: argparse.Namespace, settings: Settings) -> None:
    from c360ml.medallion.build import describe_layer

    tables = describe_layer(settings, args.layer)
    if not tables:
        raise ValueError(f"no {args.layer} tables in {settings.lake}: run `c360ml build all`")
    for name, rows in tables.items():
        _print_rows(f"{args.layer}/{name}", rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c360ml", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the log here too")
    parser.add_argument(
        "--debug", action="store_true", help="debug logging, and tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _lake_commands(sub)
    _model_commands(sub)
    _job_commands(sub)
    return parser


def _lake_commands(sub: argparse._SubParsersAction) -> None:
    """generate, ingest, build: the lake and its layers."""
    gen = sub.add_parser("generate", help="write a synthetic Dynamics 365 + Dataverse lake")
    gen.add_argument("--customers", type=int, default=None, help="persons (default: demo size)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: demo seed)")
    gen.add_argument("--start", default=None, help="first day of history, YYYY-MM-DD")
    gen.add_argument("--end", default=None, help="last day of history, YYYY-MM-DD")
    gen.add_argument("--format", choices=["csv", "delta"], default="csv", help="export format")
    gen.add_argument("--increment", action="store_true", help="append the next sync folder")
    gen.add_argument(
        "--shock",
        default=None,
        metavar="DATE:KIND",
        help="with --increment: a regime change from DATE, e.g. 2026-03-01:competitor "
        "(kinds: competitor, recession; see c360ml.synth.params.SHOCKS); KIND*2 doubles it",
    )
    gen.add_argument(
        "--profile",
        default=None,
        help="purchase/dropout process: default (the demo's) or sparse (shaped like a real "
        "retail log: half the new customers buy once; see c360ml.synth.params.PROFILES); "
        "increments keep the lake's",
    )
    gen.add_argument("--fresh", action="store_true", help="remove the existing lake first")
    gen.add_argument(
        "--absolute-locations",
        default=None,
        metavar="URL",
        help="name model.json partitions by absolute locations under URL, the lake root as "
        "Synapse Link names it: https://<account>.dfs.core.windows.net/<container>/<path> "
        "(default: relative to the sync folder)",
    )
    gen.set_defaults(func=cmd_generate)

    ing = sub.add_parser("ingest", help="landing -> bronze (only what is new)")
    ing.set_defaults(func=cmd_ingest)

    bld = sub.add_parser("build", help="build lake layers")
    bld.add_argument("layer", choices=["silver", "unify", "gold", "all", "measures"])
    bld.add_argument("--as-of", default=None, help="measures: UTC date (default: latest event)")
    _engine_option(bld)
    bld.set_defaults(func=cmd_build)


def _engine_option(parser: argparse.ArgumentParser, does: str = "builds the lake layers") -> None:
    parser.add_argument(
        "--engine",
        choices=["duckdb", "spark"],
        default=None,
        help=f"what {does} (default: the engine setting; see the README's "
        "'Running on Spark' for what Spark runs)",
    )


def _model_commands(sub: argparse._SubParsersAction) -> None:
    """train, retrain, model, serve: the model and its champion."""
    trn = sub.add_parser("train", help="train, evaluate, register and gate the churn model")
    trn.add_argument("--as-of", required=True, help="trained_as_of, a UTC date YYYY-MM-DD")
    trn.add_argument("--tune", type=int, default=0, help="Optuna trials (off by default)")
    trn.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="share of training customers (default: sampled only above the cap)",
    )
    trn.add_argument(
        "--require-approval",
        action="store_true",
        help="a passing model waits as challenger for `c360ml model approve`",
    )
    _engine_option(trn, "computes the labels, RFM and the training matrix")
    trn.set_defaults(func=cmd_train)

    rtr = sub.add_parser("retrain", help="train and gate a challenger when a trigger fires")
    rtr.add_argument(
        "--if-needed",
        action="store_true",
        help="only when the champion is too old, drifts, or its realized AUC fell",
    )
    rtr.add_argument("--as-of", default=None, help="trained_as_of (default: the data's end)")
    rtr.add_argument("--require-approval", action="store_true", help="see train")
    rtr.set_defaults(func=cmd_retrain)

    mdl = sub.add_parser("model", help="move the champion alias by hand")
    mdl_sub = mdl.add_subparsers(dest="action", required=True)
    rbk = mdl_sub.add_parser("rollback", help="champion back to the version it replaced")
    rbk.add_argument("--to", default=None, help="model version to roll back to")
    rbk.add_argument("--reason", default="", help="why (kept as a version tag)")
    apv = mdl_sub.add_parser("approve", help="make a version awaiting approval the champion")
    apv.add_argument("version", help="model version")
    apv.add_argument("--reason", default="", help="why (kept as a version tag)")
    apv.add_argument("--force", action="store_true", help="approve even if the gate refused it")
    for p in (rbk, apv):
        p.set_defaults(func=cmd_model)

    srv = sub.add_parser("serve", help="serve the champion with BentoML")
    srv.add_argument("--port", type=int, default=3000)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--dev", action="store_true", help="no authentication (development only)")
    srv.set_defaults(func=cmd_serve)


def _job_commands(sub: argparse._SubParsersAction) -> None:
    """refresh, segments, report, describe: what runs on the lake and the model."""
    ref = sub.add_parser("refresh", help="ingest, rebuild, re-score every profile, export")
    ref.add_argument("--as-of", default=None, help="UTC instant (default: latest event time)")
    ref.add_argument("--endpoint", default=None, help="scoring service URL for segments")
    ref.add_argument("--explain", choices=["exact", "approx", "none"], default="approx")
    _engine_option(ref)
    ref.set_defaults(func=cmd_refresh)

    seg = sub.add_parser("segments", help="segment workflow through the scoring service")
    seg.add_argument("action", choices=["run"])
    seg.add_argument("--endpoint", default=None, help="scoring service URL")
    seg.add_argument("--as-of", default=None, help="as_of of the feature snapshot (default latest)")
    seg.set_defaults(func=cmd_segments)

    rep = sub.add_parser("report", help="write the self-contained HTML report")
    rep.set_defaults(func=cmd_report)

    dsc = sub.add_parser("describe", help="show the tables and columns of a layer")
    dsc.add_argument("layer", choices=["bronze", "silver", "gold"])
    dsc.set_defaults(func=cmd_describe)


class _Bars:
    """The progress listener of the command line: rich bars while any work is tracked."""

    def __init__(self) -> None:
        self.bars: Progress | None = None
        self.open = 0

    def __call__(self, description: str, total: int | None):
        if self.bars is None:
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.bars.start()
        bars = self.bars
        task = bars.add_task(description, total=total)
        self.open += 1

        def close() -> None:
            bars.remove_task(task)
            self.open -= 1
            if self.open == 0:
                bars.stop()
                self.bars = None

        return (lambda: bars.advance(task)), close


def configure_logging(settings: Settings, verbose: bool, debug: bool) -> Path:
    """The log file under `log_dir` gets everything; the terminal gets c360ml's warnings
    (all of the log with -v)."""
    folder = settings.path(settings.log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    terminal = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    terminal.setLevel(logging.DEBUG if verbose or debug else logging.WARNING)
    if not (verbose or debug):
        terminal.addFilter(lambda record: record.name.startswith(("c360ml", "pipelines")))
    terminal.addFilter(lambda record: not getattr(record, "file_only", False))
    root.addHandler(terminal)
    logging.captureWarnings(True)  # library deprecation warnings: to the file
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep output readable
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow logs to our log file
    args = build_parser().parse_args(argv)
    log_path = None
    try:
        settings = load_settings()
        if getattr(args, "engine", None):
            settings = settings.model_copy(update={"engine": args.engine})
        log_path = configure_logging(settings, args.verbose, args.debug)
        progress.listen(_Bars())
        # What packages print to stderr themselves (MLflow's registration notes, say) goes
        # to the log file too; the terminal handler and the bars write to the console.
        with open(log_path, "a", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
            args.func(args, settings)
    except Exception as exc:
        if log_path is not None:  # before the log file, Python would print it on stderr
            logging.getLogger("c360ml.cli").error(
                "command failed", exc_info=True, extra={"file_only": True}
            )
        if args.debug:
            traceback.print_exc()
        user_error = isinstance(
            exc, ValueError | FileNotFoundError | KeyError | ConnectionError | RuntimeError
        )
        kind = "" if user_error else f"unexpected {type(exc).__name__}: "
        where = f" (details: {log_path})" if log_path and not user_error else ""
        console.print(f"error: {kind}{exc}{where}", markup=False, highlight=False)
        return 2
    finally:
        progress.listen(None)
    if log_path is not None and args.func is not cmd_serve:
        console.print(f"log: {log_path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
