"""Fitting, calibration choice, refit and sampling on a synthetic matrix."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from c360ml.model import train
from c360ml.model.train import TrainConfig, train_and_evaluate

from .model_testdata import FEATURES, WINDOW_DAYS, make_matrix


def test_model_beats_rfm_and_reports_pre_refit_metrics(trained):
    m = trained.metrics
    assert trained.plan.mode == "out_of_time" and not trained.optimistic
    assert trained.split_rows == {"train": 2400, "validation": 400, "test": 400}
    assert m["test_roc_auc"] > m["rfm_logistic_roc_auc"] + 0.1
    assert m["test_roc_auc_minus_rfm_ci_low"] > 0
    assert m["test_roc_auc_ci_low"] < m["test_roc_auc"] < m["test_roc_auc_ci_high"]
    # The refit saw the test labels: its in-sample AUC is reported beside, not instead.
    assert m["refit_insample_test_roc_auc"] >= m["test_roc_auc"]
    assert trained.booster.num_boosted_rounds() == trained.n_trees
    assert trained.prerefit_booster.num_boosted_rounds() == trained.n_trees
    assert trained.grade.grade == "A"


def test_test_rows_are_the_last_cutoff_only(trained, synthetic):
    matrix, _ = synthetic
    last = matrix[matrix.cutoff_time == matrix.cutoff_time.max()]
    assert sorted(trained.test.customer_id) == sorted(last.customer_id)
    np.testing.assert_array_equal(
        trained.test.set_index("customer_id").label.sort_index().to_numpy(),
        last.set_index("customer_id").label.sort_index().to_numpy(),
    )


def test_input_example_holds_no_customer_row(trained, synthetic):
    example = trained.input_example
    assert example.CustomerId.tolist() == ["example-1", "example-2"]
    matrix, _ = synthetic
    values = matrix[list(FEATURES)].to_numpy(np.float64)
    for row in example[list(FEATURES)].to_numpy():
        assert not (np.isclose(values, row).all(axis=1)).any()


def test_calibrator_kept_only_when_out_of_fold_log_loss_improves():
    rng = np.random.default_rng(0)
    truth = rng.random(4000)
    y = (rng.random(4000) < truth).astype(int)
    customers = pd.Series([f"c{i}" for i in range(4000)])
    cal, losses = train.choose_calibrator(truth, y, customers)
    assert cal is None and losses["chosen"] == "none"  # already calibrated
    squashed = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth))))  # overconfident
    cal, losses = train.choose_calibrator(squashed, y, customers)
    assert cal is not None and losses[losses["chosen"]] < losses["none"]


def test_short_history_is_marked_optimistic(small_config):
    matrix, rfm = make_matrix(n_customers=300, n_cutoffs=3, seed=4)
    result = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, small_config)
    assert result.optimistic
    assert "too short" in result.plan.reason


def test_sampling_keeps_every_test_row():
    matrix, _ = make_matrix(n_customers=500, n_cutoffs=4, seed=5)
    test_cut = matrix.cutoff_time.max()
    sampled = train.sample_population(matrix, 0.3, keep_cutoff=test_cut)
    assert (sampled.cutoff_time == test_cut).sum() == 500
    earlier = sampled[sampled.cutoff_time < test_cut]
    assert 0.2 < earlier.customer_id.nunique() / 500 < 0.4
    # The same customers at every earlier cutoff.
    per_cut = earlier.groupby("cutoff_time").customer_id.apply(frozenset)
    assert per_cut.nunique() == 1
    assert train.sample_rate_for(1_000_000, TrainConfig(max_train_customers=200_000), None) == 0.2
    assert train.sample_rate_for(1_000, TrainConfig(), None) == 1.0
    with pytest.raises(ValueError, match="sample_rate"):
        train.sample_rate_for(10, TrainConfig(), 1.5)


def test_test_cutoff_sample_is_larger_and_nested():
    matrix, _ = make_matrix(n_customers=500, n_cutoffs=4, seed=5)
    test_cut = matrix.cutoff_time.max()
    sampled = train.sample_population(matrix, 0.2, keep_cutoff=test_cut, keep_rate=0.6)
    test_ids = set(sampled.customer_id[sampled.cutoff_time == test_cut])
    train_ids = set(sampled.customer_id[sampled.cutoff_time < test_cut])
    assert 0.5 < len(test_ids) / 500 < 0.7 and 0.1 < len(train_ids) / 500 < 0.3
    assert train_ids < test_ids  # every trained customer is also evaluated
    # The customers a pre-read sample picks are exactly those sample_population keeps.
    ids = pd.Index(sorted(matrix.customer_id.unique()))
    assert set(train.sample_customers(ids, 0.6)) == test_ids
    # A keep_rate below the training rate is raised to it (the samples stay nested).
    low = train.sample_population(matrix, 0.3, keep_cutoff=test_cut, keep_rate=0.1)
    assert set(low.customer_id[low.cutoff_time == test_cut]) == set(
        low.customer_id[low.cutoff_time < test_cut]
    )
    config = TrainConfig(max_train_customers=100_000, max_test_customers=200_000)
    assert train.eval_sample_rate_for(1_000_000, config, 0.1) == 0.2
    assert train.eval_sample_rate_for(150_000, config, 0.5) == 1.0
    assert train.eval_sample_rate_for(1_000_000, config, 0.5) == 0.5  # never below training


def test_missing_columns_are_named(small_config):
    matrix, rfm = make_matrix(n_customers=50, n_cutoffs=2)
    with pytest.raises(ValueError, match="f_noise"):
        train_and_evaluate(matrix.drop(columns=["f_noise"]), FEATURES, rfm, 90, small_config)


class _FakeTrial:
    number = 0

    def suggest_int(self, name, low, high):
        return high

    def suggest_float(self, name, low, high, log=False):
        return low


def test_search_space_caps_depth_for_the_scoring_budget():
    params = train.suggest_params(_FakeTrial(), TrainConfig(max_tuned_depth=5))
    assert params["max_depth"] == 5
    assert set(params) <= set(train.booster_params(TrainConfig()))


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna installed")
def test_tuning_without_optuna_says_what_to_install():
    with pytest.raises(ValueError, match="pip install optuna"):
        train.require_optuna()


def test_oracle_figures_when_true_probabilities_are_given(synthetic, small_config):
    matrix, rfm = synthetic
    last = matrix[matrix.cutoff_time == matrix.cutoff_time.max()]
    f = last[list(FEATURES)].to_numpy(np.float64)
    margin = 1.6 * f[:, 0] - 1.2 * f[:, 1] + 0.8 * f[:, 0] * f[:, 2]  # make_matrix's process
    oracle = pd.Series(1 / (1 + np.exp(-margin)), index=last.customer_id.to_numpy())
    result = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, small_config, oracle=oracle)
    m = result.metrics
    assert m["oracle_roc_auc"] >= m["test_roc_auc"] - 0.02
    assert m["test_roc_auc_over_oracle"] == pytest.approx(m["test_roc_auc"] / m["oracle_roc_auc"])
    assert 0.5 < m["test_roc_auc_headroom_closed"] <= 1.2
    assert m["test_roc_auc_headroom_closed_ci_low"] < m["test_roc_auc_headroom_closed_ci_high"]
