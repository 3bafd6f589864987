"""Checks of a table against its pandera schema, as SQL, run where the table is.

The pandera schemas (the gold models of `c360ml.schemas`, the silver schemas built in
`c360ml.medallion.silver`) are the one declaration of each table's columns and checks.
This module translates a schema into SQL: per check, a predicate that is true when a row
fails it, and a reason expression (the first failed check, "<column>: <check>", in
pandera's own words), in the SQL that DuckDB and Spark SQL both accept (a dialect switch
covers quoting, literals, type names and regular expressions). So every engine rejects
the same rows for the same reasons, and pandera itself, validating the same frames in
the tests, is the reference. A check without a translation is refused when the checks
are built, naming the schema, the column and the check: never skipped.

Translated: the dtype (coercion: a value the engine cannot cast fails `coerce_dtype`),
not-null, unique (pandera's `field_uniqueness`: duplicated non-null values, every
occurrence), pandera's built-in column checks (see `_COLUMN_SQL`) and `ordered`, the
frame check of validity periods declared here. Nulls (and NaN, which pandera takes for a
null) pass every value check, as pandera's `ignore_na` does.

Applied here in DuckDB over Arrow: `split_failed` splits a batch into valid rows and
rejected rows with `quarantine_reason` (silver); `ArrowCheck` raises naming every failed
check (gold, whose rows come from our own SQL).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow

from c360ml.medallion.sql import duckdb_connection
from c360ml.schemas import QUARANTINE_REASON
from c360ml.storage.lake import Lake

Dialect = Literal["duckdb", "spark"]
REASON = QUARANTINE_REASON
OLD_REASON = "_reason"  # the reason column's name in bronze and silver quarantine until #23
ORDERED = "ordered"  # the frame check `ordered` builds
ROW = "_check_row"  # a checked row's position, added for DuckDB (results come unordered)

# pandera dtype (as the schemas declare it) -> the Arrow type of the lake column.
ARROW_TYPES = {
    "str": pa_arrow.string(),
    "int64": pa_arrow.int64(),
    "Int64": pa_arrow.int64(),
    "float64": pa_arrow.float64(),
    "bool": pa_arrow.bool_(),
    "boolean": pa_arrow.bool_(),
    "datetime64[us, UTC]": pa_arrow.timestamp("us", tz="UTC"),
}
# pandera dtype -> the SQL type each engine casts to (Spark's TIMESTAMP is an instant).
SQL_TYPES: dict[Dialect, dict[str, str]] = {
    "duckdb": {"str": "VARCHAR", "int64": "BIGINT", "Int64": "BIGINT", "float64": "DOUBLE",
               "bool": "BOOLEAN", "boolean": "BOOLEAN", "datetime64[us, UTC]": "TIMESTAMPTZ"},
    "spark": {"str": "STRING", "int64": "BIGINT", "Int64": "BIGINT", "float64": "DOUBLE",
              "bool": "BOOLEAN", "boolean": "BOOLEAN", "datetime64[us, UTC]": "TIMESTAMP"},
}  # fmt: skip
FLOATS = ("float64",)


def ordered(first: str, second: str) -> pa.Check:
    """A frame check: `first` <= `second` where both are present (a validity period's
    from and to). A named check with its columns as statistics, so that it translates
    to SQL; pandera reports it as "<first> <= <second>" on the rows that fail."""
    return pa.Check(
        lambda df: df[first].isna() | df[second].isna() | (df[first] <= df[second]),
        name=ORDERED,
        error=f"{first} <= {second}",
        statistics={"first": first, "second": second},
    )


# ---------------------------------------------------------------- SQL text per dialect


def ident(name: str, dialect: Dialect) -> str:
    """A quoted column name: DuckDB quotes with ", Spark with `."""
    if dialect == "spark":
        return "`" + name.replace("`", "``") + "`"
    return '"' + name.replace('"', '""') + '"'


def string(text: str, dialect: Dialect) -> str:
    """A string literal. Spark reads 'a''b' as two literals run together ("ab"), so
    there a quote is escaped with a backslash; DuckDB takes no backslash escapes."""
    if dialect == "spark":
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "'" + text.replace("'", "''") + "'"


def literal(value: object, dialect: Dialect, where: str) -> str:
    """A check's statistic as an SQL literal; `where` names it in the refusal."""
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return repr(float(value))
    if isinstance(value, str):
        return string(value, dialect)
    if isinstance(value, dt.datetime):  # (pd.Timestamp too)
        stamp = pd.Timestamp(value)
        stamp = stamp.tz_localize("UTC") if stamp.tz is None else stamp.tz_convert("UTC")
        kind = SQL_TYPES[dialect]["datetime64[us, UTC]"]
        return f"CAST({string(stamp.strftime('%Y-%m-%d %H:%M:%S.%f+00:00'), dialect)} AS {kind})"
    raise TypeError(f"{where}: the value {value!r} has no SQL literal")


def _regex(value: str, pattern: str, dialect: Dialect) -> str:
    """True when `pattern` is found in `value` (RE2 in DuckDB, Java's regex in Spark)."""
    if dialect == "spark":
        return f"({value} RLIKE {string(pattern, dialect)})"
    return f"regexp_matches({value}, {string(pattern, dialect)})"


def _in_range(v: str, s: dict, lit) -> str:
    low = "<" if s["include_min"] else "<="
    high = ">" if s["include_max"] else ">="
    return f"({v} {low} {lit(s['min_value'])} OR {v} {high} {lit(s['max_value'])})"


def _str_length(v: str, s: dict, lit) -> str:
    if s.get("exact_value") is not None:
        return f"length({v}) <> {lit(s['exact_value'])}"
    parts = []
    if s.get("min_value") is not None:
        parts.append(f"length({v}) < {lit(s['min_value'])}")
    if s.get("max_value") is not None:
        parts.append(f"length({v}) > {lit(s['max_value'])}")
    return "(" + " OR ".join(parts) + ")" if parts else "FALSE"


def _values(values, lit) -> str:
    return ", ".join(lit(x) for x in values)


# pandera's built-in column checks: (typed value, statistics, literal, regex) -> SQL that
# is true when the value fails. A null makes each of them null (not failed): ignore_na.
_COLUMN_SQL = {
    "equal_to": lambda v, s, lit, rx: f"{v} <> {lit(s['value'])}",
    "not_equal_to": lambda v, s, lit, rx: f"{v} = {lit(s['value'])}",
    "greater_than": lambda v, s, lit, rx: f"{v} <= {lit(s['min_value'])}",
    "greater_than_or_equal_to": lambda v, s, lit, rx: f"{v} < {lit(s['min_value'])}",
    "less_than": lambda v, s, lit, rx: f"{v} >= {lit(s['max_value'])}",
    "less_than_or_equal_to": lambda v, s, lit, rx: f"{v} > {lit(s['max_value'])}",
    "in_range": lambda v, s, lit, rx: _in_range(v, s, lit),
    "isin": lambda v, s, lit, rx: (
        f"{v} NOT IN ({_values(s['allowed_values'], lit)})"
        if len(s["allowed_values"]) else f"{v} IS NOT NULL"
    ),
    "notin": lambda v, s, lit, rx: (
        f"{v} IN ({_values(s['forbidden_values'], lit)})"
        if len(s["forbidden_values"]) else "FALSE"
    ),
    # pandera's str_matches is re.match: anchored at the start only
    "str_matches": lambda v, s, lit, rx: f"NOT {rx(v, '^(?:' + s['pattern'] + ')')}",
    "str_contains": lambda v, s, lit, rx: f"NOT {rx(v, s['pattern'])}",
    "str_startswith": lambda v, s, lit, rx: (
        f"LEFT({v}, {len(s['string'])}) <> {lit(s['string'])}"
    ),
    "str_endswith": lambda v, s, lit, rx: (
        f"RIGHT({v}, {len(s['string'])}) <> {lit(s['string'])}"
    ),
    "str_length": lambda v, s, lit, rx: _str_length(v, s, lit),
}  # fmt: skip


# ---------------------------------------------------------------- the checks of a schema


@dataclass(frozen=True)
class RowCheck:
    """One check of a row: `fails` (SQL) is true when the row fails it."""

    column: str | None  # None: a check across columns (a frame check), "row" in reasons
    kind: str  # pandera's check name: "not_nullable", "coerce_dtype", "isin", ...
    check: str  # how pandera reports it: "not_nullable", "isin(['a', 'b'])", ...
    fails: str
    columns: tuple[str, ...] = ()  # the columns it reads

    @property
    def reason(self) -> str:
        return f"{self.column or 'row'}: {self.check}"


@dataclass(frozen=True)
class SqlChecks:
    """A pandera schema's checks as SQL in one dialect (built by `sql_checks`)."""

    name: str
    dialect: Dialect
    dtypes: dict[str, str | None]  # column -> pandera dtype (None: not declared)
    rows: tuple[RowCheck, ...]  # in reason order: per column, then the frame checks
    unique: tuple[str, ...] = ()  # columns whose non-null values are unique

    def q(self, column: str) -> str:
        return ident(column, self.dialect)

    def unique_checks(self) -> tuple[RowCheck, ...]:
        """Uniqueness per row, as a window over the whole query (every occurrence of a
        duplicated value fails, as pandera reports it)."""
        return tuple(
            RowCheck(c, "field_uniqueness", "field_uniqueness",
                     f"({self.q(c)} IS NOT NULL AND COUNT(*) OVER (PARTITION BY {self.q(c)}) > 1)",
                     (c,))
            for c in self.unique
        )  # fmt: skip

    def reason_sql(self, checks: tuple[RowCheck, ...] | None = None) -> str:
        """The first failed check's reason, null when the row passes them all."""
        checks = self.rows + self.unique_checks() if checks is None else checks
        if not checks:
            return "CAST(NULL AS STRING)" if self.dialect == "spark" else "CAST(NULL AS VARCHAR)"
        whens = " ".join(f"WHEN {c.fails} THEN {string(c.reason, self.dialect)}" for c in checks)
        return f"CASE {whens} END"

    def cast_sql(self) -> str:
        """The select list that coerces every declared column to its type."""
        types = SQL_TYPES[self.dialect]
        return ", ".join(
            f"CAST({self.q(c)} AS {types[d]}) AS {self.q(c)}" if d else self.q(c)
            for c, d in self.dtypes.items()
        )

    def checked_sql(self, view: str) -> str:
        """Every row of `view` with its `quarantine_reason` (null: valid): an engine's
        split of a table into its valid rows and its quarantine."""
        return f"SELECT *, {self.reason_sql()} AS {self.q(REASON)} FROM {view}"

    def counts_sql(self, view: str, checks: tuple[RowCheck, ...]) -> str:
        """One row: per check, the rows of `view` that fail it."""
        sums = ", ".join(f"SUM(CASE WHEN {c.fails} THEN 1 ELSE 0 END)" for c in checks)
        return f"SELECT {sums} FROM {view}"

    def duplicates_sql(self, view: str, column: str) -> str:
        """The number of non-null values of `column` held by more than one row."""
        q = self.q(column)
        return (
            f"SELECT COUNT(*) FROM (SELECT {q} FROM {view} WHERE {q} IS NOT NULL "
            f"GROUP BY {q} HAVING COUNT(*) > 1) d"
        )


def sql_checks(
    schema: pa.DataFrameSchema | type[pa.DataFrameModel], dialect: Dialect = "duckdb"
) -> SqlChecks:
    """A pandera schema (or model) as SQL checks; TypeError naming the schema, column
    and check for anything without a translation (custom, grouped or wide checks)."""
    if isinstance(schema, type):
        schema = schema.to_schema()
    name = schema.name or "schema"
    if schema.unique:
        raise TypeError(f"{name}: unique={schema.unique} (across columns) has no SQL translation")
    rows: list[RowCheck] = []
    dtypes: dict[str, str | None] = {}
    for col_name, col in schema.columns.items():
        if col.regex:
            raise TypeError(f"{name}: column {col_name!r} is a regex; no SQL translation")
        dtype = None if col.dtype is None else str(col.dtype)
        if dtype is not None and dtype not in ARROW_TYPES:
            raise TypeError(f"{name}: column {col_name!r}: dtype {dtype} has no SQL type")
        dtypes[col_name] = dtype
        rows += _column_checks(name, col_name, col, dtype, dialect)
    for check in schema.checks:
        if check.name != ORDERED:
            raise TypeError(
                f"{name}: frame check {check.name!r} ({check.error}) has no SQL translation"
            )
        first, second = check.statistics["first"], check.statistics["second"]
        a, b = (_value(c, dtypes.get(c), dialect) for c in (first, second))
        rows.append(RowCheck(None, ORDERED, check.error, f"{a} > {b}", (first, second)))
    unique = tuple(c for c, col in schema.columns.items() if col.unique)
    return SqlChecks(name, dialect, dtypes, tuple(rows), unique)


def _value(column: str, dtype: str | None, dialect: Dialect) -> str:
    """A column's value as the checks read it: cast to its declared type (null when it
    cannot be), NaN read as null (pandera takes NaN for a missing value)."""
    v = ident(column, dialect)
    if dtype is not None:
        v = f"TRY_CAST({v} AS {SQL_TYPES[dialect][dtype]})"
    if dtype in FLOATS:
        v = f"NULLIF({v}, CAST('NaN' AS DOUBLE))"
    return v


def _column_checks(
    name: str, col_name: str, col: pa.Column, dtype: str | None, dialect: Dialect
) -> list[RowCheck]:
    """A column's checks, in the order their reasons are given: its type, its nulls,
    then its declared checks (uniqueness is `SqlChecks.unique`)."""
    q, v = ident(col_name, dialect), _value(col_name, dtype, dialect)
    cols = (col_name,)
    rows = []
    if dtype is not None:
        kind = SQL_TYPES[dialect][dtype]
        rows.append(RowCheck(col_name, "coerce_dtype", f"coerce_dtype('{dtype}')",
                             f"({q} IS NOT NULL AND TRY_CAST({q} AS {kind}) IS NULL)", cols))  # fmt: skip
    if not col.nullable:
        null = (
            f"({q} IS NULL OR isnan(TRY_CAST({q} AS DOUBLE)))"
            if dtype in FLOATS
            else f"{q} IS NULL"
        )
        rows.append(RowCheck(col_name, "not_nullable", "not_nullable", null, cols))
    for check in col.checks:
        translate = _COLUMN_SQL.get(check.name)
        if translate is None or check.groupby is not None or check.element_wise:
            raise TypeError(
                f"{name}: column {col_name!r}: check {check.name!r} ({check.error}) "
                "has no SQL translation"
            )
        where = f"{name}: column {col_name!r}: check {check.error}"
        fails = translate(
            v, check.statistics, partial(literal, dialect=dialect, where=where),
            partial(_regex, dialect=dialect),
        )  # fmt: skip
        if not check.ignore_na:
            fails = f"({v} IS NULL OR {fails})"
        rows.append(RowCheck(col_name, check.name, check.error or check.name, fails, cols))
    return rows


# ---------------------------------------------------------------- applied in DuckDB


def applicable(checks: SqlChecks, table: pa_arrow.Table) -> tuple[RowCheck, ...]:
    """The row checks a table can fail: a column already of its declared Arrow type
    cannot fail its coercion (and reading it for that would scan every column)."""

    def typed(c: RowCheck) -> bool:
        return (
            c.kind == "coerce_dtype"
            and c.column in table.column_names
            and table.schema.field(c.column).type == ARROW_TYPES[checks.dtypes[c.column]]
        )

    return tuple(c for c in checks.rows if not typed(c))


def failures(table: pa_arrow.Table, checks: SqlChecks) -> tuple[np.ndarray, pa_arrow.Array]:
    """The positions of the rows that fail (ascending) and their reasons, by DuckDB over
    the Arrow table. Only the failing rows come back: most batches have none, and the
    reasons of a 20M-row table would otherwise be a 20M-row string column."""
    rows = applicable(checks, table) + checks.unique_checks()
    if not rows:
        return np.empty(0, np.int64), pa_arrow.array([], pa_arrow.string())
    needed = sorted({c for r in rows for c in r.columns})
    view = table.select(needed).append_column(ROW, pa_arrow.array(np.arange(len(table))))
    con = duckdb_connection()
    con.register("checked", view)
    reason = checks.reason_sql(rows)
    # The filter first, so that a row that passes (most do) is given no CASE, unless a
    # uniqueness window is among the checks (a WHERE cannot hold a window).
    failing = " OR ".join(f"({r.fails})" for r in rows)
    query = (
        f"SELECT {ROW}, reason FROM (SELECT {ROW}, {reason} AS reason FROM checked) "
        "WHERE reason IS NOT NULL"
        if checks.unique
        else f"SELECT {ROW}, {reason} AS reason FROM checked WHERE {failing}"
    )
    found = con.sql(f"{query} ORDER BY {ROW}").to_arrow_table()
    con.close()
    return found[ROW].to_numpy(), found["reason"].combine_chunks().cast(pa_arrow.string())


def split_failed(table: pa_arrow.Table, checks: SqlChecks) -> tuple[pa_arrow.Table, pa_arrow.Table]:
    """(valid rows, rejected rows with `quarantine_reason`). A batch without a rejected
    row is passed on as it is: a filter copies every column."""
    rows, reasons = failures(table, checks)
    rejected_schema = table.schema.append(pa_arrow.field(REASON, pa_arrow.string()))
    if not len(rows):  # (an empty slice would keep the batch's buffers alive)
        return table, rejected_schema.empty_table()
    bad = np.zeros(len(table), bool)
    bad[rows] = True
    return table.filter(pa_arrow.array(~bad)), table.filter(pa_arrow.array(bad)).append_column(
        REASON, reasons
    )


class ArrowCheck:
    """A pandera model applied to Arrow batches, one at a time, by its SQL checks.

    Gold rows come from our own SQL, so a failed check is a defect there: a batch that
    fails raises, naming every failed check and how many rows fail it. Types are coerced
    in Arrow (no copy when a column has its type already); uniqueness is counted over
    every batch seen, at `finish()`. Memory holds the unique columns, never the table.
    """

    def __init__(self, model: type[pa.DataFrameModel] | pa.DataFrameSchema, where: str):
        self.checks = sql_checks(model)  # refuses what has no translation, naming it
        if any(d is None for d in self.checks.dtypes.values()):
            raise TypeError(f"{where}: {self.checks.name} declares a column without a dtype")
        self.where = where
        self.schema = pa_arrow.schema(
            [(n, ARROW_TYPES[d]) for n, d in self.checks.dtypes.items()]  # type: ignore[index]
        )
        self.seen: dict[str, list] = {n: [] for n in self.checks.unique}
        self.rows = 0

    def __call__(self, table: pa_arrow.Table) -> pa_arrow.Table:
        """The batch with the declared columns, coerced; raises naming every failed check."""
        missing = [n for n in self.schema.names if n not in table.column_names]
        problems = [f"{n}: column missing" for n in missing]
        checks = [c for c in applicable(self.checks, table) if not set(c.columns) & set(missing)]
        if checks and len(table):
            con = duckdb_connection()
            con.register("checked", table.select(sorted({n for c in checks for n in c.columns})))
            counts = con.execute(self.checks.counts_sql("checked", tuple(checks))).fetchall()[0]
            con.close()
            problems += [
                f"{c.reason} fails {n} rows" for c, n in zip(checks, counts, strict=True) if n
            ]
        self._raise(problems)
        arrays = []
        for f in self.schema:
            try:
                arrays.append(table[f.name].cast(f.type))
            except (pa_arrow.ArrowInvalid, pa_arrow.ArrowNotImplementedError) as exc:
                problems.append(f"{f.name}: cannot coerce to {f.type}: {exc}")
        self._raise(problems)
        for name, parts in self.seen.items():
            parts.append(arrays[self.schema.get_field_index(name)])
        self.rows += len(table)
        return pa_arrow.Table.from_arrays(arrays, schema=self.schema)

    def finish(self) -> None:
        """Uniqueness over everything checked so far, counted by DuckDB (on every core)."""
        problems = []
        con = duckdb_connection()
        for name, parts in self.seen.items():
            chunks = [c for p in parts for c in p.chunks]
            values = pa_arrow.chunked_array(chunks, self.schema.field(name).type)
            con.register("checked", pa_arrow.table({name: values}))
            duplicated = con.execute(self.checks.duplicates_sql("checked", name)).fetchall()[0][0]
            if duplicated:
                problems.append(f"{name}: field_uniqueness ({duplicated} duplicated values)")
        con.close()
        self._raise(problems)

    def _raise(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"{self.where} fails its schema:\n" + "\n".join(problems[:20]))


def validate_arrow(
    table: pa_arrow.Table, model: type[pa.DataFrameModel] | pa.DataFrameSchema, where: str
) -> pa_arrow.Table:
    """A whole table checked against its gold model (see ArrowCheck)."""
    check = ArrowCheck(model, where)
    checked = check(table)
    check.finish()
    return checked


def upgrade_quarantine(lake: Lake, *where: str) -> bool:
    """Rename a quarantine table's `_reason` column to `quarantine_reason`, the one name
    of the reason in every layer, before rows are added to it: a table written before the
    rename would refuse them (an append must keep the table's schema). One overwrite
    commit of the same rows, without commit metadata (what a build reads back from its
    commits stays as it was). True when the table was rewritten."""
    if not lake.exists(*where):
        return False
    names = pa_arrow.schema(lake.delta(*where).schema().to_arrow()).names
    if OLD_REASON not in names or REASON in names:
        return False
    rows = lake.read(*where)
    renamed = rows.rename_columns([REASON if n == OLD_REASON else n for n in rows.column_names])
    lake.write(renamed, *where, mode="overwrite")
    return True
