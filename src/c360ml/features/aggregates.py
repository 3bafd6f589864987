"""Per-customer aggregation features computed by DuckDB, with Featuretools' semantics.

Why: every feature DFS derives here is one aggregation of a customer's rows (optionally
windowed, filtered by a where-clause, or stacked over a per-order aggregation).
Featuretools computes each (window, where) group with its own pandas group-by and merges
it into a frame that is copied each time, which made it most of a large refresh. As one
SQL scan per table it costs about half, most of it reading gold
(`benchmarks/results/refresh.json`).

The definitions stay Featuretools': `c360ml.features.dfs` (the one module importing it)
turns each saved feature into an `Aggregate` here, and computes anything it cannot turn
into one with Featuretools itself. A test checks that both engines give the same matrix,
feature for feature, at a cutoff with later data present. Semantics followed:
- rows: the as-of view's (events with time <= t); a window keeps time >= t - use_previous,
  as Featuretools does (its windows are w minus half a microsecond, see dfs.py);
- COUNT counts non-null values (of the index column: rows), NUM_UNIQUE distinct non-null
  values, STD is the sample deviation (pandas' std, ddof=1), SUM/MEAN/MAX/MIN skip nulls;
- a customer with no rows, or a null result, gets the primitive's default value (COUNT
  and SUM 0, others null), as Featuretools' fill does;
- TIME_SINCE is (t - time) in seconds / 86400 for unit days;
- MODE ties go to the smallest value (pandas' `Series.mode` over sorted categories).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from c360ml.features.gold import GoldTables, is_purchase
from c360ml.medallion.sql import duckdb_connection
from c360ml.schemas import CustomerProfile, OrderLines, Orders, Products, SupportCases

CUSTOMER_ID = CustomerProfile.customer_id
IS_PURCHASE = "is_purchase"  # derived on the as-of view: a purchase as known at t
LINE_ID = "line_id"
# Time column of each activity table (order lines carry their order's time).
TIME_COLUMNS = {
    "orders": Orders.order_ts,
    "order_lines": Orders.order_ts,
    "support_cases": SupportCases.created_ts,
}
# {c}: the value, {f}: the FILTER clause of the rows kept (empty for all rows).
_SQL = {
    "count": "COUNT({c}){f}",
    "sum": "FSUM({c}){f}",  # compensated summation, as pandas' group sum and mean
    "mean": "FSUM({c}){f} / COUNT({c}){f}",
    "max": "MAX({c}){f}",
    "min": "MIN({c}){f}",
    "std": "STDDEV_SAMP({c}){f}",
    "num_unique": "COUNT(DISTINCT {c}){f}",
    "percent_true": "AVG(CAST(COALESCE({c}, FALSE) AS DOUBLE)){f}",
}
PRIMITIVES = {*_SQL, "mode"}  # mode has a query of its own (`_mode_sql`)


@dataclass(frozen=True)
class Aggregate:
    """One feature as plain terms: `primitive` over `column` of a customer's `table` rows.

    table "customers" with primitive None is a transform of the profile's own column (only
    time_since). `per_order` stacks: the column is that aggregate of each order's lines.
    """

    name: str
    primitive: str | None
    table: str  # orders | order_lines | support_cases | customers
    column: str | None = None  # None only with per_order
    time_since: bool = False  # the column is first turned into days before t
    where: tuple[tuple[str, Any], ...] = ()  # column = value, all must hold
    window_ns: int | None = None  # keep rows with time >= t - window_ns
    per_order: Aggregate | None = None
    default: float | None = None  # value for no rows or a null result; None = null


def activity_frames(view: GoldTables) -> dict[str, pd.DataFrame]:
    """The frames both engines aggregate: customers, orders (with is_purchase at t), order
    lines (numbered), support cases of a known customer, and products. Built from an as-of
    view, so statuses and is_purchase are those valid at t. Each engine gives the lines
    their order's time and customer itself (a join), and drops lines of no order in view.
    """
    orders = view.orders[
        [
            Orders.order_id,
            Orders.customer_id,
            Orders.order_ts,
            Orders.channel,
            Orders.store,
            Orders.gross_amount,
            Orders.discount_amount,
            Orders.net_amount,
            Orders.item_count,
            Orders.is_return,
            Orders.is_cancelled,
        ]
    ].assign(**{IS_PURCHASE: is_purchase(view.orders).to_numpy()})
    lines = view.order_lines[
        [
            OrderLines.order_id,
            OrderLines.item_id,
            OrderLines.category,
            OrderLines.qty,
            OrderLines.unit_price,
            OrderLines.net_amount,
            OrderLines.is_return,
        ]
    ]
    lines.insert(0, LINE_ID, np.arange(len(lines)))
    cases = view.support_cases[view.support_cases[SupportCases.customer_id].notna()][
        [
            SupportCases.case_id,
            SupportCases.customer_id,
            SupportCases.created_ts,
            SupportCases.case_type,
            SupportCases.priority,
            SupportCases.status,
        ]
    ]
    return {
        "customers": view.customers[[CUSTOMER_ID, CustomerProfile.created_ts]],
        "orders": orders,
        "order_lines": lines,
        "support_cases": cases,
        "products": view.products[[Products.item_id, Products.category]],
    }


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float | np.integer | np.floating):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def _terms(a: Aggregate, t_ns: int) -> list[str]:
    """The row conditions of an aggregate: its where-clause, then its window."""
    terms = [f"{_quote(c)} = {_literal(v)}" for c, v in a.where]
    if a.window_ns is not None:
        terms.append(f"epoch_ns({_quote(TIME_COLUMNS[a.table])}) >= {t_ns - a.window_ns}")
    return terms


def _days_before(column: str, t_ns: int) -> str:
    """Featuretools' TIME_SINCE in days: total seconds (ns / 1e9) / 86400."""
    return f"(CAST({t_ns} - epoch_ns({_quote(column)}) AS DOUBLE) / 1e9 / 86400)"


def _value(a: Aggregate, t_ns: int, inner: dict[Aggregate, str]) -> str:
    if a.per_order is not None:
        return _quote(inner[a.per_order])
    return _days_before(a.column, t_ns) if a.time_since else _quote(a.column)


def _expression(a: Aggregate, value: str, kept: str | None) -> str:
    """The aggregate over the rows `kept` (a boolean SQL expression) selects; null when it
    selects none (Featuretools then has no group, so the default applies even to
    NUM_UNIQUE, whose SQL would say 0)."""
    if kept is None:
        return _SQL[a.primitive].format(c=value, f="")
    only = f" FILTER (WHERE {kept})"
    return f"CASE WHEN COUNT(*){only} > 0 THEN {_SQL[a.primitive].format(c=value, f=only)} END"


def _table_sql(source: str, aggregates: list[Aggregate], t_ns: int, inner) -> str:
    """One scan of `source` (a table or per_order) computing every aggregate over it,
    grouped by customer.

    Each distinct row condition is evaluated once per row, as a boolean column; the
    aggregates' FILTER clauses combine those columns."""
    atoms: dict[str, str] = {}
    for a in aggregates:
        for term in _terms(a, t_ns):
            atoms.setdefault(term, f"_c{len(atoms)}")
    columns = []
    for a in aggregates:
        kept = " AND ".join(atoms[term] for term in _terms(a, t_ns)) or None
        columns.append(f"{_expression(a, _value(a, t_ns, inner), kept)} AS {_quote(a.name)}")
    flags = "".join(f", {term} AS {name}" for term, name in atoms.items())
    key = _quote(CUSTOMER_ID)
    return f"SELECT {key}, {', '.join(columns)} FROM (SELECT *{flags} FROM {source}) GROUP BY {key}"


def _per_order_sql(inner: dict[Aggregate, str], t_ns: int) -> str:
    """Orders with each stacked feature's per-order value (its default where it has none).
    The per-order aggregates are unfiltered (`c360ml.features.dfs` admits no other)."""
    order_id = _quote(Orders.order_id)
    per_line = ", ".join(
        f"{_expression(a, _value(a, t_ns, {}), None)} AS {_quote(alias)}"
        for a, alias in inner.items()
    )
    columns = ", ".join(
        f"COALESCE(l.{_quote(alias)}, {_literal(a.default)}) AS {_quote(alias)}"
        if a.default is not None
        else f"l.{_quote(alias)}"
        for a, alias in inner.items()
    )
    return (
        f"SELECT o.*, {columns} FROM orders o LEFT JOIN (SELECT {order_id}, {per_line} "
        f"FROM order_lines GROUP BY {order_id}) l USING ({order_id})"
    )


def _mode_sql(a: Aggregate, t_ns: int) -> str:
    key, column = _quote(CUSTOMER_ID), _quote(a.column)
    where = " AND ".join([f"{column} IS NOT NULL", *_terms(a, t_ns)])
    return (
        f"SELECT {key}, {column} AS v FROM (SELECT {key}, {column}, ROW_NUMBER() OVER "
        f"(PARTITION BY {key} ORDER BY COUNT(*) DESC, {column}) AS rank FROM {a.table} "
        f"WHERE {where} GROUP BY {key}, {column}) WHERE rank = 1"
    )


def compute_aggregates(
    frames: dict[str, pd.DataFrame],
    t: pd.Timestamp,
    requests: list[tuple[pd.Index, list[Aggregate]]],
) -> list[pd.DataFrame]:
    """For each (ids, aggregates) request, the aggregates' values for those ids at t
    (frames from `activity_frames` of the view at t), indexed by customer_id, columns in
    the order given.

    The frames are copied into DuckDB once for all requests (scanning pandas strings is
    the slow part); then each request scans each table once.
    """
    t_ns = pd.Timestamp(t).value
    con = duckdb_connection()
    # One thread: partial aggregates of several threads are combined in whatever order
    # they finish, which changes floating-point sums and means in their last bits (and
    # then float32 values): the same inputs must give the same features.
    con.execute("SET threads = 1")
    try:
        for name in ("customers", "orders", "order_lines", "support_cases"):
            con.register(f"{name}_frame", frames[name])
        key, order_id = _quote(CUSTOMER_ID), _quote(Orders.order_id)
        for name in ("customers", "orders", "support_cases"):
            con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_frame")
        con.execute(
            f"CREATE TEMP TABLE order_lines AS SELECT l.*, o.{key}, o.{_quote(Orders.order_ts)} "
            f"FROM order_lines_frame l JOIN orders o USING ({order_id})"
        )
        return [_request(con, ids, aggregates, t_ns) for ids, aggregates in requests]
    finally:
        con.close()


def _request(con, ids: pd.Index, aggregates: list[Aggregate], t_ns: int) -> pd.DataFrame:
    key = _quote(CUSTOMER_ID)
    inner = {a.per_order: f"_per_order_{i}" for i, a in enumerate(aggregates) if a.per_order}
    if inner:
        con.execute(f"CREATE OR REPLACE TEMP TABLE per_order AS {_per_order_sql(inner, t_ns)}")
    # Each query's result is lined up with `ids` in pandas (DuckDB 2.0 fails with an
    # internal error on the equivalent join of these results when it runs one thread).
    values: dict[str, pd.Series] = {}
    for table in ("orders", "order_lines", "support_cases"):
        mine = [a for a in aggregates if a.table == table and a.primitive != "mode"]
        if mine:
            source = "per_order" if table == "orders" and inner else table
            part = con.sql(_table_sql(source, mine, t_ns, inner)).df().set_index(CUSTOMER_ID)
            values.update(part.reindex(ids).items())
    for a in aggregates:
        if a.table == "customers":
            sql = f"SELECT {key}, {_days_before(a.column, t_ns)} AS v FROM customers"
        elif a.primitive == "mode":
            sql = _mode_sql(a, t_ns)
        else:
            continue
        values[a.name] = con.sql(sql).df().set_index(CUSTOMER_ID)["v"].reindex(ids)
    columns = {
        a.name: values[a.name] if a.default is None else values[a.name].fillna(a.default)
        for a in aggregates
    }
    return pd.DataFrame(columns, index=pd.Index(ids, name=CUSTOMER_ID))
