"""MLflow: log a training run, register the model, and gate the champion alias.

Every new version gets the alias `challenger`. The gate scores the current `champion`
with its own carried feature set on the new test cutoff and moves `champion` only when
the challenger is at least as good (ROC AUC and PR AUC, ties within 0.001 go to the newer
model) and its grade is not C. A champion whose training labels reach past the new test
cutoff has seen those outcomes, so it cannot be compared fairly: then the challenger must
beat the RFM logistic baseline with the bootstrap interval of the ROC AUC difference above
zero instead. The decision and its reason are tags on the version.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import c360ml
from c360ml.model import evaluate, report
from c360ml.model.pyfunc import BUNDLE_ARTIFACT, ChurnModel
from c360ml.model.scoring import CUSTOMER_ID, ModelBundle, Thresholds, score
from c360ml.model.train import CUSTOMER, LABEL, TrainResult

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"  # name of the logged pyfunc inside the run


def code_version() -> dict[str, str]:
    """Package version and git commit (with "-dirty" for uncommitted changes), if any."""
    info = {"package_version": c360ml.__version__}
    here = Path(c360ml.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if sha:
            info["git_sha"] = sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def use_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists.

    With the embedded default store, artifacts go to `artifact_root` (data/mlflow/artifacts)
    instead of MLflow's ./mlruns in whatever folder the command ran from.
    """
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if artifact_root is not None:
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = artifact_root.resolve().as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def build_bundle(
    result: TrainResult,
    feature_dtypes: dict[str, str],
    feature_set_json: str | None,
    churn_config: dict[str, Any],
    trained_as_of: pd.Timestamp,
) -> ModelBundle:
    """What travels with the model: booster, features, thresholds, churn config, metrics."""
    headline = (
        "test_roc_auc",
        "test_pr_auc",
        "test_log_loss",
        "test_brier",
        "test_accuracy",
        "test_churn_recall",
        "test_roc_auc_minus_rfm_ci_low",
    )
    return ModelBundle(
        booster=result.booster,
        feature_names=result.feature_names,
        feature_dtypes={n: str(feature_dtypes.get(n, "float32")) for n in result.feature_names},
        thresholds=Thresholds(),
        calibrator=result.calibrator,
        feature_set_json=feature_set_json,
        metadata={
            "trained_as_of": str(pd.Timestamp(trained_as_of)),
            "churn_config": churn_config,
            "test_cutoff": str(result.plan.test_cutoff),
            "evaluation": "optimistic" if result.optimistic else "out_of_time",
            "metrics_measured_on": "pre-refit model",
            "test_metrics": {k: result.metrics[k] for k in headline if k in result.metrics},
            "grade": result.grade.grade,
            "n_trees": result.n_trees,
            "params": result.params,
            **code_version(),
        },
    )


@dataclass(frozen=True)
class LoggedVersion:
    run_id: str
    version: str
    model_uri: str


def log_training(
    result: TrainResult,
    bundle: ModelBundle,
    model_name: str,
    params: dict[str, Any],
    extra_artifacts: dict[str, Any] | None = None,
    oracle: pd.Series | None = None,
) -> LoggedVersion:
    """One MLflow run: params, metrics, plots, tables, the pyfunc model, a new version.

    Must be called inside `mlflow.start_run()`; the caller adds the card after the gate.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_training needs an active MLflow run")
    mlflow.log_params({k: _param(v) for k, v in params.items()})
    mlflow.log_params({f"xgb_{k}": _param(v) for k, v in result.params.items()})
    mlflow.log_params({"n_trees": result.n_trees, "calibrator": result.calibration["chosen"]})
    mlflow.log_metrics({k: float(v) for k, v in result.metrics.items() if np.isfinite(v)})
    mlflow.set_tags(
        {
            "evaluation": "optimistic" if result.optimistic else "out_of_time",
            "evaluation_reason": result.plan.reason,
            "metrics_measured_on": "pre-refit model (fitted on training cutoffs only); "
            "refit_insample_test_* = registered (refit) model on the test cutoff, in sample",
            "grade": result.grade.grade,
            "grade_reason": result.grade.reason(),
            "trained_as_of": bundle.metadata["trained_as_of"],
            **{k: v for k, v in bundle.metadata.items() if k in ("git_sha", "package_version")},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report.write_plots(result, folder / "plots", oracle)
        mlflow.log_artifacts(str(folder / "plots"), "plots")
        tables = {
            "splits.json": result.plan.to_dict() | {"rows": result.split_rows},
            "reliability.json": result.reliability,
            "importance.json": result.importance,
            "ci_d_rule_baseline.json": result.rule.by_span,
            "calibration.json": result.calibration,
            "tuning_trials.json": result.tuning_trials,
            **(extra_artifacts or {}),
        }
        for name, content in tables.items():
            (folder / name).write_text(json.dumps(content, indent=1, default=str))
            mlflow.log_artifact(str(folder / name), "evaluation")
        bundle_dir = bundle.save(folder / "bundle")
        example = result.input_example
        output = score(bundle, example)
        signature = infer_signature(example, output, params={"explain": "approx"})
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=ChurnModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            signature=signature,
            input_example=example,
            registered_model_name=model_name,
            pip_requirements=_requirements(),
        )
    version_ = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(model_name, CHALLENGER, version_)
    for key, value in {
        "trained_as_of": bundle.metadata["trained_as_of"],
        "grade": result.grade.grade,
        "evaluation": "optimistic" if result.optimistic else "out_of_time",
        "test_roc_auc": f"{result.metrics['test_roc_auc']:.4f}",
        "test_pr_auc": f"{result.metrics['test_pr_auc']:.4f}",
    }.items():
        client.set_model_version_tag(model_name, version_, key, value)
    log.info("registered %s version %s (run %s)", model_name, version_, run.info.run_id)
    return LoggedVersion(run.info.run_id, version_, f"models:/{model_name}/{version_}")


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:5000]


def _requirements() -> list[str]:
    """Pinned runtime requirements of the pyfunc (c360ml itself must be installed too)."""
    reqs = []
    for dist in ("xgboost-cpu", "pandas", "numpy", "pandera", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


# ---------------------------------------------------------------- gate


@dataclass(frozen=True)
class GateInput:
    """The figures the decision uses, for one model on the new test cutoff."""

    roc_auc: float
    pr_auc: float
    grade: str | None = None
    roc_auc_minus_rfm_ci_low: float | None = None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    comparable: bool | None  # None: there was no champion
    champion_version: str | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "not promoted"


def decide(
    challenger: GateInput, champion: GateInput | None, comparable: bool = True
) -> GateDecision:
    """The promotion rule (pure, so it can be tested on numbers)."""
    if champion is None:
        note = "" if challenger.grade != "C" else " (warning: grade C)"
        return GateDecision(True, f"no champion yet: challenger becomes champion{note}", None)
    if not comparable:
        why = "champion not comparable (its labels overlap the new test window)"
        low = challenger.roc_auc_minus_rfm_ci_low
        beats_rfm = low is not None and low > 0
        if challenger.grade == "C":
            return GateDecision(False, f"{why}; challenger has grade C", False)
        if beats_rfm:
            return GateDecision(
                True,
                f"{why}; challenger beats the RFM baseline (ROC AUC difference interval low "
                f"{low:.4f} > 0) and has grade {challenger.grade}",
                False,
            )
        return GateDecision(
            False,
            f"{why}; challenger does not beat the RFM baseline with an interval above 0",
            False,
        )
    if challenger.grade == "C":
        return GateDecision(False, "challenger has grade C", True)
    tol = evaluate.TIE_TOLERANCE
    ok_roc = challenger.roc_auc >= champion.roc_auc - tol
    ok_pr = challenger.pr_auc >= champion.pr_auc - tol
    figures = (
        f"ROC AUC {challenger.roc_auc:.4f} vs {champion.roc_auc:.4f}, "
        f"PR AUC {challenger.pr_auc:.4f} vs {champion.pr_auc:.4f} on the new test cutoff"
    )
    if ok_roc and ok_pr:
        return GateDecision(True, f"challenger at least as good: {figures}", True)
    return GateDecision(False, f"champion better: {figures}", True)


def champion_version(client: MlflowClient, model_name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def load_bundle(model_uri: str) -> ModelBundle:
    """The bundle inside a registered pyfunc (loaded through MLflow, as serving would)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().bundle


def score_on_test(
    bundle: ModelBundle, features: pd.DataFrame, labels: pd.DataFrame
) -> dict[str, float]:
    """ROC and PR AUC of a bundle on labelled test rows (features keyed by customer_id)."""
    frame = features.rename(columns={CUSTOMER: CUSTOMER_ID})
    frame = frame.loc[:, [CUSTOMER_ID, *bundle.feature_names]]
    scored = score(bundle, frame, explain="none")
    joined = labels[[CUSTOMER, LABEL]].merge(
        scored.rename(columns={CUSTOMER_ID: CUSTOMER}), on=CUSTOMER, how="inner"
    )
    if len(joined) != len(labels):
        raise ValueError(f"champion scored {len(joined)} of {len(labels)} test rows")
    y, p = joined[LABEL].to_numpy(), joined["ChurnScore"].to_numpy()
    return {k: v for k, v in evaluate.binary_metrics(y, p).items() if k in ("roc_auc", "pr_auc")}


def run_gate(
    model_name: str,
    version_: str,
    result: TrainResult,
    compute_matrix: Callable[[ModelBundle], pd.DataFrame],
) -> GateDecision:
    """Compare the new version with the champion on the new test cutoff; move aliases.

    `compute_matrix(bundle)` returns the champion's features (customer_id + its feature
    names) for the test population; the caller reuses the new matrix when the champion's
    features are among its columns and recomputes from the carried FeatureSet otherwise.
    """
    client = MlflowClient()
    challenger = GateInput(
        roc_auc=result.metrics["test_roc_auc"],
        pr_auc=result.metrics["test_pr_auc"],
        grade=result.grade.grade,
        roc_auc_minus_rfm_ci_low=result.metrics.get("test_roc_auc_minus_rfm_ci_low"),
    )
    current = champion_version(client, model_name)
    if current is None:
        decision = decide(challenger, None)
    else:
        decision = _against_champion(model_name, current, challenger, result, compute_matrix)
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION, version_)
    tags = {"gate_decision": decision.label, "gate_reason": decision.reason}
    if decision.champion_version:
        tags["gate_champion_version"] = decision.champion_version
    for key, value in decision.champion_metrics.items():
        tags[f"gate_champion_{key}"] = f"{value:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version_, key, value)
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)
    log.info("gate: version %s %s: %s", version_, decision.label, decision.reason)
    return decision


def _against_champion(
    model_name: str,
    current: Any,
    challenger: GateInput,
    result: TrainResult,
    compute_matrix: Callable[[ModelBundle], pd.DataFrame],
) -> GateDecision:
    champ_version = str(current.version)
    bundle = load_bundle(f"models:/{model_name}/{champ_version}")
    test_cutoff = pd.Timestamp(result.plan.test_cutoff)
    trained = bundle.trained_as_of
    if trained is not None and _utc(trained) > _utc(test_cutoff):
        decision = decide(challenger, GateInput(float("nan"), float("nan")), comparable=False)
        reason = (
            f"{decision.reason} (champion v{champ_version} trained as of {trained.date()}, "
            f"after the new test cutoff {test_cutoff.date()})"
        )
        return GateDecision(decision.promote, reason, False, champ_version)
    labels = result.test[[CUSTOMER, LABEL]]
    try:
        metrics = score_on_test(bundle, compute_matrix(bundle), labels)
    except (ValueError, KeyError) as exc:
        log.warning("gate: champion v%s cannot be scored: %s", champ_version, exc)
        decision = decide(challenger, GateInput(float("nan"), float("nan")), comparable=False)
        reason = f"champion v{champ_version} could not be scored ({exc}); {decision.reason}"
        return GateDecision(decision.promote, reason, False, champ_version)
    decision = decide(challenger, GateInput(metrics["roc_auc"], metrics["pr_auc"]))
    return GateDecision(
        decision.promote,
        f"{decision.reason} (champion v{champ_version})",
        True,
        champ_version,
        metrics,
    )


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
