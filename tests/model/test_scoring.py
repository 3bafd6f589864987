"""The one scoring function: outputs, explanations and the request schema."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from c360ml import glossary
from c360ml.model import scoring
from c360ml.model.scoring import ModelBundle, RequestError, Thresholds, score

from .model_testdata import FEATURES, request_frame


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_contributions_sum_to_the_margin(bundle, synthetic, method):
    frame = request_frame(synthetic[0], rows=200)
    x = scoring.feature_matrix(bundle, frame)
    assert np.isnan(x).any()  # missing values are part of the check
    contrib = scoring.contributions(bundle, x, method)
    assert contrib.shape == (200, len(FEATURES) + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), scoring.margins(bundle, x), atol=1e-4)


def test_exact_and_approx_differ_but_both_explain(bundle, synthetic):
    frame = request_frame(synthetic[0], rows=100)
    x = scoring.feature_matrix(bundle, frame)
    exact = scoring.contributions(bundle, x, "exact")
    approx = scoring.contributions(bundle, x, "approx")
    assert not np.allclose(exact, approx)  # Saabas is a different attribution


def test_influential_factors_are_top5_signed_impacts(bundle, synthetic):
    frame = request_frame(synthetic[0], rows=30)
    out = score(bundle, frame, explain="exact")
    x = scoring.feature_matrix(bundle, frame)
    contrib = scoring.contributions(bundle, x, "exact")
    for i in (0, 7, 29):
        factors = out.InfluentialFactors[i]
        assert len(factors) == 5
        impacts = [f["impact"] for f in factors]
        assert impacts == sorted(impacts, key=abs, reverse=True)
        j = FEATURES.index(factors[0]["feature"])
        assert factors[0]["impact"] == pytest.approx(contrib[i, j], abs=1e-6)
        value = frame.loc[i, factors[0]["feature"]]
        assert factors[0]["value"] == (None if pd.isna(value) else pytest.approx(value))
        for f in factors:  # readable: label, value in its unit, which way it pushes
            label = bundle.feature_labels[f["feature"]]
            assert f["label"] == label["label"]
            assert f["display_value"] == glossary.format_value(f["value"], label["unit"])
            assert f["direction"] == ("raises risk" if f["impact"] > 0 else "lowers risk")
    assert score(bundle, frame, explain="none").InfluentialFactors.map(len).eq(0).all()


def test_bundle_carries_feature_labels(bundle, tmp_path):
    named = dataclasses.replace(
        bundle, feature_labels={**bundle.feature_labels, "f_cases": {
            "label": "Open support cases, all time", "unit": "count", "description": "x."}},
    )  # fmt: skip
    loaded = scoring.ModelBundle.load(named.save(tmp_path / "b"))
    assert loaded.feature_labels == named.feature_labels
    assert loaded.feature_labels["f_cases"]["label"] == "Open support cases, all time"
    # A bundle saved before labels were carried gets them generated on load.
    features = json.loads((tmp_path / "b" / scoring.FEATURES_FILE).read_text())
    del features["labels"]
    (tmp_path / "b" / scoring.FEATURES_FILE).write_text(json.dumps(features))
    old = scoring.ModelBundle.load(tmp_path / "b")
    assert old.feature_labels["f_cases"] == glossary.describe("f_cases").to_dict()


def test_output_columns_thresholds_and_order(bundle, synthetic):
    frame = request_frame(synthetic[0], rows=50)
    out = score(bundle, frame)
    assert list(out.columns) == ["CustomerId", "ChurnScore", "IsChurn", "RiskLevel",
                                 "InfluentialFactors"]  # fmt: skip
    assert out.CustomerId.tolist() == frame.CustomerId.tolist()
    assert (out.IsChurn == (out.ChurnScore >= 0.5)).all()
    bands = scoring.risk_levels(np.array([0.0, 0.3299, 0.33, 0.6599, 0.66, 1.0]), Thresholds())
    assert bands.tolist() == ["Low", "Low", "Medium", "Medium", "High", "High"]


def test_bundle_round_trip_scores_identically(bundle, synthetic, tmp_path):
    frame = request_frame(synthetic[0], rows=40)
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"), nthread=2)
    assert loaded.feature_names == bundle.feature_names
    assert loaded.trained_as_of == bundle.trained_as_of
    pd.testing.assert_frame_equal(score(loaded, frame), score(bundle, frame), check_exact=True)


def test_calibrator_is_applied_and_monotone(bundle, synthetic):
    frame = request_frame(synthetic[0], rows=50)
    cal = scoring.Calibrator("isotonic", x=(0.0, 0.5, 1.0), y=(0.1, 0.2, 0.9))
    calibrated = ModelBundle(
        bundle.booster, bundle.feature_names, bundle.feature_dtypes, calibrator=cal
    )
    raw = score(bundle, frame, explain="none").ChurnScore.to_numpy()
    out = score(calibrated, frame, explain="none").ChurnScore.to_numpy()
    np.testing.assert_allclose(out, np.interp(raw, cal.x, cal.y))
    platt = scoring.Calibrator("platt", a=1.0, b=0.0)
    np.testing.assert_allclose(platt.apply(np.array([0.2, 0.7])), [0.2, 0.7])


# ---------------------------------------------------------------- request schema


def _error(bundle, frame) -> str:
    with pytest.raises(RequestError) as info:
        score(bundle, frame)
    return str(info.value)


def test_request_missing_feature_names_the_column(bundle, synthetic):
    frame = request_frame(synthetic[0]).drop(columns=["f_cases"])
    assert "missing feature column(s): f_cases" in _error(bundle, frame)


def test_request_unknown_feature_names_the_column(bundle, synthetic):
    frame = request_frame(synthetic[0]).assign(f_typo=1.0)
    assert "unknown column(s): f_typo" in _error(bundle, frame)


def test_request_wrong_type_names_column_and_row(bundle, synthetic):
    frame = request_frame(synthetic[0])
    frame["f_spend_365d"] = frame["f_spend_365d"].astype(object)
    frame.loc[3, "f_spend_365d"] = "lots"
    message = _error(bundle, frame)
    assert "'f_spend_365d'" in message and "rows [3]" in message and "lots" in message


def test_request_duplicate_customer_names_the_rows(bundle, synthetic):
    frame = request_frame(synthetic[0])
    frame.loc[5, "CustomerId"] = frame.loc[2, "CustomerId"]
    message = _error(bundle, frame)
    assert "duplicate CustomerId at rows [2, 5]" in message


def test_request_empty_batch(bundle, synthetic):
    frame = request_frame(synthetic[0]).iloc[0:0]
    assert "empty batch" in _error(bundle, frame)


def test_request_accepts_float64_and_ints(bundle, synthetic):
    frame = request_frame(synthetic[0]).astype({f: "float64" for f in FEATURES})
    frame["f_cases"] = 1  # ints coerce to the logged float32
    assert len(score(bundle, frame)) == len(frame)


def test_scoring_imports_neither_mlflow_nor_featuretools():
    code = (
        "import sys, c360ml.model.scoring; "
        "print(sorted(m for m in ('mlflow', 'featuretools') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("explain", ["approx", "none"])
def test_factors_as_json_are_the_records_json_dumps_gives(bundle, synthetic, explain):
    """The batch's JSON factors (built a column at a time) are, text for text, what
    json.dumps makes of the service's records, NaN values and all units included."""
    frame = request_frame(synthetic[0], rows=400)
    frame.loc[::3, FEATURES] = np.nan  # values with no data
    records = score(bundle, frame, explain=explain)
    texts = score(bundle, frame, explain=explain, factors_as="json")
    assert texts.drop(columns="InfluentialFactors").equals(
        records.drop(columns="InfluentialFactors")
    )
    expected = [json.dumps(r) for r in records.InfluentialFactors]
    assert list(texts.InfluentialFactors) == expected
    if explain == "approx":
        assert any('"no data"' in t for t in expected)
