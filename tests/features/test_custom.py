"""A user's SQL features (c360ml.features.custom): their values on tiny gold, the errors
that name them, and the leakage helper catching a feature that reads the label window."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from c360ml.features import calculate_features, derive_feature_set
from c360ml.features.custom import load_sql_features
from c360ml.features.leakage import check_leakage

from .tiny_gold import SPEC, T

RECENT = {
    "name": "purchases_14d",
    "table": "orders",
    "expression": "count(*) FILTER (WHERE is_purchase AND order_ts > cutoff_time - INTERVAL 14 DAY)",
    "default": 0,
}
LINES = {
    "name": "distinct_categories",
    "table": "order_lines",
    "expression": "count(DISTINCT category)",
}
LEAKY = {
    "name": "purchases_next_90d",
    "table": "orders",
    "expression": "(SELECT count(*) FROM current_orders o WHERE o.customer_id = "
    "any_value(src.customer_id) AND o.order_ts > cutoff_time AND o.order_ts <= cutoff_time "
    "+ INTERVAL 90 DAY)",
}
GROUP = {
    "name": "lives_in_oslo",
    "table": "orders",
    "expression": "(SELECT max(CASE WHEN c.city = 'Oslo' THEN 1 ELSE 0 END) FROM "
    "current_customers c WHERE c.customer_id = any_value(src.customer_id))",
}


def _spec(tmp_path, *features, name="spec.yaml"):
    spec = yaml.safe_load(SPEC.read_text()) | {"sql_features": list(features)}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sql_features_are_computed_over_the_as_of_view(gold, tmp_path):
    fs = derive_feature_set(gold, _spec(tmp_path, RECENT, LINES))
    assert fs.names[-2:] == ["purchases_14d", "distinct_categories"]
    population = pd.DataFrame({"customer_id": ["C1", "C2", "C5"], "cutoff_time": T})
    out = calculate_features(gold, population, fs).set_index("customer_id")
    # C1: O3 at exactly T counts, O2 (T-30 d) does not; C2's only recent order is a return;
    # C5: O9 at T. The view at T holds nothing later (O8 at T+44 d is not counted).
    assert out["purchases_14d"].to_dict() == {"C1": 1.0, "C2": 0.0, "C5": 1.0}
    assert out["distinct_categories"].notna().all()
    # The definitions travel with the feature set and survive selection to a subset.
    kept = fs.subset(["purchases_14d", fs.names[0]])
    again = calculate_features(gold, population, kept).set_index("customer_id")
    assert again["purchases_14d"].equals(out["purchases_14d"])


def test_a_bad_sql_feature_is_named(gold, tmp_path):
    broken = RECENT | {"expression": "count(no_such_column)"}
    fs = derive_feature_set(gold, _spec(tmp_path, broken))
    population = pd.DataFrame({"customer_id": ["C1"], "cutoff_time": T})
    with pytest.raises(
        ValueError, match=r"sql feature 'purchases_14d' cannot be computed: .*no_such_column"
    ):
        calculate_features(gold, population, fs)
    with pytest.raises(ValueError, match=r"sql_features\[0\]: .*table must be one of orders"):
        load_sql_features(_spec(tmp_path, RECENT | {"table": "current_orders"}))
    files = RECENT | {"expression": "(SELECT count(*) FROM read_csv('/etc/passwd'))"}
    fs = derive_feature_set(gold, _spec(tmp_path, files))
    with pytest.raises(ValueError, match="sql feature 'purchases_14d' cannot be computed"):
        calculate_features(gold, population, fs)


def test_the_leakage_helper_passes_a_clean_spec_and_names_leaky_features(gold, tmp_path):
    clean = check_leakage(gold, _spec(tmp_path, RECENT), T)
    assert clean.ok and "purchases_14d" in clean.features and clean.message().startswith("no leak")

    report = check_leakage(gold, _spec(tmp_path, RECENT, LEAKY, GROUP, name="leaky.yaml"), T)
    assert {leak.feature for leak in report.leaks} == {"purchases_next_90d", "lives_in_oslo"}
    message = report.message()
    assert "feature 'purchases_next_90d' leaks" in message and "label window" in message
    assert "feature 'lives_in_oslo' leaks" in message and "profile attributes edited" in message
    with pytest.raises(ValueError, match="feature 'purchases_next_90d' leaks"):
        report.raise_if_leaky()
