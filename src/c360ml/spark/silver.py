"""Silver on Spark: bronze's change feeds resolved into the current state of each source
table, standardised, checked and split into silver and its quarantine, by Spark.

The same declarations as the DuckDB engine (`c360ml.medallion.silver`): the resolution
(`latest_sql`: newest version per trimmed key), the checks of each table's pandera schema
in Spark's dialect (`c360ml.medallion.checks`), the change log's rows (`logged_sql`) and
the generic source's canonical view and SQL file. The per-row Python work (every string
trimmed, e-mails, phones and countries standardised) runs on the executors in
`mapInArrow`, around the same pure functions DuckDB's path calls (`trim_strings`,
`standardise`, with `normalise_phones_arrow`); nothing comes back to the driver but counts.

Incremental, as a rebuild: where the DuckDB engine merges the new bronze rows into silver
with deletion vectors, Spark rebuilds a table whose bronze has new rows from its whole
change feed, one overwrite commit of silver and one of its quarantine. Sail (0.7.2) writes
deletion vectors only for tables with the `delta.enableDeletionVectors` property, which
c360ml's tables do not set (they have the reader feature): on them its DELETE and MERGE
rewrite every file holding a matched row, and a sync's changes lie in most files, so a
MERGE would rewrite about what the rebuild writes. The tables are equal: the newest
version of each key is the same whichever way it is found (a late, older version loses
both ways). Each commit records what DuckDB's records (the bronze version, the bronze
current-state count, the ingest watermark), and the change log gets the rows DuckDB's
merge would log, so either engine continues the other's work; a table whose bronze has
no new rows is not written.

Spark reads and writes the lake's tables through `SparkTables` (`c360ml.spark.gold`):
Delta by default, what every platform uses (Apache Spark's own local mode gets parquet in
the tests, where Delta's jars cannot be fetched). The bookkeeping goes through `Lake` on
the driver whatever the format: commit metadata, counts, the change logs' start. One
operation is Delta's only: the DELETE of a change log's rows that are ahead of silver,
left by a DuckDB merge stopped after its log commit. A first build never meets it (it
logs nothing, it starts the log empty); a format without row deletes refuses it in one
line naming the log.

A failure raises `SparkBuildError` (one line naming the table) and stops the build at
that table: the tables before it are written whole, its silver and quarantine are as
they were (each write is one Delta commit; its change log may be ahead of silver, a
superset that the next merge, on either engine, replaces).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import pyarrow as pa

from c360ml.config import Settings
from c360ml.medallion.checks import REASON, ident, sql_checks, upgrade_quarantine
from c360ml.medallion.silver import (
    BRONZE_CURRENT_KEY,
    BRONZE_INGESTED_KEY,
    BRONZE_VERSION_KEY,
    INGESTED_AT,
    LOGGED_KEY,
    SILVER_SCHEMAS,
    SilverResult,
    SilverSummary,
    _count,
    _last_recorded,
    _start_change_log,
    change_log,
    generic_canonical_sql,
    key_exprs,
    last_bronze_current,
    latest_sql,
    live,
    log_version,
    logged_sql,
    silver_arrow_schema,
    standardise,
    trim_strings,
)
from c360ml.medallion.sql import sql_text
from c360ml.sources.tables import SOURCE_TABLES, SourceTable
from c360ml.spark.gold import DELTA, SparkBuildError, SparkTables, _first_line, _spark_errors
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

GENERIC = ("bronze", "generic", "transactions")
# Arrow type of a silver column -> its Spark SQL type (mapInArrow's declared output).
SPARK_TYPES = {
    pa.string(): "STRING",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP",
}


def _q(name: str) -> str:
    return ident(name, "spark")


def spark_ddl(schema: pa.Schema) -> str:
    """An Arrow schema as the DDL string Spark takes for mapInArrow's output."""
    return ", ".join(f"{_q(f.name)} {SPARK_TYPES[f.type]}" for f in schema)


def source_table(name: str) -> SourceTable:
    return next(t for t in SOURCE_TABLES.values() if t.name == name)


def standardise_batches(name: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow's function, on the executors: each batch of table `name`'s resolved rows
    typed as silver declares them (Spark may hand strings over as large or view strings),
    trimmed and standardised by the functions DuckDB's path calls. A module function,
    so it is pickled by reference: the workers import c360ml."""
    schema = silver_arrow_schema(source_table(name))
    declared = SILVER_SCHEMAS[name]
    for batch in batches:
        rows = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
        yield from standardise(trim_strings(rows), declared).cast(schema).to_batches()


@contextmanager
def _spark_step(where: str) -> Iterator[None]:
    """A Spark error inside becomes one SparkBuildError line naming `where`."""
    try:
        yield
    except SparkBuildError:
        raise
    except _spark_errors() as exc:
        raise SparkBuildError(f"{where}: Spark failed: {_first_line(exc)}") from exc


def _feed_counts(spark: SparkSession, feed: str, watermark: int | None) -> tuple[int, int | None]:
    """(bronze rows ingested after the watermark (every row without one), the newest
    ingest time in microseconds): one aggregate, two numbers to the driver."""
    after = "TRUE" if watermark is None else f"{_q(INGESTED_AT)} > TIMESTAMP_MICROS({watermark})"
    new, newest = spark.sql(
        f"SELECT COUNT_IF({after}), UNIX_MICROS(MAX({_q(INGESTED_AT)})) FROM {feed}"
    ).first()
    return int(new), None if newest is None else int(newest)


def current_sql(table: SourceTable, feed: str) -> str:
    """The current rows of view `feed` (the newest version of each key, delete markers
    dropped), with silver's columns, as bronze holds them."""
    schema = silver_arrow_schema(table)
    columns = ", ".join(_q(c) for c in schema.names)
    resolved = latest_sql(table, feed, [*schema.names, "IsDelete"], "spark")
    return f"SELECT {columns} FROM ({resolved}) latest WHERE {live('spark')}"


def checked(spark: SparkSession, table: SourceTable, feed: str) -> DataFrame:
    """The current rows of the feed standardised on the executors, each given its
    `quarantine_reason` (null: valid) by the schema's checks in Spark SQL, as a temp view
    named `c360ml_silver_<table>`. Cached, as silver and its quarantine both read it: on
    Spark the Python work runs once; Sail takes `cache` as a no-op and runs it for each."""
    standardised = spark.sql(current_sql(table, feed)).mapInArrow(
        partial(standardise_batches, table.name), spark_ddl(silver_arrow_schema(table))
    )
    view = f"c360ml_silver_{table.name}"
    standardised.createOrReplaceTempView(f"{view}_standardised")
    checks = sql_checks(SILVER_SCHEMAS[table.name], "spark")
    frame = spark.sql(checks.checked_sql(f"{view}_standardised")).cache()
    frame.createOrReplaceTempView(view)
    return frame


def _log_changes(
    spark: SparkSession,
    lake: Lake,
    table: SourceTable,
    feed: str,
    watermark: int | None,
    bronze_version: int,
    tables: SparkTables = DELTA,
) -> None:
    """The change log's rows of this rebuild, as DuckDB's merge of the same new bronze
    rows logs them (`c360ml.medallion.silver._log_changes`): the change keys of the
    resolved new rows and of the silver rows of their keys, logged before silver is
    written. A log ahead of silver (a merge that did not commit) loses that merge's rows
    first (`tables.delete`: Delta's DELETE; a format without row deletes refuses it), as
    DuckDB's replaces them. A first build logs nothing (it starts the log empty)."""
    where = change_log(table.name)
    if not lake.exists(*where):
        _start_change_log(lake, table)
    after = "" if watermark is None else f"WHERE {_q(INGESTED_AT)} > TIMESTAMP_MICROS({watermark})"
    spark.sql(f"SELECT * FROM {feed} {after}").createOrReplaceTempView(f"{feed}_new")
    keys = key_exprs(table, "spark")
    named = [*(f"{e} AS _k{i}" for i, e in enumerate(keys))]
    # Trimmed as `trim_strings` trims them in DuckDB's batch (blank: null).
    changed = [f"NULLIF(TRIM({_q(c)}), '') AS {_q(c)}" for c in table.change_key]
    resolved = latest_sql(table, f"{feed}_new", [*table.key, *table.change_key], "spark")
    spark.sql(f"SELECT {', '.join(named + changed)} FROM ({resolved}) r").createOrReplaceTempView(
        f"{feed}_batch"
    )
    replaced = None
    if lake.exists("silver", table.name):
        tables.read(spark, lake, ("silver", table.name)).createOrReplaceTempView(f"{feed}_silver")
        on = " AND ".join(f"s.{_q(k)} = b._k{i}" for i, k in enumerate(table.key))
        spark.sql(
            f"SELECT s.* FROM {feed}_silver s LEFT SEMI JOIN {feed}_batch b ON {on}"
        ).createOrReplaceTempView(f"{feed}_replaced")
        replaced = f"{feed}_replaced"
    version, ahead = log_version(lake, table)
    rows = spark.sql(logged_sql(table, f"{feed}_batch", replaced, version, "spark"))
    if ahead:
        tables.delete(spark, lake, where, f"silver_version >= {version}")
    meta = {LOGGED_KEY: str(version), BRONZE_VERSION_KEY: str(bronze_version)}
    tables.append(rows, lake, where, meta)


def _rebuild(
    spark: SparkSession,
    lake: Lake,
    table: SourceTable,
    view: str,
    meta: dict[str, str],
    tables: SparkTables = DELTA,
) -> None:
    """Silver then its quarantine, each one overwrite commit recording `meta` (the
    quarantine's is a merge's last: DuckDB finds a merge done when it is there)."""
    names = ", ".join(_q(c) for c in silver_arrow_schema(table).names)
    reason = _q(REASON)
    valid = spark.sql(f"SELECT {names} FROM {view} WHERE {reason} IS NULL")
    tables.write(valid, lake, ("silver", table.name), meta)
    rejected = spark.sql(f"SELECT {names}, {reason} FROM {view} WHERE {reason} IS NOT NULL")
    tables.write(rejected, lake, ("quarantine", "silver", table.name), meta)


def build_silver_table(
    spark: SparkSession, lake: Lake, table: SourceTable, tables: SparkTables = DELTA
) -> SilverResult:
    """One source table's silver and quarantine: nothing written when bronze has no rows
    newer than silver's last build and that build finished (its quarantine records the
    same bronze version as silver); else rebuilt from the whole change feed."""
    started = time.perf_counter()
    result = SilverResult(table.name)
    name = table.name
    upgrade_quarantine(lake, "quarantine", "silver", name)  # (a lake from before #23)
    bronze_version = lake.version("bronze", table.source, name)
    since = _last_recorded(lake, name, BRONZE_VERSION_KEY)
    finished = since is not None and since == _last_recorded(
        lake, name, BRONZE_VERSION_KEY, layer="quarantine"
    )
    watermark = None if since is None else _last_recorded(lake, name, BRONZE_INGESTED_KEY)
    feed = f"c360ml_bronze_{name}"
    tables.read(spark, lake, ("bronze", table.source, name)).createOrReplaceTempView(feed)
    new, newest = 0, None
    if not (finished and since == bronze_version):
        new, newest = _feed_counts(spark, feed, watermark)
    if finished and new == 0:
        if table.change_key and not lake.exists(*change_log(name)):
            _start_change_log(lake, table)  # (a first build killed before it started it)
        result.bronze_current = last_bronze_current(lake, name) or 0
    else:
        result.new_bronze_rows = new
        # The accounting's left side, counted before the Python work and the checks
        # (which the written tables' counts must then balance).
        result.bronze_current = spark.sql(
            f"SELECT COUNT(*) FROM ({current_sql(table, feed)}) live_rows"
        ).first()[0]
        frame = checked(spark, table, feed)
        meta = {
            BRONZE_VERSION_KEY: str(bronze_version),
            BRONZE_CURRENT_KEY: str(result.bronze_current),
        }
        if newest is not None:
            meta[BRONZE_INGESTED_KEY] = str(newest)
        if table.change_key and since is not None and new:
            _log_changes(spark, lake, table, feed, watermark, bronze_version, tables)
        _rebuild(spark, lake, table, f"c360ml_silver_{name}", meta, tables)
        frame.unpersist()
        if table.change_key and since is None:
            _start_change_log(lake, table)
        log.info("silver/%s rebuilt on Spark", name)
    result.silver_rows = _count(lake, "silver", name)
    result.quarantined = _count(lake, "quarantine", "silver", name)
    result.seconds = time.perf_counter() - started
    return result


def build_generic_silver(
    spark: SparkSession, lake: Lake, settings: Settings, tables: SparkTables = DELTA
) -> SilverResult | None:
    """Generic transactions: the canonical view (`generic_canonical_sql`, Spark's dialect)
    and the same SQL file as DuckDB, rebuilt when bronze has moved."""
    from c360ml.medallion.ingest import load_generic_mapping

    if not lake.exists(*GENERIC):
        return None
    started = time.perf_counter()
    result = SilverResult("generic_transactions")
    bronze_version = lake.version(*GENERIC)
    tables.read(spark, lake, GENERIC).createOrReplaceTempView("c360ml_generic_bronze")
    result.bronze_current = spark.table("c360ml_generic_bronze").count()
    if _last_recorded(lake, "generic_transactions", BRONZE_VERSION_KEY) != bronze_version:
        mapping = load_generic_mapping(settings.path(settings.generic_mapping))["columns"]
        canonical = generic_canonical_sql(mapping, "c360ml_generic_bronze", "spark")
        spark.sql(canonical).createOrReplaceTempView("generic_canonical")
        rows = spark.sql(sql_text(settings, "silver/generic_transactions"))
        meta = {BRONZE_VERSION_KEY: str(bronze_version)}
        tables.write(rows, lake, ("silver", "generic_transactions"), meta)
    result.silver_rows = _count(lake, "silver", "generic_transactions")
    result.duplicates = result.bronze_current - result.silver_rows
    result.seconds = time.perf_counter() - started
    return result


def make_silver(
    settings: Settings, spark: SparkSession, tables: SparkTables = DELTA
) -> SilverSummary:
    """Every bronze source table's silver made on Spark, the generic source first, then
    the declared source tables in order (as the DuckDB engine lists them). Spark reads
    and writes the tables through `tables` (Delta by default); the bookkeeping (commit
    metadata, counts, the change logs' start) goes through `Lake` on the driver."""
    lake = Lake(settings.lake)
    summary = SilverSummary()
    with _spark_step("silver/generic_transactions"):
        generic = build_generic_silver(spark, lake, settings, tables)
    if generic is not None:
        summary.items.append(generic)
    for (source, name), table in SOURCE_TABLES.items():
        if not lake.exists("bronze", source, name):
            continue
        with _spark_step(f"silver/{name}"):
            result = build_silver_table(spark, lake, table, tables)
        if not result.balanced:
            raise RuntimeError(f"silver/{name}: accounting broken: {result}")
        summary.items.append(result)
    return summary


@writes_lake("build silver")
def build_silver(
    settings: Settings, spark: SparkSession, tables: SparkTables = DELTA
) -> SilverSummary:
    """`make_silver` under the lake's lease (one writer per lake)."""
    return make_silver(settings, spark, tables)


__all__ = ["build_silver", "make_silver", "standardise_batches"]
