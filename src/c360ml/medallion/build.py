"""The build steps the CLI runs, in order: silver -> unify -> gold; and `describe`."""

from __future__ import annotations

from c360ml.config import Settings
from c360ml.medallion.gold import build_gold
from c360ml.medallion.silver import build_silver
from c360ml.medallion.unify import build_unify
from c360ml.storage.lake import Lake

__all__ = ["build_gold", "build_silver", "build_unify", "describe_layer"]


def describe_layer(settings: Settings, layer: str) -> dict[str, list[dict]]:
    """Columns, types and row counts of every table of a layer; for gold, each column's
    meaning as documented once in c360ml.schemas."""
    from c360ml import schemas

    lake = Lake(settings.lake)
    models = {
        "customer_profile": schemas.CustomerProfile,
        "customer_source_map": schemas.CustomerSourceMap,
        "customer_id_redirects": schemas.CustomerIdRedirects,
        "orders": schemas.Orders,
        "order_lines": schemas.OrderLines,
        "products": schemas.Products,
        "support_cases": schemas.SupportCases,
        "order_status_history": schemas.StatusHistory,
        "case_status_history": schemas.StatusHistory,
        "churn_scores": schemas.ChurnScores,
        "segment_membership": schemas.SegmentMembership,
    }
    out = {}
    for parts in lake.tables(layer):
        model = models.get(parts[-1]) if layer == "gold" else None
        docs = (
            {n: c.description or "" for n, c in model.to_schema().columns.items()} if model else {}
        )
        title = (model.__doc__ or "").strip().splitlines()[0] if model and model.__doc__ else ""
        out[f"{'/'.join(parts)} ({lake.count(layer, *parts):,} rows) {title}"] = [
            {"column": f.name, "type": str(f.type), "meaning": docs.get(f.name, "")}
            for f in lake.schema(layer, *parts)
        ]
    return out
