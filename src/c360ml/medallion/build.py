"""The build steps the CLI and the refresh run, in order: silver -> unify -> gold, each on
the engine the settings name (`engine`: DuckDB in this process, or Spark); and `describe`.

A layer the Spark engine does not build yet runs on DuckDB: both engines read and write
the same Delta tables and record the same inputs, so either continues the other's work.
"""

from __future__ import annotations

import importlib
from typing import Any

from c360ml.config import Settings
from c360ml.medallion import gold, silver, unify
from c360ml.medallion.declarations import gold_tables
from c360ml.storage.lake import Lake

__all__ = ["build_gold", "build_silver", "build_unify", "describe_layer"]

# The layers the Spark engine builds: c360ml.spark.<module>.build_<layer>(settings, spark).
SPARK_LAYERS = ("silver", "unify", "gold")


def _on_engine(layer: str, settings: Settings, embedded) -> Any:
    if settings.engine != "spark" or layer not in SPARK_LAYERS:
        return embedded(settings)
    from c360ml.spark import spark_session

    module = importlib.import_module(f"c360ml.spark.{layer}")
    return getattr(module, f"build_{layer}")(settings, spark_session(settings.spark_remote or None))


def build_silver(settings: Settings) -> silver.SilverSummary:
    return _on_engine("silver", settings, silver.build_silver)


def build_unify(settings: Settings) -> unify.UnifySummary:
    return _on_engine("unify", settings, unify.build_unify)


def build_gold(settings: Settings) -> gold.GoldSummary:
    return _on_engine("gold", settings, gold.build_gold)


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
