"""The demo with its lake in a container on Azurite (#26), run as the README says:
`make demo LAKE=azurite`, beside `make demo` on a local folder with the same seed.

The whole chain runs on the container (generate, build, train, refresh, serve + segments
run, report), and what it leaves in the lake equals the local demo's: every gold table
(churn_scores less the wall-clock ScoredAt), the CI-D export folder and the journeys
exports, frame for frame after sorting. `generate` writes its landing into the container
itself, file for file what it writes into a local folder, for the initial export and an
increment.

Both demos run in a project folder of their own, with the repo's Makefile and virtual
environment (`make -f`, `-o install`: the test's venv is the installed one), so the repo's
own data/ is never touched. Two whole demos (each trains, serves and reports) take minutes
even at 700 persons, past the suite's budget: `C360ML_AZURITE_DEMO=1` runs them at 700
persons (seed 11, where the gate promotes the first model, as tests/test_refresh.py
trains), `C360ML_AZURITE_DEMO=<persons>` at that size with the demo's seed (20000: the
demo itself). The suite runs what is new on the demo's way: generate into a container,
and the runner the Makefile starts Azurite and runs the demo's commands with."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from c360ml.storage.lake import Lake
from tests.conftest import user_project
from tests.storage.azurite import ROOT, Azurite, free_port, user_environment
from tests.storage.test_jobs_azurite import _assert_same_export, _assert_same_tables

pytestmark = pytest.mark.slow

DEMO = os.environ.get("C360ML_AZURITE_DEMO", "")
CUSTOMERS, SEED = (700, 11) if DEMO in ("", "1") else (int(DEMO), 42)


def _landing(lake: Lake) -> dict[str, bytes]:
    return {key: lake.store.read_bytes(key) for key in lake.list_files("landing")}


def _generate(home: Path, env: dict[str, str], *args: str, code: int = 0) -> str:
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "c360ml"), "generate", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == code and "Traceback" not in out, out
    return out


def test_generate_writes_its_landing_into_a_container_as_into_a_folder(tmp_path, az_root):
    env = user_project(tmp_path)  # the emulator's variables included
    remote = env | {"C360ML_LAKE_ROOT": az_root, "C360ML_TRUTH_ROOT": str(tmp_path / "t2")}
    first = ("--customers", "200", "--seed", "5")
    out = _generate(tmp_path, remote, *first)
    assert f"landing: {az_root}/landing" in out, out
    _generate(tmp_path, env, *first)
    lake, folder = Lake(az_root), Lake(tmp_path / "data" / "lake")
    ours, theirs = _landing(lake), _landing(folder)
    assert any(k.endswith("model.json") for k in theirs) and ours == theirs
    assert not list(tmp_path.glob("**/.landing-*")), "the staging folder is removed"

    for where in (remote, env):
        _generate(tmp_path, where, "--increment")
    increment = _landing(lake)
    assert increment == _landing(folder) and len(increment) > len(ours)

    out = _generate(tmp_path, remote, *first, code=2)
    assert f"a generated lake already exists at {az_root}/landing" in out, out
    _generate(tmp_path, remote, *first, "--fresh")
    assert _landing(lake) == ours  # the increment's sync folders were removed


RUNNER = ROOT / "tests" / "storage" / "azurite.py"
# what the demo's commands find: the lake root and the emulator's variables, no other Azure
# credential; a blob written there; the command's own exit status
COMMAND = """
import json, os, sys
from c360ml.storage.lake import Lake
lake = Lake(os.environ["C360ML_LAKE_ROOT"])
lake.write_json({"hello": "demo"}, "state", "runner.json")
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(("AZURE", "AZURITE", "C360ML_L"))}))
sys.exit(3)
"""


def test_the_demos_runner_gives_its_commands_a_lake_on_azurite(tmp_path, monkeypatch):
    """What `make demo LAKE=azurite` runs the demo's commands under (the suite's check of
    it; the whole demo is the test below)."""
    import json
    import sys

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "a-real-account's-key")  # not passed on
    folder = tmp_path / "azurite"
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--location", str(folder), "--container", "demo",
         "--lake", "az://demo/lake", "--", sys.executable, "-c", COMMAND],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    said, seen = done.stdout.splitlines()[0], json.loads(done.stdout.splitlines()[-1])
    assert said.startswith("Azurite on http://127.0.0.1:") and "lake_root az://demo/lake" in said
    assert seen.pop("AZURITE_BLOB_STORAGE_URL").startswith("http://127.0.0.1:")
    assert seen == {"AZURE_STORAGE_USE_EMULATOR": "true", "C360ML_LAKE_ROOT": "az://demo/lake"}
    again = Azurite(folder)  # its blobs stay in the folder, as data/azurite keeps the demo's
    try:
        for name, value in user_environment(again.url).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_KEY")
        assert Lake("az://demo/lake").read_json("state", "runner.json") == {"hello": "demo"}
    finally:
        again.stop()


def _make_demo(home: Path, *args: str) -> tuple[str, float]:
    """`make demo ...` in its own project folder, as a user runs it (small and quick)."""
    env = user_project(home)
    for name in [n for n in env if n.startswith(("AZURE_", "AZURITE_"))]:
        del env[name]  # a user's shell: Azurite is the Makefile's to start
    command = [
        "make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", "install", "demo",
        *args, f"VENV={ROOT / '.venv'}", f"DEMO_CUSTOMERS={CUSTOMERS}", f"DEMO_SEED={SEED}",
        f"PORT={free_port()}",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return " ".join(out.split()), time.perf_counter() - started


@pytest.fixture
def demos(tmp_path):
    """The demo on Azurite and on a local folder, in two project folders."""
    on_azurite, on_disk = tmp_path / "azurite", tmp_path / "local"
    on_azurite.mkdir()
    on_disk.mkdir()
    out, seconds = _make_demo(on_azurite, "LAKE=azurite")
    local_out, local_seconds = _make_demo(on_disk)
    print(f"make demo, {CUSTOMERS} persons: Azurite {seconds:.1f} s, local {local_seconds:.1f} s")
    return on_azurite, out, on_disk, local_out


@pytest.mark.skipif(not DEMO, reason="two whole demos: C360ML_AZURITE_DEMO=1 runs them")
def test_the_demo_on_azurite_equals_the_local_demo(demos, monkeypatch):
    on_azurite, out, on_disk, local_out = demos
    assert "lake_root az://demo/lake" in out
    assert "scores table: az://demo/lake/gold/churn_scores" in out, out[-2000:]
    assert "journey exports: az://demo/lake/export/journeys" in out, out[-2000:]
    assert f"report: {on_azurite}/data/reports/retention_report.html" in out
    assert not (on_azurite / "data" / "lake").exists(), "nothing of the lake on local disk"
    assert f"scores table: {on_disk}/data/lake/gold/churn_scores" in local_out

    # The Makefile's Azurite stopped with the demo; its blobs stay in data/azurite: read
    # them again through an Azurite of the test's own on that folder.
    again = Azurite(on_azurite / "data" / "azurite")
    try:
        for name, value in user_environment(again.url).items():
            monkeypatch.setenv(name, value)
        lake, reference = Lake("az://demo/lake"), Lake(on_disk / "data" / "lake")
        names = ["/".join(t) for t in reference.tables("gold")]
        assert "churn_scores" in names and "segment_membership" in names, names
        assert ["/".join(t) for t in lake.tables("gold")] == names
        _assert_same_tables(lake, reference, *names)
        _assert_same_export(lake, reference, "ci-d")
        _assert_same_export(lake, reference, "journeys")
    finally:
        again.stop()
