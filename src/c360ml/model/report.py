"""Plots and the model card of a training run (files written to a folder, then logged).

Figures use matplotlib's object API (`Figure`, Agg canvas) so nothing touches pyplot's
global state or needs a display. Nothing here writes a customer id: plots are curves
and distributions, the card holds aggregate figures only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from c360ml import glossary
from c360ml.model.train import LABEL, TrainResult

SCORES = {"model": "model (pre-refit)", "rfm_logistic": "RFM logistic", "recency": "recency"}


def _figure(width: float = 5.5, height: float = 4.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_roc(test: pd.DataFrame, path: Path, oracle: pd.Series | None = None) -> Path:
    fig, ax = _figure()
    for col, label in _curves(test, oracle).items():
        fpr, tpr, _ = roc_curve(test[LABEL], test[col])
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test cutoff")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(test: pd.DataFrame, path: Path, oracle: pd.Series | None = None) -> Path:
    fig, ax = _figure()
    for col, label in _curves(test, oracle).items():
        precision, recall, _ = precision_recall_curve(test[LABEL], test[col])
        ax.plot(recall, precision, label=label)
    ax.axhline(test[LABEL].mean(), color="grey", linestyle=":", linewidth=1, label="churn rate")
    ax.set(xlabel="recall (churned)", ylabel="precision", title="Precision-recall, test cutoff")
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_calibration(reliability: list[dict[str, float]], path: Path) -> Path:
    fig, ax = _figure()
    pred = [r["mean_predicted"] for r in reliability]
    obs = [r["observed_rate"] for r in reliability]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    ax.plot(pred, obs, marker="o", label="model (ChurnScore)")
    ax.set(xlabel="mean ChurnScore in bin", ylabel="observed churn rate", title="Reliability")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return _save(fig, path)


def lift_by_decile(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Churn rate of each score decile (highest first) over the overall rate."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    parts = np.array_split(np.asarray(y, dtype=np.float64)[order], 10)
    base = np.mean(y)
    return np.array([p.mean() / base if len(p) and base > 0 else np.nan for p in parts])


def plot_lift(test: pd.DataFrame, path: Path) -> Path:
    fig, ax = _figure()
    width = 0.4
    deciles = np.arange(1, 11)
    for i, col in enumerate(("model", "rfm_logistic")):
        lift = lift_by_decile(test[LABEL].to_numpy(), test[col].to_numpy())
        ax.bar(deciles + (i - 0.5) * width, lift, width=width, label=SCORES[col])
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="score decile (1 = highest risk)", ylabel="lift", title="Lift by decile")
    ax.set_xticks(deciles)
    ax.legend()
    return _save(fig, path)


def plot_shap_summary(
    contrib: np.ndarray, x: np.ndarray, names: tuple[str, ...], path: Path, top: int = 15
) -> Path:
    """Beeswarm-like summary: each dot a customer, x = SHAP impact, colour = feature value
    percentile (from xgboost pred_contribs; no `shap` package)."""
    mean_abs = np.abs(contrib).mean(axis=0)
    order = np.argsort(-mean_abs)[:top][::-1]
    fig, ax = _figure(7.5, max(3.0, 0.35 * len(order) + 1.5))
    rng = np.random.default_rng(0)
    for row, j in enumerate(order):
        values = pd.Series(x[:, j]).rank(pct=True).to_numpy()
        jitter = rng.uniform(-0.3, 0.3, len(values))
        points = ax.scatter(
            contrib[:, j], row + jitter, c=values, cmap="coolwarm", s=4, vmin=0, vmax=1
        )
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([_short(names[j]) for j in order], fontsize=7)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="SHAP impact on churn log-odds", title="Influential factors (test sample)")
    if len(order):
        fig.colorbar(points, ax=ax, label="feature value (percentile)")
    return _save(fig, path)


def plot_score_distribution(test: pd.DataFrame, path: Path) -> Path:
    fig, ax = _figure()
    bins = np.linspace(0, 1, 41)
    for value, label in ((0, "retained"), (1, "churned")):
        ax.hist(test.loc[test[LABEL] == value, "model"], bins=bins, alpha=0.6, label=label)
    ax.set(xlabel="ChurnScore", ylabel="customers", title="Score by actual outcome, test cutoff")
    ax.legend()
    return _save(fig, path)


def write_plots(result: TrainResult, folder: Path, oracle: pd.Series | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    contrib, x = result.shap_sample
    plots = [
        plot_roc(result.test, folder / "roc.png", oracle),
        plot_pr(result.test, folder / "pr.png", oracle),
        plot_calibration(result.reliability, folder / "calibration.png"),
        plot_lift(result.test, folder / "lift.png"),
        plot_score_distribution(result.test, folder / "score_distribution.png"),
    ]
    if len(contrib):  # a user's estimator has no contributions to plot
        plots.insert(
            4, plot_shap_summary(contrib, x, result.feature_names, folder / "shap_summary.png")
        )
    return plots


def _curves(test: pd.DataFrame, oracle: pd.Series | None) -> dict[str, str]:
    curves = dict(SCORES)
    if oracle is not None and "oracle" in test:
        curves["oracle"] = "oracle (true probability)"
    return {k: v for k, v in curves.items() if k in test and test[k].notna().all()}


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ---------------------------------------------------------------- model card


@dataclass(frozen=True)
class CardContext:
    """Facts the card needs that the training result does not hold."""

    model_name: str
    trained_as_of: pd.Timestamp
    window_days: int
    lookback_days: int
    cutoff_spacing_days: int
    sample_rate: float  # customer sampling rate at the train/validation cutoffs
    population_rows: int
    n_candidate_features: int
    dropped_features: int
    code_version: str
    model_version: str = "(not registered)"
    gate: str = "(not run)"
    test_sample_rate: float = 1.0  # customer sampling rate at the test cutoff
    candidate_customers: int | None = None  # customers with an order in the training span


def _sampling(ctx: CardContext) -> str:
    if ctx.sample_rate >= 1 and ctx.test_sample_rate >= 1:
        return "Customer sampling: none (every active customer at every cutoff)."
    of = f" of the {ctx.candidate_customers:,}" if ctx.candidate_customers else ""
    return (
        f"Customers sampled{of} with an order in the training span, by a stable hash of "
        f"customer_id: rate {ctx.sample_rate:.3f} at the training and validation cutoffs, "
        f"rate {ctx.test_sample_rate:.3f} at the test cutoff (the training sample lies "
        "inside the test sample; metrics are measured on the test sample). Scoring never "
        "samples."
    )


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(m: dict[str, float], key: str) -> str:
    if f"{key}_ci_low" not in m:
        return _f(m.get(key))
    return f"{_f(m[key])} [{_f(m[f'{key}_ci_low'])}, {_f(m[f'{key}_ci_high'])}]"


METRIC_ROWS = (  # label, then the metric key of: model, RFM logistic, recency, oracle
    ("ROC AUC", "test_roc_auc", "rfm_logistic_roc_auc", "recency_roc_auc", "oracle_roc_auc"),
    ("PR AUC", "test_pr_auc", "rfm_logistic_pr_auc", "recency_pr_auc", "oracle_pr_auc"),
    ("log loss", "test_log_loss", "rfm_logistic_log_loss", None, "oracle_log_loss"),
    ("Brier", "test_brier", "rfm_logistic_brier", None, "oracle_brier"),
    ("accuracy at 0.5", "test_accuracy", "rfm_logistic_accuracy", None, "oracle_accuracy"),
    (
        "churn-class accuracy (recall)",
        "test_churn_recall",
        "rfm_logistic_churn_recall",
        None,
        "oracle_churn_recall",
    ),
    (
        "top-decile lift",
        "test_top_decile_lift",
        "rfm_logistic_top_decile_lift",
        "recency_top_decile_lift",
        "oracle_top_decile_lift",
    ),
)
RULE_KEYS = {
    "accuracy at 0.5": "ci_d_rule_accuracy",
    "churn-class accuracy (recall)": "ci_d_rule_churn_recall",
}


def metric_rows(m: dict[str, float]) -> list[dict[str, str]]:
    """The test-cutoff metrics of the model and each baseline, one labelled row per metric
    (95% intervals where measured): the model card's table and the report's appendix."""
    rows = []
    for label, model_key, rfm_key, rec_key, oracle_key in METRIC_ROWS:
        rows.append(
            {
                "metric": label,
                "model (pre-refit)": _ci(m, model_key),
                "RFM logistic": _f(m.get(rfm_key)),
                "recency": _f(m.get(rec_key)) if rec_key else "–",
                "CI-D rule": _f(m.get(RULE_KEYS.get(label, ""))),
                "oracle": _ci(m, oracle_key) if oracle_key in m else "–",
            }
        )
    return rows


def grade_sentence(m: dict[str, float], grade: str) -> str:
    """The grade in plain words for a marketer (from the logged test metrics)."""
    return (
        f"Grade {grade}: of the customers who went on to churn, the model flagged "
        f'{m["test_churn_recall"]:.0%}, the best simple rule ("no purchase in the last '
        f'{int(m["ci_d_rule_span_days"])} days") {m["ci_d_rule_churn_recall"]:.0%} '
        f"({m['grade_improvement']:+.0%}), and {m['test_accuracy']:.0%} of all the model's "
        "predictions were right. A needs 10% more than the rule, B more at all, each with at "
        "least half of all predictions right."
    )


def _model_line(result: TrainResult) -> str:
    if result.estimator is None:
        return (
            f"XGBoost (hist), {result.n_trees} trees, max depth {result.params['max_depth']}, "
            f"learning rate {result.params['eta']:.3f}."
        )
    shown = ", ".join(f"{k}={v}" for k, v in result.params.items() if k != "estimator")
    return (
        f"A user's estimator, `{result.params.get('estimator', result.model_kind)}` ({shown}), "
        "evaluated by c360ml's splits, baselines and grade. InfluentialFactors: none (it has "
        "no per-customer contributions; scores carry an empty list)."
    )


def model_card(result: TrainResult, ctx: CardContext) -> str:
    """The model card (markdown): what the model predicts, on what, how well, and limits."""
    return "".join(
        (_card_definition(result, ctx), _card_evaluation(result, ctx), _card_use(result, ctx))
    )


def _card_definition(result: TrainResult, ctx: CardContext) -> str:
    """What is predicted, on which population, and how the data was split."""
    m = result.metrics
    plan = result.plan
    g = result.grade
    flag = (
        f"\n> **Evaluation is optimistic.** {plan.reason}\n"
        if plan.optimistic
        else f"\nEvaluation is {plan.reason}.\n"
    )
    trees = f" and {result.n_trees} trees" if result.estimator is None else ""
    return f"""# Model card: {ctx.model_name} version {ctx.model_version}

Churn model trained as of **{ctx.trained_as_of.date()}** (`trained_as_of`). Grade
**{g.grade}**. {grade_sentence(m, g.grade)}

## What it predicts

- **Churned at t** = no purchase in (t, t + {ctx.window_days} days]. A purchase is an order
  that is not cancelled or voided with net amount > 0 (a return-only order is not one).
- CI-D's transactional churn model has two parameters, a *prediction window* and a *churn
  definition* (days without a purchase). This model's definition **equals CI-D's when both
  are {ctx.window_days} days**; CI-D's sample guide uses 60/60, which corresponds to
  training this model with a 60-day window.
- ChurnScore = probability of churn; IsChurn = ChurnScore ≥ 0.5; RiskLevel Low < 0.33 ≤
  Medium < 0.66 ≤ High. InfluentialFactors = top 5 signed SHAP contributions (log-odds of
  the uncalibrated booster; "approx" = Saabas by default, "exact" = TreeSHAP on request).

## Data window and population

- Cutoffs every {ctx.cutoff_spacing_days} days; the last is the test cutoff
  {plan.test_cutoff.date()} = trained_as_of − {ctx.window_days} days. Features use events in
  ({ctx.lookback_days} days before t, t]; nothing after t.
- Population at each cutoff: active customers (a purchase in the {ctx.lookback_days} days
  before t). Labelled rows: {ctx.population_rows:,}. {_sampling(ctx)}
- Rows per split: {", ".join(f"{k} {v:,}" for k, v in result.split_rows.items())};
  test churn rate {_f(m["test_churn_rate"])}.

## Splits
{flag}
- Training cutoffs: {", ".join(plan.to_dict()["train_cutoffs"])}
- Validation: {plan.to_dict()["validation_cutoff"]} (early stopping, calibration choice)
- Test: {plan.test_cutoff.date()} (reported metrics, grade, champion gate)
- After evaluation the model was **refitted on all cutoffs** with the same settings{trees}.
  All metrics below are measured on the **pre-refit** model; the
  refitted model's test-cutoff ROC AUC {_f(m["refit_insample_test_roc_auc"])} is in sample
  (it saw those labels) and is not a measurement.

"""


def _card_evaluation(result: TrainResult, ctx: CardContext) -> str:
    """Features, test metrics against the baselines and the oracle, and the CI-D grade."""
    m = result.metrics
    g = result.grade
    table = [
        "| metric | model (pre-refit) | RFM logistic | recency | CI-D rule | oracle |",
        "|---|---|---|---|---|---|",
    ]
    table += ["| " + " | ".join(row.values()) + " |" for row in metric_rows(m)]
    oracle_lines = ""
    if "oracle_roc_auc" in m:
        oracle_lines = (
            f"- model AUC / oracle AUC: {_ci(m, 'test_roc_auc_over_oracle')}\n"
            f"- headroom closed, (AUC_model − AUC_RFM) / (AUC_oracle − AUC_RFM): "
            f"{_ci(m, 'test_roc_auc_headroom_closed')}\n"
        )
    oracle_grade = ""
    if "oracle_grade" in m:
        oracle_grade = (
            f" The oracle (the true churn probability) has churn-class accuracy "
            f"{_f(m['oracle_churn_recall'])} at 0.5 and would itself be graded "
            f"**{'ABC'[int(m['oracle_grade'])]}** against this rule: the grade's ceiling here."
        )
    spans = "\n".join(
        f"| {int(r['span_days'])} | {_f(r['churn_recall'])} | {_f(r['accuracy'])} | "
        f"{_f(r['predicted_churn_share'])} |"
        for r in result.rule.by_span
    )
    top = "\n".join(
        f"{r['rank']}. {glossary.describe(r['feature']).label} (`{r['feature']}`, "
        f"mean |SHAP| {r['mean_abs_shap']:.3f})"
        for r in result.importance[:10]
    )
    if not result.importance:
        top = f"(none: {result.model_kind} has no per-customer contributions)"
    return f"""## Features

{ctx.n_candidate_features} candidate features, {ctx.dropped_features} dropped by selection,
{len(result.feature_names)} used. Most influential (mean |SHAP| on a test sample):

{top}

## Metrics on the test cutoff (95% bootstrap intervals)

{chr(10).join(table)}

- model − RFM logistic: ROC AUC {_ci(m, "test_roc_auc_minus_rfm")}, PR AUC
  {_ci(m, "test_pr_auc_minus_rfm")} (paired bootstrap: {result.config.bootstrap_resamples}
  resamples of the test customers, the same resamples for every score)
{oracle_lines}
## Grade (CI-D)

{g.reason()}.

The grade reads CI-D's wording ("Model grade" in its churn prediction docs): A if at least half
of all predictions are correct and the accuracy on churned customers beats the baseline's by
at least 10%; B if at least half are correct and it beats the baseline by less than 10%; C
otherwise. CI-D's "accuracy on churned customers" is read as the
**recall of the churned class** (share of customers who churned that were predicted to
churn, at ChurnScore ≥ 0.5), and "the time-based business rule with the highest ability to predict who is likely to
churn" as the rule with the highest **overall accuracy**: predict churned when there was no
purchase in the last *span* days before t, for spans from the prediction window halved
until ≤ 30 days. The chosen span here is {result.rule.span_days} days (churn-class accuracy
{_f(result.rule.churn_recall)}, accuracy {_f(result.rule.accuracy)}).{oracle_grade}

The grade is a **parity scorecard with CI-D, not a quality gate**: where more than half of
the customers churn, predicting "everyone churns" is right more than half the time with a
churn-class accuracy of 1 and would be graded A. The champion gate asks more (below).

| span (days) | churn-class accuracy | accuracy | share predicted churned |
|---|---|---|---|
{spans}

"""


def _card_use(result: TrainResult, ctx: CardContext) -> str:
    """The gate's decision, calibration, the model itself and its limitations."""
    cal = result.calibration
    cal_text = ", ".join(
        f"{k} {v:.4f}" for k, v in cal.items() if k in ("none", "platt", "isotonic")
    )
    return f"""## Champion gate

{ctx.gate}

## Calibration

Validation log loss out of fold: {cal_text}. Calibrator used: **{cal["chosen"]}** (kept only
if it lowers validation log loss). Reliability curve: `plots/calibration.png`.

## Model

{_model_line(result)} Code version {ctx.code_version}.

## Limitations

- Metrics come from one test cutoff; the intervals cover sampling of customers, not
  changes between periods.
- The calibrator (if any) was fitted on the pre-refit model's validation scores and is
  applied to the refitted model; the refit uses the early-stopped tree count from a smaller
  training set.
- InfluentialFactors explain the uncalibrated log-odds; "approx" (Saabas) attributions sum
  to the same margin as TreeSHAP but can order features differently.
- Mutable attributes enter only through valid-from/valid-to histories; current values of
  them are never features for a past cutoff.
- The CI-D grade rewards flagging churners at 0.5; read it with the AUCs and calibration.
"""
