"""Synthetic feature matrices and requests for the model tests (no lake, no features module)."""

from __future__ import annotations

import numpy as np
import pandas as pd

WINDOW_DAYS = 90
FEATURES = ("f_orders_90d", "f_spend_365d", "f_days_between", "f_cases", "f_noise")


def make_matrix(
    n_customers: int = 400,
    n_cutoffs: int = 12,
    seed: int = 0,
    spacing_days: int = 30,
    customer_ids: list[str] | None = None,
    churn_shift: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A labelled float32 feature matrix and the RFM of the same rows.

    `churn_shift` is added to every customer's churn log-odds (> 0: most customers churn).

    Churn depends on two features (so a model can beat the RFM logistic); recency is only
    a few days for most customers (so CI-D's rule baseline flags few churners).
    """
    rng = np.random.default_rng(seed)
    ids = customer_ids or [f"cust-{i:05d}" for i in range(n_customers)]
    first = pd.Timestamp("2024-01-01", tz="UTC")
    cutoffs = [first + pd.Timedelta(days=spacing_days * k) for k in range(n_cutoffs)]
    frames = []
    for cutoff in cutoffs:
        n = len(ids)
        f = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
        f[rng.random(n) < 0.05, 3] = np.nan  # some missing values, as featuretools gives
        margin = 1.6 * f[:, 0] - 1.2 * f[:, 1] + 0.8 * f[:, 0] * f[:, 2] + churn_shift
        label = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int8)
        recency = rng.uniform(0, 25, n) + 3 * label
        frame = pd.DataFrame(f, columns=list(FEATURES))
        frame.insert(0, "cutoff_time", cutoff)
        frame.insert(0, "customer_id", ids)
        frame["label"] = label
        frame["recency_days"] = recency
        frame["frequency_365d"] = rng.poisson(4, n).astype(float)
        frame["monetary_365d"] = rng.gamma(2, 50, n)
        frames.append(frame)
    full = pd.concat(frames, ignore_index=True)
    rfm_cols = ["customer_id", "cutoff_time", "recency_days", "frequency_365d", "monetary_365d"]
    matrix = full[["customer_id", "cutoff_time", *FEATURES, "label"]]
    return matrix, full[rfm_cols]


def request_frame(matrix: pd.DataFrame, rows: int = 20) -> pd.DataFrame:
    """A scoring request (CustomerId + features) from the last cutoff of a matrix."""
    last = matrix[matrix["cutoff_time"] == matrix["cutoff_time"].max()].head(rows)
    frame = last.rename(columns={"customer_id": "CustomerId"})
    return frame[["CustomerId", *FEATURES]].reset_index(drop=True)
