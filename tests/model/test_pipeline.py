"""run_training end to end on a generated lake (features module included), and the gate."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

import c360ml.features as ft
from c360ml.config import Settings
from c360ml.model.pipeline import run_training
from c360ml.model.scoring import score
from c360ml.model.splits import customer_bucket
from c360ml.model.train import TrainConfig
from c360ml.storage.lake import Lake
from tests.conftest import generated_lake, write_gold

ROOT = Path(__file__).resolve().parents[2]
AS_OF = pd.Timestamp("2025-12-31", tz="UTC")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A generated lake large enough for the gate's rules to pass on merit (a model on a
    few hundred customers cannot beat the RFM baseline with an interval above zero)."""
    tmp = tmp_path_factory.mktemp("train")
    settings = generated_lake(tmp, customers=2000, seed=7)
    spec = yaml.safe_load((ROOT / "features" / "retention.yaml").read_text())
    spec["churn"]["cutoff_count"] = 7  # the fewest monthly cutoffs for an honest split
    (tmp / "retention.yaml").write_text(yaml.safe_dump(spec))
    settings = settings.model_copy(update={"feature_spec": tmp / "retention.yaml"})
    return settings, ft.read_gold(Lake(settings.lake))


def test_run_training_registers_and_gates(setup):
    settings, gold = setup
    config = TrainConfig(nthread=1, bootstrap_resamples=50)
    month_earlier = AS_OF - pd.Timedelta(days=30)
    first = run_training(settings, month_earlier, config=config)
    assert first.model_version == "1" and first.promoted, first.gate_reason
    assert first.split_mode == "out_of_time" and not first.optimistic
    assert first.test_cutoff == month_earlier - pd.Timedelta(days=90)
    assert first.roc_auc > 0.6 and first.roc_auc_ci[0] < first.roc_auc < first.roc_auc_ci[1]
    rows = first.rows()
    assert all(set(r) == {"item", "value"} and isinstance(r["value"], str) for r in rows)
    assert any(r["item"] == "grade" for r in rows)
    # The generated lake supplies its oracle (reference.json): the headroom is reported.
    assert 0.5 < first.oracle_roc_auc <= 1 and first.headroom_closed is not None

    # A retrain one month later: the champion saw part of the new test window's labels, so
    # the recipes are compared on the new data (not refused as "not comparable").
    later = run_training(settings, AS_OF, config=config)
    assert later.model_version == "2"
    assert "recipe comparison with the champion's recipe refitted" in later.gate_reason
    assert "label rate ok" in later.gate_reason and "population size ok" in later.gate_reason

    second = run_training(settings, AS_OF, sample_rate=0.5, config=config)
    assert second.model_version == "3" and second.sample_rate == 0.5
    assert "recipe comparison" in second.gate_reason
    # Under the test cap, the test cutoff keeps every customer whatever the training rate.
    assert second.test_sample_rate == 1.0
    assert second.split_rows["test"] == later.split_rows["test"]

    # The registered model scores features computed from its own carried FeatureSet.
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/1")
    bundle = model.unwrap_python_model().bundle
    fs = ft.FeatureSet.from_json(bundle.feature_set_json)
    population = ft.active_population(gold, [AS_OF], ft.ChurnConfig())
    features = ft.calculate_features(gold, population.head(50), fs)
    request = features.drop(columns=["cutoff_time"]).rename(columns={"customer_id": "CustomerId"})
    out = model.predict(request)
    assert len(out) == 50 and out.ChurnScore.between(0, 1).all()
    pd.testing.assert_frame_equal(out, score(bundle, request), check_exact=True)


def test_half_the_orders_missing_fails_a_sanity_check(setup, tmp_path):
    """The same customers with half their orders lost (a partial export): the challenger is
    refused by name, whatever its own metrics."""
    settings, gold = setup
    config = TrainConfig(nthread=1, bootstrap_resamples=50)
    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    if not client.search_model_versions(f"name='{settings.model_name}'"):
        run_training(settings, AS_OF, config=config)
    champion = client.get_model_version_by_alias(settings.model_name, "champion").version
    kept = customer_bucket(gold.orders["order_id"]) < 0.5
    halved = dataclasses.replace(
        gold,
        orders=gold.orders[kept],
        order_lines=gold.order_lines[
            gold.order_lines["order_id"].isin(gold.orders.loc[kept, "order_id"])
        ],
    )
    lossy = settings.model_copy(update={"lake_root": tmp_path / "lossy"})
    write_gold(Lake(lossy.lake), halved)
    summary = run_training(lossy, AS_OF, config=config)
    assert not summary.promoted
    assert "sanity check purchases per customer FAILED" in summary.gate_reason
    assert client.get_model_version_by_alias(settings.model_name, "champion").version == champion


def test_retrain_if_needed_trains_without_a_champion_and_then_waits(setup, tmp_path):
    from c360ml.model.pipeline import retrain_if_needed

    settings, _ = setup
    fresh = settings.model_copy(update={"mlflow_dir": tmp_path / "mlflow"})
    first = retrain_if_needed(fresh, require_approval=False)
    assert first.fired == ["no champion yet"] and first.summary.promoted
    assert first.summary.trained_as_of == pd.Timestamp("2025-12-31", tz="UTC")
    second = retrain_if_needed(fresh)
    assert second.fired == [] and second.summary is None
    assert "champion 0 days old" in second.health and "no drift measured yet" in second.health
    stale = fresh.model_copy(
        update={"watch": fresh.watch.model_copy(update={"max_model_age_days": -1})}
    )
    assert retrain_if_needed(stale).fired == ["champion is 0 days old (limit -1)"]


def test_large_lake_is_sampled_before_gold_is_read(tmp_path_factory, monkeypatch):
    """With caps below the lake's size, gold is read (by SQL) for the test sample only,
    training rows come from the (nested) training sample, the test cutoff is labelled
    exactly as a full read would label those customers, and both rates are recorded."""
    settings = generated_lake(tmp_path_factory.mktemp("sampled"), customers=600, seed=13)
    lake = Lake(settings.lake)
    cfg = ft.load_churn_config(settings.path(settings.feature_spec))
    cutoffs = ft.training_cutoffs(cfg, AS_OF)
    ordering = ft.read_ordering_customers(lake, cutoffs[0] - cfg.lookback, cutoffs[-1])
    n = len(ordering)
    assert n > 300
    config = TrainConfig(
        nthread=1, bootstrap_resamples=30, max_train_customers=100, max_test_customers=200
    )
    rate, test_rate = 100 / n, 200 / n

    seen: dict = {}
    read_gold, lake_gold, calculate = ft.read_gold, ft.lake_gold, ft.calculate_features

    def spy_read(lake_, customers=None):
        seen["gold"] = lake_gold(lake_, customers=customers)
        return seen["gold"]

    def spy_calculate(gold, population, fs, **options):
        seen.setdefault("population", population.copy())  # the first call: the matrix
        return calculate(gold, population, fs, **options)

    monkeypatch.setattr(ft, "lake_gold", spy_read)
    monkeypatch.setattr(ft, "calculate_features", spy_calculate)
    summary = run_training(settings, AS_OF, config=config)
    assert summary.sample_rate == pytest.approx(rate)
    assert summary.test_sample_rate == pytest.approx(test_rate)

    # Gold as read holds only test-sample customers (a full read then a sample would not).
    gold, full = read_gold(lake, customers=seen["gold"].customers), read_gold(lake)
    in_sample = set(ordering[customer_bucket(pd.Series(ordering)) < test_rate])
    assert set(gold.orders["customer_id"]) <= in_sample
    assert set(gold.customers["customer_id"]) <= in_sample
    assert len(gold.orders) < 0.6 * len(full.orders)

    # Training rows: the training sample; test rows: the larger test sample.
    rows = seen["population"]
    cut = pd.to_datetime(rows["cutoff_time"], utc=True)
    bucket = customer_bucket(rows["customer_id"])
    is_test = (cut == summary.test_cutoff).to_numpy()
    assert (bucket[~is_test] < rate).all()
    assert (bucket[is_test] < test_rate).all() and (bucket[is_test] >= rate).any()
    assert summary.split_rows["test"] == int(is_test.sum())

    # The test cutoff is labelled as on the full lake, for exactly the sampled customers.
    labels = ft.compute_labels(full, [summary.test_cutoff], cfg)
    expected = labels[customer_bucket(labels["customer_id"]) < test_rate]
    assert sorted(rows.loc[is_test, "customer_id"]) == sorted(expected["customer_id"])

    # Both rates are stated in the run, the model card and the printed summary.
    run = mlflow.MlflowClient(settings.tracking_uri).get_run(summary.run_id)
    assert float(run.data.params["sample_rate"]) == pytest.approx(rate)
    assert float(run.data.params["test_sample_rate"]) == pytest.approx(test_rate)
    assert run.data.params["sample_candidate_customers"] == str(n)
    mlflow.set_tracking_uri(settings.tracking_uri)
    card = mlflow.artifacts.load_text(f"runs:/{summary.run_id}/model_card.md")
    assert f"rate {rate:.3f} at the training and validation cutoffs" in card
    assert f"rate {test_rate:.3f} at the test cutoff" in card
    printed = {r["item"]: r["value"] for r in summary.rows()}
    assert printed["customer sample rate train / test"] == f"{rate:.3f} / {test_rate:.3f}"


def test_tuning_needs_optuna_before_any_work(setup):
    settings, _ = setup
    with pytest.raises(ValueError, match="number of Optuna trials >= 0, not -1"):
        run_training(settings, AS_OF, tune=-1)
    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna installed")
    settings, _ = setup
    with pytest.raises(ValueError, match="optuna"):
        run_training(settings, AS_OF, tune=5)


def test_oracle_maps_customers_to_persons(tmp_path, monkeypatch):
    """Truth persons -> gold customers; a customer merged from two persons churns only if
    neither buys, so its churn probability is the product of their no-purchase chances.
    Training finds the oracle through the manifest the generator writes, not an import."""
    import json

    from c360ml.model.reference import reference_churn_probability
    from c360ml.storage.lake import Lake
    from c360ml.synth import oracle

    settings = Settings(root=tmp_path, lake_root=tmp_path / "lake", truth_root=tmp_path / "truth")
    settings.truth.mkdir(parents=True)
    pd.DataFrame(
        {"person_id": ["p1", "p2", "p3"], "source": "d365", "source_key": ["k1", "k2", "k3"]}
    ).to_parquet(settings.truth / "person_keys.parquet")
    source_map = pd.DataFrame(
        {"source": "d365", "source_key": ["k1", "k2", "k3"], "customer_id": ["A", "B", "B"]}
    )
    Lake(settings.lake).write(source_map, "gold", "customer_source_map", mode="overwrite")
    calls = []

    def fake_oracle(truth_dir, person_ids, t, window_days, seed=0):
        calls.append((sorted(person_ids), t, window_days, seed))
        probability = {"p1": 0.2, "p2": 0.5, "p3": 0.6}
        return pd.Series({p: probability[p] for p in person_ids})

    monkeypatch.setattr(oracle, "oracle_purchase_probability", fake_oracle)
    cutoff = pd.Timestamp("2025-10-02", tz="UTC")
    # Without a manifest there is no reference (real data).
    assert reference_churn_probability(settings, pd.Series(["A"]), cutoff, 90) is None
    manifest = {"churn_probability": "c360ml.synth.oracle:churn_probability"}
    (settings.truth / "reference.json").write_text(json.dumps(manifest))
    churn = reference_churn_probability(settings, pd.Series(["A", "B"]), cutoff, 90)
    assert calls == [(["p1", "p2", "p3"], cutoff, 90, 0)]
    assert churn["A"] == pytest.approx(0.8)
    assert churn["B"] == pytest.approx(0.5 * 0.4)
    # Simulated in chunks of persons (bounded memory), each with its own seed.
    monkeypatch.setattr(oracle, "CHUNK_PERSONS", 2)
    calls.clear()
    chunked = reference_churn_probability(settings, pd.Series(["A", "B"]), cutoff, 90)
    assert [c[3] for c in calls] == [0, 1] and sum(len(c[0]) for c in calls) == 3
    pd.testing.assert_series_equal(chunked.sort_index(), churn.sort_index())
    # A manifest naming what cannot be imported leaves the figures out, not the run.
    (settings.truth / "reference.json").write_text(json.dumps({"churn_probability": "no.such:f"}))
    assert reference_churn_probability(settings, pd.Series(["A"]), cutoff, 90) is None


def test_cli_train_awaiting_approval_then_approve(setup, tmp_path):
    """`c360ml train --require-approval`, `c360ml model approve|rollback` as a user runs
    them: a passing model waits, approval moves the alias, errors are one line."""
    settings, _ = setup
    config = tmp_path / "c360ml.yaml"
    paths = {
        "lake_root": str(settings.lake),
        "truth_root": str(settings.truth),
        "mlflow_dir": str(tmp_path / "mlflow"),
        "feature_spec": str(settings.feature_spec),
    }
    config.write_text(yaml.safe_dump(paths))
    env = {**os.environ, "C360ML_CONFIG": str(config)}
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri in this process sets it

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "c360ml.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )

    trained = cli("train", "--as-of", "2025-12-31", "--require-approval")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "awaiting approval: c360ml model approve 1" in trained.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(settings.model_name, "champion")

    missing = cli("model", "approve", "7")
    assert missing.returncode == 2
    assert missing.stdout.strip() == "error: model c360-retention has no version 7"
    approved = cli("model", "approve", "1", "--reason", "checked the card")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "approve: c360-retention champion is now v1: checked the card" in approved.stdout
    assert str(client.get_model_version_by_alias(settings.model_name, "champion").version) == "1"
    nowhere = cli("model", "rollback")
    assert nowhere.returncode == 2
    assert "v1 records no earlier champion; pass --to VERSION" in nowhere.stdout
