"""Gold: the unified profile, activity and supporting tables, keyed by customer_id.

Gold is computed from silver by the SQL in `pipelines/sql/gold/`, each query's result
streamed batch by batch into its Delta commit (memory holds a batch, not a 20M-row
table). The order tables (orders, order lines, order status history) are patched on a
refresh: only the orders that the refresh's changes touch are recomputed, by the same SQL
over inputs restricted to them, the replaced rows deleted by deletion vectors and the
other rows kept where they are (`c360ml.medallion.patch`
says how the affected orders are found, and when a table is rebuilt instead). The small
tables are rebuilt. A table is written only when its inputs' versions changed, so a
build with nothing new adds no Delta versions. Orders and lines that cannot be tied to a
profile go to `quarantine/gold/<table>` with a reason, never away.

A table and its quarantine are one unit of work, and the order tables and
`state/gold/order_accounts` another: each commit of a unit records the inputs it was
made from, and a unit counts as done only when every part records the current ones. A
build killed between two commits of a unit does it again (a patch again from the inputs
its last part records: recomputing an order twice gives the same rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.medallion.checks import ArrowCheck
from c360ml.medallion.patch import (
    HISTORY_FEEDS,
    ORDER_FEEDS,
    SQL_KEY,
    STATE,
    Affected,
    affected_orders,
    case_history_entities,
    history_entities,
    line_orders,
    restrict,
    sql_digest,
)
from c360ml.medallion.sql import (
    connect,
    duckdb_connection,
    register,
    rows_by_file,
    run_sql,
    sql_text,
)
from c360ml.schemas import (
    OrderLines,
    Orders,
    Products,
    StatusHistory,
    SupportCases,
)
from c360ml.storage.inputs import last_record, stamp, unchanged, versions
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake

log = logging.getLogger(__name__)

# A patch of more than this share of a table's rows (and more than PATCH_ALWAYS orders)
# rebuilds the table instead: it would cost as much and hold more.
PATCH_MAX_SHARE, PATCH_ALWAYS = 0.3, 100_000
REASON = "quarantine_reason"
# The SQL files (pipelines/sql/gold) of the order tables and of the case tables, and the
# gold tables in the order a build reports them.
ORDER_SQL = ("order_accounts", "orders", "generic_orders", "order_lines",
             "generic_order_lines", "products", "order_status_history")  # fmt: skip
CASE_SQL = ("support_cases", "case_status_history")
GOLD_TABLES = tuple(f"gold/{n}" for n in ORDER_SQL[1:] + CASE_SQL if "generic" not in n)


@dataclass
class GoldSummary:
    tables: list[dict] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return self.tables


def lake_versions(lake: Lake) -> dict[str, int]:
    """Versions of every bronze/silver table and the source map: what gold is built from."""
    found = versions(lake, "bronze") | versions(lake, "silver")
    found["gold/customer_source_map"] = lake.version("gold", "customer_source_map")
    return found


def recorded_inputs(lake: Lake, where: tuple[str, ...], digest: str) -> dict[str, int] | None:
    """The inputs a unit was last completed from, as its last part (`where`) records
    them, if it was built from this SQL."""
    record = last_record(lake, where)
    if record is None or record[1].get(SQL_KEY) != digest:
        return None
    return record[0]


def replace_rows(
    lake: Lake,
    where: tuple[str, ...],
    keys: pa_arrow.Table,
    rows: pa_arrow.Table,
    metadata: dict[str, str],
) -> None:
    """One commit that deletes the rows of a table matching `keys` (on its columns) by
    position and appends `rows` (`Lake.delete_and_append`: no file is rewritten)."""
    con = duckdb_connection()
    register(con, lake, "target", *where, positions=True)
    con.register("keys_", keys)
    found = con.sql(
        "SELECT filename, file_row_number FROM target "
        f"SEMI JOIN keys_ USING ({', '.join(keys.column_names)})"
    ).to_arrow_table()
    con.close()
    lake.delete_and_append(*where, deletes=rows_by_file(found), rows=rows, metadata=metadata)


def _checked(
    readers: list[pa_arrow.RecordBatchReader],
    check: ArrowCheck,
    rejected: list[pa_arrow.Table] | None,
) -> Iterator[pa_arrow.RecordBatch]:
    """The query results checked batch by batch; with `rejected` (quarantine), rows with a
    `quarantine_reason` go there instead. Uniqueness is checked after the last batch."""
    for reader in readers:
        for batch in reader:
            rows = pa_arrow.Table.from_batches([batch])
            if rejected is not None:
                bad = pc.is_valid(rows[REASON])
                rejected.append(rows.filter(bad))
                rows = rows.filter(pc.invert(bad))
            yield from check(rows).to_batches()
    check.finish()


def _write_quarantine(
    lake: Lake,
    name: str,
    schema: pa_arrow.Schema,
    rejected: list[pa_arrow.Table],
    metadata: dict[str, str],
) -> int:
    bad = pa_arrow.concat_tables(
        [schema.empty_table()] + [t.select(schema.names).cast(schema) for t in rejected]
    )
    lake.write(bad, "quarantine", "gold", name, mode="overwrite", metadata=metadata)
    return len(bad)


def stream_gold(
    lake: Lake,
    name: str,
    readers: list[pa_arrow.RecordBatchReader],
    model: type[pa.DataFrameModel],
    inputs: dict,
    quarantine: bool,
    meta: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Query results -> one gold commit, batch by batch; (rows, quarantined rows).

    With `quarantine`, rows with a `quarantine_reason` go to `quarantine/gold/<name>`
    instead (written after the gold commit, recording the same inputs: the unit is done
    when it is). Memory holds one batch, the quarantined rows
    and the unique columns, never the table: a check that fails (uniqueness at the end)
    raises inside the stream, so nothing is committed.
    """
    check = ArrowCheck(model, f"gold/{name}")
    rejected: list[pa_arrow.Table] | None = [] if quarantine else None
    failed: list[ValueError] = []

    def batches():
        try:
            yield from _checked(readers, check, rejected)
        except ValueError as exc:
            failed.append(exc)  # the writer wraps it; re-raised as it was, below
            raise

    metadata = stamp(inputs, **(meta or {}))
    try:
        lake.write(
            pa_arrow.RecordBatchReader.from_batches(check.schema, batches()),
            "gold",
            name,
            mode="overwrite",
            metadata=metadata,
        )
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    if rejected is None:
        return check.rows, 0
    return check.rows, _write_quarantine(lake, name, readers[0].schema, rejected, metadata)


def patch_gold(
    lake: Lake,
    name: str,
    readers: list[pa_arrow.RecordBatchReader],
    model: type[pa.DataFrameModel],
    meta: dict[str, str],
    quarantine: bool,
    key: str,
    ids: pa_arrow.Array,
) -> dict[tuple[str, ...], pa_arrow.Table]:
    """Query results for the affected ids (`key` in `ids`; see `c360ml.medallion.patch`)
    -> one gold commit that deletes the table's rows of those ids by position (deletion
    vectors, `Lake.delete_and_append`) and appends the results; the same in the
    quarantine for the rejected results, with the same `meta` (the unit's inputs).

    The results are checked as `stream_gold` checks a whole table; a unique column stays
    unique because every kept row's id is outside `ids` and every result's inside.
    Returns the rows written, per table: those tables' rows of `ids` now.
    """
    check = ArrowCheck(model, f"gold/{name}")
    rejected: list[pa_arrow.Table] | None = [] if quarantine else None
    rows = pa_arrow.Table.from_batches(list(_checked(readers, check, rejected)), check.schema)
    keys = pa_arrow.table({key: ids})
    replace_rows(lake, ("gold", name), keys, rows, meta)
    written = {("gold", name): rows}
    if rejected is not None:
        bad = pa_arrow.concat_tables([readers[0].schema.empty_table(), *rejected])
        replace_rows(lake, ("quarantine", "gold", name), keys, bad, meta)
        written["quarantine", "gold", name] = bad
    return written


@writes_lake("build gold")
def build_gold(settings: Settings) -> GoldSummary:
    """Gold from silver and the source map; the order tables patched where they can be
    (see `c360ml.medallion.patch`), the rest rebuilt when their inputs changed."""
    lake = Lake(settings.lake)
    if not lake.exists("gold", "customer_source_map"):
        raise FileNotFoundError("gold/customer_source_map missing: run `c360ml build unify` first")
    # customer_profile and the source map are unify's outputs; gold builds the rest.
    inputs = lake_versions(lake)
    con = connect(lake, [sql_text(settings, f"gold/{n}") for n in ORDER_SQL])
    summary = GoldSummary()
    d365 = lake.exists("silver", "custtable")
    generic = lake.exists("silver", "generic_transactions")
    accounts = None
    if d365:
        accounts = run_sql(con, settings, "gold/order_accounts")
        con.register("order_accounts", accounts)
    # Tables written by this build: the inputs they were built from last, and the orders
    # they recomputed (None: rebuilt).
    touched: dict[str, tuple[dict | None, Affected | None]] = {}
    # Tables patched by this build: the ids recomputed and the rows written for them.
    patched: dict[tuple[str, ...], tuple[pa_arrow.Array, pa_arrow.Table]] = {}

    def put(
        name, model, *sql, quarantine=False, note=lambda: "", patch=None, key="", views=None,
        con=con,
    ):  # fmt: skip
        """Run the SQL files (their rows unioned) into gold/<name>, unless its inputs
        are unchanged; then register the table (in `con`) for the queries after it. With
        `patch` (recorded inputs -> affected orders, or None), only those are recomputed,
        over the lake `views` restricted to them, and the other rows (by `key`) are kept."""
        started = time.perf_counter()
        used = (["order_accounts"] if name == "orders" else []) + list(sql)
        digest = sql_digest(settings, *(f"gold/{n}" for n in used))
        how = "unchanged"
        parts = [("gold", name)] + ([("quarantine", "gold", name)] if quarantine else [])
        if not unchanged(lake, parts, inputs):
            since = recorded_inputs(lake, parts[-1], digest) if patch and not generic else None
            affected = patch(since) if since is not None else None
            if affected is not None and affected.size > max(
                PATCH_MAX_SHARE * lake.count("gold", name), PATCH_ALWAYS
            ):
                affected = None  # much changes: a rebuild costs no more, holds less
            touched[name] = (since, affected)
            meta = {SQL_KEY: digest}
            if affected is None:
                readers = [run_sql(con, settings, f"gold/{n}", stream=True) for n in sql]
                stream_gold(lake, name, readers, model, inputs, quarantine, meta)
                how = "rebuilt"
            else:
                needs = [sql_text(settings, f"gold/{n}") for n in sql] + ["gold_orders"]
                scoped = connect(lake, needs)  # lines' `all_orders` reads gold_orders
                scoped.register("order_accounts", accounts)
                if name == "order_lines":
                    register_all_orders(scoped)
                restrict(scoped, lake, views, affected, patched)
                readers = [run_sql(scoped, settings, f"gold/{n}", stream=True) for n in sql]
                meta.update(stamp(inputs))
                ids = affected.ids()
                written = patch_gold(lake, name, readers, model, meta, quarantine, key, ids)
                patched.update({where: (ids, rows) for where, rows in written.items()})
                scoped.close()
                how = f"patched ({affected.size} {affected.noun})"
        register(con, lake, f"gold_{name}", "gold", name)
        if quarantine:
            register(con, lake, f"quarantine_{name}", "quarantine", "gold", name)
        summary.tables.append(
            {
                "table": f"gold/{name}",
                "rows": lake.count("gold", name),
                "quarantined": (lake.count("quarantine", "gold", name) if quarantine else 0),
                "note": note(),
                "written": how,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )

    def register_all_orders(c: duckdb.DuckDBPyConnection) -> None:
        """Every order with its quarantine reason (null when in gold): what lines are
        tied to."""
        register(c, lake, "quarantine_orders", "quarantine", "gold", "orders")
        c.execute(
            "CREATE OR REPLACE TEMP VIEW all_orders AS "
            "SELECT order_id, CAST(NULL AS VARCHAR) AS quarantine_reason FROM gold_orders "
            "UNION ALL SELECT order_id, quarantine_reason FROM quarantine_orders"
        )

    def variants(*names: str) -> list[str]:
        """The d365 and/or generic variants of one gold table."""
        return [n for n, on in zip(names, (d365, generic), strict=True) if on]

    def orders_changed(since: dict[str, int]) -> Affected | None:
        """The orders gold/orders recomputed in this build from the same versions (if it
        was rebuilt, or from other versions: not known), else those it would have."""
        if "orders" not in touched:
            return affected_orders(lake, con, since)
        orders_since, orders = touched["orders"]
        return orders if orders_since == since else None

    def lines_changes(since: dict[str, int]) -> Affected | None:
        orders = orders_changed(since)
        return line_orders(lake, since, orders) if orders is not None else None

    def history_changes(since: dict[str, int]) -> Affected | None:
        orders = orders_changed(since)
        return history_entities(lake, since, orders) if orders is not None else None

    def cases() -> None:
        """The support cases and their status history, on a connection of their own."""
        own = connect(lake, [sql_text(settings, f"gold/{n}") for n in CASE_SQL])
        put(
            "support_cases",
            SupportCases,
            "support_cases",
            note=lambda: "{} unlinked (no profile)".format(
                lake.dataset("gold", "support_cases").count_rows(
                    filter=pc.field("customer_id").is_null()
                )
            ),
            con=own,
        )
        put(
            "case_status_history",
            StatusHistory,
            "case_status_history",
            patch=lambda since: case_history_entities(lake, since),
            key="entity_id",
            views={
                "bronze_dataverse_incident": ("bronze", "dataverse", "incident"),
                "gold_support_cases": ("gold", "support_cases"),
            },
            con=own,
        )
        own.close()

    def order_tables() -> None:
        """The orders, their lines, the products and the orders' status history."""
        put(
            "orders",
            Orders,
            *variants("orders", "generic_orders"),
            quarantine=True,
            patch=lambda since: affected_orders(lake, con, since),
            key="order_id",
            views={f"silver_{t}": ("silver", t) for t in ORDER_FEEDS},
        )
        register_all_orders(con)
        put(
            "order_lines",
            OrderLines,
            *variants("order_lines", "generic_order_lines"),
            quarantine=True,
            patch=lines_changes,
            key="order_id",
            views={
                f"silver_{t}": ("silver", t) for t in ("salesline", "retailtransactionsalestrans")
            }
            | {
                "gold_orders": ("gold", "orders"),
                "quarantine_orders": ("quarantine", "gold", "orders"),
            },
        )
        if d365:
            put("products", Products, "products")
            put(
                "order_status_history",
                StatusHistory,
                "order_status_history",
                patch=history_changes,
                key="entity_id",
                views={f"bronze_d365_{t}": ("bronze", "d365", t) for t in HISTORY_FEEDS}
                | {"gold_orders": ("gold", "orders")},
            )
            # Last, so that a build stopped before it recomputes the same accounts'
            # orders; with the inputs, so that one stopped just before writes it next time
            # (the order tables then count as done).
            if not unchanged(lake, [STATE], inputs):
                lake.write(accounts, *STATE, mode="overwrite",
                           metadata=stamp(inputs))  # fmt: skip

    # The cases depend on no order table: they are built alongside the orders (a
    # build is partly single-threaded: at 1M customers an incremental one used 1.6 of
    # the 2 cores).
    with ThreadPoolExecutor(1) as pool:
        case_tables = pool.submit(cases) if lake.exists("silver", "incident") else None
        order_tables()
        if case_tables is not None:
            case_tables.result()
    summary.tables.sort(key=lambda t: GOLD_TABLES.index(t["table"]))
    return summary
