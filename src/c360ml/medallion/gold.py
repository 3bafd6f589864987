"""Gold: the unified profile, activity and supporting tables, keyed by customer_id.

Gold is built from silver by the SQL in `pipelines/sql/gold/`, each query's result
streamed batch by batch into its Delta commit (memory holds a batch, not a 20M-row
table). The order tables (orders, lines, status history) are partitioned by the order's
month: after the first build, a build finds the orders changed since the last one
(bronze rows ingested since, accounts changed, records unify re-assigned) and recomputes
only the months that hold them, by the same SQL over silver narrowed to those months,
swapping those partitions in one commit per table. Why months and not a row merge: a
refresh's new orders and status changes sit in the last month or two, while a merge
would rewrite every file holding any changed row (and scan all of them); and each month
is still exactly what the SQL gives, so partial builds cannot drift (a test compares them
with a build from scratch). The small tables are rebuilt. A table is written only when
its inputs' versions changed, so a build with nothing new adds no Delta versions.
Orders and lines that cannot be tied to a profile go to `quarantine/gold/<table>` with a
reason, never away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import duckdb
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.lake import Lake
from c360ml.medallion.sql import connect, render, run_sql
from c360ml.schemas import (
    OrderLines,
    Orders,
    Products,
    StatusHistory,
    SupportCases,
)

log = logging.getLogger(__name__)

INPUTS_KEY = "c360ml.inputs"
REASON = "quarantine_reason"


@dataclass
class GoldSummary:
    tables: list[dict] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return self.tables


def lake_versions(lake: Lake) -> dict[str, int]:
    """Versions of every bronze/silver table and the source map: what gold is built from."""
    found = {
        f"{layer}/{'/'.join(p)}": lake.version(layer, *p)
        for layer in ("bronze", "silver")
        for p in lake.tables(layer)
    }
    found["gold/customer_source_map"] = lake.version("gold", "customer_source_map")
    return found


def inputs_unchanged(lake: Lake, where: tuple[str, ...], inputs: dict) -> bool:
    if not lake.exists(*where):
        return False
    metas = [m for m in lake.commit_metadata(*where) if INPUTS_KEY in m]
    return bool(metas) and json.loads(metas[-1][INPUTS_KEY]) == inputs


# pandera dtype (as the gold models declare it) -> the Arrow type of the lake column.
ARROW_TYPES = {
    "str": pa_arrow.string(),
    "int64": pa_arrow.int64(),
    "float64": pa_arrow.float64(),
    "bool": pa_arrow.bool_(),
    "datetime64[us, UTC]": pa_arrow.timestamp("us", tz="UTC"),
}
# pandera's built-in checks as Arrow compute: (values, statistics) -> rows that fail.
ARROW_CHECKS = {
    "greater_than_or_equal_to": lambda v, st: pc.less(v, st["min_value"]),
    "greater_than": lambda v, st: pc.less_equal(v, st["min_value"]),
    "less_than_or_equal_to": lambda v, st: pc.greater(v, st["max_value"]),
    "less_than": lambda v, st: pc.greater_equal(v, st["max_value"]),
    "isin": lambda v, st: pc.invert(pc.is_in(v, pa_arrow.array(st["allowed_values"]))),
    "notin": lambda v, st: pc.is_in(v, pa_arrow.array(st["forbidden_values"])),
}


class ArrowCheck:
    """A pandera gold model applied in Arrow, one batch at a time.

    The same declaration as pandera would check, without a pandas round trip (gold
    tables have 20M rows) and without holding a whole table: types (coerce),
    nullability and pandera's built-in column checks per batch; uniqueness over every
    batch seen, at `finish()`. Models that use anything else (custom or frame-wide
    checks) are refused here.
    """

    def __init__(self, model: type[pa.DataFrameModel], where: str):
        schema = model.to_schema()
        unsupported = bool(schema.checks) or any(
            str(c.dtype) not in ARROW_TYPES or any(k.name not in ARROW_CHECKS for k in c.checks)
            for c in schema.columns.values()
        )
        if unsupported:
            raise TypeError(f"{where}: {model.__name__} has checks ArrowCheck cannot apply")
        self.where = where
        self.columns = schema.columns
        self.schema = pa_arrow.schema(
            [(n, ARROW_TYPES[str(c.dtype)]) for n, c in schema.columns.items()]
        )
        self.seen: dict[str, list] = {n: [] for n, c in schema.columns.items() if c.unique}
        self.rows = 0

    def __call__(self, table: pa_arrow.Table) -> pa_arrow.Table:
        """The batch with the declared columns, coerced; raises naming every failed check."""
        problems, arrays = [], []
        for name, col in self.columns.items():
            if name not in table.column_names:
                problems.append(f"{name}: column missing")
                continue
            try:
                values = table[name].cast(self.schema.field(name).type)
            except (pa_arrow.ArrowInvalid, pa_arrow.ArrowNotImplementedError) as exc:
                problems.append(f"{name}: cannot coerce to {col.dtype}: {exc}")
                continue
            arrays.append(values)
            if not col.nullable and values.null_count:
                problems.append(f"{name}: not_nullable ({values.null_count} nulls)")
            for check in col.checks:
                failed = pc.sum(pc.fill_null(ARROW_CHECKS[check.name](values, check.statistics),
                                             False)).as_py()  # fmt: skip
                if failed:
                    problems.append(f"{name}: {check.name}({check.statistics}) fails {failed} rows")
            if name in self.seen:
                self.seen[name].append(values)
        self._raise(problems)
        self.rows += len(table)
        return pa_arrow.Table.from_arrays(arrays, schema=self.schema)

    def finish(self) -> None:
        """Uniqueness over everything checked so far."""
        problems = []
        for name, parts in self.seen.items():
            values = pa_arrow.chunked_array(
                [c for p in parts for c in p.chunks], self.schema.field(name).type
            )
            if pc.count_distinct(values, mode="all").as_py() != len(values):
                problems.append(f"{name}: field_uniqueness (duplicates)")
        self._raise(problems)

    def _raise(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"{self.where} fails its schema:\n" + "\n".join(problems[:20]))


def validate_arrow(
    table: pa_arrow.Table, model: type[pa.DataFrameModel], where: str
) -> pa_arrow.Table:
    """A whole table checked against its gold model (see ArrowCheck)."""
    check = ArrowCheck(model, where)
    checked = check(table)
    check.finish()
    return checked


def write_gold(
    lake: Lake,
    name: str,
    table: pa_arrow.Table,
    model: type[pa.DataFrameModel],
    inputs: dict,
) -> bool:
    """Validate against the declared schema and overwrite, unless inputs are unchanged.

    Returns whether a new version was written.
    """
    if inputs_unchanged(lake, ("gold", name), inputs):
        return False
    checked = validate_arrow(table, model, f"gold/{name}")
    lake.write(checked, "gold", name, mode="overwrite", metadata={INPUTS_KEY: json.dumps(inputs)})
    return True


def stream_gold(
    lake: Lake,
    name: str,
    readers: list[pa_arrow.RecordBatchReader],
    model: type[pa.DataFrameModel],
    inputs: dict,
    quarantine: bool,
    months: list[str] | None = None,
    kept_quarantine: pa_arrow.Table | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Query results -> one gold commit, batch by batch; (rows, quarantined rows).

    With `quarantine`, rows with a `quarantine_reason` go to `quarantine/gold/<name>`
    instead (written after the gold commit, with `kept_quarantine`: the earlier rows the
    queries did not recompute). The order tables are partitioned by MONTH; with `months`,
    only those partitions are replaced. Memory holds one batch, the quarantined rows and
    the unique columns, never the table: a check that fails (uniqueness at the end)
    raises inside the stream, so nothing is committed.
    """
    check = ArrowCheck(model, f"gold/{name}")
    partitioned = name in ORDER_TABLES
    schema = (
        check.schema.append(pa_arrow.field(MONTH, pa_arrow.string()))
        if partitioned
        else check.schema
    )
    rejected: list[pa_arrow.Table] = [] if kept_quarantine is None else [kept_quarantine]
    failed: list[ValueError] = []

    def batches():
        try:
            for reader in readers:
                for batch in reader:
                    rows = pa_arrow.Table.from_batches([batch])
                    if quarantine:
                        bad = pc.is_valid(rows[REASON])
                        rejected.append(rows.filter(bad))
                        rows = rows.filter(pc.invert(bad))
                    checked = check(rows)
                    if partitioned:
                        checked = checked.append_column(MONTH, month_of(rows[ORDER_TS]))
                    yield from checked.to_batches()
            check.finish()
        except ValueError as exc:
            failed.append(exc)  # the writer wraps it; re-raised as it was, below
            raise

    in_months = None if months is None else f"{MONTH} IN ({', '.join(repr(m) for m in months)})"
    reader = pa_arrow.RecordBatchReader.from_batches(schema, batches())
    try:
        if months == []:  # only quarantined rows changed (e.g. orphan lines): no partition
            if sum(len(b) for b in reader):
                raise RuntimeError(f"gold/{name}: rows outside the months being rebuilt")
        else:
            lake.write(
                reader,
                "gold",
                name,
                mode="overwrite",
                partition_by=[MONTH] if partitioned else None,
                metadata={INPUTS_KEY: json.dumps(inputs), **(metadata or {})},
                predicate=in_months,
            )
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    if not quarantine:
        return check.rows, 0
    bad = pa_arrow.concat_tables(
        rejected or [readers[0].schema.empty_table()], promote_options="permissive"
    )
    lake.write(bad, "quarantine", "gold", name, mode="overwrite")
    return check.rows, len(bad)


def month_of(ts: pa_arrow.ChunkedArray | pa_arrow.Array) -> pa_arrow.Array:
    """'YYYY-MM' of UTC timestamps: the partition of the order tables."""
    return pc.strftime(ts, format="%Y-%m")


# ---------------------------------------------------------------- incremental orders

# The order tables are partitioned by the month of the order's order_ts. A refresh's new
# orders and status changes fall in the last month or two, so a build recomputes only the
# months that hold a changed order (from the silver rows of those months, by the same SQL
# files) and swaps those partitions in one commit each; the other months are untouched.
ORDER_TABLES = ("orders", "order_lines", "order_status_history")
MONTH = "order_month"
ORDER_TS = "order_ts"
WATERMARK_KEY = "c360ml.gold_watermark"  # newest bronze _ingested_at / map assigned_at used
# Inputs that change order rows in ways the dirty-order search does not follow: a change
# of any (or of the SQL and its settings) rebuilds the order tables.
UNTRACKED = ("bronze/d365/inventtable", "silver/inventtable", "sql")
# bronze table -> SQL of the order id of each of its rows
ORDER_IDS = {
    "bronze_d365_salestable": "CONCAT('SO:', TRIM(dataareaid), '-', TRIM(salesid))",
    "bronze_d365_salesline": "CONCAT('SO:', TRIM(dataareaid), '-', TRIM(salesid))",
    "bronze_d365_retailtransactiontable": "CONCAT('POS:', TRIM(transactionid))",
    "bronze_d365_retailtransactionsalestrans": "CONCAT('POS:', TRIM(transactionid))",
}
HEADERS = {  # silver order header -> (order id, account key) SQL
    "silver_salestable": (
        "CONCAT('SO:', dataareaid, '-', salesid)",
        "CONCAT(dataareaid, '-', custaccount)",
    ),
    "silver_retailtransactiontable": (
        "CONCAT('POS:', transactionid)",
        "CONCAT(dataareaid, '-', custaccount)",
    ),
}
LINES = {  # silver order lines -> their header
    "silver_salesline": "silver_salestable",
    "silver_retailtransactionsalestrans": "silver_retailtransactiontable",
}


def watermarks(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """What this build has seen: the newest bronze ingest time (over the order and
    account tables) and the newest map assignment, as microseconds since the epoch."""
    newest = " UNION ALL ".join(
        f"SELECT MAX(_ingested_at) AS t FROM {t}"
        for t in [*ORDER_IDS, "bronze_d365_custtable", "bronze_d365_dirpartytable"]
    )
    bronze, assigned = con.execute(
        f"""SELECT epoch_us((SELECT MAX(t) FROM ({newest}))),
                   epoch_us((SELECT MAX(assigned_at) FROM gold_customer_source_map))"""
    ).fetchall()[0]
    return {"bronze": bronze or 0, "assigned": assigned or 0}


def previous_watermarks(lake: Lake, inputs: dict) -> dict[str, int] | None:
    """The watermarks of the last order-table build, when an incremental build can follow
    it: every order table partitioned and built from the same untracked inputs."""
    for name in ORDER_TABLES:
        if not lake.exists("gold", name) or MONTH not in lake.dataset("gold", name).schema.names:
            return None
    metas = [m for m in lake.commit_metadata("gold", "orders") if WATERMARK_KEY in m]
    if not metas:
        return None
    before = json.loads(metas[-1][INPUTS_KEY])
    if any(before.get(k) != inputs.get(k) for k in UNTRACKED):
        return None
    return json.loads(metas[-1][WATERMARK_KEY])


def dirty_months(con: duckdb.DuckDBPyConnection, since: dict[str, int]) -> list[str]:
    """Months holding an order changed since the watermarks (temp table dirty_orders).

    An order is changed when a bronze row of its header or lines arrived since, or its
    account did (custtable, dirpartytable) or was given another customer_id by unify.
    Bronze rows are followed by record id through all their versions, so a delete marker
    that carries only its key still names the order (or account) of its older versions.
    Months are taken from the order as silver has it now and as gold had it (a deleted
    or moved order's old month is rebuilt too).
    """
    bronze = f"make_timestamp({since['bronze']})"
    changed = " UNION ".join(
        f"""SELECT {expr} AS order_id FROM {table} WHERE recid IN (
              SELECT recid FROM {table} WHERE _ingested_at > {bronze})"""
        for table, expr in ORDER_IDS.items()
    )
    accounts = f"""
        SELECT CONCAT(TRIM(dataareaid), '-', TRIM(accountnum)) AS account FROM bronze_d365_custtable
        WHERE recid IN (SELECT recid FROM bronze_d365_custtable WHERE _ingested_at > {bronze})
        UNION SELECT CONCAT(c.dataareaid, '-', c.accountnum) FROM silver_custtable c
        WHERE c.party IN (SELECT recid FROM bronze_d365_dirpartytable WHERE _ingested_at > {bronze})
        UNION SELECT source_key FROM gold_customer_source_map
        WHERE source = 'd365' AND assigned_at > make_timestamp({since["assigned"]})"""
    by_account = " UNION ".join(
        f"SELECT {oid} FROM {t} WHERE {acct} IN (SELECT account FROM accounts)"
        for t, (oid, acct) in HEADERS.items()
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE accounts AS {accounts};
            CREATE OR REPLACE TEMP TABLE dirty_orders AS
            SELECT order_id FROM ({changed}) WHERE order_id IS NOT NULL UNION {by_account}"""
    )
    months = " UNION ".join(
        f"""SELECT strftime(createddatetime, '%Y-%m') AS m FROM {t}
            WHERE {oid} IN (SELECT order_id FROM dirty_orders)"""
        for t, (oid, _) in HEADERS.items()
    )
    found = con.execute(
        f"""SELECT DISTINCT m FROM ({months}
              UNION SELECT {MONTH} FROM gold_orders WHERE order_id IN (SELECT order_id FROM dirty_orders)
              UNION SELECT strftime(order_ts, '%Y-%m') FROM quarantine_gold_orders
                    WHERE order_id IN (SELECT order_id FROM dirty_orders))
            WHERE m IS NOT NULL ORDER BY m"""
    ).fetchall()
    return [m for (m,) in found]


def restrict_to(con: duckdb.DuckDBPyConnection, lake: Lake, months: list[str]) -> None:
    """Silver order views narrowed to the orders of `months` (and lines of changed
    orders, which may have no header: orphans), so the SQL files compute only those."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE months AS SELECT UNNEST({months!r}::VARCHAR[]) AS m")
    for view in HEADERS:
        con.register(f"all_{view}", lake.dataset("silver", view.removeprefix("silver_")))
        con.unregister(view)
        con.execute(
            f"""CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM all_{view}
                WHERE strftime(createddatetime, '%Y-%m') IN (SELECT m FROM months)"""
        )
    for view, header in LINES.items():
        oid = HEADERS[header][0]
        con.register(f"all_{view}", lake.dataset("silver", view.removeprefix("silver_")))
        con.unregister(view)
        con.execute(
            f"""CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM all_{view}
                WHERE {oid} IN (SELECT {oid} FROM {header})
                   OR {oid} IN (SELECT order_id FROM dirty_orders)"""
        )


def kept_quarantine(con: duckdb.DuckDBPyConnection, name: str) -> pa_arrow.Table:
    """The quarantined rows of an order table that this build does not recompute."""
    return con.sql(
        f"""SELECT * FROM quarantine_gold_{name}
            WHERE COALESCE(strftime(order_ts, '%Y-%m') NOT IN (SELECT m FROM months), TRUE)
              AND order_id NOT IN (SELECT order_id FROM dirty_orders)"""
    ).to_arrow_table()


def sql_digest(settings: Settings) -> str:
    """A digest of the gold SQL as run (files and settings): another SQL, another build."""
    folder = settings.path(settings.sql_dir) / "gold"
    text = "".join(render(f, settings) for f in sorted(folder.glob("*.sql")))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_gold(settings: Settings) -> GoldSummary:
    lake = Lake(settings.lake)
    if not lake.exists("gold", "customer_source_map"):
        raise FileNotFoundError("gold/customer_source_map missing: run `c360ml build unify` first")
    # customer_profile and the source map are unify's outputs; gold builds the rest.
    inputs = {**lake_versions(lake), "sql": sql_digest(settings)}
    con = connect(lake)
    summary = GoldSummary()
    d365 = lake.exists("silver", "custtable")
    generic = lake.exists("silver", "generic_transactions")
    for name in ("orders", "order_lines"):
        if lake.exists("quarantine", "gold", name):
            con.register(f"quarantine_gold_{name}", lake.dataset("quarantine", "gold", name))
    months, marks, changed = None, None, False
    if d365 and not generic and not inputs_unchanged(lake, ("gold", "orders"), inputs):
        marks = watermarks(con)
        since = previous_watermarks(lake, inputs)
        if since is not None:
            months = dirty_months(con, since)
            changed = con.execute("SELECT COUNT(*) > 0 FROM dirty_orders").fetchall()[0][0]
            restrict_to(con, lake, months)

    def put(name, model, *sql: str, quarantine=False, note=lambda: ""):
        """Run the SQL files (their rows unioned) into gold/<name>, unless its inputs
        are unchanged; then register the table for the queries after it. An order table
        of an incremental build replaces only the changed months."""
        started = time.perf_counter()
        partial = months is not None and name in ORDER_TABLES
        written = not inputs_unchanged(lake, ("gold", name), inputs) and (changed or not partial)
        if written:
            kept = kept_quarantine(con, name) if partial and quarantine else None
            readers = [run_sql(con, settings, f"gold/{n}", stream=True) for n in sql]
            stream_gold(
                lake,
                name,
                readers,
                model,
                inputs,
                quarantine,
                months=months if partial else None,
                kept_quarantine=kept,
                metadata={WATERMARK_KEY: json.dumps(marks)} if name == "orders" and marks else None,
            )
        con.register(f"gold_{name}", lake.dataset("gold", name))
        if quarantine:
            con.register(f"quarantine_{name}", lake.dataset("quarantine", "gold", name))
        summary.tables.append(
            {
                "table": f"gold/{name}",
                "rows": lake.dataset("gold", name).count_rows(),
                "quarantined": (
                    lake.dataset("quarantine", "gold", name).count_rows() if quarantine else 0
                ),
                "note": note(),
                "written": (f"{len(months)} months" if partial else "yes")
                if written
                else "unchanged",
                "seconds": round(time.perf_counter() - started, 2),
            }
        )

    def variants(*names: str) -> list[str]:
        """The d365 and/or generic variants of one gold table."""
        return [n for n, on in zip(names, (d365, generic), strict=True) if on]

    put("orders", Orders, *variants("orders", "generic_orders"), quarantine=True)
    # Every order with its quarantine reason (null when in gold): what lines are tied to.
    con.execute(
        "CREATE OR REPLACE TEMP VIEW all_orders AS "
        "SELECT order_id, order_ts, CAST(NULL AS VARCHAR) AS quarantine_reason FROM gold_orders "
        "UNION ALL SELECT order_id, order_ts, quarantine_reason FROM quarantine_orders"
    )
    put("order_lines", OrderLines, *variants("order_lines", "generic_order_lines"), quarantine=True)
    if d365:
        put("products", Products, "products")
        if months is not None:  # the status history of the recomputed months' orders only
            con.register("gold_orders_all", lake.dataset("gold", "orders"))
            con.unregister("gold_orders")
            con.execute(
                f"CREATE OR REPLACE TEMP VIEW gold_orders AS SELECT * FROM gold_orders_all "
                f"WHERE {MONTH} IN (SELECT m FROM months)"
            )
        put("order_status_history", StatusHistory, "order_status_history")
    if lake.exists("silver", "incident"):
        put(
            "support_cases",
            SupportCases,
            "support_cases",
            note=lambda: "{} unlinked (no profile)".format(
                lake.dataset("gold", "support_cases").count_rows(
                    filter=pc.field("customer_id").is_null()
                )
            ),
        )
        put("case_status_history", StatusHistory, "case_status_history")
    return summary
