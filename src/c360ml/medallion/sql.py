"""Run the SQL files of `pipelines/sql/` with DuckDB over lake tables (Arrow, zero copy).

The SQL is kept to constructs Spark SQL also accepts (no QUALIFY, no `::` casts), so the
same files can run on Spark. `${name}` placeholders are filled from typed settings.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

import duckdb
import pyarrow as pa

from c360ml.config import Settings
from c360ml.lake import Lake


def connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with lake tables registered as views named layer_table.

    Bronze views are `bronze_<source>_<table>`, silver `silver_<table>`, gold `gold_<table>`;
    a table that does not exist yet is simply not registered.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for layer in ("bronze", "silver", "gold"):
        for parts in lake.tables(layer):
            con.register(f"{layer}_{'_'.join(parts)}", lake.dataset(layer, *parts))
    return con


def render(path: Path, settings: Settings) -> str:
    """The SQL text with ${...} filled from settings (a missing value names the file)."""
    values = {
        "person_party_type": str(settings.person_party_type),
        "call_center_channels": ", ".join(str(c) for c in settings.call_center_channels),
    }
    try:
        return Template(path.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: unknown or malformed placeholder {exc}") from exc


def run_sql(con: duckdb.DuckDBPyConnection, settings: Settings, name: str) -> pa.Table:
    """Run pipelines/sql/<name>.sql and return its result as Arrow."""
    path = settings.path(settings.sql_dir) / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"SQL file {path} not found (sql_dir = {settings.sql_dir})")
    try:
        return con.sql(render(path, settings)).to_arrow_table()
    except duckdb.Error as exc:
        raise ValueError(f"{path}: {exc}") from exc
