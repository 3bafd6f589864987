"""The gold tables the feature stage consumes, and the as-of view that keeps it leak-free.

Why a view: features for cutoff t are computed on `view_as_of(gold, t)`, which holds only
what was true at t (events with time <= t, order/case status from the history row valid at
t, no mutable profile attributes). Data from after t is never even handed to Featuretools,
so a cancellation, case resolution or profile edit after t cannot change features at t.

Status resolution (shared by the view, the population and the labels through
`StatusTimeline`): the history row with valid_from <= t < valid_to (valid_to null = still
current); of several (a dirty history), the latest valid_from, then valid_to, is_cancelled,
status. If an entity has history but none of it is valid at t yet (the change feed lags
the event time), its first recorded status is used. An entity with no history at all has
never changed, so its current value is its value at every t.

This pandas view is the reference: production computes the same view in SQL over the lake
(`c360ml.features.asof`), and the tests hold the two equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from c360ml.medallion.declarations import entities
from c360ml.schemas import (
    CustomerProfile,
    OrderLines,
    Orders,
    StatusHistory,
    SupportCases,
    columns,
)
from c360ml.storage.lake import Lake
from c360ml.timestamps import utc, utc_column

log = logging.getLogger(__name__)

# Gold table name per GoldTables field, and its contract: the declared gold tables that
# name a feature-stage entity (`c360ml.medallion.declarations`).
GOLD_TABLES = {entity: (t.name, t.schema) for entity, t in entities().items()}
# Profile columns that cannot change after creation; everything else in the profile is
# mutable and only usable through a valid-from/valid-to history.
IMMUTABLE_PROFILE_COLUMNS = [CustomerProfile.customer_id, CustomerProfile.created_ts]
TIMESTAMP_COLUMNS = {
    "customers": [CustomerProfile.created_ts],
    "orders": [Orders.order_ts],
    "support_cases": [SupportCases.created_ts],
    "order_status": [StatusHistory.valid_from, StatusHistory.valid_to],
    "case_status": [StatusHistory.valid_from, StatusHistory.valid_to],
}
_NS_MAX = np.iinfo(np.int64).max


@dataclass
class GoldTables:
    """Gold frames per `c360ml.schemas`; order_status/case_status are StatusHistory frames."""

    customers: pd.DataFrame
    orders: pd.DataFrame
    order_lines: pd.DataFrame
    products: pd.DataFrame
    support_cases: pd.DataFrame
    order_status: pd.DataFrame
    case_status: pd.DataFrame


def _utc(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Timestamps as datetime64[us, UTC] so comparisons with a UTC cutoff are exact."""
    out = frame.copy()
    for col in cols:
        out[col] = utc_column(out[col])
    return out


def standardise_gold(gold: GoldTables) -> GoldTables:
    """Check every contract column is present and put timestamps in UTC microseconds."""
    tables = {}
    for f in fields(GoldTables):
        frame = getattr(gold, f.name)
        name, model = GOLD_TABLES[f.name]
        missing = [c for c in columns(model) if c not in frame.columns]
        if missing and f.name != "customers":
            raise ValueError(f"gold table {name} lacks column(s) {missing}")
        if f.name == "customers":
            missing = [c for c in IMMUTABLE_PROFILE_COLUMNS if c not in frame.columns]
            if missing:
                raise ValueError(f"gold table {name} lacks column(s) {missing}")
        tables[f.name] = _utc(frame, TIMESTAMP_COLUMNS.get(f.name, []))
    return GoldTables(**tables)


def read_gold(lake: Lake, customers: pd.Index | None = None) -> GoldTables:
    """Read the seven gold tables the feature stage needs (the stage's only I/O).

    With `customers`, only those customers and their activity are read: the customer_id
    (orders, cases, profile) and order/case id (lines, status histories) filters are pushed
    into the Arrow scan, so memory scales with the sample, not the lake. Products (a small
    catalogue) are read whole. A source without some tables (the generic CSV has no
    products, cases or status history) gets them empty, with their declared columns, so
    the same features apply.
    """
    ids = None if customers is None else _ids(pd.Index(customers))
    frames = {
        "customers": _read_table(lake, "customers", CustomerProfile.customer_id, ids),
        "orders": _read_table(lake, "orders", Orders.customer_id, ids),
        "support_cases": _read_table(lake, "support_cases", SupportCases.customer_id, ids),
        "products": _read_table(lake, "products", None, None),
    }
    # Lines and status histories follow the orders and cases that were read.
    order_ids = None if ids is None else _ids(frames["orders"][Orders.order_id])
    case_ids = None if ids is None else _ids(frames["support_cases"][SupportCases.case_id])
    frames["order_lines"] = _read_table(lake, "order_lines", OrderLines.order_id, order_ids)
    frames["order_status"] = _read_table(lake, "order_status", StatusHistory.entity_id, order_ids)
    frames["case_status"] = _read_table(lake, "case_status", StatusHistory.entity_id, case_ids)
    return standardise_gold(GoldTables(**frames))


def _ids(values: pd.Series | pd.Index) -> pa.Array:
    return pa.array(pd.Index(values).astype(str).unique(), pa.string())


def _read_table(lake: Lake, field_name: str, key: str | None, ids: pa.Array | None) -> pd.DataFrame:
    """One gold table's contract columns, restricted to rows whose `key` is in `ids`."""
    table, model = GOLD_TABLES[field_name]
    if lake.exists("gold", table):
        present = set(lake.schema("gold", table).names)
        wanted = [c for c in columns(model) if c in present]  # extras are the writer's business
        where = None if ids is None or key is None else ds.field(key).isin(ids)
        frame = lake.read_pandas("gold", table, columns=wanted, filter=where)
    else:
        declared = model.to_schema().columns
        frame = pd.DataFrame({n: pd.Series(dtype=c.dtype.type) for n, c in declared.items()})
    log.info("read gold/%s: %d rows", table, len(frame))
    return frame


def read_ordering_customers(lake: Lake, start: pd.Timestamp, end: pd.Timestamp) -> pd.Index:
    """Distinct customer_id with an order in (start, end], sorted (a light read).

    Only the customer_id column of the orders in the window leaves the Arrow scan, and it
    is reduced batch by batch, so this costs memory in customers, not orders. Every
    customer active at a cutoff in [start + lookback, end] is in it (a superset: returns
    and cancelled orders are not looked at), which is what sizing a sample needs.
    """
    if not lake.exists("gold", "orders"):
        raise FileNotFoundError(f"no gold/orders table in {lake.root}; build gold first")
    ts_type = lake.schema("gold", "orders").field(Orders.order_ts).type
    ts = ds.field(Orders.order_ts)
    window = (ts > pa.scalar(utc(start), ts_type)) & (ts <= pa.scalar(utc(end), ts_type))
    batches = lake.batches("gold", "orders", columns=[Orders.customer_id], filter=window)
    uniques = [pc.unique(batch.column(0)) for batch in batches]
    if not uniques:
        return pd.Index([], dtype=object, name=Orders.customer_id)
    ids = pc.unique(pa.chunked_array(uniques, pa.string())).drop_null()
    return pd.Index(
        np.sort(ids.to_numpy(zero_copy_only=False).astype(str)), name=Orders.customer_id
    )


def epoch_ns(s: pd.Series) -> np.ndarray:
    """int64 nanoseconds since the epoch (UTC); NaT -> int64 min.

    Through `.array.asi8`: `to_numpy()` on tz-aware data boxes every value (a Timestamp each).
    """
    return pd.to_datetime(s, utc=True).dt.as_unit("ns").array.asi8.copy()


def _ns(s: pd.Series) -> np.ndarray:
    """Like epoch_ns, but NaT -> int64 max (an open-ended valid_to)."""
    out = epoch_ns(s)
    out[out == np.iinfo(np.int64).min] = _NS_MAX
    return out


class StatusTimeline:
    """Status and is_cancelled of each entity at any instant, from a StatusHistory.

    Built once (O(history)), queried per cutoff with numpy only, so the label code can
    ask for 24 instants over millions of orders cheaply. Entities are the rows of the
    frame passed in, in that order.
    """

    def __init__(
        self,
        entity_ids: pd.Series,
        current_status: pd.Series,
        current_cancelled: pd.Series,
        history: pd.DataFrame,
        with_status: bool = True,
    ) -> None:
        idx = pd.Index(entity_ids).get_indexer(history[StatusHistory.entity_id])
        keep = idx >= 0
        vf = _ns(history[StatusHistory.valid_from])[keep]
        vt = _ns(history[StatusHistory.valid_to])[keep]
        idx = idx[keep]
        n = len(entity_ids)
        if with_status:
            all_status = pd.concat(
                [current_status.astype("string"), history[StatusHistory.status].astype("string")]
            )
            cats = pd.Categorical(all_status)  # sorted categories: codes order as strings do
            self.categories = cats.categories
            codes = cats.codes.astype(np.int32)
        else:  # labels only need is_cancelled; skip factorising millions of strings
            self.categories = pd.Index(["?"])
            codes = np.zeros(n + len(history), dtype=np.int32)
        status = codes[n:][keep]
        cancelled = history[StatusHistory.is_cancelled].to_numpy(bool)[keep]
        # Sort by entity, then valid_from, valid_to (NaT last), is_cancelled, status (NaN
        # first): entity slices are contiguous, an entity's first row is its first recorded
        # one, and where valid rows overlap (dirty history) the last of them wins. The same
        # order as the SQL's (`c360ml.features.asof.status_segments`), so ties resolve alike.
        order = np.lexsort((status, cancelled, vt, vf, idx))
        self._idx, self._vf, self._vt = idx[order], vf[order], vt[order]
        self._status = status[order]
        self._cancelled = cancelled[order]
        # Fallback per entity: first recorded row if it has history, else its current value.
        self._fb_status = codes[:n].copy()
        self._fb_cancelled = current_cancelled.to_numpy(bool).copy()
        firsts = np.flatnonzero(np.r_[True, self._idx[1:] != self._idx[:-1]]) if n else []
        if len(self._idx):
            self._fb_status[self._idx[firsts]] = self._status[firsts]
            self._fb_cancelled[self._idx[firsts]] = self._cancelled[firsts]
        self.n = n

    def _valid(self, t_ns: int, lo: int, hi: int) -> np.ndarray:
        """Positions of the row valid at t of each entity lo..hi-1 that has one (the last
        of its valid rows in the sort order)."""
        a, b = np.searchsorted(self._idx, [lo, hi])
        rows = np.flatnonzero((self._vf[a:b] <= t_ns) & (t_ns < self._vt[a:b])) + a
        ids = self._idx[rows]
        return rows[np.r_[ids[1:] != ids[:-1], True]] if len(rows) else rows

    def cancelled_at(self, t: pd.Timestamp, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """is_cancelled at t of entities lo..hi-1 (entity order of the constructor)."""
        hi = self.n if hi is None else hi
        rows = self._valid(utc(t).value, lo, hi)
        out = self._fb_cancelled[lo:hi].copy()
        out[self._idx[rows] - lo] = self._cancelled[rows]
        return out

    def status_at(self, t: pd.Timestamp) -> tuple[pd.Series, np.ndarray]:
        """(status strings, is_cancelled) of every entity at t."""
        rows = self._valid(utc(t).value, 0, self.n)
        codes = self._fb_status.copy()
        cancelled = self._fb_cancelled.copy()
        codes[self._idx[rows]] = self._status[rows]
        cancelled[self._idx[rows]] = self._cancelled[rows]
        status = pd.Categorical.from_codes(codes, self.categories)
        return pd.Series(status, dtype="string"), cancelled


def is_purchase(orders: pd.DataFrame) -> pd.Series:
    """A purchase: not cancelled/voided, not a return, net amount > 0 (DESIGN.md)."""
    return (
        ~orders[Orders.is_cancelled].astype(bool)
        & ~orders[Orders.is_return].astype(bool)
        & (orders[Orders.net_amount] > 0)
    )


def _history_as_of(history: pd.DataFrame, t: pd.Timestamp) -> pd.DataFrame:
    """The history as it was known at t: rows started by t, the one current at t open."""
    known = history[history[StatusHistory.valid_from] <= t].copy()
    still_open = known[StatusHistory.valid_to] > t
    known.loc[still_open, StatusHistory.valid_to] = pd.NaT
    return known


def _with_status_at(
    frame: pd.DataFrame, id_col: str, history: pd.DataFrame, t: pd.Timestamp
) -> pd.DataFrame:
    # Cases carry no is_cancelled column; their status string says it.
    has_flag = Orders.is_cancelled in frame.columns
    cancelled = frame[Orders.is_cancelled] if has_flag else pd.Series(False, index=frame.index)
    timeline = StatusTimeline(frame[id_col], frame["status"], cancelled, history)
    status, is_cancelled = timeline.status_at(t)
    out = frame.copy()
    out["status"] = status.to_numpy()
    if has_flag:
        out[Orders.is_cancelled] = is_cancelled
    return out


def view_as_of(gold: GoldTables, t: pd.Timestamp) -> GoldTables:
    """What was true at t: events with time <= t, statuses valid at t, immutable profile.

    The customers frame keeps only IMMUTABLE_PROFILE_COLUMNS (customer_id, created_ts);
    the status histories are cut to what was known at t. Products carry no history and
    are passed through.
    """
    t = utc(t)
    orders = gold.orders[gold.orders[Orders.order_ts] <= t]
    orders = _with_status_at(orders, Orders.order_id, gold.order_status, t)
    lines = gold.order_lines[gold.order_lines[OrderLines.order_id].isin(orders[Orders.order_id])]
    cases = gold.support_cases[gold.support_cases[SupportCases.created_ts] <= t]
    cases = _with_status_at(cases, SupportCases.case_id, gold.case_status, t)
    return replace(
        gold,
        customers=gold.customers[IMMUTABLE_PROFILE_COLUMNS].copy(),
        orders=orders.reset_index(drop=True),
        order_lines=lines.reset_index(drop=True),
        support_cases=cases.reset_index(drop=True),
        order_status=_history_as_of(gold.order_status, t),
        case_status=_history_as_of(gold.case_status, t),
    )


def restrict_to_customers(gold: GoldTables, customer_ids: pd.Index) -> GoldTables:
    """Only these customers and their activity (speeds up per-cutoff feature runs)."""
    orders = gold.orders[gold.orders[Orders.customer_id].isin(customer_ids)]
    return replace(
        gold,
        customers=gold.customers[gold.customers[CustomerProfile.customer_id].isin(customer_ids)],
        orders=orders,
        order_lines=gold.order_lines[
            gold.order_lines[OrderLines.order_id].isin(orders[Orders.order_id])
        ],
        support_cases=gold.support_cases[
            gold.support_cases[SupportCases.customer_id].isin(customer_ids)
        ],
    )


__all__ = [
    "GoldTables",
    "StatusTimeline",
    "is_purchase",
    "read_gold",
    "read_ordering_customers",
    "restrict_to_customers",
    "standardise_gold",
    "view_as_of",
]
