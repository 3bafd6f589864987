"""The DuckDB engine computes Featuretools' features: both engines, the same matrix.

On the hand-written gold (exactly) and on a generated lake at a cutoff with two years of
later data present (to float32 rounding). Sums, means and deviations are encoded on a
grid the order of the additions does not reach, so its residue is gone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from c360ml.features import (
    calculate_features,
    calculate_snapshot,
    derive_feature_set,
    load_measures,
    measures_frame,
    read_gold,
)
from c360ml.features.dfs import _aggregate, _load
from c360ml.storage.lake import Lake

from .tiny_gold import DAY, MEASURES, SPEC, T


def _assert_same(duck: pd.DataFrame, ft: pd.DataFrame, exact: bool) -> None:
    assert list(duck.columns) == list(ft.columns)
    pd.testing.assert_frame_equal(duck.iloc[:, :2], ft.iloc[:, :2])
    for name in duck.columns[2:]:
        a, b = duck[name].to_numpy(), ft[name].to_numpy()
        close = np.isclose(
            a, b, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-9, equal_nan=True
        )
        assert close.all(), f"{name}: duckdb {a[~close][:3]} != featuretools {b[~close][:3]}"


@pytest.mark.parametrize("t", [T, T + 30 * DAY])
def test_engines_agree_exactly_on_the_hand_written_gold(gold, feature_set, t):
    population = pd.DataFrame({"customer_id": ["C1", "C2", "C3", "C4", "C5"], "cutoff_time": t})
    duck = calculate_features(gold, population, feature_set, engine="duckdb")
    ft = calculate_features(gold, population, feature_set, engine="featuretools")
    _assert_same(duck, ft, exact=True)
    assert duck["COUNT(orders)"].gt(0).any()  # not an empty comparison


def test_every_feature_of_the_default_spec_is_computed_by_duckdb(feature_set):
    missing = [f.get_name() for f in _load(feature_set) if _aggregate(f) is None]
    assert not missing


def test_a_feature_duckdb_cannot_express_is_left_to_featuretools(gold, tmp_path):
    """SKEW has no SQL here: Featuretools computes it, next to the DuckDB features, and
    the matrix keeps the feature set's order."""
    spec = tmp_path / "skew.yaml"
    spec.write_text(
        "dfs:\n  max_depth: 1\n  windows_days: [90]\n  agg_primitives: [count, skew]\n"
        "  windowed_primitives: [count]\n  allowed_paths: [[customers, orders]]\n"
        "  primitive_options: {skew: {include_columns: {orders: [net_amount]}}}\n"
    )
    fs = derive_feature_set(gold, spec)
    plans = {f.get_name(): _aggregate(f) for f in _load(fs)}
    assert plans["SKEW(orders.net_amount)"] is None and plans["COUNT(orders)_90d"] is not None
    population = pd.DataFrame({"customer_id": ["C1", "C2", "C5"], "cutoff_time": T})
    duck = calculate_features(gold, population, fs, engine="duckdb")
    _assert_same(duck, calculate_features(gold, population, fs, engine="featuretools"), True)
    assert duck["SKEW(orders.net_amount)"].notna().any()


@pytest.fixture(scope="module")
def generated(shared_lake):
    gold = read_gold(Lake(shared_lake.lake))
    return gold, derive_feature_set(gold, SPEC)


def test_engines_agree_on_a_generated_lake_with_later_data(generated):
    gold, fs = generated
    t = pd.Timestamp("2024-03-31", tz="UTC")  # 21 months of history after it
    assert gold.orders["order_ts"].max() > t + 365 * DAY
    ids = pd.Index(gold.customers["customer_id"].unique())
    measures = load_measures(MEASURES)
    duck_measures, duck = calculate_snapshot(gold, t, measures, fs, ids, engine="duckdb")
    ft_measures, ft = calculate_snapshot(gold, t, measures, fs, ids, engine="featuretools")
    assert len(duck) == len(ids) > 1000 and len(fs.names) > 100
    _assert_same(duck, ft, exact=False)
    duck_measures, ft_measures = (
        measures_frame(m, measures, t) for m in (duck_measures, ft_measures)
    )
    pd.testing.assert_frame_equal(duck_measures, ft_measures, check_dtype=False, rtol=1e-9)
    assert duck_measures["preferred_channel"].notna().sum() > 500


def test_duckdb_aggregates_are_the_same_on_every_run():
    """Sums, means and deviations of a million rows, three times: bit-identical (with
    several DuckDB threads, about half of them differed in their last bits)."""
    from c360ml.features.aggregates import Aggregate, compute_aggregates

    rng = np.random.default_rng(5)
    n, k = 1_000_000, 1_000
    customers = pd.DataFrame({"customer_id": [f"C{i}" for i in range(k)]})
    orders = pd.DataFrame(
        {
            "order_id": [f"O{i}" for i in range(n)],
            "customer_id": customers["customer_id"].to_numpy()[rng.integers(0, k, n)],
            "order_ts": pd.Timestamp("2025-01-01", tz="UTC"),
            # amounts and refunds over four orders of magnitude
            "net_amount": (rng.lognormal(3, 1.5, n) * rng.choice([-1, 1], n)).round(2),
        }
    )
    frames = {
        "customers": customers.assign(created_ts=pd.Timestamp("2024-01-01", tz="UTC")),
        "orders": orders,
        "order_lines": pd.DataFrame({"line_id": [], "order_id": []}),
        "support_cases": pd.DataFrame({"case_id": [], "customer_id": []}),
    }
    wanted = [
        Aggregate("sum", "sum", "orders", "net_amount", default=0.0),
        Aggregate("mean", "mean", "orders", "net_amount"),
        Aggregate("std", "std", "orders", "net_amount"),
    ]
    ids = pd.Index(customers["customer_id"])
    t = pd.Timestamp("2025-06-01", tz="UTC")
    runs = [compute_aggregates(frames, t, [(ids, wanted)])[0] for _ in range(3)]
    for run in runs[1:]:
        pd.testing.assert_frame_equal(run, runs[0], check_exact=True)
    assert runs[0]["std"].gt(0).all()


def test_sums_means_and_deviations_are_encoded_on_a_grid_the_order_of_additions_misses():
    """What the order of the additions leaves is gone from what the model reads: a plain
    (Spark's) sum of 0.1, 0.2 and -0.3 leaves 5.6e-17 where a compensated one may say 0,
    and encoded both are 0; values a residue apart encode alike (a mean of cents over 64
    orders included, which a decimal grid would have halfway between two of its points);
    other features keep float32's own precision."""
    from c360ml.features.aggregates import encoded

    residue = pd.Series([0.1 + 0.2 - 0.3])
    assert residue.iloc[0] != 0
    assert encoded(residue, summed=True)[0] == 0 and encoded(residue, summed=False)[0] != 0
    exact = pd.Series([0.0, 3459.5 / 64, 1234.56, -87.13, 0.01 / 3])
    rng = np.random.default_rng(3)
    for _ in range(20):
        apart = exact + rng.normal(0, 1e-12, len(exact)) * np.maximum(1, exact.abs())
        assert np.array_equal(encoded(apart, True), encoded(exact, True))
    assert (encoded(pd.Series([1e-9, 3e-7]), False) > 0).all()
