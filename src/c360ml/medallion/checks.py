"""Checks of a table against its pandera model, run where the table is.

The pandera models in `c360ml.schemas` are the one declaration of each table's columns
and checks; this module applies them to Arrow batches, without a pandas round trip.
"""

from __future__ import annotations

import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from c360ml.medallion.sql import duckdb_connection

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


class ArrowCheck:
    """A pandera gold model applied in Arrow, one batch at a time.

    The same declaration as pandera would check, without a pandas round trip (gold
    tables have 20M rows) and without holding a whole table: types (coerce),
    nullability and pandera's built-in column checks per batch; uniqueness over every
    batch seen, at `finish()`. Models that use anything else (custom or frame-wide
    checks) are refused here.
    """

    def __init__(self, model: type[pa.DataFrameModel], where: str):
        schema = model.to_schema()
        unsupported = bool(schema.checks) or any(
            str(c.dtype) not in ARROW_TYPES or any(k.name not in ARROW_CHECKS for k in c.checks)
            for c in schema.columns.values()
        )
        if unsupported:
            raise TypeError(f"{where}: {model.__name__} has checks ArrowCheck cannot apply")
        self.where = where
        self.columns = schema.columns
        self.schema = pa_arrow.schema(
            [(n, ARROW_TYPES[str(c.dtype)]) for n, c in schema.columns.items()]
        )
        self.seen: dict[str, list] = {n: [] for n, c in schema.columns.items() if c.unique}
        self.rows = 0

    def __call__(self, table: pa_arrow.Table) -> pa_arrow.Table:
        """The batch with the declared columns, coerced; raises naming every failed check."""
        problems, arrays = [], []
        for name, col in self.columns.items():
            if name not in table.column_names:
                problems.append(f"{name}: column missing")
                continue
            try:
                values = table[name].cast(self.schema.field(name).type)
            except (pa_arrow.ArrowInvalid, pa_arrow.ArrowNotImplementedError) as exc:
                problems.append(f"{name}: cannot coerce to {col.dtype}: {exc}")
                continue
            arrays.append(values)
            if not col.nullable and values.null_count:
                problems.append(f"{name}: not_nullable ({values.null_count} nulls)")
            for check in col.checks:
                failed = pc.sum(pc.fill_null(ARROW_CHECKS[check.name](values, check.statistics),
                                             False)).as_py()  # fmt: skip
                if failed:
                    problems.append(f"{name}: {check.name}({check.statistics}) fails {failed} rows")
            if name in self.seen:
                self.seen[name].append(values)
        self._raise(problems)
        self.rows += len(table)
        return pa_arrow.Table.from_arrays(arrays, schema=self.schema)

    def finish(self) -> None:
        """Uniqueness over everything checked so far (counted by DuckDB on both cores:
        Arrow's count_distinct took 4.6 s for 13M order ids, DuckDB 2.0 s)."""
        problems = []
        con = duckdb_connection()
        for name, parts in self.seen.items():
            chunks = [c for p in parts for c in p.chunks]
            values = pa_arrow.chunked_array(chunks, self.schema.field(name).type)
            con.register("checked", pa_arrow.table({"v": values}))
            distinct = "SELECT COUNT(*) FROM (SELECT DISTINCT v FROM checked)"  # one null
            if con.execute(f"SELECT ({distinct}) = COUNT(*) FROM checked").fetchall()[0][0]:
                continue
            problems.append(f"{name}: field_uniqueness (duplicates)")
        con.close()
        self._raise(problems)

    def _raise(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"{self.where} fails its schema:\n" + "\n".join(problems[:20]))


def validate_arrow(
    table: pa_arrow.Table, model: type[pa.DataFrameModel], where: str
) -> pa_arrow.Table:
    """A whole table checked against its gold model (see ArrowCheck)."""
    check = ArrowCheck(model, where)
    checked = check(table)
    check.finish()
    return checked
