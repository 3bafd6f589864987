"""MLflow round trip, the champion gate and what the logged artifacts contain.

One temporary sqlite store for the module; each test registers under its own model name.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from c360ml.config import GateSettings, Settings
from c360ml.model import gate, pipeline, registry
from c360ml.model.evaluate import Interval
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


def _register(store, name, result, matrix, trained_as_of, settings=None):
    """Log + register + gate one result the way run_training does."""
    settings = settings or _settings(store, name)
    bundle = registry.build_bundle(
        result,
        {n: "float32" for n in result.feature_names},
        None,
        {"prediction_window_days": WINDOW_DAYS},
        trained_as_of,
    )

    def champion_rows(champion):
        return matrix[["customer_id", "cutoff_time", "label", *champion.feature_names]]

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
    return pipeline.log_and_gate(result, bundle, settings, params, card, champion_rows)


def _champion(store, name) -> str:
    mlflow.set_tracking_uri(_settings(store, name).tracking_uri)
    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_gate_fresh_window_promotes_better_and_keeps_worse(store, results, synthetic):
    matrix, _ = synthetic
    name = "gate-comparable"
    as_of = results["weak"].plan.test_cutoff  # champion labels end by the test cutoff
    _, first = _register(store, name, results["weak"], matrix, as_of)
    assert first.promote and first.path == gate.FIRST
    logged, worse = _register(store, name, results["weaker"], matrix, as_of)
    assert not worse.promote and worse.path == gate.FRESH_WINDOW
    assert "champion better: fresh window comparison" in worse.reason
    assert worse.comparison.champion["roc_auc"] > results["weaker"].metrics["test_roc_auc"]
    assert worse.comparison.roc_auc_difference.estimate < 0
    assert _champion(store, name) == "1"
    client = MlflowClient()
    version = client.get_model_version(name, logged.version)
    assert version.tags["gate_decision"] == "not promoted"
    assert version.tags["gate_path"] == "fresh window"
    assert "champion better" in version.tags["gate_reason"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == logged.version
    logged, better = _register(store, name, results["full"], matrix, as_of)
    assert better.promote and better.comparable, better.reason
    assert _champion(store, name) == logged.version == "3"
    tags = client.get_model_version(name, "3").tags
    assert tags["previous_champion"] == "1" and tags["gate_decision"] == "promoted"


def test_gate_recipe_path_when_labels_overlap(store, results, synthetic, small_config):
    """A retrain at the same as_of compares recipes on the challenger's data: the same
    recipe ties and the newer model wins; a weaker recipe and a noise model are refused."""
    matrix, rfm = synthetic
    name = "gate-recipe"
    later = results["full"].plan.test_cutoff + pd.Timedelta(days=WINDOW_DAYS)
    _register(store, name, results["full"], matrix, later)
    again = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, small_config)
    _, tie = _register(store, name, again, matrix, later)
    assert tie.promote and tie.path == gate.RECIPE, tie.reason
    assert tie.comparison.roc_auc_difference.estimate == pytest.approx(0.0, abs=1e-12)
    assert "recipe comparison" in tie.reason and "ties within 0.001" in tie.reason
    assert _champion(store, name) == "2"

    shallow = small_config.model_copy(update={"max_trees": 5, "max_depth": 1})
    weak_recipe = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, shallow)
    assert weak_recipe.n_trees <= 5
    _, refused = _register(store, name, weak_recipe, matrix, later)
    assert not refused.promote and refused.path == gate.RECIPE
    assert refused.reason.startswith("champion better: recipe comparison")
    assert refused.comparison.champion["roc_auc"] > refused.comparison.challenger["roc_auc"]
    _, noise = _register(store, name, results["noise"], matrix, later)
    assert not noise.promote and "does not beat the RFM baseline" in noise.reason
    assert _champion(store, name) == "2"
    card = mlflow.artifacts.load_text(
        f"runs:/{MlflowClient().get_model_version(name, '3').run_id}/model_card.md"
    )
    assert "compares recipes on the same data" in card and "not promoted" in card


def test_gate_refuses_everyone_churns_graded_a(store, small_config):
    """Most customers churn: a constant "everyone churns" model is graded A by CI-D's
    wording, and the gate still refuses it (it does not beat the RFM baseline)."""
    matrix, rfm = make_matrix(seed=5, churn_shift=2.0)
    matrix = matrix.assign(f_constant=np.float32(0.0))
    constant = train_and_evaluate(matrix, ("f_constant",), rfm, WINDOW_DAYS, small_config)
    assert constant.metrics["test_churn_rate"] > 0.5
    assert constant.test["model"].nunique() == 1 and constant.grade.grade == "A"
    _, decision = _register(store, "gate-constant", constant, matrix, pd.Timestamp("2025-01-01"))
    assert not decision.promote and decision.path == gate.FIRST
    assert decision.reason.startswith("does not beat the RFM baseline")


def test_a_version_left_ungated_by_a_killed_training_is_marked(store, results, synthetic):
    """A training killed after registering leaves a version without a gate decision and a
    RUNNING run: the next training tags it interrupted and ends the run as FAILED."""
    matrix, _ = synthetic
    name = "gate-interrupted"
    settings = _settings(store, name)
    result = results["full"]
    bundle = registry.build_bundle(
        result, {n: "float32" for n in result.feature_names}, None, {}, "2025-01-01"
    )
    registry.use_experiment(settings.tracking_uri, name)
    run = mlflow.start_run()
    killed = registry.log_training(result, bundle, name, {})  # ... and the process dies
    mlflow.end_run(status="RUNNING")  # what a SIGKILL leaves in the store
    _register(store, name, results["weak"], matrix, pd.Timestamp("2025-01-01"))
    client = MlflowClient()
    tags = client.get_model_version(name, killed.version).tags
    assert tags["gate_decision"] == "interrupted"
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.get_model_version(name, "2").tags["gate_decision"] == "promoted"


def test_decide_rules_on_numbers():
    interval = Interval(0.0, -0.01, 0.01)

    def comparison(challenger, champion):
        return gate.Comparison(
            gate.RECIPE,
            dict(zip(("roc_auc", "pr_auc"), challenger, strict=True)),
            dict(zip(("roc_auc", "pr_auc"), champion, strict=True)),
            interval,
        )

    ok = gate.Check("label rate", True, "")
    bad = gate.Check("label rate", False, "0.60 vs champion 0.30")

    def decide(grade="A", low=0.02, comp=None, checks=(ok,), min_grade="C"):
        return gate.decide(grade, low, comp, list(checks), gate.RECIPE, "1", min_grade)

    assert decide(comp=comparison((0.80, 0.70), (0.8009, 0.7009))).promote  # tie: newer wins
    assert not decide(comp=comparison((0.80, 0.70), (0.802, 0.69))).promote  # ROC AUC worse
    assert not decide(comp=comparison((0.80, 0.70), (0.79, 0.702))).promote  # PR AUC worse
    # the grade is reported, and gates only where gate.min_grade asks for it
    assert decide("C", comp=comparison((0.9, 0.9), (0.5, 0.5))).promote
    graded = decide("C", comp=comparison((0.9, 0.9), (0.5, 0.5)), min_grade="B")
    assert not graded.promote and graded.reason.startswith("grade C (gate.min_grade B)")
    assert decide("B", comp=comparison((0.9, 0.9), (0.5, 0.5)), min_grade="B").promote
    assert not decide("B", min_grade="A").promote
    assert not decide(low=-0.01, comp=comparison((0.9, 0.9), (0.5, 0.5))).promote
    assert not decide(low=None).promote
    refused = decide(comp=comparison((0.9, 0.9), (0.5, 0.5)), checks=(ok, bad))
    assert not refused.promote
    assert refused.reason.startswith("sanity check label rate FAILED: 0.60 vs champion 0.30")
    assert decide().promote  # first model: rules only
    assert not decide("C", -0.1).promote


def test_sanity_checks_name_what_moved():
    bounds = GateSettings()
    before = gate.DataProfile(population=10_000, label_rate=0.30, purchases_per_customer=12.0)
    same = gate.sanity_checks(
        before, before, np.linspace(0, 1, 500), np.linspace(0, 1, 500), bounds
    )
    assert [c.name for c in same] == [
        "population size", "label rate", "purchases per customer", "predicted churn rate"
    ]  # fmt: skip
    assert all(c.passed for c in same)
    halved = gate.DataProfile(population=9_000, label_rate=0.36, purchases_per_customer=6.0)
    checks = {c.name: c for c in gate.sanity_checks(halved, before, np.full(500, 0.9),
                                                    np.linspace(0, 1, 500), bounds)}  # fmt: skip
    assert checks["population size"].passed and checks["label rate"].passed
    assert not checks["purchases per customer"].passed
    assert "6.00 vs champion 12.00 (-50.0%" in checks["purchases per customer"].detail
    assert not checks["predicted churn rate"].passed
    assert "mean ChurnScore 0.900 vs champion 0.500" in checks["predicted churn rate"].detail


def test_a_shift_the_refresh_measured_is_not_bad_data():
    """After a shock, the challenger's label rate and mean score leave the champion's but
    agree with the churn rate the refresh realized: they pass; the orders check still
    catches a lake that lost half its orders, and a label rate far from both still fails."""
    bounds = GateSettings()
    before = gate.DataProfile(population=10_000, label_rate=0.52, purchases_per_customer=9.0)
    shocked = gate.DataProfile(population=10_100, label_rate=0.67, purchases_per_customer=9.0)
    old, new = np.full(500, 0.55), np.full(500, 0.65)
    checks = {c.name: c for c in gate.sanity_checks(shocked, before, new, old, bounds, 0.669)}
    assert checks["label rate"].passed and checks["predicted churn rate"].passed
    assert checks["label rate"].detail == "0.670 vs champion 0.520, realized 0.669 (bound ±0.10)"
    unmeasured = {c.name: c for c in gate.sanity_checks(shocked, before, new, old, bounds)}
    assert not unmeasured["label rate"].passed and not unmeasured["predicted churn rate"].passed
    broken = gate.DataProfile(population=10_000, label_rate=0.90, purchases_per_customer=4.5)
    checks = {c.name: c for c in gate.sanity_checks(broken, before, new, old, bounds, 0.669)}
    assert not checks["label rate"].passed and not checks["purchases per customer"].passed


def test_rollback_and_approval_round_trips(store, results, synthetic):
    matrix, _ = synthetic
    name = "gate-approval"
    settings = _settings(store, name)
    uri = settings.tracking_uri
    as_of = results["weak"].plan.test_cutoff
    _register(store, name, results["weak"], matrix, as_of)
    approval = settings.model_copy(update={"gate": GateSettings(require_approval=True)})
    logged, waiting = _register(store, name, results["full"], matrix, as_of, approval)
    assert waiting.promote and waiting.awaiting_approval and waiting.label == "awaiting approval"
    assert _champion(store, name) == "1"
    client = MlflowClient()
    assert client.get_model_version(name, "2").tags["gate_decision"] == "awaiting approval"
    _, refused = _register(store, name, results["weaker"], matrix, as_of, approval)
    assert not refused.promote and not refused.awaiting_approval
    with pytest.raises(ValueError, match="v3 is not awaiting approval .*--force"):
        registry.approve(uri, name, "3")
    with pytest.raises(ValueError, match="has no version 9"):
        registry.approve(uri, name, "9")

    moved = registry.approve(uri, name, "2", reason="reviewed by the retention team")
    assert (moved.champion, moved.replaced) == ("2", "1") and _champion(store, name) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["gate_decision"] == "approved"
    assert tags["approval"] == "reviewed by the retention team"

    back = registry.rollback(uri, name, reason="complaints about segment sizes")
    assert (back.champion, back.replaced) == ("1", "2") and _champion(store, name) == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["rolled_back"] == "true" and tags["rolled_back_to"] == "1"
    assert tags["rollback_reason"] == "complaints about segment sizes"
    with pytest.raises(ValueError, match="records no earlier champion; pass --to"):
        registry.rollback(uri, name)  # v1 replaced nothing
    forward = registry.rollback(uri, name, to="2")
    assert forward.champion == "2" and forward.reason == "manual rollback"
    with pytest.raises(ValueError, match="already the champion"):
        registry.rollback(uri, name, to="2")
    forced = registry.approve(uri, name, "3", force=True)
    assert forced.champion == "3" and _champion(store, name) == "3"
    assert client.get_model_version(name, "3").tags["gate_decision"] == "not promoted"


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
    assert "reads CI-D's wording" in card and "parity scorecard with CI-D" in card
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


def test_mlflow_probing_for_spark_does_not_end_a_python_c_process():
    """With pyspark's Connect client installed (the spark extra), MLflow's "is this a
    Databricks cluster?" probe imported it in a `python -c` process, which pyspark takes
    for a doctest run and exits (status 255). c360ml.model imports it safely first."""
    import subprocess
    import sys

    probe = "from mlflow.utils.databricks_utils import is_in_cluster; print(is_in_cluster())"
    done = subprocess.run(
        [sys.executable, "-c", f"import c360ml.model; {probe}"], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr[-500:]
