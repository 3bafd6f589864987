"""The jobs that score, run as a user runs them on an az:// lake in Azurite: `c360ml build
measures`, `train`, `refresh` (scores, the CI-D export, the report), `serve` + `segments
run`, each also on a local-disk lake of the same landing (one MLflow store for both), then
`retrain --if-needed` and `report` on the container.

What each writes to the lake must equal the local run's, frame for frame after sorting:
customer_measures, customer_features, churn_scores (less the wall-clock ScoredAt),
score_drift, segment_membership, the CI-D export folder (every Parquet part and CDM file,
the snapshot's time stamp aside) and the journeys exports. Training on either lake gives
the same test metrics. MLflow, BentoML and the report stay local on both."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.refresh import MANIFEST
from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.conftest import user_project
from tests.service.conftest import cli_server
from tests.storage.test_build_azurite import _sorted

pytestmark = pytest.mark.slow

CUSTOMERS = 400
SEED = 5
TRAINED_AS_OF = "2025-12-31"
STAMP = re.compile(r"snapshot=\d{8}T\d{6}\d*Z")


def _run(home: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "c360ml.cli", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, (args, out)
    assert "Traceback" not in out, out
    return out


def _assert_same(ours: pd.DataFrame, theirs: pd.DataFrame, name: str) -> None:
    assert len(theirs), name
    pd.testing.assert_frame_equal(
        _sorted_frame(ours), _sorted_frame(theirs), check_exact=False, rtol=1e-9, atol=0, obj=name
    )


def _sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    import pyarrow as pa

    return _sorted(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False))


def _assert_same_tables(remote: Lake, local: Lake, *names: str) -> None:
    for name in names:
        ours, theirs = remote.read("gold", name), local.read("gold", name)
        assert ours.schema == theirs.schema, name
        drop = [c for c in ("ScoredAt",) if c in theirs.column_names]  # the wall clock
        _assert_same(ours.drop(drop).to_pandas(), theirs.drop(drop).to_pandas(), name)


def _export(lake: Lake, folder: str) -> dict[str, object]:
    """Every file of an export folder, by its name less the snapshot's time stamp: a
    Parquet part as a frame, JSON as its value, CSV as a frame."""
    found: dict[str, object] = {}
    store = lake.store
    for key in lake.list_files("export", folder):
        name = STAMP.sub("snapshot=*", key)
        if key.endswith(".parquet"):
            with store.open_input(key) as file:
                found[name] = pq.read_table(file).to_pandas()
        elif key.endswith(".json"):
            found[name] = json.loads(STAMP.sub("snapshot=*", store.read_text(key)))
        else:
            found[name] = pd.read_csv(io.StringIO(store.read_text(key)), dtype=str)
    return found


def _assert_same_export(remote: Lake, local: Lake, folder: str) -> None:
    ours, theirs = _export(remote, folder), _export(local, folder)
    assert ours.keys() == theirs.keys() and theirs, folder
    for name, value in theirs.items():
        if isinstance(value, pd.DataFrame):
            _assert_same(ours[name], value, name)
        else:
            assert ours[name] == value, name


def _test_metrics(home: Path, version: str) -> dict[str, float]:
    import mlflow

    uri = f"sqlite:///{home / 'data' / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    run = client.get_run(client.get_model_version("c360-retention", version).run_id)
    # Not the oracle's figures: its Monte Carlo draws follow the order the source map's
    # rows are read in, which is not part of a table's contract.
    return {
        k: v
        for k, v in run.data.metrics.items()
        if k.startswith("test_") and "oracle" not in k and "headroom" not in k
    }


@pytest.fixture
def project(tmp_path, az_root):
    """A user's project: a generated landing on local disk and the same in the container;
    the environments of the local and the az:// lake (one MLflow store, one BentoML home)."""
    home = tmp_path / "project"
    home.mkdir()
    local = user_project(home)  # AZURE_STORAGE_USE_EMULATOR and Azurite's port included
    _run(home, local, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED))
    upload_folder(home / "data" / "lake" / "landing", Lake(az_root).store, "landing")
    return home, local, local | {"C360ML_LAKE_ROOT": az_root}


def test_measures_train_refresh_segments_on_an_az_lake_equal_a_local_lake(project, az_root):
    home, local, remote = project
    lake, reference = Lake(az_root), Lake(home / "data" / "lake")
    for env in (remote, local):
        _run(home, env, "build", "all")
        out = _run(home, env, "build", "measures", "--as-of", "2025-06-30")
        assert "gold/customer_measures" in out
    _assert_same_tables(lake, reference, "customer_measures")

    out = _run(home, remote, "train", "--as-of", TRAINED_AS_OF)
    assert "c360-retention v1" in out
    out = _run(home, local, "train", "--as-of", TRAINED_AS_OF)
    assert "c360-retention v2" in out
    metrics = _test_metrics(home, "1")
    assert "test_roc_auc" in metrics and metrics == _test_metrics(home, "2")
    _run(home, remote, "model", "approve", "1", "--force")  # the same champion for both

    seconds, told = {}, {}
    for name, env in (("az", remote), ("local", local)):
        started = time.perf_counter()
        told[name] = " ".join(_run(home, env, "refresh").split())
        seconds[name] = time.perf_counter() - started
    for name, where in (("az", lake), ("local", reference)):
        assert f"ci-d manifest: {where.uri('export', 'ci-d', MANIFEST)}" in told[name]
        assert f"scores: {where.uri('gold', 'churn_scores')}" in told[name]
    print(
        f"refresh, {CUSTOMERS} persons: Azurite {seconds['az']:.1f} s, local {seconds['local']:.1f} s"
    )
    _assert_same_tables(
        lake, reference, "customer_measures", "customer_features", "churn_scores", "score_drift"
    )
    _assert_same_export(lake, reference, "ci-d")
    assert not (home / "data" / "lake" / "az:").exists()
    # the champion's health read back from the container's score_drift
    quiet = remote | {"C360ML_WATCH__PSI_ALARM": "10"}
    out = " ".join(_run(home, quiet, "retrain", "--if-needed").split())
    assert "no retrain: no trigger fired (champion 0 days old; score PSI" in out, out

    with cli_server(home, remote, "az-token") as url:
        for where, env in ((lake, remote), (reference, local)):
            out = _run(
                home, env | {"C360ML_API_TOKEN": "az-token"}, "segments", "run", "--endpoint", url
            )
            assert f"journey exports: {where.uri('export', 'journeys')}" in " ".join(out.split())
    _assert_same_tables(lake, reference, "segment_membership")
    _assert_same_export(lake, reference, "journeys")

    out = _run(home, remote, "report")
    assert "retention_report.html" in out
