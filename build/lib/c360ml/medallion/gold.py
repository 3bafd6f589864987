"""Gold: the unified profile, activity and supporting tables, keyed by customer_id.

Gold is rebuilt from silver by the SQL in `pipelines/sql/gold/` on each build (DuckDB
over Arrow takes seconds, and a full rebuild cannot drift the way a chain of partial
updates can); it is written only when its inputs' versions changed, so a build with
nothing new adds no Delta versions. Orders and lines that cannot be tied to a profile
go to `quarantine/gold/<table>` with a reason, never away.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.lake import Lake
from c360ml.medallion.sql import connect, run_sql
from c360ml.schemas import (
    OrderLines,
    Orders,
    Products,
    StatusHistory,
    SupportCases,
)

log = logging.getLogger(__name__)

INPUTS_KEY = "c360ml.inputs"
REASON = "quarantine_reason"


@dataclass
class GoldSummary:
    tables: list[dict] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return self.tables


def lake_versions(lake: Lake) -> dict[str, int]:
    """Versions of every bronze/silver table and the source map: what gold is built from."""
    found = {
        f"{layer}/{'/'.join(p)}": lake.version(layer, *p)
        for layer in ("bronze", "silver")
        for p in lake.tables(layer)
    }
    found["gold/customer_source_map"] = lake.version("gold", "customer_source_map")
    return found


def inputs_unchanged(lake: Lake, where: tuple[str, ...], inputs: dict) -> bool:
    if not lake.exists(*where):
        return False
    metas = [m for m in lake.commit_metadata(*where) if INPUTS_KEY in m]
    return bool(metas) and json.loads(metas[-1][INPUTS_KEY]) == inputs


# pandera dtype (as the gold models declare it) -> the Arrow type of the lake column.
ARROW_TYPES = {
    "str": pa_arrow.string(),
    "int64": pa_arrow.int64(),
    "float64": pa_arrow.float64(),
    "bool": pa_arrow.bool_(),
    "datetime64[us, UTC]": pa_arrow.timestamp("us", tz="UTC"),
}
# pandera's built-in checks as Arrow compute: (values, statistics) -> rows that fail.
ARROW_CHECKS = {
    "greater_than_or_equal_to": lambda v, st: pc.less(v, st["min_value"]),
    "greater_than": lambda v, st: pc.less_equal(v, st["min_value"]),
    "less_than_or_equal_to": lambda v, st: pc.greater(v, st["max_value"]),
    "less_than": lambda v, st: pc.greater_equal(v, st["max_value"]),
    "isin": lambda v, st: pc.invert(pc.is_in(v, pa_arrow.array(st["allowed_values"]))),
    "notin": lambda v, st: pc.is_in(v, pa_arrow.array(st["forbidden_values"])),
}


def validate_arrow(table: pa_arrow.Table, model: type[pa.DataFrameModel], where: str):
    """The model's declared columns, coerced to their Arrow types and checked, in Arrow.

    The same pandera declaration, applied without a pandas round trip (gold tables
    have 20M rows): types (coerce), nullability, uniqueness and pandera's built-in
    column checks. A model using anything else (custom or frame-wide checks) is
    validated by pandera itself.
    """
    schema = model.to_schema()
    supported = not schema.checks and all(
        str(c.dtype) in ARROW_TYPES and all(k.name in ARROW_CHECKS for k in c.checks)
        for c in schema.columns.values()
    )
    if not supported:
        frame = model.validate(table.select(list(schema.columns)).to_pandas(), lazy=True)
        return pa_arrow.Table.from_pandas(frame, preserve_index=False)
    problems, arrays = [], []
    for name, col in schema.columns.items():
        if name not in table.column_names:
            problems.append(f"{name}: column missing")
            continue
        target = ARROW_TYPES[str(col.dtype)]
        try:
            values = table[name].cast(target)
        except (pa_arrow.ArrowInvalid, pa_arrow.ArrowNotImplementedError) as exc:
            problems.append(f"{name}: cannot coerce to {col.dtype}: {exc}")
            continue
        arrays.append(values)
        if not col.nullable and values.null_count:
            problems.append(f"{name}: not_nullable ({values.null_count} nulls)")
        if col.unique and pc.count_distinct(values, mode="all").as_py() != len(values):
            problems.append(f"{name}: field_uniqueness (duplicates)")
        for check in col.checks:
            failed = pc.sum(pc.fill_null(ARROW_CHECKS[check.name](values, check.statistics),
                                         False)).as_py()  # fmt: skip
            if failed:
                problems.append(f"{name}: {check.name}({check.statistics}) fails {failed} rows")
    if problems:
        raise ValueError(f"{where} fails its schema:\n" + "\n".join(problems[:20]))
    return pa_arrow.Table.from_arrays(arrays, names=list(schema.columns))


def write_gold(
    lake: Lake,
    name: str,
    table: pa_arrow.Table,
    model: type[pa.DataFrameModel],
    inputs: dict,
    layer: str = "gold",
) -> bool:
    """Validate against the declared schema and overwrite, unless inputs are unchanged.

    Returns whether a new version was written.
    """
    if inputs_unchanged(lake, (layer, name), inputs):
        return False
    if layer == "gold":
        checked = validate_arrow(table, model, f"{layer}/{name}")
    else:
        try:
            checked = model.validate(table.to_pandas(), lazy=True)
        except pa.errors.SchemaErrors as err:
            raise ValueError(
                f"{layer}/{name} fails its schema:\n{err.failure_cases.head(20)}"
            ) from err
    lake.write(checked, layer, name, mode="overwrite", metadata={INPUTS_KEY: json.dumps(inputs)})
    return True


def _split(table: pa_arrow.Table) -> tuple[pa_arrow.Table, pa_arrow.Table]:
    """(rows with no quarantine reason, without the column; the others, with it)."""
    bad = pc.is_valid(table[REASON])
    return table.filter(pc.invert(bad)).drop_columns([REASON]), table.filter(bad)


def build_gold(settings: Settings) -> GoldSummary:
    lake = Lake(settings.lake)
    if not lake.exists("gold", "customer_source_map"):
        raise FileNotFoundError("gold/customer_source_map missing: run `c360ml build unify` first")
    # customer_profile and the source map are unify's outputs; gold builds the rest.
    inputs = lake_versions(lake)
    con = connect(lake)
    summary = GoldSummary()

    def put(name, table, model, quarantined=None, note=""):
        started = time.perf_counter()
        written = write_gold(lake, name, table, model, inputs)
        if quarantined is not None:
            lake.write(quarantined, "quarantine", "gold", name, mode="overwrite")
        con.register(f"gold_{name}", table)
        summary.tables.append(
            {
                "table": f"gold/{name}",
                "rows": len(table),
                "quarantined": 0 if quarantined is None else len(quarantined),
                "note": note,
                "written": "yes" if written else "unchanged",
                "seconds": round(time.perf_counter() - started, 2),
            }
        )

    d365 = lake.exists("silver", "custtable")
    generic = lake.exists("silver", "generic_transactions")

    def union(*names: str) -> pa_arrow.Table:
        """The d365 and/or generic variants of one gold table, one schema."""
        parts = [
            run_sql(con, settings, f"gold/{n}")
            for n, on in zip(names, (d365, generic), strict=True)
            if on
        ]
        return pa_arrow.concat_tables(parts, promote_options="permissive")

    all_orders = union("orders", "generic_orders")
    con.register("all_orders", all_orders)
    orders, bad_orders = _split(all_orders)
    put("orders", orders, Orders, bad_orders)
    lines, bad_lines = _split(union("order_lines", "generic_order_lines"))
    put("order_lines", lines, OrderLines, bad_lines)
    if d365:
        put("products", run_sql(con, settings, "gold/products"), Products)
        put(
            "order_status_history",
            run_sql(con, settings, "gold/order_status_history"),
            StatusHistory,
        )
    if lake.exists("silver", "incident"):
        cases = run_sql(con, settings, "gold/support_cases")
        unlinked = cases["customer_id"].null_count
        put("support_cases", cases, SupportCases, note=f"{unlinked} unlinked (no profile)")
        put(
            "case_status_history", run_sql(con, settings, "gold/case_status_history"), StatusHistory
        )
    return summary
