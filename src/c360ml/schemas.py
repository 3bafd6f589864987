"""Pandera models of the gold tables: the contract between the medallion, features,
model and service stages. Declared once; code names columns through these models
(`Orders.net_amount` is the string "net_amount") rather than copying string lists.

Timestamps are UTC (`datetime64[us, UTC]`), amounts float64, ids strings.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

UTC_TS = pd.DatetimeTZDtype("us", "UTC")
# The column of every quarantine table (bronze, silver, gold) saying why the row is there.
QUARANTINE_REASON = "quarantine_reason"


class _Gold(pa.DataFrameModel):
    class Config:
        strict = True  # an unexpected column is a bug in the stage that wrote it
        coerce = True


class CustomerProfile(_Gold):
    """One row per unified customer (person parties and contact-only profiles)."""

    customer_id: Series[str] = pa.Field(unique=True, description="opaque; assigned by unify only")
    first_name: Series[str] = pa.Field(nullable=True)
    last_name: Series[str] = pa.Field(nullable=True)
    full_name: Series[str] = pa.Field(nullable=True)
    email: Series[str] = pa.Field(nullable=True, description="primary e-mail, lower case")
    phone: Series[str] = pa.Field(nullable=True, description="primary phone, E.164 where parseable")
    street: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    postal_code: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(nullable=True, description="ISO 3166-1 alpha-2")
    customer_group: Series[str] = pa.Field(nullable=True, description="mutable: not a feature")
    currency: Series[str] = pa.Field(nullable=True)
    created_ts: Series[UTC_TS] = pa.Field(nullable=True, description="immutable: tenure feature")
    source_count: Series[int] = pa.Field(ge=1, description="number of source records merged")
    sources: Series[str] = pa.Field(description="lineage, e.g. 'd365,dataverse'")


class CustomerSourceMap(_Gold):
    """The backstamp: every source record's customer_id."""

    source: Series[str] = pa.Field(isin=["d365", "dataverse", "generic"])
    source_key: Series[str] = pa.Field(
        description="d365: '<dataareaid>-<accountnum>'; dataverse: contactid"
    )
    customer_id: Series[str]


class CustomerIdRedirects(_Gold):
    """Ids retired by unify (a merge): follow retired -> surviving to join history."""

    retired_id: Series[str]
    surviving_id: Series[str]
    redirected_at: Series[UTC_TS]
    reason: Series[str] = pa.Field(isin=["merge"])


class Orders(_Gold):
    """One row per order (sales order or POS transaction); current state + flags."""

    order_id: Series[str] = pa.Field(
        unique=True, description="'SO:<dataareaid>-<salesid>' / 'POS:<id>'"
    )
    customer_id: Series[str]
    order_ts: Series[UTC_TS] = pa.Field(description="event time of the order")
    channel: Series[str] = pa.Field(isin=["online", "store", "call-center", "unknown"])
    store: Series[str] = pa.Field(nullable=True)
    currency: Series[str] = pa.Field(nullable=True)
    gross_amount: Series[float]
    discount_amount: Series[float]
    net_amount: Series[float] = pa.Field(description="negative for returns")
    item_count: Series[float]
    is_return: Series[bool]
    status: Series[str] = pa.Field(description="current status (history in OrderStatusHistory)")
    is_cancelled: Series[bool] = pa.Field(
        description="current: cancelled sales order or voided POS transaction"
    )


class OrderLines(_Gold):
    """One row per order line (sales line or POS line); returns have negative amounts."""

    order_id: Series[str]
    line: Series[int]
    item_id: Series[str]
    category: Series[str] = pa.Field(nullable=True)
    qty: Series[float]
    unit_price: Series[float]
    net_amount: Series[float]
    is_return: Series[bool]


class Products(_Gold):
    """The product catalogue (InventTable): item id, name and category."""

    item_id: Series[str] = pa.Field(unique=True)
    name: Series[str] = pa.Field(nullable=True)
    category: Series[str] = pa.Field(nullable=True)


class SupportCases(_Gold):
    """Dataverse incidents (service cases), keyed by customer_id through the backstamp."""

    case_id: Series[str] = pa.Field(unique=True)
    customer_id: Series[str] = pa.Field(nullable=True, description="null = unlinked contact")
    created_ts: Series[UTC_TS]
    case_type: Series[str] = pa.Field(nullable=True)
    priority: Series[str] = pa.Field(nullable=True)
    title: Series[str] = pa.Field(nullable=True)
    status: Series[str] = pa.Field(description="current (history in CaseStatusHistory)")


class StatusHistory(_Gold):
    """Valid-from/valid-to history of a mutable status, rebuilt from the change feed.

    A status applies for valid_from <= t < valid_to; valid_to is null while current.
    Used for orders (entity_id = order_id) and cases (entity_id = case_id).
    """

    entity_id: Series[str]
    status: Series[str]
    is_cancelled: Series[bool] = pa.Field(
        description="cancelled/voided (orders) or cancelled (cases)"
    )
    valid_from: Series[UTC_TS]
    valid_to: Series[UTC_TS] = pa.Field(nullable=True)


class CustomerMeasures(pa.DataFrameModel):
    """gold/customer_measures keys; one further column per measure of features/measures.yaml."""

    customer_id: Series[str]
    as_of: Series[UTC_TS]


class ChurnScores(_Gold):
    """gold/churn_scores: every profile at every ScoredAsOf, in CI-D's names.

    ScoreStatus: scored | inactive (no purchase in the lookback) | insufficient_history
    (no purchase at or before ScoredAsOf); the score columns are empty unless scored.
    """

    CustomerId: Series[str]
    ChurnScore: Series[float] = pa.Field(ge=0, le=1, nullable=True)
    IsChurn: Series[pd.BooleanDtype] = pa.Field(nullable=True)
    RiskLevel: Series[str] = pa.Field(isin=["Low", "Medium", "High"], nullable=True)
    InfluentialFactors: Series[str] = pa.Field(nullable=True, description="JSON list of factors")
    ExplainMethod: Series[str] = pa.Field(isin=["exact", "approx", "none"])
    ModelVersion: Series[str]
    ScoredAsOf: Series[UTC_TS]
    ScoredAt: Series[UTC_TS]
    ScoreStatus: Series[str] = pa.Field(isin=["scored", "inactive", "insufficient_history"])


class SegmentMembership(pa.DataFrameModel):
    """gold/segment_membership: who is in which segment at which as_of."""

    segment: Series[str]
    customer_id: Series[str]
    as_of: Series[UTC_TS]
    control: Series[bool]  # held out of the journey at random (the segment's control group)


def columns(model: type[pa.DataFrameModel]) -> list[str]:
    """The declared column names of a model, in order."""
    return list(model.to_schema().columns)
