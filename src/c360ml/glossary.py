"""Readable features: a label, a unit and a sentence generated from a feature's definition.

Featuretools names a feature by its expression (`MIN(orders.TIME_SINCE(order_ts,
unit=days))`), which a marketer reading InfluentialFactors in the CDP cannot use. Those
names follow one grammar, `AGG(table[.inner] [WHERE column = value])[_<N>d]`, over the gold
tables, whose columns c360ml fixes; so a label is composed from the parts, the gold
tables' nouns (declared with them, `c360ml.medallion.declarations`) and a vocabulary of
their columns below ("Days since last order", "Spend in store, all time").
A feature outside the vocabulary (a user's own primitive) keeps its expression as label, and
a test holds the default spec's labels against a reviewed list.

Without featuretools on purpose (it imports only the gold declarations): the model bundle
carries the labels, and scoring (service included) formats values with `format_value`
without importing featuretools.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from c360ml.medallion.declarations import entities

COUNT, AMOUNT, DAYS, NUMBER = "count", "amount", "days", "number"  # units
PROBABILITY = "probability"  # a chance in [0, 1], read as a percentage


@dataclass(frozen=True)
class FeatureLabel:
    label: str  # "Purchases, last 90 days"
    unit: str  # count | amount | days | number | probability
    description: str  # one sentence for the glossary

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# Feature-stage tables: (singular, plural), as the gold declarations name them.
TABLES = {name: t.noun for name, t in entities().items() if t.noun}


@dataclass(frozen=True)
class Column:
    total: str  # SUM: "Spend"
    per: str  # MEAN/MAX/MIN/STD: "order value" -> "Average order value"
    unit: str


COLUMNS = {
    ("orders", "net_amount"): Column("Spend", "order value", AMOUNT),
    ("orders", "gross_amount"): Column("Gross spend", "gross order value", AMOUNT),
    ("orders", "discount_amount"): Column("Discounts", "discount per order", AMOUNT),
    ("orders", "item_count"): Column("Items ordered", "items per order", NUMBER),
    ("order_lines", "qty"): Column("Items bought", "quantity per line", NUMBER),
    ("order_lines", "unit_price"): Column("Line prices", "unit price", AMOUNT),
}
DISTINCT = {
    "category": "Product categories bought",
    "product_id": "Products bought",
    "item_id": "Products bought",
    "channel": "Channels used",
    "store": "Stores visited",
    "case_type": "Support case types",
    "priority": "Support case priorities",
    "status": "Support case statuses",
}
# A filter either names the rows itself ("purchases") or qualifies them ("in store").
FILTER_NOUNS = {
    ("orders", "is_purchase", "True"): ("purchase", "purchases"),
    ("orders", "is_return", "True"): ("return", "returns"),
}
FILTER_SUFFIX = {
    ("orders", "channel", "online"): "online",
    ("orders", "channel", "store"): "in store",
    ("orders", "channel", "call-center"): "through the call center",
    ("orders", "is_purchase", "True"): "on purchases",
    ("orders", "is_return", "True"): "on returns",
}
STATUS_WORDS = {"active": "open"}  # support_cases WHERE status = active -> "Open support cases"
PREFIX_COLUMNS = {  # (table, column) -> how a value qualifies the noun (values vary by data)
    ("support_cases", "status"): lambda v: STATUS_WORDS.get(v, v),
    ("support_cases", "priority"): lambda v: f"{v}-priority",
}
AGG_WORDS = {"MEAN": "Average", "MAX": "Highest", "MIN": "Lowest", "STD": "Spread of"}
PURCHASE_NOTE = " (an order not cancelled or voided, with net amount above zero, not a return)"

_NAME = re.compile(
    r"^(?P<agg>[A-Z_]+)\((?P<table>\w+)(?:\.(?P<inner>.+?))?"
    r"(?: WHERE (?P<column>\w+) = (?P<value>.+))?\)(?:_(?P<days>\d+)d)?$"
)
_TIME_SINCE = re.compile(r"^TIME_SINCE\((?P<column>\w+), unit=days\)(?:_(?P<days>\d+)d)?$")
_NESTED = re.compile(r"^(?P<agg>[A-Z_]+)\((?P<table>\w+)(?:\.(?P<column>\w+))?\)$")


# The buy-till-you-die features (c360ml.features.btyd.BTYD_FEATURES): fixed names, so
# their labels are written out; "the window" is the model's churn window.
_FITTED = "of the purchase history of every scored customer up to the score date"
BTYD = {
    "bgnbd_p_alive": FeatureLabel(
        "Chance the customer is still active, BG/NBD",
        PROBABILITY,
        f"Probability the customer has not lapsed, by a BG/NBD model {_FITTED}.",
    ),
    "bgnbd_p_no_purchase": FeatureLabel(
        "Chance of no purchase in the churn window, BG/NBD",
        PROBABILITY,
        f"Probability of no purchase in the churn window after the score date, by a BG/NBD "
        f"model {_FITTED}.",
    ),
    "bgnbd_expected_purchases": FeatureLabel(
        "Expected purchases in the churn window, BG/NBD",
        NUMBER,
        f"Expected number of purchase days in the churn window after the score date, by a "
        f"BG/NBD model {_FITTED}.",
    ),
    "pareto_nbd_p_alive": FeatureLabel(
        "Chance the customer is still active, Pareto/NBD",
        PROBABILITY,
        f"Probability the customer has not lapsed, by a Pareto/NBD model {_FITTED}.",
    ),
    "pareto_nbd_p_no_purchase": FeatureLabel(
        "Chance of no purchase in the churn window, Pareto/NBD",
        PROBABILITY,
        f"Probability of no purchase in the churn window after the score date, by a "
        f"Pareto/NBD model {_FITTED}.",
    ),
    "pareto_nbd_expected_purchases": FeatureLabel(
        "Expected purchases in the churn window, Pareto/NBD",
        NUMBER,
        f"Expected number of purchase days in the churn window after the score date, by a "
        f"Pareto/NBD model {_FITTED}.",
    ),
    "purchase_days_per_30d_tenure": FeatureLabel(
        "Purchase days per month as a buyer",
        NUMBER,
        "Days with a purchase per 30 days since the customer's first purchase day, up to the "
        "score date.",
    ),
    "recency_over_tenure": FeatureLabel(
        "Last purchase, as a share of time as a buyer",
        NUMBER,
        "Time from the first to the last purchase day divided by the time from the first "
        "purchase day to the score date: 1 = bought lately, 0 = bought only once, long ago.",
    ),
}


def describe(name: str) -> FeatureLabel:
    """The label, unit and description of one feature name (its expression as the label
    when the grammar or the vocabulary does not cover it)."""
    if name in BTYD:
        return BTYD[name]
    direct = _TIME_SINCE.match(name)
    if direct and direct["column"] == "created_ts":
        return FeatureLabel(
            "Days as a customer", DAYS, "Days from the customer's first record to the score date."
        )
    m = _NAME.match(name)
    if m is None:
        return _unknown(name)
    days = m["days"]
    window = f"last {days} days" if days else "all time"
    when = f"in the {days} days before the score date" if days else "before the score date"
    label = _label(m["agg"], m["table"], m["inner"], m["column"], m["value"])
    if label is None:
        return _unknown(name)
    text, unit, sentence = label
    if unit != DAYS:
        text = f"{text}, {window}"
        sentence = f"{sentence} {when}"
    return FeatureLabel(text, unit, sentence + ".")


def describe_all(names: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    return {n: describe(n).to_dict() for n in names}


def _unknown(name: str) -> FeatureLabel:
    return FeatureLabel(name, NUMBER, f"Computed as {name}.")


def _label(
    agg: str, table: str, inner: str | None, column: str | None, value: str | None
) -> tuple[str, str, str] | None:
    """(label without the window, unit, sentence without the window) or None."""
    if table not in TABLES:
        return None
    one, many = TABLES[table]
    where = (table, column, value)
    prefix = PREFIX_COLUMNS.get((table, column))
    if column is not None and prefix is None and where not in FILTER_NOUNS | FILTER_SUFFIX:
        return None
    note = PURCHASE_NOTE if column == "is_purchase" else ""
    if agg == "COUNT" and inner is None:
        noun = many
        if where in FILTER_NOUNS:
            noun = FILTER_NOUNS[where][1]
        elif prefix is not None:
            noun = f"{prefix(value.lower())} {many}"
        elif where in FILTER_SUFFIX:
            noun = f"{many} {FILTER_SUFFIX[where]}"
        elif column is not None:
            return None
        return _cap(noun), COUNT, f"Number of {noun}{note}"
    if inner is None:
        return None
    suffix = f" {FILTER_SUFFIX[where]}" if where in FILTER_SUFFIX else ""
    if column is not None and not suffix:
        return None
    since = _TIME_SINCE.match(inner)
    if since and agg in ("MIN", "MAX") and column is None:
        which = "last" if agg == "MIN" else "first"
        return (
            f"Days since {which} {one}",
            DAYS,
            f"Days from the customer's {which} {one} to the score date",
        )
    nested = _NESTED.match(inner)
    if nested and agg == "MEAN" and nested["table"] in TABLES:
        child = TABLES[nested["table"]][1]
        if nested["agg"] == "COUNT" and nested["column"] is None:
            per = f"{child.split()[-1]} per {one}"
        elif nested["agg"] == "NUM_UNIQUE" and nested["column"] in DISTINCT:
            per = f"{nested['column'].replace('_', ' ')} values per {one}"
            if nested["column"] == "category":
                per = f"categories per {one}"
        else:
            return None
        return f"Average {per}{suffix}", NUMBER, f"Average number of {per}{suffix}"
    if not re.fullmatch(r"\w+", inner):
        return None
    if agg == "NUM_UNIQUE" and inner in DISTINCT:
        text = DISTINCT[inner]
        return (
            f"{text}{suffix}",
            COUNT,
            f"Number of distinct {inner.replace('_', ' ')} values of the customer's {many}{suffix}",
        )
    col = COLUMNS.get((table, inner))
    if col is None:
        return None
    if agg == "SUM":
        return (
            f"{col.total}{suffix}",
            col.unit,
            f"Sum of {inner.replace('_', ' ')} over the customer's {many}{suffix}{note}",
        )
    if agg in AGG_WORDS:
        per = col.per + ("s" if agg == "STD" else "")
        return (
            f"{AGG_WORDS[agg]} {per}{suffix}",
            col.unit,
            f"{AGG_WORDS[agg]} {per} over the customer's {many}{suffix}{note}",
        )
    return None


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def format_value(value: float | None, unit: str) -> str:
    """A feature value as a marketer reads it: "3", "1,234.50", "15 days", "no data"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "no data"
    if unit == COUNT:
        return f"{value:,.0f}"
    if unit == PROBABILITY:
        return f"{value:.0%}"
    if unit == DAYS:
        return f"{value:,.0f} days" if abs(value) >= 10 else f"{value:,.1f} days"
    return f"{value:,.2f}"
