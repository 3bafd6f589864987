"""The report's pure stages on hand-made rows."""

from __future__ import annotations

import json

import pandas as pd

from c360ml.report import top_factors


def _factors(*pairs: tuple[str, float], labelled: bool = True) -> str:
    rows = [{"feature": f, "impact": i, "value": 1.0} for f, i in pairs]
    if labelled:
        for row in rows:
            row["label"] = row["feature"].replace("_", " ")
    return json.dumps(rows)


def test_top_factors_counts_customers_and_mean_impact_per_feature():
    scores = pd.DataFrame(
        {
            "InfluentialFactors": [
                _factors(("days_since", 0.5), ("orders_90d", -0.25)),
                _factors(("days_since", -1.5)),
                None,  # an unscored profile
                _factors(("tenure", 0.1), labelled=False),  # written before labels
            ]
        }
    )
    out = top_factors(scores)
    assert list(out["feature"]) == ["days_since", "orders_90d", "tenure"]
    assert list(out["customers"]) == [2, 1, 1]
    assert list(out["label"]) == ["days since", "orders 90d", "tenure"]
    assert out["mean_abs_impact"].tolist() == [1.0, 0.25, 0.1]
    assert len(top_factors(scores, n=1)) == 1
