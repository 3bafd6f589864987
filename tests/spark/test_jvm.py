"""silver -> unify -> gold on Apache Spark itself (local mode, a JVM) equal DuckDB's: Spark's
own SQL semantics for every SQL file and check, its own Arrow exchange with the Python
workers (mapInArrow, mapInPandas, pandas UDFs, applyInPandas), and the classic session a
Spark job or notebook has, taken by c360ml without a URL (`tests/spark/jvm_job.py`).

The lake has every source and `test_silver._dirt` in bronze (values to standardise, rows
to quarantine, generic rows without an order id), so the silver checks and the Python
standardisation are compared on rows they act on; the shared lake has neither."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.medallion.build import build_gold, build_silver, build_unify
from c360ml.medallion.ingest import ingest_landing
from c360ml.storage.lake import Lake
from c360ml.synth import generate_lake
from tests.conftest import make_settings
from tests.spark.test_gold import outputs as gold_outputs
from tests.spark.test_gold import sorted_frame
from tests.spark.test_silver import SOURCES, _dirt
from tests.spark.test_silver import outputs as silver_outputs

REPO = Path(__file__).resolve().parents[2]
CUSTOMERS, SEED = 1000, 17
REDIRECTS = ("gold", "customer_id_redirects")  # none on a first build: in neither lake
UNIFY = [("gold", "customer_source_map"), ("gold", "customer_profile"), ("gold", "unify_report")]
COMPARED = [*silver_outputs(), *UNIFY, REDIRECTS, *gold_outputs()]


@pytest.fixture(scope="module")
def jvm_build(tmp_path_factory):
    """(DuckDB's lake, the job's parquet folder, the job's summaries): a generated lake
    ingested, with `_dirt` in bronze, copied (bronze only) for the job, then built through
    gold by DuckDB; the copy built silver -> unify -> gold by the job."""
    base = tmp_path_factory.mktemp("jvm")
    duck = make_settings(base / "duckdb").model_copy(update={"sources": SOURCES})
    generate_lake(duck, customers=CUSTOMERS, seed=SEED)
    ingest_landing(duck)
    _dirt(duck, increment=False)
    job = make_settings(base / "job")
    shutil.copytree(duck.lake, job.lake, ignore=shutil.ignore_patterns("landing"))
    for build in (build_silver, build_unify, build_gold):
        build(duck)
    mirror = base / "parquet"
    done = subprocess.run(
        [sys.executable, "-m", "tests.spark.jvm_job", str(base / "job"), str(mirror)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Lake(duck.lake), mirror, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_job_ran_every_stage_on_the_classic_session(jvm_build):
    """c360ml took the job's own session (no URL): a classic one, not Spark Connect; every
    stage was built from bronze, silver's accounting balanced, with rows quarantined."""
    duck, _, job = jvm_build
    assert job["session"] == "pyspark.sql.session"
    silver = {r["table"]: r for r in job["silver"]}
    assert set(silver) == {w[-1] for w in silver_outputs() if duck.exists(*w)}
    assert all(r["balanced"] == "yes" for r in silver.values())
    assert all(r["new bronze rows"] > 0 for n, r in silver.items() if n != "generic_transactions")
    assert sum(r["quarantined"] for r in silver.values()) > 0
    assert job["unify"]["records"] == duck.count("gold", "customer_source_map")
    assert job["unify"]["customers"] == duck.count("gold", "customer_profile")
    assert job["unify"]["redirects"] == 0
    assert [r["written"] for r in job["gold"]] == ["rebuilt"] * len(job["gold"]) != []


def test_a_python_worker_failure_is_one_line_naming_the_error(jvm_build):
    """A UDF's exception on the JVM's Python workers is told by its own line (the error's
    first line only says that a Python worker failed)."""
    _, _, job = jvm_build
    assert job["worker_error"] == "silver/probe: Spark failed: ValueError: no such attribute"


@pytest.mark.parametrize("where", COMPARED, ids="/".join)
def test_apache_spark_equals_duckdb(jvm_build, where):
    """Each table Spark wrote (silver and its quarantine, unify's, gold's) has DuckDB's
    columns, types and rows (sorted; floats within 1e-9 relative)."""
    duck, mirror, _ = jvm_build
    path = mirror.joinpath(*where)
    if not duck.exists(*where):
        assert not path.exists()
        return
    expected, got = duck.read(*where), pq.read_table(path)
    assert got.schema.names == expected.schema.names
    assert [f.type for f in got.schema] == [f.type for f in expected.schema]
    assert len(got) == len(expected) > 0 or where[0] == "quarantine"
    pd.testing.assert_frame_equal(
        sorted_frame(got), sorted_frame(expected), check_exact=False, rtol=1e-9, atol=0
    )


def test_a_python_worker_failure_reads_the_same_on_sail(spark):
    """Sail's Python worker failure, told by the same line as the JVM's."""
    from tests.spark.jvm_job import worker_error

    assert worker_error(spark) == "silver/probe: Spark failed: ValueError: no such attribute"


def test_the_parquet_tables_refuse_a_row_delete(tmp_path):
    """A change log's DELETE (Delta's only, never on a first build) is refused in one line
    naming the log, not run as something else."""
    from c360ml.spark.gold import SparkBuildError
    from tests.spark.jvm_job import ParquetTables

    where = ("state", "silver", "salesline_changes")
    with pytest.raises(SparkBuildError) as refused:
        ParquetTables(tmp_path).delete(None, Lake(tmp_path / "lake"), where, "silver_version >= 3")
    assert str(refused.value) == (
        "state/silver/salesline_changes: parquet tables have no row deletes (Delta's)"
    )
