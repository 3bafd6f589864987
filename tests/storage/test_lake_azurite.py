"""The lake on Azure storage, on a real Azurite: Delta tables through delta-rs, c360ml's own
commits (deletion vectors, purge, history cut) through put-if-absent, JSON state, and the
objects' primitives."""

from __future__ import annotations

import threading

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, QueryBuilder, TableFeatures

from c360ml.storage.lake import (
    CommitConflictError,
    Lake,
    _commit_actions,
    _live_adds,
    _replace_file,
)
from c360ml.storage.objects import open_store

N = 5_000


def _keys(lake: Lake) -> list[int]:
    return sorted(lake.read("gold", "t")["k"].to_pylist())


def _keys_by_delta_rs(lake: Lake) -> list[int]:
    """delta-rs' own DataFusion reader (an independent decoder of the deletion vectors)."""
    table = lake.delta("gold", "t")
    found = QueryBuilder().register("t", table).execute("SELECT k FROM t").read_all()
    return sorted(pa.table(found)["k"].to_pylist())


@pytest.fixture
def lake(az_root) -> Lake:
    lake = Lake(az_root)
    lake.write(pa.table({"k": np.arange(N), "v": np.arange(N).astype(str)}), "gold", "t")
    return lake


def test_a_delta_table_round_trips_on_azurite(lake, az_root, container):
    assert lake.remote and lake.root == az_root
    assert lake.uri("gold", "t") == f"{az_root}/gold/t"
    v = lake.write(pa.table({"k": [N], "v": ["x"]}), "gold", "t", metadata={"batch": "b1"})
    assert v == 1 and lake.version("gold", "t") == 1
    assert _keys(lake) == list(range(N + 1))
    assert lake.count("gold", "t") == N + 1
    assert lake.commit_metadata("gold", "t")[-1]["batch"] == "b1"
    assert lake.schema("gold", "t").names == ["k", "v"]
    lake.write(pa.table({"k": [1]}), "silver", "d365", "CustTable")
    lake.write(pa.table({"k": [1], "p": ["a"]}), "silver", "d365", "SalesTable", partition_by=["p"])
    assert lake.tables("gold") == [("t",)] and lake.tables("silver", "nothing") == []
    assert lake.tables("silver") == [("d365", "CustTable"), ("d365", "SalesTable")]
    assert lake.exists("gold", "t") and not lake.exists("gold", "missing")
    # the blobs are where a reader of the container looks for them
    delta_rs = DeltaTable(f"az://{container}/c360ml/lake/gold/t")
    assert delta_rs.version() == 1
    with pytest.raises(FileNotFoundError, match=rf"no Delta table at {az_root}/gold/missing"):
        lake.delta("gold", "missing")
    with pytest.raises(NotImplementedError, match=rf"{az_root}/gold/t: a lake on object"):
        lake.path("gold", "t")


def test_json_state_and_files(lake, az_root):
    assert lake.read_json("state", "job.json") is None
    lake.write_json({"step": 1, "ids": ["a"]}, "state", "job.json")
    lake.write_json({"step": 2, "ids": ["a"]}, "state", "job.json")
    assert lake.read_json("state", "job.json") == {"step": 2, "ids": ["a"]}
    assert lake.list_files("state") == ["state/job.json"]
    lake.delete_file("state", "job.json")
    lake.delete_file("state", "job.json")  # gone already: no error
    assert lake.read_json("state", "job.json") is None and lake.list_files("state") == []


def test_deletion_vector_commits_purge_and_history_cut_on_azurite(lake):
    files, _ = lake.live_files("gold", "t")
    dense = np.arange(0, 600)  # 12% of the file: a deletion vector, not a rewrite
    lake.delete_and_append(
        "gold", "t", deletes={files[0]: dense}, rows=pa.table({"k": [-1], "v": ["new"]})
    )
    expected = sorted({*range(600, N), -1})
    assert _keys(lake) == expected == _keys_by_delta_rs(lake)
    assert sorted(lake.dataset("gold", "t").to_table()["k"].to_pylist()) == expected
    assert lake.count("gold", "t") == len(expected)
    _, deleted = lake.live_files("gold", "t")
    assert [len(v) for v in deleted.values()] == [600]
    # DuckDB scans the lake's Arrow dataset (files on Azurite, the masked one read masked)
    con = duckdb.connect()
    con.register("t", lake.dataset("gold", "t"))
    assert con.sql("SELECT count(*), min(k) FROM t").fetchall() == [(len(expected), -1)]
    low = lake.read("gold", "t", columns=["k"], filter=pc.field("k") < 1000)
    assert low.column_names == ["k"] and sorted(low["k"].to_pylist()) == [-1, *range(600, 1000)]
    batches = lake.batches("gold", "t", columns=["k"])
    assert sorted(k for b in batches for k in b["k"].to_pylist()) == expected
    # an erasure's purge rewrites the file without its hidden rows
    assert lake.purge_deleted("gold", "t", holding=("k", [5])) == 1
    assert lake.live_files("gold", "t")[1] == {}
    assert _keys(lake) == expected == _keys_by_delta_rs(lake)
    assert lake.vacuum(retention_hours=0) >= 1  # the files the purge replaced
    assert _keys(lake) == expected
    assert lake.forget_history("gold", "t") > 0
    first = [k for k in lake.list_files("gold", "t", "_delta_log") if k.endswith(".json")]
    assert len(first) == 1  # only the commit after the cut is left
    assert _keys(lake) == expected
    # the next commit replays the log from the checkpoint the cut wrote
    files, _ = lake.live_files("gold", "t")
    lake.delete_and_append("gold", "t", deletes={files[0]: np.array([0])})
    after = _keys(lake)
    assert len(after) == len(expected) - 1 and set(after) < set(expected)
    assert after == _keys_by_delta_rs(lake)


def test_a_commit_that_loses_the_race_fails_naming_table_and_version(lake, az_root):
    """Two writers build deletion-vector commits on the same version: the first published
    wins; the second is refused (never retried: it would undo the winner's deletes), and
    the table holds exactly the winner's change."""
    where = lake._where("gold", "t")
    lake.delta("gold", "t").alter.add_feature(
        TableFeatures.DeletionVectors, allow_protocol_versions_increase=True
    )
    table = lake.delta("gold", "t")
    version, (uri,) = table.version(), table.file_uris()
    add = _live_adds(where, version)[where.relative(uri)]
    schema = lake.schema("gold", "t")
    first = _replace_file(where, uri, add, np.arange(0, 10), schema, 1)
    second = _replace_file(where, uri, add, np.arange(10, 20), schema, 1)
    _commit_actions(where, version, "FIRST", first)
    with pytest.raises(CommitConflictError) as caught:
        _commit_actions(where, version, "SECOND", second)
    assert str(caught.value).startswith(
        f"{az_root}/gold/t: version {version + 1} was committed by another writer"
    )
    assert lake.delta("gold", "t").history(1)[0]["operation"] == "FIRST"
    assert _keys(lake) == list(range(10, N)) == _keys_by_delta_rs(lake)


def test_concurrent_writers_never_lose_a_change(lake):
    """Writers racing through delete_and_append: each either commits or is refused with
    CommitConflictError; the table holds exactly the changes of those that committed."""
    barrier = threading.Barrier(3)
    outcome: dict[int, str] = {}

    def writer(i: int) -> None:
        files, _ = Lake(lake.root).live_files("gold", "t")
        barrier.wait()
        try:
            Lake(lake.root).delete_and_append(
                "gold", "t", deletes={files[0]: np.array([i])}, rows=None
            )
            outcome[i] = "committed"
        except CommitConflictError as exc:
            assert "was committed by another writer" in str(exc)
            outcome[i] = "refused"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committed = {i for i, o in outcome.items() if o == "committed"}
    assert len(outcome) == 3 and committed
    assert _keys(lake) == [k for k in range(N) if k not in committed] == _keys_by_delta_rs(lake)


@pytest.fixture(params=["local", "azurite"])
def any_root(request, tmp_path) -> str:
    """A lake root on local disk and on Azurite: the store's primitives behave alike."""
    return (
        str(tmp_path / "lake") if request.param == "local" else request.getfixturevalue("az_root")
    )


def test_store_primitives(any_root):
    store, az_root = open_store(any_root), any_root
    store.create("landing/x/a.json", b"1")
    with pytest.raises(FileExistsError, match=rf"{az_root}/landing/x/a.json exists already"):
        store.create("landing/x/a.json", b"2")
    assert store.read_bytes("landing/x/a.json") == b"1"
    big = np.random.default_rng(0).bytes(20 * 2**20)  # streamed in chunks, never whole
    store.write_bytes("landing/x/big.csv", big)
    chunks = list(store.iter_bytes("landing/x/big.csv", chunk=8 * 2**20))
    assert len(chunks) >= 3 and b"".join(chunks) == big
    with store.open_input("landing/x/big.csv") as f:
        f.seek(len(big) - 4)
        assert f.read(4) == big[-4:]
    assert store.list("landing") == ["landing/x/a.json", "landing/x/big.csv"]
    store.delete("landing/x/a.json")
    assert not store.exists("landing/x/a.json")
    with pytest.raises(FileNotFoundError, match=rf"{az_root}/landing/x/a.json"):
        store.read_bytes("landing/x/a.json")
    assert store.folders("landing") == ["landing/x"] and store.folders("nothing") == []
