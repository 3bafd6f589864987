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
  as Featuretools does (its windows are w minus half a microsecond, see dfs.py; at gold's
  microsecond resolution, time > t - w);
- COUNT counts non-null values (of the index column: rows), NUM_UNIQUE distinct non-null
  values, STD is the sample deviation (pandas' std, ddof=1), SUM/MEAN/MAX/MIN skip nulls;
- a customer with no rows, or a null result, gets the primitive's default value (COUNT
  and SUM 0, others null), as Featuretools' fill does;
- TIME_SINCE is (t - time) in seconds / 86400 for unit days;
- MODE ties go to the smallest value (pandas' `Series.mode` over sorted categories).

The queries read the relations customers, orders (with is_purchase), order_lines (with
their order's customer_id and order_ts) and support_cases: the as-of view as
`c360ml.features.asof` materialises it over gold (`aggregate_view`), or the activity frames
of the pandas view loaded into DuckDB (`compute_aggregates`, the reference). A NUM_UNIQUE
counts (customer, value) pairs grouped first (a fraction of COUNT(DISTINCT) FILTER's cost
over many groups), and the SQL is spelled for DuckDB or Spark by an `asof.Dialect`.
A request's queries are planned once (`_parts`): DuckDB's engine runs them one by one and
lines their results up with the ids in pandas (`_request`), the Spark engine joins them to
the ids in one query (`request_sql`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from c360ml.features.asof import DUCKDB, Dialect
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
# {c}: the value, {f}: the FILTER clause of the rows kept (empty for all rows), {s}: the
# dialect's sum of doubles (DuckDB's compensated FSUM, as pandas' group sum and mean).
_SQL = {
    "count": "COUNT({c}){f}",
    "sum": "{s}({c}){f}",
    "mean": "{s}({c}){f} / NULLIF(COUNT({c}){f}, 0)",
    "max": "MAX({c}){f}",
    "min": "MIN({c}){f}",
    "std": "STDDEV_SAMP({c}){f}",
    "num_unique": "COUNT(DISTINCT {c}){f}",
    "percent_true": "AVG(CAST(COALESCE({c}, FALSE) AS DOUBLE)){f}",
}
PRIMITIVES = {*_SQL, "mode"}  # mode has a query of its own (`_mode_sql`)
# The primitives that add doubles up: their last bits depend on the order of the additions
# (DuckDB's sums are compensated, Spark's are not, pandas' are), and a residue such as
# -4e-16 where another engine says 0 sends a customer down the other side of a tree's
# split at 0. As model inputs they are kept to a grid (`encoded`).
SUMMED = frozenset({"sum", "mean", "std"})
GRID = 2.0**-20  # binary: a mean of cents is never halfway between two of its points


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
        return f"CAST({float(value)!r} AS DOUBLE)"  # Spark reads 0.0 as a DECIMAL
    return "'" + str(value).replace("'", "''") + "'"


def _terms(a: Aggregate, t_ns: int, d: Dialect = DUCKDB) -> list[str]:
    """The row conditions of an aggregate: its where-clause, then its window.

    The window keeps time >= t - window (Featuretools'); gold's times are microseconds,
    so that is epoch microseconds >= the window's start rounded up to a microsecond."""
    terms = [f"{d.quote(c)} = {_literal(v)}" for c, v in a.where]
    if a.window_ns is not None:
        start_us = -((a.window_ns - t_ns) // 1000)  # ceil((t_ns - window_ns) / 1000)
        terms.append(f"{d.epoch_us(d.quote(TIME_COLUMNS[a.table]))} >= {start_us}")
    return terms


def _days_before(column: str, t_ns: int, d: Dialect = DUCKDB) -> str:
    """Featuretools' TIME_SINCE in days: total seconds (ns / 1e9) / 86400."""
    return f"(CAST({t_ns} - {d.epoch_us(d.quote(column))} * 1000 AS DOUBLE) / 1e9 / 86400)"


def _value(a: Aggregate, t_ns: int, inner: dict[Aggregate, str], d: Dialect = DUCKDB) -> str:
    if a.per_order is not None:
        return d.quote(inner[a.per_order])
    if a.column == LINE_ID:  # the lines' index: never null (only COUNT is planned on it)
        return "1"
    return _days_before(a.column, t_ns, d) if a.time_since else d.quote(a.column)


def _expression(a: Aggregate, value: str, kept: str | None, d: Dialect = DUCKDB) -> str:
    """The aggregate over the rows `kept` (a boolean SQL expression) selects.

    Over no rows Featuretools has no group and gives the default; SQL gives null (then
    the default is filled in) except COUNT, which says 0: a COUNT whose default is not 0
    is therefore null when it selects no row. (NUM_UNIQUE is counted apart, `_distinct_sql`.)"""
    only = "" if kept is None else f" FILTER (WHERE {kept})"
    sql = _SQL[a.primitive].format(c=value, f=only, s=d.fsum)
    if a.primitive == "count" and a.default != 0.0:
        return f"CASE WHEN COUNT(*){only} > 0 THEN {sql} END"
    return sql


def encoded(values: pd.Series, summed: bool) -> np.ndarray:
    """A feature as the model reads it, whichever engine computed it: float32, and a sum,
    mean or deviation (`summed`) first rounded to the nearest multiple of GRID, which
    removes what the order of the additions leaves (scaling by a power of two is exact,
    so every engine's value lands on the same point unless it lies within a residue of a
    midpoint, which a mean of cents over fewer than 2^19 rows never does)."""
    if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
        raise TypeError(f"feature {values.name} is not numeric ({values.dtype}); cannot encode")
    x = values.astype("Float64").to_numpy(np.float64, na_value=np.nan)
    if summed:
        x = np.round(x / GRID) * GRID
    return x.astype(np.float32)


def _atoms(aggregates: list[Aggregate], t_ns: int, d: Dialect) -> dict[str, str]:
    """Each distinct row condition of the aggregates, named _c0, _c1, ..."""
    atoms: dict[str, str] = {}
    for a in aggregates:
        for term in _terms(a, t_ns, d):
            atoms.setdefault(term, f"_c{len(atoms)}")
    return atoms


def _table_sql(
    source: str,
    aggregates: list[Aggregate],
    t_ns: int,
    inner,
    d: Dialect,
    counted: list[Aggregate] = (),
) -> str:
    """One scan of `source` (a table or per_order) computing every aggregate over it,
    grouped by customer, and for each of `counted` the number of rows it selects (column
    `_rows<i>`: whether a NUM_UNIQUE has a group at all).

    Each distinct row condition is evaluated once per row, as a boolean column; the
    aggregates' FILTER clauses combine those columns."""
    atoms = _atoms([*aggregates, *counted], t_ns, d)

    def kept(a: Aggregate) -> str | None:
        return " AND ".join(atoms[term] for term in _terms(a, t_ns, d)) or None

    columns = [
        f"{_expression(a, _value(a, t_ns, inner, d), kept(a), d)} AS {d.quote(a.name)}"
        for a in aggregates
    ]
    for i, a in enumerate(counted):
        only = "" if kept(a) is None else f" FILTER (WHERE {kept(a)})"
        columns.append(f"COUNT(*){only} AS _rows{i}")
    flags = "".join(f", {term} AS {name}" for term, name in atoms.items())
    key = d.quote(CUSTOMER_ID)
    return (
        f"SELECT {key}, {', '.join(columns)} FROM (SELECT *{flags} FROM {source}) src "
        f"GROUP BY {key}"
    )


def _distinct_sql(
    source: str, aggregates: list[Aggregate], t_ns: int, inner, d: Dialect
) -> list[tuple[list[Aggregate], str]]:
    """NUM_UNIQUE aggregates of `source`, one query per value counted: each (customer,
    value) pair once, with the latest time of its rows under each where-clause; a value
    counts in a window when that time is in it. Two grouped passes cost a fraction of
    COUNT(DISTINCT ...) FILTER (...) over many groups. Customers whose selected rows all
    have a null value are missing (0 distinct values; `_request` tells them from those
    without rows)."""
    key = d.quote(CUSTOMER_ID)
    by_value: dict[str, list[Aggregate]] = {}
    for a in aggregates:
        by_value.setdefault(_value(a, t_ns, inner, d), []).append(a)
    out = []
    for value, mine in by_value.items():
        time = d.epoch_us(d.quote(TIME_COLUMNS[mine[0].table]))
        wheres: dict[tuple, str] = {}
        for a in mine:
            wheres.setdefault(a.where, f"_l{len(wheres)}")
        latest = []
        for where, name in wheres.items():
            terms = " AND ".join(f"{d.quote(c)} = {_literal(v)}" for c, v in where)
            only = f" FILTER (WHERE {terms})" if terms else ""
            latest.append(f"MAX({time}){only} AS {name}")
        counts = []
        for a in mine:
            last = wheres[a.where]
            if a.window_ns is None:
                counts.append(f"COUNT({last}) AS {d.quote(a.name)}")
            else:
                start_us = -((a.window_ns - t_ns) // 1000)
                counts.append(
                    f"COUNT(CASE WHEN {last} >= {start_us} THEN 1 END) AS {d.quote(a.name)}"
                )
        sql = (
            f"SELECT {key}, {', '.join(counts)} FROM (SELECT {key}, {value} AS _v, "
            f"{', '.join(latest)} FROM {source} WHERE {value} IS NOT NULL "
            f"GROUP BY {key}, {value}) pairs GROUP BY {key}"
        )
        out.append((mine, sql))
    return out


def _per_order_sql(inner: dict[Aggregate, str], t_ns: int, d: Dialect) -> str:
    """Orders with each stacked feature's per-order value (its default where it has none).
    The per-order aggregates are unfiltered (`c360ml.features.dfs` admits no other); a
    NUM_UNIQUE of lines counts each (order, value) pair once, as `_distinct_sql` does."""
    order_id = d.quote(Orders.order_id)
    plain = {a: alias for a, alias in inner.items() if a.primitive != "num_unique"}
    per_line = "".join(
        f", {_expression(a, _value(a, t_ns, {}, d), None, d)} AS {d.quote(alias)}"
        for a, alias in plain.items()
    )
    joins = [
        f"LEFT JOIN (SELECT {order_id}, COUNT(*) AS _lines{per_line} FROM order_lines "
        f"GROUP BY {order_id}) l ON l.{order_id} = o.{order_id}"
    ]
    values = {}
    for i, (a, alias) in enumerate(inner.items()):
        if a in plain:
            values[a] = f"l.{d.quote(alias)}"
            continue
        value = _value(a, t_ns, {}, d)
        joins.append(
            f"LEFT JOIN (SELECT {order_id}, COUNT(*) AS n FROM (SELECT {order_id}, {value} "
            f"FROM order_lines WHERE {value} IS NOT NULL GROUP BY {order_id}, {value}) p "
            f"GROUP BY {order_id}) d{i} ON d{i}.{order_id} = o.{order_id}"
        )
        values[a] = f"CASE WHEN l.{order_id} IS NOT NULL THEN COALESCE(d{i}.n, 0) END"
    columns = ", ".join(
        f"COALESCE({values[a]}, {_literal(a.default)}) AS {d.quote(alias)}"
        if a.default is not None
        else f"{values[a]} AS {d.quote(alias)}"
        for a, alias in inner.items()
    )
    return f"SELECT o.*, {columns} FROM orders o {' '.join(joins)}"


def _mode_sql(a: Aggregate, t_ns: int, d: Dialect) -> str:
    key, column = d.quote(CUSTOMER_ID), d.quote(a.column)
    where = " AND ".join([f"{column} IS NOT NULL", *_terms(a, t_ns, d)])
    return (
        f"SELECT {key}, {column} AS v FROM (SELECT {key}, {column}, ROW_NUMBER() OVER "
        f"(PARTITION BY {key} ORDER BY COUNT(*) DESC, {column}) AS rank FROM {a.table} "
        f"WHERE {where} GROUP BY {key}, {column}) ranked WHERE rank = 1"
    )


def compute_aggregates(
    frames: dict[str, pd.DataFrame],
    t: pd.Timestamp,
    requests: list[tuple[pd.Index, list[Aggregate]]],
) -> list[pd.DataFrame]:
    """For each (ids, aggregates) request, the aggregates' values for those ids at t
    (frames from `activity_frames` of the view at t), indexed by customer_id, columns in
    the order given. The reference path: the SQL view (`aggregate_view`) is production's.

    The frames are copied into DuckDB once for all requests (scanning pandas strings is
    the slow part); then each request scans each table once.
    """
    con = duckdb_connection()
    # One thread: partial aggregates of several threads are combined in whatever order
    # they finish, which changes floating-point sums and means in their last bits (and
    # then float32 values): the same inputs must give the same features.
    threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    con.execute("SET threads = 1")
    try:
        for name in ("customers", "orders", "order_lines", "support_cases"):
            con.register(f"{name}_frame", frames[name])
        key, order_id = _quote(CUSTOMER_ID), _quote(Orders.order_id)
        for name in ("customers", "orders", "support_cases"):
            con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_frame")
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE order_lines AS SELECT l.*, o.{key}, "
            f"o.{_quote(Orders.order_ts)} FROM order_lines_frame l JOIN orders o USING ({order_id})"
        )
        return aggregate_view(con, t, requests)
    finally:
        con.execute(f"SET threads = {int(threads)}")
        con.close()


def aggregate_view(
    con, t: pd.Timestamp, requests: list[tuple[pd.Index, list[Aggregate]]], d: Dialect = DUCKDB
) -> list[pd.DataFrame]:
    """`compute_aggregates` over the relations customers, orders, order_lines (with their
    order's customer_id and order_ts) and support_cases of the view at t that `con` holds
    (`c360ml.features.asof.AsOfSql.build_view`)."""
    t_ns = pd.Timestamp(t).value
    if d != DUCKDB:  # `con`: anything with DuckDB's con.sql(query).df()
        return [_request(con, ids, aggregates, t_ns, d) for ids, aggregates in requests]
    threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    con.execute("SET threads = 1")  # see compute_aggregates
    try:
        return [_request(con, ids, aggregates, t_ns, d) for ids, aggregates in requests]
    finally:
        con.execute(f"SET threads = {int(threads)}")


@dataclass(frozen=True)
class _Part:
    """One query of a request, keyed by customer_id, and what its columns give: each of
    `plain` its aggregate's value; a scan's `counted` NUM_UNIQUEs their rows (`_rows<i>`);
    `distinct` NUM_UNIQUE counts, told apart from no rows by scan part `scan`'s rows;
    `value` one aggregate's value as column v (a profile's transform, a MODE)."""

    sql: str
    plain: tuple[Aggregate, ...] = ()
    counted: tuple[Aggregate, ...] = ()
    distinct: tuple[Aggregate, ...] = ()
    scan: int | None = None
    value: Aggregate | None = None


def _parts(aggregates: list[Aggregate], t_ns: int, d: Dialect) -> list[_Part]:
    """The queries of a request, whichever engine assembles them (`_request` lines their
    results up in pandas, `request_sql` joins them in one query): each table's aggregates
    in one scan of it, the stacked ones (over each order's line aggregates) in a scan of
    orders joined to those; NUM_UNIQUE apart (`_distinct_sql`); a profile's transform and
    each MODE a query of their own."""
    key = d.quote(CUSTOMER_ID)
    inner = {a.per_order: f"_per_order_{i}" for i, a in enumerate(aggregates) if a.per_order}
    per_order = f"({_per_order_sql(inner, t_ns, d)}) per_order" if inner else None
    scans = []
    for table in ("orders", "order_lines", "support_cases"):
        mine = [a for a in aggregates if a.table == table and a.primitive != "mode"]
        scans.append((table, [a for a in mine if a.per_order is None]))
        if table == "orders" and inner:
            scans.append((per_order, [a for a in mine if a.per_order is not None]))
    parts: list[_Part] = []
    for source, mine in scans:
        if not mine:
            continue
        plain = [a for a in mine if a.primitive != "num_unique"]
        distinct = [a for a in mine if a.primitive == "num_unique"]
        scan = len(parts)
        sql = _table_sql(source, plain, t_ns, inner, d, counted=distinct)
        parts.append(_Part(sql, plain=tuple(plain), counted=tuple(distinct)))
        for group, sql in _distinct_sql(source, distinct, t_ns, inner, d):
            parts.append(_Part(sql, distinct=tuple(group), scan=scan))
    for a in aggregates:
        if a.table == "customers":
            sql = f"SELECT {key}, {_days_before(a.column, t_ns, d)} AS v FROM customers"
        elif a.primitive == "mode":
            sql = _mode_sql(a, t_ns, d)
        else:
            continue
        parts.append(_Part(sql, value=a))
    return parts


def _request(con, ids: pd.Index, aggregates: list[Aggregate], t_ns: int, d: Dialect):
    # Each query's result is lined up with `ids` in pandas (DuckDB 2.0 fails with an
    # internal error on the equivalent join of these results when it runs one thread).
    parts = _parts(aggregates, t_ns, d)
    values: dict[str, pd.Series] = {}
    scans: dict[int, pd.DataFrame] = {}  # the scans whose rows a NUM_UNIQUE needs
    for k, part in enumerate(parts):
        frame = con.sql(part.sql).df().set_index(CUSTOMER_ID).reindex(ids)
        if part.counted:
            scans[k] = frame
        values.update((a.name, frame[a.name]) for a in part.plain)
        for a in part.distinct:  # 0 where rows have only null values; null where no rows
            rows = scans[part.scan][f"_rows{parts[part.scan].counted.index(a)}"]
            values[a.name] = frame[a.name].fillna(0).where(rows.fillna(0).to_numpy() > 0)
        if part.value is not None:
            values[part.value.name] = frame["v"]
    columns = {
        a.name: values[a.name] if a.default is None else values[a.name].fillna(a.default)
        for a in aggregates
    }
    return pd.DataFrame(columns, index=pd.Index(ids, name=CUSTOMER_ID))


def request_sql(ids: str, aggregates: list[Aggregate], t: pd.Timestamp, d: Dialect) -> str:
    """One query: customer_id of the relation `ids`, then each aggregate at t over the
    view's relations, defaults filled in: `_request`'s queries left-joined to the ids where
    DuckDB's engine lines their results up in pandas (the Spark engine's form: there,
    lining them up on the driver would bring each scan to it)."""
    key, t_ns = d.quote(CUSTOMER_ID), pd.Timestamp(t).value
    parts = _parts(aggregates, t_ns, d)
    joins: list[str] = []
    values: dict[str, str] = {}
    for k, part in enumerate(parts):
        alias = f"s{k}"
        joins.append(f"LEFT JOIN ({part.sql}) {alias} ON {alias}.{key} = ids.{key}")
        values.update((a.name, f"{alias}.{d.quote(a.name)}") for a in part.plain)
        for a in part.distinct:  # 0 where rows have only null values; null where no rows
            rows = f"s{part.scan}._rows{parts[part.scan].counted.index(a)}"
            values[a.name] = (
                f"CASE WHEN COALESCE({rows}, 0) > 0 THEN COALESCE({alias}.{d.quote(a.name)}, 0) END"
            )
        if part.value is not None:
            values[part.value.name] = f"{alias}.v"
    columns = [
        f"{values[a.name] if a.default is None else _filled(values[a.name], a.default)} "
        f"AS {d.quote(a.name)}"
        for a in aggregates
    ]
    return f"SELECT ids.{key}, {', '.join(columns)} FROM {ids} ids {' '.join(joins)}"


def _filled(value: str, default: float) -> str:
    return f"COALESCE({value}, {_literal(default)})"
