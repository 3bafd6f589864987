"""select_features drops with reasons; measures on the hand-written gold."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from c360ml.features import FeatureSet, build_measures, load_measures, select_features

from .tiny_gold import MEASURES, T


def _fs(names: list[str]) -> FeatureSet:
    definitions = {"feature_list": [f"customers: {n}" for n in names]}
    return FeatureSet(names, dict.fromkeys(names, "float32"), json.dumps(definitions))


def test_select_features_drops_constant_missing_and_duplicates():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    matrix = pd.DataFrame(
        {
            "const": np.float32(3.0),
            "empty": np.nan,
            "a": a,
            "b": rng.normal(size=200),
            "a_scaled": -2 * a + 1,  # |corr| = 1 with a
            "sparse": np.where(np.arange(200) % 2 == 0, 1.0, np.nan),  # kept: NaN is signal
        }
    ).astype(np.float32)
    kept, dropped = select_features(matrix, _fs(list(matrix.columns)))
    assert kept.names == ["a", "b", "sparse"]
    reasons = {d["feature"]: d["reason"] for d in dropped}
    assert reasons["const"].startswith("constant")
    assert reasons["empty"] == "all missing"
    assert reasons["a_scaled"].startswith("near-duplicate of a")
    assert json.loads(kept.definitions_json)["feature_list"] == [
        "customers: a",
        "customers: b",
        "customers: sparse",
    ]


def test_select_features_rejects_matrix_without_the_features():
    with pytest.raises(ValueError, match="matrix lacks feature column"):
        select_features(pd.DataFrame({"x": [1.0]}), _fs(["x", "y"]))


def test_measures_by_hand(gold):
    out = build_measures(gold, T, MEASURES).set_index("customer_id")
    assert list(out.columns) == ["as_of", *[m.name for m in load_measures(MEASURES)]]
    assert (out["as_of"] == T).all()
    c1, c2, c4 = out.loc["C1"], out.loc["C2"], out.loc["C4"]
    assert c1[["total_spend_365d", "orders_365d", "avg_order_value_365d"]].tolist() == [180, 3, 60]
    assert c1["days_since_last_order"] == 0 and c1["support_cases_90d"] == 1
    assert c1["preferred_channel"] == "online"
    # C2: O4 purchase, O5 return (not a purchase, but half of C2's orders in 365 d)
    assert c2[["total_spend_365d", "orders_365d", "days_since_last_order"]].tolist() == [80, 1, 182]
    assert c2["returns_rate_365d"] == pytest.approx(0.5)
    assert c2["support_cases_90d"] == 1 and c2["preferred_channel"] == "store"
    assert c4["orders_365d"] == 0 and np.isnan(c4["avg_order_value_365d"])
    assert c4["returns_rate_365d"] == 1


def test_bad_measures_file_is_rejected(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("measures:\n  - {name: x, primitive: sum, column: net_amount, window: 3}\n")
    with pytest.raises(ValueError, match="invalid measure"):
        load_measures(bad)
