"""The jobs that score, run as a user runs them on an az:// lake in Azurite: `c360ml build
measures`, `train`, `refresh` (scores, the CI-D export, the report), `serve` + `segments
run`, each also on a local-disk lake of the same landing (one MLflow store for both), then
`retrain --if-needed` and `report` on the container; then an erasure through them.

What each writes to the lake must equal the local run's, frame for frame after sorting:
customer_measures, customer_features, churn_scores (less the wall-clock ScoredAt),
score_drift, segment_membership, the CI-D export folder (every Parquet part and CDM file,
the snapshot's time stamp aside) and the journeys exports. Training on either lake gives
the same test metrics. MLflow, BentoML and the report stay local on both.

The erasure (#26; its jobs alone in tests/storage/test_erasure_azurite.py): an increment
that erases persons at the source, `c360ml refresh` on each lake, the container's killed
once in the erasure and run again; then no blob of the container (landing aside: the
source's own export) holds an erased person's identifier, the job record is gone, and gold
and silver equal the local run's.

The two tests continue one project (`scored`, built once per module): the first reads what
its builds, trainings and refreshes printed and adds segments and a report; the erasure,
second, changes both lakes. It holds on the project as the fixture leaves it too (run
alone, or on another worker).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.config import load_settings
from c360ml.medallion.erasure import JOB, pending
from c360ml.medallion.unify import read_redirects
from c360ml.refresh import MANIFEST
from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.conftest import user_project
from tests.service.conftest import cli_server
from tests.storage.test_build_azurite import _sorted
from tests.storage.test_erasure_azurite import _found_blobs, _upload_new
from tests.test_erasure import _found, _identifiers

pytestmark = pytest.mark.slow

CUSTOMERS = 300  # the erasure test's landing as it had its own project (the jobs test's: 400)
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


def _assert_same(ours: pd.DataFrame, theirs: pd.DataFrame, name: str, empty: bool = False) -> None:
    """Equal after sorting (and not empty, unless `empty`); floats to 1e-9, relative or
    absolute: DuckDB's parallel sums add in no fixed order, so a mean of amounts
    cancelling out can be 0.0 in one run and 2.2e-15 in the other."""
    assert empty or len(theirs), name
    pd.testing.assert_frame_equal(
        _sorted_frame(ours), _sorted_frame(theirs), check_exact=False, rtol=1e-9, atol=1e-9,
        obj=name,
    )  # fmt: skip


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
        if isinstance(value, pd.DataFrame):  # a segment may be empty at a small size
            _assert_same(ours[name], value, name, empty=True)
        else:
            assert ours[name] == value, name
    assert any(len(v) for v in theirs.values() if isinstance(v, pd.DataFrame)), folder


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


@dataclass(frozen=True)
class Scored:
    """A user's project scored on both lakes (see `scored`)."""

    home: Path
    local: dict[str, str]  # the environment of the local-disk lake
    remote: dict[str, str]  # ... and of the az:// lake (one MLflow store, one BentoML home)
    lake: Lake  # the az:// lake
    reference: Lake  # the local-disk lake
    told: dict[str, str]  # what each command printed, by "<command> <az|local>"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, module_az_root) -> Scored:
    """A user's project: a generated landing on local disk and the same in the container;
    on each lake `build all`, `build measures`, `train` (v1 on the container, v2 on disk),
    then v1 approved as the champion of both and `refresh` on each."""
    home = tmp_path_factory.mktemp("az_project")
    local = user_project(home)  # AZURE_STORAGE_USE_EMULATOR and Azurite's port included
    remote = local | {"C360ML_LAKE_ROOT": module_az_root}
    _run(home, local, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED))
    upload_folder(home / "data" / "lake" / "landing", Lake(module_az_root).store, "landing")
    told = {}
    for name, env in (("az", remote), ("local", local)):
        _run(home, env, "build", "all")
        told[f"measures {name}"] = _run(home, env, "build", "measures", "--as-of", "2025-06-30")
    for name, env in (("az", remote), ("local", local)):
        told[f"train {name}"] = _run(home, env, "train", "--as-of", TRAINED_AS_OF)
    _run(home, remote, "model", "approve", "1", "--force")  # the same champion for both
    seconds = {}
    for name, env in (("az", remote), ("local", local)):
        started = time.perf_counter()
        told[f"refresh {name}"] = " ".join(_run(home, env, "refresh").split())
        seconds[name] = time.perf_counter() - started
    print(
        f"refresh, {CUSTOMERS} persons: Azurite {seconds['az']:.1f} s, local {seconds['local']:.1f} s"
    )
    reference = Lake(home / "data" / "lake")
    return Scored(home, local, remote, Lake(module_az_root), reference, told)


def test_measures_train_refresh_segments_on_an_az_lake_equal_a_local_lake(scored):
    home, local, remote, told = scored.home, scored.local, scored.remote, scored.told
    lake, reference = scored.lake, scored.reference
    for name in ("az", "local"):
        assert "gold/customer_measures" in told[f"measures {name}"]
    assert "c360-retention v1" in told["train az"]
    assert "c360-retention v2" in told["train local"]
    metrics = _test_metrics(home, "1")
    assert "test_roc_auc" in metrics and metrics == _test_metrics(home, "2")

    for name, where in (("az", lake), ("local", reference)):
        refreshed = told[f"refresh {name}"]
        assert f"ci-d manifest: {where.uri('export', 'ci-d', MANIFEST)}" in refreshed
        assert f"scores: {where.uri('gold', 'churn_scores')}" in refreshed
    # `build measures`' rows (as_of 2025-06-30) are compared with the refresh's
    measures = reference.read_pandas("gold", "customer_measures")
    assert (pd.to_datetime(measures.as_of, utc=True) == pd.Timestamp("2025-06-30", tz="UTC")).any()
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


def test_refresh_erases_persons_from_every_blob_of_an_az_lake(scored):
    home, local = scored.home, scored.local
    # a killed run's lease outlives it 6 s here (the default minute would be idle time)
    remote = scored.remote | {"C360ML_LEASE_TTL_SECONDS": "6"}
    lake, reference = scored.lake, scored.reference
    for where in (lake, reference):  # every contact in a journey export, as a deployment has
        contacts = where.read_pandas("gold", "customer_source_map")
        contacts = contacts[contacts.source == "dataverse"].sort_values("source_key")
        export = contacts.rename(columns={"customer_id": "CustomerId", "source_key": "ContactId"})
        where.store.write_text(
            where.key("export", "journeys", "high_risk.csv"),
            export[["CustomerId", "ContactId"]].to_csv(index=False),
        )

    _run(home, local, "generate", "--increment")
    assert _upload_new(home / "data" / "lake" / "landing", lake.store, "landing")
    settings = load_settings(home / "c360ml.yaml", environ={})
    needles, kept_ids = _identifiers(reference, settings)
    assert any(n.startswith("C") and len(n) == 17 for n in needles), "nobody we scored erased"
    assert _found_blobs(lake.store, needles, "landing/"), "the identifiers are not in the blobs"

    # On the container the refresh is killed once the erasure's rows are gone; the next
    # one (after the killed run's lease expired) finishes the job from its blob first.
    _refresh_killed_in_erasure(home, remote, lake)
    assert pending(lake) is not None, "the killed refresh left no erasure job"
    told = {}
    for name, env in (("az", remote), ("local", local)):
        told[name] = " ".join(_run(home, env, "refresh").split())
    assert "finishing the erasure a stopped run left" in told["az"]
    # the erasure step's source records and customers (the resumed job's counted once)
    notes = {k: _row(v)[1].split(";", 1)[0] for k, v in told.items()}
    assert notes["az"] == notes["local"] and "customers erased" in notes["az"], notes
    print("erasure step:", notes["az"], "| seconds az / local:", _seconds(told))

    assert _found_blobs(lake.store, needles, "landing/") == {}
    assert not lake.store.exists(lake.key(*JOB)) and pending(lake) is None
    assert _found(reference.root, needles, (reference.path("landing"),)) == {}
    gold = ["customer_source_map", "customer_profile", "orders", "support_cases"]
    gold += ["customer_measures", "customer_features", "churn_scores"]
    _assert_same_tables(lake, reference, *gold)
    for name in ("contact", "custtable", "incident"):
        _assert_same(lake.read_pandas("silver", name), reference.read_pandas("silver", name), name)
    assert _export_rows(lake) == _export_rows(reference)
    scores = lake.read_pandas("gold", "churn_scores")
    assert kept_ids <= set(scores.CustomerId) | set(read_redirects(lake).retired_id)


def _refresh_killed_in_erasure(home: Path, env: dict[str, str], lake: Lake) -> None:
    """`c360ml refresh`, SIGKILLed (its process group) once the erasure job's record in
    the container says its rows step is done."""
    with (home / "killed_refresh.out").open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "c360ml.cli", "refresh"],
            cwd=home,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if "rows" in ((lake.read_json(*JOB) or {}).get("done") or []):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    code = proc.wait()
    tail = (home / "killed_refresh.out").read_text()[-2000:]
    assert code == -signal.SIGKILL, f"no kill in the erasure: exit {code}\n{tail}"


def _row(told: str) -> list[str]:
    """The cells of the erasure step's row in refresh's summary table: rows, note, seconds."""
    return [c.strip() for c in told.split("│ erasure │", 1)[1].split("│")]


def _seconds(told: dict[str, str]) -> list[str]:
    return [next(c for c in _row(v)[2:] if re.fullmatch(r"[\d.]+", c)) for v in told.values()]


def _export_rows(lake: Lake) -> list[dict]:
    text = lake.store.read_text(lake.key("export", "journeys", "high_risk.csv"))
    return pd.read_csv(io.StringIO(text), dtype=str).to_dict("records")
