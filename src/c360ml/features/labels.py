"""Active population, churn labels and RFM baselines over many cutoffs, vectorised.

Why numpy and not Featuretools: these run over every customer at every cutoff (1M x 12
must take seconds) and define the target, so they are written out exactly:

- population at t: customers with >= 1 purchase in (t - L, t], purchase status as known
  at t (an order exactly at t counts);
- label at t: 1 (churned) when there is no purchase in (t, t + w]; an order exactly at t
  is therefore NOT in the label window. Orders in the window count as purchases when not
  cancelled according to the status history as of t + w (the end of the window).

Orders are sorted by time once, so each window is a contiguous slice found by binary
search, and per-customer counts are `np.bincount` over integer customer codes.

These take gold as frames (`GoldTables`) and are the reference for the SQL that computes the
same from a lake (`c360ml.features.asof`); given a `LakeGold` (or an open `AsOfSql`), each
function runs that SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from c360ml.features import asof
from c360ml.features.gold import GoldTables, StatusTimeline, epoch_ns
from c360ml.features.spec import ChurnConfig
from c360ml.schemas import CustomerProfile, Orders
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

CUSTOMER_ID = CustomerProfile.customer_id
CUTOFF_TIME = "cutoff_time"
LABEL = "label"
RFM_LOOKBACK = pd.Timedelta(days=365)
_DAY_NS = 86_400 * 10**9


@dataclass
class _OrderIndex:
    """Orders sorted by time as flat arrays, plus the status timeline in the same order."""

    ts: np.ndarray  # int64 ns, ascending
    customer: np.ndarray  # int64 code into `customers`
    candidate: np.ndarray  # purchase apart from cancellation: not a return, net > 0
    net: np.ndarray  # float64 net amount
    timeline: StatusTimeline
    customers: pd.Index  # customer ids known to the profile table

    @classmethod
    def build(cls, gold: GoldTables) -> _OrderIndex:
        cols = [Orders.order_id, Orders.customer_id, Orders.order_ts, Orders.net_amount]
        cols += [Orders.is_return, Orders.status, Orders.is_cancelled]
        orders = gold.orders[cols]
        orders = orders.take(np.argsort(epoch_ns(orders[Orders.order_ts]), kind="stable"))
        # Sorted ids: per-cutoff outputs come out ordered by customer_id without a sort.
        customers = pd.Index(np.sort(gold.customers[CUSTOMER_ID].unique().astype(str)))
        code = customers.get_indexer(orders[Orders.customer_id])
        orphans = int((code < 0).sum())
        if orphans:
            # A gold integrity problem; such orders cannot belong to a scored profile.
            log.warning("%d orders reference customer ids absent from the profile", orphans)
        ts = epoch_ns(orders[Orders.order_ts])
        candidate = (
            ~orders[Orders.is_return].to_numpy(bool)
            & (orders[Orders.net_amount].to_numpy(float) > 0)
            & (code >= 0)
        )
        timeline = StatusTimeline(
            orders[Orders.order_id],
            orders[Orders.status],
            orders[Orders.is_cancelled],
            gold.order_status,
            with_status=False,
        )
        return cls(
            ts=ts,
            customer=np.where(code >= 0, code, 0),
            candidate=candidate,
            net=orders[Orders.net_amount].to_numpy(float),
            timeline=timeline,
            customers=customers,
        )

    def window(self, start: pd.Timestamp | None, end: pd.Timestamp) -> tuple[int, int]:
        """Row range of orders with start < order_ts <= end (start None = all history)."""
        lo = 0 if start is None else int(np.searchsorted(self.ts, start.value, side="right"))
        hi = int(np.searchsorted(self.ts, end.value, side="right"))
        return lo, hi

    def purchases(self, lo: int, hi: int, status_time: pd.Timestamp) -> np.ndarray:
        """Mask over rows lo..hi-1: purchases with cancellation status as of status_time."""
        return self.candidate[lo:hi] & ~self.timeline.cancelled_at(status_time, lo, hi)

    def buyers(self, start: pd.Timestamp, end: pd.Timestamp, status_time: pd.Timestamp):
        """Boolean per customer code: >= 1 purchase in (start, end]."""
        lo, hi = self.window(start, end)
        mask = self.purchases(lo, hi, status_time)
        counts = np.bincount(self.customer[lo:hi][mask], minlength=len(self.customers))
        return counts > 0


def _cutoffs(cutoffs: Sequence[pd.Timestamp]) -> list[pd.Timestamp]:
    out = sorted({utc(t) for t in cutoffs})
    if not out:
        raise ValueError("at least one cutoff time is needed")
    return out


def _frame(customers: pd.Index, codes: np.ndarray, t: pd.Timestamp) -> pd.DataFrame:
    return pd.DataFrame(
        {
            CUSTOMER_ID: customers[codes].to_numpy(),
            CUTOFF_TIME: pd.Series(t, index=range(len(codes))).dt.as_unit("us"),
        }
    )


def _population(index: _OrderIndex, t: pd.Timestamp, cfg: ChurnConfig) -> np.ndarray:
    return np.flatnonzero(index.buyers(t - cfg.lookback, t, status_time=t))


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Parts are per ascending cutoff, each ordered by customer_id: already sorted."""
    return pd.concat(parts, ignore_index=True)


def active_population(
    gold: GoldTables | asof.LakeGold | asof.AsOfSql,
    cutoffs: Sequence[pd.Timestamp],
    cfg: ChurnConfig,
) -> pd.DataFrame:
    """customer_id, cutoff_time: customers with >= 1 purchase in (t - L, t] at each t."""
    if not isinstance(gold, GoldTables):
        return asof.active_population(gold, cutoffs, cfg)
    index = _OrderIndex.build(gold)
    parts = [_frame(index.customers, _population(index, t, cfg), t) for t in _cutoffs(cutoffs)]
    return _concat(parts)


def buyers_and_active(
    gold: GoldTables | asof.LakeGold | asof.AsOfSql, t: pd.Timestamp, cfg: ChurnConfig
) -> tuple[pd.Index, pd.Index]:
    """The refresh's two populations at t, from one order index (building it is most of
    the cost): customers with >= 1 purchase at or before t (compute_rfm's rows), and the
    active ones (active_population's). Both sorted customer_id."""
    if not isinstance(gold, GoldTables):
        return asof.buyers_and_active(gold, t, cfg)
    index = _OrderIndex.build(gold)
    t = utc(t)
    buyers = np.flatnonzero(index.buyers(None, t, status_time=t))
    return index.customers[buyers], index.customers[_population(index, t, cfg)]


def compute_labels(
    gold: GoldTables | asof.LakeGold | asof.AsOfSql,
    cutoffs: Sequence[pd.Timestamp],
    cfg: ChurnConfig,
) -> pd.DataFrame:
    """customer_id, cutoff_time, label (int8, 1 = churned) for the active population.

    The caller must only pass cutoffs whose window t + w has been observed (see
    `training_cutoffs`); a cutoff closer to the data end would mislabel customers as churned.
    """
    if not isinstance(gold, GoldTables):
        return asof.compute_labels(gold, cutoffs, cfg)
    index = _OrderIndex.build(gold)
    parts = []
    for t in _cutoffs(cutoffs):
        codes = _population(index, t, cfg)
        end = t + cfg.window
        bought = index.buyers(t, end, status_time=end)[codes]
        frame = _frame(index.customers, codes, t)
        frame[LABEL] = (~bought).astype(np.int8)
        parts.append(frame)
        log.info("labels at %s: %d active, churn rate %.3f", t, len(codes), frame[LABEL].mean())
    return _concat(parts)


def compute_rfm(
    gold: GoldTables | asof.LakeGold | asof.AsOfSql, cutoffs: Sequence[pd.Timestamp]
) -> pd.DataFrame:
    """Recency/frequency/monetary as known at each t, for the CI-D style baselines.

    Rows: every customer with >= 1 purchase at or before t (a superset of any active
    population, so a left merge on (customer_id, cutoff_time) never misses). recency_days =
    days from the last purchase to t; frequency_365d / monetary_365d = number / net sum of
    purchases in (t - 365 d, t]. Purchase status is the one valid at t. All float32.
    """
    if not isinstance(gold, GoldTables):
        return asof.compute_rfm(gold, cutoffs, RFM_LOOKBACK)
    index = _OrderIndex.build(gold)
    n = len(index.customers)
    parts = []
    for t in _cutoffs(cutoffs):
        _, hi = index.window(None, t)
        mask = index.purchases(0, hi, status_time=t)
        cust, ts = index.customer[:hi][mask], index.ts[:hi][mask]
        last = np.full(n, np.iinfo(np.int64).min)
        np.maximum.at(last, cust, ts)
        lo = int(np.searchsorted(ts, (t - RFM_LOOKBACK).value, side="right"))
        freq = np.bincount(cust[lo:], minlength=n)
        money = np.bincount(cust[lo:], weights=index.net[:hi][mask][lo:], minlength=n)
        codes = np.flatnonzero(last > np.iinfo(np.int64).min)
        frame = _frame(index.customers, codes, t)
        frame["recency_days"] = ((t.value - last[codes]) / _DAY_NS).astype(np.float32)
        frame["frequency_365d"] = freq[codes].astype(np.float32)
        frame["monetary_365d"] = money[codes].astype(np.float32)
        parts.append(frame)
    return _concat(parts)
