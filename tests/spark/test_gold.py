"""Gold on Spark (Sail) equals gold on DuckDB: every gold table, its quarantine and the
helpers' state, row for row after sorting, floats within 1e-9 relative."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from c360ml.medallion.declarations import GOLD_MODELS, HELPERS, GoldModel
from c360ml.spark import SparkUnavailableError, spark_session
from c360ml.spark.gold import SparkBuildError, SparkGold, build_gold, materialise
from c360ml.storage.lake import Lake
from c360ml.synth import generate_lake
from tests.conftest import build_all, make_settings

CUSTOMERS, SEED = 1200, 11
# The lake with every source runs every SQL file (a model's per-source files unioned);
# the generic-only lake runs the generic files alone.
LAKES = {"all sources": ("d365", "dataverse", "generic"), "generic": ("generic",)}


def outputs() -> list[tuple[str, ...]]:
    """Every table a gold build writes: the models, their quarantine, the helpers' state."""
    found: list[tuple[str, ...]] = []
    for model in GOLD_MODELS:
        found.append(("gold", model.name))
        if model.quarantine:
            found.append(("quarantine", "gold", model.name))
    return found + [h.state for h in HELPERS]


@pytest.fixture(scope="module", params=list(LAKES), ids=list(LAKES))
def lakes(request, tmp_path_factory, spark):
    """(DuckDB's lake, Spark's lake, Spark's summary, its seconds): a generated lake
    built through gold by DuckDB, copied, its gold outputs removed in the copy and built
    again by Spark from the same silver and source map."""
    sources = LAKES[request.param]
    base = tmp_path_factory.mktemp("spark_gold")
    duck = make_settings(base / "duckdb").model_copy(update={"sources": sources})
    generate_lake(duck, customers=CUSTOMERS, seed=SEED)
    build_all(duck)  # DuckDB, through gold
    settings = make_settings(base / "spark").model_copy(update={"sources": sources})
    shutil.copytree(duck.lake, settings.lake)
    for where in outputs():
        if Lake(duck.lake).exists(*where):
            shutil.rmtree(Lake(settings.lake).path(*where))
    started = time.perf_counter()
    summary = build_gold(settings, spark)
    seconds = time.perf_counter() - started
    return Lake(duck.lake), Lake(settings.lake), summary, seconds


def sorted_frame(table: pa.Table) -> pd.DataFrame:
    """Rows sorted by every column, the float columns last (a float may differ in its
    last bits between engines: it must not decide the order)."""
    frame = table.to_pandas()
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    by = [c for c in frame.columns if c not in floats] + floats
    return frame.sort_values(by, na_position="first", kind="stable").reset_index(drop=True)


def assert_same_table(duck: Lake, spark_lake: Lake, where: tuple[str, ...]) -> None:
    """The table in both lakes (or in neither), with the same columns, types, logical
    schema and rows (sorted; floats within 1e-9 relative)."""
    if not duck.exists(*where):  # no source of it in this lake
        assert not spark_lake.exists(*where)
        return
    expected, got = duck.read(*where), spark_lake.read(*where)
    # Column names and types as DuckDB writes them; the Delta schema's nullability too
    # (Spark's derived NOT NULL is not kept: every column is nullable, as DuckDB's).
    assert [(f.name, f.type) for f in got.schema] == [(f.name, f.type) for f in expected.schema]
    logical = [pa.schema(lake.delta(*where).schema().to_arrow()) for lake in (duck, spark_lake)]
    assert logical[0].equals(logical[1])
    assert len(got) == len(expected) > 0 or where[0] == "quarantine"
    pd.testing.assert_frame_equal(
        sorted_frame(got), sorted_frame(expected), check_exact=False, rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("where", outputs(), ids="/".join)
def test_spark_gold_equals_duckdb_gold(lakes, where):
    duck, spark_lake, _, _ = lakes
    assert_same_table(duck, spark_lake, where)


def test_summary_counts_what_was_written(lakes):
    """One summary row per model, in declaration order, counting the written tables."""
    _, spark_lake, summary, seconds = lakes
    rows = summary.rows()
    made = [m for m in GOLD_MODELS if spark_lake.exists("gold", m.name)]
    assert [r["table"] for r in rows] == [f"gold/{m.name}" for m in made]
    for row, model in zip(rows, made, strict=True):
        assert row["rows"] == spark_lake.count("gold", model.name) > 0
        if model.quarantine:
            assert row["quarantined"] == spark_lake.count("quarantine", "gold", model.name)
        assert row["written"] == "rebuilt"
    for cases in (r for r in rows if r["table"] == "gold/support_cases"):
        assert cases["note"].endswith("unlinked (no profile)")
    assert seconds < 60


def test_a_failing_check_raises_and_writes_nothing(lakes, spark, tmp_path):
    """A model whose rows fail its schema (duplicated order ids) is refused naming the
    check, and its table is not written."""
    _, spark_lake, _, _ = lakes
    sql = tmp_path / "sql"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipelines" / "sql", sql)
    (sql / "gold" / "twice.sql").write_text(
        "SELECT order_id, customer_id, order_ts, channel, store, currency, gross_amount, "
        "discount_amount, net_amount, item_count, is_return, status, is_cancelled "
        "FROM gold_orders UNION ALL SELECT * FROM gold_orders"
    )
    orders = GOLD_MODELS[0]
    twice = GoldModel(
        name="orders_twice",
        schema=orders.schema,
        description="every order twice",
        sql={"d365": "twice"},
        reads=("gold_orders",),
    )
    settings = make_settings(spark_lake.root.parent).model_copy(update={"sql_dir": sql})
    build = SparkGold(settings, spark_lake, spark, frozenset({"d365"}))
    with pytest.raises(ValueError, match=r"gold/orders_twice fails its schema:\norder_id: field_uniqueness \(\d+ duplicated values\)"):  # fmt: skip
        materialise(build, twice)
    assert not spark_lake.exists("gold", "orders_twice")


def test_an_error_while_the_query_runs_is_one_line_and_writes_nothing(lakes, spark, tmp_path):
    """A model whose SQL is valid but fails on its rows (`raise_error`: an error only
    execution finds, as a failed cast would) is a SparkBuildError naming the model."""
    _, spark_lake, _, _ = lakes
    sql = tmp_path / "sql"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipelines" / "sql", sql)
    (sql / "gold" / "boom.sql").write_text(
        "SELECT * FROM gold_orders WHERE raise_error('no order may pass') IS NULL"
    )
    boom = GoldModel(
        name="orders_boom",
        schema=GOLD_MODELS[0].schema,
        description="fails on its rows",
        sql={"d365": "boom"},
        reads=("gold_orders",),
    )
    settings = make_settings(spark_lake.root.parent).model_copy(update={"sql_dir": sql})
    build = SparkGold(settings, spark_lake, spark, frozenset({"d365"}))
    with pytest.raises(SparkBuildError, match=r"^gold/orders_boom: Spark failed it: .*no order may pass") as err:  # fmt: skip
        materialise(build, boom)
    assert "\n" not in str(err.value)
    assert not spark_lake.exists("gold", "orders_boom")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_spark_is_one_clear_line():
    port = _closed_port()
    started = time.perf_counter()
    with pytest.raises(SparkUnavailableError, match=rf"^Spark Connect at 127\.0\.0\.1:{port} is not reachable \(.+\)$"):  # fmt: skip
        spark_session(f"sc://127.0.0.1:{port}")
    assert time.perf_counter() - started < 10
    with pytest.raises(SparkUnavailableError, match="is not a Spark Connect URL"):
        spark_session("http://127.0.0.1:15002")


def test_the_active_session_is_used_without_a_url(spark):
    assert spark_session() is spark


def _python(code: str, folder: Path) -> str:
    """What a script prints, run in a fresh process. A script, not `python -c`: pyspark
    takes a main module without a file for its own doctests, and exits."""
    script = folder / "script.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_core_needs_no_pyspark(tmp_path):
    """With pyspark absent, c360ml imports (gold on either engine included), and asking
    for Spark says how to get it. (pandera imports pyspark.pandas whenever pyspark is
    installed, so "absent" is simulated: the import is blocked.)"""
    said = _python(
        "import sys\n"
        "sys.modules['pyspark'] = None\n"
        "import c360ml.cli, c360ml.medallion.gold, c360ml.spark, c360ml.spark.gold\n"
        "from c360ml.spark import spark_session, SparkUnavailableError\n"
        "try:\n"
        "    spark_session('sc://127.0.0.1:15002')\n"
        "except SparkUnavailableError as exc:\n"
        "    print(exc)\n",
        tmp_path,
    )
    assert said == (
        "the Spark engine needs pyspark: pip install 'c360ml[spark]' "
        "(or run inside a Spark job, which provides it)"
    )


def test_no_url_and_no_session_is_one_clear_line(tmp_path):
    said = _python(
        "from c360ml.spark import spark_session, SparkUnavailableError\n"
        "try:\n"
        "    spark_session()\n"
        "except SparkUnavailableError as exc:\n"
        "    print(exc)\n",
        tmp_path,
    )
    assert said == (
        "no Spark session: set spark_remote (sc://host:port) or run inside a Spark job or notebook"
    )
