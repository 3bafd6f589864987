"""Out-of-time splits over training cutoffs, so no training label sees the future.

A row at cutoff c carries a label read from (c, c + w]. The latest cutoff is TEST; the
latest cutoff whose label window ends at or before the test cutoff is VALIDATION; cutoffs
whose label windows end at or before the validation cutoff are TRAIN. So no training
label reaches into the validation or test label windows and no validation label into the
test window: the reported test metrics are what a model trained at the test cutoff would
have scored. When history is too short for that, `plan_splits` falls back to the best
split it can and marks it `optimistic`, with the reason, so every report can say so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from c360ml.timestamps import utc

TRAIN, VALIDATION, TEST, UNUSED = "train", "validation", "test", "unused"
HOLDOUT_SHARE = 0.2  # customers held out when a split must be made by customer, not time


@dataclass(frozen=True)
class SplitPlan:
    """Which cutoff (and, in fallbacks, which customers) goes to which split."""

    train_cutoffs: tuple[pd.Timestamp, ...]
    validation_cutoff: pd.Timestamp | None  # None: validation is a customer holdout of train
    test_cutoff: pd.Timestamp
    window_days: int
    mode: str  # "out_of_time" or a fallback name
    optimistic: bool  # True when a label window of a fitted row overlaps an evaluated one
    reason: str  # plain words for the run, the model card and the printed summary
    test_by_customer: bool = False  # single-cutoff fallback: test = held-out customers

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "optimistic": self.optimistic,
            "reason": self.reason,
            "window_days": self.window_days,
            "train_cutoffs": [str(c.date()) for c in self.train_cutoffs],
            "validation_cutoff": str(self.validation_cutoff.date())
            if self.validation_cutoff is not None
            else "customer holdout of training cutoffs",
            "test_cutoff": str(self.test_cutoff.date()),
            "test_by_customer": self.test_by_customer,
        }


def plan_splits(cutoffs: list[pd.Timestamp], window_days: int) -> SplitPlan:
    """Choose test, validation and train cutoffs from ascending cutoffs."""
    if not cutoffs:
        raise ValueError("no training cutoffs: history is shorter than one prediction window")
    cuts = sorted(pd.Timestamp(c) for c in cutoffs)
    w = pd.Timedelta(days=window_days)
    test = cuts[-1]

    def plan(train, val, mode, reason, **kw) -> SplitPlan:
        optimistic = mode != "out_of_time"
        return SplitPlan(tuple(train), val, test, window_days, mode, optimistic, reason, **kw)

    before_test = [c for c in cuts if c + w <= test]
    if before_test:
        val = before_test[-1]
        train = [c for c in cuts if c + w <= val]
        if train:
            return plan(
                train,
                val,
                "out_of_time",
                f"out of time: {len(train)} training cutoff(s), validation {val.date()}, "
                f"test {test.date()}; no training label window overlaps validation or test",
            )
        train = [c for c in cuts if c < val]
        if train:
            return plan(
                train,
                val,
                "validation_overlap",
                "history too short for an honest validation cutoff: training label windows "
                f"overlap the validation window ({val.date()}); early stopping and the "
                "calibration choice are optimistic (the test cutoff is still out of time)",
            )
        return plan(
            [val],
            None,
            "validation_holdout",
            "history too short for a validation cutoff: validation is a 20% customer "
            f"holdout of the training cutoff {val.date()} (same label window as training); "
            "early stopping and the calibration choice are optimistic, test is out of time",
        )
    earlier = [c for c in cuts if c < test]
    if earlier:
        return plan(
            earlier,
            None,
            "test_overlap",
            "history too short: every earlier cutoff's label window overlaps the test "
            f"window ({test.date()}); test metrics are optimistic; validation is a customer "
            "holdout",
        )
    return plan(
        [test],
        None,
        "single_cutoff",
        f"only one cutoff ({test.date()}): train, validation and test are disjoint customer "
        "holdouts of the same cutoff (a random split, not out of time); metrics are optimistic",
        test_by_customer=True,
    )


def customer_bucket(customer_ids: pd.Series) -> np.ndarray:
    """A stable number in [0, 1) per customer (same customer, same bucket, every run)."""
    ids = customer_ids.astype(str).to_numpy()
    digest = [int(hashlib.blake2b(i.encode(), digest_size=8).hexdigest(), 16) for i in ids]
    return np.asarray(digest, dtype=np.float64) / 2.0**64


def assign_splits(
    rows: pd.DataFrame,
    plan: SplitPlan,
    customer_col: str = "customer_id",
    cutoff_col: str = "cutoff_time",
) -> pd.Series:
    """Split name per row (train / validation / test / unused), aligned to `rows`."""
    cut = pd.to_datetime(rows[cutoff_col], utc=True)
    test_cut = utc(plan.test_cutoff)
    out = np.full(len(rows), UNUSED, dtype=object)
    in_train = cut.isin([utc(c) for c in plan.train_cutoffs]).to_numpy()
    bucket = customer_bucket(rows[customer_col]) if plan.validation_cutoff is None else None
    if plan.validation_cutoff is not None:
        out[in_train] = TRAIN
        out[(cut == utc(plan.validation_cutoff)).to_numpy()] = VALIDATION
    else:
        out[in_train] = np.where(bucket[in_train] < HOLDOUT_SHARE, VALIDATION, TRAIN)
    is_test = (cut == test_cut).to_numpy()
    if plan.test_by_customer:
        # One cutoff: test takes another disjoint customer slice of it.
        holdout = is_test & (bucket >= 1 - HOLDOUT_SHARE)
        out[holdout] = TEST
    else:
        out[is_test] = TEST
    return pd.Series(out, index=rows.index, name="split")


def refit_mask(split: pd.Series) -> np.ndarray:
    """Rows the final model is refitted on: every labelled cutoff (all used splits)."""
    return (split != UNUSED).to_numpy()
