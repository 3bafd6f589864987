"""Deletion vectors written by Lake.delete_and_append: every reader sees the same rows,
delta-rs' own reader (an independent decoder of the format) included."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from deltalake import QueryBuilder

from c360ml.medallion.sql import duckdb_connection, register, rows_by_file
from c360ml.storage.lake import REWRITE_SHARE, SMALL_FILES_MAX, Lake, _commit_json

N = 200_000


def _keys_by_delta_rs(lake: Lake) -> set[int]:
    table = lake.delta("gold", "t")
    result = QueryBuilder().register("t", table).execute("SELECT k FROM t").read_all()
    return set(pa.table(result)["k"].to_pylist())


def _keys_by_every_reader(lake: Lake) -> list[set[int]]:
    con = duckdb_connection()
    register(con, lake, "t", "gold", "t")
    everything = ds.field("k").is_valid()  # a filter: masked files are read whole, then filtered
    return [
        set(lake.read("gold", "t")["k"].to_pylist()),
        set(lake.read("gold", "t", columns=["k"], filter=everything)["k"].to_pylist()),
        {k for b in lake.batches("gold", "t", columns=["k"]) for k in b["k"].to_pylist()},
        set(lake.dataset("gold", "t").to_table()["k"].to_pylist()),
        set(con.sql("SELECT k FROM t").to_arrow_table()["k"].to_pylist()),
        _keys_by_delta_rs(lake),
    ]


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path)
    lake.write(pa.table({"k": np.arange(N), "v": np.arange(N).astype(str)}), "gold", "t")
    lake.write(pa.table({"k": np.arange(N, N + 10), "v": ["x"] * 10}), "gold", "t")
    return lake


def _files(lake: Lake) -> list[str]:
    """Live files, the big one first."""
    files = lake.delta("gold", "t").file_uris()
    return sorted(files, key=lambda f: -pq.read_metadata(f).num_rows)


def test_deleted_rows_are_gone_for_every_reader_and_files_are_kept(lake):
    big, small = _files(lake)
    # dense (bitmap containers) and sparse (array containers) positions, several chunks
    dense = np.random.default_rng(0).choice(N, 30_000, replace=False)  # 15% of the file
    lake.delete_and_append(
        "gold",
        "t",
        deletes={big: dense, small: np.array([0, 9])},
        rows=pa.table({"k": [10**9], "v": ["new"]}),
        metadata={"c360ml.note": "patched"},
    )
    expected = (set(range(N)) - set(dense.tolist())) | set(range(N + 1, N + 9)) | {10**9}
    assert all(keys == expected for keys in _keys_by_every_reader(lake))
    assert lake.count("gold", "t") == len(expected)
    assert {big, small} <= set(lake.delta("gold", "t").file_uris())  # nothing rewritten
    assert lake.commit_metadata("gold", "t")[-1]["c360ml.note"] == "patched"

    # more deletions in a file that has a vector (its descriptor read back from a
    # checkpoint): the union; then a delta-rs merge on top
    lake.delta("gold", "t").create_checkpoint()
    lake.delete_and_append("gold", "t", deletes={big: np.array([1, 2, 3])})
    expected -= {1, 2, 3}
    assert all(keys == expected for keys in _keys_by_every_reader(lake))
    assert big in lake.live_files("gold", "t")[1]
    # beyond REWRITE_SHARE of its rows deleted, the file is rewritten without them
    more = np.setdiff1d(np.arange(N), dense)[: int(REWRITE_SHARE * N)]
    lake.delete_and_append("gold", "t", deletes={big: more})
    expected -= set(more.tolist())
    assert big not in lake.delta("gold", "t").file_uris()
    assert all(keys == expected for keys in _keys_by_every_reader(lake))
    source = pa.table({"k": [4, 5, 1], "v": ["u", "u", "back"]})
    lake.delta("gold", "t").merge(
        source, "s.k = t.k", source_alias="s", target_alias="t"
    ).when_matched_update_all().when_not_matched_insert_all().execute()
    assert all(keys == expected | {1, 4, 5} for keys in _keys_by_every_reader(lake))


def test_purge_rewrites_the_hidden_rows_out_of_the_files(lake):
    big, small = _files(lake)
    every_tenth = np.arange(0, N, 10)  # under REWRITE_SHARE: a vector, not a rewrite
    lake.delete_and_append("gold", "t", deletes={big: every_tenth, small: np.array([3])})
    # only the files whose hidden rows hold one of the values (key N + 3 is in `small`)
    assert lake.purge_deleted("gold", "t", holding=("k", [N + 3, 5])) == 1
    assert set(lake.live_files("gold", "t")[1]) == {big}
    assert lake.purge_deleted("gold", "t") == 1
    lake.delta("gold", "t").vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    on_disk = set()
    for path in lake.path("gold", "t").glob("*.parquet"):
        on_disk |= set(pq.read_table(path, columns=["k"])["k"].to_pylist())
    assert on_disk == set(range(N + 10)) - set(every_tenth.tolist()) - {N + 3}
    assert lake.live_files("gold", "t")[1] == {}
    assert all(keys == on_disk for keys in _keys_by_every_reader(lake))


def test_a_commit_never_overwrites_another_writers_version(lake):
    """Two writers that read the same version: the second one's commit fails, and the
    first one's stays as it was."""
    root = lake.path("gold", "t")
    version = lake.version("gold", "t") + 1
    _commit_json(root, version, [{"commitInfo": {"operation": "FIRST"}}])
    with pytest.raises(RuntimeError, match=r"gold/t: version \d+ was committed by another"):
        _commit_json(root, version, [{"commitInfo": {"operation": "SECOND"}}])
    assert lake.delta("gold", "t").history(1)[0]["operation"] == "FIRST"
    assert not list((root / "_delta_log").glob("*.tmp"))


def test_the_small_files_merges_append_are_folded_together(lake):
    """Every merge appends a file: past SMALL_FILES_MAX small ones, a merge folds the
    untouched ones (their hidden rows dropped) into the file it writes."""
    expected = set(range(N + 10))
    for i in range(2 * SMALL_FILES_MAX):  # replace key i by key -i - 1, as a merge would
        con = duckdb_connection()
        register(con, lake, "p", "gold", "t", positions=True)
        where = rows_by_file(
            con.sql(f"SELECT filename, file_row_number FROM p WHERE k = {i}").to_arrow_table()
        )
        lake.delete_and_append(
            "gold", "t", deletes=where, rows=pa.table({"k": [-i - 1], "v": ["a"]})
        )
        expected = (expected - {i}) | {-i - 1}
        assert len(lake.delta("gold", "t").file_uris()) <= SMALL_FILES_MAX + 1
    assert all(keys == expected for keys in _keys_by_every_reader(lake))


def test_a_table_written_again_at_a_path_is_not_read_with_the_old_vectors(lake):
    """Vectors are cached per table version: a table removed and built again reaches the
    same version numbers with other files."""
    import shutil

    big, _ = _files(lake)
    lake.delete_and_append("gold", "t", deletes={big: np.array([0, 1])})
    assert _keys_by_every_reader(lake)[0] == set(range(2, N + 10))
    shutil.rmtree(lake.path("gold", "t"))
    lake.write(pa.table({"k": np.arange(5), "v": ["y"] * 5}), "gold", "t")
    lake.write(pa.table({"k": np.arange(5, 8), "v": ["z"] * 3}), "gold", "t")
    small = min(lake.delta("gold", "t").file_uris(), key=lambda f: pq.read_metadata(f).num_rows)
    lake.delete_and_append("gold", "t", deletes={small: np.array([2])})
    assert all(keys == {0, 1, 2, 3, 4, 5, 6} for keys in _keys_by_every_reader(lake))


def test_a_table_is_read_at_its_latest_version_whoever_committed_it(lake):
    """`Lake.delta` keeps each table loaded and brings it up to date: commits from
    another writer are seen, and a table removed and written again (fewer versions, new
    files) is loaded anew, not updated from the old one."""
    import shutil

    from deltalake import write_deltalake

    where = lake.path("gold", "t")
    before = lake.delta("gold", "t").version()
    write_deltalake(str(where), pa.table({"k": [-1], "v": ["w"]}), mode="append")
    assert lake.delta("gold", "t").version() == before + 1
    assert -1 in lake.read("gold", "t", columns=["k"])["k"].to_pylist()
    assert len(lake.read("gold", "t", version=before)) == N + 10
    assert lake.delta("gold", "t").version() == before + 1  # reading a version left it
    shutil.rmtree(where)
    lake.write(pa.table({"k": [7], "v": ["y"]}), "gold", "t")
    assert lake.delta("gold", "t").version() == 0
    assert all(keys == {7} for keys in _keys_by_every_reader(lake))


def test_a_lake_reached_through_a_symbolic_link_is_patched(tmp_path):
    """delta-rs names files by their real path; the lake's own paths must match them."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    lake = Lake(tmp_path / "link")
    lake.write(pa.table({"k": np.arange(10), "v": ["x"] * 10}), "gold", "t")
    (uri,) = lake.delta("gold", "t").file_uris()
    lake.delete_and_append(
        "gold", "t", deletes={uri: np.array([0])}, rows=pa.table({"k": [10], "v": ["y"]})
    )
    assert sorted(lake.read("gold", "t")["k"].to_pylist()) == list(range(1, 11))


def test_a_forgotten_history_names_nobody_and_keeps_what_stages_read_back(tmp_path):
    """After `forget_history` (an erasure's last step) no log file holds a value the older
    commits held, the current version reads as before, an older one is gone (files_at
    says so instead of raising), and the custom metadata ingest, silver and gold read
    back from every commit is still there, in order."""
    lake = Lake(tmp_path)
    lake.write(
        pa.table({"k": ["alice@x.example", "bob@y.example"]}), "gold", "t", metadata={"m": "1"}
    )
    lake.write(
        pa.table({"k": ["bob@y.example"]}), "gold", "t", mode="overwrite", metadata={"m": "2"}
    )
    log_dir = lake.path("gold", "t", "_delta_log")
    assert any(b"alice@x.example" in p.read_bytes() for p in log_dir.glob("*.json"))  # stats

    lake.forget_history("gold", "t")

    assert not any(b"alice@x.example" in p.read_bytes() for p in log_dir.iterdir() if p.is_file())
    assert lake.read("gold", "t")["k"].to_pylist() == ["bob@y.example"]
    assert lake.files_at("gold", "t", version=0) is None
    assert lake.files_at("gold", "t", version=2) == set(lake.delta("gold", "t").file_uris())
    assert [m.get("m") for m in lake.commit_metadata("gold", "t")][:2] == ["1", "2"]
    lake.write(pa.table({"k": ["carol@z.example"]}), "gold", "t", metadata={"m": "3"})
    lake.forget_history("gold", "t")  # twice: the metadata carried is carried again
    assert [m["m"] for m in lake.commit_metadata("gold", "t") if "m" in m] == ["1", "2", "3"]
    assert sorted(lake.read("gold", "t")["k"].to_pylist()) == ["bob@y.example", "carol@z.example"]


def test_a_spark_writers_user_metadata_is_read_back_as_custom_metadata(tmp_path):
    """Spark's writers record one string, `userMetadata`, in the commit info: a JSON
    object of strings there (what c360ml's Spark engine writes) reads back as custom
    metadata keys, as delta-rs' own keys do; any other string adds no key. (delta-rs
    writes the same commit info field here: the shape Sail's and Delta's JVM writer give.)"""
    lake = Lake(tmp_path)
    recorded = {"c360ml.inputs": '{"silver/x": 3}', "c360ml.sql": "abc"}
    lake.write(pa.table({"k": [1]}), "gold", "t", metadata={"userMetadata": json.dumps(recorded)})
    lake.write(pa.table({"k": [2]}), "gold", "t", metadata={"userMetadata": "a note"})
    lake.write(pa.table({"k": [3]}), "gold", "t", metadata={"userMetadata": '{"n": 1}'})
    first, second, third = lake.commit_metadata("gold", "t")
    assert {k: first[k] for k in recorded} == recorded
    assert second["userMetadata"] == "a note" and not set(recorded) & set(second)
    assert "n" not in third  # not a string: not custom metadata
