"""Realized performance of past scores, on hand-made numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from c360ml.config import WatchSettings
from c360ml.model import watch


def test_outcome_row_judges_scores_as_training_did():
    rng = np.random.default_rng(2)
    y = (rng.random(2_000) < 0.4).astype(int)
    p = np.clip(0.4 + 0.3 * (y - 0.4) + rng.normal(0, 0.2, 2_000), 0, 1)
    recency = rng.uniform(0, 100, 2_000) + 30 * y
    row = watch.outcome_row(y, p, recency, 90)
    assert row["customers"] == 2_000 and row["churn_rate"] == pytest.approx(y.mean())
    assert row["mean_score"] == pytest.approx(p.mean())
    assert row["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    deciles = json.loads(row["calibration"])
    assert [d["decile"] for d in deciles] == list(range(1, 11))
    assert sum(d["rows"] for d in deciles) == 2_000
    assert deciles[-1]["observed_rate"] > deciles[0]["observed_rate"]
    bands = {b["risk_level"]: b for b in json.loads(row["risk_bands"])}
    assert bands["High"]["churn_rate"] > bands["Low"]["churn_rate"]
    assert sum(b["customers"] for b in bands.values()) == 2_000
    assert row["grade"] in ("A", "B", "C")
    # Everyone churned: nothing to rank, and the row still has every column.
    flat = watch.outcome_row(np.ones(10), np.full(10, 0.7), np.zeros(10), 90)
    assert np.isnan(flat["roc_auc"]) and flat["grade"] == "" and flat["churn_rate"] == 1.0


def test_due_takes_closed_windows_without_an_outcome():
    t = pd.Timestamp("2025-06-30", tz="UTC")
    scores = pd.DataFrame(
        {
            "ScoredAsOf": [t, t, t + pd.Timedelta(days=30), t + pd.Timedelta(days=100)],
            "ModelVersion": ["1", "1", "1", "2"],
        }
    )
    end = t + pd.Timedelta(days=125)
    assert watch.due(scores, pd.DataFrame(columns=watch.KEY), end, 90)["ScoredAsOf"].tolist() == [
        t,
        t + pd.Timedelta(days=30),
    ]
    done = pd.DataFrame({"ScoredAsOf": [t], "ModelVersion": ["1"]})
    assert watch.due(scores, done, end, 90)["ScoredAsOf"].tolist() == [t + pd.Timedelta(days=30)]


def test_triggers_name_what_fired_and_its_bound():
    w = WatchSettings(max_model_age_days=60, psi_alarm=0.25, realized_auc_drop=0.05)
    fresh = watch.Health(10, 0.05, {"Days since last order": 0.1}, 0.90, 0.91, 0.55, 0.52)
    assert watch.triggers(fresh, w) == []
    assert "champion 10 days old; score PSI 0.050" in watch.describe_health(fresh)
    assert "realized churn minus mean score +0.030" in watch.describe_health(fresh)
    assert watch.triggers(watch.Health(None, None, {}, None, None), w) == ["no champion yet"]
    old = watch.Health(
        75, 0.30, {"Days since last order": 0.4, "Spend, all time": 0.1}, 0.80, 0.91, 0.61, 0.54
    )
    assert watch.triggers(old, w) == [
        "champion is 75 days old (limit 60)",
        "score PSI 0.300 >= 0.25",
        "top feature PSI >= 0.25: Days since last order 0.400",
        "realized ROC AUC 0.800 below test 0.910 - 0.05",
        "realized churn rate 0.610 vs mean ChurnScore 0.540 (gap +0.070, limit ±0.05)",
    ]
    # over-prediction counts as much as under-prediction; the bound is a setting
    over = watch.Health(5, None, {}, 0.9, 0.9, 0.40, 0.47)
    assert watch.triggers(over, w) == [
        "realized churn rate 0.400 vs mean ChurnScore 0.470 (gap -0.070, limit ±0.05)"
    ]
    assert watch.triggers(over, w.model_copy(update={"calibration_gap": 0.08})) == []
    unmeasured = watch.Health(5, None, {}, None, 0.9)
    assert watch.triggers(unmeasured, w) == []
    assert "no drift measured yet" in watch.describe_health(unmeasured)


def test_the_label_free_estimate_meets_the_realized_auc_without_concept_drift():
    """Calibrated scores whose outcomes follow them (y ~ Bernoulli(p)): the estimate made
    without labels lands within 0.01 of the AUC the labels then give (n = 20,000)."""
    rng = np.random.default_rng(7)
    for a, b in ((2, 5), (0.5, 0.5), (3, 3)):
        p = rng.beta(a, b, 20_000)
        y = (rng.random(20_000) < p).astype(int)
        assert watch.estimated_roc_auc(p) == pytest.approx(roc_auc_score(y, p), abs=0.01)
    # When the relation breaks (everyone's risk doubled by a shock the scores missed, then
    # outcomes at random), the realized AUC falls and the estimate does not: the gap shows.
    p = rng.beta(2, 5, 20_000)
    y = (rng.random(20_000) < 0.5).astype(int)
    assert watch.estimated_roc_auc(p) - roc_auc_score(y, p) > 0.15
    # Ties count one half: equal scores estimate 0.5.
    assert watch.estimated_roc_auc(np.full(100, 0.3)) == pytest.approx(0.5)
