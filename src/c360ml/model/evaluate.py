"""Metrics on one test cutoff: point values, paired bootstrap intervals, the CI-D grade.

Why a paired bootstrap with weights: the model, the baselines and the oracle are scored
on the same rows, so their difference is measured on the same resamples (far narrower
than comparing two separate intervals). Resamples are Poisson(1) row weights over one
sort per score, and ROC AUC and average precision come from cumulative sums of those
weights, so no resample copies or re-sorts the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from c360ml.model.scoring import Thresholds, risk_levels

log = logging.getLogger(__name__)

TIE_TOLERANCE = 0.001  # used by the gate: AUC differences below this are ties
BOOTSTRAP_CHUNK = 16  # resamples weighed at once (bounds memory at chunk x rows)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The reported set for a probability score (1 = churned)."""
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-15, 1 - 1e-15)
    pred = p >= threshold
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "accuracy": float(np.mean(pred == (y == 1))),
        "churn_recall": churn_class_accuracy(y, pred),
        "top_decile_lift": top_decile_lift(y, p),
        "churn_rate": float(y.mean()),
        "rows": float(len(y)),
    }


def ranking_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """For a score that is not a probability (recency): only rank metrics mean anything."""
    y = np.asarray(y).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y, score)),
        "pr_auc": float(average_precision_score(y, score)),
        "top_decile_lift": top_decile_lift(y, score),
    }


def churn_class_accuracy(y: np.ndarray, predicted_churn: np.ndarray) -> float:
    """CI-D's "accuracy on churned customers", read as the recall of class 1: the share of
    customers who did churn that were predicted to churn."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    return float(np.asarray(predicted_churn, dtype=bool)[y].mean())


def top_decile_lift(y: np.ndarray, score: np.ndarray) -> float:
    """Churn rate among the 10% highest scores over the overall churn rate."""
    y = np.asarray(y).astype(float)
    n = max(1, int(np.ceil(0.1 * len(y))))
    top = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")[:n]
    base = y.mean()
    return float(y[top].mean() / base) if base > 0 else float("nan")


def reliability_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Mean predicted vs observed churn rate per equal-width probability bin."""
    y = np.asarray(y).astype(float)
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append(
                {
                    "bin_low": float(edges[b]),
                    "bin_high": float(edges[b + 1]),
                    "mean_predicted": float(p[sel].mean()),
                    "observed_rate": float(y[sel].mean()),
                    "rows": int(sel.sum()),
                }
            )
    return out


def cumulative_gains(y: np.ndarray, p: np.ndarray, points: int = 20) -> list[dict[str, float]]:
    """Share of the churners reached when the top q of customers by score are targeted, for
    q = 1/points ... 1, and the lift (that share over q): the campaign planner's view."""
    y = np.asarray(y).astype(float)
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")
    reached = np.cumsum(y[order])
    total = reached[-1] if len(reached) else 0.0
    out = []
    for k in range(1, points + 1):
        q = k / points
        top = max(1, int(round(q * len(y))))
        share = float(reached[top - 1] / total) if total > 0 else float("nan")
        out.append({"share_targeted": q, "share_of_churners": share, "lift": share / q})
    return out


def risk_band_rates(
    y: np.ndarray, p: np.ndarray, thresholds: Thresholds | None = None
) -> list[dict[str, float | str]]:
    """Size and realized churn rate per RiskLevel band (the bands scoring assigns)."""
    y = np.asarray(y).astype(float)
    p = np.asarray(p, dtype=np.float64)
    levels = risk_levels(p, thresholds or Thresholds())
    bands = {name: levels == name for name in ("Low", "Medium", "High")}
    return [
        {
            "risk_level": name,
            "customers": int(sel.sum()),
            "share": float(sel.mean()) if len(p) else float("nan"),
            "churn_rate": float(y[sel].mean()) if sel.any() else float("nan"),
            "mean_score": float(p[sel].mean()) if sel.any() else float("nan"),
        }
        for name, sel in bands.items()
    ]


# ---------------------------------------------------------------- weighted rank metrics


@dataclass(frozen=True)
class _Ranked:
    """One ascending sort of a score, reused by every resample: the row order, the start of
    each run of equal scores (None when all scores differ) and the labels in that order."""

    order: np.ndarray
    starts: np.ndarray | None
    labels: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, score: np.ndarray) -> _Ranked:
        score = np.asarray(score, dtype=np.float64)
        order = np.argsort(score, kind="stable")
        s = score[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        labels = np.asarray(y).astype(bool)[order]
        return cls(order, None if len(starts) == len(s) else starts, labels)

    def group_sums(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weight of churned and retained rows per distinct score (resamples x groups).

        Weights are integer counts, so the sums stay exact integers (int64)."""
        w = np.asarray(weights)[:, self.order].astype(np.int64, copy=False)
        pos = w * self.labels
        neg = w - pos
        if self.starts is not None:
            pos = np.add.reduceat(pos, self.starts, axis=1)
            neg = np.add.reduceat(neg, self.starts, axis=1)
        return pos, neg


def _roc_and_ap(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC (ties count one half) and average precision (sklearn's step definition)
    from ascending per-group integer weights; exact integer sums until the last division."""
    cum_pos, cum_neg = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total_pos, total_neg = cum_pos[:, -1], cum_neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # Each churned weight counts the retained weight below it, ties one half.
        auc = (pos * (2 * cum_neg - neg)).sum(axis=1) / (2.0 * total_pos * total_neg)
        # Precision at each group's threshold: churned / all weight scored >= it.
        tp = total_pos[:, None] - cum_pos + pos
        above = (total_pos + total_neg)[:, None] - (cum_pos + cum_neg) + (pos + neg)
        ap = (pos * (tp / np.maximum(above, 1))).sum(axis=1) / total_pos
    return auc, ap


def weighted_roc_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per row of `weights` (resamples x rows); ties count one half."""
    return _roc_and_ap(*_Ranked.of(y, score).group_sums(weights))[0]


def weighted_average_precision(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's step definition) per row of `weights`."""
    return _roc_and_ap(*_Ranked.of(y, score).group_sums(weights))[1]


METRICS = ("roc_auc", "pr_auc")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def to_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.estimate, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


def paired_bootstrap(
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Resampled ROC AUC and PR AUC of every score on the same resamples.

    Resamples are Poisson(1) row weights (the Poisson bootstrap: the large-n equivalent of
    drawing n rows with replacement, and far cheaper to draw). Returns
    {metric: {score name: array of length `resamples`}}.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    ranked = {name: _Ranked.of(y, s) for name, s in scores.items()}
    out: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in scores} for m in METRICS}
    done = 0
    while done < resamples:
        b = min(BOOTSTRAP_CHUNK, resamples - done)
        weights = rng.poisson(1.0, size=(b, len(y))).astype(np.int32)
        for name, r in ranked.items():
            auc, ap = _roc_and_ap(*r.group_sums(weights))
            out["roc_auc"][name].append(auc)
            out["pr_auc"][name].append(ap)
        done += b
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}


def interval(point: float, samples: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of bootstrap samples around the full-sample estimate."""
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return Interval(point, float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return Interval(float(point), float(lo), float(hi))


def bootstrap_intervals(
    y: np.ndarray,
    model: np.ndarray,
    rfm: np.ndarray,
    oracle: np.ndarray | None = None,
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """95% intervals: model ROC/PR AUC, model - RFM logistic, and with an oracle, model /
    oracle AUC and the headroom closed (AUC_model - AUC_RFM) / (AUC_oracle - AUC_RFM)."""
    scores = {"model": model, "rfm": rfm}
    if oracle is not None:
        scores["oracle"] = oracle
    boot = paired_bootstrap(y, scores, resamples=resamples, seed=seed)
    ones = np.ones((1, len(y)), dtype=np.int32)
    points = {k: _roc_and_ap(*_Ranked.of(y, s).group_sums(ones)) for k, s in scores.items()}
    full = {m: {k: float(v[i][0]) for k, v in points.items()} for i, m in enumerate(METRICS)}
    out: dict[str, float] = {}
    for m in METRICS:
        b, f = boot[m], full[m]
        out |= interval(f["model"], b["model"]).to_dict(m)
        out |= interval(f["model"] - f["rfm"], b["model"] - b["rfm"]).to_dict(f"{m}_minus_rfm")
        if oracle is not None:
            out |= interval(f["oracle"], b["oracle"]).to_dict(f"oracle_{m}")
            out |= interval(f["model"] / f["oracle"], b["model"] / b["oracle"]).to_dict(
                f"{m}_over_oracle"
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                closed = (b["model"] - b["rfm"]) / (b["oracle"] - b["rfm"])
                point = (f["model"] - f["rfm"]) / (f["oracle"] - f["rfm"])
            out |= interval(point, closed).to_dict(f"{m}_headroom_closed")
    return out


# ---------------------------------------------------------------- CI-D rule and grade


def rule_spans(window_days: int, floor_days: int = 30) -> list[int]:
    """CI-D's baseline spans: the prediction window halved until it is a month or less."""
    spans = [int(window_days)]
    while spans[-1] > floor_days:
        spans.append(spans[-1] // 2)
    return spans


@dataclass(frozen=True)
class RuleBaseline:
    span_days: int
    churn_recall: float
    accuracy: float
    by_span: list[dict[str, float]]


def ci_d_rule_baseline(y: np.ndarray, recency_days: np.ndarray, window_days: int) -> RuleBaseline:
    """Predict churned when there was no purchase in the last `span` days before the cutoff;
    the span with the highest overall accuracy is the baseline.

    CI-D picks "the time-based business rule with the highest ability to predict who is
    likely to churn"; that is read as overall accuracy because churn-class accuracy (recall)
    cannot fall as the span shrinks (a shorter span flags a superset), so it would always
    pick the shortest span, which flags almost everyone. Ties go to the higher recall.
    A customer with no purchase ever (NaN recency) has had no purchase in any span.
    """
    y = np.asarray(y).astype(bool)
    r = np.nan_to_num(np.asarray(recency_days, dtype=np.float64), nan=np.inf)
    rows = []
    for span in rule_spans(window_days):
        pred = r >= span
        rows.append(
            {
                "span_days": float(span),
                "churn_recall": churn_class_accuracy(y, pred),
                "accuracy": float(np.mean(pred == y)),
                "predicted_churn_share": float(pred.mean()),
            }
        )
    best = max(rows, key=lambda d: (d["accuracy"], d["churn_recall"]))
    return RuleBaseline(int(best["span_days"]), best["churn_recall"], best["accuracy"], rows)


@dataclass(frozen=True)
class Grade:
    grade: str  # "A", "B" or "C"
    accuracy: float
    churn_recall: float
    baseline_churn_recall: float
    improvement: float  # relative: (model - baseline) / baseline

    def reason(self) -> str:
        return (
            f"grade {self.grade}: accuracy {self.accuracy:.3f} (needs >= 0.5), churn-class "
            f"accuracy {self.churn_recall:.3f} vs baseline {self.baseline_churn_recall:.3f} "
            f"({self.improvement:+.1%}; A needs >= +10%, B > 0)"
        )


def ci_d_grade(
    y: np.ndarray, p: np.ndarray, baseline_churn_recall: float, threshold: float = 0.5
) -> Grade:
    """CI-D's grade at threshold 0.5: A if accuracy >= 0.5 and the churn-class accuracy beats
    the baseline's by >= 10% (relative); B if accuracy >= 0.5 and it beats it by less; else C.

    A parity scorecard with CI-D, not a quality gate: where more than half the customers
    churn, predicting "everyone churns" is right more than half the time with a recall of 1,
    and reaches A. The champion gate asks for more (`gate`).
    """
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    accuracy = float(np.mean(pred == y))
    recall = churn_class_accuracy(y, pred)
    if baseline_churn_recall > 0:
        improvement = (recall - baseline_churn_recall) / baseline_churn_recall
    else:
        improvement = float("inf") if recall > 0 else 0.0
    grade = grade_letter(accuracy, improvement)
    return Grade(grade, accuracy, recall, float(baseline_churn_recall), float(improvement))


def grade_letter(accuracy: float, improvement: float) -> str:
    """A: accuracy >= 0.5 and improvement >= 10%; B: accuracy >= 0.5 and improvement > 0;
    else C."""
    if accuracy >= 0.5 and improvement >= 0.10:
        return "A"
    if accuracy >= 0.5 and improvement > 0:
        return "B"
    return "C"
