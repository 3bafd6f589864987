"""Erasure on an az:// lake in Azurite (#26): the job record, the journeys purge, the
unreferenced files that hold the person and the Delta logs, all through the container.

The first test runs one erasure job on a hand-made table: an overwritten version and a
cut-short write leave blobs no version uses, one holding the person. The second finishes
the job a killed run left in the container. The acceptance (a generated lake scored on
Azurite and on local disk, an increment that erases persons at the source, `c360ml
refresh` on each, the container's killed in the erasure) continues the scored project of
tests/storage/test_jobs_azurite.py, whose builds, training and first refresh it shares.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from c360ml.medallion.erasure import JOB, Delete, ErasureJob, finish_pending, pending, run
from c360ml.storage.lake import Lake
from c360ml.storage.objects import LakeStore
from tests.conftest import make_settings


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
