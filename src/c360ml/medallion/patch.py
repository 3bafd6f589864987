"""Gold refreshed in place: a build recomputes only the orders that its changes touch.

Why: a refresh's 1% increment changes about 1% of the orders (new ones, status changes,
new lines, customers re-linked or erased by unify), but a rebuild recomputes and checks
all of them, and the order tables and their history were most of an incremental gold
build (benchmarks/results, the medallion stage). How: the same SQL files
run over their inputs restricted to the affected orders; in one commit the table's rows
of those orders are deleted by position (deletion vectors) and the recomputed ones
appended, so no file is rewritten (the affected orders of erased and re-linked
customers lie in every file: rewriting the unaffected rows was most of a patch's time).

What changed since a table's last build is read from
- silver's change log of the order tables (`SourceTable.change_key`; see
  `silver._log_changes`) after the versions the table recorded: orders and lines new,
  changed or deleted (a change of the products, each line's category, rebuilds lines);
- `state/gold/order_accounts`, what orders.sql joined per Commerce account at the last
  build (customer_id, known, party type), against now: unify's re-links, accounts gone;
- the bronze files added since: an order's status history holds every version, also a
  late one that did not change silver.
A support case's status history is patched the same way (its incident's silver change
log and bronze files); the cases themselves are rebuilt: finding the cases whose contact
unify re-linked cost as much as rebuilding them (measured at 1M customers).
Recomputing an affected order from current silver is exact, so a superset of the
affected orders is always safe; an order outside it has the same inputs as at the last
build, so its kept row is what a rebuild would give. The recomputed rows' ids are all
affected ids and the kept rows' none, so a unique column stays unique when the
recomputed rows are unique among themselves.

A build falls back to a rebuild when it cannot know what changed: a first build, a
table without its recorded versions or digest (SQL and settings), no state, a change
log that starts later, or the generic source (no log: it is rebuilt, cheaply).

A gold model names its rule (`GoldModel.changes`); `CHANGES` holds DuckDB's rules by
name. A rule takes the lake, the unit's connection (full views and helpers), the inputs
the table recorded and what the models before it in this build recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.medallion.declarations import HELPERS
from c360ml.medallion.silver import CHANGES_FROM, change_log
from c360ml.medallion.sql import duckdb_connection, register, render
from c360ml.sources.tables import SOURCE_TABLES
from c360ml.storage.lake import Lake

# What orders.sql joined per Commerce account at the last build (the helper's state).
STATE = next(h.state for h in HELPERS if h.name == "order_accounts")
SQL_KEY = "c360ml.sql"  # digest of the SQL (with settings filled in) a table was built from
# Silver tables whose changes silver logs (their `change_key` names the order or case).
FEEDS = {t.name: t for t in SOURCE_TABLES.values() if t.change_key}
ORDER_FEEDS = ("salestable", "salesline", "retailtransactiontable")  # what orders.sql reads
# The orders' patch also recomputes the POS orders whose lines changed (orders.sql reads no
# POS line): then the lines' patch recomputes no order that the orders' did not, and takes
# the orders from that patch's rows instead of scanning gold/orders (see `restrict`).
AFFECTED_FEEDS = (*ORDER_FEEDS, "retailtransactionsalestrans")
HISTORY_FEEDS = ("salestable", "retailtransactiontable")  # bronze feeds of the history


def sql_digest(settings: Settings, *names: str) -> str:
    """What a table's rows are a function of, besides its inputs: the rendered SQL."""
    folder = settings.path(settings.sql_dir)
    texts = [render(folder / f"{n}.sql", settings) for n in names]
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


@dataclass(frozen=True)
class Affected:
    """Orders to recompute, by source key: sales orders and POS transactions."""

    sales: pa.Table  # dataareaid, salesid
    pos: pa.Table  # transactionid
    gold_key, noun = "order_id", "orders"  # what `ids` are in gold; what they are

    @property
    def size(self) -> int:
        return len(self.sales) + len(self.pos)

    def keys(self) -> list[pa.Table]:
        return [self.sales, self.pos]

    def ids(self) -> pa.Array:
        """The gold order_ids ('SO:<dataareaid>-<salesid>', 'POS:<transactionid>')."""
        sales, pos = self.sales, self.pos
        so = pc.binary_join_element_wise("SO:", sales["dataareaid"], "-", sales["salesid"], "")
        pos = pc.binary_join_element_wise("POS:", pos["transactionid"], "")
        return pa.chunked_array([*so.chunks, *pos.chunks], pa.string()).combine_chunks()

    def union(self, other: Affected) -> Affected:
        con = duckdb_connection()
        for name, table in zip("abcd", (self.sales, other.sales, self.pos, other.pos), strict=True):
            con.register(name, table)
        sales = con.sql("SELECT * FROM a UNION SELECT * FROM b").to_arrow_table()
        pos = con.sql("SELECT * FROM c UNION SELECT * FROM d").to_arrow_table()
        return Affected(sales.cast(self.sales.schema), pos.cast(self.pos.schema))


@dataclass(frozen=True)
class AffectedCases:
    """Support cases to recompute, by incident id (their gold case_id and entity_id)."""

    cases: pa.Table  # incidentid
    gold_key, noun = "case_id", "cases"

    @property
    def size(self) -> int:
        return len(self.cases)

    def keys(self) -> list[pa.Table]:
        return [self.cases]

    def ids(self) -> pa.Array:
        return self.cases["incidentid"].combine_chunks()

    def union(self, other: AffectedCases) -> AffectedCases:
        both = pa.concat_tables([self.cases, other.cases.cast(self.cases.schema)])
        return AffectedCases(both.group_by("incidentid").aggregate([]))


def _empty(name: str) -> pa.Table:
    """No rows, with the change key columns of table `name`."""
    schema = FEEDS[name].arrow_schema
    return pa.schema([schema.field(c) for c in FEEDS[name].change_key]).empty_table()


def silver_changes(lake: Lake, name: str, since: dict[str, int]) -> pa.Table | None:
    """Change keys of the rows of a silver table changed since the recorded version, from
    silver's change log (None when the log does not reach back that far)."""
    columns = list(FEEDS[name].change_key)
    before, now = since.get(f"silver/{name}"), lake.version("silver", name)
    where = change_log(name)
    if before is None or now is None or before > now or not lake.exists(*where):
        return None
    starts = [int(m[CHANGES_FROM]) for m in lake.commit_metadata(*where) if CHANGES_FROM in m]
    if not starts or starts[-1] > before:
        return None
    newer = pc.field("silver_version") > before
    return lake.read(*where, columns=columns, filter=newer).cast(_empty(name).schema)


def bronze_added(lake: Lake, name: str, since: dict[str, int]) -> pa.Table | None:
    """Key columns of the bronze rows in files added since the recorded version (a
    rewritten file counts as added: a superset, which is safe)."""
    columns, where = FEEDS[name].change_key, ("bronze", FEEDS[name].source, name)
    before, now = since.get("/".join(where)), lake.version(*where)
    if before is None or now is None or before > now:
        return None
    if before == now:
        return _empty(name)
    old = lake.files_at(*where, version=before)
    if old is None:
        return None
    current = lake.delta(*where)
    files = [f for f in current.file_uris() if f not in old]
    schema = current.to_pyarrow_dataset().schema
    table = lake.files_dataset(*where, files=files, schema=schema).to_table(columns=list(columns))
    return table.cast(_empty(name).schema)


def affected_orders(
    lake: Lake, con: duckdb.DuckDBPyConnection, since: dict[str, int]
) -> Affected | None:
    """Orders whose gold row may differ from the last build's (see the module doc).

    `con` has the full silver tables and the current `order_accounts` registered."""
    if not lake.exists(*STATE):
        return None
    feeds = {name: silver_changes(lake, name, since) for name in AFFECTED_FEEDS}
    if any(f is None for f in feeds.values()):
        return None
    for name, feed in feeds.items():
        con.register(f"changed_{name}", feed)
    con.register("accounts_before", lake.dataset(*STATE))
    columns = con.sql("SELECT * FROM order_accounts LIMIT 0").columns
    differ = " ".join(f"OR a.{c} IS DISTINCT FROM b.{c}" for c in columns if c != "account_key")
    con.execute(  # a join, not EXCEPT both ways: the faster of the two, measured
        f"""CREATE OR REPLACE TEMP TABLE changed_accounts AS
            SELECT COALESCE(a.account_key, b.account_key) AS account_key
            FROM order_accounts a FULL JOIN accounts_before b ON a.account_key = b.account_key
            WHERE a.account_key IS NULL OR b.account_key IS NULL {differ}"""
    )
    of_accounts = (
        "custaccount IS NOT NULL AND CONCAT(dataareaid, '-', custaccount) IN "
        "(SELECT account_key FROM changed_accounts)"
    )
    sales = con.sql(
        f"""SELECT dataareaid, salesid FROM changed_salestable
            UNION SELECT dataareaid, salesid FROM changed_salesline
            UNION SELECT dataareaid, salesid FROM silver_salestable WHERE {of_accounts}"""
    ).to_arrow_table()
    pos = con.sql(
        f"""SELECT transactionid FROM changed_retailtransactiontable
            UNION SELECT transactionid FROM changed_retailtransactionsalestrans
            UNION SELECT transactionid FROM silver_retailtransactiontable WHERE {of_accounts}"""
    ).to_arrow_table()
    return Affected(
        sales.cast(_empty("salestable").schema),
        pos.cast(_empty("retailtransactiontable").schema),
    )


def history_entities(lake: Lake, since: dict[str, int], orders: Affected) -> Affected | None:
    """Orders whose status history may differ: those whose gold row may have (they may
    have entered or left gold/orders) and those with new bronze versions."""
    added = {name: bronze_added(lake, name, since) for name in HISTORY_FEEDS}
    if any(a is None for a in added.values()):
        return None
    return orders.union(Affected(added["salestable"], added["retailtransactiontable"]))


def line_orders(lake: Lake, since: dict[str, int], orders: Affected) -> Affected | None:
    """Orders whose lines may differ: those whose gold row may have (their quarantine
    reason is the lines'), which include those with changed lines (`AFFECTED_FEEDS`).
    A change of the products (each line's category) rebuilds."""
    if since.get("silver/inventtable") != lake.version("silver", "inventtable"):
        return None
    return orders


def case_history_entities(lake: Lake, since: dict[str, int]) -> AffectedCases | None:
    """Cases whose status history may differ: incidents silver changed since (a case is
    in gold/support_cases, which the history joins, iff its incident is in silver) and
    those with new bronze versions."""
    changed, added = silver_changes(lake, "incident", since), bronze_added(lake, "incident", since)
    if changed is None or added is None:
        return None
    return AffectedCases(changed).union(AffectedCases(added))


def restrict(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    views: dict[str, tuple[str, ...]],
    affected: Affected | AffectedCases,
    patched: dict[tuple[str, ...], tuple[pa.Array, pa.Table]] | None = None,
) -> None:
    """Replace lake views (name -> (layer, parts...)) by their rows of the affected orders
    or cases: the SQL files then compute just those. A view with the gold id (gold and
    its quarantine) is restricted by it, others by the first key columns they have
    (sales or POS orders, incidents); a view with none of them is a lookup (the
    products for the lines, the source map) and is left whole.

    `patched`: tables this build patched, with the ids it recomputed and the rows it
    wrote for them. A table patched for all the affected ids holds, for those ids, just
    the rows written: they are taken instead of a scan of the whole table.
    """
    keys, ids = affected.keys(), affected.ids()
    for i, table in enumerate(keys):
        con.register(f"affected_{i}", table)
    con.register("affected_ids", pa.table({affected.gold_key: ids}))
    for view, where in views.items():
        done, rows = (patched or {}).get(where, (None, None))
        if (
            done is not None
            and affected.gold_key in rows.column_names
            and pc.all(pc.is_in(ids, done)).as_py()
        ):
            con.register(f"{view}__rows", rows.filter(pc.is_in(rows[affected.gold_key], ids)))
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {view}__rows")
            continue
        columns = set(lake.schema(*where).names)
        if affected.gold_key in columns:
            on, against = (affected.gold_key,), "affected_ids"
        else:
            i = next((i for i, t in enumerate(keys) if set(t.column_names) <= columns), None)
            if i is None:
                register(con, lake, view, *where)  # a lookup: whole
                continue
            on, against = keys[i].column_names, f"affected_{i}"
        register(con, lake, f"{view}__all", *where)
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {view}__all "
            f"SEMI JOIN {against} USING ({', '.join(on)})"
        )


# Per gold model this build wrote: the inputs it was last built from, and the rows it
# recomputed (None: rebuilt).
Recomputed = dict[str, tuple[dict | None, "Affected | AffectedCases | None"]]
Con = duckdb.DuckDBPyConnection


def _orders_recomputed(
    lake: Lake, con: Con, since: dict[str, int], recomputed: Recomputed
) -> Affected | None:
    """The orders gold/orders recomputed in this build from the same versions (if it
    was rebuilt, or from other versions: not known), else those it would have."""
    if "orders" not in recomputed:
        return affected_orders(lake, con, since)
    orders_since, orders = recomputed["orders"]
    return orders if orders_since == since and isinstance(orders, Affected) else None


def _changed_orders(lake: Lake, con: Con, since: dict, recomputed: Recomputed) -> Affected | None:
    return affected_orders(lake, con, since)


def _changed_lines(lake: Lake, con: Con, since: dict, recomputed: Recomputed) -> Affected | None:
    orders = _orders_recomputed(lake, con, since, recomputed)
    return line_orders(lake, since, orders) if orders is not None else None


def _changed_order_history(
    lake: Lake, con: Con, since: dict, recomputed: Recomputed
) -> Affected | None:
    orders = _orders_recomputed(lake, con, since, recomputed)
    return history_entities(lake, since, orders) if orders is not None else None


def _changed_case_history(
    lake: Lake, con: Con, since: dict, recomputed: Recomputed
) -> AffectedCases | None:
    return case_history_entities(lake, since)


Rule = Callable[[Lake, Con, dict, Recomputed], "Affected | AffectedCases | None"]
# Rule name (`GoldModel.changes`) -> the keys to recompute since the recorded inputs, or
# None (rebuild).
CHANGES: dict[str, Rule] = {
    "orders": _changed_orders,  # orders whose gold row may differ
    "order_lines": _changed_lines,  # orders whose lines may differ
    "order_history": _changed_order_history,  # orders whose status history may differ
    "case_history": _changed_case_history,  # cases whose status history may differ
}
