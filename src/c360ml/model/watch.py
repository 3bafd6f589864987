"""How past scores turned out: realized performance per ScoredAsOf once its window closed.

A score made at t predicts churn in (t, t + w]. Once the lake holds events past t + w, the
outcome of every customer scored at t is known, and the scores can be judged as the model
was judged at training: ROC and PR AUC, log loss, Brier, calibration by decile, churn rate
per RiskLevel band and the CI-D grade at that as_of. One row per (ScoredAsOf, ModelVersion)
goes to gold/score_outcomes; a row is computed once its window has closed and recomputed
only if it is missing, so a refresh that runs four times a day pays for new windows only.

Campaigns act on high scores: a customer saved by one looks like a wrong prediction, so
realized figures understate the model where it was acted on. Segments can hold a random
control group out of their journeys; their members get a row of their own (population
"control"), beside the whole scored population ("all").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from c360ml.config import WatchSettings
from c360ml.model import evaluate

log = logging.getLogger(__name__)

OUTCOMES = "score_outcomes"  # gold table
KEY = ["ScoredAsOf", "ModelVersion"]


def calibration_by_decile(y: np.ndarray, p: np.ndarray) -> list[dict[str, float]]:
    """Mean predicted and observed churn per decile of the score (equal-count bins)."""
    order = np.argsort(np.asarray(p, dtype=np.float64), kind="stable")
    out = []
    for k, rows in enumerate(np.array_split(order, 10)):
        if len(rows):
            out.append(
                {
                    "decile": k + 1,
                    "mean_predicted": float(np.mean(p[rows])),
                    "observed_rate": float(np.mean(y[rows])),
                    "rows": int(len(rows)),
                }
            )
    return out


def estimated_roc_auc(p: np.ndarray) -> float:
    """The ROC AUC the scores should reach if they are calibrated and the relation between
    score and outcome holds (confidence-based performance estimation, as NannyML's CBPE):
    each customer counts as churned with weight p and as retained with weight 1 - p, and
    the AUC of those expected pairs is computed without a single label. It is known the
    day the scores are made; the realized figure arrives a window later. Where the relation
    changes (a shock, a campaign), the two part: that gap is what to watch."""
    p = np.asarray(p, dtype=np.float64)
    p = p[~np.isnan(p)]
    if len(p) < 2:
        return float("nan")
    values, group = np.unique(p, return_inverse=True)  # ties count one half
    pos = np.bincount(group, weights=p, minlength=len(values))
    neg = np.bincount(group, weights=1 - p, minlength=len(values))
    self_pairs = np.bincount(group, weights=p * (1 - p), minlength=len(values))
    below = np.cumsum(neg) - neg  # retained weight of lower scores
    ties = 0.5 * (pos * neg - self_pairs)  # pairs within a group of equal scores
    pairs = pos.sum() * neg.sum() - self_pairs.sum()  # every ordered pair but (i, i)
    return float((np.sum(pos * below) + ties.sum()) / pairs) if pairs > 0 else float("nan")


def outcome_row(
    y: np.ndarray, p: np.ndarray, recency_days: np.ndarray, window_days: int
) -> dict[str, object]:
    """The realized figures of one set of scores (pure: numbers in, numbers out)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    row: dict[str, object] = {
        "customers": int(len(y)),
        "churn_rate": float(y.mean()),
        "mean_score": float(p.mean()),  # against churn_rate: calibration in the large
        "estimated_roc_auc": estimated_roc_auc(p),  # what the scores promised, label-free
    }
    if len(np.unique(y)) < 2:  # every customer churned, or none: no ranking to judge
        nan = float("nan")
        row |= dict.fromkeys(("roc_auc", "pr_auc", "log_loss", "brier", "accuracy"), nan)
        row |= {"churn_recall": nan, "grade": "", "calibration": "[]", "risk_bands": "[]"}
        return row
    metrics = evaluate.binary_metrics(y, p)
    rule = evaluate.ci_d_rule_baseline(y, recency_days, window_days)
    grade = evaluate.ci_d_grade(y, p, rule.churn_recall)
    bands = evaluate.risk_band_rates(y, p)
    row |= {k: metrics[k] for k in ("roc_auc", "pr_auc", "log_loss", "brier", "accuracy")} | {
        "churn_recall": metrics["churn_recall"],
        "grade": grade.grade,
        "calibration": json.dumps(calibration_by_decile(y, p)),
        "risk_bands": json.dumps(bands),
    }
    return row


@dataclass(frozen=True)
class Matured:
    """Scores whose label window has closed, joined to what happened."""

    as_of: pd.Timestamp
    model_version: str
    frame: pd.DataFrame  # customer_id, ChurnScore, label, recency_days
    population: str = "all"  # or "control": the segments' control groups, never targeted


def realized_outcomes(matured: list[Matured], window_days: int) -> pd.DataFrame:
    """One row per matured (ScoredAsOf, ModelVersion)."""
    rows = []
    for m in matured:
        f = m.frame
        row = outcome_row(f["label"], f["ChurnScore"], f["recency_days"], window_days)
        key = {"ScoredAsOf": m.as_of, "ModelVersion": m.model_version}
        rows.append({**key, "population": m.population, **row})
    return pd.DataFrame(rows)


def due(scores: pd.DataFrame, done: pd.DataFrame, data_end: pd.Timestamp, window_days: int):
    """(ScoredAsOf, ModelVersion) pairs whose window (t, t + w] the lake has passed and
    that have no outcome row yet."""
    pairs = scores[KEY].drop_duplicates()
    closed = pairs["ScoredAsOf"] + pd.Timedelta(days=window_days) <= data_end
    pairs = pairs[closed.to_numpy()]
    if len(done):
        pairs = pairs.merge(done[KEY], on=KEY, how="left", indicator=True)
        pairs = pairs[pairs["_merge"] == "left_only"].drop(columns="_merge")
    return pairs.sort_values(KEY).reset_index(drop=True)


@dataclass(frozen=True)
class Health:
    """What `retrain --if-needed` knows about the champion (None: not measured yet)."""

    age_days: float | None  # data end - trained_as_of; None: no champion
    score_psi: float | None  # latest refresh's PSI of the score
    feature_psi: dict[str, float]  # latest refresh's PSI of the champion's top features
    realized_auc: float | None  # latest closed window's realized ROC AUC
    test_auc: float | None  # the champion's ROC AUC at training
    # the latest closed window's realized churn rate and the mean ChurnScore of its customers
    realized_churn: float | None = None
    mean_score: float | None = None

    @property
    def calibration_gap(self) -> float | None:
        """Realized churn rate minus mean ChurnScore (> 0: the model under-predicted churn)."""
        if self.realized_churn is None or self.mean_score is None:
            return None
        return self.realized_churn - self.mean_score


def triggers(health: Health, w: WatchSettings) -> list[str]:
    """Why a retrain is due (empty: it is not); each reason names its figure and bound."""
    if health.age_days is None:
        return ["no champion yet"]
    max_age_days, psi_alarm, auc_drop = w.max_model_age_days, w.psi_alarm, w.realized_auc_drop
    out = []
    if health.age_days > max_age_days:
        out.append(f"champion is {health.age_days:.0f} days old (limit {max_age_days})")
    if health.score_psi is not None and health.score_psi >= psi_alarm:
        out.append(f"score PSI {health.score_psi:.3f} >= {psi_alarm}")
    drifted = {k: v for k, v in health.feature_psi.items() if v >= psi_alarm}
    if drifted:
        named = ", ".join(f"{k} {v:.3f}" for k, v in sorted(drifted.items(), key=lambda i: -i[1]))
        out.append(f"top feature PSI >= {psi_alarm}: {named}")
    if (
        health.realized_auc is not None
        and health.test_auc is not None
        and health.realized_auc < health.test_auc - auc_drop
    ):
        out.append(
            f"realized ROC AUC {health.realized_auc:.3f} below test {health.test_auc:.3f} "
            f"- {auc_drop}"
        )
    gap = health.calibration_gap
    if gap is not None and abs(gap) > w.calibration_gap:
        out.append(
            f"realized churn rate {health.realized_churn:.3f} vs mean ChurnScore "
            f"{health.mean_score:.3f} (gap {gap:+.3f}, limit ±{w.calibration_gap})"
        )
    return out


def describe_health(health: Health) -> str:
    """The figures looked at, for the "nothing fired" line."""
    if health.age_days is None:
        return "no champion"
    parts = [f"champion {health.age_days:.0f} days old"]
    parts.append(
        "no drift measured yet" if health.score_psi is None else f"score PSI {health.score_psi:.3f}"
    )
    if health.feature_psi:
        parts.append(f"highest top-feature PSI {max(health.feature_psi.values()):.3f}")
    if health.realized_auc is not None:
        parts.append(f"realized ROC AUC {health.realized_auc:.3f} (test {health.test_auc:.3f})")
        if health.calibration_gap is not None:
            parts.append(f"realized churn minus mean score {health.calibration_gap:+.3f}")
    else:
        parts.append("no closed score window yet")
    return "; ".join(parts)
