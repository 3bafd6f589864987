"""A c360ml build (silver -> unify -> gold) as a Spark job on Apache Spark itself: local
mode, a JVM on the machine's Java 17, the classic SparkSession active, as in a Synapse
notebook (which has no Spark Connect endpoint). c360ml takes that session
(`spark_session()`, no URL) and runs the same client code, SQL, checks and Python
functions (mapInArrow, mapInPandas, pandas UDFs, applyInPandas) it runs on Sail.

Delta's jars cannot be fetched here, so Spark reads and writes the lake's tables as
parquet under MIRROR (`ParquetTables`, through `c360ml.spark.gold.SparkTables`), and each
table Spark writes is also committed to the lake (deltalake on the driver, the rows Spark
wrote): c360ml's bookkeeping through `Lake` (which tables exist, counts, commit metadata)
then sees what it sees after a Delta write. It runs in a process of its own: a Spark
Connect session (the Sail tests') switches pyspark to Connect mode for the whole process.

    python -m tests.spark.jvm_job BASE MIRROR    # BASE holds the lake (make_settings)

prints the stages' summaries as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from c360ml.spark import spark_session
from c360ml.spark.gold import SparkBuildError, build_gold
from c360ml.spark.silver import _spark_step, build_silver
from c360ml.spark.unify import build_unify
from c360ml.storage.lake import Lake
from tests.conftest import make_settings

# Small data on two cores: Spark's 200 default shuffle partitions would be 200 tasks each.
# A short-lived driver: the JIT's first tier only and the serial collector (the JVM's
# start-up and hundreds of small jobs, not throughput). Codegen and adaptive execution
# stay at Spark's defaults, as a cluster runs them.
CONF = {
    "spark.master": "local[2]",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
    "spark.sql.shuffle.partitions": "2",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def _nullable(rows: pa.Table) -> pa.Table:
    """Every column nullable, as `write_delta` makes a Delta table's (Spark's parquet
    writer records a derived NOT NULL as a required column)."""
    return rows.cast(pa.schema([f.with_nullable(True) for f in rows.schema]))


class ParquetTables:
    """Spark's side of the lake as parquet under `mirror`. A lake table is exported to the
    mirror when Spark reads it and the mirror does not hold its current version; a write
    is Spark's parquet write, then the same rows committed to the lake with `metadata`.
    Row deletes are Delta's alone: refused."""

    def __init__(self, mirror: Path) -> None:
        self.mirror = mirror
        self.held: dict[tuple[str, ...], int | None] = {}  # lake version the mirror holds

    def read(self, spark, lake: Lake, where: tuple[str, ...]):
        path = self.mirror.joinpath(*where)
        version = lake.version(*where)
        if self.held.get(where, -1) != version:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            pq.write_table(lake.read(*where), path / "part-0.parquet")
            self.held[where] = version
        return spark.read.parquet(str(path))

    def write(self, frame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]) -> None:
        path = self.mirror.joinpath(*where)
        frame.write.mode("overwrite").parquet(str(path))
        rows = _nullable(pq.read_table(path))
        self.held[where] = lake.write(rows, *where, mode="overwrite", metadata=metadata)

    def append(self, frame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]) -> None:
        path = self.mirror.joinpath(*where)
        before = set(path.glob("*.parquet"))
        frame.write.mode("append").parquet(str(path))
        added = sorted(set(path.glob("*.parquet")) - before)
        rows = pa.concat_tables([pq.read_table(f) for f in added])
        self.held[where] = lake.write(_nullable(rows), *where, mode="append", metadata=metadata)

    def delete(self, spark, lake: Lake, where: tuple[str, ...], condition: str) -> None:
        raise SparkBuildError(f"{'/'.join(where)}: parquet tables have no row deletes (Delta's)")


def _fails(frames):
    """A Python function that fails on the workers (a UDF's error)."""
    for _ in frames:
        raise ValueError("no such attribute")
    yield from ()


def worker_error(spark) -> str:
    """The one line c360ml makes of a Python worker's failure on this session."""
    try:
        with _spark_step("silver/probe"):
            spark.range(1).mapInPandas(_fails, "id long").collect()
    except SparkBuildError as exc:
        return str(exc)
    return "no error"


def run_stages(base: Path, mirror: Path) -> dict:
    """silver, unify and gold built on the process's active session, through
    `ParquetTables`: each stage's summary and seconds."""
    settings, tables, spark = make_settings(base), ParquetTables(mirror), spark_session()
    done: dict = {"session": type(spark).__module__}
    started = time.perf_counter()
    done["silver"] = build_silver(settings, spark, tables).rows()
    done["silver_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    unified = build_unify(settings, spark, tables)
    done["unify"] = {
        "records": unified.records,
        "customers": unified.customers,
        "redirects": unified.redirects,
    }
    done["unify_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    done["gold"] = build_gold(settings, spark, tables).rows()
    done["gold_seconds"] = round(time.perf_counter() - started, 1)
    done["worker_error"] = worker_error(spark)
    return done


def main(base: str, mirror: str) -> None:
    from pyspark.sql import SparkSession

    # The Python workers run this interpreter (c360ml installed), not the first python3
    # on PATH, as a cluster's workers have the c360ml wheel (pyspark reads the variable
    # when the context starts; spark-submit sets it from spark.pyspark.python).
    os.environ["PYSPARK_PYTHON"] = sys.executable
    # A Spark Connect session in the process that started this one (the Sail tests' in
    # pytest) leaves pyspark's Connect mode switched on in the environment it inherits: a
    # Spark job starts without it.
    for name in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "SPARK_LOCAL_REMOTE"):
        os.environ.pop(name, None)
    builder = SparkSession.builder.appName("c360ml on Apache Spark")
    for key, value in CONF.items():
        builder = builder.config(key, value)
    job = builder.getOrCreate()
    try:
        print(json.dumps(run_stages(Path(base), Path(mirror)), default=str))
    finally:
        job.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
