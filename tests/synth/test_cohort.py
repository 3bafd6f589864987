"""Generator profiles: the sparse profile's purchase log is shaped like a real retail log
(measured by `synth.cohort` the same way on both profiles), and increments keep it."""

from __future__ import annotations

import numpy as np
import pytest

from c360ml.synth import generate_increment, generate_lake
from c360ml.synth.cohort import cohort_stats, measure_cohort
from c360ml.synth.generate import read_meta
from c360ml.synth.oracle import load_truth
from c360ml.synth.params import PROFILES
from tests.synth.conftest import make_settings

# Issue #31's targets (CDNOW-like): new-cohort one-time share, median days between
# consecutive purchase days, purchase days per person, over 18 months.
RANGES = {
    "one_time_share": (0.45, 0.55),
    "median_gap_days": (25.0, 40.0),
    "mean_purchase_days": (2.5, 4.0),
}


def inside(stats) -> dict[str, bool]:
    return {k: lo <= getattr(stats, k) <= hi for k, (lo, hi) in RANGES.items()}


@pytest.fixture(scope="module")
def sparse_lake(tmp_path_factory):
    """3000 persons of the sparse profile (the oracle_lake's size, seed and dates), and the
    summary of one increment."""
    settings = make_settings(tmp_path_factory.mktemp("sparse_lake"))
    generate_lake(
        settings, customers=3000, seed=21, start="2023-01-01", end="2025-12-31", profile="sparse"
    )
    return settings, generate_increment(settings)


def test_measure_cohort_on_hand_written_rows():
    # person 1: days 0, 0, 30, 90 (three purchase days); 2: one; 3 enters too late for 18
    # months of history, 4 before start (not new); 5: day 600 falls past its 18 months.
    stats = measure_cohort(
        person=np.array([1, 2, 3, 4, 5]),
        entry_day=np.array([0, 10, 60, -5, 5]),
        buy_person=np.array([1, 1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 5]),
        buy_day=np.array([0, 0, 30, 90, 10, 60, 61, 0, 1, 5, 25, 600]),
        hist_days=600,
    )
    assert stats.persons == 3
    assert stats.one_time_share == pytest.approx(1 / 3)
    assert stats.median_gap_days == 30.0  # gaps 30, 60 (person 1) and 20 (person 5)
    assert stats.mean_purchase_days == pytest.approx(2.0)


def test_measure_cohort_needs_18_months_of_history():
    with pytest.raises(ValueError, match="no new person with a purchase has 548 days"):
        measure_cohort(np.array([1]), np.array([0]), np.array([1]), np.array([0]), hist_days=300)


def test_sparse_profile_is_shaped_like_a_retail_log(sparse_lake, oracle_lake):
    settings, _ = sparse_lake
    sparse = cohort_stats(load_truth(settings.truth), read_meta(settings.truth))
    default = cohort_stats(load_truth(oracle_lake.truth), read_meta(oracle_lake.truth))
    assert sparse.persons > 1000 and default.persons > 1000
    assert all(inside(sparse).values()), sparse
    # The default profile buys too often for a retail log: outside every range (about 28%
    # one-time buyers, a purchase day every 8 days, 11 purchase days per person).
    assert not any(inside(default).values()), default


def test_increment_keeps_the_lakes_profile(sparse_lake):
    settings, increment = sparse_lake
    meta = read_meta(settings.truth)
    assert len(meta["increments"]) == 1
    assert increment.profile == "sparse" and meta["profile"] == "sparse"
    assert meta["params"] == PROFILES["sparse"].to_dict() != PROFILES["default"].to_dict()


def test_unknown_profile_is_refused(tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(ValueError, match=r"unknown profile 'dense': expected one of default, sp"):
        generate_lake(settings, customers=50, seed=1, profile="dense")
    assert not (settings.truth / "generator.json").exists()
