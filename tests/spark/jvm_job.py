"""A c360ml gold build as a Spark job on Apache Spark itself: local mode, a JVM on the
machine's Java 17, the classic SparkSession active, as in a Synapse notebook (which has
no Spark Connect endpoint). c360ml takes that session (`spark_session()`, no URL) and
runs the same client code, SQL and checks it runs on Sail.

Delta's jars cannot be fetched here, so the lake's tables are handed to Spark as parquet
(`ParquetTables`, through `c360ml.spark.gold.SparkTables`) and the job's outputs are
written as parquet under MIRROR. It runs in a process of its own: a Spark Connect session
(the Sail tests') switches pyspark to Connect mode for the whole process.

    python -m tests.spark.jvm_job BASE MIRROR    # BASE holds the lake (make_settings)

prints the summary rows as JSON on its last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from c360ml.spark import spark_session
from c360ml.spark.gold import build_gold
from c360ml.storage.lake import Lake
from tests.conftest import make_settings

# Small data on two cores: Spark's 200 default shuffle partitions would be 200 tasks each.
CONF = {
    "spark.master": "local[2]",
    "spark.ui.enabled": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.sql.shuffle.partitions": "4",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


class ParquetTables:
    """A lake table is written to MIRROR as parquet when Spark first reads it (as it is
    in the lake now); the job's outputs go to MIRROR too, where they are read back."""

    def __init__(self, mirror: Path) -> None:
        self.mirror = mirror

    def read(self, spark, lake: Lake, where: tuple[str, ...]):
        path = self.mirror.joinpath(*where)
        if not path.exists():
            path.mkdir(parents=True)
            pq.write_table(lake.read(*where), path / "part-0.parquet")
        return spark.read.parquet(str(path))

    def write(self, frame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]) -> None:
        frame.write.mode("overwrite").parquet(str(self.mirror.joinpath(*where)))


def main(base: str, mirror: str) -> None:
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("c360ml gold on Apache Spark")
    for key, value in CONF.items():
        builder = builder.config(key, value)
    job = builder.getOrCreate()
    try:
        summary = build_gold(
            make_settings(Path(base)), spark_session(), ParquetTables(Path(mirror))
        )
        print(json.dumps({"session": type(spark_session()).__module__, "rows": summary.rows()}))
    finally:
        job.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
