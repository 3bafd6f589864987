"""Silver: the current state of each source table, typed, standardised and validated.

The change feed is resolved per key (latest by versionnumber, then SinkModifiedOn; a
delete removes the key). Silver is merged incrementally from the bronze files added
since the last build (replaced rows deleted by deletion vectors, new versions appended,
see `_apply`), and a key whose newest version fails validation moves to
`quarantine/silver/<table>` (also current state), so for every table:
bronze current-state rows = silver rows + quarantined rows.

A merge is one unit of work in three commits: the change log, silver, its quarantine.
Silver and the quarantine record the same bronze version, and a merge counts as done
when the quarantine does; a build killed after silver's commit finishes the quarantine's
from the same bronze rows, and one killed after the change log's replaces its rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import pandera.pandas as pa
import phonenumbers
import pyarrow as pa_arrow
import pyarrow.compute as pc
from deltalake import CommitProperties
from deltalake.exceptions import DeltaError

from c360ml.config import Settings
from c360ml.medallion.checks import (
    REASON,
    SQL_TYPES,
    Dialect,
    SqlChecks,
    ident,
    ordered,
    split_failed,
    sql_checks,
    upgrade_quarantine,
)
from c360ml.medallion.sql import duckdb_connection, register, rows_by_file
from c360ml.schemas import UTC_TS
from c360ml.sources.tables import SOURCE_TABLES, SourceTable
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake
from c360ml.summary import Summary

log = logging.getLogger(__name__)

BRONZE_VERSION_KEY = "c360ml.bronze_version"
BRONZE_CURRENT_KEY = "c360ml.bronze_current"  # accounting: bronze current-state rows
BRONZE_INGESTED_KEY = "c360ml.bronze_ingested_at"  # newest _ingested_at merged (us since epoch)
INGESTED_AT = "_ingested_at"  # bronze lineage: when ingest wrote the row
INGESTED_TYPE = pa_arrow.timestamp("us", tz="UTC")
STREAM_ROWS = 1_000_000  # rows per batch when a first build streams a change feed
# Merges of small batches run two at a time: a merge is partly single-threaded (its
# commit, the Parquet write, Arrow's standardisation), so one at a time leaves a core
# idle. Big batches and first builds run alone: two big ones at once took a large build's
# peak memory past its target.
PARALLEL_MERGES, PARALLEL_ROWS = 2, 2_000_000
ACTION = "_action"
ROW = "_row"  # a merge source row's position
# Synapse system columns that carry no meaning once the feed is resolved.
DROPPED = ("Id", "SinkCreatedOn", "sysrowversion", "IsDelete", INGESTED_AT)
PHONE_TYPE, EMAIL_TYPE = 1, 2  # LogisticsElectronicAddress.Type
DEFAULT_PHONE_REGION = "US"  # numbers written without a country code are read as this region
STANDARDISE = "standardise"  # schema metadata: how a column (or the table) is standardised
COUNTRIES = {  # alpha-3 (F&O) and common names -> ISO 3166-1 alpha-2
    "USA": "US", "UNITED STATES": "US", "US": "US", "CAN": "CA", "CANADA": "CA", "CA": "CA",
    "GBR": "GB", "UNITED KINGDOM": "GB", "UK": "GB", "GB": "GB", "DEU": "DE", "GERMANY": "DE",
    "DE": "DE", "FRA": "FR", "FRANCE": "FR", "FR": "FR", "MEX": "MX", "MEXICO": "MX", "MX": "MX",
}  # fmt: skip


@dataclass(frozen=True)
class Rules:
    """Standardisation and validation of one silver table, declared once (below) in a
    few words: `silver_schema` turns them and the source declaration into the table's
    pandera schema, which is all the pipeline reads (`SILVER_SCHEMAS`)."""

    required: tuple[str, ...] = ()  # must be non-null
    emails: tuple[str, ...] = ()  # trimmed, lower-cased
    phones: tuple[str, ...] = ()  # E.164 where parseable
    countries: tuple[str, ...] = ()  # ISO alpha-2
    non_negative: tuple[str, ...] = ()  # amounts/prices that cannot be below zero
    ordered: tuple[tuple[str, str], ...] = ()  # (a, b): a <= b where both present
    locator: bool = False  # LogisticsElectronicAddress: locator is a phone (type 1) or e-mail (2)


RULES: dict[str, Rules] = {
    "custtable": Rules(required=("accountnum", "party", "dataareaid")),
    "dirpartytable": Rules(required=("instancerelationtype",)),
    "dirpersonname": Rules(required=("person", "validfrom", "validto"),
                           ordered=(("validfrom", "validto"),)),
    "logisticslocation": Rules(),
    "logisticspostaladdress": Rules(required=("location", "validfrom", "validto"),
                                    countries=("countryregionid",),
                                    ordered=(("validfrom", "validto"),)),
    "logisticselectronicaddress": Rules(required=("locator", "type"), locator=True),
    "salestable": Rules(required=("salesid", "custaccount", "createddatetime", "salesstatus")),
    "salesline": Rules(required=("salesid", "itemid", "salesqty", "salesprice", "lineamount"),
                       non_negative=("salesprice",)),
    "retailtransactiontable": Rules(required=("transactionid", "transdate", "netamount")),
    "retailtransactionsalestrans": Rules(required=("transactionid", "itemid", "netamount"),
                                         non_negative=("price",)),
    "inventtable": Rules(required=("itemid",)),
    "contact": Rules(required=("contactid", "createdon"), emails=("emailaddress1",),
                     phones=("telephone1", "mobilephone"), countries=("address1_country",)),
    "incident": Rules(required=("incidentid", "createdon", "statecode")),
}  # fmt: skip


@dataclass
class SilverResult:
    table: str
    new_bronze_rows: int = 0
    silver_rows: int = 0
    quarantined: int = 0
    duplicates: int = 0  # exact duplicate rows collapsed (sources without a change feed)
    bronze_current: int = 0
    seconds: float = 0.0

    @property
    def balanced(self) -> bool:
        return self.bronze_current == self.silver_rows + self.quarantined + self.duplicates

    def row(self) -> dict:
        return {
            "table": self.table,
            "new bronze rows": self.new_bronze_rows,
            "bronze current": self.bronze_current,
            "silver": self.silver_rows,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "balanced": "yes" if self.balanced else "NO",
            "seconds": round(self.seconds, 2),
        }


@dataclass(kw_only=True)
class SilverSummary(Summary[SilverResult]):
    pass


# ---------------------------------------------------------------- pure stages


def normalise_phone(raw: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """E.164 when phonenumbers parses the number and finds it possible; else the trimmed
    original (a bad number is kept as given, never guessed)."""
    text = raw.strip()
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return text
    if not phonenumbers.is_possible_number(number):
        return text
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_phones(values: pd.Series) -> pd.Series:
    """normalise_phone over a pandas column (object dtype, None for missing)."""
    out = normalise_phones_arrow(pa_arrow.array(values.astype(object), pa_arrow.string()))
    return pd.Series(out.to_pylist(), index=values.index, dtype=object)


def normalise_phones_arrow(values: pa_arrow.Array | pa_arrow.ChunkedArray) -> pa_arrow.Array:
    """normalise_phone over an Arrow string column, fast for the common case.

    NANP numbers written as 10 digits (or 1 + 10 digits) whose area code and exchange
    start with 2-9 are what phonenumbers turns into "+1" + the 10 digits (a test checks
    the two agree); they are done vectorised, everything else goes through phonenumbers
    once per distinct value.
    """
    if isinstance(values, pa_arrow.ChunkedArray):
        values = values.combine_chunks()
    text = pc.utf8_trim_whitespace(values)
    digits = pc.replace_substring_regex(text, r"[\s().\-]", "")
    nanp = pc.fill_null(
        pc.and_(
            pc.match_substring_regex(digits, r"^(\+?1)?[2-9]\d{2}[2-9]\d{6}$"),
            pc.invert(
                pc.and_(pc.starts_with(digits, "+"), pc.invert(pc.starts_with(digits, "+1")))
            ),
        ),
        False,
    )
    fast = pc.binary_join_element_wise("+1", pc.utf8_slice_codeunits(digits, -10), "")
    rest = pc.and_(pc.invert(nanp), pc.is_valid(text))
    slow = pa_arrow.nulls(len(text), pa_arrow.string())
    if pc.any(rest).as_py():
        unique = pc.unique(text.filter(rest))
        mapped = pa_arrow.array([normalise_phone(v) for v in unique.to_pylist()], pa_arrow.string())
        slow = pc.take(mapped, pc.index_in(text, unique))
    return pc.if_else(nanp, fast, slow)


def trim_strings(table: pa_arrow.Table) -> pa_arrow.Table:
    """Every source string column trimmed, empty -> null (vectorised in Arrow: 20M-row
    tables). Lineage columns (`_source_file`, `_batch_id`) are ingest's own, not trimmed."""
    out = table
    for i, f in enumerate(table.schema):
        if pa_arrow.types.is_string(f.type) and not f.name.startswith("_"):
            trimmed = pc.utf8_trim_whitespace(table[f.name])
            out = out.set_column(i, f, pc.if_else(pc.equal(trimmed, ""), None, trimmed))
    return out


def standardise(table: pa_arrow.Table, schema: pa.DataFrameSchema) -> pa_arrow.Table:
    """Lower-case e-mails, E.164 phones, alpha-2 countries (strings are already trimmed),
    as the schema's metadata says (see `silver_schema`).

    In Arrow: only the declared columns are touched, so a table without such rules
    passes through unchanged (no copy, no pandas round trip).
    """
    out = table

    def put(name: str, values) -> None:
        nonlocal out
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(i), values)

    for col, column in schema.columns.items():
        kind = (column.metadata or {}).get(STANDARDISE)
        if kind == "email":
            put(col, pc.utf8_lower(out[col]))
        elif kind == "phone":
            put(col, normalise_phones_arrow(out[col]))
        elif kind == "country":
            upper = pc.utf8_upper(out[col])
            keys = pa_arrow.array(list(COUNTRIES), pa_arrow.string())
            mapped = pc.take(pa_arrow.array(list(COUNTRIES.values())), pc.index_in(upper, keys))
            put(col, pc.coalesce(mapped, upper))
    if (schema.metadata or {}).get(STANDARDISE) == "locator":
        kind = out["type"]
        locator = out["locator"].combine_chunks()
        email = pc.fill_null(pc.equal(kind, EMAIL_TYPE), False)
        # Only the phone rows go to the phone parser: the e-mails' ~1M distinct values
        # would each miss its fast path (most of the table's time at 1M customers).
        phone = pc.fill_null(pc.equal(kind, PHONE_TYPE), False).combine_chunks()
        phones = normalise_phones_arrow(locator.filter(phone))
        put("locator", pc.if_else(email, pc.utf8_lower(locator),
                                  pc.replace_with_mask(locator, phone, phones)))  # fmt: skip
    return out


def resolve_changes(table: pa_arrow.Table, source: SourceTable) -> pa_arrow.Table:
    """Latest row per key by (versionnumber, SinkModifiedOn); deletes stay, to be applied.

    A window query in DuckDB (`latest_sql`, the form the Spark engine runs too):
    multi-threaded and on Arrow, for 20M-row change feeds.
    """
    con = duckdb_connection()
    con.register("feed", table)
    return con.sql(latest_sql(source, "feed", table.column_names, "duckdb")).to_arrow_table()


# ---------------------------------------------------------------- SQL both engines run


def key_exprs(table: SourceTable, dialect: Dialect = "duckdb") -> list[str]:
    """The key columns as the resolution compares them: text trimmed, blank = null.
    Bronze keeps text as exported, so every grouping of bronze by key goes through this.
    (SQL's TRIM removes spaces, in DuckDB and Spark alike.)"""
    types = {c.name: c.arrow_type for c in table.columns}
    return [
        f"NULLIF(TRIM({ident(k, dialect)}), '')"
        if pa_arrow.types.is_string(types[k])
        else ident(k, dialect)
        for k in table.key
    ]


def resolve_order(dialect: Dialect = "duckdb") -> str:
    """Which version of a key wins: the newest versionnumber, then SinkModifiedOn."""
    return f"{ident('versionnumber', dialect)} DESC, {ident('SinkModifiedOn', dialect)} DESC"


def live(dialect: Dialect = "duckdb") -> str:
    """True for a resolved row that is not a delete marker."""
    return f"NOT COALESCE({ident('IsDelete', dialect)}, FALSE)"


def latest_sql(
    table: SourceTable, feed: str, columns: Iterable[str], dialect: Dialect = "duckdb"
) -> str:
    """`columns` of the newest version of each key of view `feed` (delete markers
    included; null keys are one group, as in PARTITION BY): one window over the feed.
    The incremental DuckDB build and the Spark engine resolve with it; DuckDB's first
    build has a faster form of the same (`_resolve_sql`)."""
    keys = ", ".join(key_exprs(table, dialect))
    cols = ", ".join(ident(c, dialect) for c in columns)
    return f"""SELECT {cols} FROM (
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys}
                        ORDER BY {resolve_order(dialect)}) AS _rn
                 FROM {feed}) ranked
               WHERE _rn = 1"""


def logged_sql(
    table: SourceTable, batch: str, replaced: str | None, version: int, dialect: Dialect = "duckdb"
) -> str:
    """A change log's rows for one merge (see `_log_changes`): the distinct non-null
    change keys of views `batch` (the resolved batch) and `replaced` (silver's rows of
    its keys; None: no silver yet), under the silver version the merge makes."""
    cols = ", ".join(ident(c, dialect) for c in table.change_key)
    union = f"SELECT {cols} FROM {batch}"
    if replaced is not None:
        union += f" UNION SELECT {cols} FROM {replaced}"
    present = " AND ".join(f"{ident(c, dialect)} IS NOT NULL" for c in table.change_key)
    return f"""SELECT DISTINCT {cols}, CAST({version} AS BIGINT) AS silver_version
               FROM ({union}) logged WHERE {present}"""


# Arrow type of a source column -> its pandera dtype (pandas' nullable ones: a column with
# nulls in pandas is still its type, so pandera in the tests checks the same values).
PANDERA_DTYPES = {
    pa_arrow.string(): str,
    pa_arrow.int64(): pd.Int64Dtype(),
    pa_arrow.float64(): "float64",
    pa_arrow.bool_(): pd.BooleanDtype(),
    INGESTED_TYPE: UTC_TS,
}


def silver_schema(table: SourceTable, rules: Rules) -> pa.DataFrameSchema:
    """The pandera schema of a silver table, built from the source declaration + rules:
    each column's dtype and nullability (keys and required columns are not null), its
    checks, how it is standardised (column metadata `standardise`: email, phone,
    country; table metadata `standardise: locator`), and the frame's ordered pairs."""
    kinds = {
        **{c: "email" for c in rules.emails},
        **{c: "phone" for c in rules.phones},
        **{c: "country" for c in rules.countries},
    }
    columns = {}
    for col in table.columns:
        if col.name in DROPPED:
            continue
        columns[col.name] = pa.Column(
            PANDERA_DTYPES[col.arrow_type],
            nullable=not (col.name in rules.required or col.name in table.key),
            checks=[pa.Check.ge(0)] if col.name in rules.non_negative else [],
            metadata={STANDARDISE: kinds[col.name]} if col.name in kinds else None,
        )
    return pa.DataFrameSchema(
        columns,
        checks=[ordered(a, b) for a, b in rules.ordered],
        coerce=True,
        name=table.name,
        metadata={STANDARDISE: "locator"} if rules.locator else None,
    )


SILVER_SCHEMAS = {t.name: silver_schema(t, RULES[t.name]) for t in SOURCE_TABLES.values()}
SILVER_CHECKS: dict[str, SqlChecks] = {n: sql_checks(s) for n, s in SILVER_SCHEMAS.items()}


def split_valid_arrow(
    table: pa_arrow.Table, schema: pa.DataFrameSchema
) -> tuple[pa_arrow.Table, pa_arrow.Table]:
    """(valid rows, rejected rows with `quarantine_reason`): the schema's SQL checks, run
    by DuckDB over the batch (`c360ml.medallion.checks`)."""
    return split_failed(table, SILVER_CHECKS[schema.name])


# ---------------------------------------------------------------- lake edges


def _new_bronze(
    lake: Lake,
    table: SourceTable,
    since: int | None,
    merged_until: int | None,
    until: int | None = None,
) -> tuple[pa_arrow.Table, int]:
    """Bronze rows not merged yet: in files added after version `since` (up to version
    `until`; None: the latest) and, once a watermark is recorded, ingested after
    `merged_until`.

    Bronze is append-only except for erasures, which rewrite the files that held the
    person's rows. A rewritten file is new to the Delta log, but its other rows were
    merged already; taken again as new, an older version whose delete marker sits in an
    untouched file would be resurrected. The ingest time tells them apart.
    """
    current = lake.delta_at("bronze", table.source, table.name, version=until)
    files = set(current.file_uris())
    merged = (
        None if since is None else lake.files_at("bronze", table.source, table.name, version=since)
    )
    files -= merged or set()  # history cut by an erasure: the ingest time alone decides
    unmerged = None
    if merged_until is not None:
        unmerged = pc.field(INGESTED_AT) > pc.scalar(pa_arrow.scalar(merged_until, INGESTED_TYPE))
    # The table's own schema: a file rewritten by delta-rs stores strings as string_view.
    schema = current.to_pyarrow_dataset().schema
    data = lake.files_dataset(
        "bronze", table.source, table.name, files=sorted(files), schema=schema
    ).to_table(filter=unmerged)
    return data, current.version()


def _last_recorded(lake: Lake, name: str, key: str, layer: str = "silver") -> int | None:
    """The largest value of an integer `key` in the commit metadata of silver (or of
    silver's quarantine, `layer="quarantine"`), if any."""
    where = ("silver", name) if layer == "silver" else (layer, "silver", name)
    if not lake.exists(*where):
        return None
    values = [int(m[key]) for m in lake.commit_metadata(*where) if key in m]
    return max(values) if values else None


def _unfinished(lake: Lake, name: str) -> tuple[dict[str, str], int, int | None] | None:
    """A merge whose silver commit is there and whose quarantine commit is not (a build
    killed between the two): silver's record of it, and the bronze version and watermark
    the quarantine records, which the merge started from."""
    merged = _last_recorded(lake, name, BRONZE_VERSION_KEY)
    done = _last_recorded(lake, name, BRONZE_VERSION_KEY, layer="quarantine")
    if merged is None or done is None or merged <= done:
        return None
    meta = next(
        m
        for m in reversed(lake.commit_metadata("silver", name))
        if m.get(BRONZE_VERSION_KEY) == str(merged)
    )
    keys = (BRONZE_VERSION_KEY, BRONZE_CURRENT_KEY, BRONZE_INGESTED_KEY)
    watermark = _last_recorded(lake, name, BRONZE_INGESTED_KEY, layer="quarantine")
    return {k: meta[k] for k in keys if k in meta}, done, watermark


def _resolved(
    raw: pa_arrow.Table, table: SourceTable, schema: pa.DataFrameSchema
) -> tuple[pa_arrow.Table, pa_arrow.Table, pa_arrow.Table, pa_arrow.Table]:
    """New bronze rows -> (resolved batch, valid rows, rejected rows, deleted rows)."""
    latest = standardise(resolve_changes(trim_strings(raw), table), schema)
    deleted = pc.fill_null(latest["IsDelete"], False)
    keep = [c for c in latest.column_names if c not in DROPPED]
    good, bad = split_valid_arrow(latest.filter(pc.invert(deleted)).select(keep), schema)
    return latest, good, bad, latest.filter(deleted).select(keep)


def _apply_quarantine(
    lake: Lake,
    table: SourceTable,
    good: pa_arrow.Table,
    bad: pa_arrow.Table,
    removed: pa_arrow.Table,
    meta: dict[str, str],
    matched: pa_arrow.Table | None,
) -> None:
    """A merge's quarantine commit (its last): the rejected rows in, and out the keys
    that are valid now or deleted."""
    _apply(
        lake,
        ("quarantine", "silver", table.name),
        table.key,
        upsert=bad,
        remove=pa_arrow.concat_tables([removed, good]),
        schema=silver_arrow_schema(table, quarantine=True),
        meta=meta,
        matched=matched,
    )


def build_silver_table(lake: Lake, table: SourceTable) -> SilverResult:
    """Merge the bronze rows added since the last build into silver (and its quarantine).

    All in Arrow: resolve (DuckDB), standardise (Arrow compute), check (the schema's SQL
    checks in DuckDB), merge (Delta).
    The accounting's left side (bronze current-state rows) is carried in the commit
    metadata and moved by each batch, counted independently of the merge (see
    `_current_delta`), so a build does not re-read the whole change feed.
    """
    started = time.perf_counter()
    result = SilverResult(table.name)
    schema = SILVER_SCHEMAS[table.name]
    since = _last_recorded(lake, table.name, BRONZE_VERSION_KEY)
    if since is None and lake.exists("bronze", table.source, table.name):
        return _first_build(lake, table, schema, result, started)
    upgrade_quarantine(lake, "quarantine", "silver", table.name)  # (a lake from before #23)
    if table.change_key and not lake.exists(*change_log(table.name)):
        _start_change_log(lake, table)  # (a first build killed before it started it)
    unfinished = _unfinished(lake, table.name)
    if unfinished is not None:  # only its quarantine commit is missing: made from the same rows
        meta, begun, watermark = unfinished
        raw, _ = _new_bronze(lake, table, begun, watermark, until=int(meta[BRONZE_VERSION_KEY]))
        latest, good, bad, removed = _resolved(raw, table, schema)
        matched = _matched(lake, ("quarantine", "silver", table.name), table, latest)
        _apply_quarantine(lake, table, good, bad, removed, meta, matched)
    merged_until = _last_recorded(lake, table.name, BRONZE_INGESTED_KEY)
    previous_current = last_bronze_current(lake, table.name)
    raw, bronze_version = _new_bronze(lake, table, since, merged_until)
    if since != bronze_version and len(raw):
        result.new_bronze_rows = len(raw)
        latest, good, bad, removed = _resolved(raw, table, schema)
        keep = good.column_names
        where = {
            "silver": ("silver", table.name),
            "quarantine": ("quarantine", "silver", table.name),
        }
        matched = {part: _matched(lake, w, table, latest) for part, w in where.items()}
        if since is None or previous_current is None:
            current = bronze_current_rows(lake, table) if since is not None else None
            if current is None:  # first build: the batch is the whole feed
                current = len(latest) - len(removed)
        else:
            current = previous_current + _current_delta(table, latest, matched.values())
        meta = {
            BRONZE_VERSION_KEY: str(bronze_version),
            BRONZE_CURRENT_KEY: str(current),
            BRONZE_INGESTED_KEY: str(pc.max(raw[INGESTED_AT]).cast(pa_arrow.int64()).as_py()),
        }
        if table.change_key:
            _log_changes(lake, table, latest, matched["silver"], bronze_version)
        _apply(
            lake,
            where["silver"],
            table.key,
            upsert=good,
            remove=pa_arrow.concat_tables([removed, bad.select(keep)]),
            schema=silver_arrow_schema(table),
            meta=meta,
            matched=matched["silver"],
        )
        _apply_quarantine(lake, table, good, bad, removed, meta, matched["quarantine"])
        result.bronze_current = current
    else:
        result.bronze_current = (
            previous_current if previous_current is not None else bronze_current_rows(lake, table)
        )
    result.silver_rows = _count(lake, "silver", table.name)
    result.quarantined = _count(lake, "quarantine", "silver", table.name)
    result.seconds = time.perf_counter() - started
    return result


def _first_build(
    lake: Lake,
    table: SourceTable,
    declared: pa.DataFrameSchema,
    result: SilverResult,
    started: float,
) -> SilverResult:
    """The first build of a silver table: the whole change feed, streamed.

    DuckDB resolves the feed straight from the bronze files (spilling to disk if it must)
    and hands the current rows over in batches; each batch is standardised, checked and
    streamed into the new Delta table, so a 20M-row feed never sits in memory whole.

    The accounting's left side (keys whose newest version is not a delete) is counted
    on the resolved stream, not by a second aggregate over the whole feed;
    it is known only once the stream has been written, so the bronze version and that
    count are recorded in a commit after the data (a crash before it leaves silver
    without a recorded version, and the next build starts over).
    """
    bronze_version = lake.version("bronze", table.source, table.name)
    con = duckdb_connection()
    register(con, lake, "feed", "bronze", table.source, table.name, positions=True)
    meta = {BRONZE_VERSION_KEY: str(bronze_version)}
    feed_rows, newest = con.execute(
        f"SELECT COUNT(*), epoch_us(max({INGESTED_AT})) FROM feed"
    ).fetchall()[0]
    result.new_bronze_rows = feed_rows
    if newest is not None:
        meta[BRONZE_INGESTED_KEY] = str(newest)
    schema, q_schema = silver_arrow_schema(table), silver_arrow_schema(table, quarantine=True)
    rejected: list[pa_arrow.Table] = []
    # Deletes and dropped columns (Id) go in the query, before the string work.
    columns = ", ".join(f'"{n}"' for n in schema.names)
    live = f"""SELECT {columns} FROM ({_resolve_sql(table, "feed")})
               WHERE NOT COALESCE("IsDelete", FALSE)"""

    def good_batches():
        for batch in con.sql(live).to_arrow_reader(STREAM_ROWS):
            rows = pa_arrow.Table.from_batches([batch])
            result.bronze_current += len(rows)
            latest = standardise(trim_strings(rows), declared)
            good, bad = split_valid_arrow(latest, declared)
            rejected.append(bad.cast(q_schema))
            yield from good.cast(schema).to_batches()

    lake.write(
        pa_arrow.RecordBatchReader.from_batches(schema, good_batches()),
        "silver",
        table.name,
        mode="overwrite",
    )
    meta[BRONZE_CURRENT_KEY] = str(result.bronze_current)
    bad = pa_arrow.concat_tables(rejected) if rejected else q_schema.empty_table()
    lake.write(bad, "quarantine", "silver", table.name, mode="overwrite", metadata=meta)
    lake.write(schema.empty_table(), "silver", table.name, metadata=meta)
    if table.change_key:
        _start_change_log(lake, table)
    result.silver_rows = _count(lake, "silver", table.name)
    result.quarantined = _count(lake, "quarantine", "silver", table.name)
    result.seconds = time.perf_counter() - started
    return result


CHANGES_FROM = "c360ml.changes_from"  # the silver version a change log starts after
LOGGED_KEY = "c360ml.logged_version"  # the silver version a change log commit logs


def change_log(name: str) -> tuple[str, ...]:
    return ("state", "silver", f"{name}_changes")


def _start_change_log(lake: Lake, table: SourceTable) -> None:
    """An empty change log of a logged table, covering the changes after its version now."""
    schema = pa_arrow.schema(
        [table.arrow_schema.field(c) for c in table.change_key]
        + [pa_arrow.field("silver_version", pa_arrow.int64())]
    )
    version = str(lake.version("silver", table.name))
    where = change_log(table.name)
    lake.write(schema.empty_table(), *where, mode="overwrite", metadata={CHANGES_FROM: version})


def log_version(lake: Lake, table: SourceTable) -> tuple[int, bool]:
    """(the silver version the next merge's change log rows are logged under, whether
    the log is ahead of silver): ahead when the last logged merge did not commit to
    silver, whose rows the next attempt replaces (appended again, the log would hold
    them twice)."""
    where = change_log(table.name)
    last = next((m for m in reversed(lake.commit_metadata(*where)) if LOGGED_KEY in m), None)
    merged = _last_recorded(lake, table.name, BRONZE_VERSION_KEY)
    ahead = last is not None and merged is not None and int(last[BRONZE_VERSION_KEY]) > merged
    # Ahead of silver: the same version as that attempt (silver may have moved since by a
    # commit of no rows, as delete_and_append's first one on a table, which enables
    # deletion vectors).
    version = int(last[LOGGED_KEY]) if ahead else lake.version("silver", table.name) + 1
    return version, ahead


def _log_changes(
    lake: Lake,
    table: SourceTable,
    latest: pa_arrow.Table,
    matched: pa_arrow.Table | None,
    bronze_version: int,
) -> None:
    """Log the change keys a merge of `latest` (the resolved batch) may change, before it
    runs, under the silver version it will make: the batch rows' keys and those of the
    silver rows they replace or delete (`matched`; a delete marker may carry only the
    row's key).

    Why not Delta's change data feed: with it, delta-rs's merge of the 1M lake's
    salesline took a third more memory. Logged before the merge, so a merge
    that fails leaves a superset, which gold handles (it recomputes more orders). Each
    commit records the bronze version of its merge and the silver version it logs: a
    merge that did not commit after it leaves the log ahead of silver, and its next
    attempt replaces those rows (appended again, the log would hold them twice).
    """
    where = change_log(table.name)
    if not lake.exists(*where):
        _start_change_log(lake, table)
    order = list(table.change_key)
    con = duckdb_connection()
    con.register("batch", latest.select(order))
    if matched is not None:
        con.register("replaced", matched.select(order))
    version, ahead = log_version(lake, table)
    replaced = None if matched is None else "replaced"
    rows = con.sql(logged_sql(table, "batch", replaced, version)).to_arrow_table()
    meta = {LOGGED_KEY: str(version), BRONZE_VERSION_KEY: str(bronze_version)}
    if not ahead:
        con.close()
        lake.write(rows, *where, mode="append", metadata=meta)
        return
    register(con, lake, "log", *where, positions=True)
    stale = con.sql(
        f"SELECT filename, file_row_number FROM log WHERE silver_version >= {version}"
    ).to_arrow_table()
    con.close()
    lake.delete_and_append(*where, deletes=rows_by_file(stale), rows=rows, metadata=meta)


def _resolve_sql(table: SourceTable, feed: str) -> str:
    """Latest row per key by (versionnumber, SinkModifiedOn); keys compared trimmed.
    `feed` is a view with each row's position (`register(..., positions=True)`).

    Most keys of a feed have one row (an initial export holds each row once), so only
    the rows of keys seen more than once are ranked (in the 1M lake's salesline feed,
    a few percent of its rows): a window over every row costs far more than grouping
    the keys and ranking those. The ranking sees only the key, the order and each row's
    position, and the winners are then fetched by position: a window carrying all ~40
    columns is several times the CPU over salestable's many repeated rows.
    Null keys are one group, as in PARTITION BY. `f` is not materialised (it is the whole
    feed), `d` and `w` are (they are small, or narrow).
    DuckDB only: it ranks rows by their position in their Parquet file, which Spark's
    readers do not give; the Spark engine runs `latest_sql`, whose result is the same.
    """
    exprs = key_exprs(table)
    ks = ", ".join(f"_k{i}" for i in range(len(exprs)))
    named = ", ".join(f"{e} AS _k{i}" for i, e in enumerate(exprs))
    on = " AND ".join(f"f._k{i} IS NOT DISTINCT FROM d._k{i}" for i in range(len(exprs)))
    position = "filename, file_row_number"
    return f"""WITH f AS NOT MATERIALIZED (SELECT *, {named} FROM {feed}),
                 d AS MATERIALIZED (SELECT {ks} FROM f GROUP BY {ks} HAVING COUNT(*) > 1),
                 w AS MATERIALIZED (SELECT {position} FROM (
                   SELECT {position}, ROW_NUMBER() OVER (PARTITION BY {ks}
                          ORDER BY {resolve_order()}) AS _rn
                   FROM f SEMI JOIN d ON {on}) WHERE _rn = 1)
               SELECT * EXCLUDE ({ks}, {position}) FROM f ANTI JOIN d ON {on}
               UNION ALL
               SELECT * EXCLUDE ({ks}, {position}) FROM f SEMI JOIN w USING ({position})"""


def last_bronze_current(lake: Lake, name: str) -> int | None:
    """The bronze current-state count recorded by the last silver commit, if any."""
    if not lake.exists("silver", name):
        return None
    found = [
        int(m[BRONZE_CURRENT_KEY])
        for m in lake.commit_metadata("silver", name)
        if BRONZE_CURRENT_KEY in m
    ]
    return found[-1] if found else None


def _matched(
    lake: Lake, where: tuple[str, ...], table: SourceTable, latest: pa_arrow.Table
) -> pa_arrow.Table | None:
    """The rows of a current-state table (silver or its quarantine) whose key the batch
    holds, with what a merge uses of them: key, version, change key and position (None:
    no table yet). One scan serves the accounting, the change log and the merge, which
    scanned the table each (a scan of salesline's keys per merge, at 1M customers)."""
    if not lake.exists(*where):
        return None
    con = duckdb_connection()
    con.register("b", latest.select(list(table.key)))
    register(con, lake, "t", *where, positions=True)
    used = [*table.key, "versionnumber", "SinkModifiedOn", *table.change_key]
    columns = ", ".join(f'"{c}"' for c in dict.fromkeys(used))
    keys = ", ".join(f'"{k}"' for k in table.key)
    found = con.sql(
        f"SELECT {columns}, filename, file_row_number FROM t SEMI JOIN b USING ({keys})"
    ).to_arrow_table()
    con.close()
    return found


def _current_delta(
    table: SourceTable, latest: pa_arrow.Table, matched: Iterable[pa_arrow.Table | None]
) -> int:
    """How a resolved batch moves the count of current keys, from the state before it.

    A key is current before the batch iff it is in silver or its quarantine (the
    invariant the accounting checks; `matched`: their rows of the batch's keys). The
    batch adds the keys it brings that were not current and are not deleted, and removes
    current keys whose newest version in the batch is a newer delete; older (late)
    versions change nothing.
    """
    con = duckdb_connection()
    cols = [*table.key, "versionnumber", "SinkModifiedOn"]
    con.register("b", latest.select([*cols, "IsDelete"]))
    listed = ", ".join(f'"{c}"' for c in cols)
    scans = [f"SELECT {listed} FROM b WHERE false"]  # the columns' types when both are new
    for i, rows in enumerate(m for m in matched if m is not None):
        con.register(f"t{i}", rows)
        scans.append(f"SELECT {listed} FROM t{i}")
    on = " AND ".join(f'b."{k}" = t."{k}"' for k in table.key)
    newer = NEWER.replace("s.", "b.")
    added, removed = con.execute(
        f"""SELECT
              COUNT(*) FILTER (WHERE t.versionnumber IS NULL AND NOT COALESCE(b.IsDelete, FALSE)),
              COUNT(*) FILTER (WHERE t.versionnumber IS NOT NULL AND COALESCE(b.IsDelete, FALSE)
                               AND {newer})
            FROM b LEFT JOIN ({" UNION ALL ".join(scans)}) t ON {on}"""
    ).fetchall()[0]
    return int(added) - int(removed)


NEWER = (
    "(s.versionnumber > t.versionnumber OR (s.versionnumber = t.versionnumber "
    "AND s.SinkModifiedOn >= t.SinkModifiedOn))"
)


def silver_arrow_schema(table: SourceTable, quarantine: bool = False) -> pa_arrow.Schema:
    """Arrow schema of a silver (or silver quarantine) table: typed source columns + lineage."""
    fields = [pa_arrow.field(c.name, c.arrow_type) for c in table.columns if c.name not in DROPPED]
    fields += [
        pa_arrow.field("_source_file", pa_arrow.string()),
        pa_arrow.field("_batch_id", pa_arrow.string()),
    ]
    if quarantine:
        fields.append(pa_arrow.field(REASON, pa_arrow.string()))
    return pa_arrow.schema(fields)


def _apply(
    lake: Lake,
    where: tuple[str, ...],
    key: tuple[str, ...],
    upsert: pa_arrow.Table,
    remove: pa_arrow.Table,
    schema: pa_arrow.Schema,
    meta: dict[str, str],
    matched: pa_arrow.Table | None,
) -> None:
    """Merge upserts and removals into a current-state table in one Delta commit, without
    rewriting its files: the rows they replace or remove are deleted by position (deletion
    vectors) and the upserts appended (`Lake.delete_and_append`). delta-rs' merge rewrote
    every file holding a matched row, and a sync's changes lie in every file.

    `matched`: the table's rows of the keys merged, with their positions (`_matched`).
    The version guard keeps a late-arriving older change from overwriting a newer one:
    a matched row is replaced or removed only by a newer version, and a source row whose
    key holds a newer version is dropped.
    """
    action = pa_arrow.field(ACTION, pa_arrow.string())

    def tagged(rows: pa_arrow.Table, what: str) -> pa_arrow.Table:
        cols = [
            rows[f.name] if f.name in rows.column_names else pa_arrow.nulls(len(rows), f.type)
            for f in schema
        ]
        cols.append(pa_arrow.array([what] * len(rows), pa_arrow.string()))
        return pa_arrow.Table.from_arrays(cols, schema=schema.append(action)).cast(
            schema.append(action)
        )

    if matched is None:  # no table yet
        lake.write(tagged(upsert, "upsert").drop_columns([ACTION]), *where, mode="overwrite",
                   metadata=meta)  # fmt: skip
        return
    source = pa_arrow.concat_tables([tagged(upsert, "upsert"), tagged(remove, "remove")])
    source = source.append_column(ROW, pa_arrow.array(np.arange(len(source))))
    con = duckdb_connection()
    con.register("s", source)
    con.register("t", matched)
    on = " AND ".join(f's."{k}" = t."{k}"' for k in key)
    matched = con.sql(
        f"""SELECT s.{ROW} AS row, t.filename, t.file_row_number, COALESCE({NEWER}, FALSE) AS newer
            FROM s JOIN t ON {on}"""
    ).to_arrow_table()
    con.close()
    newer = matched["newer"].to_numpy(zero_copy_only=False)
    deletes = rows_by_file(matched.filter(pa_arrow.array(newer)))
    stale = pa_arrow.array(matched["row"].to_numpy()[~newer])
    appended = source.filter(
        pc.and_(pc.equal(source[ACTION], "upsert"), pc.invert(pc.is_in(source[ROW], stale)))
    )
    lake.delete_and_append(
        *where, deletes=deletes, rows=appended.drop_columns([ACTION, ROW]), metadata=meta
    )


def purge_accounting(lake: Lake, name: str) -> CommitProperties | None:
    """Commit metadata for an erasure's delete of silver rows, made after it deleted the
    same person's bronze rows: the bronze current-state count recounted, so the next
    build's accounting balances once the quarantined rows are gone too, and a rerun of a
    killed erasure records the same count again. None when nothing is recorded yet."""
    if last_bronze_current(lake, name) is None:
        return None
    table = next(t for t in SOURCE_TABLES.values() if t.name == name)
    return CommitProperties(
        custom_metadata={BRONZE_CURRENT_KEY: str(bronze_current_rows(lake, table))}
    )


def _count(lake: Lake, *parts: str) -> int:
    return lake.count(*parts) if lake.exists(*parts) else 0


def bronze_current_rows(lake: Lake, table: SourceTable) -> int:
    """Keys whose newest bronze version is not a delete (the accounting's left side):
    a hash aggregate over the key and version columns of the bronze files."""
    con = duckdb_connection()
    register(con, lake, "feed", "bronze", table.source, table.name)
    keys = ", ".join(key_exprs(table))
    return con.execute(
        f"""SELECT COUNT(*) FILTER (WHERE NOT COALESCE(gone, FALSE)) FROM (
              SELECT arg_max(IsDelete, (versionnumber, "SinkModifiedOn")) AS gone
              FROM feed GROUP BY {keys})"""
    ).fetchall()[0][0]


# The text of an instant, as the generic SQL makes an order id of it: DuckDB's cast of a
# TIMESTAMPTZ to text (UTC sessions) ends in the offset, Spark's cast of a TIMESTAMP does
# not and is otherwise the same ("2024-01-02 03:04:05.12"), so Spark's form adds it.
# A dialect difference that no one expression covers; tests/spark/test_silver.py runs both.
TIMESTAMP_TEXT: dict[Dialect, str] = {
    "duckdb": "CAST({} AS VARCHAR)",
    "spark": "CONCAT(CAST({} AS STRING), '+00')",
}
# The SQL type of a null for a generic column the mapping leaves out.
_NULL_TYPES = {pa_arrow.string(): "str", pa_arrow.float64(): "float64", pa_arrow.bool_(): "bool",
               pa_arrow.int64(): "int64", INGESTED_TYPE: "datetime64[us, UTC]"}  # fmt: skip


def generic_canonical_sql(mapping: dict[str, str], bronze: str, dialect: Dialect = "duckdb") -> str:
    """The generic bronze rows (view `bronze`) under the canonical column names the
    mapping gives them (null where it names none), plus `timestamp_text`: the view
    `generic_canonical` that pipelines/sql/silver/generic_transactions.sql reads."""
    from c360ml.medallion.ingest import GENERIC_COLUMNS

    def column(c) -> str:
        if c.name in mapping:
            return ident(mapping[c.name], dialect)
        return f"CAST(NULL AS {SQL_TYPES[dialect][_NULL_TYPES[c.arrow_type]]})"

    cols = [f"{column(c)} AS {ident(c.name, dialect)}" for c in GENERIC_COLUMNS]
    text = TIMESTAMP_TEXT[dialect].format(column(GENERIC_COLUMNS[1]))
    return f"SELECT {', '.join(cols)}, {text} AS timestamp_text FROM {bronze}"


def build_generic_silver(lake: Lake, settings: Settings) -> SilverResult | None:
    """Generic transactions: renamed to canonical columns by the YAML mapping, deduplicated.

    No change feed here, so it is rebuilt (cheaply, in DuckDB) when bronze has moved.
    """
    from c360ml.medallion.ingest import load_generic_mapping
    from c360ml.medallion.sql import run_sql

    if not lake.exists("bronze", "generic", "transactions"):
        return None
    started = time.perf_counter()
    bronze_version = lake.version("bronze", "generic", "transactions")
    result = SilverResult("generic_transactions")
    bronze = lake.read("bronze", "generic", "transactions")
    result.bronze_current = len(bronze)
    if _last_recorded(lake, "generic_transactions", BRONZE_VERSION_KEY) != bronze_version:
        mapping = load_generic_mapping(settings.path(settings.generic_mapping))["columns"]
        con = duckdb_connection()
        con.register("generic_bronze", bronze)
        con.execute(
            "CREATE OR REPLACE TEMP VIEW generic_canonical AS "
            + generic_canonical_sql(mapping, "generic_bronze")
        )
        table = run_sql(con, settings, "silver/generic_transactions")
        lake.write(
            table,
            "silver",
            "generic_transactions",
            mode="overwrite",
            metadata={BRONZE_VERSION_KEY: str(bronze_version)},
        )
    result.silver_rows = _count(lake, "silver", "generic_transactions")
    result.duplicates = result.bronze_current - result.silver_rows
    result.seconds = time.perf_counter() - started
    return result


@writes_lake("build silver")
def build_silver(settings: Settings) -> SilverSummary:
    """Every bronze source table -> its silver table (incrementally)."""
    lake = Lake(settings.lake)
    summary = SilverSummary()
    generic = build_generic_silver(lake, settings)
    if generic is not None:
        summary.items.append(generic)
    tables = [
        t for (source, name), t in SOURCE_TABLES.items() if lake.exists("bronze", source, name)
    ]
    pending = {t.name: _pending_rows(lake, t) for t in tables}
    small = [t for t in tables if pending[t.name] is not None and pending[t.name] < PARALLEL_ROWS]
    with ThreadPoolExecutor(PARALLEL_MERGES) as pool:
        done = pool.map(partial(build_silver_table, lake), small)
        merged = dict(zip([t.name for t in small], done, strict=True))
    for table in tables:
        result = merged.get(table.name) or build_silver_table(lake, table)
        if not result.balanced:
            raise RuntimeError(f"silver/{table.name}: accounting broken: {result}")
        summary.items.append(result)
    return summary


def _pending_rows(lake: Lake, table: SourceTable) -> int | None:
    """Rows in the bronze files added since silver's last merge (None: none yet), from
    the Delta log (an upper bound: erasures rewrite files)."""
    since = _last_recorded(lake, table.name, BRONZE_VERSION_KEY)
    if since is None:
        return None
    where = ("bronze", table.source, table.name)
    try:
        old = pa_arrow.table(lake.delta_at(*where, version=since).get_add_actions())["path"]
    except (DeltaError, OSError):  # history cut by an erasure: no estimate
        return None
    now = pa_arrow.table(lake.delta(*where).get_add_actions(flatten=True))
    return pc.sum(now["num_records"].filter(pc.invert(pc.is_in(now["path"], old)))).as_py() or 0
