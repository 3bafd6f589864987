"""The leakage check a user runs on a spec: features at a cutoff must not move when only
data after the cutoff changes.

Why a helper of its own: the built-in features are tested for leakage in the suite, but
a user's spec (DFS primitives and SQL features that may read the tables as they are now)
is checked where it is written, before training accepts it. Each feature is computed at
the cutoff on the gold tables and on every `future_changes` of them; one that moves is
named with the change that moved it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from c360ml.features.dfs import calculate_features, derive_feature_set
from c360ml.features.gold import (
    GoldTables,
    restrict_to_customers,
    standardise_gold,
    view_as_of,
)
from c360ml.schemas import CustomerProfile, OrderLines, Orders, StatusHistory
from c360ml.timestamps import utc

log = logging.getLogger(__name__)
CUSTOMER_ID = CustomerProfile.customer_id


@dataclass(frozen=True)
class Leak:
    """A feature whose values at the cutoff changed when only later data changed."""

    feature: str
    change: str  # which change after the cutoff moved it
    customers: int  # customers whose value moved
    of: int  # customers compared

    def __str__(self) -> str:
        return (
            f"feature {self.feature!r} leaks: its values at the cutoff changed for "
            f"{self.customers} of {self.of} customers when only data after the cutoff "
            f"changed ({self.change})"
        )


@dataclass(frozen=True)
class LeakageReport:
    """What `check_leakage` compared and which features leak."""

    cutoff: pd.Timestamp
    customers: int
    features: tuple[str, ...]
    leaks: tuple[Leak, ...]

    @property
    def ok(self) -> bool:
        return not self.leaks

    def message(self) -> str:
        if self.ok:
            return (
                f"no leak: {len(self.features)} feature(s) of {self.customers} customers at "
                f"{self.cutoff.date()} are unchanged by every change after the cutoff"
            )
        by_feature: dict[str, list[Leak]] = {}
        for leak in self.leaks:
            by_feature.setdefault(leak.feature, []).append(leak)
        return "; ".join(
            f"{leaks[0]}"
            + (f" and {len(leaks) - 1} other change(s)" if len(leaks) > 1 else "")
            + ": read the as-of view tables (orders, order_lines, support_cases), "
            "not current_*, and nothing after cutoff_time"
            for leaks in by_feature.values()
        )

    def raise_if_leaky(self) -> None:
        if not self.ok:
            raise LeakageError(self.message())


class LeakageError(ValueError):
    """A user's feature reads data after its cutoff (the label window or later edits)."""


def future_changes(gold: GoldTables, t: pd.Timestamp) -> dict[str, GoldTables]:
    """Versions of `gold` that differ from it only after t (each named by what changed).

    A feature computed at t must give bit-for-bit the same values on each. Together they
    cover what can happen after a cutoff: new purchases in the label window, every later
    event and status change undone, and profile attributes edited (their values at t are
    unknown, so a feature must not read them). The check is empirical: a feature that
    depends on later data only through values none of these changes produce can pass."""
    t = utc(t)
    gold = standardise_gold(gold)
    customers = gold.customers[CUSTOMER_ID]
    stamp = t + pd.Timedelta(days=1)
    new_orders = pd.DataFrame(
        {
            Orders.order_id: "leakcheck-" + customers.astype(str),
            Orders.customer_id: customers.to_numpy(),
            Orders.order_ts: stamp,
        }
    )
    template = gold.orders.iloc[:1]
    if len(template):
        filler = template.drop(columns=list(new_orders.columns)).iloc[[0] * len(new_orders)]
        new_orders = pd.concat([new_orders, filler.reset_index(drop=True)], axis=1)
        new_orders = new_orders.assign(
            **{
                Orders.is_cancelled: False,
                Orders.is_return: False,
                Orders.net_amount: 50.0,
                Orders.gross_amount: 50.0,
            }
        )[gold.orders.columns]
    purchases = replace(gold, orders=pd.concat([gold.orders, new_orders], ignore_index=True))
    # The lake as it was known at t: later events gone, statuses back to their value at t.
    known = view_as_of(gold, t)
    as_known = replace(
        gold,
        orders=known.orders,
        order_lines=gold.order_lines[
            gold.order_lines[OrderLines.order_id].isin(known.orders[Orders.order_id])
        ],
        support_cases=known.support_cases,
        order_status=_closed(gold.order_status, t),
        case_status=_closed(gold.case_status, t),
    )
    edited = gold.customers.copy()
    for column in edited.columns:
        if column in (CUSTOMER_ID, CustomerProfile.created_ts):
            continue
        if pd.api.types.is_numeric_dtype(edited[column]):
            edited[column] = edited[column] + 1
        elif pd.api.types.is_string_dtype(edited[column]) or edited[column].dtype == object:
            edited[column] = "edited-after-cutoff"
    return {
        "a purchase added for every customer one day after the cutoff, in the label window": (
            purchases
        ),
        "every event and status change after the cutoff undone": as_known,
        "profile attributes edited after the cutoff": replace(gold, customers=edited),
    }


def _closed(history: pd.DataFrame, t: pd.Timestamp) -> pd.DataFrame:
    known = history[history[StatusHistory.valid_from] <= t].copy()
    known.loc[known[StatusHistory.valid_to] > t, StatusHistory.valid_to] = pd.NaT
    return known


def check_leakage(
    gold: GoldTables,
    spec_path: Path,
    cutoff: pd.Timestamp,
    customers: pd.Index | None = None,
    max_customers: int = 200,
) -> LeakageReport:
    """The leakage tests on a spec's features (the `dfs:` ones and the `sql_features:`):
    each is computed at `cutoff` on `gold` and on every `future_changes` of it, and must not
    move. `customers` (default: up to `max_customers` with an order by the cutoff) bounds
    the cost: Featuretools runs once per change."""
    t = utc(cutoff)
    gold = standardise_gold(gold)
    if customers is None:
        before = gold.orders[gold.orders[Orders.order_ts] <= t][Orders.customer_id]
        customers = pd.Index(before.drop_duplicates().sort_values().head(max_customers))
    if not len(customers):
        raise ValueError(f"no customer has an order by {t.date()}: nothing to check")
    gold = restrict_to_customers(gold, pd.Index(customers))
    fs = derive_feature_set(gold, spec_path)
    population = pd.DataFrame({CUSTOMER_ID: pd.Index(customers).to_numpy(), "cutoff_time": t})
    base = calculate_features(gold, population, fs).set_index(CUSTOMER_ID)
    leaks = []
    for change, changed in future_changes(gold, t).items():
        other = calculate_features(changed, population, fs).set_index(CUSTOMER_ID)
        for name in fs.names:
            a, b = base[name].to_numpy(), other[name].reindex(base.index).to_numpy()
            moved = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            if moved.any():
                leaks.append(Leak(name, change, int(moved.sum()), len(a)))
    report = LeakageReport(t, len(customers), tuple(fs.names), tuple(leaks))
    log.info("leakage check of %s: %s", spec_path, report.message())
    return report


__all__ = ["Leak", "LeakageError", "LeakageReport", "check_leakage", "future_changes"]
