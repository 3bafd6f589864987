"""The pandera schemas as SQL checks: the rows DuckDB rejects are the rows pandera rejects.

Every silver table's schema and every gold model is checked on a frame with deliberately
bad rows (nulls, NaN, out-of-range values, bad enums, unordered periods, duplicates):
pandera's lazy validation is the reference, the SQL checks must reject exactly its rows,
each with a reason naming a column and check pandera reports failing on that row.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pytest
from pandera.errors import SchemaErrors

from c360ml import schemas
from c360ml.medallion.checks import (
    ARROW_TYPES,
    ORDERED,
    REASON,
    ArrowCheck,
    failures,
    sql_checks,
    validate_arrow,
)
from c360ml.medallion.silver import SILVER_SCHEMAS
from c360ml.medallion.sql import duckdb_connection

GOLD_MODELS = [
    m
    for m in vars(schemas).values()
    if isinstance(m, type)
    and issubclass(m, pa.DataFrameModel)
    and m.__module__ == schemas.__name__
    and not m.__name__.startswith("_")
]
DAY0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CLEAN = 3  # rows without a defect, first (row 0 is the one a duplicate copies)


def _valid(name: str, col: pa.Column, dtype: str, i: int):
    """A value that passes every check of the column, distinct per row."""
    for check in col.checks:
        if check.name == "isin":
            return check.statistics["allowed_values"][0]
    if dtype == "str":
        return f"{name}-{i}"
    if dtype in ("int64", "Int64"):
        return i + 1
    if dtype == "float64":
        return 0.5
    if dtype in ("bool", "boolean"):
        return True
    return DAY0 + dt.timedelta(days=i)


def _defects(schema: pa.DataFrameSchema) -> list[tuple[str, object]]:
    """(column, bad value) per check a single value can fail; uniqueness and ordered
    pairs are made by `bad_table`."""
    out = []
    for name, col in schema.columns.items():
        dtype = str(col.dtype)
        if not col.nullable:
            out.append((name, None))
            if dtype == "float64":
                out.append((name, float("nan")))  # pandera: NaN is a missing value
        for check in col.checks:
            s = check.statistics
            bad = {
                "isin": "not-an-allowed-value",
                "greater_than_or_equal_to": s.get("min_value", 0) - 1,
                "greater_than": s.get("min_value", 0),
                "less_than_or_equal_to": s.get("max_value", 0) + 1,
                "less_than": s.get("max_value", 0),
            }[check.name]
            out.append((name, bad))
    return out


def bad_table(schema: pa.DataFrameSchema) -> tuple[pa_arrow.Table, int]:
    """A typed table of CLEAN valid rows, then one row per defect; (table, defect rows)."""
    defects = _defects(schema)
    ordered = [c.statistics for c in schema.checks if c.name == ORDERED]
    unique = [n for n, c in schema.columns.items() if c.unique]
    n = CLEAN + len(defects) + len(ordered) + len(unique)
    values = {
        name: [_valid(name, col, str(col.dtype), i) for i in range(n)]
        for name, col in schema.columns.items()
    }
    row = CLEAN
    for name, bad in defects:
        values[name][row] = bad
        row += 1
    for pair in ordered:  # first after second
        values[pair["first"]][row] = values[pair["second"]][row] + dt.timedelta(days=1)
        row += 1
    for name in unique:  # a copy of row 0's value: both rows fail
        values[name][row] = values[name][0]
        row += 1
    types = {n: ARROW_TYPES[str(c.dtype)] for n, c in schema.columns.items()}
    table = pa_arrow.table({n: pa_arrow.array(v, types[n]) for n, v in values.items()})
    return table, n - CLEAN


def pandera_failures(frame: pd.DataFrame, schema: pa.DataFrameSchema) -> dict[int, set[str]]:
    """Row -> the reasons pandera gives ("<column>: <check>"; "row" for a frame check)."""
    try:
        schema.validate(frame, lazy=True)
        return {}
    except SchemaErrors as err:
        cases = err.failure_cases
    assert cases["index"].notna().all(), cases  # row-level failures only
    out: dict[int, set[str]] = {}
    for case in cases.itertuples():
        column = "row" if case.schema_context == "DataFrameSchema" else case.column
        out.setdefault(int(case.index), set()).add(f"{column}: {case.check}")
    return out


# Pandera checks a dtype it does not coerce for the whole column (not per row): the
# models that do not coerce (CustomerMeasures, SegmentMembership) are not compared here.
SCHEMAS = [s for s in (*SILVER_SCHEMAS.values(), *(m.to_schema() for m in GOLD_MODELS)) if s.coerce]
# Arrow's nullable ints and booleans as pandas' nullable dtypes (pandas' bool would read a
# null as False, and pandera would never see it).
NULLABLE = {pa_arrow.bool_(): pd.BooleanDtype(), pa_arrow.int64(): pd.Int64Dtype()}.get


def to_pandas(table: pa_arrow.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=NULLABLE)


@pytest.mark.parametrize("schema", SCHEMAS, ids=[s.name for s in SCHEMAS])
def test_sql_checks_reject_what_pandera_rejects(schema):
    table, defects = bad_table(schema)
    expected = pandera_failures(to_pandas(table), schema)
    rows, reasons = failures(table, sql_checks(schema))
    got = dict(zip(rows.tolist(), reasons.to_pylist(), strict=True))
    assert sorted(got) == sorted(expected)
    # every defect row and (for a unique column) the row it copies; no clean row else
    assert set(range(CLEAN, CLEAN + defects)) <= set(got) <= set(range(CLEAN + defects)) | {0}
    for i, reason in got.items():  # the first failed check, one pandera reports there
        assert reason in expected[i], (i, reason, expected[i])


def test_the_schemas_are_checked_on_every_kind_of_defect():
    """The test above sees nulls, NaN, out-of-range, bad enums, unordered periods and
    duplicates somewhere (a schema change that dropped them all would leave it hollow)."""
    kinds = {r.split(": ", 1)[1].split("(")[0] for s in SCHEMAS for r in _reasons(s)}
    assert {"not_nullable", "greater_than_or_equal_to", "less_than_or_equal_to", "isin",
            "field_uniqueness", "validfrom <= validto"} <= kinds  # fmt: skip


def _reasons(schema: pa.DataFrameSchema) -> list[str]:
    table, _ = bad_table(schema)
    return failures(table, sql_checks(schema))[1].to_pylist()


def test_reasons_read_as_before():
    """Silver's reasons are the texts quarantine tables hold from before (users read them)."""
    table, _ = bad_table(SILVER_SCHEMAS["dirpersonname"])
    assert {"person: not_nullable", "row: validfrom <= validto"} <= set(
        failures(table, sql_checks(SILVER_SCHEMAS["dirpersonname"]))[1].to_pylist()
    )
    assert "salesprice: greater_than_or_equal_to(0)" in _reasons(SILVER_SCHEMAS["salesline"])


def test_a_value_of_the_wrong_type_fails_its_coercion_as_in_pandera():
    schema = pa.DataFrameSchema(
        {"n": pa.Column(int), "t": pa.Column(schemas.UTC_TS, nullable=True)},
        coerce=True,
        name="typed",
    )
    table = pa_arrow.table({"n": ["1", "x", "3"], "t": ["2024-01-01", None, "2024-01-02"]})
    rows, reasons = failures(table, sql_checks(schema))
    assert rows.tolist() == [1] and reasons.to_pylist() == ["n: coerce_dtype('int64')"]
    assert "n: coerce_dtype('int64')" in pandera_failures(to_pandas(table), schema)[1]


def test_the_engine_split_gives_every_row_its_reason():
    """`checked_sql` (what an engine runs over a whole table: uniqueness as a window)
    gives the same reasons as the batch path."""
    schema = schemas.Orders.to_schema()
    table, _ = bad_table(schema)
    con = duckdb_connection()
    con.register("orders", table)
    split = con.sql(sql_checks(schema).checked_sql("orders")).to_arrow_table()
    con.close()
    rows, reasons = failures(table, sql_checks(schema))
    by_id = dict(zip(split["order_id"].to_pylist(), split[REASON].to_pylist(), strict=True))
    ids = table["order_id"].to_pylist()
    assert {i: r for i, r in by_id.items() if r} == {ids[r]: s for r, s in
                                                     zip(rows, reasons.to_pylist(), strict=True)}  # fmt: skip


def test_spark_dialect_quotes_and_types_for_spark_sql():
    checks = sql_checks(schemas.Orders, "spark")
    text = checks.checked_sql("orders")
    assert "`channel` IS NULL" in text and '"' not in text
    # Spark reads 'a''b' as 'ab': a quote inside a literal is escaped with a backslash
    assert r"THEN 'channel: isin([\'online\', \'store\'" in text
    assert "TRY_CAST(`order_ts` AS TIMESTAMP)" in text and "AS STRING" in text
    assert "regexp_matches" not in sql_checks(_matching(), "spark").reason_sql()
    assert "RLIKE '^(?:[A-Z]{2})'" in sql_checks(_matching(), "spark").reason_sql()


def _matching() -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {"c": pa.Column(str, [pa.Check.str_matches("[A-Z]{2}"), pa.Check.str_length(2, 2)])},
        name="countries",
    )


def test_string_checks_agree_with_pandera():
    schema = _matching()
    table = pa_arrow.table({"c": ["US", "usa", "xUS", None, "U"]})
    rows, reasons = failures(table, sql_checks(schema))
    expected = pandera_failures(to_pandas(table), schema)
    assert rows.tolist() == sorted(expected) == [1, 2, 3, 4]
    assert all(r in expected[i] for i, r in zip(rows, reasons.to_pylist(), strict=True))


@pytest.mark.parametrize(
    "schema, named",
    [
        (pa.DataFrameSchema({"x": pa.Column(int, pa.Check(lambda s: s > 0, name="positive"))},
                            name="custom"), "custom: column 'x': check 'positive'"),
        (pa.DataFrameSchema({"x": pa.Column(int)}, checks=[pa.Check(lambda df: df.x > 0,
                            name="wide")], name="frame"), "frame: frame check 'wide'"),
        (pa.DataFrameSchema({"x": pa.Column(int, pa.Check.unique_values_eq([1]))}, name="u"),
         "u: column 'x': check 'unique_values_eq'"),
        (pa.DataFrameSchema({"x": pa.Column(int), "y": pa.Column(int)}, unique=["x", "y"],
                            name="pair"), "pair: unique=['x', 'y']"),
    ],
)  # fmt: skip
def test_a_check_without_translation_is_refused_naming_it(schema, named):
    with pytest.raises(TypeError, match="no SQL translation") as err:
        sql_checks(schema)
    assert named in str(err.value)


def test_arrow_check_refuses_a_model_it_cannot_translate():
    class Odd(pa.DataFrameModel):
        x: pa.typing.Series[int]

        @pa.check("x", name="even")
        def even(cls, s):  # noqa: N805 (pandera passes the class)
            return s % 2 == 0

    with pytest.raises(TypeError, match="Odd: column 'x': check 'even'"):
        ArrowCheck(Odd, "gold/odd")


def test_arrow_check_raises_naming_every_failed_check():
    table, _ = bad_table(schemas.Orders.to_schema())
    with pytest.raises(ValueError) as err:
        validate_arrow(table, schemas.Orders, "gold/orders")
    message = str(err.value)
    assert message.startswith("gold/orders fails its schema:")
    assert "customer_id: not_nullable fails 1 rows" in message
    assert "channel: isin(['online', 'store', 'call-center', 'unknown']) fails 1 rows" in message


def test_arrow_check_counts_uniqueness_over_every_batch():
    table, _ = bad_table(schemas.Products.to_schema())
    clean = table.slice(0, CLEAN)
    check = ArrowCheck(schemas.Products, "gold/products")
    assert check(clean).equals(clean) and check(clean.slice(1, 1)).num_rows == 1
    with pytest.raises(ValueError, match=r"gold/products.*\n.*item_id: field_uniqueness"):
        check.finish()
    assert check.rows == CLEAN + 1


def test_arrow_check_coerces_and_names_a_missing_column():
    check = ArrowCheck(schemas.Products, "gold/products")
    rows = pa_arrow.table({"item_id": ["a"], "name": pa_arrow.array([None], pa_arrow.null()),
                           "category": pa_arrow.array(["c"], pa_arrow.large_string())})  # fmt: skip
    assert check(rows).schema == check.schema
    with pytest.raises(ValueError, match="category: column missing"):
        check(rows.select(["item_id", "name"]))
