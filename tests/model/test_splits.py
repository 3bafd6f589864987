"""Out-of-time splits: no label window of a fitted row reaches an evaluated one."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.model.splits import TEST, TRAIN, VALIDATION, assign_splits, plan_splits

W = 90


def _cutoffs(n: int, spacing: int = 30) -> list[pd.Timestamp]:
    first = pd.Timestamp("2024-01-01", tz="UTC")
    return [first + pd.Timedelta(days=spacing * k) for k in range(n)]


@pytest.mark.parametrize(("n", "spacing"), [(12, 30), (7, 30), (24, 14), (3, 90)])
def test_no_training_label_window_overlaps_validation_or_test(n, spacing):
    plan = plan_splits(_cutoffs(n, spacing), W)
    window = pd.Timedelta(days=W)
    assert plan.mode == "out_of_time" and not plan.optimistic
    assert plan.test_cutoff == _cutoffs(n, spacing)[-1]
    # Validation label window (v, v + w] ends at or before the test cutoff...
    assert plan.validation_cutoff + window <= plan.test_cutoff
    # ...and it is the latest such cutoff.
    later = [c for c in _cutoffs(n, spacing) if c > plan.validation_cutoff]
    assert all(c + window > plan.test_cutoff for c in later)
    # Training label windows (c, c + w] end at or before the validation cutoff.
    assert plan.train_cutoffs
    assert all(c + window <= plan.validation_cutoff for c in plan.train_cutoffs)


def test_twelve_monthly_cutoffs_give_the_issue_split():
    cuts = _cutoffs(12)
    plan = plan_splits(cuts, W)
    assert plan.test_cutoff == cuts[11]
    assert plan.validation_cutoff == cuts[8]  # 90 days = 3 spacings before the test
    assert plan.train_cutoffs == tuple(cuts[:6])  # c + 90 <= cuts[8]


def test_rows_are_assigned_by_cutoff_and_unused_cutoffs_are_dropped():
    cuts = _cutoffs(12)
    rows = pd.DataFrame({"customer_id": [f"c{i}" for i in range(12)], "cutoff_time": cuts})
    split = assign_splits(rows, plan_splits(cuts, W))
    assert split.tolist() == [TRAIN] * 6 + ["unused"] * 2 + [VALIDATION] + ["unused"] * 2 + [TEST]


def test_short_history_falls_back_and_says_optimistic():
    plan = plan_splits(_cutoffs(4), W)  # test = c3, validation = c0, nothing before c0
    assert plan.optimistic and plan.mode == "validation_holdout"
    assert "too short" in plan.reason
    plan = plan_splits(_cutoffs(2), W)  # c0 + 90 > c1: no out-of-time validation or test
    assert plan.optimistic and plan.mode == "test_overlap"
    assert "optimistic" in plan.reason


def test_single_cutoff_gives_disjoint_customer_holdouts():
    cuts = _cutoffs(1)
    rows = pd.DataFrame({"customer_id": [f"c{i}" for i in range(2000)], "cutoff_time": cuts[0]})
    plan = plan_splits(cuts, W)
    split = assign_splits(rows, plan)
    assert plan.optimistic and plan.mode == "single_cutoff"
    counts = split.value_counts()
    assert set(counts.index) == {TRAIN, VALIDATION, TEST}
    assert 300 < counts[TEST] < 500 and 300 < counts[VALIDATION] < 500
    # The same customer always lands in the same split (stable hash).
    assert (assign_splits(rows, plan) == split).all()


def test_no_cutoffs_is_an_error():
    with pytest.raises(ValueError, match="no training cutoffs"):
        plan_splits([], W)
