"""Erasure: a person deleted at the source leaves no row in any table's files.

A source record is erased when its newest bronze version is a delete (IsDelete) and it
was in the previous source map; a customer_id is erased when all of its records are
(and no merge redirected it). The refresh then deletes those rows from the bronze
change feed and silver (the person's customer, party, name, address and e-mail/phone
rows; the contact), from the history tables keyed by customer_id, from quarantine (a row
or rejected line with one of the person's identifiers) and the journey exports, and
vacuums. Not purged: orders (kept, as the business record, under no customer once the
account is gone).

Retention: once anyone is erased, every bronze, silver, gold and state table is vacuumed with
retention 0 hours, so older versions (which still hold the rows: the ones this purge
rewrote, and those of tables rebuilt or merged since the last refresh) are removed at
once; time travel to before an erasure is deliberately impossible. The journey exports
lose the erased customers' rows too, and quarantine its rows and lines that name them. Delete markers (key
only, no personal data) are kept in bronze so that an older change arriving late cannot
bring the record back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import duckdb
import pandas as pd

from c360ml.lake import Lake
from c360ml.medallion.silver import purge_accounting
from c360ml.unify import STATE

log = logging.getLogger(__name__)

HISTORY = {  # gold tables keyed by a customer id column
    "churn_scores": "CustomerId",
    "customer_features": "customer_id",
    "customer_measures": "customer_id",
    "segment_membership": "customer_id",
}


@dataclass
class ErasureResult:
    source_keys: list[tuple[str, str]] = field(default_factory=list)
    customer_ids: list[str] = field(default_factory=list)
    rows_deleted: dict[str, int] = field(default_factory=dict)


def erased_records(lake: Lake, previous_map: pd.DataFrame) -> pd.DataFrame:
    """(source, source_key) of previously mapped records whose newest version is a delete."""
    con = duckdb.connect()
    parts = []
    if lake.exists("bronze", "d365", "custtable"):
        con.register("cust", lake.dataset("bronze", "d365", "custtable"))
        parts.append("""SELECT 'd365' AS source, CONCAT(dataareaid, '-', accountnum) AS source_key,
                               IsDelete FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY recid
                               ORDER BY versionnumber DESC, SinkModifiedOn DESC) AS rn FROM cust)
                        WHERE rn = 1 AND accountnum IS NOT NULL""")
    if lake.exists("bronze", "dataverse", "contact"):
        con.register("contact", lake.dataset("bronze", "dataverse", "contact"))
        parts.append("""SELECT 'dataverse', contactid, IsDelete FROM (SELECT *, ROW_NUMBER() OVER
                        (PARTITION BY contactid ORDER BY versionnumber DESC, SinkModifiedOn DESC)
                        AS rn FROM contact) WHERE rn = 1""")
    if not parts:
        return pd.DataFrame(columns=["source", "source_key"])
    latest = con.sql(" UNION ALL ".join(parts)).df()
    deleted = latest[latest["IsDelete"].fillna(False).astype(bool)][["source", "source_key"]]
    return deleted.merge(previous_map[["source", "source_key"]], on=["source", "source_key"])


def erased_customers(
    previous_map: pd.DataFrame,
    current_map: pd.DataFrame,
    redirects: pd.DataFrame,
    erased: pd.DataFrame,
) -> list[str]:
    """Previous ids all of whose records were erased, and that no merge redirected."""
    gone = previous_map.merge(erased, on=["source", "source_key"], how="left", indicator=True)
    gone["erased"] = gone["_merge"] == "both"
    fully = gone.groupby("customer_id")["erased"].all()
    ids = set(fully[fully].index) - set(current_map["customer_id"]) - set(redirects["retired_id"])
    return sorted(ids)


def purge(lake: Lake, erased: pd.DataFrame, customer_ids: list[str]) -> ErasureResult:
    """Delete the erased rows everywhere they live, then vacuum every table."""
    result = ErasureResult(list(erased.itertuples(index=False, name=None)), customer_ids)
    if erased.empty and not customer_ids:
        return result
    for table, column in HISTORY.items():
        if lake.exists("gold", table) and customer_ids:
            _delete(lake, ("gold", table), column, customer_ids, result)
    for parts in lake.tables("gold"):  # gold/orders' rows of the erased, replaced by a patch
        if customer_ids and "customer_id" in lake.schema("gold", *parts).names:
            lake.purge_deleted("gold", *parts, holding=("customer_id", customer_ids))
    if lake.exists(*STATE) and not erased.empty:  # the erased records' rows unify hid
        lake.purge_deleted(*STATE, holding=("source_key", erased["source_key"].tolist()))
    d365 = erased.loc[erased["source"] == "d365", "source_key"].tolist()
    contacts = erased.loc[erased["source"] == "dataverse", "source_key"].tolist()
    identifiers = _identifiers(lake, d365, contacts)  # read before their rows go
    if d365:
        _purge_commerce(lake, d365, result)
    if contacts and lake.exists("bronze", "dataverse", "contact"):
        _delete(
            lake,
            ("bronze", "dataverse", "contact"),
            "contactid",
            contacts,
            result,
            keep_markers=True,
        )
    if contacts and lake.exists("silver", "contact"):
        _delete(lake, ("silver", "contact"), "contactid", contacts, result)
    _purge_exports(lake, customer_ids, contacts, result)
    _purge_quarantine(lake, identifiers | set(customer_ids), result)
    _vacuum_all(lake)
    return result


def _identifiers(lake: Lake, accounts: list[str], contacts: list[str]) -> set[str]:
    """The erased records' unique identifiers as they are spelled in a source line: account
    numbers, contact ids, e-mail addresses and phone numbers (names are shared by other
    people, so a line is never matched on a name)."""
    found = {k.split("-", 1)[-1] for k in accounts} | set(contacts)
    con = duckdb.connect()
    if contacts and lake.exists("bronze", "dataverse", "contact"):
        con.register("contact", lake.dataset("bronze", "dataverse", "contact"))
        con.register("keys", pd.DataFrame({"k": contacts}))
        rows = con.sql("""SELECT emailaddress1, telephone1, mobilephone FROM contact
                          WHERE contactid IN (SELECT k FROM keys)""").df()
        found |= {str(v) for v in rows.to_numpy().ravel() if isinstance(v, str) and v}
    tables = ("custtable", "dirpartytable", "logisticselectronicaddress")
    if accounts and all(lake.exists("bronze", "d365", t) for t in tables):
        for name in tables:
            con.register(name, lake.dataset("bronze", "d365", name))
        con.register("keys", pd.DataFrame({"k": accounts}))
        rows = con.sql("""SELECT e.locator FROM custtable c
                          JOIN dirpartytable p ON p.recid = c.party
                          JOIN logisticselectronicaddress e
                            ON e.recid IN (p.primarycontactemail, p.primarycontactphone)
                          WHERE CONCAT(c.dataareaid, '-', c.accountnum) IN (SELECT k FROM keys)""").df()
        found |= {v for v in rows["locator"] if isinstance(v, str) and v}
    return found


def _purge_quarantine(lake: Lake, identifiers: set[str], result: ErasureResult) -> None:
    """Quarantined rows are personal data too: a rejected source line (kept verbatim) goes
    when one of its fields is an erased person's identifier, and a quarantined silver or
    gold row when one of its values is."""
    if not identifiers:
        return
    for parts in lake.tables("quarantine"):
        frame = lake.read_pandas("quarantine", *parts)
        if frame.empty:
            continue
        if "_raw" in frame:  # a line that could not be parsed: its comma-separated fields
            fields = frame["_raw"].fillna("").str.split(",")
            hit = fields.map(lambda f: bool(identifiers & {v.strip().strip('"') for v in f}))
        else:
            text = frame.select_dtypes(include=["object", "string"])
            hit = text.isin(identifiers).any(axis=1)
        if hit.any():
            lake.write(frame.loc[~hit.to_numpy()], "quarantine", *parts, mode="overwrite")
            result.rows_deleted["quarantine/" + "/".join(parts)] = int(hit.sum())
            log.info("erasure: %d quarantined rows of %s", int(hit.sum()), "/".join(parts))


def _purge_exports(
    lake: Lake, customer_ids: list[str], contacts: list[str], result: ErasureResult
) -> None:
    """The journey exports (CSV handed to Customer Insights - Journeys) lose the erased
    customers' and contacts' rows at once: the segment step may not run before the next
    refresh (no endpoint), and until then the files would still name them. Each file is
    replaced whole (written beside, then renamed). The CI-D snapshot is rewritten by every
    refresh from the purged scores."""
    folder = lake.path("export", "journeys")
    if not folder.exists() or not (customer_ids or contacts):
        return
    ids, keys = set(customer_ids), set(contacts)
    for path in sorted(folder.glob("*.csv")):
        export = pd.read_csv(path, dtype=str)
        gone = export.get("CustomerId", pd.Series(dtype=str)).isin(ids)
        gone |= export.get("ContactId", pd.Series(dtype=str)).isin(keys)
        if gone.any():
            tmp = path.with_suffix(".tmp")
            export.loc[~gone].to_csv(tmp, index=False)
            tmp.replace(path)
            result.rows_deleted[f"export/journeys/{path.name}"] = int(gone.sum())


def _vacuum_all(lake: Lake) -> None:
    """Remove the files no live version needs, in every bronze, silver, gold, state and
    quarantine table (unify's state holds source keys; its rows of the erased were purged
    above).

    The person is also in files this purge did not rewrite: older versions of tables that
    were rebuilt (gold) or merged (silver applied the source's own delete) since. Nothing
    in c360ml reads an older version's data (silver compares bronze file lists from the
    log only), so they go at once.
    """
    for layer in ("bronze", "silver", "gold", "state", "quarantine"):
        for parts in lake.tables(layer):
            lake.delta(layer, *parts).vacuum(
                retention_hours=0, enforce_retention_duration=False, dry_run=False
            )


def _purge_commerce(lake: Lake, keys: list[str], result: ErasureResult) -> None:
    """The account's rows and those of its party, names, addresses and e-mail/phone."""
    con = duckdb.connect()
    for name in ("custtable", "dirpartytable"):
        if lake.exists("bronze", "d365", name):
            con.register(name, lake.dataset("bronze", "d365", name))
    con.register("erased_keys", pd.DataFrame({"k": keys}))
    accounts = con.sql("""SELECT DISTINCT recid, party FROM custtable
                          WHERE CONCAT(dataareaid, '-', accountnum) IN (SELECT k FROM erased_keys)""").df()
    parties = accounts["party"].dropna().astype("int64").tolist()
    refs = con.sql(f"""SELECT DISTINCT primaryaddresslocation, primarycontactemail, primarycontactphone
                       FROM dirpartytable WHERE recid IN ({",".join(map(str, parties)) or "NULL"})""").df()
    plan = {
        "custtable": ("recid", accounts["recid"].tolist()),
        "dirpartytable": ("recid", parties),
        "dirpersonname": ("person", parties),
        "logisticspostaladdress": ("location", _ints(refs["primaryaddresslocation"])),
        "logisticslocation": ("recid", _ints(refs["primaryaddresslocation"])),
        "logisticselectronicaddress": (
            "recid",
            _ints(refs["primarycontactemail"]) + _ints(refs["primarycontactphone"]),
        ),
    }
    for table, (column, values) in plan.items():
        if values and lake.exists("bronze", "d365", table):
            _delete(lake, ("bronze", "d365", table), column, values, result, keep_markers=True)
        if values and lake.exists("silver", table):  # rows the source did not send deletes for
            _delete(lake, ("silver", table), column, values, result)


def _ints(values: pd.Series) -> list[int]:
    return values.dropna().astype("int64").tolist()


def _delete(
    lake: Lake,
    where: tuple[str, ...],
    column: str,
    values: list,
    result: ErasureResult,
    keep_markers: bool = False,
) -> None:
    quoted = ", ".join(f"'{v}'" if isinstance(v, str) else str(int(v)) for v in values)
    predicate = f"{column} IN ({quoted})"
    if keep_markers:  # a delete marker carries the key only: keep it, drop the data
        predicate += " AND (IsDelete IS NULL OR NOT IsDelete)"
    # Rows a silver merge replaced are hidden by deletion vectors but still in their files
    # (the person's older versions among them): rewritten without them first.
    lake.purge_deleted(*where)
    table = lake.delta(*where)
    metrics = table.delete(
        predicate,
        commit_properties=(
            purge_accounting(lake, where[1], column, values) if where[0] == "silver" else None
        ),
    )
    deleted = int(metrics.get("num_deleted_rows", 0))
    result.rows_deleted["/".join(where)] = deleted
    log.info("erasure: %d rows deleted from %s", deleted, "/".join(where))
