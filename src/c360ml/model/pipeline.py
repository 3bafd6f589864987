"""`run_training`: gold -> labels -> features -> train/evaluate -> MLflow -> gate.

The wiring that `c360ml train` and `pipelines/train.py` call. The work is in
`c360ml.features` (labels, RFM and the feature matrix, as SQL over the lake's gold; the
feature definitions from Featuretools; imported lazily, so this module imports without
them), or with `engine: spark` in `c360ml.spark.features` (the same frames computed by
Spark: `prepare_training` is where the engines part), and in `train`, `registry` and
`report`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd

from c360ml import webhook
from c360ml.config import Settings
from c360ml.model import drift, gate, registry, report, watch
from c360ml.model.reference import reference_churn_probability
from c360ml.model.scoring import DEFAULT_EXPLAIN, ModelBundle
from c360ml.model.splits import TRAIN, assign_splits, plan_splits
from c360ml.model.train import (
    CUSTOMER,
    CUTOFF,
    LABEL,
    TrainConfig,
    TrainResult,
    eval_sample_rate_for,
    evaluate_estimator,
    require_optuna,
    sample_customers,
    sample_population,
    sample_rate_for,
    train_and_evaluate,
)
from c360ml.timestamps import utc, utc_column

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSummary:
    """What a training run did, for the CLI's table and for callers."""

    model_name: str
    run_id: str
    model_version: str
    promoted: bool
    gate_reason: str
    trained_as_of: pd.Timestamp
    test_cutoff: pd.Timestamp
    validation_cutoff: pd.Timestamp | None
    split_mode: str
    optimistic: bool
    evaluation_reason: str
    split_rows: dict[str, int]
    sample_rate: float  # customers sampled at the train/validation cutoffs
    test_sample_rate: float  # customers sampled at the test cutoff (>= sample_rate)
    n_features: int
    n_trees: int
    calibrator: str
    roc_auc: float
    roc_auc_ci: tuple[float, float]
    pr_auc: float
    pr_auc_ci: tuple[float, float]
    log_loss: float
    brier: float
    accuracy: float
    churn_recall: float
    top_decile_lift: float
    rfm_roc_auc: float
    roc_auc_minus_rfm: float
    roc_auc_minus_rfm_ci: tuple[float, float]
    recency_roc_auc: float
    baseline_span_days: int
    baseline_churn_recall: float
    grade: str
    grade_improvement: float
    oracle_grade: str | None = None  # the true probability, graded against the same rule
    oracle_roc_auc: float | None = None
    headroom_closed: float | None = None
    headroom_closed_ci: tuple[float, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""

    gate_label: str = ""  # promoted / not promoted / awaiting approval
    gate_path: str = ""  # first model / fresh window / recipe

    @property
    def decision(self) -> str:
        if self.gate_label == "awaiting approval":
            return f"awaiting approval: c360ml model approve {self.model_version}"
        return "promoted to champion" if self.promoted else "kept as challenger"

    def rows(self) -> list[dict[str, str]]:
        """Flat item/value rows for printing (the CLI prints them as a table)."""

        def ci(v: float, lohi: tuple[float, float] | None) -> str:
            return f"{v:.4f}" if lohi is None else f"{v:.4f} [{lohi[0]:.4f}, {lohi[1]:.4f}]"

        evaluation = "OPTIMISTIC: " if self.optimistic else ""
        items: list[tuple[str, str]] = [
            ("model", f"{self.model_name} v{self.model_version} ({self.decision})"),
            ("gate", self.gate_reason),
            ("trained_as_of", str(self.trained_as_of.date())),
            ("evaluation", evaluation + self.evaluation_reason),
            ("rows train/validation/test", " / ".join(f"{v:,}" for v in self.split_rows.values())),
            (
                "customer sample rate train / test",
                f"{self.sample_rate:.3f} / {self.test_sample_rate:.3f}",
            ),
            (
                "features / trees / calibrator",
                f"{self.n_features}/{self.n_trees}/{self.calibrator}",
            ),
            ("ROC AUC [95% CI] (pre-refit)", ci(self.roc_auc, self.roc_auc_ci)),
            ("PR AUC [95% CI]", ci(self.pr_auc, self.pr_auc_ci)),
            ("log loss / Brier", f"{self.log_loss:.4f} / {self.brier:.4f}"),
            ("accuracy / churn-class recall", f"{self.accuracy:.4f} / {self.churn_recall:.4f}"),
            ("top-decile lift", f"{self.top_decile_lift:.2f}"),
            ("RFM logistic ROC AUC", f"{self.rfm_roc_auc:.4f}"),
            ("model - RFM ROC AUC", ci(self.roc_auc_minus_rfm, self.roc_auc_minus_rfm_ci)),
            ("recency ROC AUC", f"{self.recency_roc_auc:.4f}"),
            (
                "CI-D rule baseline",
                f"{self.baseline_span_days}-day span, churn-class recall "
                f"{self.baseline_churn_recall:.4f}",
            ),
            ("grade", f"{self.grade} (improvement {self.grade_improvement:+.1%})"),
        ]
        if self.oracle_roc_auc is not None:
            items.append(("oracle ROC AUC", f"{self.oracle_roc_auc:.4f}"))
            items.append(("oracle's own grade (same rule)", str(self.oracle_grade)))
            items.append(("headroom closed", ci(self.headroom_closed, self.headroom_closed_ci)))
        items.append(("seconds", ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())))
        items.append(("tracking", self.tracking_uri))
        return [{"item": k, "value": v} for k, v in items]


def summarise(
    result: TrainResult,
    logged: registry.LoggedVersion,
    decision: gate.GateDecision,
    model_name: str,
    trained_as_of: pd.Timestamp,
    sample_rate: float,
    seconds: dict[str, float],
    tracking_uri: str,
    test_sample_rate: float = 1.0,
) -> TrainSummary:
    m = result.metrics

    def pair(key: str) -> tuple[float, float]:
        return (m[f"{key}_ci_low"], m[f"{key}_ci_high"])

    oracle = "oracle_roc_auc" in m
    return TrainSummary(
        model_name=model_name,
        run_id=logged.run_id,
        model_version=logged.version,
        promoted=decision.promote and not decision.awaiting_approval,
        gate_reason=decision.reason,
        gate_label=decision.label,
        gate_path=decision.path,
        trained_as_of=trained_as_of,
        test_cutoff=result.plan.test_cutoff,
        validation_cutoff=result.plan.validation_cutoff,
        split_mode=result.plan.mode,
        optimistic=result.optimistic,
        evaluation_reason=result.plan.reason,
        split_rows=result.split_rows,
        sample_rate=sample_rate,
        test_sample_rate=test_sample_rate,
        n_features=len(result.feature_names),
        n_trees=result.n_trees,
        calibrator=result.calibration["chosen"],
        roc_auc=m["test_roc_auc"],
        roc_auc_ci=pair("test_roc_auc"),
        pr_auc=m["test_pr_auc"],
        pr_auc_ci=pair("test_pr_auc"),
        log_loss=m["test_log_loss"],
        brier=m["test_brier"],
        accuracy=m["test_accuracy"],
        churn_recall=m["test_churn_recall"],
        top_decile_lift=m["test_top_decile_lift"],
        rfm_roc_auc=m["rfm_logistic_roc_auc"],
        roc_auc_minus_rfm=m["test_roc_auc_minus_rfm"],
        roc_auc_minus_rfm_ci=pair("test_roc_auc_minus_rfm"),
        recency_roc_auc=m["recency_roc_auc"],
        baseline_span_days=result.rule.span_days,
        baseline_churn_recall=result.rule.churn_recall,
        grade=result.grade.grade,
        grade_improvement=result.grade.improvement,
        oracle_grade="ABC"[int(m["oracle_grade"])] if "oracle_grade" in m else None,
        oracle_roc_auc=m["oracle_roc_auc"] if oracle else None,
        headroom_closed=m.get("test_roc_auc_headroom_closed") if oracle else None,
        headroom_closed_ci=pair("test_roc_auc_headroom_closed") if oracle else None,
        seconds=seconds,
        tracking_uri=tracking_uri,
    )


def tracking(settings: Settings) -> tuple[str, Path | None]:
    """Tracking URI and, for the embedded default store, its artifact folder."""
    if settings.mlflow_tracking_uri:
        return settings.tracking_uri, None
    return settings.tracking_uri, settings.path(settings.mlflow_dir) / "artifacts"


def log_and_gate(
    result: TrainResult,
    bundle: ModelBundle,
    settings: Settings,
    params: dict[str, Any],
    card: report.CardContext,
    champion_rows: Callable[[ModelBundle], pd.DataFrame],
    extra_artifacts: dict[str, Any] | None = None,
    oracle: pd.Series | None = None,
    require_approval: bool | None = None,
) -> tuple[registry.LoggedVersion, gate.GateDecision]:
    """Log the run and the model, register a version, run the gate, add the model card.

    The champion is read before the new version is registered; `require_approval` (default:
    the `gate.require_approval` setting) leaves a passing version as `challenger`."""
    uri, artifact_root = tracking(settings)
    registry.use_experiment(uri, settings.model_name, artifact_root)
    if require_approval is None:
        require_approval = settings.gate.require_approval
    client = mlflow.MlflowClient()
    registry.mark_interrupted(client, settings.model_name)
    current = registry.champion_version(client, settings.model_name)
    champion = None
    if current is not None:
        champion = registry.load_bundle(f"models:/{settings.model_name}/{current.version}")
    profile = gate.DataProfile.of(bundle.metadata["training_data"])
    name = f"train as_of {bundle.metadata['trained_as_of'][:10]}"
    with mlflow.start_run(run_name=name):
        logged = registry.log_training(
            result, bundle, settings.model_name, params, extra_artifacts, oracle
        )
        champion_v = None if current is None else str(current.version)
        as_of = pd.Timestamp(bundle.metadata["trained_as_of"])
        realized = realized_churn_rate(settings, as_of, result.plan.window_days)
        decision = gate.judge(
            result, profile, champion, champion_v, champion_rows, settings.gate, realized
        )
        decision = registry.record_gate(
            settings.model_name, logged.version, decision, require_approval
        )
        text = report.model_card(
            result,
            dataclasses.replace(
                card, model_version=logged.version, gate=gate.card_section(decision)
            ),
        )
        mlflow.log_text(text, "model_card.md")
        description = (
            f"Churn model trained as of {bundle.metadata['trained_as_of'][:10]}; grade "
            f"{result.grade.grade}; test ROC AUC {result.metrics['test_roc_auc']:.4f} "
            f"(pre-refit, {'optimistic' if result.optimistic else 'out of time'}). "
            f"Model card: run {logged.run_id} artifact model_card.md. "
            f"Gate: {decision.label}: {decision.reason}"
        )
        client.update_model_version(settings.model_name, logged.version, description[:4900])
    return logged, decision


# ---------------------------------------------------------------- the features wiring


@dataclass
class TrainingData:
    """Everything `c360ml train` computes before it fits a model: the churn definition, the
    customer samples, gold (for the sample), labels, the out-of-time plan, the candidate and
    selected features, the labelled matrix, the RFM baseline's inputs and (generated lakes
    only) the oracle. `prepare_training` builds it; the built-in recipe and a user's
    estimator (c360ml.api) are both fitted on it, so they are measured on the same rows."""

    as_of: pd.Timestamp  # the trained_as_of (UTC)
    cfg: Any  # c360ml.features.ChurnConfig
    config: TrainConfig
    cutoffs: list[pd.Timestamp]
    candidate_customers: int  # customers with an order in the training span
    sample_rate: float  # customers sampled at the train/validation cutoffs
    test_sample_rate: float  # customers sampled at the test cutoff
    gold: Any  # c360ml.features.LakeGold: the lake's gold, the sampled customers only
    plan: Any  # c360ml.model.splits.SplitPlan
    candidates: Any  # FeatureSet before selection
    features: Any  # FeatureSet after selection (travels with the model)
    dropped: list[dict]  # features dropped by selection, with reasons
    matrix: pd.DataFrame  # customer_id, cutoff_time, label, every candidate feature
    rfm: pd.DataFrame  # recency/frequency/monetary per (customer_id, cutoff_time)
    oracle: pd.Series | None  # true churn probability of test customers (generated lakes)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def window_days(self) -> int:
        return self.cfg.prediction_window_days

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.features.names)

    def model_matrix(self) -> pd.DataFrame:
        """customer_id, cutoff_time, label and the selected features: what is fitted."""
        return self.matrix[[CUSTOMER, CUTOFF, LABEL, *self.features.names]]

    def split_of(self) -> pd.Series:
        """Each matrix row's split by its cutoff: "train", "validation", "test" or "unused"
        (the cutoffs whose label windows would overlap the test window)."""
        return assign_splits(self.matrix, self.plan)

    def rows(self, split: str) -> pd.DataFrame:
        """The model matrix rows of one split ("train", "validation" or "test")."""
        splits = self.split_of()
        if split not in set(splits):
            raise ValueError(f"no split {split!r}; expected train, validation or test")
        return self.model_matrix().loc[(splits == split).to_numpy()].reset_index(drop=True)


def prepare_training(
    settings: Settings,
    as_of: pd.Timestamp,
    sample_rate: float | None = None,
    config: TrainConfig | None = None,
    tune: int = 0,
) -> TrainingData:
    """Labels, the split plan and the feature matrix for `as_of` (a UTC instant), computed
    by the settings' engine (`engine`: DuckDB in this process, or Spark)."""
    from c360ml import features as ft
    from c360ml.storage.lake import Lake

    if tune < 0:
        raise ValueError(f"--tune takes a number of Optuna trials >= 0, not {tune}")
    if tune > 0:
        require_optuna()  # fail before an hour of feature work, not after
    config = config or TrainConfig()
    as_of = utc(as_of)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    spec = settings.path(settings.feature_spec)
    cfg = ft.load_churn_config(spec)
    window = cfg.prediction_window_days
    lake = Lake(settings.lake)
    cutoffs = ft.training_cutoffs(cfg, as_of)
    # Sample first, from the customer ids alone; labels, features and RFM are then SQL over
    # the lake's gold for the sample only (c360ml.features.asof): nothing of gold is held
    # in pandas, and DuckDB's memory follows the sample, not the lake.
    ordering = ft.read_ordering_customers(lake, cutoffs[0] - cfg.lookback, cutoffs[-1])
    rate = sample_rate_for(len(ordering), config, sample_rate)
    test_rate = eval_sample_rate_for(len(ordering), config, rate)
    sampled = None if test_rate >= 1 else sample_customers(ordering, test_rate)
    gold = ft.lake_gold(lake, customers=sampled)

    def sample(labels: pd.DataFrame) -> pd.DataFrame:
        """The training population: the labelled rows of the sampled customers."""
        if labels.empty:
            raise ValueError(f"no active customers at any training cutoff for as_of {as_of.date()}")
        test_cutoff = _plan(labels, window).test_cutoff
        population = sample_population(labels, rate, test_cutoff, keep_rate=test_rate)
        log.info(
            "training population: %d rows of %d customers with orders in the span "
            "(sample rate %.3f, test-cutoff sample rate %.3f)",
            len(population),
            len(ordering),
            rate,
            test_rate,
        )
        return population

    # The one place the engines part: the same frames from the same definitions, by
    # DuckDB in this process or by Spark (only the sampled matrix reaches this process).
    frames = _training_frames
    if settings.engine == "spark":
        from c360ml.spark import features as on_spark

        frames = on_spark.training_frames
    labels, population, rfm, candidates, matrix = frames(
        settings, gold, cutoffs, cfg, spec, sample, lap
    )
    plan = _plan(labels, window)
    matrix = matrix.merge(_keyed(population), on=[CUSTOMER, CUTOFF], validate="one_to_one")
    train_rows = assign_splits(matrix, plan) == TRAIN
    # Selection looks at training rows only, so nothing about the test cutoff leaks into it.
    fs, dropped = ft.select_features(matrix.loc[train_rows], candidates)
    lap("features_seconds")

    test_customers = matrix.loc[_is(matrix, plan.test_cutoff), CUSTOMER]
    oracle = reference_churn_probability(settings, test_customers, plan.test_cutoff, window)
    return TrainingData(
        as_of=as_of,
        cfg=cfg,
        config=config,
        cutoffs=cutoffs,
        candidate_customers=len(ordering),
        sample_rate=rate,
        test_sample_rate=test_rate,
        gold=gold,
        plan=plan,
        candidates=candidates,
        features=fs,
        dropped=dropped,
        matrix=matrix,
        rfm=rfm,
        oracle=oracle,
        seconds=seconds,
    )


class TrainingFrames(NamedTuple):
    """What an engine computes for training: the labels of every active customer at each
    cutoff, the sampled population (labelled), RFM at each cutoff, the candidate features
    and their matrix (customer_id, cutoff_time, the candidates) for the population."""

    labels: pd.DataFrame
    population: pd.DataFrame
    rfm: pd.DataFrame
    candidates: Any  # c360ml.features.FeatureSet
    matrix: pd.DataFrame


def _training_frames(
    settings: Settings,
    gold: Any,
    cutoffs: list[pd.Timestamp],
    cfg: Any,
    spec: Path,
    sample: Callable[[pd.DataFrame], pd.DataFrame],
    lap: Callable[[str], None],
) -> TrainingFrames:
    """The training frames by DuckDB (`c360ml.spark.features.training_frames` is Spark's):
    `sample` makes the population of the labels, `lap` times the steps."""
    from c360ml import features as ft
    from c360ml.features.asof import AsOfSql

    # The cutoffs' features are shared among the refresh's worker processes (one core
    # each, their own DuckDB): this process's is closed before, its memory freed for them.
    workers = settings.refresh_workers
    with AsOfSql(gold) as sql:  # one session: gold registered and statuses resolved once
        labels = ft.compute_labels(sql, cutoffs, cfg)
        population = sample(labels)
        rfm = ft.compute_rfm(sql, cutoffs)
        lap("labels_seconds")
        candidates = ft.derive_feature_set(sql, spec)
        keys = population[[CUSTOMER, CUTOFF]]
        if workers <= 1:
            matrix = ft.calculate_features(sql, keys, candidates)
    if workers > 1:
        matrix = ft.calculate_features(gold, keys, candidates, workers=workers)
    return TrainingFrames(labels, population, rfm, candidates, matrix)


def _plan(labels: pd.DataFrame, window: int):
    """The out-of-time split plan of the labels' cutoffs."""
    return plan_splits(sorted(pd.to_datetime(labels[CUTOFF], utc=True).unique()), window)


def fit_builtin(data: TrainingData, tune: int = 0) -> TrainResult:
    """The built-in recipe (XGBoost, early stopping, calibrator choice) on `data`."""
    started = time.perf_counter()
    result = train_and_evaluate(
        data.model_matrix(),
        data.feature_names,
        data.rfm,
        data.window_days,
        data.config,
        oracle=data.oracle,
        n_trials=tune,
    )
    return _with_oracle(data, result, started)


def fit_estimator(data: TrainingData, estimator: Any) -> TrainResult:
    """A user's scikit-learn-compatible classifier on `data`, measured as the built-in is."""
    started = time.perf_counter()
    result = evaluate_estimator(
        data.model_matrix(),
        data.feature_names,
        data.rfm,
        data.window_days,
        estimator,
        data.config,
        oracle=data.oracle,
    )
    return _with_oracle(data, result, started)


def _with_oracle(data: TrainingData, result: TrainResult, started: float) -> TrainResult:
    if data.oracle is not None:
        result.test["oracle"] = result.test[CUSTOMER].map(data.oracle)
    result.seconds["train_seconds"] = time.perf_counter() - started
    return result


def card_context(settings: Settings, data: TrainingData, code: str) -> report.CardContext:
    """The model card's facts that the result does not hold."""
    return report.CardContext(
        model_name=settings.model_name,
        trained_as_of=data.as_of,
        window_days=data.window_days,
        lookback_days=data.cfg.active_lookback_days,
        cutoff_spacing_days=data.cfg.cutoff_spacing_days,
        sample_rate=data.sample_rate,
        test_sample_rate=data.test_sample_rate,
        candidate_customers=data.candidate_customers,
        population_rows=len(data.matrix),
        n_candidate_features=len(data.candidates.names),
        dropped_features=len(data.dropped),
        code_version=code,
    )


def bundle_of(data: TrainingData, result: TrainResult) -> ModelBundle:
    """What travels with the model (registry.build_bundle on this data's features)."""
    fs = data.features
    return registry.build_bundle(
        result,
        fs.dtypes,
        fs.to_json(),
        data.cfg.to_dict(),
        data.as_of,
        test_sample_rate=data.test_sample_rate,
    )


def champion_rows(settings: Settings, data: TrainingData, champion: ModelBundle) -> pd.DataFrame:
    """The champion's features on every labelled row of the challenger's matrix (the
    gate's rows): taken from the matrix when it has them, else computed from the
    champion's definitions by the settings' engine (on Spark over the same sampled
    customers' gold, `c360ml.spark.features.features_for`: only the rows' features reach
    this process, as for the matrix)."""
    from c360ml import features as ft

    matrix, keys = data.matrix, [CUSTOMER, CUTOFF, LABEL]
    if set(champion.feature_names) <= set(matrix.columns):
        return matrix[[*keys, *champion.feature_names]]
    if not champion.feature_set_json:
        raise ValueError("the champion carries no feature definitions")
    champion_fs = ft.FeatureSet.from_json(champion.feature_set_json)
    population = matrix[[CUSTOMER, CUTOFF]]
    if settings.engine == "spark":
        from c360ml.spark import features as on_spark

        computed = on_spark.features_for(settings, data.gold, population, champion_fs)
    else:
        computed = ft.calculate_features(data.gold, population, champion_fs)
    computed[CUTOFF] = utc_column(computed[CUTOFF])
    return matrix[keys].merge(computed, on=[CUSTOMER, CUTOFF], validate="one_to_one")


def realized_churn_rate(settings: Settings, as_of: pd.Timestamp, window_days: int) -> float | None:
    """The churn rate the refresh measured (gold/score_outcomes, whole scored population) on
    the latest score window that had closed by the challenger's as_of; None before any."""
    from c360ml.storage.lake import Lake

    lake = Lake(settings.lake)
    if not lake.exists("gold", watch.OUTCOMES):
        return None
    outcomes = lake.read_pandas("gold", watch.OUTCOMES)
    closed = outcomes["ScoredAsOf"] + pd.Timedelta(days=window_days) <= utc(as_of)
    mine = outcomes[closed.to_numpy() & (outcomes["population"] == "all").to_numpy()]
    if mine.empty:
        return None
    return float(mine.sort_values("ScoredAsOf")["churn_rate"].iloc[-1])


def register_training(
    settings: Settings,
    data: TrainingData,
    result: TrainResult,
    tune: int = 0,
    require_approval: bool | None = None,
    triggers: list[str] | None = None,
) -> TrainSummary:
    """Bundle, log, register and gate a fitted result; post the decision to the webhook."""
    started = time.perf_counter()
    bundle = bundle_of(data, result)
    config = data.config
    params = {
        "trained_as_of": str(data.as_of),
        **{f"churn_{k}": v for k, v in data.cfg.to_dict().items()},
        "sample_rate": data.sample_rate,
        "test_sample_rate": data.test_sample_rate,
        "sample_candidate_customers": data.candidate_customers,
        "max_train_customers": config.max_train_customers,
        "max_test_customers": config.max_test_customers,
        "tune_trials": tune,
        "split_mode": data.plan.mode,
        "n_candidate_features": len(data.candidates.names),
        "n_features": len(data.features.names),
        "explain_default": DEFAULT_EXPLAIN,
    }
    code = str(bundle.metadata.get("git_sha", bundle.metadata["package_version"]))
    logged, decision = log_and_gate(
        result,
        bundle,
        settings,
        params,
        card_context(settings, data, code),
        partial(champion_rows, settings, data),
        extra_artifacts={"dropped_features.json": data.dropped},
        oracle=data.oracle,
        require_approval=require_approval,
    )
    seconds = dict(data.seconds)
    seconds["train_seconds"] = result.seconds.get("train_seconds", 0.0)
    seconds |= {f"train.{k}": v for k, v in result.seconds.items() if k != "train_seconds"}
    seconds["log_and_gate_seconds"] = time.perf_counter() - started
    summary = summarise(
        result,
        logged,
        decision,
        settings.model_name,
        data.as_of,
        data.sample_rate,
        seconds,
        tracking(settings)[0],
        test_sample_rate=data.test_sample_rate,
    )
    webhook.post_event(settings.watch.webhook_url, webhook.gate_event(summary, triggers))
    return summary


def run_training(
    settings: Settings,
    as_of: pd.Timestamp,
    tune: int = 0,
    sample_rate: float | None = None,
    config: TrainConfig | None = None,
    require_approval: bool | None = None,
    triggers: list[str] | None = None,
) -> TrainSummary:
    """Train, evaluate, register and gate the churn model for `as_of` (a UTC instant).
    The gate's decision goes to the watch webhook, if set, with the `triggers` of a
    `retrain --if-needed` (None: a plain `train`).

    Three steps, which `c360ml.api.Project` also calls one by one: `prepare_training`,
    `fit_builtin`, `register_training`."""
    data = prepare_training(settings, as_of, sample_rate, config, tune)
    result = fit_builtin(data, tune)
    return register_training(settings, data, result, tune, require_approval, triggers)


def _keyed(population: pd.DataFrame) -> pd.DataFrame:
    out = population[[CUSTOMER, CUTOFF, LABEL]].copy()
    out[CUTOFF] = utc_column(out[CUTOFF])
    return out


def _is(frame: pd.DataFrame, cutoff: pd.Timestamp) -> np.ndarray:
    return (pd.to_datetime(frame[CUTOFF], utc=True) == utc(cutoff)).to_numpy()


@dataclass(frozen=True)
class RetrainOutcome:
    """What `retrain --if-needed` found and did."""

    fired: list[str]  # the triggers that fired (empty: nothing was trained)
    health: str  # the figures looked at
    summary: TrainSummary | None = None


def champion_health(settings: Settings) -> watch.Health:
    """The champion's age against the lake's data end, and its latest drift and realized
    figures from gold/score_drift and gold/score_outcomes."""
    from c360ml.steps import DRIFT, latest_event_time
    from c360ml.storage.lake import Lake

    lake = Lake(settings.lake)
    uri, _ = tracking(settings)
    mlflow.set_tracking_uri(uri)  # load_bundle reads through MLflow's current store
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    current = registry.champion_version(client, settings.model_name)
    if current is None:
        return watch.Health(None, None, {}, None, None)
    version = str(current.version)
    bundle = registry.load_bundle(f"models:/{settings.model_name}/{version}")
    end = latest_event_time(lake)
    age = (end.floor("D") - utc(bundle.trained_as_of).floor("D")).days  # calendar days
    test_auc = bundle.metadata.get("test_metrics", {}).get("test_roc_auc")
    score_psi, feature_psi, closed = None, {}, None
    if lake.exists("gold", DRIFT):
        table = lake.read_pandas("gold", DRIFT)
        table = table[table["ModelVersion"] == version]
        if len(table):
            latest = table[table["ScoredAsOf"] == table["ScoredAsOf"].max()].set_index("column")
            score_psi = float(latest.loc[drift.SCORE, "psi"])
            top = [f for f in bundle.metadata.get("top_features", []) if f in latest.index]
            top = [f for f in top if not drift.calendar_scaled(f)]  # ageing is not drift
            feature_psi = {latest.loc[f, "label"]: float(latest.loc[f, "psi"]) for f in top}
    if lake.exists("gold", watch.OUTCOMES):
        outcomes = lake.read_pandas("gold", watch.OUTCOMES).dropna(subset=["roc_auc"])
        mine = (outcomes["ModelVersion"] == version) & (outcomes["population"] == "all")
        if mine.any():
            closed = outcomes[mine].sort_values("ScoredAsOf").iloc[-1]  # latest closed window
    if closed is None:
        return watch.Health(age, score_psi, feature_psi, None, test_auc)
    mean_score = closed.get("mean_score")  # absent from rows recorded before it was kept
    return watch.Health(
        age,
        score_psi,
        feature_psi,
        float(closed["roc_auc"]),
        test_auc,
        float(closed["churn_rate"]),
        None if pd.isna(mean_score) else float(mean_score),
    )


def retrain_if_needed(
    settings: Settings, as_of: pd.Timestamp | None = None, require_approval: bool | None = None
) -> RetrainOutcome:
    """Train a challenger and run the gate when a trigger fires (`watch.triggers`);
    `as_of` defaults to the day the lake's data ends."""
    from c360ml.steps import latest_event_time
    from c360ml.storage.lake import Lake

    health = champion_health(settings)
    fired = watch.triggers(health, settings.watch)
    described = watch.describe_health(health)
    if not fired:
        log.info("retrain: no trigger fired (%s)", described)
        return RetrainOutcome([], described)
    log.info("retrain: %s", "; ".join(fired))
    as_of = as_of or latest_event_time(Lake(settings.lake)).floor("D")
    summary = run_training(settings, as_of, require_approval=require_approval, triggers=fired)
    return RetrainOutcome(fired, described, summary)
