"""Gold on Spark across builds, as gold on DuckDB: after an increment with erasures the
two engines' gold is equal (DuckDB patches, Spark rebuilds); each records the inputs in
its commits, so a second build of either engine after either writes nothing; a build
that fails part-way leaves whole tables and a rerun completes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from c360ml.config import Settings
from c360ml.medallion.build import build_gold as duckdb_gold
from c360ml.medallion.build import build_silver, build_unify
from c360ml.medallion.gold import lake_versions
from c360ml.medallion.ingest import ingest_landing
from c360ml.medallion.patch import SQL_KEY
from c360ml.spark.gold import SparkBuildError
from c360ml.spark.gold import build_gold as spark_gold
from c360ml.storage.inputs import last_record
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from tests.conftest import build_all, make_settings
from tests.spark.test_gold import assert_same_table, outputs

CUSTOMERS, SEED = 800, 5
SQL = Path(__file__).resolve().parents[2] / "pipelines" / "sql"


def _copy(settings: Settings, folder: Path) -> Settings:
    """A copy of the lake, with settings pointing at it."""
    copied = settings.model_copy(update={"lake_root": folder / "lake"})
    shutil.copytree(settings.lake, copied.lake)
    return copied


def _versions(settings: Settings) -> dict[tuple[str, ...], int | None]:
    lake = Lake(settings.lake)
    return {where: lake.version(*where) for where in outputs()}


def _written(summary) -> dict[str, str]:
    return {row["table"]: row["written"] for row in summary.rows()}


@pytest.fixture(scope="module")
def increment(tmp_path_factory) -> Settings:
    """A generated lake built through gold by DuckDB, then its next increment (new,
    changed and deleted rows; persons erased at the source) built through silver and
    unify: gold is behind."""
    settings = make_settings(tmp_path_factory.mktemp("spark_builds") / "base")
    generate_lake(settings, customers=CUSTOMERS, seed=SEED)
    build_all(settings)
    before = set(Lake(settings.lake).read_pandas("gold", "customer_source_map").customer_id)
    generate_increment(settings)
    for step in (ingest_landing, build_silver, build_unify):
        step(settings)
    assert len(pd.read_parquet(settings.truth / "erased.parquet")), "the increment erased nobody"
    after = set(Lake(settings.lake).read_pandas("gold", "customer_source_map").customer_id)
    assert before - after, "no customer left the source map"
    return settings


@pytest.fixture(scope="module")
def built(increment, tmp_path_factory, spark):
    """(DuckDB's copy, Spark's copy, DuckDB's summary, Spark's summary): gold built
    once by each engine from the same increment."""
    folder = tmp_path_factory.mktemp("spark_builds_copies")
    duck, on_spark = _copy(increment, folder / "duckdb"), _copy(increment, folder / "spark")
    return duck, on_spark, duckdb_gold(duck), spark_gold(on_spark, spark)


@pytest.mark.parametrize("where", outputs(), ids="/".join)
def test_after_an_increment_with_erasures_spark_gold_equals_duckdb_gold(built, where):
    duck, on_spark, _, _ = built
    assert_same_table(Lake(duck.lake), Lake(on_spark.lake), where)


def test_duckdb_patched_where_spark_rebuilt(built):
    """The parity above compares a patch with a rebuild (not two rebuilds)."""
    _, _, by_duckdb, by_spark = built
    assert _written(by_duckdb)["gold/orders"].startswith("patched")
    assert set(_written(by_spark).values()) == {"rebuilt"}


def test_both_engines_record_the_same_inputs_and_sql(built):
    duck, on_spark, _, _ = built
    for where in outputs():
        records = [last_record(Lake(s.lake), where) for s in (duck, on_spark)]
        assert records[0] is not None and records[1] is not None, where
        assert records[1][0] == records[0][0] == lake_versions(Lake(on_spark.lake)), where
        assert records[1][1].get(SQL_KEY) == records[0][1].get(SQL_KEY), where


def test_a_build_after_a_build_of_either_engine_writes_nothing(built, spark):
    """Spark after Spark, DuckDB after Spark, Spark after DuckDB: every model unchanged,
    no new Delta version of any output."""
    duck, on_spark, _, _ = built
    for settings, build in (
        (on_spark, lambda s: spark_gold(s, spark)),
        (on_spark, duckdb_gold),
        (duck, lambda s: spark_gold(s, spark)),
    ):
        before = _versions(settings)
        assert set(_written(build(settings)).values()) == {"unchanged"}
        assert _versions(settings) == before


def test_a_failure_mid_build_leaves_whole_tables_and_a_rerun_completes_it(
    increment, built, spark, tmp_path
):
    """A SQL error in the fourth model's file: one line naming the model and the file;
    the three models before it are written whole (equal to DuckDB's, recording the
    current inputs), the failing one, those after it and the helpers' state are as they
    were. The rerun with the file mended writes only what is missing and equals DuckDB."""
    duck, _, _, _ = built
    settings = _copy(increment, tmp_path)
    sql = tmp_path / "sql"
    shutil.copytree(SQL, sql)
    (sql / "gold" / "order_status_history.sql").write_text("SELECT * FROM no_such_table\n")
    before = _versions(settings)
    broken = settings.model_copy(update={"sql_dir": sql})

    with pytest.raises(SparkBuildError) as failed:
        spark_gold(broken, spark)

    said = str(failed.value)
    assert "\n" not in said
    assert said.startswith(
        "gold/order_status_history: gold/order_status_history.sql fails on Spark: "
    )
    lake, inputs = Lake(settings.lake), lake_versions(Lake(settings.lake))
    done = {"orders", "order_lines", "products"}
    for where, version in _versions(settings).items():
        if where[-1] in done:
            assert version == before[where] + 1, where
            assert last_record(lake, where)[0] == inputs, where
            assert_same_table(Lake(duck.lake), lake, where)
        else:
            assert version == before[where], where

    rerun = _written(spark_gold(settings, spark))
    assert {t for t, how in rerun.items() if how == "unchanged"} == {f"gold/{n}" for n in done}
    for where in outputs():
        assert_same_table(Lake(duck.lake), lake, where)


def _next_increment(settings: Settings) -> None:
    generate_increment(settings)
    for step in (ingest_landing, build_silver, build_unify):
        step(settings)


def _assert_equals_a_duckdb_rebuild(settings: Settings, folder: Path) -> None:
    """Every gold output of the lake equals a DuckDB gold build from scratch of a copy."""
    fresh = _copy(settings, folder)
    for where in outputs():
        if Lake(fresh.lake).exists(*where):
            shutil.rmtree(Lake(fresh.lake).path(*where))
    assert set(_written(duckdb_gold(fresh)).values()) == {"rebuilt"}
    for where in outputs():
        assert_same_table(Lake(fresh.lake), Lake(settings.lake), where)


def test_each_engine_continues_what_the_other_wrote(increment, spark, tmp_path):
    """Spark builds gold; on the next increment DuckDB patches the tables Spark wrote
    (deletion vectors on Sail's files); on the one after, Spark rebuilds over those.
    Each time gold equals a DuckDB build from scratch."""
    settings = increment.model_copy(
        update={"lake_root": tmp_path / "lake", "truth_root": tmp_path / "truth"}
    )
    shutil.copytree(increment.lake, settings.lake)
    shutil.copytree(increment.truth, settings.truth)
    spark_gold(settings, spark)

    _next_increment(settings)
    assert _written(duckdb_gold(settings))["gold/orders"].startswith("patched")
    orders = Lake(settings.lake).delta("gold", "orders")
    assert "deletionVectors" in (orders.protocol().reader_features or [])
    _assert_equals_a_duckdb_rebuild(settings, tmp_path / "first")

    _next_increment(settings)
    assert set(_written(spark_gold(settings, spark)).values()) == {"rebuilt"}
    _assert_equals_a_duckdb_rebuild(settings, tmp_path / "second")
