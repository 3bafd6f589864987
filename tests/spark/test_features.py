"""Features, measures, labels and batch scores on Spark (Sail) against the DuckDB engine on
the same lake (c360ml.spark.features, reached through the refresh's dispatch).

The refresh's measures, feature snapshot and scores at the lake's last event, made by
each engine on its copy of one generated lake with one small champion: features and
measures equal to 1e-6 relative (counts exactly), ChurnScore to 1e-5, IsChurn, RiskLevel
and the influential factors identical for at least 99.9% of profiles, the differences
listed in the message; the same commit records, so one engine keeps what the other
wrote. Labels, populations and buyers at other cutoffs equal DuckDB's. A feature or a
measure the SQL generator cannot express, and a user's SQL feature, are refused before
anything is computed, in one line naming them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from pyspark.sql.connect.dataframe import DataFrame as ConnectFrame

from c360ml import refresh
from c360ml.config import Settings
from c360ml.features import (
    Measure,
    active_population,
    calculate_features,
    compute_labels,
    derive_feature_set,
    lake_gold,
    load_churn_config,
)
from c360ml.features.dfs import _aggregate, _load
from c360ml.model.scoring import ModelBundle
from c360ml.spark.features import (
    SCRATCH,
    SparkAsOf,
    SparkFeatureError,
    plan_features,
    plan_measures,
)
from c360ml.steps import latest_event_time
from c360ml.storage.lake import Lake
from tests.conftest import generated_lake

CUSTOMERS, SEED = 1000, 13
DAY = pd.Timedelta(days=1)
EXPLAIN = "approx"
AGREE = 0.999  # share of profiles whose IsChurn, RiskLevel and factors must be identical


def _copy(settings: Settings, folder: Path, **update) -> Settings:
    copied = settings.model_copy(update={"lake_root": folder / "lake", **update})
    shutil.copytree(settings.lake, copied.lake)
    return copied


def _differences(mask: np.ndarray, frame: pd.DataFrame, limit: int = 10) -> str:
    rows = frame.loc[mask].head(limit).to_string()
    return f"{int(mask.sum())} of {len(mask)} differ:\n{rows}"


def _text(values: pd.Series) -> pd.Series:
    return values.astype("string").fillna("<null>")


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Settings:
    """A generated lake built through gold (by DuckDB)."""
    folder = tmp_path_factory.mktemp("spark_features")
    return generated_lake(folder / "base", customers=CUSTOMERS, seed=SEED)


@pytest.fixture(scope="module")
def cfg(lake):
    return load_churn_config(lake.path(lake.feature_spec))


@pytest.fixture(scope="module")
def feature_set(lake):
    return derive_feature_set(lake_gold(Lake(lake.lake)), lake.path(lake.feature_spec))


@pytest.fixture(scope="module")
def bundle(lake, cfg, feature_set) -> ModelBundle:
    """A small champion: a booster trained on the lake's features and labels a window
    before its end (computed by DuckDB), carrying the feature set."""
    gold = lake_gold(Lake(lake.lake))
    t = (latest_event_time(Lake(lake.lake)) - cfg.window).floor("D")
    labels = compute_labels(gold, [t], cfg)
    matrix = calculate_features(gold, labels, feature_set)
    x = matrix[feature_set.names].to_numpy(np.float32)
    params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "nthread": 1, "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(x, label=labels["label"]), num_boost_round=40)
    names = tuple(feature_set.names)
    return ModelBundle(booster, names, feature_set.dtypes, feature_set_json=feature_set.to_json())


@pytest.fixture(scope="module")
def refreshed(lake, bundle, spark, sail_remote, tmp_path_factory):
    """(DuckDB's copy, Spark's copy, as_of, Spark's steps): the refresh's measures,
    feature snapshot and scores at the lake's last event, by each engine."""
    folder = tmp_path_factory.mktemp("spark_features_refreshed")
    duck = _copy(lake, folder / "duckdb")
    on_spark = _copy(lake, folder / "spark", engine="spark", spark_remote=sail_remote)
    as_of = latest_event_time(Lake(lake.lake))
    refresh.measures_and_scores(duck, as_of, bundle, "1", EXPLAIN)
    with pytest.MonkeyPatch.context() as patch:  # Spark writes: no rows come to pandas
        patch.setattr(ConnectFrame, "toPandas", _no_rows)
        steps, _ = refresh.measures_and_scores(on_spark, as_of, bundle, "1", EXPLAIN)
    return duck, on_spark, as_of, steps


def _no_rows(frame, *args, **kwargs):
    raise AssertionError("the Spark refresh collected rows to the driver")


def _at(settings: Settings, table: str, column: str, as_of: pd.Timestamp) -> pd.DataFrame:
    """A table's rows at as_of as written, by key (Spark's writer files them in any order)."""
    frame = Lake(settings.lake).read_pandas("gold", table)
    frame = frame[frame[column] == as_of]
    return frame.sort_values(frame.columns[0], ignore_index=True)


def test_features_and_measures_equal_duckdbs(refreshed, feature_set):
    duck, on_spark, as_of, steps = refreshed
    assert any("Spark" in s.note for s in steps), [s.note for s in steps]
    counts = {
        f.get_name()
        for f in _load(feature_set)
        if _aggregate(f).primitive in ("count", "num_unique")
    }
    counts |= {"orders_365d", "support_cases_90d"}  # the measures that count
    for table in ("customer_features", "customer_measures"):
        mine, theirs = _at(on_spark, table, "as_of", as_of), _at(duck, table, "as_of", as_of)
        assert len(theirs) > 300, f"{table}: too few rows to compare"
        assert list(mine.columns) == list(theirs.columns)
        assert mine["customer_id"].tolist() == theirs["customer_id"].tolist(), table
        assert mine.dtypes.to_dict() == theirs.dtypes.to_dict(), table
        for name in mine.columns[2:]:
            a, b = mine[name], theirs[name]
            if not pd.api.types.is_numeric_dtype(b):  # the mode of a category
                same = (_text(a) == _text(b)).to_numpy()
            else:
                exact = name in counts
                same = np.isclose(
                    a.to_numpy(float),
                    b.to_numpy(float),
                    rtol=0 if exact else 1e-6,
                    atol=0 if exact else 1e-9,
                    equal_nan=True,
                )
            both = pd.DataFrame({"customer_id": mine["customer_id"], "spark": a, "duckdb": b})
            assert same.all(), f"{table}.{name}: " + _differences(~same, both)


def test_scores_equal_duckdbs(refreshed, bundle):
    duck, on_spark, as_of, _ = refreshed
    mine = _at(on_spark, "churn_scores", "ScoredAsOf", as_of)
    theirs = _at(duck, "churn_scores", "ScoredAsOf", as_of)
    assert mine["CustomerId"].tolist() == theirs["CustomerId"].tolist()
    assert mine["ScoreStatus"].tolist() == theirs["ScoreStatus"].tolist()
    scored = (theirs["ScoreStatus"] == refresh.SCORED).to_numpy()
    assert scored.sum() > 300 and theirs.loc[scored, "IsChurn"].nunique() == 2
    both = pd.DataFrame(
        {
            "CustomerId": mine["CustomerId"],
            "spark": mine["ChurnScore"],
            "duckdb": theirs["ChurnScore"],
            "spark_risk": mine["RiskLevel"],
            "duckdb_risk": theirs["RiskLevel"],
        }
    )
    close = np.isclose(mine["ChurnScore"], theirs["ChurnScore"], rtol=0, atol=1e-5, equal_nan=True)
    assert close.all(), "ChurnScore: " + _differences(~close, both)
    for column in ("IsChurn", "RiskLevel"):
        same = (_text(mine[column]) == _text(theirs[column])).to_numpy()
        assert same.mean() >= AGREE, f"{column}: " + _differences(~same, both)

    # the factors' text: features, values, impacts and directions
    same = (_text(mine["InfluentialFactors"]) == _text(theirs["InfluentialFactors"])).to_numpy()
    both["spark_factors"] = mine["InfluentialFactors"].str.slice(0, 60)
    assert same.mean() >= AGREE, "InfluentialFactors: " + _differences(~same, both)
    names = [f["feature"] for f in json.loads(mine.loc[scored, "InfluentialFactors"].iloc[0])]
    assert len(names) == 5 and set(names) <= set(bundle.feature_names)
    assert (mine.loc[scored, "InfluentialFactors"].str.len() > 2).all()
    assert not Lake(on_spark.lake).path(*SCRATCH).exists(), "the scratch is left behind"


def test_each_engine_keeps_what_the_other_wrote(refreshed, bundle):
    """The same commit records: a refresh of the same inputs and model on the other
    engine writes nothing."""
    duck, on_spark, as_of, _ = refreshed
    for settings, other in ((duck, "spark"), (on_spark, "duckdb")):
        lake = Lake(settings.lake)
        tables = ("customer_features", "customer_measures", "churn_scores")
        versions = {t: lake.version("gold", t) for t in tables}
        switched = settings.model_copy(update={"engine": other})
        steps, scores = refresh.measures_and_scores(switched, as_of, bundle, "1", EXPLAIN)
        assert [s.note for s in steps] == ["unchanged inputs: kept"]
        assert {t: lake.version("gold", t) for t in tables} == versions
        assert len(scores) == len(lake.read_pandas("gold", "customer_profile"))


def test_labels_populations_and_buyers_equal_duckdbs(lake, cfg, spark, tmp_path):
    duck = Lake(lake.lake)
    end = latest_event_time(duck)
    cutoffs = [(end - 200 * DAY).floor("D"), end - cfg.window]
    with SparkAsOf(spark, duck, tmp_path / "scratch") as view:
        labels = view.labels(cutoffs, cfg)
        pd.testing.assert_frame_equal(labels, compute_labels(lake_gold(duck), cutoffs, cfg))
        assert 0 < labels["label"].mean() < 1 and labels["cutoff_time"].nunique() == 2
        population = view.population(cutoffs, cfg)
        pd.testing.assert_frame_equal(population, active_population(lake_gold(duck), cutoffs, cfg))
        view.build_view(end)
        snap = refresh.snapshot_profiles(lake, end, False, None)  # DuckDB's
        assert view.profile_ids().tolist() == snap.profiles.tolist()
        assert view.buyers(end).tolist() == snap.buyers.tolist()
    assert not (tmp_path / "scratch").exists()


def test_build_measures_on_spark_equals_duckdb(lake, spark, sail_remote):
    """`snapshot_profiles` (what `c360ml build measures` runs) through the dispatch."""
    end = latest_event_time(Lake(lake.lake))
    mine = refresh.snapshot_profiles(
        lake.model_copy(update={"engine": "spark", "spark_remote": sail_remote}), end, True, None
    )
    theirs = refresh.snapshot_profiles(lake, end, True, None)
    assert mine.features is None and "Spark" in mine.note
    pd.testing.assert_frame_equal(mine.measures, theirs.measures, rtol=1e-9)
    assert mine.profiles.tolist() == theirs.profiles.tolist()


def test_a_lake_without_support_cases(lake, spark, sail_remote, tmp_path):
    """Gold tables a lake lacks (no Dataverse source: no cases) are empty relations, as
    on DuckDB: the same measures."""
    copied = _copy(lake, tmp_path, engine="spark", spark_remote=sail_remote)
    for table in ("support_cases", "case_status_history"):
        shutil.rmtree(Lake(copied.lake).path("gold", table))
    end = latest_event_time(Lake(copied.lake))
    mine = refresh.snapshot_profiles(copied, end, True, None).measures
    theirs = refresh.snapshot_profiles(
        copied.model_copy(update={"engine": "duckdb"}), end, True, None
    )
    pd.testing.assert_frame_equal(mine, theirs.measures, rtol=1e-9)
    assert (mine["support_cases_90d"] == 0).all() and mine["orders_365d"].gt(0).any()


SPEC = """
churn: {prediction_window_days: 90, active_lookback_days: 365}
dfs:
  max_depth: 1
  windows_days: []
  agg_primitives: [count, skew]
  windowed_primitives: []
  allowed_paths: [[customers, orders]]
  primitive_options:
    skew: {include_columns: {orders: [net_amount]}}
"""


def test_a_feature_the_sql_cannot_express_is_refused(lake, bundle, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    fs = derive_feature_set(lake_gold(Lake(lake.lake)), spec)
    assert "SKEW(orders.net_amount)" in fs.names
    with pytest.raises(SparkFeatureError) as refused:
        plan_features(fs)
    message = str(refused.value)
    assert "'SKEW(orders.net_amount)'" in message and "cannot express" in message
    assert "\n" not in message

    # the refresh refuses it before Spark computes or the lake gets anything
    copied = _copy(lake, tmp_path / "copy", engine="spark", spark_remote="sc://127.0.0.1:1")
    champion = replace(bundle, feature_set_json=fs.to_json())
    as_of = latest_event_time(Lake(lake.lake))
    with pytest.raises(SparkFeatureError, match=r"SKEW\(orders\.net_amount\)"):
        refresh.measures_and_scores(copied, as_of, champion, "1", EXPLAIN)
    assert not Lake(copied.lake).exists("gold", "churn_scores")

    sql = {"name": "purchases_14d", "table": "orders", "expression": "count(*)"}
    with_sql = replace(
        fs,
        names=[*fs.names, "purchases_14d"],
        dtypes={**fs.dtypes, "purchases_14d": "float32"},
        meta={**fs.meta, "sql_features": [sql]},
    )
    with pytest.raises(SparkFeatureError, match="'purchases_14d' is a SQL feature"):
        plan_features(with_sql)

    skew = Measure(name="spend_skew", primitive="skew", column="net_amount")
    with pytest.raises(SparkFeatureError, match="measure 'spend_skew': the SQL generator cannot"):
        plan_measures([skew])
