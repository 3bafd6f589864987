"""Labels against the generator's truth: the oracle is calibrated on the clean purchase
log's labels, and our labels from gold agree with the clean-log labels but for dirt."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from c360ml import features as ft
from c360ml.storage.lake import Lake
from c360ml.synth.oracle import oracle_purchase_probability, valid_purchases

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow
T = pd.Timestamp("2025-06-01", tz="UTC")


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from tests.conftest import generated_lake

    return generated_lake(tmp_path_factory.mktemp("oracle_labels"), customers=2500, seed=5)


def clean_log_labels(settings, cfg: ft.ChurnConfig) -> pd.DataFrame:
    """person_id, label from the truth's clean purchase log, with our time semantics."""
    persons = pd.read_parquet(settings.truth / "persons.parquet")
    b2c = set(persons.loc[persons.kind != "organisation", "person_id"])  # gold profiles: persons
    buys = valid_purchases(pd.read_parquet(settings.truth / "purchases.parquet"))
    buys = buys[buys.person_id.isin(b2c)]
    lookback = buys[(buys.ts > T - pd.Timedelta(days=cfg.active_lookback_days)) & (buys.ts <= T)]
    active = pd.Index(lookback.person_id.unique())
    window = buys[(buys.ts > T) & (buys.ts <= T + pd.Timedelta(days=cfg.prediction_window_days))]
    bought = set(window.person_id)
    return pd.DataFrame({"person_id": active, "label": [0 if p in bought else 1 for p in active]})


def test_oracle_matches_the_clean_log_churn_rate(lake):
    cfg = ft.ChurnConfig()
    truth = clean_log_labels(lake, cfg)
    p_buy = oracle_purchase_probability(
        lake.truth, truth.person_id.to_numpy(), T, cfg.prediction_window_days, n_sims=200
    )
    p_churn = 1 - np.asarray(p_buy, dtype=float)
    ok = ~np.isnan(p_churn)
    observed, expected = truth.label.to_numpy()[ok].mean(), p_churn[ok].mean()
    # Sampling error of a mean of independent Bernoullis with the oracle's probabilities.
    se = np.sqrt((p_churn[ok] * (1 - p_churn[ok])).sum()) / ok.sum()
    assert abs(observed - expected) < 3 * se + 0.005, (observed, expected, se)


def test_gold_labels_agree_with_clean_log_labels_but_for_dirt(lake):
    cfg = ft.ChurnConfig()
    truth = clean_log_labels(lake, cfg)
    gold = ft.read_gold(Lake(lake.lake))
    ours = ft.compute_labels(gold, [T], cfg)
    keys = pd.read_parquet(lake.truth / "person_keys.parquet")
    source_map = Lake(lake.lake).read_pandas("gold", "customer_source_map")
    person = source_map.merge(keys, on=["source", "source_key"])[["customer_id", "person_id"]]
    one_to_one = (
        person.drop_duplicates()
        .groupby("customer_id")
        .filter(lambda g: g.person_id.nunique() == 1)
        .drop_duplicates("customer_id")
    )
    ours = ours.merge(one_to_one, on="customer_id")
    both = truth.merge(ours, on="person_id", how="outer", suffixes=("_truth", "_gold"))
    population_diff = both.label_truth.isna() | both.label_gold.isna()
    label_diff = (
        both.label_truth.notna() & both.label_gold.notna() & (both.label_truth != both.label_gold)
    )
    exceptions = int(population_diff.sum() + label_diff.sum())
    log.info(
        "labels: %d persons, %d exceptions (%d population, %d label) explained by dirt "
        "(late rows, malformed lines, cancellations known later)",
        len(both),
        exceptions,
        int(population_diff.sum()),
        int(label_diff.sum()),
    )
    assert len(both) > 500
    assert exceptions <= 0.03 * len(both), both[population_diff | label_diff].head(20)
