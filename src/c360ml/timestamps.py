"""Instants as the lake holds them: UTC, a naive value taken to be UTC already.

Every cutoff, as_of and event time is compared in UTC (DESIGN.md, "Time, identity and
names"); one conversion, so that a cutoff given as text and one read from a table
compare equal.
"""

from __future__ import annotations

import pandas as pd


def utc(t: pd.Timestamp | str) -> pd.Timestamp:
    """A UTC instant; naive input is taken to be UTC already (the lake's convention)."""
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def utc_column(values: pd.Series, unit: str = "us") -> pd.Series:
    """A column of UTC timestamps at one resolution, so frames of us- and ns-resolution
    timestamps join and compare exactly."""
    return pd.to_datetime(values, utc=True).dt.as_unit(unit)
