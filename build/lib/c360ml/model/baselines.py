"""Baselines scored on the same test rows as the model.

(a) recency as a continuous score (days since the last purchase: the simplest churn
signal), (b) a logistic regression on recency, frequency and monetary value fitted on the
training split, and (c) CI-D's rule baseline (in `evaluate`), which the grade uses. A
model that does not beat (b) with an interval above zero has not earned its features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

RECENCY, FREQUENCY, MONETARY = "recency_days", "frequency_365d", "monetary_365d"
RFM_COLUMNS = (RECENCY, FREQUENCY, MONETARY)
NO_PURCHASE_RECENCY_DAYS = 10_000.0  # "never purchased" as a very long recency


def rfm_inputs(rfm: pd.DataFrame) -> np.ndarray:
    """RFM as model inputs: missing recency = never purchased; money can be negative
    (returns) so it is sign-preserving log-scaled."""
    recency = rfm[RECENCY].astype("float64").fillna(NO_PURCHASE_RECENCY_DAYS).to_numpy()
    frequency = rfm[FREQUENCY].astype("float64").fillna(0.0).to_numpy()
    monetary = rfm[MONETARY].astype("float64").fillna(0.0).to_numpy()
    return np.column_stack([recency, frequency, monetary])


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class RfmLogistic:
    pipeline: Pipeline

    def predict(self, rfm: pd.DataFrame) -> np.ndarray:
        return self.pipeline.predict_proba(rfm_inputs(rfm))[:, 1]


def fit_rfm_logistic(rfm: pd.DataFrame, y: np.ndarray) -> RfmLogistic:
    """Logistic regression on log-scaled, standardised R, F and M."""
    pipe = make_pipeline(
        FunctionTransformer(_signed_log),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    )
    pipe.fit(rfm_inputs(rfm), np.asarray(y).astype(int))
    return RfmLogistic(pipe)


def recency_score(rfm: pd.DataFrame) -> np.ndarray:
    """Days since the last purchase, used directly as a churn score."""
    return rfm_inputs(rfm)[:, 0]
