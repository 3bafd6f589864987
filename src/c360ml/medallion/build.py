"""The build steps the CLI runs, in order: silver -> unify -> gold; and `describe`."""

from __future__ import annotations

from c360ml.config import Settings
from c360ml.medallion.declarations import gold_tables
from c360ml.medallion.gold import build_gold
from c360ml.medallion.silver import build_silver
from c360ml.medallion.unify import build_unify
from c360ml.storage.lake import Lake

__all__ = ["build_gold", "build_silver", "build_unify", "describe_layer"]


def describe_layer(settings: Settings, layer: str) -> dict[str, list[dict]]:
    """Columns, types and row counts of every table of a layer; for a declared gold table
    (`c360ml.medallion.declarations`), its description and each column's meaning as
    documented once in c360ml.schemas."""
    lake = Lake(settings.lake)
    declared = gold_tables() if layer == "gold" else {}
    out = {}
    for parts in lake.tables(layer):
        table = declared.get("/".join(parts))
        docs = {}
        if table is not None:
            docs = {n: c.description or "" for n, c in table.schema.to_schema().columns.items()}
        title = table.description if table is not None else ""
        out[f"{'/'.join(parts)} ({lake.count(layer, *parts):,} rows) {title}"] = [
            {"column": f.name, "type": str(f.type), "meaning": docs.get(f.name, "")}
            for f in lake.schema(layer, *parts)
        ]
    return out
