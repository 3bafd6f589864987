"""Hand-computed feature values, the cutoff boundary, FeatureSet round trip, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from c360ml.features import FeatureSet, calculate_features, compute_labels
from c360ml.features.dfs import build_entityset

from .tiny_gold import CFG, T


@pytest.fixture(scope="module")
def matrix(gold, population, feature_set) -> pd.DataFrame:
    return calculate_features(gold, population, feature_set)


def test_feature_set_is_reasonable(feature_set):
    assert 60 <= len(feature_set.names) <= 150
    assert set(feature_set.dtypes.values()) == {"float32"}
    assert "SUM(orders.net_amount)_90d" in feature_set.names
    # only immutable profile attributes: no customer_group/city/country features
    assert not [n for n in feature_set.names if "customer_group" in n or "city" in n]


def test_matrix_layout(matrix, population, feature_set):
    assert list(matrix.columns) == ["customer_id", "cutoff_time", *feature_set.names]
    assert list(matrix["customer_id"]) == list(population["customer_id"])
    assert (matrix[feature_set.names].dtypes == np.float32).all()


def test_hand_computed_values_for_c1(matrix):
    # C1 at T: O1 (T-137 d, 100 online), O2 (exactly T-30 d, 50 store), O3 (exactly T, 30).
    row = matrix.set_index("customer_id").loc["C1"]
    expected = {
        "COUNT(orders)": 3,  # O3 exactly at T counts; O8 (after T) does not
        "SUM(orders.net_amount)": 180,
        "COUNT(orders)_30d": 1,  # window (T-30 d, T]: O2 at exactly T-30 d is out
        "SUM(orders.net_amount)_30d": 30,
        "COUNT(orders)_90d": 2,
        "SUM(orders.net_amount)_90d": 80,
        "COUNT(orders WHERE channel = online)": 2,
        "MIN(orders.TIME_SINCE(order_ts, unit=days))": 0,  # last order exactly at T
        "MAX(orders.TIME_SINCE(order_ts, unit=days))": 137,
        "TIME_SINCE(created_ts, unit=days)": 517,  # tenure 2024-01-01 -> 2025-06-01
        "COUNT(order_lines)": 4,
        "NUM_UNIQUE(order_lines.category)": 3,
        "COUNT(support_cases)": 1,
    }
    got = {k: float(row[k]) for k in expected}
    assert got == pytest.approx({k: float(v) for k, v in expected.items()})


def test_order_at_cutoff_counts_in_features_not_in_label(gold, matrix):
    # C5's only order is exactly at T: a feature at T, active at T, yet churned.
    c5 = matrix.set_index("customer_id").loc["C5"]
    assert c5["COUNT(orders)"] == 1 and c5["COUNT(orders)_30d"] == 1
    labels = compute_labels(gold, [T], CFG).set_index("customer_id")
    assert labels.at["C5", "label"] == 1


def test_feature_set_json_round_trip_gives_identical_matrix(gold, population, feature_set, matrix):
    again = FeatureSet.from_json(feature_set.to_json())
    assert again == feature_set
    pd.testing.assert_frame_equal(calculate_features(gold, population, again), matrix)


def test_subset_computes_only_those_features(gold, population, feature_set, matrix):
    names = ["COUNT(orders)_90d", "SUM(orders.net_amount)"]
    sub = feature_set.subset(reversed(names))
    assert sub.names == [n for n in feature_set.names if n in names]
    assert json.loads(sub.definitions_json)["feature_list"] == [
        f"customers: {n}" for n in sub.names
    ]
    got = calculate_features(gold, population, sub)
    pd.testing.assert_frame_equal(got, matrix[["customer_id", "cutoff_time", *sub.names]])


def test_snapshot_pass_equals_the_separate_passes(gold, population, feature_set, matrix):
    """The refresh's one pass (one view, one EntitySet over every profile) gives the
    features of the restricted per-cutoff run and the measures of build_measures."""
    from c360ml.features import build_measures, calculate_snapshot, load_measures, measures_frame

    from .tiny_gold import MEASURES

    measures = load_measures(MEASURES)
    ids = pd.Index(population["customer_id"])
    got_measures, got_features = calculate_snapshot(gold, T, measures, feature_set, ids)
    pd.testing.assert_frame_equal(got_features, matrix)
    pd.testing.assert_frame_equal(
        measures_frame(got_measures, measures, T), build_measures(gold, T, MEASURES)
    )
    assert len(got_measures) == gold.customers["customer_id"].nunique() > len(ids)
    _, none_active = calculate_snapshot(gold, T, None, feature_set, pd.Index([]))
    assert list(none_active.columns) == list(matrix.columns) and none_active.empty


def test_definitions_carry_no_customer_order_or_case_id(gold, feature_set):
    """A model carries its feature definitions; Featuretools would save every id of the
    EntitySet with them (all customers and orders it was derived on)."""
    ids = [
        *gold.customers["customer_id"],
        *gold.orders["order_id"],
        *gold.order_lines["order_id"],
        *gold.support_cases["case_id"],
    ]
    text = feature_set.definitions_json
    assert [i for i in ids if f'"{i}"' in text] == []
    assert '"online"' in text  # low-cardinality categories (where-values) are kept


def test_feature_order_does_not_depend_on_the_process():
    """Python salts string hashes per process; DFS's own feature order follows them."""
    code = (
        "from tests.features.tiny_gold import SPEC, make_gold\n"
        "from c360ml.features import derive_feature_set\n"
        "print('|'.join(derive_feature_set(make_gold(), SPEC).names))"
    )
    root = Path(__file__).resolve().parents[2]
    names = [
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    ]
    assert names[0] == names[1] and names[0].count("|") > 50


def test_bad_inputs_name_the_problem(gold, feature_set):
    with pytest.raises(ValueError, match="population lacks column"):
        calculate_features(gold, pd.DataFrame({"customer_id": ["C1"]}), feature_set)
    with pytest.raises(ValueError, match="not in the feature set"):
        feature_set.subset(["NO_SUCH_FEATURE"])
    with pytest.raises(ValueError, match="feature set format"):
        FeatureSet.from_json(json.dumps({"format_version": 99}))


def test_entityset_has_no_mutable_profile_columns(gold):
    from c360ml.features import view_as_of

    es = build_entityset(view_as_of(gold, T))
    assert list(es["customers"].columns) == ["customer_id", "created_ts"]
