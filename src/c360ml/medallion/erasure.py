"""Erasure: a person deleted at the source leaves no row in any file of c360ml.

A source record is erased when its newest bronze version is a delete (IsDelete) and it
was in the previous source map; a customer_id is erased when all of its records are
(and no merge redirected it). The refresh then deletes those rows from the bronze
change feed and silver (the person's customer, party, name, address and e-mail/phone
rows; the contact and the support cases they raised), from the history tables keyed by
customer_id, from quarantine (a row or rejected line with one of the person's
identifiers) and the journey exports. Not purged: orders (kept, as the business record,
under no customer once the account is gone). Delete markers are kept in bronze under a
pseudonym of their key (see `PSEUDONYM`) so that an older change arriving late cannot
bring the record back.

An erasure is a recorded job (`state/erasure/job.json`), written before the first row
goes and removed when the last step is done: a refresh killed anywhere in it finishes
it on its next run, whatever the source map then says. Each step is idempotent, so a
rerun redoes at most the step it was killed in. The job names the persons (it must, to
finish), so it is kept only while pending. Every file the erasure touches outside Delta's
own writes (the record, the journeys exports, the unreferenced data files, the logs) goes
through the lake's store, so a lake in an Azure container is purged as a local one is.

Older versions: the person is also in files no live version uses (the versions this
purge rewrote, and tables rebuilt or merged since) and in the Delta log (file statistics
and the purge's own predicates). Only the unreferenced files that hold an erased
identifier are removed at once; every other file follows the normal retention
(`retention_hours`, see `vacuum`), so readers of a shared lake keep the versions they
read. A table whose log names a person loses its history before the erasure (a
checkpoint of the purged version, then the older log entries), so time travel to
before an erasure is deliberately impossible.

Unify's value frequencies (`state/unify/frequencies`, what a rule's `common` test reads)
hold a hash of each name and postal code with the records carrying it: a rare name's
hash with count 1 links back to its person by a dictionary attack. The values only the
erased records carried (told by the hashes `state/unify/counted` kept of them when the
frequencies were counted) go, with the table's older files holding one and its log (the
`frequencies` step). The counts of values others share stay as counted, so that no
`common` decision of a record left changes. Frequencies whose share cannot be told are
dropped, and the next build counts them again and unifies all records.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from c360ml.config import Settings
from c360ml.medallion.silver import purge_accounting
from c360ml.medallion.unify import (
    COUNT_KEY,
    COUNTED,
    FREQUENCIES,
    FREQUENCY_SCHEMA,
    RECORDS_TOTAL,
    STATE,
    STATE_KEY,
    frequency_sql,
)
from c360ml.storage.inputs import last_record, stamp
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake

log = logging.getLogger(__name__)

HISTORY = {  # gold tables keyed by a customer id column
    "churn_scores": "CustomerId",
    "customer_features": "customer_id",
    "customer_measures": "customer_id",
    "segment_membership": "customer_id",
}
TABLE_LAYERS = ("bronze", "silver", "gold", "state", "quarantine")
# A delete marker keeps its place in the change feed (so an older change arriving late
# cannot bring the record back) under a one-way pseudonym of its key instead of the key:
# `erased_records` hashes the plain keys alike to find a record that came back.
PSEUDONYM = "concat('erased:', encode(sha256({0}), 'hex'))"  # Delta's SQL (DataFusion)
ERASED_KEY = "CASE WHEN starts_with({0}, 'erased:') THEN {0} ELSE 'erased:' || sha256({0}) END"
RAW = "_raw"  # quarantine's column of a source line that could not be parsed
STEPS = ("rows", "frequencies", "exports", "quarantine", "files", "logs")
DROP = "drop"  # ErasureJob.count: the frequencies are dropped, not decremented
JOB = ("state", "erasure", "job.json")  # the pending job's record, in the lake's store


@dataclass
class Delete:
    """One table's rows of the erased: `column IN values`. `keep_markers` keeps bronze's
    delete markers, with their `pseudonymise` column replaced by a pseudonym (see
    `PSEUDONYM`); `hidden_only` rewrites just the files whose deletion vectors hide such
    rows (the live rows were replaced by a build already)."""

    where: list[str]
    column: str
    values: list
    keep_markers: bool = False
    hidden_only: bool = False
    pseudonymise: str = ""


@dataclass
class ErasureJob:
    customer_ids: list[str]
    source_keys: list[list[str]]  # (source, key)
    identifiers: list[str]  # contact ids, account numbers, e-mails, phones as spelled
    deletes: list[Delete]
    done: list[str] = field(default_factory=list)
    # The unify value frequencies' share of the erased records: (field, value hash, count)
    # rows; a value whose count `count` (COUNT_KEY) of `FREQUENCIES` is theirs goes; DROP:
    # the frequencies are dropped instead, "": left as they are (see `_frequency_decrement`).
    frequencies: list[list] = field(default_factory=list)
    count: str = ""

    @property
    def unique(self) -> set[str]:
        """The values that name one person: customer ids, source keys, contact ids,
        e-mails and phones (a bare account number can be another company's, and names
        are shared by other people)."""
        accounts = {k.split("-", 1)[-1] for s, k in self.source_keys if s == "d365"}
        return (
            (set(self.identifiers) - accounts)
            | set(self.customer_ids)
            | {k for _, k in self.source_keys}
        )


@dataclass
class ErasureResult:
    source_keys: list[tuple[str, str]] = field(default_factory=list)
    customer_ids: list[str] = field(default_factory=list)
    rows_deleted: dict[str, int] = field(default_factory=dict)
    files_removed: int = 0
    histories_forgotten: int = 0
    resumed: bool = False


def erased_records(lake: Lake, previous_map: pd.DataFrame) -> pd.DataFrame:
    """(source, source_key) of previously mapped records whose newest version is a delete
    (a marker an earlier erasure pseudonymised included: a record that came back)."""
    con = duckdb.connect()
    parts = []
    if lake.exists("bronze", "d365", "custtable"):
        con.register("cust", lake.dataset("bronze", "d365", "custtable"))
        parts.append("""SELECT 'd365' AS source, CONCAT(any_value(dataareaid), '-', any_value(accountnum)
                               FILTER (WHERE NOT starts_with(accountnum, 'erased:'))) AS source_key,
                               arg_max(IsDelete, (versionnumber, SinkModifiedOn)) AS IsDelete
                        FROM cust WHERE accountnum IS NOT NULL GROUP BY recid""")
    if lake.exists("bronze", "dataverse", "contact"):
        con.register("contact", lake.dataset("bronze", "dataverse", "contact"))
        parts.append(f"""SELECT 'dataverse' AS source, any_value(contactid) FILTER (WHERE NOT
                                starts_with(contactid, 'erased:')) AS source_key,
                                arg_max(IsDelete, (versionnumber, SinkModifiedOn)) AS IsDelete
                         FROM contact GROUP BY {ERASED_KEY.format("contactid")}""")
    if not parts:
        return pd.DataFrame(columns=["source", "source_key"])
    deleted = con.sql(
        f"SELECT source, source_key FROM ({' UNION ALL '.join(parts)}) q WHERE IsDelete"
    ).df()
    mapped = previous_map[previous_map["source_key"].isin(deleted["source_key"])]
    return deleted.merge(mapped[["source", "source_key"]], on=["source", "source_key"])


def erased_customers(
    previous_map: pd.DataFrame,
    current_map: pd.DataFrame,
    redirects: pd.DataFrame,
    erased: pd.DataFrame,
) -> list[str]:
    """Previous ids all of whose records were erased, and that no merge redirected (only
    the ids of an erased record are looked at: the maps hold every customer)."""
    touched = previous_map["customer_id"].isin(
        previous_map.loc[previous_map["source_key"].isin(erased["source_key"]), "customer_id"]
    )
    gone = previous_map[touched].merge(
        erased, on=["source", "source_key"], how="left", indicator=True
    )
    gone["erased"] = gone["_merge"] == "both"
    fully = gone.groupby("customer_id")["erased"].all()
    ids = pd.Index(fully[fully].index)
    kept = ids.isin(current_map["customer_id"]) | ids.isin(redirects["retired_id"])
    return sorted(ids[~kept])


# ---------------------------------------------------------------- the job


def plan(lake: Lake, erased: pd.DataFrame, customer_ids: list[str]) -> ErasureJob:
    """Everything to delete, looked up while the rows that lead to it are still there
    (a Commerce account leads to its party, names, addresses and e-mail/phone rows)."""
    d365 = erased.loc[erased["source"] == "d365", "source_key"].tolist()
    contacts = erased.loc[erased["source"] == "dataverse", "source_key"].tolist()
    deletes = [
        Delete(["gold", table], column, customer_ids)
        for table, column in HISTORY.items()
        if customer_ids and lake.exists("gold", table)
    ]
    deletes += [  # gold/orders' rows of the erased, replaced by a patch
        Delete(["gold", *parts], "customer_id", customer_ids, hidden_only=True)
        for parts in lake.tables("gold")
        if customer_ids
        and parts[0] not in HISTORY
        and "customer_id" in lake.schema("gold", *parts).names
    ]
    if not erased.empty and lake.exists(*STATE):  # the erased records' rows unify hid
        deletes.append(
            Delete(list(STATE), "source_key", erased["source_key"].tolist(), hidden_only=True)
        )
    subtract, count = _frequency_decrement(lake, erased)  # read before COUNTED's rows go
    if not erased.empty and lake.exists(*COUNTED):
        deletes.append(Delete(list(COUNTED), "source_key", erased["source_key"].tolist()))
    if d365:
        deletes += _commerce_deletes(lake, d365)
    if contacts:  # the contact, and the support cases they raised (their correspondence)
        deletes += _source_deletes(lake, "dataverse", "contact", "contactid", contacts, "contactid")
        deletes += _source_deletes(lake, "dataverse", "incident", "customerid", contacts)
    return ErasureJob(
        customer_ids=list(customer_ids),
        source_keys=[list(k) for k in erased.itertuples(index=False, name=None)],
        identifiers=sorted(_identifiers(lake, d365, contacts)),
        deletes=deletes,
        frequencies=subtract,
        count=count,
    )


def _count_of(lake: Lake, where: tuple[str, ...]) -> str | None:
    """The count (COUNT_KEY) the table's newest write recording inputs is of: None for one
    that records none (the Spark engine's count)."""
    record = last_record(lake, where)
    return None if record is None else record[1].get(COUNT_KEY)


def _frequency_decrement(lake: Lake, erased: pd.DataFrame) -> tuple[list[list], str]:
    """What the erased records added to the unify value frequencies (`FREQUENCIES`, which a
    build without state counted and later builds keep): the hashes `COUNTED` kept of each
    of them when they were counted, per (field, value), and their number (RECORDS_TOTAL);
    with the count they are of. A record new since the count added nothing. Without a
    `COUNTED` of the same count (a lake from before it was kept, frequencies the Spark
    engine counted, a unify killed between the two writes), what the erased added cannot
    be told: the frequencies are dropped (DROP), and the next build counts them again."""
    if erased.empty or not lake.exists(*FREQUENCIES):
        return [], ""
    count = _count_of(lake, FREQUENCIES)
    if count is None or _count_of(lake, COUNTED) != count:
        log.info("erasure: the kept value frequencies cannot be decremented: dropped")
        return [], DROP
    fields = [n[2:] for n in lake.schema(*COUNTED).names if n.startswith("h_")]
    con = duckdb.connect()
    con.register("counted", lake.dataset(*COUNTED))
    con.register("erased", pa.Table.from_pandas(erased[["source", "source_key"]]))
    con.execute("""CREATE TEMP TABLE e AS
                   SELECT * FROM counted SEMI JOIN erased USING (source, source_key)""")
    rows = con.sql(  # counted as the frequencies were (`frequency_sql`)
        f"SELECT * FROM ({frequency_sql('e', fields)}) q WHERE count > 0 ORDER BY ALL"
    ).fetchall()
    con.close()
    if not rows:  # none of them was counted
        return [], ""
    return [[f, int(v), int(c)] for f, v, c in rows], count


def pending(lake: Lake) -> ErasureJob | None:
    """The job a killed run left unfinished, if any (in the lake's store: a local folder
    or a container)."""
    raw = lake.read_json(*JOB)
    if raw is None:
        return None
    raw["deletes"] = [Delete(**d) for d in raw["deletes"]]
    return ErasureJob(**raw)


@writes_lake("erasure")
def finish_pending(settings: Settings) -> ErasureResult | None:
    """Finish the erasure a stopped run left, before a build or refresh reads the lake
    (silver's accounting balances again only once its last delete is done)."""
    lake = Lake(settings.lake)
    job = pending(lake)
    if job is None:
        return None
    done = ", ".join(job.done) or "nothing"
    log.warning("finishing the erasure a stopped run left (done: %s)", done)
    return replace(run(lake, job), resumed=True)


def run(lake: Lake, job: ErasureJob) -> ErasureResult:
    """Record the job, then do each step not done yet, recording each; remove the job."""
    result = ErasureResult([tuple(k) for k in job.source_keys], job.customer_ids)
    _save(lake, job)
    for step in STEPS:
        if step not in job.done:
            _STEP[step](lake, job, result)
            job.done.append(step)
            _save(lake, job)
    lake.delete_file(*JOB)
    return result


def _save(lake: Lake, job: ErasureJob) -> None:
    """Replaced whole (a local file written beside, then renamed; a blob put in one
    request): a kill leaves the old record or the new one."""
    lake.write_json(asdict(job), *JOB)


# ---------------------------------------------------------------- the steps


def _delete_rows(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """Each table's deletes, the tables a few at a time: one table's rewrite runs mostly on
    one core, and at a million customers every table of the person's sources holds one of
    them in each file. A source table's deletes stay in their order (bronze, silver, its
    quarantine: see `_source_deletes`); no two threads touch one table."""
    by_table: dict[str, list[Delete]] = {}
    for d in job.deletes:
        by_table.setdefault(d.where[-1], []).append(d)
    _per_table(lambda ds: _delete_each(lake, ds, result), list(by_table.values()))


def _per_table(work, tables: list) -> list:
    """work(t) for each table, a few tables at a time (as many as cores): a table's work
    (Parquet reads and writes, delta-rs) runs mostly outside the interpreter's lock."""
    with ThreadPoolExecutor(max(1, min(len(tables), os.cpu_count() or 1))) as pool:
        return list(pool.map(work, tables))


def _delete_each(lake: Lake, deletes: list[Delete], result: ErasureResult) -> None:
    for d in deletes:
        if not lake.exists(*d.where) or not d.values:
            continue
        layer, *parts = d.where
        if d.hidden_only:
            lake.purge_deleted(layer, *parts, holding=(d.column, d.values))
        else:
            _delete(
                lake, tuple(d.where), d.column, d.values, result, d.keep_markers, d.pseudonymise
            )


def _subtract_frequencies(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """Drop from the unify value frequencies the values only the erased records carried
    (their count is the erased records' share), or drop the frequencies (see
    `_frequency_decrement`); then remove at once the older files of the table holding
    such a value, and cut its log and COUNTED's (whose file statistics may name one).
    The counts of values other records carry too, and the total, stay: no record left has
    a dropped value, so no `common` decision of the unify state changes, and the lake
    stays as a whole unify with these frequencies leaves it (a rerun drops nothing more).
    """
    if job.count == DROP:  # a rerun deletes again what a kill left of the folders
        if lake.exists(*FREQUENCIES):
            result.rows_deleted["/".join(FREQUENCIES)] = lake.count(*FREQUENCIES)
        lake.delete_folder(*FREQUENCIES)
        lake.delete_folder(*COUNTED)
        return
    if not job.count or _count_of(lake, FREQUENCIES) != job.count:  # none, or counted anew
        return
    subtract = pa.Table.from_pylist(
        [dict(zip(FREQUENCY_SCHEMA.names, r, strict=True)) for r in job.frequencies],
        FREQUENCY_SCHEMA,
    )
    record = last_record(lake, FREQUENCIES)
    inputs, meta = record if record is not None else ({}, {})
    con = duckdb.connect()
    before = lake.read(*FREQUENCIES)
    con.register("kept", before)
    con.register("gone", subtract)
    left = con.sql(  # a rerun finds none to drop: those left count more than the erased
        f"""SELECT k.* FROM kept k LEFT JOIN gone g USING (field, value)
            WHERE k.field = '{RECORDS_TOTAL}' OR k.count > COALESCE(g.count, 0)
            ORDER BY k.field, k.value"""
    ).to_arrow_table()
    con.close()
    if len(left) < len(before):
        carried = {k: meta[k] for k in (STATE_KEY, COUNT_KEY) if k in meta}
        lake.write(left, *FREQUENCIES, mode="overwrite", metadata=stamp(inputs, **carried))
        result.rows_deleted["/".join(FREQUENCIES)] = len(before) - len(left)
    # the values no record carries any more: in no file, no log
    con = duckdb.connect()
    con.register("kept", lake.read(*FREQUENCIES, columns=["field", "value"]))
    con.register("subtracted", subtract)
    gone = (
        con.sql(
            f"""SELECT value FROM subtracted ANTI JOIN kept USING (field, value)
            WHERE field <> '{RECORDS_TOTAL}'"""
        )
        .to_arrow_table()["value"]
        .combine_chunks()
    )
    con.close()
    if not len(gone):
        return
    for key in lake.unreferenced_files(*FREQUENCIES):
        if key.endswith(".parquet") and lake.store.exists(key) and _holds_value(lake, key, gone):
            lake.store.delete(key)
            result.files_removed += 1
    # COUNTED lost their rows in the rows step; its older files go with the identifiers
    # (`_remove_old_files`), but its log's statistics may hold such a value too
    for where in (FREQUENCIES, COUNTED):
        if lake.exists(*where):
            lake.forget_history(*where)
            result.histories_forgotten += 1


def _holds_value(lake: Lake, key: str, values: pa.Array) -> bool:
    """Whether an unreferenced frequencies file holds one of `values` (an unreadable one:
    may hold anything)."""
    try:
        with lake.store.open_input(key) as file:
            column = pq.read_table(file, columns=["value"])["value"]
    except (pa.ArrowInvalid, OSError, KeyError):
        return True
    return bool(pc.any(pc.is_in(column, values.cast(column.type))).as_py())


def _purge_exports(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """The journey exports (CSV handed to Customer Insights - Journeys) lose the erased
    customers' and contacts' rows at once: the segment step may not run before the next
    refresh (no endpoint), and until then the files would still name them. Each file is
    replaced whole (written beside, then renamed). The CI-D snapshot is rewritten by every
    refresh from the purged scores."""
    folder = lake.key("export", "journeys") + "/"
    ids = set(job.customer_ids)
    keys = {k for s, k in job.source_keys if s == "dataverse"}
    for key in lake.list_files("export", "journeys"):
        name = key.removeprefix(folder)
        if "/" in name or not name.endswith(".csv"):
            continue
        export = pd.read_csv(io.StringIO(lake.store.read_text(key)), dtype=str)
        gone = export.get("CustomerId", pd.Series(dtype=str)).isin(ids)
        gone |= export.get("ContactId", pd.Series(dtype=str)).isin(keys)
        if gone.any():
            lake.store.write_text(key, export.loc[~gone].to_csv(index=False))
            result.rows_deleted[f"export/journeys/{name}"] = int(gone.sum())


def _purge_quarantine(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """Quarantined rows are personal data too: a rejected source line (kept verbatim) goes
    when one of its fields is an erased person's identifier, and a quarantined silver or
    gold row when one of its values is."""
    identifiers = set(job.identifiers) | set(job.customer_ids)
    if not identifiers:
        return
    for parts in lake.tables("quarantine"):
        frame = lake.read_pandas("quarantine", *parts)
        if frame.empty:
            continue
        if RAW in frame:
            hit = _lines_naming(frame[RAW], identifiers)
        else:
            text = frame.select_dtypes(include=["object", "string"])
            hit = text.isin(identifiers).any(axis=1)
        if hit.any():
            lake.write(frame.loc[~hit.to_numpy()], "quarantine", *parts, mode="overwrite")
            result.rows_deleted["quarantine/" + "/".join(parts)] = int(hit.sum())
            log.info("erasure: %d quarantined rows of %s", int(hit.sum()), "/".join(parts))


def _remove_old_files(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """Delete now the files no live version uses that hold an erased person: one of their
    unique identifiers in a text column, or a row a delete of the job matched. The other
    unreferenced files wait for the normal retention. Files are keys of the lake's store
    (local files or blobs), read through its pyarrow filesystem."""
    unique = pa.array(sorted(job.unique), pa.string())
    by_table = {tuple(d.where): d for d in job.deletes}
    store = lake.store

    def remove(table: tuple[str, ...]) -> int:
        match = by_table.get(table)
        held = [
            key
            for key in lake.unreferenced_files(*table)
            if key.endswith(".parquet") and store.exists(key) and _holds(lake, key, unique, match)
        ]
        for key in held:
            store.delete(key)
        return len(held)

    tables = [(layer, *parts) for layer in TABLE_LAYERS for parts in lake.tables(layer)]
    result.files_removed += sum(_per_table(remove, tables))


def _holds(lake: Lake, key: str, unique: pa.Array, match: Delete | None) -> bool:
    """Whether an unreferenced file may hold an erased person. One that is no readable
    Parquet (a write a kill cut short: no version refers to it) is garbage that may hold
    anyone: it counts as holding."""
    try:
        with lake.store.open_input(key) as file:
            parquet = pq.ParquetFile(file)
            schema = parquet.schema_arrow
            text = [f.name for f in schema if _is_text(f.type)]
            wanted = text + ([match.column] if match and match.column in schema.names else [])
            data = parquet.read(columns=sorted(set(wanted)))
    except (pa.ArrowInvalid, OSError):
        return True
    for name in text:
        if pc.any(pc.is_in(data[name].cast(pa.string()), unique)).as_py():
            return True
    if (
        RAW in data.column_names
        and _lines_naming(data[RAW].to_pandas(), set(unique.to_pylist())).any()
    ):
        return True
    if match and match.column in data.column_names:
        column = data[match.column]
        if _is_text(column.type):  # string_view too, which is_in has no kernel for
            column = column.cast(pa.string())
        values = pa.array(match.values).cast(column.type)
        return bool(pc.any(pc.is_in(column, values)).as_py())
    return False


def _lines_naming(raw: pd.Series, identifiers: set[str]) -> pd.Series:
    """Which rejected source lines (kept verbatim) have an identifier as one of their
    comma-separated fields."""
    fields = raw.fillna("").str.split(",")
    return fields.map(lambda f: bool(identifiers & {v.strip().strip('"') for v in f}))


def _is_text(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def _forget_histories(lake: Lake, job: ErasureJob, result: ErasureResult) -> None:
    """Every table whose log names an erased person (in a file's statistics or a purge's
    predicate) keeps only its current version's log (see `Lake.forget_history`)."""
    needles = [v.encode() for v in job.unique]
    for layer in TABLE_LAYERS:
        for parts in lake.tables(layer):
            folder = lake.key(layer, *parts, "_delta_log") + "/"
            commits = [
                k
                for k in lake.list_files(layer, *parts, "_delta_log")
                if k.endswith(".json") and "/" not in k.removeprefix(folder)
            ]
            if any(_names(lake.store.read_bytes(k), needles) for k in commits):
                lake.forget_history(layer, *parts)
                result.histories_forgotten += 1


def _names(data: bytes, needles: list[bytes]) -> bool:
    return any(n in data for n in needles)


_STEP = {
    "rows": _delete_rows,
    "frequencies": _subtract_frequencies,
    "exports": _purge_exports,
    "quarantine": _purge_quarantine,
    "files": _remove_old_files,
    "logs": _forget_histories,
}


# ---------------------------------------------------------------- helpers


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
        # Equi-joins only: a join on `recid IN (email, phone)` is a nested loop over every
        # party and address of the lake.
        rows = con.sql("""WITH parties AS (SELECT party FROM custtable
                                           WHERE CONCAT(dataareaid, '-', accountnum)
                                                 IN (SELECT k FROM keys)),
                               refs AS (SELECT primarycontactemail AS recid FROM dirpartytable
                                        WHERE recid IN (SELECT party FROM parties)
                                        UNION SELECT primarycontactphone FROM dirpartytable
                                        WHERE recid IN (SELECT party FROM parties))
                          SELECT locator FROM logisticselectronicaddress
                          WHERE recid IN (SELECT recid FROM refs)""").df()
        found |= {v for v in rows["locator"] if isinstance(v, str) and v}
    return found


def _commerce_deletes(lake: Lake, keys: list[str]) -> list[Delete]:
    """The accounts' rows and those of their party, names, addresses and e-mail/phone,
    in bronze (delete markers kept) and silver (rows the source sent no delete for)."""
    con = duckdb.connect()
    for name in ("custtable", "dirpartytable"):
        if lake.exists("bronze", "d365", name):
            con.register(name, lake.dataset("bronze", "d365", name))
    con.register("erased_keys", pd.DataFrame({"k": keys}))
    accounts = con.sql("""SELECT DISTINCT recid, party FROM custtable
                          WHERE CONCAT(dataareaid, '-', accountnum) IN (SELECT k FROM erased_keys)""").df()
    parties = _ints(accounts["party"])
    refs = con.sql(f"""SELECT DISTINCT primaryaddresslocation, primarycontactemail, primarycontactphone
                       FROM dirpartytable WHERE recid IN ({",".join(map(str, parties)) or "NULL"})""").df()
    plan = {
        "custtable": ("recid", _ints(accounts["recid"])),
        "dirpartytable": ("recid", parties),
        "dirpersonname": ("person", parties),
        "logisticspostaladdress": ("location", _ints(refs["primaryaddresslocation"])),
        "logisticslocation": ("recid", _ints(refs["primaryaddresslocation"])),
        "logisticselectronicaddress": (
            "recid",
            _ints(refs["primarycontactemail"]) + _ints(refs["primarycontactphone"]),
        ),
    }
    deletes = []
    for table, (column, values) in plan.items():
        marker = "accountnum" if table == "custtable" else ""
        deletes += _source_deletes(lake, "d365", table, column, values, marker)
    return deletes


def _source_deletes(
    lake: Lake, source: str, table: str, column: str, values: list, pseudonymise: str = ""
) -> list[Delete]:
    """A source table's rows of the erased in bronze (delete markers kept), silver (rows
    the source sent no delete for) and silver's quarantine, in that order: silver's
    accounting is recounted from bronze once bronze has lost them."""
    where = (["bronze", source, table], ["silver", table], ["quarantine", "silver", table])
    return [
        Delete(w, column, values, w[0] == "bronze", pseudonymise=pseudonymise * (w[0] == "bronze"))
        for w in where
        if values and lake.exists(*w)
    ]


def _pseudonymise_markers(
    lake: Lake, where: tuple[str, ...], column: str, values: list, pseudonymise: str
) -> None:
    """Append a copy of the erased records' delete markers that keeps only what orders the
    change feed (record id, company, version, ingest columns) and the pseudonym of
    `pseudonymise`; the caller then deletes the originals. Appended first, so a kill in
    between leaves the marker twice (harmless), never not at all."""
    con = duckdb.connect()
    con.register("feed", lake.dataset(*where))
    con.register("erased_keys", pa.table({"k": values}))
    rows = con.sql(f"""SELECT * FROM feed WHERE {column} IN (SELECT k FROM erased_keys)
                       AND IsDelete AND NOT starts_with({pseudonymise}, 'erased:')""").fetch_arrow_table()
    rows = rows.cast(lake.schema(*where))
    if not len(rows):
        return
    hashed = [
        "erased:" + hashlib.sha256(v.encode()).hexdigest() for v in rows[pseudonymise].to_pylist()
    ]
    ordering = {column, "recid", "dataareaid", "versionnumber", "SinkModifiedOn", "IsDelete"}
    columns = [
        pa.array(hashed, rows.schema.field(name).type)
        if name == pseudonymise
        else rows[name]
        if name in ordering or name.startswith("_")
        else pa.nulls(len(rows), rows.schema.field(name).type)
        for name in rows.column_names
    ]
    lake.write(pa.Table.from_arrays(columns, schema=rows.schema), *where, mode="append")


def _ints(values: pd.Series) -> list[int]:
    return [int(v) for v in values.dropna().astype("int64")]


def _delete(
    lake: Lake,
    where: tuple[str, ...],
    column: str,
    values: list,
    result: ErasureResult,
    keep_markers: bool = False,
    pseudonymise: str = "",
) -> None:
    quoted = ", ".join(f"'{v}'" if isinstance(v, str) else str(int(v)) for v in values)
    predicate = f"{column} IN ({quoted})"
    if pseudonymise:  # the markers go too, kept under their pseudonym
        _pseudonymise_markers(lake, where, column, values, pseudonymise)
        predicate += (
            f" AND NOT (COALESCE(IsDelete, FALSE) AND starts_with(COALESCE({pseudonymise}, ''),"
            " 'erased:'))"
        )
    elif keep_markers:  # a delete marker carries the key only: keep it, drop the data
        predicate += " AND (IsDelete IS NULL OR NOT IsDelete)"
    # Rows a silver merge replaced are hidden by deletion vectors but still in their files
    # (the person's older versions among them): rewritten without them first.
    lake.purge_deleted(*where)
    table = lake.delta(*where)
    metrics = table.delete(
        predicate,
        commit_properties=purge_accounting(lake, where[1]) if where[0] == "silver" else None,
    )
    deleted = int(metrics.get("num_deleted_rows", 0))
    result.rows_deleted["/".join(where)] = result.rows_deleted.get("/".join(where), 0) + deleted
    log.info("erasure: %d rows deleted from %s", deleted, "/".join(where))
