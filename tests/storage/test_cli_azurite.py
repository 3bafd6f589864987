"""`c360ml ingest` on an az:// lake as a user runs it: the lake root and Azurite's
connection in environment variables, a landing generated on disk (with Synapse Link's
absolute partition locations, `generate --absolute-locations`) and copied into the
container (the Spark engine's commands on a container: tests/storage/test_spark_azurite.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.storage.azurite import ACCOUNT


def _run(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "c360ml.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def test_ingest_command_on_an_az_lake(tmp_path, az_root, container):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360ML_", "MLFLOW_"))}
    env |= {"C360ML_LOG_DIR": str(tmp_path / "logs"), "C360ML_TRUTH_ROOT": str(tmp_path / "t")}
    url = f"https://{ACCOUNT}.dfs.core.windows.net/{container}/c360ml/lake"
    local = env | {"C360ML_LAKE_ROOT": str(tmp_path / "lake")}
    code, out = _run(tmp_path, local, "generate", "--customers", "200", "--absolute-locations", url)
    assert code == 0, out
    upload_folder(tmp_path / "lake" / "landing", Lake(az_root).store, "landing")
    remote = env | {"C360ML_LAKE_ROOT": az_root}  # + AZURE_STORAGE_USE_EMULATOR, the port
    code, out = _run(tmp_path, remote, "ingest")
    assert code == 0, out
    assert "Traceback" not in out
    assert f"rows quarantined, each with its file, line and reason: {az_root}/quarantine" in (
        " ".join(out.split())
    )
    lake = Lake(az_root)
    assert ("d365", "salesline") in lake.tables("bronze") and lake.count(
        "bronze", "d365", "salesline"
    )
    assert not (tmp_path / "lake" / "bronze").exists()
    versions = {t: lake.version("bronze", *t) for t in lake.tables("bronze")}
    code, out = _run(tmp_path, remote, "ingest")  # nothing new
    assert code == 0, out
    assert {t: lake.version("bronze", *t) for t in lake.tables("bronze")} == versions
