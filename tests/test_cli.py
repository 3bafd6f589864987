"""Every README command run as a user runs it: a subprocess, its exit code and its output.

One small generated lake goes through the whole loop in order (generate, build, describe,
measures, train, refresh, serve + segments, report, an increment through ingest and each
build step), then the error paths: one line and exit code 2, a traceback only with --debug.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import user_project
from tests.service.conftest import cli_server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A project folder with its c360ml.yaml, and a way to run `c360ml` in it."""
    home = tmp_path_factory.mktemp("cli")
    env = user_project(home)
    return _runner(home, env), home, env


def _runner(home: Path, env: dict):
    """`c360ml ARGS` run in the project folder `home`: (exit code, stdout + stderr)."""

    def run(*args: str, extra: dict | None = None, timeout: float = 600):
        done = subprocess.run(
            [sys.executable, "-m", "c360ml.cli", *args],
            cwd=home,
            env=env | (extra or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout + done.stderr

    return run


def _quiet(out: str) -> None:
    """No log records and no traceback on the terminal without -v / --debug."""
    assert " INFO " not in out and "Traceback" not in out, out[-3000:]


def test_the_whole_loop_from_the_readme(user):
    run, home, env = user
    code, out = run("generate", "--customers", "2000", "--seed", "7", "--fresh")
    assert code == 0, out
    assert "generated" in out and f"log: {home / 'data' / 'logs' / 'c360ml.log'}" in out
    _quiet(out)

    code, out = run("build", "all")
    assert code == 0, out
    assert "ingest: landing -> bronze" in out and "gold (" in out
    assert "rows quarantined, each with its file, line and reason" in out
    _quiet(out)
    assert len([line for line in out.splitlines() if line.startswith("WARNING")]) == 0

    code, out = run("describe", "gold")
    assert code == 0 and "gold/orders" in out, out

    code, out = run("build", "measures", "--as-of", "2025-06-30")
    assert code == 0, out
    assert "gold/customer_measures" in out and "as_of 2025-06-30" in out
    _quiet(out)

    code, out = run("train", "--as-of", "2025-12-31")
    assert code == 0, out
    assert "promoted to champion" in out and "grade" in out
    _quiet(out)
    assert "Successfully registered model" not in out  # MLflow's own notes go to the log
    log = (home / "data" / "logs" / "c360ml.log").read_text()
    assert "Successfully registered model" in log and "features at" in log

    pipeline = subprocess.run(  # the README's other spelling of train
        [sys.executable, str(REPO / "pipelines" / "train.py"), "--as-of", "2025-12-31"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pipeline.returncode == 0, pipeline.stdout + pipeline.stderr
    assert "c360-retention v2" in pipeline.stdout
    log = (home / "data" / "logs" / "c360ml.log").read_text()
    assert "gate: version 2" in log and "recipe comparison" in log
    _quiet(pipeline.stdout + pipeline.stderr)

    code, out = run("refresh")
    assert code == 0, out
    assert "refresh as of" in out and "ci-d manifest" in out
    _quiet(out)

    code, out = run("retrain", "--if-needed", extra={"C360ML_WATCH__PSI_ALARM": "10"})
    assert code == 0, out
    assert "no retrain: no trigger fired (champion 0 days old; score PSI" in out

    with cli_server(home, env, "cli-token") as url:
        code, out = run(
            "segments", "run", "--endpoint", url, extra={"C360ML_API_TOKEN": "cli-token"}
        )
        assert code == 0, out
        assert "segments as of" in out and "journey exports" in out
        # The segments' control groups (10% of the risk segments) are left out of journeys.
        from c360ml.storage.lake import Lake

        lake = Lake(home / "data" / "lake")
        members = lake.read_pandas("gold", "segment_membership")
        risk = members[members.segment == "high_risk"]
        assert 0.03 < risk.control.mean() < 0.2
        journey = pd.read_csv(lake.path("export", "journeys") / "high_risk.csv")
        assert not set(journey.CustomerId) & set(risk.loc[risk.control, "customer_id"])

    code, out = run("report")
    assert code == 0, out
    assert (home / "data" / "reports" / "retention_report.html").exists()

    code, out = run("generate", "--increment")
    assert code == 0, out
    for step in (("ingest",), ("build", "silver"), ("build", "unify"), ("build", "gold")):
        code, out = run(*step)
        assert code == 0, (step, out)
        _quiet(out)

    code, out = run("generate", "--increment", "--shock", "2026-01-08:competitor")
    assert code == 0, out
    assert "shock competitor from 2026-01-08:" in out and "dropouts brought forward" in out


def test_errors_are_one_line_and_tracebacks_need_debug(user, tmp_path):
    run, _, _ = user
    code, out = run("describe", "gold", extra={"C360ML_LAKE_ROOT": str(tmp_path)})
    assert code == 2 and f"error: no gold tables in {tmp_path}" in out
    code, out = run("train", "--as-of", "2025-13-45")
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2025-13-45" in errors[0] and "Traceback" not in out
    code, out = run("--debug", "train", "--as-of", "2025-13-45")
    assert code == 2 and "Traceback" in out
    code, out = run("generate", "--increment", "--shock", "2026-03-01")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--shock expects DATE:KIND" in errors[0]
    code, out = run("model", "approve", "99")
    assert code == 2 and "has no version 99" in out
    code, out = run("-v", "build", "measures", "--as-of", "2025-03-31")
    assert code == 0 and "INFO" in out, out


def test_generate_profile_sparse_and_its_increment(tmp_path):
    run = _runner(tmp_path, user_project(tmp_path))
    code, out = run("generate", "--customers", "1500", "--seed", "3", "--profile", "sparse")
    assert code == 0 and "profile sparse" in out, out
    _quiet(out)
    meta = json.loads((tmp_path / "data" / "truth" / "generator.json").read_text())
    assert meta["profile"] == "sparse" and meta["params"]["lam_mean"] == 1 / 80

    code, out = run("generate", "--increment")  # the lake's profile, not asked again
    assert code == 0 and "profile sparse" in out, out

    for args, message in (
        (("--profile", "dense", "--fresh"), "unknown profile 'dense': expected one of default, "),
        (("--increment", "--profile", "default"), "increments keep the lake's profile"),
    ):
        code, out = run("generate", *args)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], out
        assert "Traceback" not in out
    meta = json.loads((tmp_path / "data" / "truth" / "generator.json").read_text())
    assert meta["profile"] == "sparse" and len(meta["increments"]) == 1  # nothing was touched
