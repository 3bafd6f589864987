"""`c360ml build all` on an az:// lake in Azurite, SIGKILLed during its commits (#26): the
next build takes over the killed run's lease once it expires, completes, and leaves the
lake valid and equal to a build that was not killed.

The small version of tests/test_crash.py on a container, with its comparison
(`crash.tables`, `crash.differences`, `crash.accounting`). The lake: a generated landing
built once, then an increment and rows silver rejects landed (`crash.plant_rejects`), so
the build under test merges silver and patches gold with deletion-vector commits. The
commit points are those of the uninterrupted build (recorded in order by
tests/storage/kill_at_commit.py, which also does the kill), chosen for what a kill there
leaves: a silver merge's and a gold patch's new data file uploaded without the log entry
that would publish it (both commits with deletion vectors), a gold patch published while
the tables after it are not, and ingest's first append to bronze.
Every kill leaves the lease held by the killed process. The suite kills at two of the
points (one of each commit path: c360ml's own with deletion vectors, delta-rs' append),
within the suite's time budget; C360ML_AZURITE_ALL_KILLS=1 kills at all four.

`c360ml refresh` likewise, on the same lake with a champion trained on it: the refresh
ingests the increment (erasures included), builds, and writes the job's tables, each as_of
replaced through delta-rs (`Lake.write(predicate=...)`), killed (with
C360ML_AZURITE_ALL_KILLS=1: a champion and a reference refresh cost minutes) once its scores
are published (the CI-D export, drift, segments and report not yet made: the next refresh
must replace that as_of's scores, not add to them), at its feature snapshot, at a gold
patch's data file without its log entry, and at its first bronze append. The next refresh takes over the lease, completes, and its tables equal a refresh
not killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import QueryBuilder

from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests import crash
from tests.conftest import user_project
from tests.storage.test_erasure_azurite import _upload_new

pytestmark = pytest.mark.slow

CUSTOMERS, SEED = 300, 5
TTL = 6  # seconds a killed run's lease outlives it (C360ML_LEASE_TTL_SECONDS)
KILLER = Path(__file__).with_name("kill_at_commit.py")
LAYERS = ("silver", "gold", "quarantine", "state")  # the tables checked for validity


@dataclass
class Prepared:
    home: Path
    env: dict[str, str]
    container: str
    base: str  # the lake the build under test starts from (never built on itself)
    commits: list[dict]  # the uninterrupted build's commits, in order
    tables: dict[str, pd.DataFrame]  # its tables, as crash.tables normalises them


def _cli(home: Path, env: dict[str, str], *args: str, plan: dict | None = None):
    """`c360ml` in its own process group (with a plan: through kill_at_commit.py)."""
    command = [sys.executable, "-m", "c360ml.cli", *args]
    if plan is not None:
        (home / "plan.json").write_text(json.dumps(plan))
        command = [sys.executable, str(KILLER), str(home / "plan.json"), *args]
    return subprocess.run(
        command,
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        start_new_session=True,
    )


def _ok(done: subprocess.CompletedProcess) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def _copy(source: str, to: str) -> None:
    """Every blob of one lake copied under another root (the lease aside)."""
    src, dst = Lake(source).store, Lake(to).store
    for key in src.list(""):
        if key != "_lease":
            dst.write_bytes(key, src.read_bytes(key))


@pytest.fixture(scope="module")
def prepared(azurite, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("AZURE_", "AZURITE_")):
                mp.delenv(name)
        mp.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        mp.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)
        container = f"crash-{uuid.uuid4().hex[:12]}"
        azurite.create_container(container)
        home = tmp_path_factory.mktemp("crash_az") / "project"
        home.mkdir()
        env = user_project(home) | {"C360ML_LEASE_TTL_SECONDS": str(TTL)}
        base = f"az://{container}/base/lake"
        _ok(_cli(home, env, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED)))
        landing = home / "data" / "lake" / "landing"
        upload_folder(landing, Lake(base).store, "landing")
        _ok(_cli(home, env | {"C360ML_LAKE_ROOT": base}, "build", "all"))
        _ok(_cli(home, env, "generate", "--increment"))
        crash.plant_rejects(landing)
        assert _upload_new(landing, Lake(base).store, "landing")

        reference = f"az://{container}/reference/lake"
        _copy(base, reference)
        record = home / "commits.jsonl"
        plan = {"record": str(record)}
        _ok(_cli(home, env | {"C360ML_LAKE_ROOT": reference}, "build", "all", plan=plan))
        commits = [json.loads(line) for line in record.read_text().splitlines()]
        yield Prepared(home, env, container, base, commits, crash.tables(reference))


def _point(commits: list[dict], layer: str, by: str, new_files: int = 0) -> str:
    """The first commit of the uninterrupted build in `layer` made by `by` (c360ml: a merge
    or patch, one with deletion vectors if any has them) adding at least `new_files`."""
    found = [
        c
        for c in commits
        if c["key"].startswith(f"{layer}/")
        and c["by"] == by
        and c.get("new_files", 0) >= new_files
        and (by != "c360ml" or c["operation"] == "DELETE AND APPEND")
    ]
    assert found, f"no {by} commit in {layer} adding {new_files} files: {commits}"
    chosen = next((c for c in found if c.get("deletion_vectors")), found[0])
    assert by != "c360ml" or chosen["deletion_vectors"], f"no deletion vector in {found}"
    return chosen["key"]


def _table(key: str) -> tuple[str, ...]:
    return tuple(key.split("/_delta_log/")[0].split("/"))


def _valid(root: str) -> None:
    """Every table readable by delta-rs' own scan (an independent decoder of the deletion
    vectors) and by c360ml's reader, to the same number of live rows; some carry vectors."""
    lake, with_vectors = Lake(root), 0
    for layer in LAYERS:
        for parts in lake.tables(layer):
            table = lake.delta(layer, *parts)
            with_vectors += "deletionVectors" in (table.protocol().reader_features or [])
            found = QueryBuilder().register("t", table).execute("SELECT count(*) AS n FROM t")
            theirs = pa.table(found.read_all())["n"][0].as_py()
            name = "/".join((layer, *parts))
            assert theirs == len(lake.read(layer, *parts)) == lake.count(layer, *parts), name
    assert with_vectors, f"{root}: no table with deletion vectors"


CASES = {
    # a silver merge's new data file uploaded, its log entry not put
    "silver merge, data file without its log entry": ("silver", "c360ml", "before"),
    # a gold patch's new data file uploaded, its log entry not put
    "gold patch, data file without its log entry": ("gold", "c360ml", "before"),
    # a gold patch published, the gold tables after it not yet patched
    "gold patch, published": ("gold", "c360ml", "after"),
    # ingest's first append to bronze (a delta-rs commit) published, the rest not
    "bronze append, published": ("bronze", "delta-rs", "after"),
}


IN_SUITE = ("silver merge, data file without its log entry", "bronze append, published")
KILLED = list(CASES) if os.environ.get("C360ML_AZURITE_ALL_KILLS") else IN_SUITE


@pytest.mark.parametrize("case", KILLED)
def test_a_build_killed_at_a_commit_on_azurite_is_finished_by_the_next(prepared, case):
    layer, by, when = CASES[case]
    point = _point(prepared.commits, layer, by, new_files=1 if when == "before" else 0)
    root = f"az://{prepared.container}/{uuid.uuid4().hex[:8]}/lake"
    _copy(prepared.base, root)
    lake, env = Lake(root), prepared.env | {"C360ML_LAKE_ROOT": root}
    table = _table(point)
    orphans = set(lake.unreferenced_files(*table)) if when == "before" else set()

    killed = _cli(prepared.home, env, "build", "all", plan={"kill": point, "when": when})
    assert killed.returncode == -9, (case, point, killed.stdout[-2000:], killed.stderr[-2000:])
    published = lake.store.exists(point)
    assert published == (when == "after"), (case, point)
    if when == "before":  # the data file is in the container, no version references it
        assert set(lake.unreferenced_files(*table)) - orphans, (case, point)
    lease = json.loads(lake.store.read_bytes("_lease"))
    assert lease["what"] == "build all" and lease["expires"] > 0, lease  # held, not released
    pid = lease["pid"]

    started = time.monotonic()
    out = " ".join(_ok(_cli(prepared.home, env, "build", "all")).split())
    assert f"took over the expired lease of build all (process {pid} on" in out, out[-2000:]
    print(f"{case}: killed at {point} ({when}); rerun {time.monotonic() - started:.1f} s")

    _valid(root)
    assert crash.differences(prepared.tables, crash.tables(root)) == [], (case, point)
    assert crash.accounting(root) == [], (case, point)


# ------------------------------------------------------------------- a refresh killed
TRAINED_AS_OF = "2025-12-31"


@dataclass
class Refreshed:
    trained: str  # the base lake with a champion (never refreshed itself)
    commits: list[dict]  # the uninterrupted refresh's commits, in order
    tables: dict[str, pd.DataFrame]  # its tables, as crash.tables normalises them


@pytest.fixture(scope="module")
def refreshed(prepared):
    """The module's base lake (built, the increment with erasures and rejects landed) with
    a champion trained on a copy of it, and a refresh of a copy of that, not killed, whose
    commits are recorded in order."""
    trained = f"az://{prepared.container}/trained/lake"
    _copy(prepared.base, trained)
    env = prepared.env | {"C360ML_LAKE_ROOT": trained}
    _ok(_cli(prepared.home, env, "train", "--as-of", TRAINED_AS_OF))
    _ok(_cli(prepared.home, env, "model", "approve", "1", "--force"))
    reference = f"az://{prepared.container}/refreshed/lake"
    _copy(trained, reference)
    record = prepared.home / "refresh_commits.jsonl"
    plan = {"record": str(record)}
    _ok(_cli(prepared.home, env | {"C360ML_LAKE_ROOT": reference}, "refresh", plan=plan))
    commits = [json.loads(line) for line in record.read_text().splitlines()]
    return Refreshed(trained, commits, crash.tables(reference))


def _first(commits: list[dict], table: str, by: str, new_files: int = 0) -> str:
    """The uninterrupted refresh's first commit to `table` made by `by` (c360ml: one with
    deletion vectors) adding at least `new_files`."""
    found = [
        c
        for c in commits
        if c["key"].startswith(f"{table}/_delta_log/")
        and c["by"] == by
        and c.get("new_files", 0) >= new_files
        and (by != "c360ml" or c.get("deletion_vectors"))
    ]
    assert found, f"no {by} commit to {table} adding {new_files} files: {commits}"
    return found[0]["key"]


REFRESH_CASES = {
    # the batch scores published, the CI-D export, drift, segments and report not made
    "scores published": ("gold/churn_scores", "delta-rs", "after"),
    # the feature snapshot published, the scores not
    "features published": ("gold/customer_features", "delta-rs", "after"),
    # a gold patch's new data file uploaded, its log entry not put
    "gold patch, data file without its log entry": ("gold/orders", "c360ml", "before"),
    # ingest's first append of the increment to bronze published, the rest not
    "bronze append, published": ("bronze/d365/custtable", "delta-rs", "after"),
}
# Outside the suite's time budget (a champion and a reference refresh on the container
# first): the suite kills a refresh on a local lake (tests/test_crash.py) and builds here.
ALL_KILLS = bool(os.environ.get("C360ML_AZURITE_ALL_KILLS"))


@pytest.mark.skipif(not ALL_KILLS, reason="C360ML_AZURITE_ALL_KILLS=1 kills refreshes here")
@pytest.mark.parametrize("case", list(REFRESH_CASES))
def test_a_refresh_killed_at_a_commit_on_azurite_is_finished_by_the_next(prepared, refreshed, case):
    table, by, when = REFRESH_CASES[case]
    point = _first(refreshed.commits, table, by, new_files=1 if when == "before" else 0)
    root = f"az://{prepared.container}/{uuid.uuid4().hex[:8]}/lake"
    _copy(refreshed.trained, root)
    lake, env = Lake(root), prepared.env | {"C360ML_LAKE_ROOT": root}

    killed = _cli(prepared.home, env, "refresh", plan={"kill": point, "when": when})
    assert killed.returncode == -9, (case, point, killed.stdout[-2000:], killed.stderr[-2000:])
    assert lake.store.exists(point) == (when == "after"), (case, point)
    lease = json.loads(lake.store.read_bytes("_lease"))
    assert lease["what"] == "refresh" and lease["expires"] > 0, lease  # held, not released

    started = time.monotonic()
    out = " ".join(_ok(_cli(prepared.home, env, "refresh")).split())
    assert f"took over the expired lease of refresh (process {lease['pid']} on" in out, out[-2000:]
    print(f"{case}: killed at {point} ({when}); rerun {time.monotonic() - started:.1f} s")

    _valid(root)
    assert crash.differences(refreshed.tables, crash.tables(root)) == [], (case, point)
    assert crash.accounting(root) == [], (case, point)
