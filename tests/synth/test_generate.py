"""The generated landing zone: layout, declared columns, dirt, overlap, increments."""

from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.sources.tables import SOURCE_TABLES, source_table
from c360ml.synth import generate_increment, generate_lake
from c360ml.synth.generate import read_meta
from c360ml.synth.params import CALL_CENTER_CHANNEL, ONLINE_CHANNEL
from c360ml.synth.writer import SYNC_TS_FORMAT
from tests.synth.conftest import make_settings


def sync_folders(settings, source: str) -> list[Path]:
    return sorted((settings.lake / "landing" / source).iterdir())


def read_rows(folder: Path, table: str) -> list[list[str]]:
    """All raw CSV records of one table in one sync folder (every partition)."""
    rows: list[list[str]] = []
    for path in sorted((folder / table).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            rows.extend(csv.reader(fh))
    return rows


def frame(folder: Path, source: str, table: str) -> pd.DataFrame:
    """Well-formed rows of a table as strings (rows with the wrong column count dropped)."""
    decl = source_table(source, table)
    rows = [r for r in read_rows(folder, table) if len(r) == len(decl.names)]
    return pd.DataFrame(rows, columns=decl.names)


def test_same_seed_gives_identical_landing_and_truth(tmp_path):
    a, b = make_settings(tmp_path / "a"), make_settings(tmp_path / "b")
    for s in (a, b):
        generate_lake(s, customers=300, seed=9)
    files_a = sorted(p.relative_to(a.lake) for p in a.lake.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.lake) for p in b.lake.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    for rel in files_a:
        assert (a.lake / rel).read_bytes() == (b.lake / rel).read_bytes(), rel
    for name in ("persons", "person_keys", "purchases", "cases"):
        assert pq.read_table(a.truth / f"{name}.parquet").equals(
            pq.read_table(b.truth / f"{name}.parquet")
        ), name
    c = make_settings(tmp_path / "c")
    generate_lake(c, customers=300, seed=10)
    assert (c.lake / files_a[-1]).read_bytes() != (a.lake / files_a[-1]).read_bytes()


def test_model_json_matches_declared_tables(small_lake):
    for source in ("d365", "dataverse"):
        for folder in sync_folders(small_lake, source):
            datetime.strptime(folder.name, SYNC_TS_FORMAT)
            model = json.loads((folder / "model.json").read_text())
            assert model["name"] == source
            names = set()
            for entity in model["entities"]:
                decl = SOURCE_TABLES[(source, entity["name"])]
                expected = decl.model_json_entity()
                assert entity["attributes"] == expected["attributes"]
                for part in entity["partitions"]:
                    assert (folder / part["location"]).exists()
                    assert part["location"] == f"{entity['name']}/{part['name']}.csv"
                names.add(entity["name"])
            declared = {n for s, n in SOURCE_TABLES if s == source}
            assert names <= declared
    first = sync_folders(small_lake, "d365")[0]
    model = json.loads((first / "model.json").read_text())
    assert {e["name"] for e in model["entities"]} == {n for s, n in SOURCE_TABLES if s == "d365"}


def test_initial_sync_is_stamped_after_end_and_increment_later(small_lake):
    folders = sync_folders(small_lake, "d365")
    stamps = [datetime.strptime(f.name, SYNC_TS_FORMAT) for f in folders]
    assert len(stamps) == 2 and stamps[0] < stamps[1]
    assert stamps[0].date().isoformat() == "2026-01-01"
    assert [f.name for f in sync_folders(small_lake, "dataverse")] == [f.name for f in folders]


def test_malformed_rows_are_counted_as_recorded(small_lake):
    meta = read_meta(small_lake.truth)
    first = sync_folders(small_lake, "d365")[0]
    for table, kinds in meta["malformed"]["d365"].items():
        decl = source_table("d365", table)
        rows = read_rows(first, table)
        wrong = sum(len(r) != len(decl.names) for r in rows)
        assert wrong == kinds.get("wrong_columns", 0), table
    total = sum(sum(k.values()) for k in meta["malformed"]["d365"].values())
    rows = sum(meta["rows"]["d365"].values())
    assert 0.0005 < total / rows < 0.005
    for table in ("salesline", "salestable", "retailtransactiontable"):
        decl = source_table("d365", table)
        rows = frame(first, "d365", table)
        bad = pd.Series(False, index=rows.index)
        for col in decl.columns:
            cells = rows[col.name]
            if col.cdm_type == "decimal":
                parsed = pd.to_numeric(cells, errors="coerce")
            elif col.cdm_type == "dateTime":
                parsed = pd.to_datetime(cells, errors="coerce", utc=True, format="ISO8601")
            else:
                continue
            bad |= parsed.isna() & (cells != "")
        recorded = meta["malformed"]["d365"].get(table, {})
        assert bad.sum() == recorded.get("bad_amount", 0) + recorded.get("bad_date", 0), table


def test_duplicates_deletes_and_orphans_are_present(small_lake):
    meta = read_meta(small_lake.truth)
    first = sync_folders(small_lake, "d365")[0]
    lines = read_rows(first, "salesline")
    dup = sum(c - 1 for c in Counter(map(tuple, lines)).values() if c > 1)
    assert dup >= meta["duplicates"]["d365"]["salesline"] > 0
    sl = frame(first, "d365", "salesline")
    assert (sl.IsDelete == "True").sum() > 0
    st = frame(first, "d365", "salestable")
    assert (~sl.salesid.isin(st.salesid)).sum() > 0  # orphan lines
    # cancellations arrive later as a new version of the header
    versions = st[st.IsDelete == "False"].groupby("salesid").salesstatus.agg(list)
    assert any(v[0] == "1" and "4" in v[1:] for v in versions)
    assert set(st.retailchanneltable.unique()) <= {str(ONLINE_CHANNEL), str(CALL_CENTER_CHANNEL)}
    assert (pd.to_numeric(sl.salesqty, errors="coerce") < 0).any()  # return lines


def test_party_model_joins(small_lake):
    first = sync_folders(small_lake, "d365")[0]
    cust = frame(first, "d365", "custtable")
    party = frame(first, "d365", "dirpartytable")
    names = frame(first, "d365", "dirpersonname")
    elec = frame(first, "d365", "logisticselectronicaddress")
    assert cust.party.isin(party.recid).mean() > 0.99
    assert set(party.instancerelationtype) == {"13271", "2077"}
    email = elec[elec.type == "2"]
    phone = elec[elec.type == "1"]
    assert party.primarycontactemail.isin(email.recid).mean() > 0.99
    assert (
        party[party.primarycontactphone != "0"].primarycontactphone.isin(phone.recid).mean() > 0.99
    )
    assert email.locator.str.contains("@").all() and not phone.locator.str.contains("@").any()
    assert (names.validto == "2154-12-31T23:59:59Z").mean() > 0.9
    renamed = names.groupby("person").recid.nunique()
    assert (renamed == 2).sum() > 0


def test_contacts_are_dirty_and_overlap_commerce(small_lake):
    keys = pd.read_parquet(small_lake.truth / "person_keys.parquet")
    per = keys.groupby("person_id").source.agg(lambda s: Counter(s))
    two_accounts = per.map(lambda c: c["d365"] == 2).sum()
    contact_only = per.map(lambda c: c["dataverse"] == 1 and c["d365"] == 0).sum()
    commerce_only = per.map(lambda c: c["d365"] >= 1 and c["dataverse"] == 0).sum()
    both = per.map(lambda c: c["d365"] >= 1 and c["dataverse"] == 1).sum()
    assert min(two_accounts, contact_only, commerce_only) > 0 and both > commerce_only
    first = sync_folders(small_lake, "dataverse")[0]
    contacts = frame(first, "dataverse", "contact")
    email = contacts.emailaddress1[contacts.emailaddress1 != ""]
    assert (email != email.str.strip()).any() and (email != email.str.lower()).any()
    phone = contacts.telephone1[contacts.telephone1 != ""]
    assert phone.str.startswith("(").any() and phone.str.startswith("+1").any()
    assert phone.str.contains(r"^\d{3}\.\d{3}\.\d{4}$").any()
    assert (contacts.firstname == "").any()
    assert {"True", "False"} <= set(contacts.donotbulkemail)
    incidents = frame(first, "dataverse", "incident")
    assert (~incidents.customerid.isin(contacts.contactid)).sum() > 0  # unlinked cases
    assert set(incidents.statecode) >= {"0", "1", "2"}


def test_truth_purchases_reach_landing(small_lake):
    buys = pd.read_parquet(small_lake.truth / "purchases.parquet")
    sales = buys[buys.order_id.str.startswith("SO:")]
    folders = sync_folders(small_lake, "d365")
    st = pd.concat(frame(f, "d365", "salestable") for f in folders)
    landed = set("SO:" + st.dataareaid + "-" + st.salesid)
    assert sales.order_id.isin(landed).mean() > 0.995  # late rows may still be in flight
    pos = buys[buys.order_id.str.startswith("POS:")]
    rt = pd.concat(frame(f, "d365", "retailtransactiontable") for f in folders)
    assert pos.order_id.str[4:].isin(set(rt.transactionid)).mean() > 0.995
    assert (rt.custaccount == "").sum() > 0  # anonymous walk-ins, not in the truth
    generic = pd.read_csv(small_lake.lake / "landing" / "generic" / "transactions.csv")
    assert list(generic.columns) == [
        "customer_id",
        "timestamp",
        "amount",
        "order_id",
        "product_id",
        "is_return",
    ]
    assert generic.order_id.isin(set(buys.order_id)).all()


def test_increment_deletes_erased_persons(small_lake):
    erased = pd.read_parquet(small_lake.truth / "erased.parquet")
    assert len(erased) >= 1 and (erased.increment == 1).all()
    keys = pd.read_parquet(small_lake.truth / "person_keys.parquet")
    mine = keys[keys.person_id.isin(erased.person_id)]
    inc = sync_folders(small_lake, "d365")[1]
    cust = frame(inc, "d365", "custtable")
    deleted = set(
        cust[cust.IsDelete == "True"].dataareaid + "-" + cust[cust.IsDelete == "True"].accountnum
    )
    assert set(mine[mine.source == "d365"].source_key) <= deleted | set()
    contacts = frame(sync_folders(small_lake, "dataverse")[1], "dataverse", "contact")
    gone = set(contacts[contacts.IsDelete == "True"].contactid)
    assert set(mine[mine.source == "dataverse"].source_key) <= gone
    meta = read_meta(small_lake.truth)
    assert len(meta["increments"]) == 1 and len(meta["cuts"]) == 2
    buys = pd.read_parquet(small_lake.truth / "purchases.parquet")
    assert buys.ts.max() >= pd.Timestamp("2026-01-01", tz="UTC")


def test_bad_input_is_refused(tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(ValueError, match="customers must be at least 1"):
        generate_lake(settings, customers=0)
    with pytest.raises(ValueError, match="must be after start"):
        generate_lake(settings, customers=10, start="2025-01-01", end="2024-01-01")
    with pytest.raises(FileNotFoundError, match="no generated lake"):
        generate_increment(settings)
    generate_lake(settings, customers=50, seed=1)
    with pytest.raises(ValueError, match="already exists"):
        generate_lake(settings, customers=50, seed=1)
    (settings.lake / "silver").mkdir(parents=True)
    generate_lake(settings, customers=50, seed=2, fresh=True)
    assert not (settings.lake / "silver").exists()
