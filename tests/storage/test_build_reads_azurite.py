"""What the build stages read and remove through the lake, alike on local disk and on a
real Azurite (az:// and abfss:// roots): DuckDB's view of a table with deletion vectors
(its Parquet read through the lake's scheme on object storage), the files a table gained
since a version, and a state folder removed whole."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from c360ml.medallion.sql import duckdb_connection, register, rows_by_file
from c360ml.storage.lake import Lake
from tests.storage.azurite import ACCOUNT

N = 2_000


@pytest.fixture(params=["local", "az", "abfss"])
def lake(request, tmp_path) -> Lake:
    """A lake on local disk, or on Azurite named by an az:// or an abfss:// root (the
    emulator setting points either at Azurite)."""
    if request.param == "local":
        root = tmp_path / "lake"
    elif request.param == "az":
        root = request.getfixturevalue("az_root")
    else:
        container = request.getfixturevalue("container")
        root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/c360ml/lake"
    lake = Lake(root)
    lake.write(pa.table({"k": np.arange(N), "v": np.arange(N).astype(str)}), "gold", "t")
    return lake


def test_duckdb_reads_a_table_with_deletion_vectors_as_the_lake_does(lake):
    files, _ = lake.live_files("gold", "t")
    lake.delete_and_append(
        "gold", "t", deletes={files[0]: np.arange(0, N, 10)}, rows=pa.table({"k": [N], "v": ["x"]})
    )
    assert lake.live_files("gold", "t")[1]  # a deletion vector (a tenth: not a rewrite)
    con = duckdb_connection()
    register(con, lake, "t", "gold", "t")
    seen = sorted(k for (k,) in con.sql("SELECT k FROM t").fetchall())
    assert seen == sorted(lake.read("gold", "t")["k"].to_pylist())
    assert len(seen) == N - len(range(0, N, 10)) + 1 and 0 not in seen and N in seen
    # with positions: rows named by the files as the lake names them, so that a later
    # delete_and_append finds them
    register(con, lake, "p", "gold", "t", positions=True)
    found = rows_by_file(
        con.sql("SELECT filename, file_row_number FROM p WHERE k = 1").to_arrow_table()
    )
    assert set(found) <= set(lake.live_files("gold", "t")[0]) and len(found) == 1
    lake.delete_and_append("gold", "t", deletes=found)
    assert 1 not in lake.read("gold", "t")["k"].to_pylist()
    con.close()


def test_the_files_a_table_gained_since_a_version(lake):
    before = lake.files_at("gold", "t", version=0)
    lake.write(pa.table({"k": [N, N + 1], "v": ["a", "b"]}), "gold", "t")
    table = lake.delta("gold", "t")
    new = [f for f in table.file_uris() if f not in before]
    schema = table.to_pyarrow_dataset().schema
    rows = lake.files_dataset("gold", "t", files=new, schema=schema).to_table()
    assert sorted(rows["k"].to_pylist()) == [N, N + 1]


def test_a_state_folder_is_removed_whole(lake):
    lake.write(pa.table({"k": [1]}), "state", "unify", "records")
    lake.write(pa.table({"k": [2]}), "state", "unify", "old_rule")
    lake.delete_folder("state", "unify", "old_rule")
    assert lake.tables("state", "unify") == [("unify", "records")]
    assert not lake.exists("state", "unify", "old_rule")
    assert lake.read("state", "unify", "records")["k"].to_pylist() == [1]
    lake.delete_folder("state", "unify", "old_rule")  # gone already: no error


def test_threads_reading_one_file_each_keep_their_own_position(az_root):
    """DuckDB's threads share a file's handle, each reading as a seek then a read: a
    seek of one thread between another's seek and read must not move the other."""
    lake = Lake(az_root)
    data = bytes(range(256)) * 64
    lake.store.write_bytes("gold/blob", data)
    file = lake.store.fsspec().open(lake.uri("gold", "blob"), "rb")
    sought, read = threading.Barrier(2), threading.Barrier(2)
    got = {}

    def reader(start: int) -> None:
        file.seek(start)
        sought.wait()  # both have sought before either reads
        got[start] = file.read(100)
        read.wait()
        got[-start] = file.read(10)  # on from where this thread's read ended

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1000, 5000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[1000] == data[1000:1100] and got[5000] == data[5000:5100]
    assert got[-1000] == data[1100:1110] and got[-5000] == data[5100:5110]
    assert file.size == len(data)
    file.seek(-6, 2)
    assert file.read() == data[-6:] and file.read(5) == b""
    file.close()
