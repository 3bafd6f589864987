"""A user's own features: SQL expressions in their spec file, and the leakage check.

Why SQL: a data scientist who wants "purchases in the last 14 days" or "share of orders
returned" should write one line, not a Featuretools primitive. A feature is an aggregate
expression evaluated by DuckDB per customer over one table, in the spec's `sql_features:`
section (beside `churn:` and `dfs:`):

    sql_features:
      - name: purchases_14d
        table: orders
        expression: count(*) FILTER (WHERE is_purchase AND order_ts > cutoff_time - INTERVAL 14 DAY)
        default: 0          # value of a customer with no rows in the table (default: missing)

`table` is one of the **as-of view** at the cutoff (`orders` with `is_purchase`,
`order_lines` with their order's `customer_id` and `order_ts`, `support_cases`): events with
time <= t and statuses valid at t, so such a feature cannot see the future. `cutoff_time` is
t. The expression may also read, in a subquery, the tables **as they are now**
(`current_orders`, `current_order_lines`, `current_support_cases`, `current_customers`: every
row, current statuses and profile attributes). They exist for exploration and are where a
feature can leak; `check_leakage` runs the leakage tests on a spec and names each feature
whose values at a cutoff change when only data after the cutoff changes
(`c360ml.features.leakage`), and training refuses a spec that fails it
(`c360ml.api.Project.training_data`).

The definitions travel with the model in its FeatureSet (`meta["sql_features"]`), so the
refresh recomputes them as it recomputes the Featuretools features.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from c360ml.features.gold import GoldTables
from c360ml.schemas import CustomerProfile, OrderLines, Orders
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

META_KEY = "sql_features"  # FeatureSet.meta key holding the definitions
VIEW_TABLES = ("orders", "order_lines", "support_cases")
CURRENT_PREFIX = "current_"
CUSTOMER_ID = CustomerProfile.customer_id
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SqlFeature(BaseModel):
    """One user feature: an aggregate SQL expression over one as-of view table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME.pattern)  # column name in the matrix (letters, digits, _)
    table: str  # orders | order_lines | support_cases (the as-of view at the cutoff)
    expression: str = Field(min_length=1)  # DuckDB aggregate, e.g. count(*) FILTER (WHERE ...)
    default: float | None = None  # value for a customer without rows; None = missing
    description: str = ""  # what it means, for the model card and the glossary

    def model_post_init(self, _: Any) -> None:
        if self.table not in VIEW_TABLES:
            raise ValueError(
                f"sql feature {self.name!r}: table must be one of {', '.join(VIEW_TABLES)} "
                f"(the as-of view), not {self.table!r}"
            )


def load_sql_features(path: Path) -> list[SqlFeature]:
    """The `sql_features:` section of a spec file (empty when it has none)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read feature spec {path}: {exc}") from exc
    entries = data.get(META_KEY) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {META_KEY} must be a list of features")
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(SqlFeature(**entry))
        except (ValidationError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {META_KEY}[{i}]: {_one_line(exc)}") from None
    names = [f.name for f in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}: sql feature name(s) used twice: {twice}")
    return out


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return " ".join(str(exc).split())


def definitions(meta: dict) -> list[SqlFeature]:
    """The SQL features a FeatureSet carries."""
    return [SqlFeature(**d) for d in meta.get(META_KEY, [])]


def to_meta(features: list[SqlFeature]) -> list[dict]:
    return [f.model_dump() for f in features]


def _relations(frames: dict[str, pd.DataFrame], current: GoldTables | None) -> dict:
    """The tables a feature's SQL sees: the as-of view (lines with their order's customer and
    time) and, when given, gold as it is now under `current_*`."""
    orders = frames["orders"]
    lines = frames["order_lines"].merge(
        orders[[Orders.order_id, Orders.customer_id, Orders.order_ts]],
        on=OrderLines.order_id,
        how="inner",
    )
    out = {
        "orders": orders,
        "order_lines": lines,
        "support_cases": frames["support_cases"],
    }
    if current is not None:
        out |= {
            "current_orders": current.orders,
            "current_order_lines": current.order_lines,
            "current_support_cases": current.support_cases,
            "current_customers": current.customers,
        }
    return out


def compute_sql_features(
    frames: dict[str, pd.DataFrame],
    ids: pd.Index,
    t: pd.Timestamp,
    features: list[SqlFeature],
    current: GoldTables | None = None,
) -> pd.DataFrame:
    """The features of `ids` at t, indexed by customer_id, in `features` order (float32).

    `frames` are the activity frames of the as-of view at t (what the Featuretools features
    read); `current` the gold the view was cut from. DuckDB runs without access to files, so
    an expression reads nothing but these tables."""
    out = pd.DataFrame(index=pd.Index(ids, name=CUSTOMER_ID))
    if not features:
        return out
    con = duckdb.connect(config={"threads": 1})
    try:
        for name, frame in _relations(frames, current).items():
            con.register(name, frame)
        con.execute("SET enable_external_access = false")
        con.execute("SET TimeZone = 'UTC'")
        cutoff = utc(t).tz_convert(None).to_pydatetime()
        for f in features:
            sql = (
                f"SELECT src.{CUSTOMER_ID} AS customer_id, ({f.expression}) AS value "
                f"FROM {f.table} AS src, (SELECT ?::TIMESTAMPTZ AS cutoff_time) AS cutoff_row "
                f"GROUP BY src.{CUSTOMER_ID}, cutoff_row.cutoff_time"
            )
            try:
                values = con.execute(sql, [cutoff]).df()
            except duckdb.Error as exc:
                first = str(exc).strip().splitlines()[0]
                raise ValueError(f"sql feature {f.name!r} cannot be computed: {first}") from None
            series = pd.to_numeric(values.set_index("customer_id")["value"], errors="coerce")
            column = series.reindex(out.index).astype("float64")
            if f.default is not None:
                column = column.fillna(f.default)
            out[f.name] = column.to_numpy(dtype=np.float32)
    finally:
        con.close()
    return out


# ---------------------------------------------------------------- the leakage check


__all__ = [
    "SqlFeature",
    "compute_sql_features",
    "definitions",
    "load_sql_features",
]
