"""Metrics, bootstrap and the CI-D grade on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from c360ml.model import evaluate


def test_grade_a_b_c_on_hand_made_predictions():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    # 8 of 10 churners flagged, 2 false alarms: accuracy 0.8, churn recall 0.8.
    p = np.array([0.9] * 8 + [0.2] * 2 + [0.7] * 2 + [0.1] * 8)
    g = evaluate.ci_d_grade(y, p, baseline_churn_recall=0.6)
    assert (g.accuracy, g.churn_recall) == (0.8, 0.8)
    assert g.improvement == pytest.approx(1 / 3)
    assert g.grade == "A"
    assert evaluate.ci_d_grade(y, p, baseline_churn_recall=0.75).grade == "B"  # +6.7%
    assert evaluate.ci_d_grade(y, p, baseline_churn_recall=0.8).grade == "C"  # not better
    # Flagging everyone: recall 1.0 and accuracy exactly 0.5, which still counts as >= 0.5.
    assert evaluate.ci_d_grade(y, np.full(20, 0.6), 0.5).grade == "A"
    # Beats the baseline on churners but under 50% correct overall: C.
    p_bad = np.r_[np.full(6, 0.9), np.full(4, 0.1), np.full(10, 0.9)]  # accuracy 0.3
    g = evaluate.ci_d_grade(y, p_bad, 0.5)
    assert g.accuracy == pytest.approx(0.3) and g.grade == "C"


def test_threshold_is_inclusive_at_half():
    y = np.array([1, 0])
    g = evaluate.ci_d_grade(y, np.array([0.5, 0.49]), baseline_churn_recall=0.5)
    assert g.churn_recall == 1.0 and g.accuracy == 1.0


def test_rule_spans_halve_to_a_month_or_less():
    assert evaluate.rule_spans(90) == [90, 45, 22]
    assert evaluate.rule_spans(60) == [60, 30]
    assert evaluate.rule_spans(30) == [30]


def test_rule_baseline_predicts_churn_without_purchase_in_span():
    y = np.array([1, 1, 0, 0, 1])
    recency = np.array([100.0, 50.0, 10.0, 40.0, np.nan])  # NaN = never purchased
    rule = evaluate.ci_d_rule_baseline(y, recency, 90)
    by_span = {int(r["span_days"]): r for r in rule.by_span}
    assert by_span[90]["churn_recall"] == pytest.approx(2 / 3)  # 100 and never
    assert by_span[45]["churn_recall"] == 1.0
    assert by_span[45]["accuracy"] == pytest.approx(1.0)  # 40 < 45: retained
    assert by_span[22]["accuracy"] == pytest.approx(0.8)  # 40 >= 22: false alarm
    assert rule.span_days == 45 and rule.churn_recall == 1.0  # the most accurate span
    # The most accurate span wins even where a shorter one flags more churners.
    y = np.array([1, 0, 0, 0, 0, 1])
    rule = evaluate.ci_d_rule_baseline(y, np.array([100.0, 50, 50, 60, 10, 30]), 90)
    by_span = {int(r["span_days"]): r for r in rule.by_span}
    assert by_span[22]["churn_recall"] == 1.0 and by_span[22]["accuracy"] == pytest.approx(0.5)
    assert rule.span_days == 90 and rule.accuracy == pytest.approx(5 / 6)
    assert rule.churn_recall == pytest.approx(0.5)


def test_everyone_churns_is_graded_a_where_most_customers_churn():
    """CI-D's wording rewards flagging everyone once the churn rate is above one half: the
    grade is a parity scorecard, not a quality gate (the gate refuses this predictor)."""
    rng = np.random.default_rng(4)
    y = (rng.random(2_000) < 0.7).astype(int)
    recency = rng.uniform(0, 100, 2_000) + 10 * y  # the rule baseline is informative
    rule = evaluate.ci_d_rule_baseline(y, recency, 90)
    constant = evaluate.ci_d_grade(y, np.full(len(y), 0.9), rule.churn_recall)
    assert constant.accuracy == pytest.approx(y.mean()) and constant.churn_recall == 1.0
    assert rule.churn_recall < 1 / 1.1
    assert constant.grade == "A"


def test_weighted_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # rounded: many ties
    ones = np.ones((1, 500))
    assert evaluate.weighted_roc_auc(y, s, ones)[0] == pytest.approx(roc_auc_score(y, s))
    assert evaluate.weighted_average_precision(y, s, ones)[0] == pytest.approx(
        average_precision_score(y, s)
    )
    # Integer weights = repeated rows.
    w = rng.integers(0, 3, 500)
    rep = np.repeat(np.arange(500), w)
    assert evaluate.weighted_roc_auc(y, s, w[None, :])[0] == pytest.approx(
        roc_auc_score(y[rep], s[rep])
    )
    assert evaluate.weighted_average_precision(y, s, w[None, :])[0] == pytest.approx(
        average_precision_score(y[rep], s[rep])
    )


def test_paired_bootstrap_interval_of_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 3000)
    good = y + rng.normal(0, 0.7, 3000)
    weak = y + rng.normal(0, 2.0, 3000)
    cis = evaluate.bootstrap_intervals(y, good, weak, resamples=100, seed=0)
    assert cis["roc_auc_ci_low"] < cis["roc_auc"] < cis["roc_auc_ci_high"]
    assert cis["roc_auc_minus_rfm_ci_low"] > 0  # clearly better on the same resamples
    same = evaluate.bootstrap_intervals(y, good, good, resamples=50, seed=0)
    assert same["roc_auc_minus_rfm_ci_low"] == same["roc_auc_minus_rfm_ci_high"] == 0


def test_oracle_headroom_closed():
    rng = np.random.default_rng(3)
    truth = rng.random(4000)
    y = (rng.random(4000) < truth).astype(int)
    model = truth + rng.normal(0, 0.15, 4000)
    rfm = truth + rng.normal(0, 0.6, 4000)
    cis = evaluate.bootstrap_intervals(y, model, rfm, oracle=truth, resamples=60)
    assert cis["oracle_roc_auc"] > cis["roc_auc"] > roc_auc_score(y, rfm)
    assert 0 < cis["roc_auc_headroom_closed"] < 1
    assert cis["roc_auc_over_oracle_ci_high"] <= 1.0 + 1e-9


def test_top_decile_lift_and_metrics():
    y = np.array([1] * 10 + [0] * 90)
    score = np.r_[np.ones(10), np.zeros(90)]
    assert evaluate.top_decile_lift(y, score) == pytest.approx(10.0)
    m = evaluate.binary_metrics(y, np.where(score > 0, 0.9, 0.1))
    assert m["roc_auc"] == 1.0 and m["accuracy"] == 1.0 and m["churn_recall"] == 1.0
    assert m["brier"] == pytest.approx(0.01)
