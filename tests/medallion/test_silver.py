"""Silver: change feed resolved, standardised, validated, merged incrementally."""

from __future__ import annotations

import pytest

from c360ml.medallion.checks import OLD_REASON
from c360ml.medallion.ingest import ingest_landing
from c360ml.medallion.silver import build_silver, normalise_phone, purge_accounting
from c360ml.schemas import QUARANTINE_REASON
from c360ml.storage.lake import Lake
from tests.conftest import write_sync_folder


def _contact(
    cid: str,
    version: int,
    email: str | None = "A@x.com",
    delete: bool = False,
    created: str | None = "2023-01-01T00:00:00Z",
    phone: str = "(212) 555-0147",
):
    return {
        "Id": cid,
        "SinkModifiedOn": f"2024-01-0{version}T00:00:00Z",
        "versionnumber": version,
        "IsDelete": "True" if delete else "False",
        "contactid": cid,
        "firstname": " Ann ",
        "lastname": "Lee",
        "emailaddress1": email,
        "telephone1": phone,
        "createdon": created,
        "address1_country": "usa",
        "donotemail": "False",
    }


def _silver(settings, table):
    rows = Lake(settings.lake).read_pandas("silver", table)
    return rows.set_index("contactid") if table == "contact" else rows


def _run(settings):
    ingest_landing(settings)
    return {r.table: r for r in build_silver(settings).items}


def test_latest_version_wins_delete_removes_duplicates_collapse(settings):
    landing = Lake(settings.lake).path("landing")
    rows = [
        _contact("c1", 1, email="old@x.com"),
        _contact("c1", 2, email="  New@X.com "),
        _contact("c1", 2, email="  New@X.com "),  # exact duplicate change row
        _contact("c2", 1),
        _contact("c2", 2, delete=True),
        _contact("c3", 1, phone="not a phone"),
    ]
    write_sync_folder(landing, "dataverse", "2024-01-05T00.00.00Z", {"contact": rows})
    result = _run(settings)["contact"]
    silver = _silver(settings, "contact")
    assert sorted(silver.index) == ["c1", "c3"]
    assert silver.loc["c1", "emailaddress1"] == "new@x.com"
    assert silver.loc["c1", "firstname"] == "Ann"
    assert silver.loc["c1", "telephone1"] == "+12125550147"
    assert silver.loc["c3", "telephone1"] == "not a phone"  # kept as given, not guessed
    assert silver.loc["c1", "address1_country"] == "US"
    assert (result.bronze_current, result.silver_rows, result.quarantined) == (2, 2, 0)


def test_rejected_row_goes_to_quarantine_with_its_check(settings):
    landing = Lake(settings.lake).path("landing")
    write_sync_folder(
        landing,
        "dataverse",
        "2024-01-05T00.00.00Z",
        {"contact": [_contact("c1", 1), _contact("c2", 1, created=None)]},
    )
    result = _run(settings)["contact"]
    q = Lake(settings.lake).read_pandas("quarantine", "silver", "contact")
    assert list(q["contactid"]) == ["c2"]
    assert q[QUARANTINE_REASON].iloc[0] == "createdon: not_nullable"
    assert result.bronze_current == result.silver_rows + result.quarantined == 2


def test_incremental_merge_applies_updates_deletes_and_fixes(settings):
    landing = Lake(settings.lake).path("landing")
    write_sync_folder(
        landing,
        "dataverse",
        "2024-01-05T00.00.00Z",
        {
            "contact": [
                *(_contact(c, 1) for c in ("c1", "c2")),
                *(_contact(f"k{i}", 1) for i in range(10)),  # untouched: the file stays
                _contact("c3", 1, created=None),
            ]
        },
    )
    _run(settings)
    version = Lake(settings.lake).version("silver", "contact")
    assert _run(settings)["contact"].new_bronze_rows == 0  # nothing new: no new commit
    assert Lake(settings.lake).version("silver", "contact") == version
    write_sync_folder(
        landing,
        "dataverse",
        "2024-01-06T00.00.00Z",
        {
            "contact": [
                _contact("c1", 3, email="b@x.com"),
                _contact("c2", 2, delete=True),
                _contact("c3", 2),
                _contact("c1", 2, email="stale@x.com"),
            ]
        },
    )  # late, older version
    lake = Lake(settings.lake)
    files = set(lake.delta("silver", "contact").file_uris())
    result = _run(settings)["contact"]
    silver = _silver(settings, "contact")
    assert sorted(silver.index) == ["c1", "c3", *(f"k{i}" for i in range(10))]
    assert silver.loc["c1", "emailaddress1"] == "b@x.com"
    assert result.quarantined == 0 and result.balanced
    # merge on read: the replaced and deleted rows are hidden, their file is not rewritten
    assert files <= set(lake.delta("silver", "contact").file_uris())
    assert sum(len(r) for r in lake.live_files("silver", "contact")[1].values()) == 2  # c1, c2
    # a version older than silver's, alone in a later sync, changes nothing
    write_sync_folder(
        landing,
        "dataverse",
        "2024-01-07T00.00.00Z",
        {"contact": [_contact("c3", 1, email="older@x.com")]},
    )
    result = _run(settings)["contact"]
    assert _silver(settings, "contact").loc["c3"].equals(silver.loc["c3"])
    assert result.balanced and result.silver_rows == 12


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("(212) 555-0147", "+12125550147"),
        ("+1 212 555 0147", "+12125550147"),
        ("212.555.0147", "+12125550147"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_phone_formats_normalise_to_e164(raw, e164):
    assert normalise_phone(raw) == e164


def test_vectorised_phone_path_agrees_with_phonenumbers():
    import numpy as np
    import pandas as pd

    from c360ml.medallion.silver import normalise_phones

    rng = np.random.default_rng(0)
    digits = [f"{n:010d}" for n in rng.integers(0, 10**10, 3000)]
    formats = [
        lambda d: d,
        lambda d: f"({d[:3]}) {d[3:6]}-{d[6:]}",
        lambda d: f"+1 {d[:3]} {d[3:6]} {d[6:]}",
        lambda d: f"{d[:3]}.{d[3:6]}.{d[6:]}",
        lambda d: f"1-{d[:3]}-{d[3:6]}-{d[6:]}",
        lambda d: f"+44 {d[:4]} {d[4:]}",
        lambda d: d[:7],
        lambda d: f"x{d}",
    ]
    raw = pd.Series([formats[i % len(formats)](d) for i, d in enumerate(digits)] + [None])
    fast = normalise_phones(raw)
    slow = raw.map(normalise_phone, na_action="ignore")
    assert fast.isna().sum() == 1
    mismatch = raw[(fast != slow) & raw.notna()]
    assert mismatch.empty, mismatch.head()


def test_padded_keys_are_one_key_in_silver_and_in_the_accounting(settings):
    """Bronze keeps keys as exported; " c1" and "c1" are one key for the resolution and
    for the recount of bronze's current rows alike, so the accounting still balances."""
    from c360ml.medallion.silver import bronze_current_rows
    from c360ml.sources.tables import source_table

    landing = Lake(settings.lake).path("landing")
    rows = [_contact("c1", 1), _contact(" c1 ", 2, email="new@x.com"), _contact("c2", 1)]
    write_sync_folder(landing, "dataverse", "2024-01-05T00.00.00Z", {"contact": rows})
    result = _run(settings)["contact"]
    silver = _silver(settings, "contact")
    assert sorted(silver.index) == ["c1", "c2"]
    assert silver.loc["c1", "emailaddress1"] == "new@x.com"
    recount = bronze_current_rows(Lake(settings.lake), source_table("dataverse", "contact"))
    assert recount == result.bronze_current == result.silver_rows + result.quarantined == 2


def test_locator_standardised_by_its_type():
    """E-mails lower-cased, phones in E.164, other types (and no type) as they are."""
    import pyarrow as pa

    from c360ml.medallion.silver import EMAIL_TYPE, PHONE_TYPE, SILVER_SCHEMAS, standardise

    table = pa.table(
        {
            "type": pa.array([EMAIL_TYPE, PHONE_TYPE, 3, None, PHONE_TYPE, EMAIL_TYPE]),
            "locator": ["Ann@X.com", "(212) 555-0147", "WWW.X.COM", "Ann@X.com", None,
                        "+1 212 555 0147"],
        }
    )  # fmt: skip
    out = standardise(table, SILVER_SCHEMAS["logisticselectronicaddress"])["locator"].to_pylist()
    assert out == ["ann@x.com", "+12125550147", "WWW.X.COM", "Ann@X.com", None,
                   "+1 212 555 0147"]  # fmt: skip


def test_quarantine_written_before_the_reason_was_renamed_takes_new_rows(settings):
    """A lake from before #23 has `_reason` in silver's quarantine; the next merge renames
    it (same rows) before it merges into the table by position."""
    lake = Lake(settings.lake)
    landing = lake.path("landing")
    rows = {"contact": [_contact("c1", 1), _contact("c2", 1, created=None)]}
    write_sync_folder(landing, "dataverse", "2024-01-05T00.00.00Z", rows)
    _run(settings)
    where = ("quarantine", "silver", "contact")
    old = lake.read(*where)
    old = old.rename_columns(
        [OLD_REASON if n == QUARANTINE_REASON else n for n in old.column_names]
    )
    lake.write(old, *where, mode="overwrite")
    later = {"contact": [_contact("c3", 1, created=None), _contact("c4", 1)]}
    write_sync_folder(landing, "dataverse", "2024-01-06T00.00.00Z", later)
    result = _run(settings)["contact"]
    q = lake.read_pandas(*where).set_index("contactid")
    assert OLD_REASON not in q.columns
    assert q[QUARANTINE_REASON].to_dict() == {
        "c2": "createdon: not_nullable",
        "c3": "createdon: not_nullable",
    }
    assert (result.silver_rows, result.quarantined, result.bronze_current) == (2, 2, 4)


def test_bronze_rewritten_by_an_erasure_is_not_new_again(settings):
    """An erasure rewrites the bronze files that held the person's rows; the other rows of
    those files were merged already. Read again as new, c2's first version (its delete
    marker lives in a later, untouched file) would be resurrected in silver."""
    lake = Lake(settings.lake)
    landing = lake.path("landing")
    write_sync_folder(
        landing,
        "dataverse",
        "2024-01-05T00.00.00Z",
        {"contact": [_contact("c1", 1), _contact("c2", 1)]},
    )
    _run(settings)
    write_sync_folder(
        landing, "dataverse", "2024-01-06T00.00.00Z", {"contact": [_contact("c2", 2, delete=True)]}
    )
    _run(settings)
    assert sorted(_silver(settings, "contact").index) == ["c1"]
    # the erasure's bronze rewrite (c360ml.medallion.erasure deletes c1's rows from both layers)
    lake.delta("bronze", "dataverse", "contact").delete("contactid = 'c1'")
    accounting = purge_accounting(lake, "contact")
    lake.delta("silver", "contact").delete("contactid = 'c1'", commit_properties=accounting)
    write_sync_folder(
        landing, "dataverse", "2024-01-07T00.00.00Z", {"contact": [_contact("c3", 1)]}
    )
    result = _run(settings)["contact"]
    assert sorted(_silver(settings, "contact").index) == ["c3"]
    assert result.new_bronze_rows == 1  # only the new sync's row, not the rewritten file's


def test_first_build_resolution_ranks_only_repeated_keys_as_a_window_would():
    """The first build's resolution (single-row keys passed through, repeated keys
    ranked by key, version and position, the winners fetched by position) gives what
    one window over the whole feed gives: trimmed keys, versions then SinkModifiedOn,
    null keys one group."""
    import pyarrow as pa

    from c360ml.medallion.silver import _resolve_sql
    from c360ml.medallion.sql import duckdb_connection
    from c360ml.sources.tables import SOURCE_TABLES

    feed = pa.table(
        {
            "contactid": ["K1", "K2", " K2", "K2", "K3", "K3", None, "", "K4"],
            "versionnumber": [1, 1, 3, 2, 5, 5, 1, 2, 1],
            "SinkModifiedOn": pa.array([1, 1, 1, 9, 1, 2, 1, 1, 1], pa.int64()).cast(
                pa.timestamp("s", tz="UTC")
            ),
            "tag": ["k1", "k2v1", "k2v3", "k2v2", "k3a", "k3b", "n1", "n2", "k4"],
        }
    )
    con = duckdb_connection()
    con.register("feed", feed)
    positions = {
        "filename": ["a.parquet"] * 5 + ["b.parquet"] * 4,
        "file_row_number": [*range(5), *range(4)],
    }
    positioned = feed
    for name, values in positions.items():
        positioned = positioned.append_column(name, pa.array(values))
    con.register("positioned", positioned)
    got = con.sql(_resolve_sql(SOURCE_TABLES[("dataverse", "contact")], "positioned"))
    window = con.sql(
        """SELECT * EXCLUDE (_rn) FROM (SELECT *, ROW_NUMBER() OVER (
             PARTITION BY NULLIF(TRIM(contactid), '')
             ORDER BY versionnumber DESC, "SinkModifiedOn" DESC) AS _rn FROM feed)
           WHERE _rn = 1"""
    )
    assert sorted(got.fetchall()) == sorted(window.fetchall())
    assert sorted(r[0] for r in got.select("tag").fetchall()) == ["k1", "k2v3", "k3b", "k4", "n2"]


def _incident(key: str, version: int, created: str | None = "2024-01-01T00:00:00Z", state=0):
    return {
        "Id": key,
        "SinkModifiedOn": f"2024-02-0{version}T00:00:00Z",
        "versionnumber": version,
        "IsDelete": "False",
        "incidentid": key,
        "customerid": "c1",
        "title": f"case {key} v{version}",
        "createdon": created,
        "statecode": state,
    }


def test_a_merge_killed_at_any_commit_is_finished_by_the_next_build(settings, tmp_path):
    """A merge is one unit in three commits (change log, silver, quarantine): killed after
    any of them (the lake cut back to that commit), the next build leaves silver, its
    quarantine and the change log as a build that was not killed, and the accounting
    balances. (Before, a kill after silver's commit left the quarantine without the
    merge's rejects for good, and one after the log's logged the changes twice.)"""
    import shutil

    from tests import crash

    landing = Lake(settings.lake).path("landing")
    first = [_incident("i1", 1), _incident("i2", 1)]
    write_sync_folder(landing, "dataverse", "2024-02-01T00.00.00Z", {"incident": first})
    _run(settings)
    second = [
        _incident("i1", 2),
        _incident("i3", 2),
        _incident("i4", 2, created=None),
        _incident("i2", 2, state=None),
    ]  # fmt: skip (i2 is rejected now)
    write_sync_folder(landing, "dataverse", "2024-02-02T00.00.00Z", {"incident": second})
    ingest_landing(settings)
    before = set(crash.commit_files(settings.lake))
    build_silver(settings)
    made = crash.commit_points(settings.lake, before)
    layers = ("silver", "quarantine", "state")
    want = crash.tables(settings.lake, layers)
    assert len(want["quarantine/silver/incident"]) == 2  # i2, i4
    assert len(want["state/silver/incident_changes"]) == 4  # i1-i4 at the new version
    for i, point in enumerate(made[:-1]):
        killed = settings.model_copy(update={"lake_root": tmp_path / f"killed{i}"})
        shutil.copytree(settings.lake, killed.lake)
        crash.cut_after(killed.lake, made, point)
        result = {r.table: r for r in build_silver(killed).items}["incident"]
        assert result.balanced, (point, result)
        assert crash.differences(want, crash.tables(killed.lake, layers)) == [], point
        assert crash.accounting(killed.lake) == [], point
