"""Drift: does today's population still look like the rows the model was tested on?

At training, each feature's and the ChurnScore's distribution on the test cutoff's rows
(out of sample) is stored with the model as bins: deciles of the values, a bin of its own
for any single value holding POINT_MASS of the rows (a feature that is 0 for most customers
would otherwise fall into one decile and hide every change), and a bin for missing values.
Each refresh compares the current snapshot with them by the population stability index,
and counts the profiles with a value outside the range seen in testing.

Calendar-scaled features do not raise the alarm. "Days since the first order" (Featuretools'
MAX over TIME_SINCE of an event time, all history) and "days since the account was
created" grow by one every day a customer stays, so against a reference taken at the test
cutoff their PSI rises with the calendar alone: in a year without any shock (the control
run in benchmarks/results/lifecycle.md) the first-order age is the most drifted top-10
feature every month and climbs steadily, and in the lake more so, as "first order" means
the first one the lake holds: every customer older than the lake piles up at the lake's
age, a point mass that moves a day per day. That is ageing, not a changed population; it is
what `max_model_age_days` is for, and an alarm on it would retrain on a timer of its own.
Their PSI and their share outside the tested range are still recorded and shown;
`alarming` only keeps them out of the alarm and the retraining trigger. Recency (MIN over
TIME_SINCE) and windowed versions (`_30d`, ...) are bounded by the window or the active
population and stay in.
"""

from __future__ import annotations

import re

import numpy as np

POINT_MASS = 0.05  # a value holding this share of the reference rows gets a bin of its own
FLOOR = 1e-4  # share given to an empty bin (PSI is infinite otherwise)
SCORE = "ChurnScore"  # the reference entry of the model's own output
# Featuretools names of the time since a customer's first event over all history, and of
# the time since its own creation: `MAX(orders.TIME_SINCE(order_ts, unit=days))`,
# `TIME_SINCE(created_ts, unit=days)`
_CALENDAR = re.compile(r"^(MAX\(\w+\.TIME_SINCE\([^()]*\)\)|TIME_SINCE\([^()]*\))$")


def calendar_scaled(name: str) -> bool:
    """True for a feature that grows by one every day a customer stays (see the module
    doc): the age of the first event or of the account, over all history."""
    return bool(_CALENDAR.match(name))


def alarming(name: str, value: float, threshold: float) -> bool:
    """Whether a column's PSI raises the drift alarm: at or above the threshold, unless
    the column is calendar-scaled (its PSI measures elapsed time, not a changed population)."""
    return bool(value >= threshold) and not calendar_scaled(name)


def reference(values: np.ndarray) -> dict[str, object]:
    """Bins of one column: cut points, each bin's share (the last bin is missing values),
    and the range of the values."""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    if len(present) == 0:
        return {"cuts": [], "shares": shares([], values), "low": None, "high": None}
    unique, counts = np.unique(present, return_counts=True)
    masses = unique[counts >= POINT_MASS * len(values)]
    deciles = np.quantile(present, np.linspace(0.1, 0.9, 9))
    # (m - tiny, m] holds exactly the point mass m
    cuts = np.unique(np.concatenate([deciles, masses, np.nextafter(masses, -np.inf)]))
    return {
        "cuts": cuts.tolist(),
        "shares": shares(cuts, values),
        "low": float(present.min()),
        "high": float(present.max()),
    }


def shares(cuts: list[float] | np.ndarray, values: np.ndarray) -> list[float]:
    """Share of values in (-inf, c1], (c1, c2], ..., (ck, inf), then missing."""
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    index = np.searchsorted(np.asarray(cuts, dtype=np.float64), values[~missing], side="left")
    counts = np.append(np.bincount(index, minlength=len(cuts) + 1), missing.sum())
    return (counts / max(len(values), 1)).tolist()


def psi(ref: dict[str, object], values: np.ndarray) -> float:
    """Population stability index of `values` against a reference (0 = the same)."""
    return _psi(ref, shares(ref["cuts"], values))


def psi_of_counts(ref: dict[str, object], counts: list[int]) -> float:
    """`psi` from the values' counts over the reference's bins, in `shares`' order (what
    the Spark engine counts where the values are, `c360ml.spark.outputs.drift_counts`)."""
    counts = np.asarray(counts, dtype=np.float64)
    return _psi(ref, (counts / max(counts.sum(), 1)).tolist())


def _psi(ref: dict[str, object], actual_shares: list[float]) -> float:
    expected = np.maximum(np.asarray(ref["shares"], dtype=np.float64), FLOOR)
    actual = np.maximum(np.asarray(actual_shares, dtype=np.float64), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def outside(ref: dict[str, object], values: np.ndarray) -> np.ndarray:
    """Which values lie outside the range seen in testing (missing values never do)."""
    values = np.asarray(values, dtype=np.float64)
    if ref["low"] is None:
        return ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        return (values < ref["low"]) | (values > ref["high"])


def references(x: np.ndarray, names: tuple[str, ...], scores: np.ndarray) -> dict[str, dict]:
    """The bins of every feature column of `x` and of the scores."""
    out = {name: reference(x[:, j]) for j, name in enumerate(names)}
    out[SCORE] = reference(scores)
    return out


def latest_alarms(table, model_version: str | None = None) -> dict[str, object] | None:
    """What the latest refresh flagged (a gold/score_drift frame in, plain JSON out): the
    as_of, the model version, the score's PSI and every column at or above the alarm, worst
    first. None when nothing was measured. For the places people look (the refresh summary,
    the service's /metadata, the report) and the webhook; no customer data in it."""
    if table is None or not len(table):
        return None
    if model_version is not None:
        table = table[table["ModelVersion"].astype(str) == str(model_version)]
        if not len(table):
            return None
    rows = table[table["ScoredAsOf"] == table["ScoredAsOf"].max()]
    score = rows[rows["column"] == SCORE]
    flagged = rows[rows["alarm"].astype(bool)].sort_values("psi", ascending=False)
    return {
        "ScoredAsOf": rows["ScoredAsOf"].iloc[0].isoformat(),
        "ModelVersion": str(rows["ModelVersion"].iloc[0]),
        "score_psi": float(score["psi"].iloc[0]) if len(score) else None,
        "alarms": [
            {
                "column": str(r.column),
                "label": str(r.label),
                "psi": round(float(r.psi), 4),
                "share_outside_range": round(float(r.share_outside_range), 4),
            }
            for r in flagged.itertuples()
        ],
    }


def read_latest_alarms(settings, model_version: str | None = None) -> dict[str, object] | None:
    """latest_alarms of the lake's gold/score_drift (None: no drift measured yet)."""
    from c360ml.storage.lake import Lake

    lake = Lake(settings.lake)
    if not lake.exists("gold", "score_drift"):
        return None
    return latest_alarms(lake.read_pandas("gold", "score_drift"), model_version)
