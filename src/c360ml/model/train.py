"""Fit, evaluate and refit the churn booster on a labelled feature matrix (no I/O).

Input is one frame: customer_id, cutoff_time, label (1 = churned) and float32 feature
columns, plus the RFM measures of the same rows. The steps are the issue's: out-of-time
splits; XGBoost (hist) with early stopping on the validation cutoff (optionally an Optuna
search on it); a calibrator only if it lowers validation log loss out of fold; metrics,
baselines, bootstrap intervals and the CI-D grade on the test cutoff from the model fitted
before the refit; then a refit on every cutoff with the chosen settings, whose test-cutoff
predictions are reported beside (in sample, so not a measurement).

Model size: depth <= 4 (tuning may go to 5) and <= 300 trees at learning rate 0.05. The
cost of explaining every profile grows with depth (TreeSHAP exponentially), and a
refresh explains every profile; the default ("approx", Saabas) is far cheaper than
"exact" (`benchmarks/results/serve.md` has both, per request size).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from pydantic import BaseModel, ConfigDict
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

from c360ml.model import baselines, drift, evaluate
from c360ml.model.scoring import Calibrator, positive_proba
from c360ml.model.splits import (
    TEST,
    TRAIN,
    VALIDATION,
    SplitPlan,
    assign_splits,
    customer_bucket,
    plan_splits,
    refit_mask,
)
from c360ml.timestamps import utc, utc_column

log = logging.getLogger(__name__)

CUSTOMER, CUTOFF, LABEL = "customer_id", "cutoff_time", "label"
SHAP_SAMPLE_ROWS = 2_000  # rows explained for the global SHAP summary


class TrainConfig(BaseModel):
    """Booster and evaluation settings; defaults keep SHAP within the refresh budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_depth: int = 4  # shallow trees: TreeSHAP cost grows ~4x per extra level
    learning_rate: float = 0.05  # with early stopping, lower only costs trees
    max_trees: int = 300  # cap on boosting rounds (early stopping picks fewer)
    early_stopping_rounds: int = 30  # rounds without validation log-loss gain before stopping
    min_child_weight: float = 5.0  # avoids leaves fitted to a handful of customers
    subsample: float = 0.8  # row subsampling per tree
    colsample_bytree: float = 0.8  # feature subsampling per tree
    reg_lambda: float = 1.0  # L2 on leaf weights
    max_bin: int = 256  # hist bins
    nthread: int = 2  # the machine has 2 cores shared with other jobs
    seed: int = 0  # booster, bootstrap and tuning seed
    bootstrap_resamples: int = 200  # paired bootstrap resamples (cost grows with test rows)
    # Customer caps on a training run: memory scales with them, not with the lake (gold and
    # features cost tens of KB per customer read). Above a cap, a stable hash sample of
    # customers is read from gold; the training sample lies inside the test sample, so every
    # trained customer is also scored at the test cutoff. The test cutoff is one of ~8
    # cutoffs used, so a larger test sample costs little beyond its gold read and halves the
    # metric variance.
    max_train_customers: int = 100_000  # customers at the train/validation cutoffs
    max_test_customers: int = 200_000  # customers at the test cutoff (>= the training sample)
    max_tuned_depth: int = 5  # Optuna may not pick deeper trees (scoring budget)


def sample_rate_for(n_customers: int, config: TrainConfig, rate: float | None) -> float:
    """The training sampling rate: the caller's, or enough to stay under the cap."""
    if rate is not None:
        if not 0 < rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {rate}")
        return float(rate)
    if n_customers <= config.max_train_customers:
        return 1.0
    return config.max_train_customers / n_customers


def eval_sample_rate_for(n_customers: int, config: TrainConfig, train_rate: float) -> float:
    """The test-cutoff sampling rate: every customer up to `max_test_customers`, else enough
    to stay under it, and never below the training rate (the samples are nested)."""
    if n_customers <= config.max_test_customers:
        return 1.0
    return max(train_rate, config.max_test_customers / n_customers)


def sample_customers(customer_ids: pd.Index, rate: float) -> pd.Index:
    """The customers of a `rate` sample: the same stable hash as `sample_population`."""
    if rate >= 1:
        return customer_ids
    return customer_ids[customer_bucket(pd.Series(customer_ids)) < rate]


def sample_population(
    population: pd.DataFrame,
    rate: float,
    keep_cutoff: pd.Timestamp | None = None,
    keep_rate: float = 1.0,
) -> pd.DataFrame:
    """Keep a stable `rate` share of customers (the same customers at every cutoff, so a
    customer's rows stay together). Rows at `keep_cutoff` (the test cutoff) are kept at
    `keep_rate` instead (1 = all of them), never below `rate`: the samples are nested by
    the same hash, so rows read for a `keep_rate` sample come out of this unchanged."""
    keep_rate = max(rate, keep_rate)
    if rate >= 1:
        return population
    bucket = customer_bucket(population[CUSTOMER])
    keep = bucket < rate
    if keep_cutoff is not None:
        cut = pd.to_datetime(population[CUTOFF], utc=True)
        keep |= (cut == utc(keep_cutoff)).to_numpy() & (bucket < keep_rate)
    return population.loc[keep]


def booster_params(config: TrainConfig, **override: Any) -> dict[str, Any]:
    params = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "max_depth": config.max_depth,
        "eta": config.learning_rate,
        "min_child_weight": config.min_child_weight,
        "subsample": config.subsample,
        "colsample_bytree": config.colsample_bytree,
        "lambda": config.reg_lambda,
        "max_bin": config.max_bin,
        "nthread": config.nthread,
        "seed": config.seed,
    }
    params.update(override)
    return params


def fit_early_stopped(
    params: dict[str, Any],
    dtrain: xgb.DMatrix,
    dval: xgb.DMatrix,
    config: TrainConfig,
) -> tuple[xgb.Booster, int, float]:
    """Boost until validation log loss stops improving; returns the booster cut at the best
    iteration, the number of trees and the best validation log loss."""
    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=config.max_trees,
        evals=[(dval, "validation")],
        early_stopping_rounds=config.early_stopping_rounds,
        verbose_eval=False,
    )
    n_trees = booster.best_iteration + 1
    return booster[:n_trees], n_trees, float(booster.best_score)


def suggest_params(trial: Any, config: TrainConfig) -> dict[str, Any]:
    """Optuna search space (depth capped so explanations stay within the scoring budget)."""
    return {
        "max_depth": trial.suggest_int("max_depth", 2, config.max_tuned_depth),
        "eta": trial.suggest_float("eta", 0.02, 0.2, log=True),
        "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 50.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.6, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
        "lambda": trial.suggest_float("lambda", 0.1, 10.0, log=True),
    }


def require_optuna() -> Any:
    """Import optuna only when tuning is asked for; it is not a dependency of the package."""
    try:
        import optuna
    except ImportError as exc:
        raise ValueError(
            "--tune needs the optuna package, which is not installed "
            "(pip install optuna); run with --tune 0 to train with the default settings"
        ) from exc
    return optuna


def tune(
    n_trials: int, dtrain: xgb.DMatrix, dval: xgb.DMatrix, config: TrainConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Optuna TPE search minimising early-stopped validation log loss."""
    optuna = require_optuna()
    trials: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        params = booster_params(config, **suggest_params(trial, config))
        _, n_trees, loss = fit_early_stopped(params, dtrain, dval, config)
        trials.append({"trial": trial.number, "n_trees": n_trees, "val_log_loss": loss, **params})
        return loss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=config.seed)
    )
    study.optimize(objective, n_trials=n_trials)
    log.info("tuning: best validation log loss %.5f after %d trials", study.best_value, n_trials)
    return booster_params(config, **study.best_params), trials


# ---------------------------------------------------------------- calibration


def fit_calibrator(kind: str, p: np.ndarray, y: np.ndarray) -> Calibrator:
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(int)
    if kind == "isotonic":
        iso = IsotonicRegression(y_min=1e-4, y_max=1 - 1e-4, out_of_bounds="clip").fit(p, y)
        return Calibrator("isotonic", tuple(iso.X_thresholds_), tuple(iso.y_thresholds_))
    logit = np.log(np.clip(p, 1e-12, 1 - 1e-12) / np.clip(1 - p, 1e-12, 1)).reshape(-1, 1)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit, y)
    return Calibrator("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


def choose_calibrator(
    p: np.ndarray, y: np.ndarray, customers: pd.Series, min_gain: float = 1e-3
) -> tuple[Calibrator | None, dict[str, float]]:
    """Keep a calibrator only if it lowers validation log loss *out of fold* by >= min_gain
    (smaller gains are within the noise of refitting a calibrator on half the rows).

    Fitting and judging a calibrator on the same rows would always favour isotonic, so
    validation customers are split in two halves by a stable hash; each half is calibrated
    by a map fitted on the other. The winner is refitted on all validation rows.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    fold = customer_bucket(customers) < 0.5
    losses = {"none": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]))}
    for kind in ("platt", "isotonic"):
        oof = np.empty_like(p)
        ok = True
        for held in (fold, ~fold):
            if len(np.unique(y[~held])) < 2 or not held.any():
                ok = False
                break
            oof[held] = fit_calibrator(kind, p[~held], y[~held]).apply(p[held])
        if ok:
            losses[kind] = float(log_loss(y, np.clip(oof, 1e-15, 1 - 1e-15), labels=[0, 1]))
    best = min(losses, key=losses.get)
    if best == "none" or losses["none"] - losses[best] < min_gain:
        return None, losses | {"chosen": "none"}
    return fit_calibrator(best, p, y), losses | {"chosen": best}


# ---------------------------------------------------------------- train and evaluate


@dataclass
class TrainResult:
    """Everything the logging, model card and gate need; per-row data stays in memory."""

    plan: SplitPlan
    feature_names: tuple[str, ...]
    params: dict[str, Any]
    n_trees: int
    booster: xgb.Booster | None  # refit on all cutoffs: the registered model (None: estimator)
    prerefit_booster: xgb.Booster | None  # fitted on train only: the measured model
    calibrator: Calibrator | None
    calibration: dict[str, Any]
    test: pd.DataFrame  # test rows: customer_id, label, score columns (never logged)
    metrics: dict[str, float]  # flat, as logged
    grade: evaluate.Grade
    rule: evaluate.RuleBaseline
    reliability: list[dict[str, float]]
    gains: list[dict[str, float]]  # cumulative gain and lift on the test cutoff
    drift_reference: dict[str, dict]  # bins of each feature and of the score, test rows
    risk_bands: list[dict[str, float | str]]  # size and churn rate per RiskLevel band
    importance: list[dict[str, float]]  # mean |SHAP| per feature (refit model, test sample)
    shap_sample: tuple[np.ndarray, np.ndarray]  # (contributions, feature values) for the plot
    split_rows: dict[str, int]
    input_example: pd.DataFrame  # feature medians, not any customer's row
    config: TrainConfig = field(default_factory=TrainConfig)
    tuning_trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # A user's estimator (`evaluate_estimator`) in place of the booster: refit and pre-refit.
    estimator: Any = None
    prerefit_estimator: Any = None

    @property
    def optimistic(self) -> bool:
        return self.plan.optimistic

    @property
    def model_kind(self) -> str:
        """ "xgboost" for the built-in recipe, else the estimator's class name."""
        return "xgboost" if self.estimator is None else type(self.estimator).__name__


def _check_inputs(matrix: pd.DataFrame, rfm: pd.DataFrame, names: tuple[str, ...]) -> None:
    missing = [c for c in (CUSTOMER, CUTOFF, LABEL, *names) if c not in matrix.columns]
    if missing:
        raise ValueError(f"training matrix lacks column(s): {missing}")
    missing = [c for c in baselines.RFM_COLUMNS if c not in rfm.columns]
    if missing:
        raise ValueError(f"RFM frame lacks column(s): {missing}")
    if len(rfm) != len(matrix):
        raise ValueError(f"RFM rows ({len(rfm)}) are not aligned to matrix rows ({len(matrix)})")


def align_rfm(matrix: pd.DataFrame, rfm: pd.DataFrame) -> pd.DataFrame:
    """RFM rows in the matrix's row order (left join on customer and cutoff)."""
    key = [CUSTOMER, CUTOFF]
    left = matrix[key].assign(**{CUTOFF: utc_column(matrix[CUTOFF], "ns")})
    right = rfm.assign(**{CUTOFF: utc_column(rfm[CUTOFF], "ns")})
    cols = [*key, *baselines.RFM_COLUMNS]
    return left.merge(right[cols], on=key, how="left", validate="one_to_one")


class Laps(dict[str, float]):
    """Seconds per named stage, each counted from the end of the one before."""

    def __init__(self) -> None:
        super().__init__()
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self[name], self._last = now - self._last, now


def input_example(train_x: np.ndarray, names: tuple[str, ...]) -> pd.DataFrame:
    """Two made-up rows for the signature: per-feature medians and quartiles of the training
    rows (aggregates, so no customer's own values) under placeholder CustomerIds.

    float64 on purpose: MLflow's signature check refuses float64 -> float32, and JSON
    requests arrive as float64; the request schema then coerces to the logged float32."""
    with np.errstate(all="ignore"):
        q = np.nanquantile(train_x.astype(np.float64), [0.5, 0.75], axis=0)
    q = np.nan_to_num(q, nan=0.0)
    frame = pd.DataFrame(q, columns=list(names))
    frame.insert(0, "CustomerId", ["example-1", "example-2"])
    return frame


def train_and_evaluate(
    matrix: pd.DataFrame,
    feature_names: tuple[str, ...] | list[str],
    rfm: pd.DataFrame,
    window_days: int,
    config: TrainConfig | None = None,
    oracle: pd.Series | None = None,
    n_trials: int = 0,
) -> TrainResult:
    """Split, fit, evaluate on the test cutoff, refit on all cutoffs.

    `rfm` holds recency/frequency/monetary for the same (customer_id, cutoff_time) rows;
    `oracle` (optional, generated data only) is the true churn probability of the test
    rows, indexed by customer_id.
    """
    config = config or TrainConfig()
    names = tuple(feature_names)
    rfm = align_rfm(matrix, rfm)
    _check_inputs(matrix, rfm, names)
    timings = lap = Laps()

    plan, split, x, y, masks, split_rows = _split_arrays(matrix, names, window_days)

    dtrain = xgb.QuantileDMatrix(
        x[masks[TRAIN]], y[masks[TRAIN]], max_bin=config.max_bin, nthread=config.nthread
    )
    dval = xgb.DMatrix(x[masks[VALIDATION]], y[masks[VALIDATION]], nthread=config.nthread)
    trials: list[dict[str, Any]] = []
    if n_trials > 0:
        params, trials = tune(n_trials, dtrain, dval, config)
    else:
        params = booster_params(config)
    prerefit, n_trees, val_loss = fit_early_stopped(params, dtrain, dval, config)
    lap("fit_seconds")
    log.info("early stopping: %d trees, validation log loss %.5f", n_trees, val_loss)

    def raw_p(booster: xgb.Booster, rows: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(x[rows]).astype(np.float64)

    measured = _measure(
        matrix, rfm, y, masks, window_days, config, oracle, lambda rows: raw_p(prerefit, rows)
    )
    measured.calibration["validation_log_loss_early_stopping"] = val_loss
    lap("evaluate_seconds")

    # Refit on every cutoff with the chosen settings and tree count.
    refit_rows = refit_mask(pd.Series(split))
    dall = xgb.QuantileDMatrix(
        x[refit_rows], y[refit_rows], max_bin=config.max_bin, nthread=config.nthread
    )
    booster = xgb.train(params, dall, num_boost_round=n_trees)
    _add_refit(measured, measured.served(raw_p(booster, masks[TEST])))
    lap("refit_seconds")

    # What the served model's inputs and outputs looked like out of sample: drift's baseline.
    test = measured.test
    reference = drift.references(x[masks[TEST]], names, test["refit"].to_numpy())
    contrib, shap_x, importance = _shap_summary(booster, x[masks[TEST]], names, config.seed)
    lap("shap_seconds")
    return measured.result(
        plan=plan,
        feature_names=names,
        params=params,
        n_trees=n_trees,
        booster=booster,
        prerefit_booster=prerefit,
        drift_reference=reference,
        importance=importance,
        shap_sample=(contrib, shap_x),
        split_rows=split_rows,
        input_example=input_example(x[masks[TRAIN]], names),
        tuning_trials=trials,
        seconds=dict(timings),
        config=config,
    )


@dataclass
class _Measured:
    """The test-cutoff evaluation of a pre-refit model, shared by the built-in recipe and a
    user's estimator so that both are measured by the very same code."""

    calibrator: Calibrator | None
    calibration: dict[str, Any]
    test: pd.DataFrame
    metrics: dict[str, float]
    rule: evaluate.RuleBaseline
    grade: evaluate.Grade

    def served(self, p: np.ndarray) -> np.ndarray:
        return self.calibrator.apply(p) if self.calibrator else p

    def result(self, **rest: Any) -> TrainResult:
        y_test, p = self.test[LABEL].to_numpy(), self.test["model"].to_numpy()
        return TrainResult(
            calibrator=self.calibrator,
            calibration=self.calibration,
            test=self.test,
            metrics=self.metrics,
            grade=self.grade,
            rule=self.rule,
            reliability=evaluate.reliability_curve(y_test, p),
            gains=evaluate.cumulative_gains(y_test, p),
            risk_bands=evaluate.risk_band_rates(y_test, p),
            **rest,
        )


def _split_arrays(
    matrix: pd.DataFrame, names: tuple[str, ...], window_days: int
) -> tuple[SplitPlan, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """The out-of-time plan, each row's split, X (float32, NaN kept), y and the row masks;
    every split must hold both classes."""
    cutoffs = sorted(pd.to_datetime(matrix[CUTOFF], utc=True).unique())
    plan = plan_splits(list(cutoffs), window_days)
    if plan.optimistic:
        log.warning("evaluation is optimistic: %s", plan.reason)
    split = assign_splits(matrix, plan).to_numpy()
    x = matrix.loc[:, list(names)].to_numpy(dtype=np.float32, na_value=np.nan)
    y = matrix[LABEL].to_numpy().astype(np.int8)
    masks = {s: split == s for s in (TRAIN, VALIDATION, TEST)}
    split_rows = {s: int(m.sum()) for s, m in masks.items()}
    for s, n in split_rows.items():
        if n == 0 or len(np.unique(y[masks[s]])) < 2:
            raise ValueError(
                f"the {s} split has {n} rows and needs both churned and retained customers "
                f"({plan.reason})"
            )
    return plan, split, x, y, masks, split_rows


def _measure(
    matrix: pd.DataFrame,
    rfm: pd.DataFrame,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
    window_days: int,
    config: TrainConfig,
    oracle: pd.Series | None,
    raw_p: Any,
) -> _Measured:
    """Calibrator choice on the validation cutoff, then metrics, baselines, intervals and the
    CI-D grade on the test cutoff; `raw_p(rows)` is the pre-refit model's raw probability."""
    val_p = raw_p(masks[VALIDATION])
    val_customers = matrix.loc[masks[VALIDATION], CUSTOMER]
    calibrator, calibration = choose_calibrator(val_p, y[masks[VALIDATION]], val_customers)

    def served_p(rows: np.ndarray) -> np.ndarray:
        p = raw_p(rows)
        return calibrator.apply(p) if calibrator else p

    # Baselines: RFM logistic fitted on the training split only, scored on test.
    rfm_model = baselines.fit_rfm_logistic(rfm.loc[masks[TRAIN]], y[masks[TRAIN]])
    test_rfm = rfm.loc[masks[TEST]]
    y_test = y[masks[TEST]]
    test = pd.DataFrame(
        {
            CUSTOMER: matrix.loc[masks[TEST], CUSTOMER].to_numpy(),
            LABEL: y_test,
            "model": served_p(masks[TEST]),
            "model_raw": raw_p(masks[TEST]),
            "rfm_logistic": rfm_model.predict(test_rfm),
            "recency": baselines.recency_score(test_rfm),
        }
    )
    metrics = _test_metrics(test, window_days, config, oracle)
    metrics["test_purchases_per_customer"] = float(
        test_rfm[baselines.FREQUENCY].astype("float64").fillna(0.0).mean()
    )
    rule = evaluate.ci_d_rule_baseline(y_test, test["recency"].to_numpy(), window_days)
    grade = evaluate.ci_d_grade(y_test, test["model"].to_numpy(), rule.churn_recall)
    if "oracle_churn_recall" in metrics:
        # What the true churn probability itself would be graded against the same rule:
        # the grade's attainable ceiling on this data (generated data only).
        improvement = metrics["oracle_churn_recall"] / rule.churn_recall - 1
        metrics["oracle_grade"] = float(
            "ABC".index(evaluate.grade_letter(metrics["oracle_accuracy"], improvement))
        )
    metrics |= {
        "ci_d_rule_span_days": float(rule.span_days),
        "ci_d_rule_churn_recall": rule.churn_recall,
        "ci_d_rule_accuracy": rule.accuracy,
        "grade_improvement": grade.improvement,
        "validation_log_loss_raw": calibration["none"],
    }
    return _Measured(calibrator, calibration, test, metrics, rule, grade)


def _add_refit(measured: _Measured, refit_p: np.ndarray) -> None:
    """The registered (refit) model's test-cutoff scores: in sample, reported beside."""
    measured.test["refit"] = refit_p
    refit = evaluate.binary_metrics(measured.test[LABEL].to_numpy(), refit_p)
    measured.metrics |= {f"refit_insample_test_{k}": v for k, v in refit.items() if k != "rows"}


def check_estimator(estimator: Any) -> None:
    """A user's estimator must look like a scikit-learn classifier; says what is missing."""
    missing = [m for m in ("fit", "predict_proba", "get_params") if not hasattr(estimator, m)]
    if missing:
        raise ValueError(
            f"{type(estimator).__name__} is not a scikit-learn-compatible classifier "
            f"(no {', '.join(missing)})"
        )


def _fit_estimator(estimator: Any, x: np.ndarray, y: np.ndarray) -> Any:
    """A fresh clone of `estimator` fitted on (x, y); a missing-value refusal is explained."""
    from sklearn.base import clone

    try:
        return clone(estimator).fit(x, y)
    except ValueError as exc:
        if "NaN" in str(exc):
            raise ValueError(
                f"{type(estimator).__name__} cannot take missing feature values (features "
                "are NaN where a customer has no such events); use an estimator that "
                "accepts NaN or a Pipeline with a SimpleImputer"
            ) from exc
        raise


def estimator_params(estimator: Any) -> dict[str, Any]:
    """The estimator's class and shallow parameters, as loggable strings."""
    params = {"estimator": f"{type(estimator).__module__}.{type(estimator).__name__}"}
    for key, value in estimator.get_params(deep=False).items():
        params[key] = value if isinstance(value, int | float | str | bool | None) else repr(value)
    return params


def evaluate_estimator(
    matrix: pd.DataFrame,
    feature_names: tuple[str, ...] | list[str],
    rfm: pd.DataFrame,
    window_days: int,
    estimator: Any,
    config: TrainConfig | None = None,
    oracle: pd.Series | None = None,
) -> TrainResult:
    """`train_and_evaluate` for a user's scikit-learn-compatible classifier.

    The same splits, calibrator choice, metrics, intervals, baselines and grade: a clone is
    fitted on the training cutoffs (it gets no validation set: early stopping, if any, is
    its own business), measured on the test cutoff, then a clone is refitted on every
    cutoff and registered. No per-customer contributions (importance stays empty).
    """
    check_estimator(estimator)
    config = config or TrainConfig()
    names = tuple(feature_names)
    rfm = align_rfm(matrix, rfm)
    _check_inputs(matrix, rfm, names)
    # The booster's thread budget (config.nthread) for the estimator's OpenMP/BLAS pools too:
    # an unlimited pool oversubscribes cores that other jobs share.
    with threadpool_limits(limits=config.nthread):
        return _evaluate_estimator(matrix, names, rfm, window_days, estimator, config, oracle)


def _evaluate_estimator(
    matrix: pd.DataFrame,
    names: tuple[str, ...],
    rfm: pd.DataFrame,
    window_days: int,
    estimator: Any,
    config: TrainConfig,
    oracle: pd.Series | None,
) -> TrainResult:
    timings = lap = Laps()

    plan, split, x, y, masks, split_rows = _split_arrays(matrix, names, window_days)
    prerefit = _fit_estimator(estimator, x[masks[TRAIN]], y[masks[TRAIN]])
    lap("fit_seconds")
    measured = _measure(
        matrix,
        rfm,
        y,
        masks,
        window_days,
        config,
        oracle,
        lambda rows: positive_proba(prerefit, x[rows]),
    )
    lap("evaluate_seconds")
    refit_rows = refit_mask(pd.Series(split))
    model = _fit_estimator(estimator, x[refit_rows], y[refit_rows])
    _add_refit(measured, measured.served(positive_proba(model, x[masks[TEST]])))
    lap("refit_seconds")
    reference = drift.references(x[masks[TEST]], names, measured.test["refit"].to_numpy())
    empty = np.zeros((0, len(names)), dtype=np.float32)
    return measured.result(
        plan=plan,
        feature_names=names,
        params=estimator_params(estimator),
        n_trees=0,
        booster=None,
        prerefit_booster=None,
        drift_reference=reference,
        importance=[],
        shap_sample=(empty, empty),
        split_rows=split_rows,
        input_example=input_example(x[masks[TRAIN]], names),
        seconds=dict(timings),
        config=config,
        estimator=model,
        prerefit_estimator=prerefit,
    )


def fit_estimator_recipe(
    matrix: pd.DataFrame,
    feature_names: tuple[str, ...],
    plan: SplitPlan,
    estimator: Any,
    calibrator_kind: str | None,
    nthread: int = 2,
) -> pd.Series:
    """`fit_recipe` for a champion that is a user's estimator: a clone of it (same class and
    parameters) fitted on the training cutoffs, its calibrator kind on the validation one."""
    split = assign_splits(matrix, plan).to_numpy()
    x = matrix.loc[:, list(feature_names)].to_numpy(dtype=np.float32, na_value=np.nan)
    y = matrix[LABEL].to_numpy().astype(np.int8)
    train, val, test = (split == s for s in (TRAIN, VALIDATION, TEST))
    with threadpool_limits(limits=nthread):
        model = _fit_estimator(estimator, x[train], y[train])
    p = positive_proba(model, x[test])
    if calibrator_kind not in (None, "none"):
        p = fit_calibrator(calibrator_kind, positive_proba(model, x[val]), y[val]).apply(p)
    return pd.Series(p, index=matrix.loc[test, CUSTOMER].to_numpy())


def fit_recipe(
    matrix: pd.DataFrame,
    feature_names: tuple[str, ...],
    plan: SplitPlan,
    params: dict[str, Any],
    n_trees: int,
    calibrator_kind: str | None,
) -> pd.Series:
    """A stored recipe fitted as `train_and_evaluate` fits its pre-refit model: the booster
    on the training cutoffs of `matrix` with the recipe's parameters and tree count, the
    recipe's calibrator kind (if any) fitted on the validation cutoff. Returns the served
    scores of the test-cutoff rows, indexed by customer_id (the gate's recipe comparison)."""
    split = assign_splits(matrix, plan).to_numpy()
    x = matrix.loc[:, list(feature_names)].to_numpy(dtype=np.float32, na_value=np.nan)
    y = matrix[LABEL].to_numpy().astype(np.int8)
    train, val, test = (split == s for s in (TRAIN, VALIDATION, TEST))
    dtrain = xgb.QuantileDMatrix(x[train], y[train], max_bin=int(params.get("max_bin", 256)))
    booster = xgb.train(params, dtrain, num_boost_round=int(n_trees))
    p = booster.inplace_predict(x[test]).astype(np.float64)
    if calibrator_kind not in (None, "none"):
        raw_val = booster.inplace_predict(x[val]).astype(np.float64)
        p = fit_calibrator(calibrator_kind, raw_val, y[val]).apply(p)
    return pd.Series(p, index=matrix.loc[test, CUSTOMER].to_numpy())


def _test_metrics(
    test: pd.DataFrame, window_days: int, config: TrainConfig, oracle: pd.Series | None
) -> dict[str, float]:
    """Model (pre-refit), baselines, intervals and oracle figures on the test rows."""
    y = test[LABEL].to_numpy()
    model, rfm = test["model"].to_numpy(), test["rfm_logistic"].to_numpy()
    metrics = {f"test_{k}": v for k, v in evaluate.binary_metrics(y, model).items()}
    metrics |= {
        f"rfm_logistic_{k}": v
        for k, v in evaluate.binary_metrics(y, rfm).items()
        if k not in ("rows", "churn_rate")
    }
    metrics |= {f"recency_{k}": v for k, v in evaluate.ranking_metrics(y, test["recency"]).items()}
    cis = evaluate.bootstrap_intervals(
        y, model, rfm, resamples=config.bootstrap_resamples, seed=config.seed
    )
    metrics |= {f"test_{k}": v for k, v in cis.items()}
    if oracle is None:
        return metrics
    # Generated data only: the true churn probability; compared on the rows it covers.
    oracle_p = test[CUSTOMER].map(oracle).to_numpy(dtype=np.float64)
    keep = ~np.isnan(oracle_p)
    if (~keep).any():
        log.warning("oracle: %d of %d test rows have no oracle probability", (~keep).sum(), len(y))
    if keep.sum() == 0 or len(np.unique(y[keep])) < 2:
        log.warning("oracle: too few covered test rows; oracle metrics skipped")
        return metrics
    metrics |= {
        f"oracle_{k}": v for k, v in evaluate.binary_metrics(y[keep], oracle_p[keep]).items()
    }
    cis = evaluate.bootstrap_intervals(
        y[keep],
        model[keep],
        rfm[keep],
        oracle_p[keep],
        resamples=config.bootstrap_resamples,
        seed=config.seed,
    )
    for k, v in cis.items():  # oracle_roc_auc*, test_roc_auc_over_oracle*, ..._headroom_closed*
        if k.startswith("oracle_"):
            metrics[k] = v
        elif "over_oracle" in k or "headroom" in k:
            metrics[f"test_{k}"] = v
    return metrics


def _shap_summary(
    booster: xgb.Booster, x: np.ndarray, names: tuple[str, ...], seed: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Exact TreeSHAP on a sample of test rows: the model-wide influential factors."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(SHAP_SAMPLE_ROWS, len(x)), replace=False)
    xs = x[np.sort(rows)]
    contrib = booster.predict(xgb.DMatrix(xs, missing=np.nan), pred_contribs=True)[:, :-1]
    mean_abs = np.abs(contrib).mean(axis=0)
    order = np.argsort(-mean_abs)
    importance = [
        {"feature": names[j], "mean_abs_shap": float(mean_abs[j]), "rank": r + 1}
        for r, j in enumerate(order)
    ]
    return contrib, xs, importance
