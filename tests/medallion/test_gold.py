"""Gold from hand-written source rows: one rule per assertion block."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.medallion.build import build_gold, build_silver, build_unify
from c360ml.medallion.ingest import ingest_landing
from c360ml.storage.lake import Lake
from tests.conftest import assert_gold_equals_a_rebuild, write_sync_folder

T0 = "2024-01-10T10:00:00Z"


def fo(recid, version=1, modified=T0, created=T0, **cols):
    """A finance & operations change row with its Synapse system columns."""
    return {
        "Id": f"id{recid}",
        "SinkModifiedOn": modified,
        "versionnumber": version,
        "IsDelete": "False",
        "recid": recid,
        "createddatetime": created,
        "modifieddatetime": modified,
        "dataareaid": "usrt",
        **cols,
    }


def dv(key, version=1, **cols):
    return {
        "Id": key,
        "SinkModifiedOn": cols.get("modifiedon", T0),
        "versionnumber": version,
        "IsDelete": "False",
        **cols,
    }


D365 = {
    "custtable": [
        fo(1, accountnum="C1", party=11, custgroup="10", currency="USD"),
        fo(2, accountnum="C2", party=12, custgroup="20", currency="USD"),
        fo(3, accountnum="C3", party=13, custgroup="30", currency="USD"),
    ],
    "dirpartytable": [
        fo(
            11,
            instancerelationtype=13271,
            primaryaddresslocation=21,
            primarycontactemail=31,
            primarycontactphone=32,
        ),
        fo(12, instancerelationtype=13271, primarycontactemail=34),  # points at a phone row
        fo(13, instancerelationtype=2077, name="Contoso Ltd"),
    ],
    "dirpersonname": [
        fo(
            41,
            person=11,
            firstname="Ann",
            lastname="Old",
            validfrom="2020-01-01T00:00:00Z",
            validto="2023-06-01T00:00:00Z",
        ),
        fo(
            42,
            person=11,
            firstname="Ann",
            lastname="New",
            validfrom="2023-06-01T00:00:00Z",
            validto="2154-12-31T23:59:59Z",
        ),
        fo(
            43,
            person=12,
            firstname="Bob",
            lastname="Ray",
            validfrom="2020-01-01T00:00:00Z",
            validto="2154-12-31T23:59:59Z",
        ),
    ],
    "logisticslocation": [fo(21, locationid="L21", ispostaladdress=1)],
    "logisticspostaladdress": [
        fo(
            51,
            location=21,
            street="Old St",
            city="Houston",
            zipcode="77001",
            countryregionid="USA",
            validfrom="2020-01-01T00:00:00Z",
            validto="2023-01-01T00:00:00Z",
        ),
        fo(
            52,
            location=21,
            street="New St",
            city="Austin",
            zipcode="73301",
            countryregionid="USA",
            validfrom="2023-01-01T00:00:00Z",
            validto="2154-12-31T23:59:59Z",
        ),
    ],
    "logisticselectronicaddress": [
        fo(31, locator=" Ann@X.com ", type=2),
        fo(32, locator="(212) 555-0147", type=1),
        fo(34, locator="212.555.0199", type=1),
    ],
    "salestable": [
        fo(
            61,
            salesid="SO1",
            custaccount="C1",
            salesstatus=3,
            salestype=3,
            currencycode="USD",
            retailchanneltable=5637144576,
        ),
        fo(
            62,
            salesid="SO2",
            custaccount="C1",
            salesstatus=1,
            salestype=3,
            currencycode="USD",
            retailchanneltable=5637145326,
        ),
        fo(
            62,
            version=2,
            modified="2024-02-01T00:00:00Z",
            salesid="SO2",
            custaccount="C1",
            salesstatus=4,
            salestype=3,
            currencycode="USD",
            retailchanneltable=5637145326,
        ),
        fo(
            63,
            salesid="SO3",
            custaccount="C2",
            salesstatus=3,
            salestype=4,
            currencycode="USD",
            retailchanneltable=5637144576,
        ),
        fo(64, salesid="SO4", custaccount="C9", salesstatus=3, salestype=3, currencycode="USD"),
        fo(65, salesid="SO5", custaccount="C3", salesstatus=3, salestype=3, currencycode="USD"),
    ],
    "salesline": [
        fo(
            71,
            salesid="SO1",
            linenum=1,
            itemid="I1",
            salesqty=2,
            salesprice=10,
            lineamount=18,
            linedisc=2,
        ),
        fo(72, salesid="SO1", linenum=2, itemid="I2", salesqty=1, salesprice=5, lineamount=5),
        fo(73, salesid="SO2", linenum=1, itemid="I1", salesqty=1, salesprice=10, lineamount=10),
        fo(74, salesid="SO3", linenum=1, itemid="I1", salesqty=-1, salesprice=10, lineamount=-10),
        fo(75, salesid="SO4", linenum=1, itemid="I1", salesqty=1, salesprice=10, lineamount=10),
        fo(76, salesid="SO99", linenum=1, itemid="I1", salesqty=1, salesprice=10, lineamount=10),
    ],
    "retailtransactiontable": [
        fo(
            81,
            created="2024-01-11T15:30:00Z",
            transactionid="T1",
            store="HOUSTON-1",
            custaccount="C2",
            transdate="2024-01-11",
            transtime=55800,
            type=2,
            entrystatus=0,
            grossamount=30,
            discamount=3,
            netamount=27,
            numberofitems=3,
            currency="USD",
        ),
        fo(
            82,
            transactionid="T2",
            store="HOUSTON-1",
            transdate="2024-01-11",
            type=2,
            entrystatus=0,
            grossamount=5,
            netamount=5,
            numberofitems=1,
        ),
        fo(
            83,
            transactionid="T3",
            store="HOUSTON-1",
            custaccount="C1",
            transdate="2024-01-11",
            type=2,
            entrystatus=1,
            grossamount=5,
            netamount=5,
            numberofitems=1,
        ),
    ],
    "retailtransactionsalestrans": [
        fo(91, transactionid="T1", linenum=1, itemid="I2", qty=3, price=10, netamount=27)
    ],
    "inventtable": [
        fo(95, itemid="I1", namealias="Mug", itemgroupid="Kitchen"),
        fo(96, itemid="I2", namealias="Tea", itemgroupid="Food"),
    ],
}
DATAVERSE = {
    "contact": [
        dv(
            "K1",
            contactid="K1",
            firstname="Annie",
            emailaddress1="ANN@x.com",
            createdon="2021-01-01T00:00:00Z",
        ),
        dv(
            "K2",
            contactid="K2",
            firstname="Cy",
            lastname="Only",
            emailaddress1="cy@x.com",
            createdon="2022-01-01T00:00:00Z",
        ),
    ],
    "incident": [
        dv("I1", incidentid="I1", customerid="K1", statecode=0, createdon=T0),
        dv(
            "I1",
            version=2,
            incidentid="I1",
            customerid="K1",
            statecode=1,
            createdon=T0,
            modifiedon="2024-03-01T00:00:00Z",
        ),
        dv("I2", incidentid="I2", customerid="K404", statecode=0, createdon=T0),
    ],
}


def through_unify(settings) -> None:
    """The first sync of D365 and DATAVERSE landed and built up to unify (gold's inputs)."""
    landing = Lake(settings.lake).path("landing")
    write_sync_folder(landing, "d365", "2024-04-01T00.00.00Z", D365)
    write_sync_folder(landing, "dataverse", "2024-04-01T00.00.00Z", DATAVERSE)
    ingest_landing(settings)
    build_silver(settings)
    build_unify(settings)


@pytest.fixture
def gold(settings):
    through_unify(settings)
    build_gold(settings)
    lake = Lake(settings.lake)
    return lambda *parts: lake.read_pandas(*parts)


def test_profiles_use_valid_now_rows_and_typed_contacts(gold):
    ids = gold("gold", "customer_source_map").set_index("source_key")["customer_id"]
    profile = gold("gold", "customer_profile").set_index("customer_id")
    assert len(profile) == 3  # C1 (+ contact K1), C2, contact-only K2; org C3 excluded
    assert ids["K1"] == ids["usrt-C1"] and ids["K2"] != ids["usrt-C1"]
    ann = profile.loc[ids["usrt-C1"]]
    assert (ann.last_name, ann.email, ann.phone) == ("New", "ann@x.com", "+12125550147")
    assert (ann.street, ann.city, ann.country) == ("New St", "Austin", "US")
    assert ann.sources == "d365,dataverse" and ann.source_count == 2
    assert pd.isna(profile.loc[ids["usrt-C2"], "email"])  # the phone row is not an e-mail
    assert profile.loc[ids["K2"], "last_name"] == "Only"


def test_orders_from_both_paths_with_flags_and_quarantine(gold):
    orders = gold("gold", "orders").set_index("order_id")
    assert sorted(orders.index) == ["POS:T1", "POS:T3", "SO:usrt-SO1", "SO:usrt-SO2", "SO:usrt-SO3"]
    so1 = orders.loc["SO:usrt-SO1"]
    assert (so1.channel, so1.gross_amount, so1.discount_amount, so1.net_amount) == (
        "online",
        25.0,
        2.0,
        23.0,
    )
    assert orders.loc["SO:usrt-SO2", "channel"] == "call-center"
    assert orders.loc["SO:usrt-SO2", "is_cancelled"]
    assert orders.loc["SO:usrt-SO3", "is_return"] and orders.loc["SO:usrt-SO3", "net_amount"] < 0
    assert orders.loc["POS:T1", "channel"] == "store" and orders.loc["POS:T1", "net_amount"] == 27
    assert orders.loc["POS:T3", "is_cancelled"] and orders.loc["POS:T3", "status"] == "voided"
    reasons = gold("quarantine", "gold", "orders").set_index("order_id")["quarantine_reason"]
    assert reasons.to_dict() == {
        "SO:usrt-SO4": "unknown customer account",
        "SO:usrt-SO5": "customer is not a person party",
        "POS:T2": "anonymous transaction (no customer account)",
    }
    lines = gold("gold", "order_lines")
    assert set(lines["order_id"]) == {"SO:usrt-SO1", "SO:usrt-SO2", "SO:usrt-SO3", "POS:T1"}
    assert lines.loc[lines.order_id == "SO:usrt-SO3", "is_return"].all()
    bad_lines = gold("quarantine", "gold", "order_lines").set_index("order_id")["quarantine_reason"]
    assert bad_lines["SO:usrt-SO99"] == "orphan line (no order header)"
    assert bad_lines["SO:usrt-SO4"].startswith("order quarantined")


def test_status_history_and_cases(gold):
    history = gold("gold", "order_status_history").sort_values("valid_from")
    so2 = history[history.entity_id == "SO:usrt-SO2"]
    assert list(so2.status) == ["open", "cancelled"]
    assert so2.valid_to.iloc[0] == so2.valid_from.iloc[1] == pd.Timestamp("2024-02-01", tz="UTC")
    assert pd.isna(so2.valid_to.iloc[1])
    cases = gold("gold", "support_cases").set_index("case_id")
    assert cases.loc["I1", "status"] == "resolved" and pd.isna(cases.loc["I2", "customer_id"])
    case_history = gold("gold", "case_status_history")
    assert list(case_history[case_history.entity_id == "I1"].sort_values("valid_from").status) == [
        "active",
        "resolved",
    ]


def test_rebuild_with_nothing_new_writes_no_version(settings, gold):
    lake = Lake(settings.lake)
    before = {p: lake.version("gold", *p) for p in lake.tables("gold")}
    build_silver(settings)
    build_unify(settings)
    build_gold(settings)
    assert {p: lake.version("gold", *p) for p in lake.tables("gold")} == before


def test_generic_csv_source_reaches_the_same_gold_tables(settings):
    settings = settings.model_copy(update={"sources": ("generic",)})
    landing = Lake(settings.lake).path("landing") / "generic"
    landing.mkdir(parents=True)
    (landing / "tx.csv").write_text(
        "customer_id,timestamp,amount,order_id,product_id,is_return\n"
        "a,2024-01-01T10:00:00Z,10,o1,p1,false\n"
        "a,2024-01-01T10:00:00Z,5,o1,p2,false\n"
        "a,2024-01-01T10:00:00Z,5,o1,p2,false\n"  # exact duplicate line
        "a,2024-02-01T10:00:00Z,-5,o2,p2,true\n"
        "b,2024-01-15T10:00:00Z,7,o3,p1,false\n"
    )
    ingest_landing(settings)
    silver = {r.table: r for r in build_silver(settings).items}["generic_transactions"]
    assert (silver.silver_rows, silver.duplicates) == (4, 1)
    build_unify(settings)
    build_gold(settings)
    lake = Lake(settings.lake)
    profile = lake.read_pandas("gold", "customer_profile")
    assert len(profile) == 2 and set(profile.sources) == {"generic"}
    orders = lake.read_pandas("gold", "orders").set_index("order_id")
    assert orders.loc["GEN:o1", "net_amount"] == 15 and not orders.loc["GEN:o1", "is_return"]
    assert orders.loc["GEN:o2", "is_return"]
    assert len(lake.read_pandas("gold", "order_lines")) == 4


def test_duplicates_across_batches_commit_nothing(settings):
    """Uniqueness is checked over the whole stream: a key repeated in a later batch
    fails the write, and the table keeps its last good version."""
    import pyarrow as pa

    from c360ml.medallion.declarations import gold_tables
    from c360ml.medallion.gold import write_gold

    products = gold_tables()["products"]

    lake = Lake(settings.lake)

    def reader(*ids):
        batches = [pa.record_batch({"item_id": [i], "name": ["n"], "category": ["c"]}) for i in ids]
        return pa.RecordBatchReader.from_batches(batches[0].schema, batches)

    assert write_gold(lake, products, [reader("A", "B")], {}) == (2, 0)
    with pytest.raises(ValueError, match=r"gold/products.*\n.*item_id: field_uniqueness"):
        write_gold(lake, products, [reader("C"), reader("D", "C")], {})
    assert sorted(lake.read_pandas("gold", "products")["item_id"]) == ["A", "B"]


def _second_sync() -> dict[str, list[dict]]:
    """A status change, a new line, a deleted line, a new POS transaction, an account that
    becomes known and a party that becomes a person."""
    later = "2024-04-15T00:00:00Z"
    return {
        "custtable": [fo(4, accountnum="C9", party=14, custgroup="10", currency="USD")],
        "dirpartytable": [
            fo(13, version=2, modified=later, instancerelationtype=13271, name="Cora"),
            fo(14, instancerelationtype=13271),
        ],
        "salestable": [
            fo(
                62,
                version=3,
                modified=later,
                salesid="SO2",
                custaccount="C1",
                salesstatus=3,
                salestype=3,
                currencycode="USD",
                retailchanneltable=5637145326,
            ),
        ],
        "salesline": [
            fo(77, salesid="SO1", linenum=3, itemid="I2", salesqty=1, salesprice=5, lineamount=5),
            {**fo(74, version=2, modified=later), "IsDelete": "True"},  # a key-only marker
        ],
        "retailtransactiontable": [
            fo(
                84,
                transactionid="T4",
                store="HOUSTON-1",
                transdate="2024-04-15",
                custaccount="C2",
                type=2,
                entrystatus=0,
                grossamount=7,
                netamount=7,
                numberofitems=1,
            ),
        ],
    }


def test_patched_order_tables_equal_a_rebuild(settings, gold, tmp_path):
    """A second sync (`_second_sync`): gold recomputes just the orders it touches (their
    status history too) and equals a rebuild from scratch."""
    landing = Lake(settings.lake).path("landing")
    write_sync_folder(landing, "d365", "2024-05-01T00.00.00Z", _second_sync())
    ingest_landing(settings)
    build_silver(settings)
    build_unify(settings)
    written = {t["table"]: t["written"] for t in build_gold(settings).rows()}
    # SO1 (line), SO2 (status), SO3 (line deleted), SO4 (account now known), SO5 (now a
    # person), T4 (new)
    for table in ("gold/orders", "gold/order_lines", "gold/order_status_history"):
        assert written[table] == "patched (6 orders)"
    orders = gold("gold", "orders").set_index("order_id")
    assert {"SO:usrt-SO4", "SO:usrt-SO5", "POS:T4"} <= set(orders.index)
    assert (
        orders.loc["SO:usrt-SO1", "net_amount"] == 28
        and orders.loc["SO:usrt-SO2", "status"] == "invoiced"
    )
    assert_gold_equals_a_rebuild(settings, tmp_path)


def test_a_build_killed_at_any_commit_is_finished_by_the_next(settings, gold, tmp_path):
    """A table and its quarantine, and the order tables and their state, are units of
    work: a patch killed after any of its commits (the lake cut back to that commit) is
    finished by the next build, which leaves gold, quarantine and state as a build that
    was not killed. (Before, a kill between gold/orders and its quarantine left the
    quarantine behind for good: the next build found gold/orders' inputs unchanged.)"""
    import shutil

    from tests import crash

    landing = Lake(settings.lake).path("landing")
    write_sync_folder(landing, "d365", "2024-05-01T00.00.00Z", _second_sync())
    ingest_landing(settings)
    build_silver(settings)
    build_unify(settings)
    before = set(crash.commit_files(settings.lake))
    build_gold(settings)
    made = crash.commit_points(settings.lake, before)
    want = crash.tables(settings.lake)
    assert any(p.startswith("quarantine/gold/orders/") for p in made)
    assert any(p.startswith("state/gold/order_accounts/") for p in made)
    behind = 0  # points whose cut lake differs from the finished one (something to do)
    for i, point in enumerate(made[:-1]):
        killed = settings.model_copy(update={"lake_root": tmp_path / f"killed{i}"})
        shutil.copytree(settings.lake, killed.lake)
        crash.cut_after(killed.lake, made, point)
        behind += bool(crash.differences(want, crash.tables(killed.lake)))
        build_gold(killed)
        assert crash.differences(want, crash.tables(killed.lake)) == [], f"killed after {point}"
    assert behind >= len(made) // 2, (behind, made)


def test_without_the_change_log_gold_rebuilds(settings, gold):
    """The change log must reach back to the versions gold recorded; else a rebuild."""
    import shutil

    lake = Lake(settings.lake)
    assert lake.exists("state", "silver", "salesline_changes")
    later = "2024-04-15T00:00:00Z"
    sync = {"salesline": [fo(74, version=2, modified=later, salesid="SO3", linenum=1,
                             itemid="I1", salesqty=-2, salesprice=10, lineamount=-20)]}  # fmt: skip
    write_sync_folder(lake.path("landing"), "d365", "2024-05-01T00.00.00Z", sync)
    ingest_landing(settings)
    build_silver(settings)
    shutil.rmtree(lake.path("state", "silver", "salesline_changes"))
    build_silver(settings)  # nothing new: the log starts again from silver's version now
    written = {t["table"]: t["written"] for t in build_gold(settings).rows()}
    assert written["gold/orders"] == "rebuilt"
    assert gold("gold", "orders").set_index("order_id").loc["SO:usrt-SO3", "net_amount"] == -20
