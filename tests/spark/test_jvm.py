"""Gold on Apache Spark itself (local mode, a JVM) equals gold on DuckDB: Spark's own SQL
semantics for every gold SQL file and check, and the classic session a Spark job or
notebook has, taken by c360ml without a URL (`tests/spark/jvm_job.py`)."""

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

from c360ml.storage.lake import Lake
from tests.spark.test_gold import outputs, sorted_frame

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def jvm_build(shared_lake, tmp_path_factory):
    """(DuckDB's lake, the job's output folder, the job's summary): the shared lake copied
    without its gold outputs, gold built from its silver and source map by the job."""
    base = tmp_path_factory.mktemp("jvm_gold")
    shutil.copytree(shared_lake.lake, base / "lake")
    for where in outputs():
        shutil.rmtree(Lake(base / "lake").path(*where), ignore_errors=True)
    mirror = base / "parquet"
    done = subprocess.run(
        [sys.executable, "-m", "tests.spark.jvm_job", str(base), str(mirror)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Lake(shared_lake.lake), mirror, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_job_ran_on_the_classic_session(jvm_build):
    """c360ml took the job's own session (no URL): a classic one, not Spark Connect."""
    _, _, job = jvm_build
    assert job["session"] == "pyspark.sql.session"
    assert [r["written"] for r in job["rows"]] == ["rebuilt"] * len(job["rows"])


@pytest.mark.parametrize("where", outputs(), ids="/".join)
def test_apache_spark_gold_equals_duckdb_gold(jvm_build, where):
    duck, mirror, _ = jvm_build
    path = mirror.joinpath(*where)
    if not duck.exists(*where):
        assert not path.exists()
        return
    expected, got = duck.read(*where), pq.read_table(path)
    assert got.schema.names == expected.schema.names
    assert [f.type for f in got.schema] == [f.type for f in expected.schema]
    assert len(got) == len(expected)
    pd.testing.assert_frame_equal(
        sorted_frame(got), sorted_frame(expected), check_exact=False, rtol=1e-9, atol=0
    )
