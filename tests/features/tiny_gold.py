"""Tiny hand-written gold for the feature tests; every frame validates against schemas.py.

Cutoff T = 2025-06-01 00:00 UTC, prediction window 90 d, lookback 365 d.

- C1: orders O1 (T-137 d, 100 online), O2 (exactly T-30 d, 50 store), O3 (exactly T,
  30 online); O8 (T+44 d, 40) in the label window -> active, label 0.
- C2: O4 (T-182 d, 80 store), O5 return (T-12 d, -20); O6 in the window but cancelled
  the next day; O10 purchase at T+95 d (outside the window) -> active, label 1.
- C3: only O7 (2023-01-01) -> not active at T.
- C4: only a return (O11, T-92 d, -15) -> not active at T.
- C5: only O9 exactly at T (25) -> active (counts at T), label 1 (not in (T, T+w]).
- Cases: K1 (C1, T-10 d, high) still active at T, resolved T+3 d; K2 (C2, T-200 d, low)
  resolved T-190 d; K3 (C2, T-5 d, normal) never resolved.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from c360ml.features import ChurnConfig, GoldTables
from c360ml.schemas import (
    CustomerProfile,
    OrderLines,
    Orders,
    Products,
    StatusHistory,
    SupportCases,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "features" / "retention.yaml"
MEASURES = ROOT / "features" / "measures.yaml"
T = pd.Timestamp("2025-06-01", tz="UTC")
DAY = pd.Timedelta(days=1)
CFG = ChurnConfig(prediction_window_days=90, active_lookback_days=365)


def ts(value) -> pd.Timestamp:
    return pd.Timestamp(value, tz="UTC") if not isinstance(value, pd.Timestamp) else value


def _profile(cid: str, created: str) -> dict:
    return {
        "customer_id": cid,
        "first_name": "Ann",
        "last_name": cid,
        "full_name": f"Ann {cid}",
        "email": f"{cid.lower()}@example.com",
        "phone": None,
        "street": "1 Main St",
        "city": "Oslo",
        "postal_code": "0150",
        "country": "NO",
        "customer_group": "retail",
        "currency": "NOK",
        "created_ts": ts(created),
        "source_count": 1,
        "sources": "d365",
    }


# order_id, customer, time, channel, net, is_return, cancelled_at (None = never)
ORDERS = [
    ("O1", "C1", T - 137 * DAY, "online", 100.0, False, None),
    ("O2", "C1", T - 30 * DAY, "store", 50.0, False, None),
    ("O3", "C1", T, "online", 30.0, False, None),
    ("O8", "C1", T + 44 * DAY, "online", 40.0, False, None),
    ("O4", "C2", T - 182 * DAY, "store", 80.0, False, None),
    ("O5", "C2", T - 12 * DAY, "store", -20.0, True, None),
    ("O6", "C2", T + 10 * DAY, "online", 70.0, False, T + 11 * DAY),
    ("O10", "C2", T + 95 * DAY, "online", 60.0, False, None),
    ("O7", "C3", ts("2023-01-01"), "store", 45.0, False, None),
    ("O11", "C4", T - 92 * DAY, "store", -15.0, True, None),
    ("O9", "C5", T, "call-center", 25.0, False, None),
]
# order_id, item, category, net
LINES = [
    ("O1", "I1", "shoes", 60.0),
    ("O1", "I2", "shirts", 40.0),
    ("O2", "I1", "shoes", 50.0),
    ("O3", "I3", "hats", 30.0),
    ("O8", "I1", "shoes", 40.0),
    ("O4", "I2", "shirts", 80.0),
    ("O5", "I2", "shirts", -20.0),
    ("O6", "I3", "hats", 70.0),
    ("O10", "I3", "hats", 60.0),
    ("O7", "I1", "shoes", 45.0),
    ("O11", "I1", "shoes", -15.0),
    ("O9", "I2", "shirts", 25.0),
]
# case_id, customer, created, priority, resolved_at
CASES = [
    ("K1", "C1", T - 10 * DAY, "high", T + 3 * DAY),
    ("K2", "C2", T - 200 * DAY, "low", T - 190 * DAY),
    ("K3", "C2", T - 5 * DAY, "normal", None),
]


def _orders() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, hist = [], []
    for oid, cid, when, channel, net, ret, cancel in ORDERS:
        rows.append(
            {
                "order_id": oid,
                "customer_id": cid,
                "order_ts": when,
                "channel": channel,
                "store": "S1" if channel == "store" else None,
                "currency": "NOK",
                "gross_amount": abs(net),
                "discount_amount": 0.0,
                "net_amount": net,
                "item_count": 1.0,
                "is_return": ret,
                "status": "cancelled" if cancel is not None else "invoiced",
                "is_cancelled": cancel is not None,
            }
        )
        hist.append(_hist(oid, "invoiced", False, when, cancel))
        if cancel is not None:
            hist.append(_hist(oid, "cancelled", True, cancel, None))
    return pd.DataFrame(rows), pd.DataFrame(hist)


def _hist(eid, status, cancelled, start, end) -> dict:
    return {
        "entity_id": eid,
        "status": status,
        "is_cancelled": cancelled,
        "valid_from": start,
        "valid_to": end if end is not None else pd.NaT,
    }


def _cases() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, hist = [], []
    for kid, cid, when, prio, resolved in CASES:
        rows.append(
            {
                "case_id": kid,
                "customer_id": cid,
                "created_ts": when,
                "case_type": "problem",
                "priority": prio,
                "title": "late delivery",
                "status": "active" if resolved is None else "resolved",
            }
        )
        hist.append(_hist(kid, "active", False, when, resolved))
        if resolved is not None:
            hist.append(_hist(kid, "resolved", False, resolved, None))
    return pd.DataFrame(rows), pd.DataFrame(hist)


def validate(gold: GoldTables) -> GoldTables:
    """Every frame through its pandera model (coerces types, as gold would hold them)."""
    return GoldTables(
        customers=CustomerProfile.validate(gold.customers),
        orders=Orders.validate(gold.orders),
        order_lines=OrderLines.validate(gold.order_lines),
        products=Products.validate(gold.products),
        support_cases=SupportCases.validate(gold.support_cases),
        order_status=StatusHistory.validate(gold.order_status),
        case_status=StatusHistory.validate(gold.case_status),
    )


def make_gold() -> GoldTables:
    orders, order_status = _orders()
    cases, case_status = _cases()
    lines = pd.DataFrame(
        [
            {
                "order_id": oid,
                "line": i + 1,
                "item_id": item,
                "category": cat,
                "qty": 1.0,
                "unit_price": abs(net),
                "net_amount": net,
                "is_return": net < 0,
            }
            for i, (oid, item, cat, net) in enumerate(LINES)
        ]
    )
    products = pd.DataFrame(
        {
            "item_id": ["I1", "I2", "I3"],
            "name": ["Runner", "Tee", "Cap"],
            "category": ["shoes", "shirts", "hats"],
        }
    )
    customers = pd.DataFrame(
        [
            _profile("C1", "2024-01-01"),
            _profile("C2", "2024-06-01"),
            _profile("C3", "2022-06-01"),
            _profile("C4", "2024-02-01"),
            _profile("C5", "2025-05-01"),
        ]
    )
    return validate(
        GoldTables(
            customers=customers,
            orders=orders,
            order_lines=lines,
            products=products,
            support_cases=cases,
            order_status=order_status,
            case_status=case_status,
        )
    )


def add_rows(gold: GoldTables, **frames: pd.DataFrame) -> GoldTables:
    """A copy of gold with rows appended to the named tables, re-validated."""
    changes = {
        name: pd.concat([getattr(gold, name), extra], ignore_index=True)
        for name, extra in frames.items()
    }
    return validate(replace(gold, **changes))
