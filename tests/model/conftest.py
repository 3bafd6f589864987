"""Fixtures of the model tests: one trained result and bundle shared by the session."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.model.train import TrainConfig

from .model_testdata import FEATURES, WINDOW_DAYS, make_matrix


@pytest.fixture(scope="session")
def small_config() -> TrainConfig:
    return TrainConfig(nthread=1, max_trees=80, early_stopping_rounds=10, bootstrap_resamples=60)


@pytest.fixture(scope="session")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_matrix()


@pytest.fixture(scope="session")
def trained(synthetic, small_config):
    """One TrainResult on the synthetic matrix, shared by the tests that only read it."""
    from c360ml.model.train import train_and_evaluate

    matrix, rfm = synthetic
    return train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, small_config)


@pytest.fixture(scope="session")
def bundle(trained):
    from c360ml.model.registry import build_bundle

    return build_bundle(
        trained,
        {n: "float32" for n in FEATURES},
        None,
        {"prediction_window_days": WINDOW_DAYS},
        trained.plan.test_cutoff,
    )
