"""Training's frames on Spark (Sail) against the DuckDB engine on the same lake
(c360ml.spark.features.training_frames, reached through `prepare_training`'s dispatch).

The same sampled customers (a sample forced by small caps, so the Spark session is one of
some customers, as the DuckDB one), the same labels, the same candidate definitions
(derived on Spark's view: its categories and top values), the same selected features,
RFM, and the matrix's features equal to 1e-6 relative (counts exactly), the differences
listed in the message. A candidate the SQL generator cannot express, and a user's SQL
feature, are refused in one line naming them (the SQL feature before any Spark work).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from c360ml.config import Settings
from c360ml.features.dfs import _aggregate, _load
from c360ml.model.pipeline import prepare_training
from c360ml.model.train import TrainConfig
from c360ml.spark.features import SCRATCH, SparkFeatureError
from c360ml.steps import latest_event_time
from c360ml.storage.lake import Lake
from tests.conftest import generated_lake

CUSTOMERS, SEED = 1000, 17
# Caps below the lake's customers: both engines read a sample (rate 0.3 at the training
# cutoffs, 0.6 at the test cutoff).
SAMPLED = TrainConfig(max_train_customers=300, max_test_customers=600)


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Settings:
    """A generated lake built through gold (by DuckDB)."""
    return generated_lake(tmp_path_factory.mktemp("spark_training"), CUSTOMERS, SEED)


@pytest.fixture(scope="module")
def as_of(lake) -> pd.Timestamp:
    return latest_event_time(Lake(lake.lake)).floor("D")


@pytest.fixture(scope="module")
def prepared(lake, as_of, sail_remote):
    """(DuckDB's TrainingData, Spark's) for the same as_of and sampling."""
    duck = prepare_training(lake, as_of, config=SAMPLED)
    on_spark = lake.model_copy(update={"engine": "spark", "spark_remote": sail_remote})
    return duck, prepare_training(on_spark, as_of, config=SAMPLED)


def _differences(mask: np.ndarray, frame: pd.DataFrame, limit: int = 10) -> str:
    return f"{int(mask.sum())} of {len(mask)} differ:\n{frame.loc[mask].head(limit).to_string()}"


def test_the_same_sample_labels_and_definitions(prepared):
    duck, mine = prepared
    assert 0 < mine.sample_rate < mine.test_sample_rate < 1  # a sampled session
    assert (mine.sample_rate, mine.test_sample_rate) == (duck.sample_rate, duck.test_sample_rate)
    assert mine.candidate_customers == duck.candidate_customers
    assert mine.plan == duck.plan
    keys = ["customer_id", "cutoff_time", "label"]
    pd.testing.assert_frame_equal(mine.matrix[keys], duck.matrix[keys])
    assert len(mine.matrix) > 1000 and 0 < mine.matrix["label"].mean() < 1
    assert mine.matrix["cutoff_time"].nunique() > 6
    assert mine.candidates.names == duck.candidates.names
    assert mine.candidates.definitions_json == duck.candidates.definitions_json
    assert any("WHERE status = " in n for n in mine.candidates.names)  # the top values
    assert mine.features.names == duck.features.names
    assert mine.dropped == duck.dropped
    pd.testing.assert_frame_equal(mine.rfm, duck.rfm, rtol=1e-6)
    assert set(mine.seconds) == set(duck.seconds)


def test_the_matrix_equals_duckdbs(prepared, lake):
    duck, mine = prepared
    counts = {
        f.get_name()
        for f in _load(duck.candidates)
        if _aggregate(f).primitive in ("count", "num_unique")
    }
    assert len(counts) > 10
    assert list(mine.matrix.columns) == list(duck.matrix.columns)
    assert mine.matrix.dtypes.to_dict() == duck.matrix.dtypes.to_dict()
    for name in duck.candidates.names:
        a, b = mine.matrix[name].to_numpy(float), duck.matrix[name].to_numpy(float)
        exact = name in counts
        same = np.isclose(
            a,
            b,
            rtol=0 if exact else 1e-6,
            atol=0 if exact else 1e-9,
            equal_nan=True,
        )
        both = pd.DataFrame({"customer_id": mine.matrix["customer_id"], "spark": a, "duckdb": b})
        assert same.all(), f"{name}: " + _differences(~same, both)
    assert not Lake(lake.lake).path(*SCRATCH).exists(), "the scratch is left behind"


SPEC = """
churn: {prediction_window_days: 90, active_lookback_days: 365, cutoff_count: 3}
dfs:
  max_depth: 1
  windows_days: []
  agg_primitives: [count, skew]
  windowed_primitives: []
  allowed_paths: [[customers, orders]]
  primitive_options:
    skew: {include_columns: {orders: [net_amount]}}
"""

SQL_FEATURE = """
sql_features:
  - name: purchases_14d
    table: orders
    expression: count(*)
"""


def test_a_feature_the_sql_cannot_express_is_refused(lake, as_of, sail_remote, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    on_spark = lake.model_copy(
        update={"engine": "spark", "spark_remote": sail_remote, "feature_spec": spec}
    )
    with pytest.raises(SparkFeatureError) as refused:
        prepare_training(on_spark, as_of)
    message = str(refused.value)
    assert "feature 'SKEW(orders.net_amount)'" in message and "cannot express" in message
    assert "\n" not in message

    # a user's SQL feature: refused before Spark is reached (there is no server here)
    spec.write_text(SPEC.replace("[count, skew]", "[count]") + SQL_FEATURE)
    nowhere = on_spark.model_copy(update={"spark_remote": "sc://127.0.0.1:1"})
    with pytest.raises(SparkFeatureError, match="'purchases_14d' is a SQL feature"):
        prepare_training(nowhere, as_of)


CHAMPION_SPEC = """
churn: {prediction_window_days: 90, active_lookback_days: 365}
dfs:
  max_depth: 1
  windows_days: [14]
  agg_primitives: [count, sum]
  windowed_primitives: [count, sum]
  allowed_paths: [[customers, orders]]
  primitive_options:
    sum: {include_columns: {orders: [net_amount]}}
"""


def test_the_champions_rows_on_spark(prepared, lake, sail_remote, tmp_path, monkeypatch):
    """The gate's rows of a champion whose features the challenger's matrix lacks (a
    14-day window) are computed by Spark with --engine spark, equal to DuckDB's."""
    import dataclasses

    import xgboost as xgb

    from c360ml import features as ft
    from c360ml.model.pipeline import champion_rows
    from c360ml.model.scoring import ModelBundle

    # two of the cutoffs: the same code as all of them, in the suite's time
    last = sorted(prepared[0].matrix["cutoff_time"].unique())[-2:]
    duck, mine = (
        dataclasses.replace(d, matrix=d.matrix[d.matrix["cutoff_time"].isin(last)])
        for d in prepared
    )
    spec = tmp_path / "champion.yaml"
    spec.write_text(CHAMPION_SPEC)
    fs = ft.derive_feature_set(ft.lake_gold(Lake(lake.lake)), spec)
    new = [n for n in fs.names if n not in duck.matrix.columns]
    assert any(n.endswith("_14d") for n in new), fs.names
    x = np.random.default_rng(0).random((20, len(fs.names)), dtype=np.float32)
    booster = xgb.train({"nthread": 1}, xgb.DMatrix(x, label=np.arange(20) % 2), 2)
    champion = ModelBundle(booster, tuple(fs.names), fs.dtypes, feature_set_json=fs.to_json())
    theirs = champion_rows(lake, duck, champion)

    def refused(*args, **kwargs):
        raise AssertionError("computed by DuckDB with --engine spark")

    monkeypatch.setattr(ft, "calculate_features", refused)
    on_spark = lake.model_copy(update={"engine": "spark", "spark_remote": sail_remote})
    rows = champion_rows(on_spark, mine, champion)
    assert list(rows.columns) == ["customer_id", "cutoff_time", "label", *fs.names]
    assert len(rows) == len(mine.matrix) > 300 and rows["cutoff_time"].nunique() == 2
    assert rows[new].notna().any().all()
    pd.testing.assert_frame_equal(rows, theirs, rtol=1e-6)
    assert not Lake(lake.lake).path(*SCRATCH).exists(), "the scratch is left behind"
