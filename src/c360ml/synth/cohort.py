"""The shape of a generated purchase log, measured as on a real retail log: the statistics
the generator profiles (`params.PROFILES`) are tuned to and their tests check.

Why per person over its own first 18 months: a real log such as CDNOW follows one
acquisition cohort for 18 months; a generated lake has acquisitions spread over its
history, so every new person (account created on or after `start`) whose 18 months fit in
the history is followed from its entry day, which gives a cohort of comparable size at
any history length. Purchases are the valid ones (not cancelled or voided, not a
return, net amount above zero), counted by distinct UTC purchase days.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

COHORT_DAYS = 548  # 18 months


@dataclass(frozen=True)
class CohortStats:
    """One cohort's purchase-log shape over its first COHORT_DAYS days."""

    persons: int  # new persons followed (at least one valid purchase in their window)
    one_time_share: float  # share with exactly one purchase day
    median_gap_days: float  # median days between consecutive purchase days (all pairs)
    mean_purchase_days: float  # mean purchase days per person

    def to_dict(self) -> dict:
        return asdict(self)


def measure_cohort(
    person: np.ndarray,
    entry_day: np.ndarray,
    buy_person: np.ndarray,
    buy_day: np.ndarray,
    hist_days: int,
    days: int = COHORT_DAYS,
) -> CohortStats:
    """The statistics from day indexes: persons and their entry day, valid purchases
    (person, day). Persons with entry_day in [0, hist_days - days] form the cohort."""
    entry = pd.Series(np.asarray(entry_day), index=np.asarray(person))
    entry = entry[(entry >= 0) & (entry <= hist_days - days)]
    buys = pd.DataFrame({"person": np.asarray(buy_person), "day": np.asarray(buy_day)})
    buys = buys[buys.person.isin(entry.index)]
    start = entry.reindex(buys.person).to_numpy()
    buys = buys[(buys.day >= start) & (buys.day < start + days)]
    days_of = buys.drop_duplicates().sort_values(["person", "day"])
    counts = days_of.groupby("person").size()
    gaps = days_of.groupby("person").day.diff().dropna()
    if counts.empty:
        raise ValueError(
            f"no new person with a purchase has {days} days of history (history {hist_days} "
            "days): generate a longer history"
        )
    return CohortStats(
        persons=int(len(counts)),
        one_time_share=float((counts == 1).mean()),
        median_gap_days=float(gaps.median()) if len(gaps) else float("nan"),
        mean_purchase_days=float(counts.mean()),
    )


def cohort_stats(truth: dict[str, pd.DataFrame], meta: dict) -> CohortStats:
    """The statistics of a generated lake from its truth frames (`oracle.load_truth`) and
    generator.json (`generate.read_meta`)."""
    from c360ml.synth.oracle import valid_purchases

    persons = truth["persons"]
    buys = valid_purchases(truth["purchases"])
    origin = pd.Timestamp(int(meta["start_epoch"]), unit="s", tz="UTC")
    day = ((pd.to_datetime(buys.ts, utc=True) - origin) // pd.Timedelta(days=1)).to_numpy()
    return measure_cohort(
        persons.person_id.to_numpy(),
        persons.entry_day.to_numpy(),
        buys.person_id.to_numpy(),
        day,
        int(meta["hist_days"]),
    )
