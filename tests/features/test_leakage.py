"""Leakage: changes that happen after the cutoff T leave features at T bit-for-bit equal.

Each test also checks that the change is visible at a later cutoff, so it could fail.
Every test runs with both feature engines (DuckDB, the default, and Featuretools).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pandas as pd
import pytest

from c360ml.features import calculate_features
from c360ml.features.dfs import ENGINES

from .tiny_gold import DAY, T, _hist, add_rows, validate

LATER = T + 30 * DAY


@pytest.fixture(scope="module", params=ENGINES)
def calc(request):
    return partial(calculate_features, engine=request.param)


@pytest.fixture(scope="module")
def at_t(gold, population, feature_set, calc) -> pd.DataFrame:
    return calc(gold, population, feature_set)


def _same(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(left, right, check_exact=True)


def _later(calc, gold, feature_set, column: str, customer: str = "C1") -> float:
    pop = pd.DataFrame({"customer_id": [customer], "cutoff_time": LATER})
    return float(calc(gold, pop, feature_set)[column].iloc[0])


def test_transactions_after_cutoff_do_not_change_features(
    gold, population, feature_set, at_t, calc
):
    order = gold.orders.iloc[[0]].assign(order_id="O99", order_ts=T + pd.Timedelta(seconds=1))
    line = gold.order_lines.iloc[[0]].assign(order_id="O99")
    status = pd.DataFrame([_hist("O99", "invoiced", False, T + pd.Timedelta(seconds=1), None)])
    case = gold.support_cases.iloc[[0]].assign(case_id="K9", created_ts=T + DAY)
    case_status = pd.DataFrame([_hist("K9", "active", False, T + DAY, None)])
    changed = add_rows(
        gold,
        orders=order,
        order_lines=line,
        order_status=status,
        support_cases=case,
        case_status=case_status,
    )
    _same(at_t, calc(changed, population, feature_set))
    assert (
        _later(calc, changed, feature_set, "COUNT(orders)")
        == _later(calc, gold, feature_set, "COUNT(orders)") + 1
    )


def test_profile_change_after_cutoff_does_not_change_features(
    gold, population, feature_set, at_t, calc
):
    customers = gold.customers.assign(
        customer_group="vip", city="Bergen", email="new@example.com", source_count=3
    )
    changed = validate(replace(gold, customers=customers))
    _same(at_t, calc(changed, population, feature_set))


def test_cancelling_earlier_order_after_cutoff_does_not_change_features(
    gold, population, feature_set, at_t, calc
):
    when = T + 5 * DAY  # O1 (placed T-137 d) is cancelled after T
    history = gold.order_status.copy()
    history.loc[history["entity_id"] == "O1", "valid_to"] = when
    history = pd.concat(
        [history, pd.DataFrame([_hist("O1", "cancelled", True, when, None)])],
        ignore_index=True,
    )
    orders = gold.orders.copy()
    orders.loc[orders["order_id"] == "O1", ["status", "is_cancelled"]] = ["cancelled", True]
    changed = validate(replace(gold, orders=orders, order_status=history))
    _same(at_t, calc(changed, population, feature_set))
    col = "COUNT(orders WHERE is_purchase = True)"
    assert _later(calc, changed, feature_set, col) == _later(calc, gold, feature_set, col) - 1


def test_resolving_case_after_cutoff_does_not_change_features(
    gold, population, feature_set, at_t, calc
):
    col = "COUNT(support_cases WHERE status = active)"
    assert at_t.set_index("customer_id").at["C1", col] == 1  # K1 is open at T
    when = T + DAY  # K1 is resolved earlier than in the base data, still after T
    history = gold.case_status.copy()
    k1 = history["entity_id"] == "K1"
    history.loc[k1 & (history["status"] == "active"), "valid_to"] = when
    history.loc[k1 & (history["status"] == "resolved"), "valid_from"] = when
    changed = validate(replace(gold, case_status=history))
    _same(at_t, calc(changed, population, feature_set))
    assert _later(calc, changed, feature_set, col) == 0
