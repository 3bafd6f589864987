"""The build steps the CLI runs, in order: silver -> unify -> gold; and `describe`."""

from __future__ import annotations

from c360ml.config import Settings
from c360ml.lake import Lake
from c360ml.medallion.gold import build_gold
from c360ml.medallion.silver import build_silver
from c360ml.unify import build_unify

__all__ = ["build_gold", "build_silver", "build_unify", "describe_layer"]


def describe_layer(settings: Settings, layer: str) -> dict[str, list[dict]]:
    """Columns, types and row counts of every table of a layer (gold: with the meaning
    documented in c360ml.schemas)."""
    from c360ml import schemas

    lake = Lake(settings.lake)
    docs = {
        name: model
        for name, model in (
            ("customer_profile", schemas.CustomerProfile),
            ("customer_source_map", schemas.CustomerSourceMap),
            ("orders", schemas.Orders),
            ("order_lines", schemas.OrderLines),
            ("products", schemas.Products),
            ("support_cases", schemas.SupportCases),
            ("order_status_history", schemas.StatusHistory),
            ("case_status_history", schemas.StatusHistory),
        )
    }
    out = {}
    for parts in lake.tables(layer):
        dataset = lake.dataset(layer, *parts)
        model = docs.get(parts[-1]) if layer == "gold" else None
        out["/".join(parts)] = [
            {
                "column": f.name,
                "type": str(f.type),
                "rows": dataset.count_rows() if i == 0 else "",
                "about": (model.__doc__ or "").strip().splitlines()[0] if model and i == 0 else "",
            }
            for i, f in enumerate(dataset.schema)
        ]
    return out
