"""Erasure on an az:// lake in Azurite (#26): the job record, the journeys purge, the
unreferenced files that hold the person and the Delta logs, all through the container.

The first test runs one erasure job on a hand-made table: an overwritten version and a
cut-short write leave blobs no version uses, one holding the person. The second is the
acceptance: a generated lake scored once on Azurite and on local disk (one champion for
both), an increment that erases persons at the source, `c360ml refresh` on each; then no
blob of the container (landing aside: the source's own export) holds an erased person's
identifier, the job record is gone, and gold and silver equal the local run's.
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
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c360ml.config import load_settings
from c360ml.medallion.erasure import JOB, Delete, ErasureJob, finish_pending, pending, run
from c360ml.medallion.unify import read_redirects
from c360ml.storage.lake import Lake
from c360ml.storage.objects import LakeStore
from tests.conftest import make_settings, user_project
from tests.storage.test_jobs_azurite import _assert_same, _assert_same_tables, _run
from tests.test_erasure import _found, _identifiers

CUSTOMERS = 300
SEED = 5


def _found_blobs(store: LakeStore, needles: set[str], skip: str) -> dict[str, list[str]]:
    """Every blob (below `skip` aside) that holds a needle: Parquet read down to every
    value (pages are compressed; checkpoints nest), any other blob as bytes."""
    hits: dict[str, list[str]] = {}
    for key in store.list():
        if key.startswith(skip):
            continue
        if key.endswith(".parquet"):
            with store.open_input(key) as file:
                text = json.dumps(pq.read_table(file).to_pylist(), default=str)
        else:
            text = store.read_bytes(key).decode("utf-8", "replace")
        found = sorted(n for n in needles if n in text)
        if found:
            hits[key] = found[:3]
    return hits


def test_an_erasure_job_on_an_az_lake_leaves_no_blob_holding_the_person(az_root):
    lake = Lake(az_root)
    lake.write(pa.table({"customer_id": ["C1", "C2"]}), "gold", "customer_measures")
    # The version the person is erased from is a rewrite: its older file is unreferenced.
    lake.write(
        pa.table({"customer_id": ["C1", "C2", "C3"]}), "gold", "customer_measures", mode="overwrite"
    )
    store = lake.store
    garbage = lake.key("gold", "customer_measures", "part-cut.parquet")
    store.write_bytes(garbage, b"PAR1 cut short")  # a write a kill cut short
    journeys = lake.key("export", "journeys", "high_risk.csv")
    store.write_text(journeys, "CustomerId,ContactId\nC1,k1\nC2,k2\n")
    job = ErasureJob(["C1"], [], [], [Delete(["gold", "customer_measures"], "customer_id", ["C1"])])

    result = run(lake, job)

    assert lake.read_pandas("gold", "customer_measures").customer_id.tolist() == ["C2", "C3"]
    assert not store.exists(garbage) and result.files_removed >= 2
    assert pd.read_csv(io.StringIO(store.read_text(journeys))).CustomerId.tolist() == ["C2"]
    assert result.histories_forgotten == 1
    assert _found_blobs(store, {"C1"}, "landing/") == {}
    assert not store.exists(lake.key(*JOB)) and pending(lake) is None


def test_a_job_a_killed_run_left_in_the_container_is_finished(tmp_path, az_root):
    """What a refresh or build does first on a container: the job record a killed run
    left (here before its first step) is found there and run to its end, under the lease."""
    lake = Lake(az_root)
    lake.write(pa.table({"customer_id": ["C1", "C2"]}), "gold", "customer_measures")
    job = ErasureJob(["C1"], [["dataverse", "k1"]], [], [])
    job.deletes = [Delete(["gold", "customer_measures"], "customer_id", ["C1"])]
    lake.write_json(asdict(job), *JOB)
    assert pending(lake).deletes == job.deletes  # read back from the blob

    result = finish_pending(make_settings(tmp_path).model_copy(update={"lake_root": az_root}))

    assert result is not None and result.resumed and result.customer_ids == ["C1"]
    assert lake.read_pandas("gold", "customer_measures").customer_id.tolist() == ["C2"]
    assert pending(lake) is None and _found_blobs(lake.store, {"C1"}, "landing/") == {}


def _upload_new(folder: Path, store: LakeStore, prefix: str) -> int:
    """The files of a local landing the container lacks, model.json files last (as
    Synapse Link writes a sync folder)."""
    have = set(store.list(prefix))
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()),
        key=lambda p: (p.name == "model.json", p.as_posix()),
    )
    sent = 0
    for path in files:
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        if key not in have:
            store.write_bytes(key, path.read_bytes())
            sent += 1
    return sent


TRAIN = (
    "import pandas as pd; from c360ml.config import load_settings; "
    "from c360ml.model.pipeline import run_training; from c360ml.model.train import "
    "TrainConfig; config = TrainConfig(nthread=2, max_trees=30, early_stopping_rounds=10, "
    "bootstrap_resamples=20); assert run_training(load_settings(), "
    "pd.Timestamp('2025-12-31', tz='UTC'), config=config).promoted"
)


@pytest.mark.slow
def test_refresh_erases_persons_from_every_blob_of_an_az_lake(tmp_path, az_root):
    home = tmp_path / "project"
    home.mkdir()
    local = user_project(home)
    # a killed run's lease outlives it 6 s here (the default minute would be idle time)
    remote = local | {"C360ML_LAKE_ROOT": az_root, "C360ML_LEASE_TTL_SECONDS": "6"}
    lake, reference = Lake(az_root), Lake(home / "data" / "lake")
    _run(home, local, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED), "--fresh")
    landing = home / "data" / "lake" / "landing"
    assert _upload_new(landing, lake.store, "landing")
    for env in (remote, local):
        _run(home, env, "build", "all")
    # One small champion for both lakes (one MLflow store), trained on the local lake.
    subprocess.run([sys.executable, "-c", TRAIN], cwd=home, env=local, check=True, timeout=600)
    for env, where in ((remote, lake), (local, reference)):
        _run(home, env, "refresh")
        contacts = where.read_pandas("gold", "customer_source_map")
        contacts = contacts[contacts.source == "dataverse"].sort_values("source_key")
        export = contacts.rename(columns={"customer_id": "CustomerId", "source_key": "ContactId"})
        where.store.write_text(
            where.key("export", "journeys", "high_risk.csv"),
            export[["CustomerId", "ContactId"]].to_csv(index=False),
        )

    _run(home, local, "generate", "--increment")
    assert _upload_new(landing, lake.store, "landing")
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
