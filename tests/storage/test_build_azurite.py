"""`c360ml build` on an az:// lake as a user runs it: a generated landing copied into the
container, `c360ml ingest` then `c360ml build all` with the lake root and Azurite's
connection in environment variables; every gold table equals a local-disk build of the
same landing, row for row after sorting, after the first build and after an increment
built incrementally on both. Two builds started at once on the same lake: one runs, the
other waits for the lease, or stops with one line naming its holder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.conftest import user_project

CUSTOMERS = 300
SEED = 5


def _command(home: Path, env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-m", "c360ml.cli", *args]


def _run(home: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        _command(home, env, *args), cwd=home, env=env, capture_output=True, text=True, timeout=600
    )
    return done.returncode, done.stdout + done.stderr


def _sorted(table: pa.Table) -> pd.DataFrame:
    """Rows sorted by every column, the float columns last: a sum of floats may differ in
    its last bits between two builds (DuckDB adds in the order its threads read the
    files), so a float must not decide the order."""
    frame = table.to_pandas()
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    by = [c for c in frame.columns if c not in floats] + floats
    return frame.sort_values(by, na_position="first", kind="stable").reset_index(drop=True)


def _gold(lake: Lake) -> dict[tuple[str, ...], pa.Table]:
    return {t: lake.read("gold", *t) for t in lake.tables("gold")}


def _assert_same_gold(remote: Lake, local: Lake) -> None:
    """Every gold table in both, with the same schema and rows (floats within 1e-9
    relative)."""
    ours, theirs = _gold(remote), _gold(local)
    assert ours.keys() == theirs.keys()
    assert ("customer_profile",) in ours and ("orders",) in ours
    for name, table in theirs.items():
        assert len(table), name
        assert ours[name].schema == table.schema, name
        pd.testing.assert_frame_equal(
            _sorted(ours[name]), _sorted(table), check_exact=False, rtol=1e-9, atol=0, obj=name
        )


def _landing_files(home: Path) -> set[Path]:
    landing = home / "data" / "lake" / "landing"
    return {p.relative_to(landing) for p in landing.rglob("*") if p.is_file()}


def _upload(home: Path, root: str, files: set[Path]) -> None:
    """Copy these landing files into the az:// lake's landing (model.json files last, as
    Synapse Link writes them)."""
    store = Lake(root).store
    landing = home / "data" / "lake" / "landing"
    for path in sorted(files, key=lambda p: (p.name == "model.json", p.as_posix())):
        store.write_bytes(f"landing/{path.as_posix()}", (landing / path).read_bytes())


@pytest.fixture
def project(tmp_path, az_root):
    """A user's project with a generated landing on local disk and the same landing in
    the container; `local` and `remote` are the environments of each lake."""
    home = tmp_path / "project"
    home.mkdir()
    local = user_project(home)  # AZURE_STORAGE_USE_EMULATOR and Azurite's port included
    code, out = _run(home, local, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED))
    assert code == 0, out
    upload_folder(home / "data" / "lake" / "landing", Lake(az_root).store, "landing")
    return home, local, local | {"C360ML_LAKE_ROOT": az_root}


def test_build_all_on_an_az_lake_equals_a_local_build_and_so_does_an_increment(project, az_root):
    home, local, remote = project
    code, out = _run(home, remote, "ingest")
    assert code == 0, out
    code, out = _run(home, remote, "build", "all")
    assert code == 0, out
    assert "Traceback" not in out and "gold (" in out
    code, out = _run(home, local, "build", "all")
    assert code == 0, out
    lake, reference = Lake(az_root), Lake(home / "data" / "lake")
    _assert_same_gold(lake, reference)
    code, out = _run(home, remote, "describe", "gold")
    assert code == 0, out
    profiles = lake.count("gold", "customer_profile")
    assert f"gold/customer_profile ({profiles:,} rows)" in out, out
    assert not (home / "data" / "lake" / "az:").exists()
    versions = {t: lake.version("gold", *t) for t in lake.tables("gold")}
    # the next sync: generated on the local copy, only its new files uploaded
    before = _landing_files(home)
    code, out = _run(home, local, "generate", "--increment")
    assert code == 0, out
    new = _landing_files(home) - before
    assert any(p.name == "model.json" for p in new)
    _upload(home, az_root, new)
    for env in (remote, local):
        code, out = _run(home, env, "build", "all")
        assert code == 0, out
    _assert_same_gold(lake, reference)
    moved = {t for t, v in versions.items() if lake.version("gold", *t) != v}
    assert ("orders",) in moved
    # incrementally: the orders were patched (a deletion-vector commit), not overwritten
    operations = [h["operation"] for h in lake.delta("gold", "orders").history(1)]
    assert operations == ["DELETE AND APPEND"]


def _lease_held(root: str) -> bool:
    import json

    found = Lake(root).store.head("_lease")
    if found is None:
        return False
    info = json.loads(Lake(root).store.read_bytes("_lease") or b"{}")
    return float(info.get("expires", 0)) > time.time()


def test_two_builds_at_once_on_an_az_lake(project, az_root):
    home, local, remote = project
    # One build holds the lease; one started then without waiting stops in one line
    # naming the holder; one that waits runs once the first is done.
    first = subprocess.Popen(
        _command(home, remote, "build", "all"),
        cwd=home,
        env=remote,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _lease_held(az_root):
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    waiting = subprocess.Popen(
        _command(home, remote, "build", "gold"),
        cwd=home,
        env=remote,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    code, out = _run(home, remote | {"C360ML_LEASE_WAIT_SECONDS": "0"}, "build", "silver")
    assert code == 2, out
    line = " ".join(out.split())
    assert f"the lake at {az_root} is in use by build all (process {first.pid}" in line, out
    assert "build silver did not start" in line and "Traceback" not in out
    out_first, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out_first
    out_waiting, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, out_waiting
    told = " ".join(out_waiting.split())
    assert f"build gold waits for the lake at {az_root}: in use by build all" in told, told
    assert "Traceback" not in out_first + out_waiting
    # the tables are as one build alone leaves them: equal to a local-disk build
    code, out = _run(home, local, "build", "all")
    assert code == 0, out
    _assert_same_gold(Lake(az_root), Lake(home / "data" / "lake"))


def test_a_build_on_a_missing_container_stops_in_one_line(tmp_path, emulator_env):
    home = tmp_path / "project"
    home.mkdir()
    env = user_project(home) | {"C360ML_LAKE_ROOT": "az://no-such-container/lake"}
    code, out = _run(home, env, "build", "all")
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: az://no-such-container/lake/_lease: the container does not exist"]
    assert "Traceback" not in out
