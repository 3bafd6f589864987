"""The as-of view of gold, the active population and the churn labels, written once as SQL.

What is true at a cutoff t (DESIGN.md, "Time, identity and names"), as this module says it:

- events with time <= t: orders (order_ts), their lines, support cases (created_ts) of a
  known customer;
- an order's or case's status (and is_cancelled) is its history row valid at t:
  valid_from <= t < valid_to, valid_to null = still current. Where a dirty history has
  several, the one with the latest valid_from wins (then the latest valid_to, is_cancelled
  true before false, the greater status). An entity with history but none of it valid at t
  yet (the change feed lags the event) takes its first recorded row (the earliest
  valid_from, then valid_to, is_cancelled false first, the lesser status); one with no
  history has never changed: its current value is its value at every t;
- a purchase is an order not cancelled at t, not a return, with net amount > 0;
- of the profile only what cannot change: customer_id and created_ts.

The active population at t: known customers (in the profile) with a purchase in
(t - L, t], statuses valid at t. The label at t: 1 (churned) when an active customer has no
purchase in (t, t + w], statuses valid at t + w. Both are `purchasers`.

Why SQL: the pandas and numpy forms of the same rules (`c360ml.features.gold`:
`view_as_of`, `StatusTimeline`; `c360ml.features.labels`) build the view per chunk of
customers and per cutoff in pandas, which was most of a refresh and of training. Here
DuckDB runs it over the lake's gold Delta tables (`LakeGold`: read through
`c360ml.storage.lake.Lake`, deletion vectors applied) or over frames (`GoldTables`, what
the tests and the leakage check hand in), and the compiled aggregates
(`c360ml.features.aggregates`) read the view it materialises. The pandas forms stay as the
reference the tests compare this SQL with (tests/features/test_asof_sql.py).

How the statements run (`AsOfSql` does it for DuckDB): the gold relations first, then
`session_statements` once (the session's customers' gold rows; each order's and case's
status as segments of time, resolved once for every cutoff: `status_segments`; the
candidate purchases with their is_cancelled over time: `candidate_states`, which AsOfSql
builds only when labels, populations or RFM first need them), then per cutoff
`view_statements` (the view's relations, which the aggregates read), or `labels_sql`,
`population_sql`, `rfm_sql` (queries over the session's relations). A refresh, one cutoff,
takes its populations from the view itself (`view_purchasers`).

The SQL reads the relations `gold_<table>` (the declared gold tables, `GOLD_RELATIONS`),
and for a session of some customers only (a training sample, a refresh chunk)
`asof_sample`, for a view of fewer of them `asof_customers` (one column, customer_id). It is
written in what DuckDB and Spark SQL both accept; the few spellings that differ (a
timestamp literal, epoch microseconds, a compensated sum, a quoted name, how a relation is
materialised) come from a `Dialect`, so the Spark engine can run the same definitions, the
compiled aggregates' too (`SPARK`; tests run them on Sail).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from c360ml.features.gold import GOLD_TABLES, GoldTables, standardise_gold
from c360ml.features.spec import ChurnConfig
from c360ml.schemas import (
    CustomerProfile,
    OrderLines,
    Orders,
    Products,
    StatusHistory,
    SupportCases,
    columns,
)
from c360ml.storage.lake import Lake
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

CUSTOMER_ID = CustomerProfile.customer_id
CUTOFF_TIME = "cutoff_time"
LABEL = "label"
IS_PURCHASE = "is_purchase"
RESTRICTION = "asof_customers"  # customer_id of the customers a restricted view keeps
SAMPLE = "asof_sample"  # customer_id of the customers a restricted session reads at all
# The relation each gold table is read as (GoldTables field -> gold_<table>).
GOLD_RELATIONS = {entity: f"gold_{name}" for entity, (name, _) in GOLD_TABLES.items()}
# The view's relations, in the order they are built (order_lines reads the view's orders).
VIEW = ("customers", "orders", "order_lines", "support_cases", "products")
# The columns of each view relation. orders' status is the one valid at t; lines carry
# their order's customer and time.
VIEW_COLUMNS = {
    "customers": [CUSTOMER_ID, CustomerProfile.created_ts],
    "orders": [
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
        Orders.status,
        Orders.is_cancelled,
        IS_PURCHASE,
    ],
    "order_lines": [
        OrderLines.order_id,
        OrderLines.item_id,
        OrderLines.category,
        OrderLines.qty,
        OrderLines.unit_price,
        OrderLines.net_amount,
        OrderLines.is_return,
        Orders.customer_id,
        Orders.order_ts,
    ],
    "support_cases": [
        SupportCases.case_id,
        SupportCases.customer_id,
        SupportCases.created_ts,
        SupportCases.case_type,
        SupportCases.priority,
        SupportCases.status,
    ],
    "products": [Products.item_id, Products.category],
}
# What each gold relation must hold for the view (GoldTables field -> columns).
NEEDED = {
    "customers": [CUSTOMER_ID, CustomerProfile.created_ts],
    "orders": [c for c in columns(Orders) if c != Orders.currency],
    "order_lines": columns(OrderLines),
    "products": [Products.item_id, Products.category],
    "support_cases": [c for c in columns(SupportCases) if c != SupportCases.title],
    "order_status": columns(StatusHistory),
    "case_status": columns(StatusHistory),
}


# ---------------------------------------------------------------- dialects


@dataclass(frozen=True)
class Dialect:
    """The spellings DuckDB and Spark SQL do not share; everything else is common."""

    name: str  # duckdb | spark

    def timestamp(self, t: pd.Timestamp) -> str:
        """A UTC instant as a literal of the engine's instant type (microseconds)."""
        text = utc(t).strftime("%Y-%m-%d %H:%M:%S.%f")
        if self.name == "duckdb":
            return f"TIMESTAMPTZ '{text}+00'"
        return f"TIMESTAMP '{text}+00:00'"  # a Spark session in UTC (spark/session.py)

    def epoch_us(self, expression: str) -> str:
        """Microseconds since the epoch of an instant (gold's resolution)."""
        return f"epoch_us({expression})" if self.name == "duckdb" else f"unix_micros({expression})"

    def quote(self, name: str) -> str:
        """An identifier, whatever characters it holds (a feature's name)."""
        if self.name == "duckdb":
            return '"' + name.replace('"', '""') + '"'
        return "`" + name.replace("`", "``") + "`"

    @property
    def fsum(self) -> str:
        """A sum of doubles; DuckDB's compensated one, as pandas sums."""
        return "FSUM" if self.name == "duckdb" else "SUM"

    def alias(self, name: str, sql: str) -> str:
        """A statement that names `sql` `name` (evaluated where it is read)."""
        return f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}"

    def materialise(self, name: str, sql: str, order: str = "") -> str:
        """A statement that makes `sql` the relation `name` for the queries that follow.
        DuckDB stores the rows in `order` (columns; a relation built on several threads is
        otherwise stored in whatever order they finish); Spark's relations keep none."""
        if self.name == "duckdb":
            by = f" ORDER BY {order}" if order else ""
            return f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM ({sql}) q{by}"
        return f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}"


DUCKDB = Dialect("duckdb")
SPARK = Dialect("spark")


# ---------------------------------------------------------------- the definitions

# Relations a session builds once (from the gold relations, for its customers): per
# status history, its rows ranked (`ranked_history`), each entity's first recorded row and
# the segments of time over which one of its rows is valid (`status_segments`); and the
# orders that are purchases unless cancelled, with their is_cancelled over time
# (`candidate_states`: what the population, the labels and RFM look at).
HISTORIES = {  # the view's relation -> its history, and the session's relations for it
    "orders": ("order_status", "asof_order_ranked", "asof_order_first", "asof_order_status"),
    "support_cases": ("case_status", "asof_case_ranked", "asof_case_first", "asof_case_status"),
}
CANDIDATES = "asof_candidates"
# The session's gold (a session of some customers stores theirs, in one order: each
# customer's rows by time, then key; of all customers, these are the gold relations).
SESSION_GOLD = {
    "customers": ("asof_gold_customers", CUSTOMER_ID),
    "orders": ("asof_gold_orders", f"{Orders.customer_id}, {Orders.order_ts}, {Orders.order_id}"),
    "order_lines": ("asof_gold_order_lines", f"{OrderLines.order_id}, {OrderLines.line}"),
    "support_cases": (
        "asof_gold_support_cases",
        f"{SupportCases.customer_id}, {SupportCases.created_ts}, {SupportCases.case_id}",
    ),
}
CUSTOMERS, ORDERS, LINES, CASES = (SESSION_GOLD[k][0] for k in SESSION_GOLD)
ORDER_IDS, CASE_IDS = "asof_order_ids", "asof_case_ids"  # a restricted session's


def _and(terms: list[str]) -> str:
    return " AND ".join(f"({t})" for t in terms) if terms else "TRUE"


def _restricted(column: str, relation: str = RESTRICTION) -> str:
    return f"{column} IN (SELECT {CUSTOMER_ID} FROM {relation})"


def ranked_history(history: str, entities: str | None = None) -> str:
    """A StatusHistory relation's rows (`entities`: a query of the ids wanted, None = all)
    in the rule's order per entity: pos 1 is its first recorded row (earliest valid_from,
    then valid_to, null last; is_cancelled false first; the lesser status, null first), and
    `clean` says the row starts after the one before it ended (or is the first) and is not
    empty, so that where an entity's rows are all clean each is alone valid over its span."""
    where = "entity_id IS NOT NULL" + (
        "" if entities is None else f" AND entity_id IN ({entities})"
    )
    return (
        "SELECT entity_id, status, is_cancelled, valid_from, valid_to, pos, "
        "valid_from IS NOT NULL AND (valid_to IS NULL OR valid_to > valid_from) AND (pos = 1 "
        "OR (prev_to IS NOT NULL AND prev_to <= valid_from)) AS clean FROM (SELECT h.*, "
        "ROW_NUMBER() OVER w AS pos, LAG(valid_to) OVER w AS prev_to FROM (SELECT entity_id, "
        "status, COALESCE(is_cancelled, FALSE) AS is_cancelled, valid_from, valid_to "
        f"FROM {history} WHERE {where}) h WINDOW w AS (PARTITION BY entity_id ORDER BY "
        "valid_from ASC NULLS LAST, valid_to ASC NULLS LAST, is_cancelled ASC, "
        "status ASC NULLS FIRST)) r"
    )


def first_rows(ranked: str) -> str:
    """Each entity's first recorded row: its state wherever none of its rows is valid."""
    return f"SELECT entity_id, status, is_cancelled FROM {ranked} WHERE pos = 1"


def status_segments(ranked: str) -> str:
    """The segments of time [seg_from, seg_to) (null seg_to = to the end) over which one of
    an entity's history rows is valid, with that row's status and is_cancelled, from
    `ranked_history` rows. Elsewhere none is valid: its first row applies (`first_rows`).

    This is the status rule of the module docstring resolved once for every instant: an
    entity whose rows are all clean (one after another) has its rows as its segments; for
    any other, the set of rows valid at t changes only where a row starts or ends, so
    between two such points one row wins: the latest start, then end (null last),
    is_cancelled true first, the greater status. The state at t is the segment holding t
    (`state_at`)."""
    dirty = f"SELECT DISTINCT entity_id FROM {ranked} WHERE NOT clean"
    return (
        f"WITH dirty AS ({dirty}), "
        f"h AS (SELECT * FROM {ranked} WHERE entity_id IN (SELECT entity_id FROM dirty)), "
        "points AS (SELECT entity_id, valid_from AS point FROM h WHERE valid_from IS NOT NULL "
        "UNION SELECT entity_id, valid_to FROM h WHERE valid_to IS NOT NULL), "
        "segments AS (SELECT entity_id, point AS seg_from, LEAD(point) OVER (PARTITION BY "
        "entity_id ORDER BY point) AS seg_to FROM points), "
        "winners AS (SELECT entity_id, seg_from, seg_to, status, is_cancelled FROM (SELECT "
        "s.entity_id, s.seg_from, s.seg_to, h.status, h.is_cancelled, ROW_NUMBER() OVER "
        "(PARTITION BY s.entity_id, s.seg_from ORDER BY h.valid_from DESC, h.valid_to DESC "
        "NULLS FIRST, h.is_cancelled DESC, h.status DESC NULLS LAST) AS pick FROM segments s "
        "JOIN h ON h.entity_id = s.entity_id AND h.valid_from <= s.seg_from AND (h.valid_to "
        "IS NULL OR h.valid_to > s.seg_from)) w WHERE pick = 1) "
        "SELECT entity_id, valid_from AS seg_from, valid_to AS seg_to, status, is_cancelled "
        f"FROM {ranked} r WHERE NOT EXISTS (SELECT 1 FROM dirty d WHERE d.entity_id = "
        "r.entity_id) UNION ALL SELECT entity_id, seg_from, seg_to, status, is_cancelled "
        "FROM winners"
    )


def state_at(relation: str, alias: str, key: str, at: str) -> str:
    """The LEFT JOINs that give `key`'s entity its state at `at` (a timestamp literal): the
    segment of `status_segments` holding it (alias `<alias>`), else the entity's first row
    (alias `<alias>_first`); neither = no history, whose current value applies
    (`_state`). `relation`: the view relation whose entities these are."""
    _, _, first, segments = HISTORIES[relation]
    holding = f"seg_from <= {at} AND (seg_to IS NULL OR seg_to > {at})"
    return (
        f"LEFT JOIN (SELECT entity_id, status, is_cancelled FROM {segments} WHERE {holding}) "
        f"{alias} ON {alias}.entity_id = {key} "
        f"LEFT JOIN {first} {alias}_first ON {alias}_first.entity_id = {key}"
    )


def _state(row: str, state: str, column: str, current: str) -> str:
    """`column` (status or is_cancelled) of the entity at the instant `state` joined for."""
    return (
        f"CASE WHEN {state}.entity_id IS NOT NULL THEN {state}.{column} "
        f"WHEN {state}_first.entity_id IS NOT NULL THEN {state}_first.{column} "
        f"ELSE {current} END"
    )


def _cancelled(order: str, state: str) -> str:
    """is_cancelled of order `order` at the instant `state` was joined for."""
    current = f"COALESCE({order}.{Orders.is_cancelled}, FALSE)"
    return _state(order, state, "is_cancelled", current)


def _candidate(order: str) -> str:
    """A purchase unless cancelled: not a return, net amount > 0."""
    return (
        f"NOT COALESCE({order}.{Orders.is_return}, FALSE) "
        f"AND COALESCE({order}.{Orders.net_amount} > 0, FALSE)"
    )


def _status(row: str, state: str, column: str = Orders.status) -> str:
    return _state(row, state, "status", f"{row}.{column}")


def session_statements(
    restricted: bool, d: Dialect = DUCKDB, store: bool = True, candidates: bool = True
) -> list[str]:
    """The relations a session builds once, for its customers (`restricted`: those in
    asof_sample): their gold rows (`SESSION_GOLD`: stored when restricted and `store`, so
    that a training sample's cutoffs do not scan the lake's tables each; a refresh chunk,
    one cutoff, reads them where they are instead of holding a copy beside its view),
    their orders' and cases' ranked histories, first rows and status segments, and their
    candidate purchases (of a known customer; `candidates` False: left to
    `candidate_statement`, for a session that may not need them). The views and labels
    read them, so a restricted engine must materialise them before asof_customers
    changes."""
    sample = {
        "customers": CUSTOMER_ID,
        "orders": Orders.customer_id,
        "support_cases": SupportCases.customer_id,
    }
    # The ids of the customers' orders and cases, stored once when restricted: the lines
    # and histories are filtered by a stored list, not through the customer filter of a
    # view that is evaluated again wherever it is read.
    ids = {
        "orders": (ORDER_IDS, Orders.order_id),
        "support_cases": (CASE_IDS, SupportCases.case_id),
    }
    out = []
    for name, (relation, order) in SESSION_GOLD.items():
        sql = f"SELECT {', '.join(NEEDED[name])} FROM {GOLD_RELATIONS[name]}"
        if restricted and name == "order_lines":
            sql += f" WHERE {OrderLines.order_id} IN (SELECT {Orders.order_id} FROM {ORDER_IDS})"
        elif restricted:
            sql += f" WHERE {_restricted(sample[name], SAMPLE)}"
        stored = restricted and store
        out.append(d.materialise(relation, sql, order) if stored else d.alias(relation, sql))
        if restricted and name in ids:
            table, key = ids[name]
            out.append(d.materialise(table, f"SELECT {key} FROM {relation}"))
    for relation, (history, ranked, first, segments) in HISTORIES.items():
        table, key = ids[relation]
        entities = f"SELECT {key} FROM {table}" if restricted else None
        source = ranked_history(GOLD_RELATIONS[history], entities)
        # The view's joins read first rows and segments: stored in one order, they give
        # the view's rows one order however many threads built them (AsOfSql).
        out += [
            d.materialise(ranked, source),
            d.materialise(first, first_rows(ranked), "entity_id"),
            d.materialise(segments, status_segments(ranked), "entity_id, seg_from"),
        ]
    return [*out, candidate_statement(d)] if candidates else out


def candidate_statement(d: Dialect = DUCKDB) -> str:
    """The session's candidate purchases (`candidate_states`), what labels, populations
    and RFM at any cutoff read."""
    return d.materialise(CANDIDATES, candidate_states())


def status_partition(relation: str) -> str:
    """Each entity's state over all time, in segments [seg_from, seg_to) that cover it
    (null = unbounded): its `status_segments`, and between and around them (or always, if
    none) its first row's (`first_rows`). An entity without history has none here."""
    _, _, first, segments = HISTORIES[relation]
    return (
        "WITH s AS (SELECT entity_id, seg_from, seg_to, status, is_cancelled, LEAD(seg_from) "
        "OVER (PARTITION BY entity_id ORDER BY seg_from) AS next_from, MIN(seg_from) OVER "
        f"(PARTITION BY entity_id) AS first_from FROM {segments}) "
        "SELECT entity_id, seg_from, seg_to, status, is_cancelled FROM s "
        # after a segment, up to the next (or for ever): the first row's state
        "UNION ALL SELECT s.entity_id, s.seg_to, s.next_from, f.status, f.is_cancelled "
        f"FROM s JOIN {first} f ON f.entity_id = s.entity_id WHERE s.seg_to IS NOT NULL "
        "AND (s.next_from IS NULL OR s.seg_to < s.next_from) "
        # before the first segment
        "UNION ALL SELECT s.entity_id, CASE WHEN FALSE THEN s.seg_from END, s.seg_from, "
        f"f.status, f.is_cancelled FROM s JOIN {first} f ON f.entity_id = s.entity_id "
        "WHERE s.seg_from = s.first_from "
        # no row ever valid: the first row's state always
        "UNION ALL SELECT f.entity_id, CASE WHEN FALSE THEN s.seg_from END, "
        "CASE WHEN FALSE THEN s.seg_from END, f.status, f.is_cancelled "
        f"FROM {first} f LEFT JOIN (SELECT DISTINCT entity_id, seg_from FROM {segments}) s "
        "ON s.entity_id = f.entity_id WHERE s.entity_id IS NULL"
    )


def candidate_states() -> str:
    """The session's candidate purchases (not a return, net amount > 0, of a known
    customer) with their is_cancelled over all time: a row per segment of
    `status_partition` (an order without history: one row, unbounded, its current value).
    Whether an order is a purchase at t is then a filter (`_covers`), not a join."""
    known = f"o.{Orders.customer_id} IN (SELECT {CUSTOMER_ID} FROM {CUSTOMERS})"
    return (
        f"SELECT o.{Orders.order_id}, o.{Orders.customer_id}, o.{Orders.order_ts}, "
        f"o.{Orders.net_amount}, s.seg_from, s.seg_to, CASE WHEN s.entity_id IS NULL THEN "
        f"COALESCE(o.{Orders.is_cancelled}, FALSE) ELSE s.is_cancelled END AS is_cancelled "
        f"FROM {ORDERS} o LEFT JOIN ({status_partition('orders')}) s "
        f"ON s.entity_id = o.{Orders.order_id} WHERE {_and([_candidate('o'), known])}"
    )


def _covers(at: str) -> str:
    """A candidate_states row of the segment holding `at`."""
    return f"(p.seg_from IS NULL OR p.seg_from <= {at}) AND (p.seg_to IS NULL OR p.seg_to > {at})"


def orders_at(t: pd.Timestamp, restricted: bool = False, d: Dialect = DUCKDB) -> str:
    """Orders with order_ts <= t, their status and is_cancelled valid at t, and
    is_purchase (`restricted`: of the customers in asof_customers only)."""
    at = d.timestamp(t)
    terms = [f"o.{Orders.order_ts} <= {at}"]
    if restricted:
        terms.append(f"o.{_restricted(Orders.customer_id)}")
    plain = [c for c in VIEW_COLUMNS["orders"] if c not in (Orders.status, Orders.is_cancelled)]
    plain = [f"o.{c}" for c in plain if c != IS_PURCHASE]
    cancelled = _cancelled("o", "s")
    return (
        f"SELECT {', '.join(plain)}, {_status('o', 's')} AS {Orders.status}, "
        f"{cancelled} AS {Orders.is_cancelled}, NOT ({cancelled}) AND {_candidate('o')} "
        f"AS {IS_PURCHASE} FROM {ORDERS} o "
        f"{state_at('orders', 's', f'o.{Orders.order_id}', at)} WHERE {_and(terms)}"
    )


def support_cases_at(t: pd.Timestamp, restricted: bool = False, d: Dialect = DUCKDB) -> str:
    """Support cases of a known customer created at or before t, with the status valid at t."""
    at = d.timestamp(t)
    terms = [f"c.{SupportCases.created_ts} <= {at}", f"c.{SupportCases.customer_id} IS NOT NULL"]
    if restricted:
        terms.append(f"c.{_restricted(SupportCases.customer_id)}")
    plain = [f"c.{c}" for c in VIEW_COLUMNS["support_cases"] if c != SupportCases.status]
    return (
        f"SELECT {', '.join(plain)}, {_status('c', 's', SupportCases.status)} AS "
        f"{SupportCases.status} FROM {CASES} c "
        f"{state_at('support_cases', 's', f'c.{SupportCases.case_id}', at)} WHERE {_and(terms)}"
    )


def order_lines_at(orders: str = "orders") -> str:
    """The lines of the view's orders (the relation `orders`), with their order's customer
    and time (what windows and per-customer aggregates of lines need)."""
    line = [
        c for c in VIEW_COLUMNS["order_lines"] if c not in (Orders.customer_id, Orders.order_ts)
    ]
    return (
        f"SELECT {', '.join(f'l.{c}' for c in line)}, o.{Orders.customer_id}, o.{Orders.order_ts} "
        f"FROM {LINES} l JOIN {orders} o "
        f"ON o.{Orders.order_id} = l.{OrderLines.order_id}"
    )


def customers_at(restricted: bool = False) -> str:
    """The profile's immutable columns (every profile: one created after t is kept, as in
    the pandas view; it has no events at t)."""
    where = f" WHERE {_restricted(CUSTOMER_ID)}" if restricted else ""
    cols = ", ".join(VIEW_COLUMNS["customers"])
    return f"SELECT {cols} FROM {CUSTOMERS}{where}"


def view_statements(t: pd.Timestamp, restricted: bool = False, d: Dialect = DUCKDB) -> list[str]:
    """The statements that make the view at t (after `session_statements`): relations
    customers, orders (with is_purchase), order_lines (with customer_id and order_ts),
    support_cases, products."""
    products = GOLD_RELATIONS["products"]
    sql = {
        "customers": customers_at(restricted),
        "orders": orders_at(t, restricted, d),
        "order_lines": order_lines_at("orders"),
        "support_cases": support_cases_at(t, restricted, d),
        "products": f"SELECT {', '.join(VIEW_COLUMNS['products'])} FROM {products}",
    }
    return [d.materialise(name, sql[name]) for name in VIEW]


def purchasers(since: pd.Timestamp | None, until: pd.Timestamp, d: Dialect = DUCKDB) -> str:
    """Distinct customers with a purchase in (since, until] (None: any time up to until),
    statuses valid at `until`, among the session's candidate purchases."""
    at = d.timestamp(until)
    terms = [f"p.{Orders.order_ts} <= {at}", _covers(at), "NOT p.is_cancelled"]
    if since is not None:
        terms.insert(0, f"p.{Orders.order_ts} > {d.timestamp(since)}")
    return f"SELECT DISTINCT p.{Orders.customer_id} FROM {CANDIDATES} p WHERE {_and(terms)}"


def view_purchasers(since: pd.Timestamp | None, d: Dialect = DUCKDB) -> str:
    """`purchasers(since, t)` read from the view at t (built for all the session's
    customers): its orders' is_purchase is the same rule at t, so one cutoff needs no
    `candidate_states`."""
    terms = ["o.is_purchase", _restricted(f"o.{Orders.customer_id}", "customers")]
    if since is not None:
        terms.append(f"o.{Orders.order_ts} > {d.timestamp(since)}")
    return f"SELECT DISTINCT o.{Orders.customer_id} FROM orders o WHERE {_and(terms)}"


def labels_sql(cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig, d: Dialect = DUCKDB) -> str:
    """cutoff (the index into `cutoffs`), customer_id, label of the active population at
    each cutoff (after `session_statements`), ordered by cutoff then customer_id."""
    parts = [
        f"SELECT {k} AS cutoff, a.{CUSTOMER_ID}, CASE WHEN b.{CUSTOMER_ID} IS NULL "
        f"THEN 1 ELSE 0 END AS {LABEL} FROM ({purchasers(t - cfg.lookback, t, d)}) a "
        f"LEFT JOIN ({purchasers(t, t + cfg.window, d)}) b ON b.{CUSTOMER_ID} = a.{CUSTOMER_ID}"
        for k, t in enumerate(cutoffs)
    ]
    return f"SELECT * FROM ({' UNION ALL '.join(parts)}) q ORDER BY cutoff, {CUSTOMER_ID}"


def population_sql(cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig, d: Dialect = DUCKDB) -> str:
    """cutoff, customer_id of the active population at each cutoff."""
    parts = [
        f"SELECT {k} AS cutoff, a.{CUSTOMER_ID} FROM ({purchasers(t - cfg.lookback, t, d)}) a"
        for k, t in enumerate(cutoffs)
    ]
    return f"SELECT * FROM ({' UNION ALL '.join(parts)}) q ORDER BY cutoff, {CUSTOMER_ID}"


def rfm_sql(cutoffs: Sequence[pd.Timestamp], lookback: pd.Timedelta, d: Dialect = DUCKDB) -> str:
    """cutoff, customer_id, last purchase time, number and net sum of purchases in
    (t - lookback, t]: every customer with a purchase at or before t."""
    parts = []
    for k, t in enumerate(cutoffs):
        at = d.timestamp(t)
        recent = f"p.{Orders.order_ts} > {d.timestamp(t - lookback)}"
        parts.append(
            f"SELECT {k} AS cutoff, p.{Orders.customer_id} AS {CUSTOMER_ID}, "
            f"MAX(p.{Orders.order_ts}) AS last_ts, COUNT(CASE WHEN {recent} THEN 1 END) AS n, "
            f"{d.fsum}(CASE WHEN {recent} THEN p.{Orders.net_amount} END) AS net "
            f"FROM {CANDIDATES} p WHERE p.{Orders.order_ts} <= {at} AND {_covers(at)} "
            f"AND NOT p.is_cancelled GROUP BY p.{Orders.customer_id}"
        )
    return f"SELECT * FROM ({' UNION ALL '.join(parts)}) q ORDER BY cutoff, {CUSTOMER_ID}"


# ---------------------------------------------------------------- where gold is read from


@dataclass(frozen=True)
class LakeGold:
    """The gold tables of a lake as the SQL reads them (nothing is read until it runs);
    `customers`: only these customers' activity (a training sample), None = all."""

    lake: Lake
    customers: pd.Index | None = None

    def __post_init__(self) -> None:
        if self.customers is not None:
            object.__setattr__(self, "customers", pd.Index(self.customers).astype(str))


def lake_gold(lake: Lake, customers: pd.Index | None = None) -> LakeGold:
    """Gold of `lake` to compute features and labels from in SQL (`LakeGold`)."""
    return LakeGold(lake, customers)


Gold = GoldTables | LakeGold


def _empty(model) -> pa.Table:
    """A table of no rows with the declared columns (a source without that table)."""
    types = {
        "str": pa.string(),
        "float64": pa.float64(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
        "datetime64[us, UTC]": pa.timestamp("us", tz="UTC"),
    }
    declared = model.to_schema().columns
    return pa.schema(
        [(n, types.get(str(c.dtype), pa.string())) for n, c in declared.items()]
    ).empty_table()


def _arrow(frame: pd.DataFrame, model, wanted: list[str]) -> pa.Table:
    """A frame's contract columns as Arrow with the declared types (an all-null column of
    objects has no type of its own)."""
    empty = _empty(model)
    arrays = {}
    for name in wanted:
        field = empty.schema.field(name)
        values = frame[name]
        if field.type == pa.string():
            values = values.astype(object).where(values.notna(), None)
        arrays[name] = pa.array(values, type=field.type, from_pandas=True)
    return pa.table(arrays)


class AsOfSql:
    """A DuckDB connection that reads gold through the as-of SQL: gold registered as the
    `gold_<table>` relations, the session's relations built for its customers
    (`session_statements`: all of gold's, or a sample's), and the view at a cutoff
    materialised as temporary tables (`build_view`) for the compiled aggregates, optionally
    for fewer customers (`restrict`). Labels, populations and RFM are queries over the
    session's relations.

    `store_gold` False: a session of one cutoff (a refresh chunk) reads its customers' gold
    rows from the lake where a view needs them instead of storing a copy (see
    `session_statements`). `threads`: DuckDB's threads for the session's relations, labels
    and populations
    (None: as the process has them; the refresh gives each of its worker processes its
    share of the cores). The view is built, and aggregated (`c360ml.features.aggregates`),
    on one thread: its rows are then stored in the order the gold files are scanned (and
    the session's relations it joins are stored sorted), so each customer's values are
    added in one order on every run, whatever the threads (several threads store rows in
    whatever order they finish). Use as a context manager (`close`)."""

    def __init__(
        self,
        gold: Gold,
        customers: pd.Index | None = None,
        threads: int | None = None,
        store_gold: bool = True,
    ) -> None:
        from c360ml.medallion.sql import duckdb_connection

        self.gold = gold
        self.dialect = DUCKDB
        self.con = duckdb_connection()
        self._threads = self.con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        # Memory DuckDB frees goes back to the system (its allocator otherwise keeps
        # gigabytes of a session's queries after they end, while training goes on).
        self.con.execute("SET allocator_background_threads = true")
        if threads is not None:
            self.con.execute(f"SET threads = {int(threads)}")
        self.view_at: pd.Timestamp | None = None
        self._candidates = False  # built on first use (`_per_cutoff`)
        self._frames: dict[str, pd.DataFrame] | None = None
        base = gold.customers if isinstance(gold, LakeGold) else None
        self.sample = _intersect(base, customers)  # the customers the session reads
        self.customers = self.sample  # those of the views
        try:
            self._register()
            if self.sample is not None:
                self.con.register(SAMPLE, _ids(self.sample))
                self.con.register(RESTRICTION, _ids(self.sample))
            restricted = self.sample is not None
            statements = session_statements(restricted, self.dialect, store_gold, False)
            for statement in statements:
                self.con.execute(statement)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> AsOfSql:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.con.execute(f"SET threads = {int(self._threads)}")
        finally:
            self.con.close()

    def _register(self) -> None:
        if isinstance(self.gold, LakeGold):
            from c360ml.medallion.sql import register

            lake = self.gold.lake
            for entity, (table, model) in GOLD_TABLES.items():
                relation = GOLD_RELATIONS[entity]
                if not lake.exists("gold", table):
                    self.con.register(relation, _empty(model))
                    continue
                missing = set(NEEDED[entity]) - set(lake.schema("gold", table).names)
                if missing:
                    raise ValueError(f"gold table {table} lacks column(s) {sorted(missing)}")
                register(self.con, lake, relation, "gold", table)
            return
        gold = standardise_gold(self.gold)
        for f in fields(GoldTables):
            _, model = GOLD_TABLES[f.name]
            frame = getattr(gold, f.name)
            self.con.register(GOLD_RELATIONS[f.name], _arrow(frame, model, NEEDED[f.name]))

    def restrict(self, customers: pd.Index | None) -> None:
        """The views that follow keep only these of the session's customers (None: all of
        them)."""
        customers = self.sample if customers is None else _intersect(self.sample, customers)
        self.customers = customers
        self.view_at, self._frames = None, None
        if customers is not None:
            self.con.register(RESTRICTION, _ids(customers))

    def query(self, sql: str) -> pd.DataFrame:
        return self.con.sql(sql).df()

    # -- the view

    def build_view(self, t: pd.Timestamp) -> None:
        """Materialise the view at t (customers, orders, order_lines, support_cases,
        products) for the queries that follow."""
        t = utc(t)
        if self.view_at is not None and self.view_at == t:
            return
        threads = self.con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        self.con.execute("SET threads = 1")  # see the class docstring
        try:
            for statement in view_statements(t, self.customers is not None, self.dialect):
                self.con.execute(statement)
        finally:
            self.con.execute(f"SET threads = {int(threads)}")
        self.view_at, self._frames = t, None

    def profile_ids(self) -> pd.Index:
        """customer_id of every profile in the view, sorted."""
        ids = self.query(f"SELECT DISTINCT {CUSTOMER_ID} FROM customers ORDER BY 1")
        return pd.Index(ids[CUSTOMER_ID].to_numpy(dtype=object), name=CUSTOMER_ID)

    def frames(self, rows: bool | int = True) -> dict[str, pd.DataFrame]:
        """The built view as the activity frames of `c360ml.features.aggregates` (what a
        feature the SQL cannot compute, or a user's SQL feature, reads in pandas); with
        `rows` False, the same frames empty (their columns and types), with a number, up to
        that many rows of each."""
        whole = rows is True
        if whole and self._frames is not None:
            return self._frames
        self._built()
        from c360ml.features.aggregates import LINE_ID

        queries = {name: f"SELECT * FROM {name}" for name in VIEW}
        if not whole:  # the first orders and their lines, the first of the others
            n = int(rows)
            first = f"SELECT {Orders.order_id} FROM orders ORDER BY 1 LIMIT {n}"
            queries = {name: f"{sql} LIMIT {n}" for name, sql in queries.items()}
            queries["orders"] = f"SELECT * FROM orders WHERE {Orders.order_id} IN ({first})"
            queries["order_lines"] = (
                f"SELECT * FROM order_lines WHERE {OrderLines.order_id} IN ({first})"
            )
        out = {name: self.con.sql(sql).df() for name, sql in queries.items()}
        for name, cols in TIMESTAMPS.items():
            for column in cols:
                out[name][column] = _as_utc_us(out[name][column])
        out["orders"] = out["orders"].drop(columns=[Orders.status])
        lines = out["order_lines"].drop(columns=[Orders.customer_id, Orders.order_ts])
        lines.insert(0, LINE_ID, np.arange(len(lines)))
        out["order_lines"] = lines
        if whole:
            self._frames = out
        return out

    def distinct(self, relation: str, column: str) -> list[Any]:
        """The distinct non-null values of a column of the built view."""
        self._built()
        sql = f'SELECT DISTINCT "{column}" FROM {relation} WHERE "{column}" IS NOT NULL'
        return [r[0] for r in self.con.sql(sql).fetchall()]

    def top_values(self, relation: str, column: str, n: int) -> list[Any]:
        """The n most frequent non-null values of a column of the built view (ties: the
        lesser value first)."""
        self._built()
        sql = (
            f'SELECT "{column}" FROM {relation} WHERE "{column}" IS NOT NULL '
            f'GROUP BY "{column}" ORDER BY COUNT(*) DESC, "{column}" LIMIT {int(n)}'
        )
        return [r[0] for r in self.con.sql(sql).fetchall()]

    def current(self) -> GoldTables:
        """Gold as it is now, for the view's customers (the `current_*` tables a user's
        SQL feature may read)."""
        from c360ml.features.gold import read_gold, restrict_to_customers

        if isinstance(self.gold, LakeGold):
            return read_gold(self.gold.lake, customers=self.customers)
        gold = standardise_gold(self.gold)
        return gold if self.customers is None else restrict_to_customers(gold, self.customers)

    def _built(self) -> pd.Timestamp:
        if self.view_at is None:
            raise RuntimeError("build_view(t) first")
        return self.view_at

    # -- labels and populations: queries over the session's relations (all its customers)

    def buyers_and_active(self, t: pd.Timestamp, cfg: ChurnConfig) -> tuple[pd.Index, pd.Index]:
        """Customers with a purchase at or before t, and those with one in (t - L, t] (the
        active population), both sorted: read from the view at t of all the session's
        customers (built, and the restriction lifted, if it is not the one held)."""
        t = utc(t)
        if self.customers is not self.sample:
            self.restrict(None)
        self.build_view(t)
        out = []
        for since in (None, t - cfg.lookback):
            rows = self.query(f"{view_purchasers(since, self.dialect)} ORDER BY 1")
            out.append(pd.Index(rows[CUSTOMER_ID].to_numpy(dtype=object)))
        return out[0], out[1]

    def _per_cutoff(self, sql, cutoffs: list[pd.Timestamp]) -> pd.DataFrame:
        """`sql(cutoffs)`'s rows, run a cutoff at a time (one query over all of them holds
        every cutoff's hash tables at once: gigabytes at 100k customers x 12 cutoffs)."""
        if not self._candidates:
            self.con.execute(candidate_statement(self.dialect))
            self._candidates = True
        parts = []
        for k, t in enumerate(cutoffs):
            rows = self.query(sql([t]))
            parts.append(rows.assign(cutoff=k))
        return pd.concat(parts, ignore_index=True)

    def labels(self, cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig) -> pd.DataFrame:
        cutoffs = _cutoffs(cutoffs)
        rows = self._per_cutoff(lambda ts: labels_sql(ts, cfg, self.dialect), cutoffs)
        out = _keyed(rows, cutoffs)
        out[LABEL] = rows[LABEL].to_numpy().astype(np.int8)
        for t in cutoffs:
            at = (out[CUTOFF_TIME] == t).to_numpy()
            rate = out.loc[at, LABEL].mean() if at.any() else float("nan")
            log.info("labels at %s: %d active, churn rate %.3f", t, at.sum(), rate)
        return out

    def population(self, cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig) -> pd.DataFrame:
        cutoffs = _cutoffs(cutoffs)
        rows = self._per_cutoff(lambda ts: population_sql(ts, cfg, self.dialect), cutoffs)
        return _keyed(rows, cutoffs)

    def rfm(self, cutoffs: Sequence[pd.Timestamp], lookback: pd.Timedelta) -> pd.DataFrame:
        cutoffs = _cutoffs(cutoffs)
        rows = self._per_cutoff(lambda ts: rfm_sql(ts, lookback, self.dialect), cutoffs)
        out = _keyed(rows, cutoffs)
        t_ns = np.array([t.value for t in cutoffs], dtype=np.int64)[rows["cutoff"].to_numpy()]
        last = _as_utc_us(rows["last_ts"]).dt.as_unit("ns").array.asi8
        out["recency_days"] = ((t_ns - last) / _DAY_NS).astype(np.float32)
        out["frequency_365d"] = rows["n"].to_numpy(dtype=np.float64).astype(np.float32)
        net = rows["net"].fillna(0.0).to_numpy(dtype=np.float64)
        out["monetary_365d"] = net.astype(np.float32)
        return out

    def latest_time(self) -> pd.Timestamp | None:
        """The latest event or status change of the session's customers (their orders',
        cases' and histories' times)."""
        sql = (
            f"SELECT MAX(t) AS t FROM (SELECT MAX({Orders.order_ts}) AS t FROM {ORDERS} "
            f"UNION ALL SELECT MAX({SupportCases.created_ts}) FROM {CASES} "
            f"UNION ALL SELECT MAX(valid_from) FROM {HISTORIES['orders'][1]} "
            f"UNION ALL SELECT MAX(valid_from) FROM {HISTORIES['support_cases'][1]}) m"
        )
        value = self.con.execute(sql).fetchall()[0][0]
        return None if value is None else utc(pd.Timestamp(value))


TIMESTAMPS = {
    "customers": [CustomerProfile.created_ts],
    "orders": [Orders.order_ts],
    "support_cases": [SupportCases.created_ts],
}
_DAY_NS = 86_400 * 10**9


def _as_utc_us(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).dt.as_unit("us")


def _ids(customers: pd.Index) -> pa.Table:
    return pa.table({CUSTOMER_ID: pa.array(np.asarray(customers, dtype=object), pa.string())})


def _intersect(base: pd.Index | None, customers: pd.Index | None) -> pd.Index | None:
    if customers is None:
        return base
    customers = pd.Index(customers).astype(str).unique()
    return customers if base is None else customers.intersection(base)


def _cutoffs(cutoffs: Sequence[pd.Timestamp]) -> list[pd.Timestamp]:
    out = sorted({utc(t) for t in cutoffs})
    if not out:
        raise ValueError("at least one cutoff time is needed")
    return out


def _keyed(rows: pd.DataFrame, cutoffs: list[pd.Timestamp]) -> pd.DataFrame:
    """customer_id, cutoff_time (UTC microseconds) of rows that name their cutoff by index."""
    times = pd.DatetimeIndex(cutoffs).as_unit("us")
    return pd.DataFrame(
        {
            CUSTOMER_ID: rows[CUSTOMER_ID].to_numpy(dtype=object),
            CUTOFF_TIME: times[rows["cutoff"].to_numpy(dtype=np.int64)],
        }
    )


# ---------------------------------------------------------------- the public functions


@contextlib.contextmanager
def _session(gold: Gold | AsOfSql) -> Iterator[AsOfSql]:
    """An open AsOfSql as it is, else one over gold for the duration."""
    if isinstance(gold, AsOfSql):
        yield gold
        return
    with AsOfSql(gold) as sql:
        yield sql


def compute_labels(
    gold: Gold | AsOfSql, cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig
) -> pd.DataFrame:
    """customer_id, cutoff_time, label (int8) of the active population at each cutoff, in
    SQL (`c360ml.features.labels.compute_labels` is the numpy reference)."""
    with _session(gold) as sql:
        return sql.labels(cutoffs, cfg)


def active_population(
    gold: Gold | AsOfSql, cutoffs: Sequence[pd.Timestamp], cfg: ChurnConfig
) -> pd.DataFrame:
    """customer_id, cutoff_time of customers with a purchase in (t - L, t], in SQL."""
    with _session(gold) as sql:
        return sql.population(cutoffs, cfg)


def buyers_and_active(
    gold: Gold | AsOfSql, t: pd.Timestamp, cfg: ChurnConfig
) -> tuple[pd.Index, pd.Index]:
    """The refresh's two populations at t (see `c360ml.features.labels.buyers_and_active`)."""
    with _session(gold) as sql:
        return sql.buyers_and_active(t, cfg)


def compute_rfm(
    gold: Gold | AsOfSql, cutoffs: Sequence[pd.Timestamp], lookback: pd.Timedelta
) -> pd.DataFrame:
    """Recency/frequency/monetary as known at each t (see `c360ml.features.labels`), in SQL."""
    with _session(gold) as sql:
        return sql.rfm(cutoffs, lookback)


__all__ = [
    "DUCKDB",
    "SPARK",
    "AsOfSql",
    "Dialect",
    "LakeGold",
    "active_population",
    "buyers_and_active",
    "compute_labels",
    "compute_rfm",
    "labels_sql",
    "lake_gold",
    "order_lines_at",
    "orders_at",
    "population_sql",
    "purchasers",
    "rfm_sql",
    "session_statements",
    "state_at",
    "status_segments",
    "support_cases_at",
    "view_statements",
]
