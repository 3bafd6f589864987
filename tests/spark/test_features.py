"""Features, measures, labels and batch scores on Spark (Sail) against the DuckDB engine on
the same lake (c360ml.spark.features, reached through the refresh's dispatch).

The refresh's measures, feature snapshot and scores at the lake's last event, made by
each engine on its copy of one generated lake with one small champion: features and
measures equal to 1e-6 relative (counts and the features that are sums, means and
deviations exactly), ChurnScore to 1e-5, IsChurn, RiskLevel and the influential factors
identical for at least 99.9% of profiles, the differences listed in the message; the same
commit records, so one engine keeps what the other wrote. Labels, populations and buyers at other cutoffs equal DuckDB's.
A feature or a measure the SQL generator cannot express, and a user's SQL feature, are
refused before anything is computed, in one line naming them.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
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
from c360ml.features.dfs import _aggregate, _load, summed_names
from c360ml.model import drift
from c360ml.model.scoring import ModelBundle
from c360ml.spark import outputs
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
    # the drift reference of the training rows (a refresh's drift step compares with it)
    reference = drift.references(x, names, booster.predict(xgb.DMatrix(x)))
    return ModelBundle(
        booster,
        names,
        feature_set.dtypes,
        feature_set_json=feature_set.to_json(),
        metadata={"drift_reference": reference},
    )


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
    """Counts exactly, and the features that are sums, means and deviations exactly too:
    both engines encode them on a grid below which the order of the additions leaves its
    residue (`aggregates.encoded`)."""
    duck, on_spark, as_of, steps = refreshed
    assert any("Spark" in s.note for s in steps), [s.note for s in steps]
    counts = {
        f.get_name()
        for f in _load(feature_set)
        if _aggregate(f).primitive in ("count", "num_unique")
    }
    counts |= {"orders_365d", "support_cases_90d"}  # the measures that count
    exact = counts | summed_names(feature_set.definitions_json)
    assert len(exact) > len(counts) + 20
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
                same = np.isclose(
                    a.to_numpy(float),
                    b.to_numpy(float),
                    rtol=0 if name in exact else 1e-6,
                    atol=0 if name in exact else 1e-9,
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
        rows = len(scores) if isinstance(scores, pd.DataFrame) else scores.count()
        assert rows == len(lake.read_pandas("gold", "customer_profile"))


def test_labels_populations_and_buyers_equal_duckdbs(lake, cfg, spark):
    duck = Lake(lake.lake)
    end = latest_event_time(duck)
    cutoffs = [(end - 200 * DAY).floor("D"), end - cfg.window]
    with SparkAsOf(spark, duck, (*SCRATCH, "test")) as view:
        labels = view.labels(cutoffs, cfg)
        pd.testing.assert_frame_equal(labels, compute_labels(lake_gold(duck), cutoffs, cfg))
        assert 0 < labels["label"].mean() < 1 and labels["cutoff_time"].nunique() == 2
        population = view.population(cutoffs, cfg)
        pd.testing.assert_frame_equal(population, active_population(lake_gold(duck), cutoffs, cfg))
        view.build_view(end)
        snap = refresh.snapshot_profiles(lake, end, False, None)  # DuckDB's
        assert view.profile_ids().tolist() == snap.profiles.tolist()
        assert view.buyers(end).tolist() == snap.buyers.tolist()
    assert not duck.path(*SCRATCH, "test").exists()


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


def _rows_at_most(limit: int, seen: list[int]):
    """A toPandas that fails when more than `limit` rows reach the driver."""
    real = ConnectFrame.toPandas

    def collect(frame, *args, **kwargs):
        rows = real(frame, *args, **kwargs)
        seen.append(len(rows))
        assert len(rows) <= limit, f"{len(rows)} rows reached the driver"
        return rows

    return collect


def _export(settings: Settings) -> dict[str, object]:
    """The CI-D export as written: the entity documents, the manifest (the snapshot stamp
    taken out) and each entity's rows, with the files of each snapshot folder."""
    root = Lake(settings.lake).path("export", "ci-d")
    manifest = (root / refresh.MANIFEST).read_text()
    out: dict[str, object] = {"manifest": re.sub(r"snapshot=\w+", "snapshot=*", manifest)}
    for doc in sorted(root.glob("*.cdm.json")):
        if doc.name != refresh.MANIFEST:
            out[doc.name] = json.loads(doc.read_text())
    for folder in ("churn_scores", "contact_map", "feature_glossary"):
        (snapshot,) = (root / folder).iterdir()
        files = sorted(p.name for p in snapshot.iterdir())
        assert files and all(re.fullmatch(r".+\.parquet", f) for f in files), files
        out[folder] = pq.read_table(snapshot).to_pandas()
    return out


def test_counts_export_and_drift_on_spark(refreshed, bundle, monkeypatch):
    """The refresh's steps after scoring, on the Spark lake by each engine: the summary's
    counts, the CI-D export (written by Spark) and drift (bins counted by Spark) equal the
    pandas path's on the same rows, and no more than a few rows reach the driver."""
    _, on_spark, as_of, _ = refreshed
    duck = on_spark.model_copy(update={"engine": "duckdb"})  # the same lake, in pandas
    lake = Lake(on_spark.lake)
    frame = outputs.scores_at(on_spark, as_of)
    rows = refresh._scores_at(lake, as_of)
    seen: list[int] = []
    monkeypatch.setattr(ConnectFrame, "toPandas", _rows_at_most(20, seen))
    counts = refresh.score_counts(on_spark, frame)
    assert counts == refresh.score_counts(duck, rows)
    assert sum(counts[1].values()) == len(rows) and counts[0]
    refresh.export_cid_snapshot(on_spark, frame, bundle)
    measured, outside, estimate = refresh._drift_on_spark(on_spark, as_of, bundle, frame)
    step = refresh.record_drift(on_spark, as_of, bundle, "1", frame)
    monkeypatch.undo()
    assert seen, "nothing was computed on Spark"
    spark_export = _export(on_spark)
    refresh.export_cid_snapshot(duck, rows, bundle)
    duck_export = _export(duck)
    for name, key in (("contact_map", "ContactId"), ("feature_glossary", "Feature")):
        mine = spark_export.pop(name).sort_values(key, ignore_index=True)
        theirs = duck_export.pop(name).sort_values(key, ignore_index=True)
        assert len(mine) > 0, name
        pd.testing.assert_frame_equal(mine, theirs)
    mine = spark_export.pop("churn_scores").sort_values("CustomerId", ignore_index=True)
    theirs = duck_export.pop("churn_scores").sort_values("CustomerId", ignore_index=True)
    assert len(mine) == len(rows) and "ScoredAt" not in mine and mine["ContractVersion"].all()
    pd.testing.assert_frame_equal(mine, theirs)
    assert spark_export == duck_export  # the entity documents and the manifest

    expected, expected_outside, expected_estimate = refresh._drift_in_pandas(
        lake, as_of, bundle, rows
    )
    assert list(measured) == [*bundle.feature_names, drift.SCORE] == list(expected)
    for name, (value, share) in measured.items():
        assert value == pytest.approx(expected[name][0], rel=1e-12, abs=1e-15), name
        assert share == expected[name][1], name
    assert measured[drift.SCORE][0] > 0 and 0 < expected_estimate < 1
    assert outside == expected_outside
    assert estimate == pytest.approx(expected_estimate, rel=1e-9)
    written = lake.read_pandas("gold", "score_drift")
    assert len(written) == len(measured) and "estimated ROC AUC" in step.note
    assert written.set_index("column")["psi"].to_dict() == {k: v[0] for k, v in measured.items()}


def test_outcomes_on_spark(refreshed, bundle, cfg, tmp_path):
    """A closed window's outcome, recorded on the Spark engine (the scored pairs found by
    Spark, the closed window's rows only read): the same row as the DuckDB engine's."""
    _, on_spark, as_of, _ = refreshed
    early = (as_of - cfg.window - DAY).floor("D")
    base = _copy(on_spark, tmp_path / "base")
    # scores whose window has closed (by DuckDB: the outcome step is what is compared)
    in_duckdb = base.model_copy(update={"engine": "duckdb"})
    refresh.measures_and_scores(in_duckdb, early, bundle, "1", EXPLAIN)
    results = {}
    for engine in ("spark", "duckdb"):
        copied = _copy(base, tmp_path / engine, engine=engine)
        step = refresh.record_outcomes(copied)
        assert step.rows == 1, step.note
        results[engine] = Lake(copied.lake).read_pandas("gold", "score_outcomes")
    pd.testing.assert_frame_equal(results["spark"], results["duckdb"])
    assert results["spark"]["ScoredAsOf"].tolist() == [early]
    assert 0.5 < results["spark"]["roc_auc"].iloc[0] <= 1


def test_a_champion_with_new_features(lake, bundle, cfg, feature_set, sail_remote, tmp_path):
    """A champion bringing features customer_features lacks: Spark's replaceWhere adds
    the columns (the earlier as_of's rows null in them), as DuckDB's write does; the
    tables equal."""
    small = feature_set.subset(feature_set.names[:4])
    gold = lake_gold(Lake(lake.lake))
    t = (latest_event_time(Lake(lake.lake)) - cfg.window).floor("D")
    labels = compute_labels(gold, [t], cfg)
    x = calculate_features(gold, labels, small)[small.names].to_numpy(np.float32)
    params = {"objective": "binary:logistic", "max_depth": 2, "nthread": 1, "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(x, label=labels["label"]), num_boost_round=5)
    first = ModelBundle(booster, tuple(small.names), small.dtypes, feature_set_json=small.to_json())
    end = latest_event_time(Lake(lake.lake))
    duck = _copy(lake, tmp_path / "duckdb")
    on_spark = _copy(lake, tmp_path / "spark", engine="spark", spark_remote=sail_remote)
    for settings in (duck, on_spark):
        refresh.measures_and_scores(settings, end - 7 * DAY, first, "1", EXPLAIN)
        refresh.measures_and_scores(settings, end, bundle, "2", EXPLAIN)
    tables = {}
    for settings in (duck, on_spark):
        frame = Lake(settings.lake).read_pandas("gold", "customer_features")
        tables[settings.engine] = frame.sort_values(["as_of", "customer_id"], ignore_index=True)
    mine, theirs = tables["spark"], tables["duckdb"]
    assert list(theirs.columns) == ["customer_id", "as_of", *feature_set.names]
    assert list(mine.columns) == list(theirs.columns)
    new = feature_set.names[4]
    assert theirs.loc[theirs["as_of"] < end, new].isna().all()
    assert theirs.loc[theirs["as_of"] == end, new].notna().any()
    pd.testing.assert_frame_equal(mine, theirs, rtol=1e-6, check_dtype=False)
