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
whose values at a cutoff change when only data after the cutoff changes, and training
refuses a spec that fails it (`c360ml.api.Project.training_data`).

The definitions travel with the model in its FeatureSet (`meta["sql_features"]`), so the
refresh recomputes them as it recomputes the Featuretools features.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from c360ml.features.gold import GoldTables, restrict_to_customers, standardise_gold, view_as_of
from c360ml.schemas import CustomerProfile, OrderLines, Orders, StatusHistory
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


@dataclass(frozen=True)
class Leak:
    """A feature whose values at the cutoff changed when only later data changed."""

    feature: str
    change: str  # which change after the cutoff moved it
    customers: int  # customers whose value moved
    of: int  # customers compared

    def __str__(self) -> str:
        return (
            f"feature {self.feature!r} leaks: its values at the cutoff changed for "
            f"{self.customers} of {self.of} customers when only data after the cutoff "
            f"changed ({self.change})"
        )


@dataclass(frozen=True)
class LeakageReport:
    """What `check_leakage` compared and which features leak."""

    cutoff: pd.Timestamp
    customers: int
    features: tuple[str, ...]
    leaks: tuple[Leak, ...]

    @property
    def ok(self) -> bool:
        return not self.leaks

    def message(self) -> str:
        if self.ok:
            return (
                f"no leak: {len(self.features)} feature(s) of {self.customers} customers at "
                f"{self.cutoff.date()} are unchanged by every change after the cutoff"
            )
        by_feature: dict[str, list[Leak]] = {}
        for leak in self.leaks:
            by_feature.setdefault(leak.feature, []).append(leak)
        return "; ".join(
            f"{leaks[0]}"
            + (f" and {len(leaks) - 1} other change(s)" if len(leaks) > 1 else "")
            + ": read the as-of view tables (orders, order_lines, support_cases), "
            "not current_*, and nothing after cutoff_time"
            for leaks in by_feature.values()
        )

    def raise_if_leaky(self) -> None:
        if not self.ok:
            raise LeakageError(self.message())


class LeakageError(ValueError):
    """A user's feature reads data after its cutoff (the label window or later edits)."""


def future_changes(gold: GoldTables, t: pd.Timestamp) -> dict[str, GoldTables]:
    """Versions of `gold` that differ from it only after t (each named by what changed).

    A feature computed at t must give bit-for-bit the same values on each. Together they
    cover what can happen after a cutoff: new purchases in the label window, every later
    event and status change undone, and profile attributes edited (their values at t are
    unknown, so a feature must not read them). The check is empirical: a feature that
    depends on later data only through values none of these changes produce can pass."""
    t = utc(t)
    gold = standardise_gold(gold)
    customers = gold.customers[CUSTOMER_ID]
    stamp = t + pd.Timedelta(days=1)
    new_orders = pd.DataFrame(
        {
            Orders.order_id: "leakcheck-" + customers.astype(str),
            Orders.customer_id: customers.to_numpy(),
            Orders.order_ts: stamp,
        }
    )
    template = gold.orders.iloc[:1]
    if len(template):
        filler = template.drop(columns=list(new_orders.columns)).iloc[[0] * len(new_orders)]
        new_orders = pd.concat([new_orders, filler.reset_index(drop=True)], axis=1)
        new_orders = new_orders.assign(
            **{
                Orders.is_cancelled: False,
                Orders.is_return: False,
                Orders.net_amount: 50.0,
                Orders.gross_amount: 50.0,
            }
        )[gold.orders.columns]
    purchases = replace(gold, orders=pd.concat([gold.orders, new_orders], ignore_index=True))
    # The lake as it was known at t: later events gone, statuses back to their value at t.
    known = view_as_of(gold, t)
    as_known = replace(
        gold,
        orders=known.orders,
        order_lines=gold.order_lines[
            gold.order_lines[OrderLines.order_id].isin(known.orders[Orders.order_id])
        ],
        support_cases=known.support_cases,
        order_status=_closed(gold.order_status, t),
        case_status=_closed(gold.case_status, t),
    )
    edited = gold.customers.copy()
    for column in edited.columns:
        if column in (CUSTOMER_ID, CustomerProfile.created_ts):
            continue
        if pd.api.types.is_numeric_dtype(edited[column]):
            edited[column] = edited[column] + 1
        elif pd.api.types.is_string_dtype(edited[column]) or edited[column].dtype == object:
            edited[column] = "edited-after-cutoff"
    return {
        "a purchase added for every customer one day after the cutoff, in the label window": (
            purchases
        ),
        "every event and status change after the cutoff undone": as_known,
        "profile attributes edited after the cutoff": replace(gold, customers=edited),
    }


def _closed(history: pd.DataFrame, t: pd.Timestamp) -> pd.DataFrame:
    known = history[history[StatusHistory.valid_from] <= t].copy()
    known.loc[known[StatusHistory.valid_to] > t, StatusHistory.valid_to] = pd.NaT
    return known


def check_leakage(
    gold: GoldTables,
    spec_path: Path,
    cutoff: pd.Timestamp,
    customers: pd.Index | None = None,
    max_customers: int = 200,
) -> LeakageReport:
    """The leakage tests on a spec's features (the `dfs:` ones and the `sql_features:`):
    each is computed at `cutoff` on `gold` and on every `future_changes` of it, and must not
    move. `customers` (default: up to `max_customers` with an order by the cutoff) bounds
    the cost: Featuretools runs once per change."""
    from c360ml.features.dfs import calculate_features, derive_feature_set

    t = utc(cutoff)
    gold = standardise_gold(gold)
    if customers is None:
        before = gold.orders[gold.orders[Orders.order_ts] <= t][Orders.customer_id]
        customers = pd.Index(before.drop_duplicates().sort_values().head(max_customers))
    if not len(customers):
        raise ValueError(f"no customer has an order by {t.date()}: nothing to check")
    gold = restrict_to_customers(gold, pd.Index(customers))
    fs = derive_feature_set(gold, spec_path)
    population = pd.DataFrame({CUSTOMER_ID: pd.Index(customers).to_numpy(), "cutoff_time": t})
    base = calculate_features(gold, population, fs).set_index(CUSTOMER_ID)
    leaks = []
    for change, changed in future_changes(gold, t).items():
        other = calculate_features(changed, population, fs).set_index(CUSTOMER_ID)
        for name in fs.names:
            a, b = base[name].to_numpy(), other[name].reindex(base.index).to_numpy()
            moved = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            if moved.any():
                leaks.append(Leak(name, change, int(moved.sum()), len(a)))
    report = LeakageReport(t, len(customers), tuple(fs.names), tuple(leaks))
    log.info("leakage check of %s: %s", spec_path, report.message())
    return report


__all__ = [
    "Leak",
    "LeakageError",
    "LeakageReport",
    "SqlFeature",
    "check_leakage",
    "compute_sql_features",
    "definitions",
    "future_changes",
    "load_sql_features",
]
