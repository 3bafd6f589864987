"""The champion gate: whether a new model version may replace the champion, and why.

Every challenger must (1) beat the RFM logistic baseline with the 95% bootstrap interval of
the ROC AUC difference above zero, (2) be graded `GateSettings.min_grade` or better (by
default any grade: see below), and (3) have been trained on data
that looks like the champion's (sanity checks: population size, label rate, purchases per
customer, and the mean ChurnScore of both models on the current population, each within a
bound of `GateSettings`; a label rate or mean score that agrees instead with the churn rate
the refresh measured on the latest closed score window passes: a shock is not bad data). The score check compares means, not shapes: a better model
legitimately spreads its scores differently, but two calibrated models of one population
predict about the same churn rate. A first model only meets (1) and (2).

The CI-D grade does not gate by default. It compares the model's recall of churners at a
0.5 threshold with the most accurate "no purchase in the last N days" rule's, and both move
with the season's churn rate: in a simulated year (benchmarks/results/lifecycle_findings.md)
a challenger that beat the RFM baseline and tied the champion was graded C, and a gate
refusing C stopped every retrain. The grade stays in the decision's reason, the model card
and MLflow; `min_grade: B` restores CI-D parity as a requirement.

Then it is compared with the champion on one of two paths:

- **fresh window**: the challenger's test cutoff is on or after the champion's
  `trained_as_of`, so the champion never saw those labels; the champion's registered
  artifact and the challenger (fitted before its refit) are scored on that cutoff.
- **recipe**: the labels overlap (a monthly retrain, or the same as_of): the champion's
  artifact has seen the outcomes it would be judged on. The champion's *recipe* (its
  hyperparameters, tree count, calibrator kind and carried feature definitions; for a user's
  estimator, a clone with its parameters) is refitted
  on the challenger's training cutoffs and both are scored on the challenger's test cutoff.
  This compares recipes on the same data; it cannot see data that is bad for both, which is
  what the sanity checks are for.

On either path the challenger wins unless it is worse by more than `TIE_TOLERANCE` in ROC
AUC or PR AUC: a tie goes to the newer model (fresher data). The paired bootstrap interval
of the ROC AUC difference is reported beside the point figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from c360ml.config import GateSettings
from c360ml.model import evaluate
from c360ml.model.evaluate import TIE_TOLERANCE, Interval
from c360ml.model.scoring import CUSTOMER_ID, ModelBundle, score
from c360ml.model.train import (
    CUSTOMER,
    CUTOFF,
    LABEL,
    TrainResult,
    fit_estimator_recipe,
    fit_recipe,
)
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

FIRST, FRESH_WINDOW, RECIPE = "first model", "fresh window", "recipe"


@dataclass(frozen=True)
class DataProfile:
    """What a model's training data looked like at its test cutoff (sanity checks)."""

    population: float  # active customers at the test cutoff (rows / test sample rate)
    label_rate: float  # share of them who churned
    purchases_per_customer: float  # mean purchases in the 365 days before the cutoff

    @classmethod
    def measured(cls, result: TrainResult, test_sample_rate: float) -> DataProfile:
        m = result.metrics
        return cls(
            population=result.split_rows["test"] / test_sample_rate,
            label_rate=m["test_churn_rate"],
            purchases_per_customer=m["test_purchases_per_customer"],
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, data: dict | None) -> DataProfile | None:
        """From a bundle's metadata; None for models registered before profiles existed."""
        if not data:
            return None
        return cls(**{k: float(data[k]) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name} {'ok' if self.passed else 'FAILED'}: {self.detail}"


def _relative(name: str, new: float, old: float, bound: float, fmt: str) -> Check:
    change = new / old - 1 if old > 0 else float("inf")
    return Check(
        name,
        bool(abs(change) <= bound),
        f"{new:{fmt}} vs champion {old:{fmt}} ({change:+.1%}, bound ±{bound:.0%})",
    )


def sanity_checks(
    challenger: DataProfile,
    champion: DataProfile | None,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray | None,
    bounds: GateSettings,
    realized_churn: float | None = None,
) -> list[Check]:
    """The challenger's training data against the champion's, each check named.

    `realized_churn`: the churn rate the refresh measured on the latest score window closed
    by the challenger's as_of. A label rate or a predicted churn rate that left the
    champion's but agrees with it is a real shift the lake has shown, not bad data: that is
    what a retrain after a shock must be allowed to learn."""
    checks = []
    realized = "" if realized_churn is None else f", realized {realized_churn:.3f}"

    def near(new: float, old: float, bound: float) -> bool:
        agrees = realized_churn is not None and abs(new - realized_churn) <= bound
        return bool(abs(new - old) <= bound or agrees)

    if champion is not None:
        checks += [
            _relative(
                "population size",
                challenger.population,
                champion.population,
                bounds.max_population_change,
                ",.0f",
            ),
            Check(
                "label rate",
                near(challenger.label_rate, champion.label_rate, bounds.max_label_rate_change),
                f"{challenger.label_rate:.3f} vs champion {champion.label_rate:.3f}{realized} "
                f"(bound ±{bounds.max_label_rate_change:.2f})",
            ),
            _relative(
                "purchases per customer",
                challenger.purchases_per_customer,
                champion.purchases_per_customer,
                bounds.max_purchase_change,
                ".2f",
            ),
        ]
    if champion_scores is not None:
        new, old = float(np.mean(challenger_scores)), float(np.mean(champion_scores))
        checks.append(
            Check(
                "predicted churn rate",
                near(new, old, bounds.max_predicted_rate_change),
                f"mean ChurnScore {new:.3f} vs champion {old:.3f} on the current population"
                f"{realized} (bound ±{bounds.max_predicted_rate_change:.2f})",
            )
        )
    return checks


@dataclass(frozen=True)
class Comparison:
    """Challenger and champion scored on the same test rows."""

    path: str  # FRESH_WINDOW or RECIPE
    challenger: dict[str, float]  # roc_auc, pr_auc
    champion: dict[str, float]
    roc_auc_difference: Interval  # challenger - champion, paired bootstrap

    @property
    def challenger_not_worse(self) -> bool:
        return all(self.challenger[m] >= self.champion[m] - TIE_TOLERANCE for m in evaluate.METRICS)

    def __str__(self) -> str:
        d = self.roc_auc_difference
        what = "champion's artifact" if self.path == FRESH_WINDOW else "champion's recipe refitted"
        return (
            f"{self.path} comparison with the {what}: ROC AUC {self.challenger['roc_auc']:.4f} "
            f"vs {self.champion['roc_auc']:.4f} (difference {d.estimate:+.4f} "
            f"[{d.low:+.4f}, {d.high:+.4f}]), PR AUC {self.challenger['pr_auc']:.4f} vs "
            f"{self.champion['pr_auc']:.4f}"
        )


def compare(
    path: str,
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    resamples: int,
    seed: int,
) -> Comparison:
    """Point metrics of both scores and the paired bootstrap interval of their difference."""
    boot = evaluate.paired_bootstrap(
        y, {"challenger": challenger, "champion": champion}, resamples=resamples, seed=seed
    )["roc_auc"]
    points = {
        name: {k: evaluate.binary_metrics(y, p)[k] for k in evaluate.METRICS}
        for name, p in (("challenger", challenger), ("champion", champion))
    }
    diff = points["challenger"]["roc_auc"] - points["champion"]["roc_auc"]
    interval = evaluate.interval(diff, boot["challenger"] - boot["champion"])
    return Comparison(path, points["challenger"], points["champion"], interval)


@dataclass(frozen=True)
class GateDecision:
    promote: bool  # the gate passed (the alias moves unless approval is required)
    reason: str
    path: str  # FIRST, FRESH_WINDOW or RECIPE
    champion_version: str | None = None
    comparison: Comparison | None = None
    checks: tuple[Check, ...] = ()
    awaiting_approval: bool = False

    @property
    def label(self) -> str:
        if self.awaiting_approval:
            return "awaiting approval"
        return "promoted" if self.promote else "not promoted"

    @property
    def comparable(self) -> bool:
        """Whether the champion's artifact itself was scored (False: recipes compared)."""
        return self.path == FRESH_WINDOW


def decide(
    grade: str,
    roc_auc_minus_rfm_ci_low: float | None,
    comparison: Comparison | None,
    checks: list[Check],
    path: str,
    champion_version: str | None = None,
    min_grade: str = "C",
) -> GateDecision:
    """The promotion rule (pure, so it can be tested on numbers): every failure is named."""
    failures = []
    low = roc_auc_minus_rfm_ci_low
    if low is None or not low > 0:
        figure = "missing" if low is None else f"{low:+.4f}"
        failures.append(
            f"does not beat the RFM baseline (ROC AUC difference interval low {figure}, needs > 0)"
        )
    if "ABC".index(grade) > "ABC".index(min_grade):
        failures.append(f"grade {grade} (gate.min_grade {min_grade})")
    failures += [f"sanity check {c}" for c in checks if not c.passed]
    if comparison is not None and not comparison.challenger_not_worse:
        failures.append(f"champion better: {comparison}")
    passed = [f"{c}" for c in checks if c.passed]
    if failures:
        reason = "; ".join(failures)
    elif comparison is None:
        reason = f"no champion yet; grade {grade}, beats the RFM baseline (interval low {low:+.4f})"
    else:
        reason = (
            f"challenger at least as good (ties within {TIE_TOLERANCE} go to the newer model): "
            f"{comparison}; grade {grade}; beats the RFM baseline (interval low {low:+.4f})"
        )
    if passed:
        reason += "; " + "; ".join(passed)
    if champion_version is not None:
        reason += f" (champion v{champion_version})"
    return GateDecision(
        not failures, reason, path, champion_version, comparison, tuple(checks), False
    )


def judge(
    result: TrainResult,
    profile: DataProfile,
    champion: ModelBundle | None,
    champion_version: str | None,
    champion_rows: Callable[[ModelBundle], pd.DataFrame],
    bounds: GateSettings,
    realized_churn: float | None = None,
) -> GateDecision:
    """Measure the challenger against the champion and decide.

    `champion_rows(bundle)` gives, for every row of the challenger's matrix, customer_id,
    cutoff_time, label and the champion's features (reused from the challenger's matrix, or
    computed from the champion's carried feature definitions).
    """
    low = result.metrics.get("test_roc_auc_minus_rfm_ci_low")
    grade = result.grade.grade
    if champion is None:
        return decide(grade, low, None, [], FIRST, min_grade=bounds.min_grade)
    test = result.test
    y = test[LABEL].to_numpy()
    test_cutoff = pd.Timestamp(result.plan.test_cutoff)
    trained = champion.trained_as_of
    path = FRESH_WINDOW if trained is None or utc(trained) <= utc(test_cutoff) else RECIPE
    try:
        rows = champion_rows(champion)
        at_test = pd.to_datetime(rows[CUTOFF], utc=True) == utc(test_cutoff)
        request = rows.loc[at_test.to_numpy(), [CUSTOMER, *champion.feature_names]]
        scored = score(champion, request.rename(columns={CUSTOMER: CUSTOMER_ID}), explain="none")
        artifact = _aligned(scored.set_index(CUSTOMER_ID)["ChurnScore"], test[CUSTOMER])
        if path == FRESH_WINDOW:
            theirs = artifact
        else:
            meta = champion.metadata
            kind = champion.calibrator.kind if champion.calibrator else None
            if champion.estimator is not None:  # a user's estimator: a clone of it
                recipe = fit_estimator_recipe(
                    rows,
                    champion.feature_names,
                    result.plan,
                    champion.estimator,
                    kind,
                    result.config.nthread,
                )
            else:
                recipe = fit_recipe(
                    rows, champion.feature_names, result.plan, meta["params"], meta["n_trees"], kind
                )
            theirs = _aligned(recipe, test[CUSTOMER])
    except (ValueError, KeyError) as exc:
        log.warning("gate: champion v%s cannot be measured: %s", champion_version, exc)
        failure = Check("champion measurable", False, f"the champion could not be scored: {exc}")
        return decide(grade, low, None, [failure], path, champion_version, bounds.min_grade)
    config = result.config
    comparison = compare(
        path, y, test["model"].to_numpy(), theirs, config.bootstrap_resamples, config.seed
    )
    previous = DataProfile.of(champion.metadata.get("training_data"))
    checks = sanity_checks(
        profile, previous, test["refit"].to_numpy(), artifact, bounds, realized_churn
    )
    if previous is None:
        log.warning("gate: champion v%s records no training-data profile", champion_version)
    return decide(grade, low, comparison, checks, path, champion_version, bounds.min_grade)


def _aligned(scores: pd.Series, customers: pd.Series) -> np.ndarray:
    """Scores in the order of the challenger's test rows; every row must be scored."""
    out = scores.reindex(customers.to_numpy())
    if out.isna().any():
        raise ValueError(f"the champion scored {int(out.notna().sum())} of {len(out)} test rows")
    return out.to_numpy(dtype=np.float64)


def card_section(decision: GateDecision) -> str:
    """The model card's gate section: the path taken, the checks, and what it can't catch."""
    lines = [f"Decision: **{decision.label}**. {decision.reason}.", ""]
    if decision.path == RECIPE:
        lines.append(
            "The labels of this model's test cutoff overlap the champion's training, so the "
            "champion's recipe (hyperparameters, tree count, calibrator kind, feature "
            "definitions) was refitted on this model's training cutoffs and both were scored "
            "on this model's test cutoff. This compares recipes on the same data: it catches a "
            "worse recipe or feature set, not data that is wrong for both (the sanity checks "
            "look at the data)."
        )
    elif decision.path == FRESH_WINDOW:
        lines.append(
            "The champion's registered artifact never saw this model's test labels, so both "
            "artifacts were scored on this model's test cutoff."
        )
    else:
        lines.append("There was no champion: only the baseline (and grade) rules applied.")
    lines += [
        "",
        "Every challenger must beat the RFM logistic baseline with the 95% interval of the ROC "
        "AUC difference above zero; with a champion, its training data must agree with the "
        "champion's within the sanity bounds. Ties within "
        f"{TIE_TOLERANCE} go to the newer model. The CI-D grade is reported and gates only "
        "where `gate.min_grade` asks for A or B: it judges recall at a 0.5 threshold against a "
        "recency rule, and both follow the season's churn rate.",
    ]
    return "\n".join(lines)
