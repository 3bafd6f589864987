"""Ingest landing -> bronze: types from model.json, lineage, incremental, quarantine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from c360ml.lake import Lake
from c360ml.medallion.ingest import ingest_landing
from tests.conftest import write_sync_folder


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
    assert summary.tables[0].rows == 2 and summary.tables[0].quarantined == 3
    q = Lake(settings.lake).read("quarantine", "bronze", "d365", "custtable").to_pylist()
    by_line = {r["_line"]: r["_reason"] for r in q}
    assert by_line[2].startswith("wrong column count: expected 15, got 3")
    assert by_line[3] == "column createddatetime: not a valid dateTime"
    assert by_line[4] == "column recid: not a valid int64"
    assert all(r["_source_file"].endswith("custtable/2024.csv") for r in q)
    assert "31/02/2024" in next(r["_raw"] for r in q if r["_line"] == 3)


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
    assert (summary.tables[0].rows, summary.tables[0].quarantined) == (1, 1)
    q = Lake(settings.lake).read("quarantine", "bronze", "generic", "transactions").to_pylist()
    assert q[0]["_line"] == 3 and q[0]["_reason"] == "column amount: not a valid decimal"
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
