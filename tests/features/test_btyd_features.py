"""BTYD quantities as candidate features (the spec's `btyd: {enabled: true}`): carried by the
FeatureSet, computed by every engine from the as-of view, blind to what follows the cutoff,
labelled for readers, refused by Spark; and on a generated lake, a trained model's BTYD
features computed by the chunked refresh equal training's at the same cutoff."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from c360ml import glossary
from c360ml.features import FeatureSet, btyd, calculate_features, derive_feature_set
from c360ml.features.dfs import ENGINES
from c360ml.features.leakage import check_leakage, future_changes
from c360ml.features.spec import load_btyd_spec

from .tiny_gold import SPEC

NAMES = list(btyd.BTYD_FEATURES)
GEN_T = pd.Timestamp("2025-09-01", tz="UTC")  # a cutoff inside the generated lake's history


def _spec(folder, btyd_section=None, churn=None, name="spec.yaml"):
    spec = yaml.safe_load(SPEC.read_text())
    if btyd_section is not None:
        spec["btyd"] = btyd_section
    spec["churn"].update(churn or {})
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def generated_gold(shared_lake):
    from c360ml.features import read_gold
    from c360ml.storage.lake import Lake

    return read_gold(Lake(shared_lake.lake))


def test_the_setting_adds_the_candidates_and_the_feature_set_carries_them(gold, tmp_path):
    assert not load_btyd_spec(SPEC).enabled  # the default spec: off
    off = derive_feature_set(gold, SPEC)
    assert not set(NAMES) & set(off.names) and btyd.META_KEY not in off.meta
    fs = derive_feature_set(
        gold, _spec(tmp_path, {"enabled": True}, {"prediction_window_days": 60})
    )
    assert fs.names[-len(NAMES) :] == NAMES and fs.names[: len(off.names)] == off.names
    assert fs.meta[btyd.META_KEY]["window_days"] == 60  # the churn window travels with them
    # Selection to a subset keeps what scoring needs; the JSON round trip too.
    kept = FeatureSet.from_json(fs.subset([off.names[0], "pareto_nbd_p_alive"]).to_json())
    assert btyd.feature_names(kept.meta) == ["pareto_nbd_p_alive"]
    assert btyd.META_KEY not in fs.subset(off.names[:2]).meta
    with pytest.raises(
        ValueError, match=r"invalid btyd spec in .*: btyd.window: Extra inputs are not permitted"
    ):
        load_btyd_spec(_spec(tmp_path, {"enabled": True, "window": 3}))


def test_every_engine_computes_the_fit_of_the_population_at_the_cutoff(generated_gold, tmp_path):
    """The values are btyd_features' (the reference: both models fitted on the purchase
    days up to t of the customers the features are for), whichever engine computes them."""
    gold = generated_gold
    fs = derive_feature_set(gold, _spec(tmp_path, {"enabled": True})).subset(NAMES)
    bought = gold.orders[(gold.orders["order_ts"] <= GEN_T)]
    ids = pd.Index(sorted(bought["customer_id"].unique())[:300])
    population = pd.DataFrame({"customer_id": ids, "cutoff_time": GEN_T})
    view = {}
    for engine in ENGINES:
        view[engine] = calculate_features(gold, population, fs, engine=engine)
    for engine in ENGINES[1:]:
        pd.testing.assert_frame_equal(view[engine], view[ENGINES[0]], check_exact=True)
    out = view["duckdb"].set_index("customer_id")
    # The reference on the same purchases (the pandas as-of view's is_purchase at t).
    from c360ml.features.aggregates import activity_frames
    from c360ml.features.gold import restrict_to_customers, view_as_of

    orders = activity_frames(view_as_of(restrict_to_customers(gold, ids), GEN_T))["orders"]
    purchases = orders[orders["is_purchase"].astype(bool)].rename(columns={"order_ts": "ts"})
    expected = btyd.btyd_features(purchases, [GEN_T], 90).set_index("customer_id")
    assert len(expected) > 100 and out.loc[expected.index, NAMES].notna().all().all()
    np.testing.assert_allclose(
        out.loc[expected.index, NAMES].to_numpy(), expected[NAMES].to_numpy(np.float32), rtol=1e-6
    )
    alive = out.loc[expected.index, "bgnbd_p_alive"]
    assert alive.between(0, 1).all() and alive.nunique() > 10
    # a customer with no purchase by t (an order only later, or returns): missing, not 0
    without = ids.difference(expected.index)
    assert out.loc[without, NAMES].isna().all().all()


def test_nothing_after_the_cutoff_changes_them(generated_gold, tmp_path):
    """The leakage check passes the BTYD features, and each change after t is one they do
    see at a later cutoff (so the check could fail)."""
    spec = _spec(tmp_path, {"enabled": True})
    report = check_leakage(generated_gold, spec, GEN_T, max_customers=100)
    assert set(NAMES) <= set(report.features) and report.ok, report.message()
    customers = pd.Index(
        generated_gold.orders.loc[generated_gold.orders["order_ts"] <= GEN_T, "customer_id"]
        .drop_duplicates()
        .sort_values()
        .head(100)
    )
    from c360ml.features.gold import restrict_to_customers

    gold = restrict_to_customers(generated_gold, customers)
    fs = derive_feature_set(gold, spec).subset(NAMES)
    changed = next(iter(future_changes(gold, GEN_T).values()))  # a purchase at t + 1 day
    later = pd.DataFrame({"customer_id": customers, "cutoff_time": GEN_T + pd.Timedelta(days=2)})
    before = calculate_features(gold, later, fs)[NAMES].to_numpy()
    after = calculate_features(changed, later, fs)[NAMES].to_numpy()
    assert (before != after).all(axis=0).any() and not np.allclose(before, after)


def test_readable_labels():
    labels = {n: glossary.describe(n) for n in NAMES}
    assert labels["bgnbd_p_alive"].label == "Chance the customer is still active, BG/NBD"
    assert len({lab.label for lab in labels.values()}) == len(NAMES)
    assert all(lab.label != n and "(" not in lab.label for n, lab in labels.items())
    assert labels["pareto_nbd_p_no_purchase"].unit == glossary.PROBABILITY
    assert glossary.format_value(0.8731, glossary.PROBABILITY) == "87%"
    assert all(lab.description.endswith(".") for lab in labels.values())


def test_the_spark_engine_refuses_them_in_one_line(gold, tmp_path):
    pytest.importorskip("pyspark")
    from c360ml.spark.features import SparkFeatureError, plan_features, refuse_sql_features

    spec = _spec(tmp_path, {"enabled": True})
    for refuse in (
        lambda: refuse_sql_features(spec),
        lambda: plan_features(derive_feature_set(gold, spec)),
    ):
        with pytest.raises(SparkFeatureError) as refused:
            refuse()
        message = str(refused.value)
        assert "'bgnbd_p_alive' is a BTYD feature (btyd: enabled" in message
        assert "\n" not in message
    refuse_sql_features(_spec(tmp_path, {"enabled": False}, name="off.yaml"))  # off: accepted
