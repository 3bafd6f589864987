"""Kill a real `c360ml refresh` at one of its commits, run it again, compare with a run
that was not killed. Shared by tests/test_crash.py (a few points) and
benchmarks/bench_crash.py (every point).

Why commits: every lake write is one Delta commit, so the places a kill can leave a lake
in are exactly "after commit k". The uninterrupted run names them (the `_delta_log/*.json`
files it creates, in order); a killed run is a subprocess in its own process group,
SIGKILLed (the group: its feature workers too) as soon as the named file appears.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from c360ml.config import Settings
from tests.conftest import make_settings

COMPARED = ("gold", "quarantine", "state")  # the layers that must equal a run not killed
# Columns that differ between two runs that were not killed either: when a row was
# written (wall clock), and ingest's batch of it (one per run).
RUN_COLUMNS = {"ScoredAt", "_ingested_at", "_batch_id", "ingested_at", "batch_id"}
DECIMALS = 9  # floats compared rounded to 1e-9: a refresh's sums may differ in the last bit
# Per record, the pairs of each rule it is the right end of (`unify.pair_counts`: within a
# source, across sources, on a common value): a unify killed half way is followed by a
# whole one, which orients some pairs the other way than the incremental one. Their sums,
# in gold/unify_report, are compared.
UNIFY_STATE, PAIR_COUNTS = "state/unify/records", ("within_", "across_", "common_")


settings_of = make_settings  # a project folder: every output under it, the repo's specs


def write_config(project: Path) -> None:
    """The project's c360ml.yaml, as a user of the CLI has one."""
    s = settings_of(project)
    fields = ("root", "lake_root", "truth_root", "reports_dir", "mlflow_dir", "log_dir")
    (project / "c360ml.yaml").write_text(yaml.safe_dump({f: str(getattr(s, f)) for f in fields}))


def prepare(project: Path, customers: int, seed: int) -> Settings:
    """A lake as a refresh finds it: built, a champion trained, refreshed once, and a new
    sync landed (the increment the refresh under test ingests)."""
    from c360ml.medallion.build import build_gold, build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing
    from c360ml.model.pipeline import run_training
    from c360ml.model.train import TrainConfig
    from c360ml.refresh import run_refresh
    from c360ml.synth import generate_increment, generate_lake

    settings = settings_of(project)
    generate_lake(settings, customers=customers, seed=seed)
    for step in (ingest_landing, build_silver, build_unify, build_gold):
        step(settings)
    as_of = pd.Timestamp(settings.demo.end, tz="UTC")  # as tests/test_refresh.py trains
    config = TrainConfig(nthread=2, max_trees=40, early_stopping_rounds=10, bootstrap_resamples=30)
    trained = run_training(settings, as_of, config=config)
    if not trained.promoted:
        raise RuntimeError(f"no champion for the crash lake: {trained.gate_reason}")
    run_refresh(settings)
    generate_increment(settings)
    plant_rejects(settings.lake / "landing")
    write_config(project)
    return settings


def plant_rejects(landing: Path) -> None:
    """A sync after the increment with rows silver rejects (the generator's dirt is
    rejected at ingest), so that the silver merges under test move rows to quarantine."""
    from tests.conftest import write_sync_folder

    last = max(p.name for p in (landing / "d365").iterdir() if p.is_dir())
    seen = "2026-01-01T00:00:00Z"
    order = {
        "recid": 990000001,
        "dataareaid": "usrt",
        "salesid": "SO-CRASH-1",
        "versionnumber": 1,
        "SinkModifiedOn": seen,
    }  # fmt: skip (no custaccount)
    line = {
        "recid": 990000002,
        "dataareaid": "usrt",
        "salesid": "SO-CRASH-1",
        "linenum": 1,
        "itemid": "X",
        "salesqty": 1,
        "salesprice": -5,
        "lineamount": -5,
        "versionnumber": 1,
        "SinkModifiedOn": seen,
    }  # fmt: skip (a negative price)
    write_sync_folder(
        landing, "d365", last[:11] + "02.00.00Z", {"salestable": [order], "salesline": [line]}
    )


def copy_project(base: Path, to: Path) -> Path:
    """A copy of a prepared project to run a refresh on (its own c360ml.yaml)."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(base, to, symlinks=True)
    (to / "lake" / "_lease").unlink(missing_ok=True)
    write_config(to)
    return to


def commit_files(lake: Path) -> dict[str, int]:
    """Every Delta commit file under the lake (relative path -> mtime in ns)."""
    return {
        str(p.relative_to(lake)): p.stat().st_mtime_ns for p in lake.glob("**/_delta_log/*.json")
    }


def refresh(project: Path, kill_at: str | None = None, timeout: float = 900) -> dict:
    """`c360ml refresh` in `project`, in its own process group; with `kill_at` (a commit
    file, relative to the lake), SIGKILLed once that file exists. Returns how it went:
    exit code (-9 when killed), seconds, and for a kill the commits made by then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360ML_", "MLFLOW_"))}
    env |= {"BENTOML_HOME": str(project / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    lake = project / "lake"
    before = set(commit_files(lake)) if kill_at else set()
    log = open(project / "refresh.out", "ab")  # noqa: SIM115 (closed below, after the wait)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "c360ml.cli", "refresh"],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes the workers too
    )
    try:
        if kill_at is not None:
            target = lake / kill_at
            deadline = time.monotonic() + timeout
            while not target.exists() and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"refresh never wrote {kill_at}")
                time.sleep(0.002)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out = {"exit": code, "seconds": round(time.perf_counter() - started, 2)}
    if kill_at is not None:
        out["commits_before_kill"] = len(set(commit_files(lake)) - before)
    return out


def commit_points(lake: Path, before: set[str]) -> list[str]:
    """The commits made in a lake since `before`, in the order they were made."""
    found = commit_files(lake)
    return sorted((f for f in found if f not in before), key=lambda f: (found[f], f))


def cut_after(lake: Path, made: list[str], point: str) -> None:
    """The lake as a kill right after commit `point` (of `made`, in order) leaves it: the
    later commits' log files removed (their data files, referenced by no commit, are what
    a kill leaves behind too)."""
    for later in made[made.index(point) + 1 :]:
        (lake / later).unlink()


def tables(lake: Path, layers: tuple[str, ...] = COMPARED) -> dict[str, pd.DataFrame]:
    """Every Delta table of the compared layers, normalised for comparison: run-specific
    columns dropped, floats rounded, rows sorted."""
    from c360ml.storage.lake import Lake

    lk = Lake(lake)
    out = {}
    for layer in layers:
        for parts in lk.tables(layer):
            name = "/".join((layer, *parts))
            frame = lk.read_pandas(layer, *parts)
            frame = frame.drop(columns=[c for c in frame.columns if c in RUN_COLUMNS])
            if name == UNIFY_STATE:
                frame = frame.drop(columns=[c for c in frame if c.startswith(PAIR_COUNTS)])
            for c in frame.columns:
                if pd.api.types.is_float_dtype(frame[c]):
                    frame[c] = frame[c].round(DECIMALS)
            frame = frame.astype(str).sort_values(list(frame.columns)).reset_index(drop=True)
            out[name] = frame
    return out


def differences(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> list[str]:
    """What differs between two `tables` results, one line per table (empty: equal)."""
    found = [f"{t}: only in the run not killed" for t in sorted(set(a) - set(b))]
    found += [f"{t}: only in the killed run" for t in sorted(set(b) - set(a))]
    for t in sorted(set(a) & set(b)):
        x, y = a[t], b[t]
        if list(x.columns) != list(y.columns):
            found.append(f"{t}: columns {list(x.columns)} != {list(y.columns)}")
        elif not x.equals(y):
            both = x.merge(y, how="outer", indicator=True)
            short = int((both["_merge"] == "left_only").sum())
            over = int((both["_merge"] == "right_only").sum())
            found.append(f"{t}: {len(x)} vs {len(y)} rows, {short} missing, {over} extra")
    return found


def accounting(lake: Path) -> list[str]:
    """Silver tables where bronze current-state rows != silver + quarantine rows (the
    invariant `SilverResult.balanced` checks as a build goes), counted from the lake."""
    from c360ml.medallion.silver import bronze_current_rows
    from c360ml.sources.tables import SOURCE_TABLES
    from c360ml.storage.lake import Lake

    lk = Lake(lake)
    broken = []
    for (source, name), table in SOURCE_TABLES.items():
        if not lk.exists("bronze", source, name):
            continue
        bronze = bronze_current_rows(lk, table)
        silver, quarantined = lk.count("silver", name), lk.count("quarantine", "silver", name)
        if bronze != silver + quarantined:
            broken.append(f"{name}: bronze {bronze} != silver {silver} + quarantine {quarantined}")
    return broken


@dataclass
class Reference:
    """The run that was not killed: its commits in order, and its tables."""

    points: list[str]
    tables: dict[str, pd.DataFrame]
    seconds: float


def reference(base: Path, work: Path) -> Reference:
    project = copy_project(base, work)
    before = set(commit_files(project / "lake"))
    run = refresh(project)
    if run["exit"] != 0:
        raise RuntimeError(f"the uninterrupted refresh failed: {tail(project)}")
    points = commit_points(project / "lake", before)
    return Reference(points, tables(project / "lake"), run["seconds"])


def kill_and_rerun(base: Path, work: Path, point: str, ref: Reference) -> dict:
    """Kill a refresh of a copy of `base` at commit `point`, rerun it to the end, and
    compare with `ref`. The outcome: the kill, the rerun, and what differs (nothing is
    a pass)."""
    project = copy_project(base, work)
    killed = refresh(project, kill_at=point)
    rerun = refresh(project)
    out = {"point": point, "killed": killed, "rerun": rerun}
    if rerun["exit"] != 0:
        out["differences"] = [f"rerun failed: {tail(project)}"]
        return out
    out["differences"] = differences(ref.tables, tables(project / "lake"))
    out["accounting"] = accounting(project / "lake")
    return out


def tail(project: Path, lines: int = 15) -> str:
    text = (project / "refresh.out").read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
