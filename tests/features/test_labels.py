"""Population, labels, RFM and cutoffs on the hand-written gold (see tiny_gold)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from c360ml.features import (
    ChurnConfig,
    active_population,
    buyers_and_active,
    compute_labels,
    compute_rfm,
    load_churn_config,
    training_cutoffs,
)
from c360ml.features.gold import StatusTimeline

from .tiny_gold import CFG, DAY, SPEC, T, validate


def _labels(gold, cfg=CFG) -> dict[str, int]:
    out = compute_labels(gold, [T], cfg)
    return dict(zip(out["customer_id"], out["label"], strict=True))


def test_population_excludes_inactive_and_return_only(gold):
    pop = active_population(gold, [T], CFG)
    # C3: last purchase in 2023 (outside (T-365 d, T]); C4: only a return in the lookback.
    assert list(pop["customer_id"]) == ["C1", "C2", "C5"]
    assert (pop["cutoff_time"] == T).all()


def test_labels_by_hand(gold):
    out = compute_labels(gold, [T], CFG)
    assert out["label"].dtype == np.int8
    # C1 buys at T+44 d; C2's window holds only a cancelled order (O6), its next purchase
    # is at T+95 d (outside); C5's only order is exactly at T (not in (T, T+w]).
    assert _labels(gold) == {"C1": 0, "C2": 1, "C5": 1}


def test_cancelled_order_in_window_is_not_a_purchase_unless_cancelled_later(gold):
    history = gold.order_status.copy()
    o6 = history["entity_id"] == "O6"
    late = T + CFG.window + DAY  # cancelled only after the window's end: still a purchase
    history.loc[o6 & ~history["is_cancelled"], "valid_to"] = late
    history.loc[o6 & history["is_cancelled"], "valid_from"] = late
    assert _labels(validate(replace(gold, order_status=history)))["C2"] == 0


def test_purchase_just_outside_window_counts_with_a_longer_window(gold):
    longer = ChurnConfig(prediction_window_days=100, active_lookback_days=365)
    assert _labels(gold, longer)["C2"] == 0  # O10 at T+95 d


def test_population_uses_status_known_at_cutoff(gold):
    # O4 (C2's only purchase in the lookback) cancelled before T: C2 no longer active.
    history = gold.order_status.copy()
    history.loc[history["entity_id"] == "O4", ["is_cancelled", "status"]] = [True, "cancelled"]
    pop = active_population(validate(replace(gold, order_status=history)), [T], CFG)
    assert list(pop["customer_id"]) == ["C1", "C5"]


def test_rfm_as_of_cutoff(gold):
    rfm = compute_rfm(gold, [T]).set_index("customer_id")
    assert list(rfm.index) == ["C1", "C2", "C3", "C5"]  # C4 never purchased
    assert (rfm[["recency_days", "frequency_365d", "monetary_365d"]].dtypes == np.float32).all()
    assert rfm.loc["C1", ["recency_days", "frequency_365d", "monetary_365d"]].tolist() == [
        0,
        3,
        180,
    ]
    assert rfm.loc["C2"].tolist()[1:] == [182, 1, 80]  # the return O5 is not a purchase
    assert rfm.loc["C3", "frequency_365d"] == 0


def test_buyers_and_active_are_the_rfm_rows_and_the_population(gold):
    for t in (T, T + 100 * DAY):
        buyers, active = buyers_and_active(gold, t, CFG)
        assert list(buyers) == list(compute_rfm(gold, [t])["customer_id"])
        assert list(active) == list(active_population(gold, [t], CFG)["customer_id"])
    assert list(buyers_and_active(gold, T, CFG)[1]) == ["C1", "C2", "C5"]


def test_training_cutoffs_end_one_window_before_as_of():
    cfg = load_churn_config(SPEC)
    as_of = pd.Timestamp("2025-12-31")  # naive = UTC
    cuts = training_cutoffs(cfg, as_of)
    assert len(cuts) == cfg.cutoff_count == 12
    assert cuts[-1] == pd.Timestamp("2025-12-31", tz="UTC") - pd.Timedelta(days=90)
    assert all(b - a == pd.Timedelta(days=30) for a, b in zip(cuts, cuts[1:], strict=False))
    assert all(str(c.tz) == "UTC" for c in cuts)


def test_bad_churn_config_is_rejected(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("churn:\n  prediction_window: 90\n")
    with pytest.raises(ValueError, match="unknown churn setting"):
        load_churn_config(bad)
    with pytest.raises(ValueError, match="positive integer"):
        ChurnConfig(prediction_window_days=0)


def test_status_timeline_fallbacks():
    ids = pd.Series(["A", "B", "C"])
    history = pd.DataFrame(
        {
            "entity_id": ["A", "A", "B"],
            "status": ["open", "cancelled", "cancelled"],
            "is_cancelled": [False, True, True],
            "valid_from": pd.to_datetime(["2025-01-01", "2025-02-01", "2025-03-01"], utc=True),
            "valid_to": pd.to_datetime(["2025-02-01", None, None], utc=True),
        }
    )
    tl = StatusTimeline(ids, pd.Series(["x", "y", "done"]), pd.Series([True, True, True]), history)
    status, cancelled = tl.status_at(pd.Timestamp("2025-01-15", tz="UTC"))
    # A: row valid then; B: history starts later -> first recorded row; C: no history -> current
    assert status.tolist() == ["open", "cancelled", "done"]
    assert cancelled.tolist() == [False, True, True]
    assert tl.cancelled_at(pd.Timestamp("2025-02-01", tz="UTC")).tolist() == [True, True, True]
