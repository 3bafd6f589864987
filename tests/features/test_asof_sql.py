"""The as-of view, population and labels in SQL (c360ml.features.asof) against the pandas
path they replace (features.gold, features.labels; the "pandas" feature engine).

On generated lakes read through the Lake (the shared one, with 21 months of data after the
earliest cutoff, and one after an increment whose gold patches are deletion vectors), at
several cutoffs: the view's rows, the labels, the populations and the RFM inputs are
equal; features and measures equal to 1e-6 relative (sums that cancel may leave 1e-15
where pandas' order of summation leaves 0), counts exactly. Then the rules themselves:
dirty status histories (overlaps, ties, gaps, no valid row yet) resolve as the pandas
StatusTimeline resolves them at every instant that matters, nothing after t reaches the
view, and the same SQL in Spark's dialect runs on Spark (Sail) with the same results.
"""

from __future__ import annotations

from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from c360ml.features import (
    active_population,
    asof,
    buyers_and_active,
    calculate_features,
    calculate_snapshot,
    compute_labels,
    compute_rfm,
    derive_feature_set,
    lake_gold,
    load_churn_config,
    load_measures,
    read_gold,
    training_cutoffs,
)
from c360ml.features.aggregates import activity_frames
from c360ml.features.dfs import _aggregate, _load
from c360ml.features.gold import GOLD_TABLES, GoldTables, standardise_gold, view_as_of
from c360ml.storage.lake import Lake
from tests.conftest import build_all, generated_lake, write_gold

from .tiny_gold import CFG, DAY, MEASURES, SPEC, T, _hist, make_gold, validate

UTC = "UTC"
# Keys that order each view relation's rows, to compare them as sets.
KEYS = {
    "customers": ["customer_id"],
    "orders": ["order_id"],
    "order_lines": ["order_id", "item_id", "category", "qty", "unit_price", "net_amount"],
    "support_cases": ["case_id"],
    "products": ["item_id"],
}


def _cutoffs(gold: GoldTables) -> list[pd.Timestamp]:
    """Four cutoffs over the lake's span: two with more than a year of later data, one a
    window before its end, and its last event (what a refresh uses)."""
    end = standardise_gold(gold).orders["order_ts"].max()
    return [
        pd.Timestamp("2024-03-31", tz=UTC),
        pd.Timestamp("2024-11-15 12:34:56.789012", tz=UTC),
        (end - 90 * DAY).floor("D"),
        end,
    ]


def _sorted(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    keys = [k for k in KEYS[name] if k in frame.columns]
    out = frame.drop(columns=["line_id"], errors="ignore")
    return out.sort_values(keys, kind="stable", ignore_index=True)


def assert_same_view(gold: GoldTables, sql: asof.AsOfSql, t: pd.Timestamp) -> None:
    """The SQL view at t holds the pandas view's rows, value for value."""
    sql.build_view(t)
    mine = sql.frames()
    reference = activity_frames(view_as_of(gold, t))
    for name, frame in reference.items():
        got = _sorted(mine[name], name)
        want = _sorted(frame, name)[list(got.columns)]
        pd.testing.assert_frame_equal(got, want, check_dtype=False, obj=f"{name} at {t}")
    assert len(mine["orders"]) and mine["orders"]["order_ts"].max() <= t


def assert_close(sql: pd.DataFrame, reference: pd.DataFrame, counts: list[str]) -> None:
    """Same keys; counts exactly, every other value to 1e-6 relative (1e-9 absolute for a
    sum of amounts that cancel)."""
    assert list(sql.columns) == list(reference.columns)
    pd.testing.assert_frame_equal(sql.iloc[:, :2], reference.iloc[:, :2])
    for name in sql.columns[2:]:
        a, b = sql[name].to_numpy(float), reference[name].to_numpy(float)
        exact = name in counts
        same = np.isclose(
            a, b, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-9, equal_nan=True
        )
        assert same.all(), f"{name}: sql {a[~same][:3]} != pandas {b[~same][:3]}"


def _counts(fs) -> list[str]:
    return [
        f.get_name()
        for f in _load(fs)
        if (a := _aggregate(f)) is not None and a.primitive in ("count", "num_unique")
    ]


@pytest.fixture(scope="module")
def increment_lake(tmp_path_factory):
    """A generated lake built, then one more weekly sync (later orders, status changes,
    erasures) built on top: gold's order tables patched with deletion vectors."""
    from c360ml.synth import generate_increment

    settings = generated_lake(tmp_path_factory.mktemp("asof_increment"), customers=900, seed=5)
    generate_increment(settings)
    build_all(settings)
    lake = Lake(settings.lake)
    assert lake.live_files("gold", "orders")[1], "the increment should patch gold/orders"
    return lake


@pytest.fixture(scope="module", params=["shared", "increment"])
def lake(request, shared_lake, increment_lake) -> Lake:
    return Lake(shared_lake.lake) if request.param == "shared" else increment_lake


@pytest.fixture(scope="module")
def frames(lake) -> GoldTables:
    """The lake's gold read into pandas: the reference path's input."""
    return read_gold(lake)


@pytest.fixture(scope="module")
def lake_features(frames):
    return derive_feature_set(frames, SPEC)


def test_the_sql_view_holds_the_pandas_views_rows(lake, frames):
    with asof.AsOfSql(lake_gold(lake)) as sql:
        for t in _cutoffs(frames):
            assert_same_view(standardise_gold(frames), sql, t)


def test_labels_population_buyers_and_rfm_are_equal(lake, frames):
    cfg = load_churn_config(SPEC)
    cutoffs = training_cutoffs(cfg, _cutoffs(frames)[-1].floor("D"))
    source = lake_gold(lake)
    labels = compute_labels(source, cutoffs, cfg)
    assert len(labels) > 1000 and 0 < labels["label"].mean() < 1
    pd.testing.assert_frame_equal(labels, compute_labels(frames, cutoffs, cfg))
    pd.testing.assert_frame_equal(
        active_population(source, cutoffs, cfg), active_population(frames, cutoffs, cfg)
    )
    rfm, reference = compute_rfm(source, cutoffs), compute_rfm(frames, cutoffs)
    pd.testing.assert_frame_equal(rfm.iloc[:, :4], reference.iloc[:, :4])  # recency, frequency
    assert np.allclose(rfm["monetary_365d"], reference["monetary_365d"], rtol=1e-6)
    for t in _cutoffs(frames):
        for mine, theirs in zip(
            buyers_and_active(source, t, cfg), buyers_and_active(frames, t, cfg), strict=True
        ):
            assert list(mine) == list(theirs)


def test_features_at_several_cutoffs_are_equal(lake, frames, lake_features):
    cfg = load_churn_config(SPEC)
    population = active_population(frames, _cutoffs(frames), cfg)
    assert population["cutoff_time"].nunique() == 4 and len(population) > 1000
    sql = calculate_features(lake_gold(lake), population, lake_features)
    reference = calculate_features(frames, population, lake_features, engine="pandas")
    assert_close(sql, reference, _counts(lake_features))
    assert sql["COUNT(orders)"].gt(0).all()
    # The cutoffs shared among two processes (as training does): the same values, bit for bit.
    shared = calculate_features(lake_gold(lake), population, lake_features, workers=2)
    pd.testing.assert_frame_equal(shared, sql, check_exact=True)


def test_measures_and_snapshot_are_equal(lake, frames, lake_features):
    measures = load_measures(MEASURES)
    t = _cutoffs(frames)[-1]
    _, active = buyers_and_active(frames, t, load_churn_config(SPEC))
    sql_m, sql_f = calculate_snapshot(lake_gold(lake), t, measures, lake_features, active)
    ref_m, ref_f = calculate_snapshot(frames, t, measures, lake_features, active, engine="pandas")
    assert len(sql_m) == len(frames.customers) and len(sql_f) == len(active)
    assert_close(sql_f, ref_f, _counts(lake_features))
    assert list(sql_m.index) == list(ref_m.index)
    for m in measures:
        a, b = sql_m[m.name], ref_m[m.name]
        if m.primitive in ("count", "mode"):
            pd.testing.assert_series_equal(a, b, check_dtype=False)
        else:
            assert np.allclose(a.astype(float), b.astype(float), rtol=1e-9, equal_nan=True), m.name


def test_feature_definitions_derived_from_the_lake_are_the_same(lake, frames, lake_features):
    fs = derive_feature_set(lake_gold(lake), SPEC)
    assert fs.names == lake_features.names
    assert fs.definitions_json == lake_features.definitions_json


def test_a_sample_of_customers_reads_only_theirs(lake, frames):
    cfg = load_churn_config(SPEC)
    ids = pd.Index(sorted(frames.customers["customer_id"]))[::3]
    cutoffs = training_cutoffs(cfg, _cutoffs(frames)[-1].floor("D"))
    labels = compute_labels(lake_gold(lake, customers=ids), cutoffs, cfg)
    full = compute_labels(frames, cutoffs, cfg)
    expected = full[full["customer_id"].isin(set(ids))].reset_index(drop=True)
    pd.testing.assert_frame_equal(labels, expected)


# ---------------------------------------------------------------- the rules, by hand

START = pd.Timestamp("2025-01-01", tz=UTC)
US = pd.Timedelta(microseconds=1)


def _dirty_gold() -> GoldTables:
    """Tiny gold whose order histories are dirty in every way the rule resolves."""
    gold = make_gold()
    at = {i: START + i * DAY for i in range(0, 40)}
    rows = [
        # D1: overlapping rows, two of them with the same start and end (where those are
        # the latest started, the cancelled one wins)
        _hist("D1", "open", False, at[0], at[10]),
        _hist("D1", "delivered", False, at[4], None),
        _hist("D1", "cancelled", True, at[5], at[8]),
        _hist("D1", "invoiced", False, at[5], at[8]),
        # D2: a gap between its rows, and a first row that starts after the order
        _hist("D2", "open", False, at[10], at[20]),
        _hist("D2", "cancelled", True, at[30], None),
        # D3: a row without a start (never valid) and exact duplicates of another
        _hist("D3", "unknown", True, None, None),
        _hist("D3", "delivered", False, at[3], None),
        _hist("D3", "delivered", False, at[3], None),
        # D4: only a row without a start: that row applies at every t
        _hist("D4", "voided", True, None, at[12]),
        # D5: a row that ends before it starts (never valid)
        _hist("D5", "invoiced", False, at[15], at[2]),
        _hist("D5", "cancelled", True, at[25], None),
    ]
    ids = ["D1", "D2", "D3", "D4", "D5", "D6"]  # D6: no history at all
    orders = gold.orders.iloc[[0] * 6].reset_index(drop=True)
    orders = orders.assign(  # each the only purchase of a customer of its own
        order_id=ids,
        customer_id=[f"C{i}" for i in ids],
        order_ts=[START - DAY] * 6,
        status=["current"] * 6,
        is_cancelled=[True, False, False, False, True, True],
    )
    profiles = gold.customers.iloc[[0] * 6].assign(customer_id=[f"C{i}" for i in ids])
    history = pd.DataFrame(rows)
    for column in ("valid_from", "valid_to"):  # a null start is not valid gold: no validate()
        history[column] = pd.to_datetime(history[column], utc=True).dt.as_unit("us")
    gold = validate(
        replace(
            gold,
            customers=pd.concat([gold.customers, profiles], ignore_index=True),
            orders=pd.concat([gold.orders, orders], ignore_index=True),
        )
    )
    return replace(gold, order_status=pd.concat([gold.order_status, history], ignore_index=True))


def _instants(history: pd.DataFrame) -> list[pd.Timestamp]:
    """Every start and end in the history, a microsecond either side, and far before."""
    points = pd.concat([history["valid_from"], history["valid_to"]]).dropna().unique()
    out = {START - 400 * DAY}
    for p in points:
        out |= {pd.Timestamp(p) - US, pd.Timestamp(p), pd.Timestamp(p) + US}
    return sorted(out)


@pytest.mark.parametrize("source", ["frames", "lake"])
def test_dirty_histories_resolve_as_the_status_timeline_does(source, tmp_path):
    gold = _dirty_gold()
    if source == "lake":
        lake = Lake(tmp_path / "lake")
        write_gold(lake, gold)
        gold, where = read_gold(lake), lake_gold(lake)
    else:
        where = gold
    dirty = gold.order_status[gold.order_status["entity_id"].str.startswith("D")]
    instants = _instants(dirty)
    with asof.AsOfSql(where) as sql:
        for t in instants:
            assert_same_view(standardise_gold(gold), sql, t)
        # Each dirty order is its customer's only purchase: whether the customer is active,
        # a buyer or churned at t is that order's is_cancelled at t.
        cfg = load_churn_config(SPEC)
        pd.testing.assert_frame_equal(
            sql.population(instants, cfg), active_population(gold, instants, cfg)
        )
        pd.testing.assert_frame_equal(
            sql.labels(instants, CFG), compute_labels(gold, instants, CFG)
        )
        pd.testing.assert_frame_equal(sql.rfm(instants, 365 * DAY), compute_rfm(gold, instants))
        for t in instants:
            mine, theirs = sql.buyers_and_active(t, cfg), buyers_and_active(gold, t, cfg)
            assert [list(x) for x in mine] == [list(x) for x in theirs]
    # Spot checks of the rule itself, beside the equality with the pandas timeline.
    with asof.AsOfSql(where) as sql:
        sql.build_view(START + 6 * DAY)
        got = sql.query("SELECT order_id, status, is_cancelled FROM orders").set_index("order_id")
    assert tuple(got.loc["D1"]) == ("cancelled", True)  # a tie of start and end
    assert tuple(got.loc["D2"]) == ("open", False)  # none valid yet: the first row
    assert tuple(got.loc["D4"]) == ("voided", True)  # never valid: the first row always
    assert tuple(got.loc["D6"]) == ("current", True)  # no history: the current value


def test_events_and_status_changes_after_t_do_not_reach_the_sql_view(gold):
    """Later orders, lines, cases and status changes leave the SQL view at T as it was,
    row for row; the same changes show in the view at a later cutoff (so this can fail)."""
    later = T + pd.Timedelta(seconds=1)
    order = gold.orders.iloc[[0]].assign(order_id="O99", order_ts=later)
    line = gold.order_lines.iloc[[0]].assign(order_id="O99")
    case = gold.support_cases.iloc[[0]].assign(case_id="K9", created_ts=later)
    order_status = gold.order_status.copy()  # O1 (T-137 d) cancelled a day after T
    order_status.loc[order_status["entity_id"] == "O1", "valid_to"] = T + DAY
    case_status = gold.case_status.copy()  # K1 resolved at T + 1 µs instead of T + 3 d
    k1 = case_status["entity_id"] == "K1"
    case_status.loc[k1 & (case_status["status"] == "active"), "valid_to"] = T + US
    case_status.loc[k1 & (case_status["status"] == "resolved"), "valid_from"] = T + US
    changed = validate(
        replace(
            gold,
            orders=pd.concat([gold.orders, order], ignore_index=True),
            order_lines=pd.concat([gold.order_lines, line], ignore_index=True),
            support_cases=pd.concat([gold.support_cases, case], ignore_index=True),
            order_status=pd.concat(
                [
                    order_status,
                    pd.DataFrame(
                        [
                            _hist("O99", "invoiced", False, later, None),
                            _hist("O1", "cancelled", True, T + DAY, None),
                        ]
                    ),
                ],
                ignore_index=True,
            ),
            case_status=pd.concat(
                [case_status, pd.DataFrame([_hist("K9", "active", False, later, None)])],
                ignore_index=True,
            ),
        )
    )
    with asof.AsOfSql(gold) as before, asof.AsOfSql(changed) as after:
        for sql in (before, after):
            sql.build_view(T)
        for name, frame in before.frames().items():
            pd.testing.assert_frame_equal(
                _sorted(after.frames()[name], name), _sorted(frame, name), obj=name
            )
        after.build_view(T + 2 * DAY)
        view = after.frames()
    orders = view["orders"].set_index("order_id")
    assert "O99" in orders.index and bool(orders.at["O1", "is_cancelled"])
    assert not orders.at["O1", "is_purchase"]
    assert "K9" in set(view["support_cases"]["case_id"])
    cases = view["support_cases"].set_index("case_id")
    assert cases.at["K1", "status"] == "resolved"


def test_a_source_without_cases_products_or_histories(tmp_path):
    """A lake without the tables a generic source lacks: the SQL reads them as empty, as
    read_gold does, and gives the pandas path's labels and features."""
    gold = make_gold()
    lake = Lake(tmp_path / "lake")
    write_gold(lake, gold)
    for name in ("support_cases", "case_status", "order_status", "products"):
        import shutil

        shutil.rmtree(lake.path("gold", GOLD_TABLES[name][0]))
    frames = read_gold(lake)
    assert frames.order_status.empty and frames.support_cases.empty
    fs = derive_feature_set(frames, SPEC)
    assert derive_feature_set(lake_gold(lake), SPEC).definitions_json == fs.definitions_json
    cutoffs = [T, T + 30 * DAY]
    pd.testing.assert_frame_equal(
        compute_labels(lake_gold(lake), cutoffs, CFG), compute_labels(frames, cutoffs, CFG)
    )
    population = active_population(frames, cutoffs, CFG)
    sql = calculate_features(lake_gold(lake), population, fs)
    assert_close(sql, calculate_features(frames, population, fs, engine="pandas"), _counts(fs))


# ---------------------------------------------------------------- the same SQL on Spark


@pytest.fixture(scope="module")
def spark():
    """A Spark Connect session to a Sail server started for this module."""
    pytest.importorskip("pysail")
    from pysail.spark import SparkConnectServer

    from c360ml.spark import spark_session

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    session = spark_session(f"sc://{host}:{port}")
    try:
        yield session
    finally:
        session.stop()
        server.stop()


def _on_spark(spark, gold: GoldTables) -> None:
    """Gold's frames as Spark's gold relations, and the session's relations over them."""
    gold = standardise_gold(gold)
    for f in fields(GoldTables):
        _, model = GOLD_TABLES[f.name]
        table = asof._arrow(getattr(gold, f.name), model, asof.NEEDED[f.name])
        spark.createDataFrame(table.to_pandas()).createOrReplaceTempView(
            asof.GOLD_RELATIONS[f.name]
        )
    for statement in asof.session_statements(False, asof.SPARK):
        spark.sql(statement)


class _SparkQueries:
    """What the aggregates ask of a connection (`con.sql(query).df()`), of Spark."""

    def __init__(self, spark) -> None:
        self.spark = spark

    def sql(self, query: str):
        frame = self.spark.sql(query).toPandas()
        return SimpleNamespace(df=lambda: frame)


def test_spark_runs_the_same_view_and_labels(spark):
    """The definitions in Spark's dialect, on Spark, over the dirty gold: the view and the
    labels equal DuckDB's."""
    gold = standardise_gold(_dirty_gold())
    _on_spark(spark, gold)
    cutoffs = [T, T + 30 * DAY, START + 6 * DAY]
    ordered = sorted(cutoffs)
    with asof.AsOfSql(gold) as duck:
        labels = duck.labels(cutoffs, CFG)
        rows = spark.sql(asof.labels_sql(ordered, CFG, asof.SPARK)).toPandas()
        assert rows["customer_id"].tolist() == labels["customer_id"].tolist()
        assert rows["label"].tolist() == labels["label"].tolist()
        for t in ordered:
            for statement in asof.view_statements(t, False, asof.SPARK):
                spark.sql(statement)
            duck.build_view(t)
            for name in ("orders", "support_cases"):
                theirs = spark.sql(f"SELECT * FROM {name}").toPandas()
                mine = duck.query(f"SELECT * FROM {name}")
                for column in ("order_ts", "created_ts"):
                    if column in theirs:
                        theirs[column] = pd.to_datetime(theirs[column], utc=True).dt.as_unit("us")
                        mine[column] = pd.to_datetime(mine[column], utc=True).dt.as_unit("us")
                pd.testing.assert_frame_equal(
                    _sorted(theirs, name), _sorted(mine, name), check_dtype=False, obj=name
                )


def test_spark_computes_the_same_features(spark, gold, feature_set):
    """The compiled aggregates in Spark's dialect over Spark's view: DuckDB's values (to
    1e-9: Spark's sums are not compensated)."""
    from c360ml.features.aggregates import aggregate_view

    _on_spark(spark, gold)
    plans = [_aggregate(f) for f in _load(feature_set)]
    ids = pd.Index(["C1", "C2", "C3", "C4", "C5"])
    for t in (T, T + 30 * DAY):
        for statement in asof.view_statements(t, False, asof.SPARK):
            spark.sql(statement)
        (theirs,) = aggregate_view(_SparkQueries(spark), t, [(ids, plans)], asof.SPARK)
        with asof.AsOfSql(gold) as duck:
            duck.build_view(t)
            (mine,) = aggregate_view(duck.con, t, [(ids, plans)])
        assert mine["COUNT(orders)"].gt(0).any()
        for a in plans:
            x, y = theirs[a.name].to_numpy(float), mine[a.name].to_numpy(float)
            same = np.isclose(x, y, rtol=1e-9, atol=1e-9, equal_nan=True)
            assert same.all(), f"{a.name} at {t}: spark {x[~same]} != duckdb {y[~same]}"
