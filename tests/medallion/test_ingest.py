"""Ingest landing -> bronze: types from model.json, lineage, incremental, quarantine."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from c360ml.medallion.checks import OLD_REASON
from c360ml.medallion.ingest import IngestError, ingest_landing
from c360ml.schemas import QUARANTINE_REASON
from c360ml.sources import synapse
from c360ml.sources.tables import source_table
from c360ml.storage.lake import Lake
from tests.conftest import write_sync_folder

SYNC = "2024-01-05T00.00.00Z"
CUST_FILE = f"d365/{SYNC}/custtable/2024.csv"


def _cust(recid: int, version: int, account: str, group: str = "10", delete: bool = False):
    return {
        "Id": f"g{recid}",
        "SinkCreatedOn": "2024-01-01T00:00:00Z",
        "SinkModifiedOn": f"2024-01-0{version}T00:00:00.1234567Z",
        "versionnumber": version,
        "IsDelete": "True" if delete else "",
        "recid": recid,
        "createddatetime": "2024-01-01T00:00:00Z",
        "dataareaid": "usrt",
        "accountnum": account,
        "party": 1000 + recid,
        "custgroup": group,
        "currency": "USD",
        "blocked": 0,
    }


def _party(recid: int):
    return {
        "Id": f"p{recid}",
        "SinkModifiedOn": "2024-01-01T00:00:00Z",
        "versionnumber": 1,
        "recid": recid,
        "partynumber": f"P{recid}",
        "name": f"Party {recid}",
        "instancerelationtype": 13271,
    }


def _line(row: dict, source: str = "d365", table: str = "custtable") -> bytes:
    """A row as the CSV line write_sync_folder writes for it (without the line end)."""
    out = io.StringIO()
    names = source_table(source, table).names
    csv.writer(out).writerow(["" if row.get(c) is None else row[c] for c in names])
    return out.getvalue().rstrip("\r\n").encode()


def _add_partition(folder: Path, table: str, name: str, data: bytes) -> None:
    """Another partition file of a table in a sync folder, listed in its model.json."""
    (folder / table / f"{name}.csv").write_bytes(data)
    doc = json.loads((folder / "model.json").read_text())
    entity = next(e for e in doc["entities"] if e["name"] == table)
    entity["partitions"].append({"name": name, "location": f"{table}/{name}.csv"})
    (folder / "model.json").write_text(json.dumps(doc))


def _non_empty_lines(*paths: Path) -> int:
    return sum(1 for p in paths for line in p.read_bytes().splitlines() if line)


@pytest.fixture
def landing(settings):
    return Lake(settings.lake).path("landing")


def test_types_lineage_and_change_rows_preserved(settings, landing):
    rows = [_cust(1, 1, "C1"), _cust(1, 2, "C1", group="20"), _cust(2, 1, "C2", delete=True)]
    write_sync_folder(landing, "d365", "2024-01-05T00.00.00Z", {"custtable": rows})
    summary = ingest_landing(settings)
    bronze = Lake(settings.lake).read("bronze", "d365", "custtable")
    assert summary.total_rows == 3 == len(bronze)  # every change row kept, none resolved
    assert bronze.schema.field("recid").type == pa.int64()
    assert bronze.schema.field("SinkModifiedOn").type == pa.timestamp("us", tz="UTC")
    assert bronze.schema.field("IsDelete").type == pa.bool_()
    assert bronze["IsDelete"].to_pylist() == [None, None, True]
    assert bronze["SinkModifiedOn"][0].as_py().microsecond == 123456
    assert set(bronze["_source_file"].to_pylist()) == {
        "d365/2024-01-05T00.00.00Z/custtable/2024.csv"
    }
    assert set(bronze["_batch_id"].to_pylist()) == {"d365/2024-01-05T00.00.00Z"}


def test_bronze_keeps_text_as_exported_and_silver_trims_it(settings, landing):
    """Bronze is a copy: padded and whitespace-only text stays as written (ingest casts
    only typed columns); silver trims it and makes the blank value null."""
    from c360ml.medallion.silver import build_silver

    rows = [_cust(1, 1, " C1 ", group="  "), _cust(2, 1, "C2", group="\t20")]
    write_sync_folder(landing, "d365", "2024-01-05T00.00.00Z", {"custtable": rows})
    ingest_landing(settings)
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "d365", "custtable").sort_by("recid")
    assert bronze["accountnum"].to_pylist() == [" C1 ", "C2"]
    assert bronze["custgroup"].to_pylist() == ["  ", "\t20"]
    build_silver(settings)
    silver = lake.read("silver", "custtable").sort_by("recid")
    assert silver["accountnum"].to_pylist() == ["C1", "C2"]
    assert silver["custgroup"].to_pylist() == [None, "20"]


def test_incremental_twice_is_nothing_and_new_folder_only(settings, landing):
    write_sync_folder(landing, "d365", "2024-01-05T00.00.00Z", {"custtable": [_cust(1, 1, "C1")]})
    assert ingest_landing(settings).total_rows == 1
    assert ingest_landing(settings).total_rows == 0
    version = Lake(settings.lake).version("bronze", "d365", "custtable")
    write_sync_folder(landing, "d365", "2024-01-06T00.00.00Z", {"custtable": [_cust(1, 2, "C1")]})
    second = ingest_landing(settings)
    assert second.total_rows == 1
    bronze = Lake(settings.lake).read("bronze", "d365", "custtable")
    assert sorted(bronze["versionnumber"].to_pylist()) == [1, 2]
    assert Lake(settings.lake).version("bronze", "d365", "custtable") == version + 1


def test_bad_rows_quarantined_with_file_line_and_reason(settings, landing):
    good = _cust(1, 1, "C1")
    bad_date = dict(_cust(2, 1, "C2"), createddatetime="31/02/2024")
    bad_num = dict(_cust(3, 1, "C3"), recid="x3")
    write_sync_folder(
        landing,
        "d365",
        "2024-01-05T00.00.00Z",
        {"custtable": [good, "a,b,c", bad_date, bad_num, _cust(4, 1, "C4")]},
    )
    summary = ingest_landing(settings)
    assert summary.items[0].rows == 2 and summary.items[0].quarantined == 3
    q = Lake(settings.lake).read("quarantine", "bronze", "d365", "custtable").to_pylist()
    by_line = {r["_line"]: r[QUARANTINE_REASON] for r in q}
    assert by_line[2].startswith("wrong column count: expected 15, got 3")
    assert by_line[3] == "column createddatetime: not a valid dateTime"
    assert by_line[4] == "column recid: not a valid int64"
    assert all(r["_source_file"].endswith("custtable/2024.csv") for r in q)
    assert "31/02/2024" in next(r["_raw"] for r in q if r["_line"] == 3)


def test_quarantine_written_before_the_reason_was_renamed_takes_new_rows(settings, landing):
    """A lake from before #23 has `_reason` in its quarantine tables; an append must keep
    a table's schema, so the next ingest renames the column (same rows) and appends."""
    lake = Lake(settings.lake)
    write_sync_folder(landing, "d365", SYNC, {"custtable": [_cust(1, 1, "C1"), "a,b,c"]})
    ingest_landing(settings)
    where = ("quarantine", "bronze", "d365", "custtable")
    old = lake.read(*where)
    old = old.rename_columns(
        [OLD_REASON if n == QUARANTINE_REASON else n for n in old.column_names]
    )
    lake.write(old, *where, mode="overwrite")
    bad = dict(_cust(2, 1, "C2"), recid="x2")
    write_sync_folder(landing, "d365", "2024-01-06T00.00.00Z", {"custtable": [bad]})
    summary = ingest_landing(settings)
    assert next(t for t in summary.items if t.table == "custtable").quarantined == 1
    q = lake.read(*where)
    assert OLD_REASON not in q.column_names
    assert sorted(q[QUARANTINE_REASON].to_pylist()) == [
        "column recid: not a valid int64",
        "wrong column count: expected 15, got 3",
    ]


@pytest.mark.parametrize("tail", [[], [None]], ids=["only-bad-lines", "bad-lines-last"])
def test_lines_of_the_wrong_width_after_the_last_good_one_are_quarantined(settings, landing, tail):
    """Arrow reports a line of the wrong field count while it parses a block; a block of
    nothing but such lines yields no batch, and its lines must still reach quarantine."""
    good = [_cust(1, 1, "C1")] if tail else []
    rows = [*good, "a,b,c", '"C9",not-a-date,extra']
    write_sync_folder(landing, "d365", "2024-01-05T00.00.00Z", {"custtable": rows})
    summary = ingest_landing(settings)
    table = next(t for t in summary.items if t.table == "custtable")
    assert (table.rows, table.quarantined) == (len(good), 2)
    q = Lake(settings.lake).read_pandas("quarantine", "bronze", "d365", "custtable")
    assert sorted(q._line) == [len(good) + 1, len(good) + 2]
    assert set(q._raw) == {"a,b,c", '"C9",not-a-date,extra'}
    assert q.quarantine_reason.str.startswith("wrong column count").all()


def test_crash_between_commits_is_completed_without_duplicates(settings, landing):
    write_sync_folder(
        landing, "d365", "2024-01-05T00.00.00Z", {"custtable": [_cust(1, 1, "C1"), "broken"]}
    )
    ingest_landing(settings)
    lake = Lake(settings.lake)
    # Simulate the crash: the quarantine commit never happened.
    import shutil

    shutil.rmtree(lake.path("quarantine", "bronze", "d365", "custtable"))
    assert ingest_landing(settings).total_rows == 0
    assert len(lake.read("bronze", "d365", "custtable")) == 1
    assert len(lake.read("quarantine", "bronze", "d365", "custtable")) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "missing model.json"),
        ("{not json", "malformed JSON at line 1"),
        (
            json.dumps(
                {
                    "entities": [
                        {
                            "name": "custtable",
                            "attributes": [{"name": "recid", "dataType": "money"}],
                        }
                    ]
                }
            ),
            "unsupported dataType 'money'",
        ),
        (
            json.dumps(
                {
                    "entities": [
                        {
                            "name": "custtable",
                            "attributes": [{"name": "recid", "dataType": "int64"}],
                        }
                    ]
                }
            ),
            "entity 'custtable' has no data files",
        ),
    ],
)
def test_bad_model_json_names_the_file(settings, landing, content, message):
    folder = landing / "d365" / "2024-01-05T00.00.00Z"
    folder.mkdir(parents=True)
    if content is not None:
        (folder / "model.json").write_text(content)
    else:  # the newest folder without one is still being written: an older one is broken
        write_sync_folder(
            landing, "d365", "2024-01-06T00.00.00Z", {"custtable": [_cust(1, 1, "C1")]}
        )
    with pytest.raises(ValueError, match=message) as err:
        ingest_landing(settings)
    assert str(folder) in str(err.value)


def test_generic_csv_mapping(settings, landing):
    settings = settings.model_copy(update={"sources": ("generic",)})
    (landing / "generic").mkdir(parents=True)
    (landing / "generic" / "tx.csv").write_text(
        "customer_id,timestamp,amount,order_id,product_id,is_return\n"
        "c1,2024-01-01T10:00:00Z,10.5,o1,p1,false\n"
        "c1,2024-01-02T10:00:00Z,oops,o2,p1,false\n"
    )
    summary = ingest_landing(settings)
    assert (summary.items[0].rows, summary.items[0].quarantined) == (1, 1)
    q = Lake(settings.lake).read("quarantine", "bronze", "generic", "transactions").to_pylist()
    assert q[0]["_line"] == 3 and q[0][QUARANTINE_REASON] == "column amount: not a valid decimal"
    assert ingest_landing(settings).total_rows == 0


def test_generic_csv_with_bytes_not_utf8_and_an_empty_file(settings, landing):
    """The generic source (a header line, here after a BOM) goes the same way: the line
    with a byte that is not UTF-8 is quarantined, the 0-byte file holds nothing."""
    settings = settings.model_copy(update={"sources": ("generic",)})
    (landing / "generic").mkdir(parents=True)
    (landing / "generic" / "tx.csv").write_bytes(
        b"\xef\xbb\xbfcustomer_id,timestamp,amount,order_id,product_id,is_return\n"
        b"c1,2024-01-01T10:00:00Z,10.5,o1,p1,false\n"
        b"c\xff2,2024-01-02T10:00:00Z,3,o2,p1,false\n"
        b"c3,2024-01-03T10:00:00Z,oops,o3,p1,false\n"
        b"c4,2024-01-04T10:00:00Z,4,o4,p1,false\n"
    )
    (landing / "generic" / "empty.csv").write_bytes(b"")
    summary = ingest_landing(settings)
    assert (summary.items[0].files, summary.items[0].rows) == (2, 2)
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "generic", "transactions").sort_by("customer_id")
    assert bronze["customer_id"].to_pylist() == ["c1", "c4"]
    q = lake.read("quarantine", "bronze", "generic", "transactions").sort_by("_line").to_pylist()
    assert [(r["_line"], r[QUARANTINE_REASON]) for r in q] == [
        (3, "not UTF-8 text: byte 0xff at position 2"),
        (4, "column amount: not a valid decimal"),
    ]
    assert q[0]["_raw"] == "c\\xff2,2024-01-02T10:00:00Z,3,o2,p1,false"
    assert ingest_landing(settings).total_rows == 0


@pytest.mark.parametrize(
    ("cdm", "clean", "dirty"),
    [
        ("decimal", ["12.5", "0", "-3", None], ["$19.99", " 7 ", "1,234.50", "nan", "1e3", " "]),
        ("int64", ["5637469419", "0", None], ["12.0", "x", " 42", "1.5", ""]),
        ("dateTime", ["2025-01-01T05:05:55Z", None],
         ["31/12/2024 10:00", "2024-01-02T00:00:00.1234567Z", "2024-01-02", "not a date"]),
    ],
)  # fmt: skip
def test_sliced_cast_equals_the_careful_cast(cdm, clean, dirty):
    """A block with a few dirty values casts its clean slices in one call each; the
    result (values and failures) must be what the per-value careful path gives.
    Empty fields arrive as null (the CSV reader's null value)."""
    import random

    import pyarrow.compute as pc

    from c360ml.sources.synapse import _cast_column, _cast_one

    rng = random.Random(7)
    values = [rng.choice(clean) for _ in range(20_000)]
    for i in rng.sample(range(len(values)), 25):
        values[i] = rng.choice(dirty)
    text = pa.array(values, pa.string())
    typed, failed = _cast_column(text, cdm)
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
    careful, ok = _cast_one(text, empty, cdm)
    expected_failed = pc.fill_null(pc.and_(pc.invert(ok), pc.invert(empty)), False)
    expected = pc.if_else(pc.or_(empty, expected_failed), pa.scalar(None, careful.type), careful)
    assert typed.equals(expected.cast(typed.type))
    assert failed is not None and failed.equals(expected_failed)
    assert pc.sum(failed).as_py() > 0


def test_a_line_longer_than_a_block_does_not_stop_the_sync(settings, landing):
    """Arrow's block reader cannot hold a 5 MB line; the careful reader reads the file
    again: a 5 MB line that is not a row goes to quarantine (file, line, reason, the
    whole text); a 5 MB value in a valid row (a Dataverse memo may be 1M characters) is
    kept, as any valid row is."""
    big = "x" * (5 << 20)
    rows = [_cust(1, 1, "C1"), big, dict(_cust(2, 1, "C2"), custgroup=big), _cust(3, 1, "C3")]
    folder = write_sync_folder(
        landing, "d365", SYNC, {"custtable": rows, "dirpartytable": [_party(1), _party(2)]}
    )
    summary = {t.table: t for t in ingest_landing(settings).items}
    assert (summary["custtable"].rows, summary["custtable"].quarantined) == (3, 1)
    assert (summary["dirpartytable"].rows, summary["dirpartytable"].quarantined) == (2, 0)
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "d365", "custtable").sort_by("recid")
    assert bronze["recid"].to_pylist() == [1, 2, 3]
    assert bronze["custgroup"].to_pylist() == ["10", big, "10"]
    assert bronze["accountnum"].to_pylist() == ["C1", "C2", "C3"]
    q = lake.read("quarantine", "bronze", "d365", "custtable").to_pylist()
    assert [(r["_source_file"], r["_line"], r[QUARANTINE_REASON]) for r in q] == [
        (CUST_FILE, 2, "wrong column count: expected 15, got 1")
    ]
    assert q[0]["_raw"] == big
    assert len(bronze) + len(q) == _non_empty_lines(folder / "custtable" / "2024.csv") == 4
    assert lake.read("bronze", "d365", "dirpartytable")["partynumber"].to_pylist() == ["P1", "P2"]


def test_an_empty_file_holds_no_rows_and_stops_nothing(settings, landing, caplog):
    """A 0-byte partition has no row to quarantine: it is logged, counted as a file
    ingested (not read again), and the table's other files and tables go on."""
    folder = write_sync_folder(
        landing,
        "d365",
        SYNC,
        {"custtable": [_cust(1, 1, "C1"), _cust(2, 1, "C2")], "dirpartytable": []},
    )
    _add_partition(folder, "custtable", "2023", b"")
    assert (folder / "dirpartytable" / "2024.csv").stat().st_size == 0
    caplog.set_level(logging.INFO, logger="c360ml")
    summary = {t.table: t for t in ingest_landing(settings).items}
    c, p = summary["custtable"], summary["dirpartytable"]
    assert (c.files, c.rows, c.quarantined) == (2, 2, 0)
    assert (p.files, p.rows, p.quarantined) == (1, 0, 0)
    lake = Lake(settings.lake)
    assert lake.read("bronze", "d365", "custtable")["recid"].to_pylist() == [1, 2]
    assert lake.count("quarantine", "bronze", "d365", "custtable") == 0
    assert lake.count("bronze", "d365", "dirpartytable") == 0
    assert f"d365/{SYNC}/custtable/2023.csv: empty file (0 bytes): no rows" in caplog.text
    assert f"d365/{SYNC}/dirpartytable/2024.csv: empty file (0 bytes): no rows" in caplog.text
    version = lake.version("bronze", "d365", "custtable")
    assert ingest_landing(settings).total_rows == 0
    assert lake.version("bronze", "d365", "custtable") == version


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_bytes_that_are_not_utf8_quarantine_their_line_only(settings, landing):
    """One partition has a value with a byte that is not UTF-8 (Arrow stops converting
    it), another a line of binary junk (Arrow stops parsing it; its quote would open a
    value running on over the next line): each line with such bytes is quarantined with
    its file, line and the byte's position, and only that line. Python's "Exception
    ignored" report of Arrow's failed decode of the junk line is not printed."""
    bad_value = _line(_cust(2, 1, "C2")).replace(b"C2", b"C\xff2")
    junk = b'\xfe\x00\x81,"binary,junk'
    rows = [_cust(1, 1, "C1"), bad_value, _cust(3, 1, "C3"), "a,b"]
    folder = write_sync_folder(
        landing, "d365", SYNC, {"custtable": rows, "dirpartytable": [_party(1)]}
    )
    other = [_line(_cust(5, 1, "C5")), junk, _line(_cust(6, 1, "C6")), b""]
    _add_partition(folder, "custtable", "2023", b"\n".join(other))
    summary = {t.table: t for t in ingest_landing(settings).items}
    assert (summary["custtable"].rows, summary["custtable"].quarantined) == (4, 3)
    assert summary["dirpartytable"].rows == 1
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "d365", "custtable").sort_by("recid")
    assert bronze["accountnum"].to_pylist() == ["C1", "C3", "C5", "C6"]
    q = lake.read("quarantine", "bronze", "d365", "custtable").to_pylist()
    q = {(r["_source_file"].rsplit("/", 1)[1], r["_line"]): r for r in q}
    assert sorted(q) == [("2023.csv", 2), ("2024.csv", 2), ("2024.csv", 4)]
    assert q["2024.csv", 2]["_source_file"] == CUST_FILE
    position = bad_value.index(b"\xff") + 1
    assert (
        q["2024.csv", 2][QUARANTINE_REASON] == f"not UTF-8 text: byte 0xff at position {position}"
    )
    assert "C\\xff2" in q["2024.csv", 2]["_raw"]  # the bad byte escaped, the rest as written
    assert q["2024.csv", 4][QUARANTINE_REASON] == "wrong column count: expected 15, got 2"
    assert q["2023.csv", 2][QUARANTINE_REASON] == "not UTF-8 text: byte 0xfe at position 1"
    assert q["2023.csv", 2]["_raw"] == '\\xfe\x00\\x81,"binary,junk'
    files = [folder / "custtable" / f for f in ("2024.csv", "2023.csv")]
    assert len(bronze) + len(q) == _non_empty_lines(*files) == 7


def test_a_file_failing_late_is_read_on_from_the_first_line_not_yielded(
    settings, landing, monkeypatch, caplog
):
    """Small blocks, each cast on its own: the block reader has yielded many blocks (a
    wrong-field-count row and a bad value among them) when it stops on a long line; the
    careful reader goes on from there (the long row is valid; a later one has a byte
    that is not UTF-8). Every line is in bronze or quarantine exactly once."""
    monkeypatch.setattr(synapse, "BLOCK_SIZE", 4096)
    monkeypatch.setattr(synapse, "CAST_BYTES", 1)
    rows: list = [_cust(i, 1, f"C{i}") for i in range(1, 401)]
    rows[99] = "a,b,c"
    rows[149] = dict(rows[149], recid="x150")
    rows[249] = dict(rows[249], custgroup="g" * 20_000)
    rows[299] = _line(rows[299]).replace(b"C300", b"C\xe9300")
    folder = write_sync_folder(landing, "d365", SYNC, {"custtable": rows})
    caplog.set_level(logging.INFO, logger="c360ml")
    summary = ingest_landing(settings)
    assert (summary.items[0].rows, summary.items[0].quarantined) == (397, 3)
    resumed = int(re.search(r"the careful reader reads on from line (\d+)", caplog.text).group(1))
    assert 100 < resumed <= 250  # blocks were yielded before the reader stopped
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "d365", "custtable")
    assert sorted(bronze["recid"].to_pylist()) == [
        i for i in range(1, 401) if i not in (100, 150, 300)
    ]
    assert max(len(g or "") for g in bronze["custgroup"].to_pylist()) == 20_000
    q = lake.read("quarantine", "bronze", "d365", "custtable").sort_by("_line").to_pylist()
    position = rows[299].index(b"\xe9") + 1
    assert [(r["_line"], r[QUARANTINE_REASON]) for r in q] == [
        (100, "wrong column count: expected 15, got 3"),
        (150, "column recid: not a valid int64"),
        (300, f"not UTF-8 text: byte 0xe9 at position {position}"),
    ]
    assert len(bronze) + len(q) == _non_empty_lines(folder / "custtable" / "2024.csv") == 400


def test_a_quoted_line_break_across_blocks_is_one_value(settings, landing, monkeypatch):
    """An address holds line breaks (quoted). Where one falls across two of Arrow's
    blocks the block reader stops ("out of sync"); the row is still one row, intact."""
    monkeypatch.setattr(synapse, "BLOCK_SIZE", 1024)
    groups = [f"street {i}\nsuite {i}\r\ncity" if i % 3 else str(i) for i in range(1, 201)]
    rows = [_cust(i, 1, f"C{i}", group=g) for i, g in enumerate(groups, start=1)]
    write_sync_folder(landing, "d365", SYNC, {"custtable": rows})
    summary = ingest_landing(settings)
    assert (summary.items[0].rows, summary.items[0].quarantined) == (200, 0)
    bronze = Lake(settings.lake).read("bronze", "d365", "custtable").sort_by("recid")
    assert bronze["custgroup"].to_pylist() == groups


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_careful_reader_reads_a_file_as_the_block_reader_does(tmp_path, monkeypatch, seed):
    """Rows are numbered by counting them, so the careful reader (which takes over where
    the block reader stopped) must find and number the rows of a file as Arrow does:
    quoted line breaks, empty lines, CRLF and lone CR, bad values and wrong field counts.
    The block reader reads the file in one block; the careful one in many small pieces."""
    import random

    from c360ml.sources.synapse import Entity, _Cursor, _read_careful, _read_fast
    from c360ml.sources.tables import Column

    rng = random.Random(seed)
    lines = []
    for i in range(600):
        kind = rng.random()
        if kind < 0.05:
            lines.append(b"")
        elif kind < 0.1:
            lines.append(b"only,two")
        elif kind < 0.2:
            lines.append(f'{i},"a ""note""\nover\r\nlines",2024-01-01T00:00:00Z'.encode())
        elif kind < 0.25:
            lines.append(f"{i},text,not a date".encode())
        else:
            lines.append(f"{i},{'t' * rng.randrange(40)},2024-01-01T00:00:00Z".encode())
    data = b"".join(line + rng.choice([b"\n", b"\r\n", b"\r"]) for line in lines)
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    cols = (Column("n", "int64"), Column("note", "string"), Column("at", "dateTime"))
    entity = Entity("t", cols, (path,))
    monkeypatch.setattr(synapse, "BLOCK_SIZE", 4 * len(data))
    fast = list(_read_fast(path, entity, "t.csv", False, _Cursor(1)))
    monkeypatch.setattr(synapse, "BLOCK_SIZE", 256)
    monkeypatch.setattr(synapse, "CAST_BYTES", 512)
    careful = list(_read_careful(path, entity, "t.csv", False, 1))
    assert len(careful) > 1
    for i, key in ((0, "n"), (1, "_line")):
        a = pa.concat_tables([part[i] for part in fast]).sort_by(key)
        b = pa.concat_tables([part[i] for part in careful]).sort_by(key)
        assert a.equals(b)
    quarantined = pa.concat_tables([part[1] for part in careful])
    assert set(quarantined[QUARANTINE_REASON].to_pylist()) == {
        "wrong column count: expected 3, got 2",
        "column at: not a valid dateTime",
    }
    notes = pa.concat_tables([part[0] for part in careful])["note"].to_pylist()
    assert 'a "note"\nover\r\nlines' in notes


CUST_ATTRS = [(c.name, c.cdm_type) for c in source_table("d365", "custtable").columns]


def test_an_attribute_added_to_model_json_is_a_new_column(settings, landing):
    """A later export adds attributes (one amid the others, one at the end): bronze gets
    the columns, null in the rows ingested before; silver goes on over the wider table."""
    from c360ml.medallion.silver import build_silver

    write_sync_folder(landing, "d365", SYNC, {"custtable": [_cust(1, 1, "C1")]})
    ingest_landing(settings)
    build_silver(settings)
    attrs = list(CUST_ATTRS)
    attrs.insert(attrs.index(("accountnum", "string")), ("creditmax", "decimal"))
    attrs.append(("custclassificationid", "string"))
    later = [
        dict(_cust(2, 1, "C2"), creditmax="1500.5", custclassificationid="VIP"),
        dict(_cust(1, 2, "C1", group="20"), creditmax="", custclassificationid="STD"),
    ]
    write_sync_folder(
        landing, "d365", "2024-01-06T00.00.00Z", {"custtable": later}, {"custtable": attrs}
    )
    summary = ingest_landing(settings)
    assert (summary.items[0].rows, summary.items[0].quarantined) == (2, 0)
    lake = Lake(settings.lake)
    bronze = lake.read("bronze", "d365", "custtable").sort_by(
        [("recid", "ascending"), ("versionnumber", "ascending")]
    )
    assert bronze.schema.field("creditmax").type == pa.float64()
    assert bronze.schema.field("custclassificationid").type == pa.string()
    assert bronze["recid"].to_pylist() == [1, 1, 2]
    assert bronze["creditmax"].to_pylist() == [None, None, 1500.5]
    assert bronze["custclassificationid"].to_pylist() == [None, "STD", "VIP"]
    assert bronze["accountnum"].to_pylist() == ["C1", "C1", "C2"]  # matched by name
    assert bronze["custgroup"].to_pylist() == ["10", "20", "10"]
    build_silver(settings)
    silver = lake.read("silver", "custtable").sort_by("recid")
    assert silver["accountnum"].to_pylist() == ["C1", "C2"]
    assert silver["custgroup"].to_pylist() == ["20", "10"]


def test_a_type_change_stops_that_table_only_with_one_clear_error(settings, landing):
    """A later export says `blocked` is a string: that table stops at that sync (its
    later syncs wait too, so nothing is ingested out of order), the other table is
    ingested, and the run ends with one error naming table, column and both types."""
    first = {"custtable": [_cust(1, 1, "C1")], "dirpartytable": [_party(1)]}
    write_sync_folder(landing, "d365", SYNC, first)
    ingest_landing(settings)
    retyped = [(n, "string" if n == "blocked" else t) for n, t in CUST_ATTRS]
    changed = "2024-01-06T00.00.00Z"
    write_sync_folder(
        landing,
        "d365",
        changed,
        {"custtable": [dict(_cust(2, 1, "C2"), blocked="No")], "dirpartytable": [_party(2)]},
        {"custtable": retyped},
    )
    later = {"custtable": [_cust(3, 1, "C3")], "dirpartytable": [_party(3)]}
    write_sync_folder(landing, "d365", "2024-01-07T00.00.00Z", later)
    with pytest.raises(IngestError) as err:
        ingest_landing(settings)
    message = str(err.value)
    assert message.startswith(
        "1 table not ingested: d365/custtable: column 'blocked' is int64 in bronze but "
        f"'string' (string) in {landing / 'd365' / changed / 'model.json'}: a bronze column "
        "cannot change type, so custtable is not ingested from this sync on. "
        "The others were ingested (1 table, 2 rows, 0 quarantined)"
    )
    rows = {r["table"]: r for r in err.value.summary.rows()}
    assert rows["dirpartytable"]["rows"] == 2 and rows["dirpartytable"]["error"] == ""
    assert rows["custtable"]["rows"] == 0 and "column 'blocked'" in rows["custtable"]["error"]
    lake = Lake(settings.lake)
    assert lake.read("bronze", "d365", "custtable")["recid"].to_pylist() == [1]
    assert lake.schema("bronze", "d365", "custtable").field("blocked").type == pa.int64()
    assert lake.count("quarantine", "bronze", "d365", "custtable") == 0
    party = lake.read("bronze", "d365", "dirpartytable")
    assert sorted(party["recid"].to_pylist()) == [1, 2, 3]
    # Nothing of the stopped table was recorded: the next run stops at the same place.
    with pytest.raises(IngestError, match="d365/custtable: column 'blocked'"):
        ingest_landing(settings)
    assert lake.count("bronze", "d365", "dirpartytable") == 3


def test_ingest_command_exits_0_on_bad_lines_and_2_on_a_type_change(tmp_path, landing, settings):
    """As a user runs it: bad lines are quarantined and said so (exit 0, no traceback);
    a type change is one error line (exit 2)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360ML_", "MLFLOW_"))}
    env |= {"C360ML_LAKE_ROOT": str(settings.lake), "C360ML_LOG_DIR": str(tmp_path / "logs")}

    def run() -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "c360ml.cli", "ingest"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stdout + done.stderr

    bad = _line(_cust(2, 1, "C2")).replace(b"C2", b"C\xff2")
    folder = write_sync_folder(landing, "d365", SYNC, {"custtable": [_cust(1, 1, "C1"), bad]})
    _add_partition(folder, "custtable", "2023", b"")
    code, out = run()
    assert code == 0, out
    assert "1 rows quarantined, each with its file, line and reason" in out
    assert "Traceback" not in out and "Exception ignored" not in out
    retyped = [(n, "string" if n == "blocked" else t) for n, t in CUST_ATTRS]
    write_sync_folder(
        landing,
        "d365",
        "2024-01-06T00.00.00Z",
        {"custtable": [_cust(3, 1, "C3")]},
        {"custtable": retyped},
    )
    code, out = run()
    assert code == 2, out
    assert "error: 1 table not ingested: d365/custtable: column 'blocked' is int64" in out
    assert "Traceback" not in out
