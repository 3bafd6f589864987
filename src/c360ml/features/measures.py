"""Named business measures (CI-D "measures"): declared in `features/measures.yaml`.

Why declarative: analysts add or change a measure (primitive, column, window, where) in
YAML without touching code; each becomes one Featuretools aggregation computed on the
as-of view of gold, with the same window semantics as model features ((t - w, t]).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from c360ml.schemas import CustomerProfile
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

AS_OF = "as_of"
DATAFRAMES = ("orders", "order_lines", "support_cases")


class Measure(BaseModel):
    """One named measure: an aggregation over a customer's activity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")  # snake_case column name in the output
    description: str = ""  # what a business user reads
    primitive: str  # featuretools aggregation primitive (count, sum, mean, mode, ...)
    args: dict[str, Any] = {}  # primitive constructor arguments, e.g. {unit: days}
    dataframe: str = "orders"  # the activity aggregated: orders, order_lines, support_cases
    column: str | None = None  # column aggregated; None = the rows themselves (count)
    # optional transform of the column first, {name: {args}}, e.g. {time_since: {unit: days}}
    transform: dict[str, dict[str, Any]] | None = None
    window_days: int | None = Field(None, ge=1)  # lookback (as_of - w, as_of]; None = all
    where: dict[str, Any] = {}  # column -> value; all must hold for a row to count


def load_measures(path: Path) -> list[Measure]:
    """The `measures:` list of the YAML file, validated; names must be unique."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read measures file {path}: {exc}") from exc
    entries = data.get("measures") if isinstance(data, dict) else None
    if not entries:
        raise ValueError(f"measures file {path} has no 'measures:' list")
    try:
        measures = [Measure(**e) for e in entries]
    except Exception as exc:
        raise ValueError(f"invalid measure in {path}: {exc}") from exc
    names = [m.name for m in measures]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate measure name(s) in {path}: {dupes}")
    bad = [m.name for m in measures if m.dataframe not in DATAFRAMES]
    if bad:
        raise ValueError(f"measures {bad} aggregate an unknown dataframe; use one of {DATAFRAMES}")
    return measures


def build_measures(gold, as_of: pd.Timestamp, measures_path: Path) -> pd.DataFrame:
    """customer_id, as_of, one column per measure, for every profile in gold."""
    from c360ml.features.dfs import compute_measures

    measures = load_measures(measures_path)
    return measures_frame(compute_measures(gold, as_of, measures), measures, as_of)


def measures_frame(matrix: pd.DataFrame, measures: list[Measure], as_of) -> pd.DataFrame:
    """The gold/customer_measures rows of a measure matrix (indexed by customer_id).

    Numeric measures are float64 (counts included, so a window with no rows is 0.0 and
    a mean over no rows is NaN); categorical ones (e.g. mode) are strings.
    """
    as_of = utc(as_of)
    out = pd.DataFrame({CustomerProfile.customer_id: matrix.index.to_numpy()})
    out[AS_OF] = pd.Series(as_of, index=out.index).dt.as_unit("us")
    for m in measures:
        col = matrix[m.name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            out[m.name] = col.astype("Float64").to_numpy(dtype="float64", na_value=float("nan"))
        else:
            out[m.name] = col.astype("string").to_numpy()
    log.info("built %d measures for %d customers at %s", len(measures), len(out), as_of)
    return out
