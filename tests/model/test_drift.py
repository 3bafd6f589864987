"""Drift bins and PSI against hand computations, a zero-inflated feature included."""

from __future__ import annotations

import numpy as np
import pytest

from c360ml.model import drift


def _psi(expected: list[float], actual: list[float]) -> float:
    e, a = np.maximum(expected, drift.FLOOR), np.maximum(actual, drift.FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def test_a_point_mass_gets_a_bin_of_its_own():
    """60% of customers made 0 purchases: the zeros are one bin, so a fall to 30% zeros
    shows, where deciles alone would fold the change into one bin."""
    rng = np.random.default_rng(0)
    ref_values = np.where(rng.random(10_000) < 0.6, 0.0, rng.uniform(1, 10, 10_000))
    ref_values[:100] = np.nan  # 1% missing
    ref = drift.reference(ref_values)
    assert 0.0 in ref["cuts"] and np.nextafter(0.0, -np.inf) in ref["cuts"]
    zero_bin = ref["cuts"].index(0.0)
    assert ref["shares"][zero_bin] == pytest.approx(np.mean(ref_values == 0), abs=1e-12)
    assert ref["shares"][-1] == pytest.approx(0.01)
    assert sum(ref["shares"]) == pytest.approx(1.0)

    current = np.where(rng.random(5_000) < 0.3, 0.0, rng.uniform(1, 10, 5_000))
    by_hand = _psi(ref["shares"], drift.shares(ref["cuts"], current))
    assert drift.psi(ref, current) == pytest.approx(by_hand)
    assert drift.psi(ref, current) > 0.25  # a big move of the zeros
    assert drift.psi(ref, ref_values) == pytest.approx(0.0, abs=1e-12)
    same = np.where(rng.random(5_000) < 0.6, 0.0, rng.uniform(1, 10, 5_000))
    same[:50] = np.nan  # missing as often as in the reference
    assert drift.psi(ref, same) < 0.02


def test_shares_follow_the_bin_edges_and_the_range():
    ref = {"cuts": [1.0, 2.0], "shares": [0.25, 0.25, 0.25, 0.25], "low": 0.0, "high": 3.0}
    values = np.array([0.5, 1.0, 1.5, 2.0, 2.5, np.nan, 5.0, -1.0])
    assert drift.shares(ref["cuts"], values) == [3 / 8, 2 / 8, 2 / 8, 1 / 8]
    assert drift.outside(ref, values).tolist() == [False] * 6 + [True, True]
    assert drift.psi(ref, values) == pytest.approx(
        _psi(ref["shares"], [3 / 8, 2 / 8, 2 / 8, 1 / 8])
    )


def test_latest_alarms_name_what_crossed_at_the_last_as_of_worst_first():
    import pandas as pd

    from c360ml.model.drift import SCORE, latest_alarms

    t1, t2 = pd.Timestamp("2026-01-31", tz="UTC"), pd.Timestamp("2026-02-28", tz="UTC")
    table = pd.DataFrame(
        {
            "ScoredAsOf": [t1, t1, t2, t2, t2, t2],
            "ModelVersion": ["1", "1", "1", "1", "1", "2"],
            "column": [SCORE, "a", SCORE, "a", "b", SCORE],
            "label": [SCORE, "A", SCORE, "A", "B", SCORE],
            "psi": [0.5, 0.9, 0.1, 0.3, 0.6, 0.0],
            "share_outside_range": [0.0, 0.1, 0.0, 0.02, 0.2, 0.0],
            "alarm": [True, True, False, True, True, False],
        }
    )
    got = latest_alarms(table, "1")
    assert got["ScoredAsOf"] == t2.isoformat() and got["score_psi"] == 0.1
    assert [a["label"] for a in got["alarms"]] == ["B", "A"]  # t1's alarms are history
    assert latest_alarms(table, "2")["alarms"] == [] and latest_alarms(table, "9") is None


def test_calendar_scaled_features_are_named_by_what_they_measure():
    """The first event's age and the account's age over all history grow with the
    calendar; recency (MIN), windowed versions and counts do not."""
    ageing = [
        "MAX(orders.TIME_SINCE(order_ts, unit=days))",
        "MAX(support_cases.TIME_SINCE(created_ts, unit=days))",
        "TIME_SINCE(created_ts, unit=days)",
    ]
    bounded = [
        "MIN(orders.TIME_SINCE(order_ts, unit=days))",
        "MAX(orders.TIME_SINCE(order_ts, unit=days))_90d",
        "COUNT(orders)_30d",
        "MAX(orders.net_amount)",
        drift.SCORE,
    ]
    assert [drift.calendar_scaled(n) for n in ageing] == [True] * 3
    assert [drift.calendar_scaled(n) for n in bounded] == [False] * 5


def test_ageing_alone_drifts_a_first_order_age_but_does_not_alarm():
    """A lake that starts on day 0 and a steady business: customers enter at a constant
    rate and leave at a constant hazard; 'days since the first order the lake holds' is
    measured at the reference (day 1000) and a year later (a customer from before the
    lake shows its first order there after a wait). Nothing about the customers
    changed, yet the PSI passes the alarm (the lake's first-day customers pile up at its
    age and move with it): so the column is kept out of the alarm, while the same figure
    under any other name still counts. (The price: a real change of such a column, e.g. a
    wave of new customers, does not alarm through it; recency and the counts still see it.)"""
    rng = np.random.default_rng(1)

    def ages(t: int) -> np.ndarray:
        entry = rng.uniform(-2000, t, 60_000)  # customers since well before the lake
        leave = entry + rng.exponential(700, len(entry))
        first = np.where(entry < 0, rng.exponential(90, len(entry)), entry)  # in the lake
        alive = (entry < t) & (leave > t) & (first < t)
        return t - first[alive]

    ref = drift.reference(ages(1000))
    later = ages(1365)
    value = drift.psi(ref, later)
    assert value > 0.25, value  # ageing alone
    assert drift.psi(ref, ages(1000)) < 0.01  # the same day again: no drift
    assert not drift.alarming("MAX(orders.TIME_SINCE(order_ts, unit=days))", value, 0.25)
    assert not drift.alarming("TIME_SINCE(created_ts, unit=days)", value, 0.25)
    assert drift.alarming("MIN(orders.TIME_SINCE(order_ts, unit=days))", value, 0.25)
    assert drift.alarming("COUNT(orders)_30d", value, 0.25)
    assert not drift.alarming("COUNT(orders)_30d", 0.24, 0.25)
