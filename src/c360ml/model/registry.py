"""MLflow: log a training run, register the model, and move the champion alias.

Every new version gets the alias `challenger`; `champion` moves when the gate (`gate`)
passes it, or on `approve` when approval is required, and back on `rollback`. Decisions,
reasons, approvals and rollbacks are tags on the versions; each champion records the
version it replaced (`previous_champion`), so a rollback needs no target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
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
from c360ml import glossary
from c360ml.model import gate, report
from c360ml.model.pyfunc import BUNDLE_ARTIFACT, ChurnModel
from c360ml.model.scoring import ModelBundle, Thresholds, score
from c360ml.model.train import TrainResult

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
    test_sample_rate: float = 1.0,
) -> ModelBundle:
    """What travels with the model: booster, features, thresholds, churn config, metrics,
    and the profile of its training data that the next gate checks against."""
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
        estimator=result.estimator,
        feature_names=result.feature_names,
        feature_dtypes={n: str(feature_dtypes.get(n, "float32")) for n in result.feature_names},
        thresholds=Thresholds(),
        calibrator=result.calibrator,
        feature_set_json=feature_set_json,
        feature_labels=glossary.describe_all(result.feature_names),
        metadata={
            "trained_as_of": str(pd.Timestamp(trained_as_of)),
            "churn_config": churn_config,
            "test_cutoff": str(result.plan.test_cutoff),
            "evaluation": "optimistic" if result.optimistic else "out_of_time",
            "metrics_measured_on": "pre-refit model",
            "test_metrics": {k: result.metrics[k] for k in headline if k in result.metrics},
            "grade": result.grade.grade,
            "training_data": gate.DataProfile.measured(result, test_sample_rate).to_dict(),
            "drift_reference": result.drift_reference,
            "top_features": [r["feature"] for r in result.importance[:10]],
            "n_trees": result.n_trees,
            "params": result.params,
            "model_kind": result.model_kind,
            "explanations": explanations(result),
            **code_version(),
        },
    )


def explanations(result: TrainResult) -> str:
    """What InfluentialFactors the model gives (said on the version, the card and scores)."""
    if result.estimator is None:
        return "signed SHAP contributions of the XGBoost booster (top 5)"
    return f"none: {result.model_kind} has no per-customer contributions"


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
    prefix = "xgb" if result.estimator is None else "estimator"
    mlflow.log_params({f"{prefix}_{k}": _param(v) for k, v in result.params.items()})
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
            "model_kind": result.model_kind,
            "explanations": explanations(result),
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
            "gains.json": result.gains,
            "risk_bands.json": result.risk_bands,
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
            pip_requirements=_requirements(result.estimator is not None),
        )
    version_ = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(model_name, CHALLENGER, version_)
    for key, value in {
        "trained_as_of": bundle.metadata["trained_as_of"],
        "grade": result.grade.grade,
        "model_kind": result.model_kind,
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


def _requirements(estimator: bool = False) -> list[str]:
    """Pinned runtime requirements of the pyfunc (c360ml itself must be installed too; a
    user's estimator also needs its own package, which scikit-learn stands for here)."""
    reqs = []
    dists = ("xgboost-cpu", "pandas", "numpy", "pandera", "mlflow")
    for dist in (*dists, "scikit-learn") if estimator else dists:
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


# ---------------------------------------------------------------- champion alias


def champion_version(client: MlflowClient, model_name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def mark_interrupted(client: MlflowClient, model_name: str) -> list[str]:
    """Versions an earlier training registered but never gated (it was killed between the
    two): tagged `gate_decision: interrupted`, their runs ended as FAILED, so that no one
    mistakes them for a challenger that was judged. Returns their version numbers."""
    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []
    marked = []
    for mv in versions:
        if "gate_decision" in mv.tags:
            continue
        _set_tags(
            client,
            model_name,
            mv.version,
            {"gate_decision": "interrupted", "gate_reason": "the training stopped before the gate"},
        )
        if mv.run_id and client.get_run(mv.run_id).info.status == "RUNNING":
            client.set_terminated(mv.run_id, status="FAILED")
        marked.append(str(mv.version))
    if marked:
        log.warning("%s: versions %s were never gated; tagged as interrupted", model_name, marked)
    return marked


def load_bundle(model_uri: str) -> ModelBundle:
    """The bundle inside a registered pyfunc (loaded through MLflow, as serving would)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().bundle


def _set_tags(client: MlflowClient, model_name: str, version_: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version_, key, value)


def _move_champion(client: MlflowClient, model_name: str, version_: str) -> str | None:
    """Point `champion` at a version; the version records which one it replaced, so a
    rollback without a target knows where to go back to."""
    current = champion_version(client, model_name)
    previous = None if current is None else str(current.version)
    client.set_registered_model_alias(model_name, CHAMPION, version_)
    if previous is not None and previous != version_:
        client.set_model_version_tag(model_name, version_, "previous_champion", previous)
    return previous


def record_gate(
    model_name: str, version_: str, decision: gate.GateDecision, require_approval: bool
) -> gate.GateDecision:
    """Tag the version with the decision and move `champion` if it passed (or, with approval
    required, leave it as `challenger` until `approve`)."""
    client = MlflowClient()
    if decision.promote and require_approval:
        decision = dataclasses.replace(decision, awaiting_approval=True)
    elif decision.promote:
        _move_champion(client, model_name, version_)
    tags = {"gate_decision": decision.label, "gate_reason": decision.reason[:5000]}
    tags["gate_path"] = decision.path
    if decision.champion_version:
        tags["gate_champion_version"] = decision.champion_version
    if decision.comparison is not None:
        for who in ("challenger", "champion"):
            for key, value in getattr(decision.comparison, who).items():
                tags[f"gate_{who}_{key}"] = f"{value:.4f}"
    _set_tags(client, model_name, version_, tags)
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)
    log.info("gate: version %s %s: %s", version_, decision.label, decision.reason)
    return decision


@dataclass(frozen=True)
class AliasMove:
    """What `rollback` or `approve` did, for the CLI."""

    model_name: str
    champion: str
    replaced: str | None
    reason: str


def rollback(
    tracking_uri: str, model_name: str, to: str | None = None, reason: str = ""
) -> AliasMove:
    """Move `champion` back: to `to`, or to the version the current champion replaced."""
    client = MlflowClient(tracking_uri, tracking_uri)
    current = champion_version(client, model_name)
    if current is None:
        raise ValueError(f"model {model_name} has no champion to roll back")
    current_v = str(current.version)
    target = to or current.tags.get("previous_champion")
    if not target:
        raise ValueError(
            f"{model_name} v{current_v} records no earlier champion; pass --to VERSION"
        )
    _version(client, model_name, target)
    if target == current_v:
        raise ValueError(f"{model_name} v{target} is already the champion")
    reason = reason or "manual rollback"
    client.set_registered_model_alias(model_name, CHAMPION, target)
    _set_tags(
        client,
        model_name,
        current_v,
        {"rolled_back": "true", "rollback_reason": reason, "rolled_back_to": target},
    )
    client.set_model_version_tag(model_name, target, "restored_by_rollback_from", current_v)
    log.info("rollback: %s champion v%s -> v%s (%s)", model_name, current_v, target, reason)
    return AliasMove(model_name, target, current_v, reason)


def approve(
    tracking_uri: str, model_name: str, version_: str, reason: str = "", force: bool = False
) -> AliasMove:
    """Make a version that passed the gate and awaits approval the champion. `force`
    approves a version the gate refused (the refusal stays in its tags)."""
    client = MlflowClient(tracking_uri, tracking_uri)
    mv = _version(client, model_name, version_)
    decision = mv.tags.get("gate_decision", "")
    if decision != "awaiting approval" and not force:
        raise ValueError(
            f"{model_name} v{version_} is not awaiting approval (gate: {decision or 'not run'}"
            f"; {mv.tags.get('gate_reason', '')}); use --force to approve it anyway"
        )
    reason = reason or ("approved" if not force else "approved against the gate's decision")
    replaced = _move_champion(client, model_name, str(version_))
    _set_tags(client, model_name, str(version_), {"approval": reason})
    if decision == "awaiting approval":
        client.set_model_version_tag(model_name, str(version_), "gate_decision", "approved")
    log.info("approve: %s v%s is champion (%s)", model_name, version_, reason)
    return AliasMove(model_name, str(version_), replaced, reason)


def _version(client: MlflowClient, model_name: str, version_: str) -> Any:
    try:
        return client.get_model_version(model_name, str(version_))
    except MlflowException:
        raise ValueError(f"model {model_name} has no version {version_}") from None
