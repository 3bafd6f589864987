"""The behavioural process and its oracle: calibration, ranking, realistic repeat behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from c360ml.synth.oracle import (
    load_truth,
    omniscient_purchase_probability,
    oracle_purchase_probability,
    valid_purchases,
)

CUTOFF = pd.Timestamp("2024-12-31", tz="UTC")  # a year before the end of history
WINDOW = 90


def auc(score: np.ndarray, y: np.ndarray) -> float:
    ranks = rankdata(score)
    n1, n0 = y.sum(), len(y) - y.sum()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@pytest.fixture(scope="module")
def population(oracle_lake):
    """Persons with a valid purchase in the year before the cutoff, and their label."""
    truth = load_truth(oracle_lake.truth)
    buys = valid_purchases(truth["purchases"])
    past = buys[(buys.ts >= CUTOFF - pd.Timedelta(days=365)) & (buys.ts < CUTOFF)]
    future = buys[(buys.ts >= CUTOFF) & (buys.ts < CUTOFF + pd.Timedelta(days=WINDOW))]
    ids = np.sort(past.person_id.unique())
    bought = np.isin(ids, future.person_id.unique())
    return ids, bought, truth


@pytest.fixture(scope="module")
def scores(oracle_lake, population):
    ids, _, _ = population
    oracle = oracle_purchase_probability(oracle_lake.truth, ids, CUTOFF, WINDOW, seed=1)
    omni = omniscient_purchase_probability(oracle_lake.truth, ids, CUTOFF, WINDOW, seed=1)
    return oracle, omni


def test_churn_rate_among_active_is_realistic(population):
    _, bought, _ = population
    assert len(bought) > 800
    assert 0.4 <= 1 - bought.mean() <= 0.65


def test_many_one_time_buyers_and_heavy_tail(population):
    _, _, truth = population
    buys = valid_purchases(truth["purchases"])
    counts = buys.groupby("person_id").size()
    assert 0.2 < (counts == 1).mean() < 0.6
    assert counts.quantile(0.99) > 5 * counts.median()


def test_oracle_mean_matches_observed_rate(population, scores):
    _, bought, _ = population
    oracle, omni = scores
    se = np.sqrt(bought.mean() * (1 - bought.mean()) / len(bought))
    assert abs(oracle.mean() - bought.mean()) < 3 * se
    assert abs(omni.mean() - bought.mean()) < 3 * se


def test_oracle_is_calibrated_by_decile(population, scores):
    _, bought, _ = population
    oracle, _ = scores
    deciles = pd.qcut(rankdata(oracle, method="ordinal"), 10, labels=False)
    table = (
        pd.DataFrame({"d": deciles, "p": oracle, "y": bought})
        .groupby("d")
        .agg(p=("p", "mean"), y=("y", "mean"), n=("y", "size"))
    )
    se = np.sqrt(np.clip(table.p * (1 - table.p), 0.01, None) / table.n)
    assert (np.abs(table.p - table.y) < 4 * se).all(), table


def test_omniscient_ranks_at_least_as_well_and_beats_recency(population, scores):
    ids, bought, truth = population
    oracle, omni = scores
    assert auc(omni, bought) >= auc(oracle, bought) > 0.75
    buys = valid_purchases(truth["purchases"])
    last = buys[buys.ts < CUTOFF].groupby("person_id").ts.max().reindex(ids)
    recency = -(CUTOFF - last).dt.days.to_numpy()
    assert auc(oracle, bought) > auc(recency, bought)


def test_support_cases_and_returns_raise_dropout(population):
    """Observable drivers move the hidden hazard: recent cases/returns -> more dropouts."""
    ids, _, truth = population
    persons = truth["persons"].set_index("person_id").loc[ids]
    start = CUTOFF - pd.Timedelta(days=90)
    cutoff_day = (CUTOFF - pd.Timestamp("2023-01-01", tz="UTC")).days
    alive = persons.dropout_day.isna() | (persons.dropout_day >= cutoff_day)
    drops = (persons.dropout_day < cutoff_day + WINDOW).to_numpy() & alive.to_numpy()
    cases = truth["cases"]
    buys = truth["purchases"]
    recent_case = cases[(cases.ts >= start) & (cases.ts < CUTOFF)].person_id.unique()
    recent_return = buys[buys.is_return & (buys.ts >= start) & (buys.ts < CUTOFF)].person_id
    for flagged in (recent_case, recent_return.unique()):
        hit = np.isin(ids, flagged) & alive.to_numpy()
        rest = ~np.isin(ids, flagged) & alive.to_numpy()
        assert hit.sum() > 30
        assert drops[hit].mean() > drops[rest].mean()


def test_oracle_refuses_unknown_persons_and_windows(oracle_lake):
    with pytest.raises(KeyError, match="unknown person ids"):
        oracle_purchase_probability(oracle_lake.truth, [10**9], CUTOFF, WINDOW)
    with pytest.raises(ValueError, match="simulated horizon"):
        oracle_purchase_probability(oracle_lake.truth, [0], CUTOFF, 5000)
