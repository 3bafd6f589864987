"""MLflow round trip, the champion gate and what the logged artifacts contain.

One temporary sqlite store for the module; each test registers under its own model name.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from c360ml.config import Settings
from c360ml.model import pipeline, registry
from c360ml.model.registry import GateInput, decide
from c360ml.model.report import CardContext
from c360ml.model.scoring import score
from c360ml.model.train import train_and_evaluate

from .model_testdata import FEATURES, WINDOW_DAYS, make_matrix, request_frame


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


def _settings(store: Path, name: str) -> Settings:
    return Settings(root=store, mlflow_dir=store, model_name=name)


@pytest.fixture(scope="module")
def results(synthetic, small_config):
    """Models of known quality on the same matrix: weak, weaker, full, noise."""
    matrix, rfm = synthetic
    subsets = {
        "weak": ("f_orders_90d",),
        "weaker": ("f_spend_365d",),
        "full": FEATURES,
        "noise": ("f_noise",),
    }
    return {
        k: train_and_evaluate(
            matrix[["customer_id", "cutoff_time", "label", *v]], v, rfm, WINDOW_DAYS, small_config
        )  # fmt: skip
        for k, v in subsets.items()
    }


def _register(store, name, result, matrix, trained_as_of, customer_count=None):
    """Log + register + gate one result the way run_training does."""
    settings = _settings(store, name)
    bundle = registry.build_bundle(
        result,
        {n: "float32" for n in result.feature_names},
        None,
        {"prediction_window_days": WINDOW_DAYS},
        trained_as_of,
    )
    test = matrix[matrix.cutoff_time == matrix.cutoff_time.max()]

    def compute_matrix(champion):
        return test[["customer_id", *champion.feature_names]]

    card = CardContext(
        model_name=name,
        trained_as_of=pd.Timestamp(trained_as_of),
        window_days=WINDOW_DAYS,
        lookback_days=365,
        cutoff_spacing_days=30,
        sample_rate=1.0,
        population_rows=len(matrix),
        n_candidate_features=len(FEATURES),
        dropped_features=0,
        code_version="test",
    )
    params = {"trained_as_of": str(trained_as_of)}
    return pipeline.log_and_gate(result, bundle, settings, params, card, compute_matrix)


def _champion(store, name) -> str:
    mlflow.set_tracking_uri(_settings(store, name).tracking_uri)
    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_gate_promotes_better_and_keeps_worse(store, results, synthetic):
    matrix, _ = synthetic
    name = "gate-comparable"
    as_of = results["weak"].plan.test_cutoff  # champion labels end by the test cutoff
    _, first = _register(store, name, results["weak"], matrix, as_of)
    assert first.promote and first.comparable is None
    logged, worse = _register(store, name, results["weaker"], matrix, as_of)
    assert not worse.promote and worse.comparable
    assert "champion better" in worse.reason
    assert worse.champion_metrics["roc_auc"] > results["weaker"].metrics["test_roc_auc"]
    assert _champion(store, name) == "1"
    client = MlflowClient()
    version = client.get_model_version(name, logged.version)
    assert version.tags["gate_decision"] == "not promoted"
    assert "champion better" in version.tags["gate_reason"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == logged.version
    logged, better = _register(store, name, results["full"], matrix, as_of)
    assert better.promote and better.comparable
    assert _champion(store, name) == logged.version == "3"


def test_gate_not_comparable_path(store, results, synthetic):
    matrix, _ = synthetic
    name = "gate-not-comparable"
    test_cutoff = results["weak"].plan.test_cutoff
    later = test_cutoff + pd.Timedelta(days=WINDOW_DAYS)  # its labels overlap the test window
    _register(store, name, results["weak"], matrix, later)
    _, noise = _register(store, name, results["noise"], matrix, later)
    assert not noise.promote and noise.comparable is False
    assert _champion(store, name) == "1"
    _, full = _register(store, name, results["full"], matrix, later)
    assert full.promote and full.comparable is False
    assert "not comparable" in full.reason and "beats the RFM baseline" in full.reason
    assert _champion(store, name) == "3"


def test_decide_rules_on_numbers():
    a = GateInput(0.80, 0.70, "A", 0.02)
    assert decide(a, GateInput(0.8009, 0.7009)).promote  # tie within 0.001: newer wins
    assert not decide(a, GateInput(0.802, 0.69)).promote  # ROC AUC worse
    assert not decide(a, GateInput(0.79, 0.702)).promote  # PR AUC worse
    assert not decide(GateInput(0.9, 0.9, "C", 0.1), GateInput(0.5, 0.5)).promote  # grade C
    assert not decide(GateInput(0.9, 0.9, "A", -0.01), GateInput(0.5, 0.5), False).promote
    assert decide(GateInput(0.9, 0.9, "A", 0.01), GateInput(0.99, 0.99), False).promote
    assert decide(GateInput(0.6, 0.6, "C", -0.1), None).promote  # no champion at all


def test_pyfunc_round_trip_equals_in_process_scoring(store, results, synthetic):
    matrix, _ = synthetic
    name = "round-trip"
    logged, _ = _register(store, name, results["full"], matrix, pd.Timestamp("2025-01-01"))
    model = mlflow.pyfunc.load_model(logged.model_uri)
    bundle = model.unwrap_python_model().bundle
    request = request_frame(matrix, rows=60)
    assert request[list(FEATURES)].isna().any().any()
    for explain in ("exact", "approx"):
        via_mlflow = model.predict(request, params={"explain": explain})
        in_process = score(bundle, request, explain=explain)
        pd.testing.assert_frame_equal(via_mlflow, in_process, check_exact=True)
    # The in-memory booster (before logging) scores the same as the logged one.
    direct = score(registry.load_bundle(f"models:/{name}@champion"), request)
    pd.testing.assert_frame_equal(direct, score(bundle, request), check_exact=True)
    assert bundle.metadata["trained_as_of"].startswith("2025-01-01")
    assert bundle.metadata["grade"] == results["full"].grade.grade
    assert set(bundle.metadata["test_metrics"]) >= {"test_roc_auc", "test_pr_auc"}
    assert "package_version" in bundle.metadata
    run = MlflowClient().get_run(logged.run_id)
    assert run.data.tags["evaluation"] == "out_of_time"
    assert "pre-refit" in run.data.tags["metrics_measured_on"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(logged.run_id, "plots")}
    assert artifacts >= {f"plots/{p}.png" for p in ("roc", "pr", "calibration", "lift",
                                                    "shap_summary", "score_distribution")}  # fmt: skip
    card = mlflow.artifacts.load_text(f"runs:/{logged.run_id}/model_card.md")
    assert "equals CI-D's when both" in card and "recall of the churned class" in card
    # Artifacts live under the store's artifacts folder, not ./mlruns.
    assert any((store / "artifacts").rglob("booster.json"))


PERSONS = [("Astrid", "Lindqvist"), ("Mateo", "Quiroga"), ("Ngozi", "Okonkwo"),
           ("Yuki", "Takahashi"), ("Bartholomew", "Fairweather")]  # fmt: skip


def _scan(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [(str(path), n) for n in needles if n.encode() in data]
    return hits


def test_no_personal_data_in_logged_artifacts(store, small_config, tmp_path):
    ids = [
        f"{first} {last} <{first.lower()}.{last.lower()}{i}@mail.example>"
        for i in range(80)
        for first, last in PERSONS
    ]
    matrix, rfm = make_matrix(customer_ids=ids, seed=9)
    result = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, small_config)
    name = "no-pii"
    _register(store, name, result, matrix, pd.Timestamp("2025-01-01"))
    needles = [f"{f} {la}" for f, la in PERSONS] + [i.split("<")[1].rstrip(">") for i in ids]
    # The scanner itself finds a planted e-mail (so an empty result means something).
    (tmp_path / "planted.txt").write_text(f"x {needles[-1]} y")
    assert _scan(tmp_path, needles) == [(str(tmp_path / "planted.txt"), needles[-1])]
    experiment = mlflow.get_experiment_by_name(name)
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=experiment.artifact_location,
                                                    dst_path=str(tmp_path / "dl")))  # fmt: skip
    assert any(root.rglob("model_card.md")) and any(root.rglob("booster.json"))
    assert _scan(root, needles) == []
