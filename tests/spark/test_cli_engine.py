"""`c360ml build all --engine spark` and `c360ml refresh --engine spark`: the layers built by
Spark (Sail here) from the command line."""

from __future__ import annotations

import os
import shutil

import pandas as pd

from c360ml.cli import main
from c360ml.storage.lake import Lake
from tests.conftest import generated_lake, user_project


def test_build_all_on_spark_from_the_command_line(tmp_path, monkeypatch, sail_remote, capsys):
    generated_lake(tmp_path / "data", customers=300, seed=3)  # built by DuckDB
    lake = Lake(tmp_path / "data" / "lake")
    # The tables DuckDB wrote record the current inputs: Spark would skip them all.
    shutil.rmtree(lake.path("gold", "orders"))
    shutil.rmtree(lake.path("quarantine", "gold", "orders"))
    products = lake.version("gold", "products")
    user_project(tmp_path)  # its c360ml.yaml: every output under tmp_path/data
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("C360ML_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_remote)
    assert main(["build", "all", "--engine", "spark"]) == 0
    assert lake.delta("gold", "orders").history(1)[0]["engineInfo"].startswith("sail")
    assert lake.version("gold", "products") == products  # unchanged: not written again
    assert "gold/orders" in capsys.readouterr().out

    monkeypatch.setenv("C360ML_SPARK_REMOTE", "sc://127.0.0.1:1")
    assert main(["build", "gold", "--engine", "spark"]) == 2
    said = capsys.readouterr().out
    assert "error: Spark Connect at 127.0.0.1:1 is not reachable" in said


def test_refresh_on_spark_builds_every_layer_there(tmp_path, monkeypatch, sail_remote, capsys):
    """`c360ml refresh --engine spark` after an increment: silver, unify and gold are
    written by Spark (Sail), then every profile is re-scored (the feature snapshot and
    scoring run on Spark too: tests/spark/test_features.py compares them with DuckDB's)."""
    from c360ml.model.pipeline import run_training
    from c360ml.model.train import TrainConfig
    from c360ml.synth import generate_increment

    settings = generated_lake(tmp_path / "data", customers=700, seed=11)
    config = TrainConfig(nthread=2, max_trees=40, early_stopping_rounds=10, bootstrap_resamples=30)
    assert run_training(settings, pd.Timestamp("2025-12-31", tz="UTC"), config=config).promoted
    generate_increment(settings)
    user_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("C360ML_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_remote)
    assert main(["refresh", "--engine", "spark"]) == 0
    out = capsys.readouterr().out
    assert "refresh as of" in out and "scores:" in out
    lake = Lake(settings.lake)
    written = {
        where: lake.delta(*where).history(1)[0]["engineInfo"]
        for where in (("silver", "salestable"), ("gold", "customer_source_map"), ("gold", "orders"))
    }
    assert all(engine.startswith("sail") for engine in written.values()), written
    scores = lake.read_pandas("gold", "churn_scores")
    assert scores.ScoredAsOf.nunique() == 1 and scores.CustomerId.is_unique
    assert set(scores.CustomerId) == set(lake.read_pandas("gold", "customer_profile").customer_id)


def test_build_measures_on_spark_from_the_command_line(tmp_path, monkeypatch, sail_remote, capsys):
    """`c360ml build measures --engine spark`: the measures computed by Spark (it fails
    without one), equal to DuckDB's."""
    from c360ml.refresh import snapshot_profiles
    from c360ml.steps import latest_event_time

    settings = generated_lake(tmp_path / "data", customers=300, seed=5)
    lake = Lake(settings.lake)
    expected = snapshot_profiles(settings, latest_event_time(lake), True, None).measures
    user_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("C360ML_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("C360ML_SPARK_REMOTE", "sc://127.0.0.1:1")
    assert main(["build", "measures", "--engine", "spark"]) == 2
    assert "error: Spark Connect at 127.0.0.1:1 is not reachable" in capsys.readouterr().out
    assert not lake.exists("gold", "customer_measures")

    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_remote)
    assert main(["build", "measures", "--engine", "spark"]) == 0
    assert "gold/customer_measures" in capsys.readouterr().out
    written = lake.read_pandas("gold", "customer_measures")
    text = expected.select_dtypes("object").columns  # a null mode is read back as None
    expected[text] = expected[text].astype(object).where(expected[text].notna(), None)
    pd.testing.assert_frame_equal(written, expected, rtol=1e-9)


def test_train_on_spark_from_the_command_line(tmp_path, monkeypatch, sail_remote, capsys):
    """`c360ml train --engine spark`: labels, RFM and the training matrix computed by
    Spark (it fails without one, registering nothing), the model trained on the driver and
    registered as the first champion."""
    import mlflow

    settings = generated_lake(tmp_path / "data", customers=600, seed=21)
    user_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(("C360ML_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    train = ["train", "--as-of", "2025-12-31", "--engine", "spark"]
    monkeypatch.setenv("C360ML_SPARK_REMOTE", "sc://127.0.0.1:1")
    assert main(train) == 2
    assert "error: Spark Connect at 127.0.0.1:1 is not reachable" in capsys.readouterr().out

    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_remote)
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "c360-retention v1 (promoted to champion)" in out and "grade" in out
    log = (settings.path(settings.log_dir) / "c360ml.log").read_text()
    assert "on Spark:" in log  # the features per cutoff
    uri = f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    champion = client.get_model_version_by_alias(settings.model_name, "champion")
    assert str(champion.version) == "1"
    assert not Lake(settings.lake).path("state", "features_spark_scratch").exists()
