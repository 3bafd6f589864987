"""Sail, the Spark Connect server the Spark engine is tested on, on an az:// lake in Azurite
(#26): what c360ml's Spark engine on a container would stand on.

Sail reaches Azure storage through object_store, as delta-rs and obstore do, configured by
the same environment variables (here the emulator's): it reads a table c360ml wrote,
deletion vectors included, by its az:// URI and by the abfss:// form, and its Delta append
is read back by c360ml's reader and by delta-rs. The Spark engine's build on such a lake
is tests/storage/test_spark_azurite.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from c360ml.storage.lake import Lake

N = 1_000


@pytest.fixture
def sail(emulator_env):
    """A Sail server started in this process's environment (the emulator's variables set)
    and a session to it; both stopped after the test."""
    from pysail.spark import SparkConnectServer
    from pyspark.sql import SparkSession

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    session = SparkSession.builder.remote(f"sc://{host}:{port}").getOrCreate()
    try:
        yield session
    finally:
        session.stop()
        server.stop()


def test_sail_reads_and_appends_a_delta_table_of_an_az_lake(sail, az_root, container):
    lake = Lake(az_root)
    lake.write(pa.table({"k": np.arange(N), "v": ["x"] * N}), "gold", "t")
    files, _ = lake.live_files("gold", "t")
    lake.delete_and_append("gold", "t", deletes={files[0]: np.arange(100)})  # a vector
    assert lake.live_files("gold", "t")[1], "a deletion vector was written"
    uri = lake.uri("gold", "t")
    abfss = f"abfss://{container}@devstoreaccount1.dfs.core.windows.net/c360ml/lake/gold/t"
    for where in (uri, abfss):
        found = sail.read.format("delta").load(where)
        assert sorted(r[0] for r in found.select("k").collect()) == list(range(100, N)), where
        # a bare min is answered from the files' statistics: the vector's file must not
        # claim tight bounds (its minimum, 0, is a deleted row's)
        assert found.agg({"k": "min"}).collect()[0][0] == 100, where

    version = lake.version("gold", "t")
    sail.createDataFrame([(-1, "sail")], "k long, v string").write.format("delta").mode(
        "append"
    ).save(uri)
    assert lake.version("gold", "t") == version + 1
    keys = sorted(lake.read("gold", "t")["k"].to_pylist())
    assert keys == [-1, *range(100, N)]
