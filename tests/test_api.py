"""The notebook API (`c360ml.open`): the same figures as `c360ml train`, a user's estimator
through the gate and the scorers, and MLflow stores that stay apart within one process."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.ensemble import HistGradientBoostingClassifier

import c360ml
from c360ml.api import Evaluation, Project, mlflow_store
from c360ml.model import baselines
from c360ml.model.pipeline import run_training
from c360ml.model.scoring import ModelBundle, score
from c360ml.model.train import TrainConfig
from tests.conftest import own_outputs

ROOT = Path(__file__).resolve().parents[1]
AS_OF = "2025-12-31"
CONFIG = TrainConfig(nthread=1, bootstrap_resamples=40)


@pytest.fixture(scope="module")
def lake(tmp_path_factory, shared_lake):
    """The shared generated lake of 1,500 persons, 7 monthly cutoffs (the fewest for an
    honest out-of-time split), its own MLflow store."""
    tmp = tmp_path_factory.mktemp("api")
    settings = own_outputs(shared_lake, tmp)
    spec = yaml.safe_load((ROOT / "features" / "retention.yaml").read_text())
    spec["churn"]["cutoff_count"] = 7
    (tmp / "retention.yaml").write_text(yaml.safe_dump(spec))
    return settings.model_copy(update={"feature_spec": tmp / "retention.yaml"})


@pytest.fixture(scope="module")
def project(lake) -> Project:
    return c360ml.open(lake)


@pytest.fixture(scope="module")
def data(project):
    return project.training_data(AS_OF, config=CONFIG)


def test_evaluate_gives_the_figures_of_c360ml_train(lake, project, data):
    """`run_training` (what `c360ml train` runs) logs its metrics to MLflow; the API's
    evaluation of the built-in recipe on the same lake and as_of has every one of them."""
    summary = run_training(lake, pd.Timestamp(AS_OF, tz="UTC"), config=CONFIG)
    evaluation = project.evaluate(data=data)
    client = mlflow.MlflowClient(lake.tracking_uri, lake.tracking_uri)
    logged = client.get_run(summary.run_id).data.metrics
    ours = {k: float(v) for k, v in evaluation.metrics.items() if np.isfinite(v)}
    assert set(logged) == set(ours)
    assert ours == logged
    assert evaluation.grade == summary.grade
    assert (evaluation.result.n_trees, evaluation.result.feature_names[:3]) == (
        summary.n_trees,
        tuple(data.features.names[:3]),
    )
    assert "Grade" in evaluation.model_card and "XGBoost (hist)" in evaluation.model_card
    plan = data.plan
    assert {"train", "validation", "test"} <= set(data.split_of())  # + "unused" gap cutoffs
    test_rows = data.rows("test")
    assert (pd.to_datetime(test_rows["cutoff_time"], utc=True) == plan.test_cutoff).all()
    assert len(test_rows) == summary.split_rows["test"]
    assert set(baselines.RFM_COLUMNS) <= set(data.rfm.columns)


@pytest.fixture(scope="module")
def hgb(project, data) -> Evaluation:
    return project.evaluate(HistGradientBoostingClassifier(max_iter=60, random_state=0), data=data)


def test_a_users_estimator_is_measured_registered_gated_and_scored(lake, project, hgb):
    assert hgb.model_kind == "HistGradientBoostingClassifier"
    assert hgb.grade in "ABC" and 0.5 < hgb.metrics["test_roc_auc"] < 1
    assert hgb.metrics["test_roc_auc_ci_low"] < hgb.metrics["test_roc_auc"]
    assert hgb.result.importance == []
    assert "no per-customer contributions" in hgb.model_card
    assert [p.name for p in hgb.plots()] == [
        "roc.png",
        "pr.png",
        "calibration.png",
        "lift.png",
        "score_distribution.png",
    ]

    if project.versions().empty:  # the gate compares with a champion when there is one
        project.register(project.evaluate(data=hgb.data))
    summary = project.register(hgb)
    assert "comparison with the champion" in summary.gate_reason, summary.gate_reason
    versions = project.versions()
    assert versions.loc[int(summary.model_version), "model_kind"] == hgb.model_kind

    # The MLflow pyfunc serves it through scoring.score: scores, no factors.
    with mlflow_store(project.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{lake.model_name}/{summary.model_version}")
    bundle = model.unwrap_python_model().bundle
    assert bundle.booster is None and not bundle.explains
    example = hgb.result.input_example
    out = model.predict(example)
    assert out["ChurnScore"].between(0, 1).all()
    assert out["InfluentialFactors"].map(len).eq(0).all()
    pd.testing.assert_frame_equal(out, score(bundle, example))

    scores = project.score(version=summary.model_version, as_of=AS_OF)
    assert len(scores) > 100 and scores["ModelVersion"].eq(summary.model_version).all()
    assert scores["InfluentialFactors"].isna().all()
    assert "no per-customer contributions" in scores.attrs["explanations"]
    some = scores["CustomerId"].head(3).tolist()
    again = project.score(some, as_of=AS_OF, version=summary.model_version)
    assert np.allclose(
        again.set_index("CustomerId")["ChurnScore"],
        scores.set_index("CustomerId").loc[some, "ChurnScore"],
    )


def test_a_saved_estimator_bundle_loads_and_scores_like_the_original(hgb, tmp_path):
    """The bundle folder is what the refresh and the BentoML service load."""
    from c360ml.model.pipeline import bundle_of

    bundle = bundle_of(hgb.data, hgb.result)
    loaded = ModelBundle.load(bundle.save(tmp_path / "bundle"))
    example = hgb.result.input_example
    pd.testing.assert_frame_equal(score(loaded, example), score(bundle, example))
    assert loaded.metadata["model_kind"] == "HistGradientBoostingClassifier"


def test_the_builtin_champion_scores_with_factors(project):
    scores = project.score(as_of=AS_OF, version=1)
    assert scores["InfluentialFactors"].map(len).eq(5).all()
    assert "SHAP" in scores.attrs["explanations"]
    with pytest.raises(ValueError, match=r"unknown customer id\(s\): \['nobody'\]"):
        project.score(["nobody"], as_of=AS_OF)


def test_an_estimator_without_predict_proba_is_refused_by_name(project):
    from sklearn.svm import LinearSVC

    with pytest.raises(
        ValueError, match=r"LinearSVC is not a scikit-learn-compatible .*predict_proba"
    ):
        project.evaluate(LinearSVC(), as_of=AS_OF)


def test_two_projects_and_a_process_wide_uri_keep_their_stores_apart(lake, hgb, tmp_path):
    """An earlier mlflow.set_tracking_uri (which also sets MLFLOW_TRACKING_URI) must not
    send a project's run elsewhere, nor may one project's calls leave the process pointed
    at its store."""
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with mlflow_store(mlflow.get_tracking_uri()):  # puts this process's URIs back after
        mlflow.set_tracking_uri(elsewhere)
        _two_projects(lake, hgb, tmp_path, elsewhere)


def _two_projects(lake, hgb, tmp_path, elsewhere):
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    a = c360ml.open(lake.model_copy(update={"mlflow_dir": tmp_path / "a"}))
    config_b = tmp_path / "b" / "c360ml.yaml"
    config_b.parent.mkdir()
    config_b.write_text(
        yaml.safe_dump(
            {
                "root": str(ROOT),
                "lake_root": str(lake.lake),
                "mlflow_dir": str(tmp_path / "b" / "mlflow"),
                "feature_spec": str(lake.feature_spec),
            }
        )
    )
    b = c360ml.open(config_b)
    assert b.tracking_uri.endswith("b/mlflow/mlflow.db") and elsewhere not in b.tracking_uri
    summary = b.register(hgb)
    assert summary.model_version == "1" and summary.tracking_uri == b.tracking_uri
    assert b.versions().index.tolist() == [1]
    assert a.versions().empty
    assert mlflow.get_tracking_uri() == elsewhere
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    other = mlflow.MlflowClient(elsewhere, elsewhere)
    assert other.search_registered_models() == []
    a.register(hgb)
    assert a.versions().index.tolist() == [1] and b.versions().index.tolist() == [1]


def test_the_leakage_helper_names_a_leaky_feature_of_the_users_spec(project, tmp_path):
    spec = tmp_path / "my_features.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "sql_features": [
                    {
                        "name": "purchases_14d",
                        "table": "orders",
                        "expression": "count(*) FILTER (WHERE is_purchase AND "
                        "order_ts > cutoff_time - INTERVAL 14 DAY)",
                        "default": 0,
                    },
                    {
                        "name": "purchases_next_90d",
                        "table": "orders",
                        "expression": "(SELECT count(*) FROM current_orders o WHERE "
                        "o.customer_id = any_value(src.customer_id) AND o.order_ts > "
                        "cutoff_time AND o.order_ts <= cutoff_time + INTERVAL 90 DAY)",
                    },
                ]
            }
        )
    )
    report = project.check_features(spec, max_customers=40)
    assert not report.ok
    assert {leak.feature for leak in report.leaks} == {"purchases_next_90d"}
    assert "feature 'purchases_next_90d' leaks" in report.message()
    with pytest.raises(ValueError, match="feature 'purchases_next_90d' leaks"):
        project.training_data(AS_OF, config=CONFIG, features=spec)


def test_every_public_name_has_a_docstring():
    """The API reference is generated from docstrings (make docs): none may be missing."""
    missing = []
    for name in c360ml.__all__:
        obj = getattr(c360ml, name)
        if name.startswith("__"):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__ == "c360ml.api":
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                target = value.fget if isinstance(value, property) else value
                if callable(target) and not inspect.getdoc(target):
                    missing.append(f"{name}.{member}")
    assert missing == []


def test_make_docs_writes_the_reference_of_every_public_name(tmp_path):
    """The README's `make docs`, as a user runs it: one HTML page naming the API."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["make", "docs", f"DOCS_DIR={tmp_path}"], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = (tmp_path / "c360ml.api.html").read_text()
    assert all(f"{name}" in page for name in ("open", "Project", "evaluate", "training_data"))
