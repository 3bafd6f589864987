"""Silver on Spark (Sail) equals silver on DuckDB: every silver table, its quarantine and
the change logs, row for row after sorting, after the first build and after an increment
with erasures; either engine continues the other's work; a build with nothing new writes
nothing; a Spark failure part-way is one line and leaves the table it failed on as it was.

Bronze gets rows the generator does not write (`_dirt`): values to standardise (e-mails,
phones, countries, stray whitespace), rows that fail silver's checks (to quarantine),
late and deleted versions of quarantined keys, generic rows without an order id."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from c360ml.config import Settings
from c360ml.medallion.ingest import ingest_landing
from c360ml.medallion.silver import build_silver as duckdb_silver
from c360ml.medallion.silver import change_log
from c360ml.sources.tables import SOURCE_TABLES
from c360ml.spark.gold import SparkBuildError
from c360ml.spark.silver import build_silver as spark_silver
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from tests.conftest import make_settings
from tests.spark.test_gold import assert_same_table

CUSTOMERS, SEED = 1000, 17
SOURCES = ("d365", "dataverse", "generic")
LOGGED = [t.name for t in SOURCE_TABLES.values() if t.change_key]


def outputs() -> list[tuple[str, ...]]:
    """Every table a silver build writes but the change logs (compared by `_same_log`)."""
    found: list[tuple[str, ...]] = [("silver", "generic_transactions")]
    for table in SOURCE_TABLES.values():
        found += [("silver", table.name), ("quarantine", "silver", table.name)]
    return found


def _versions(settings: Settings) -> dict[tuple[str, ...], int | None]:
    lake = Lake(settings.lake)
    return {w: lake.version(*w) for w in [*outputs(), *(change_log(n) for n in LOGGED)]}


# ---------------------------------------------------------------- bronze rows to test with


def _append(lake: Lake, where: tuple[str, ...], rows: pa.Table, versions: int) -> None:
    """`rows` (bronze rows of the table) appended as a new sync's rows: their version moved
    by `versions` (negative: a late, older version), ingested now."""
    now = dt.datetime.now(dt.UTC)
    if "versionnumber" in rows.column_names:
        moved = pc.add(rows["versionnumber"], versions)
        rows = rows.set_column(rows.schema.get_field_index("versionnumber"), "versionnumber", moved)
    for name, value in (("_ingested_at", now), ("_source_file", "test/dirt"), ("_batch_id", "t")):
        i = rows.schema.get_field_index(name)
        rows = rows.set_column(
            i, rows.schema.field(i), pa.array([value] * len(rows), rows[name].type)
        )
    lake.write(rows.cast(lake.schema(*where)), *where, mode="append")


def _edit(rows: pa.Table, **columns: list) -> pa.Table:
    for name, values in columns.items():
        i = rows.schema.get_field_index(name)
        rows = rows.set_column(i, rows.schema.field(i), pa.array(values, rows[name].type))
    return rows


def _dirt(settings: Settings, increment: bool) -> None:
    """Rows the checks and the standardisation must treat alike on both engines. The
    increment's: a quarantined key made valid again, a valid one made invalid, a delete
    of a quarantined key, late (older) versions that change nothing."""
    lake = Lake(settings.lake)
    where = {t.name: ("bronze", t.source, t.name) for t in SOURCE_TABLES.values()}
    head = {n: lake.read(*w).slice(0, 8) for n, w in where.items()}
    bump = 2 * 10**12 if increment else 10**12  # newer than any generated version
    lines = head["salesline"]
    if not increment:
        _append(lake, where["salesline"], _edit(lines.slice(0, 3), salesprice=[-1.0, -2, -3]), bump)
        _append(
            lake, where["custtable"], _edit(head["custtable"].slice(0, 2), party=[None, None]), bump
        )
        persons = head["dirpersonname"].slice(0, 2)
        swapped = _edit(persons, validfrom=persons["validto"].to_pylist(),
                        validto=persons["validfrom"].to_pylist())  # fmt: skip
        _append(lake, where["dirpersonname"], swapped, bump)
        contacts = _edit(
            head["contact"].slice(0, 5),
            contactid=["  ", " padded-key\t", None, head["contact"]["contactid"][3].as_py(),
                       head["contact"]["contactid"][4].as_py()],
            emailaddress1=["  Mixed.Case@Example.COM ", "a@b.c", None, "X@Y.Z", "\tq@r.s"],
            telephone1=["(212) 555-0123", "12345", "+44 20 7946 0958", "202.555.0199 ", None],
            mobilephone=["+1 (415) 555 0100", None, "020 7946 0958", "555", "not a phone"],
            address1_country=["united kingdom", " usa ", "Mexico", "ZZ", None],
        )  # fmt: skip
        _append(lake, where["contact"], contacts, bump)
        addresses = head["logisticselectronicaddress"].slice(0, 4)
        _append(lake, where["logisticselectronicaddress"], _edit(
            addresses, type=[1, 2, 1, 2],
            locator=["212.555.0199 ", " Foo@BAR.com", "+49 30 901820", "  "]), bump)  # fmt: skip
        _append(lake, ("bronze", "generic", "transactions"), _generic(lake), 0)
        return
    prices = [4.5, -7.0, 8.25]  # the first key back to valid, a valid key made invalid
    _append(lake, where["salesline"], _edit(lines.slice(0, 3), salesprice=prices), bump)
    gone = head["custtable"].slice(0, 1)
    _append(lake, where["custtable"], _edit(gone, IsDelete=[True]), bump)  # a quarantined key
    _append(lake, where["salestable"], head["salestable"].slice(0, 3), -1)  # late: no change
    _append(lake, where["contact"], _edit(head["contact"].slice(3, 1), telephone1=["212 555 0188"]),
            bump)  # fmt: skip


def _generic(lake: Lake) -> pa.Table:
    """Generic rows without an order id (silver makes one from the customer and the
    instant's text, which the engines cast differently), one at a fractional second."""
    rows = lake.read("bronze", "generic", "transactions").slice(0, 3)
    stamps = [dt.datetime(2025, 3, 4, 5, 6, 7, micro, tzinfo=dt.UTC) for micro in (0, 120000, 1)]
    return _edit(rows, order_id=[None, "  ", None], timestamp=stamps)


# ---------------------------------------------------------------- the lakes


def _copy(settings: Settings, folder: Path) -> Settings:
    copied = settings.model_copy(update={"lake_root": folder / "lake"})
    shutil.copytree(settings.lake, copied.lake)
    return copied


def _new_bronze(source: Settings, target: Settings) -> None:
    """The target lake's bronze replaced by the source lake's (the same increment, ingested
    once: ingest stamps rows with the time)."""
    shutil.rmtree(Lake(target.lake).path("bronze"))
    shutil.copytree(Lake(source.lake).path("bronze"), Lake(target.lake).path("bronze"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Settings:
    """A generated landing (every source), ingested, with `_dirt` in bronze."""
    settings = make_settings(tmp_path_factory.mktemp("spark_silver") / "base")
    settings = settings.model_copy(update={"sources": SOURCES})
    generate_lake(settings, customers=CUSTOMERS, seed=SEED)
    ingest_landing(settings)
    _dirt(settings, increment=False)
    return settings


@pytest.fixture(scope="module")
def first(base, tmp_path_factory, spark):
    """(DuckDB's lake, Spark's lake, Spark's summary): silver built once by each engine
    from copies of the same bronze."""
    folder = tmp_path_factory.mktemp("spark_silver_first")
    duck, on_spark = _copy(base, folder / "duckdb"), _copy(base, folder / "spark")
    duckdb_silver(duck)
    return duck, on_spark, spark_silver(on_spark, spark)


@pytest.fixture(scope="module")
def increment(base, first, tmp_path_factory) -> dict[str, Settings]:
    """The next increment (new, changed and deleted rows; persons erased at the source)
    ingested into `base`, with more `_dirt`; then copies of the first builds' lakes
    with that bronze: two per engine that built them ("duckdb", "spark" are built
    again by the same engine, "duckdb+spark" and "spark+duckdb" by the other)."""
    generate_increment(base)
    ingest_landing(base)
    _dirt(base, increment=True)
    assert len(pd.read_parquet(base.truth / "erased.parquet")), "the increment erased nobody"
    folder = tmp_path_factory.mktemp("spark_silver_increment")
    duck, on_spark, _ = first
    lakes = {}
    for name, built in (("duckdb", duck), ("spark", on_spark)):
        for other in ("", "+spark" if name == "duckdb" else "+duckdb"):
            copied = _copy(built, folder / f"{name}{other}")
            _new_bronze(base, copied)
            lakes[name + other] = copied
    return lakes


@pytest.fixture(scope="module")
def incremented(increment, spark) -> dict[str, Settings]:
    """`increment`'s lakes built: each by the engine its name ends with."""
    for name, settings in increment.items():
        if name.endswith("spark"):
            spark_silver(settings, spark)
        else:
            duckdb_silver(settings)
    return increment


def _log_keys(lake: Lake, name: str) -> pd.DataFrame:
    """The change keys a log holds (the silver versions they are logged under are each
    engine's own: DuckDB's merge commits more often than Spark's rebuild)."""
    rows = lake.read(*change_log(name)).drop_columns(["silver_version"]).to_pandas()
    return rows.sort_values(list(rows.columns)).reset_index(drop=True)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("where", outputs(), ids="/".join)
def test_first_build_equals_duckdb(first, where):
    duck, on_spark, _ = first
    assert_same_table(Lake(duck.lake), Lake(on_spark.lake), where)


def test_first_build_quarantines_standardises_and_starts_the_logs(first):
    """The parity above covers rows that were quarantined and standardised, and each
    change log is started empty, from silver's version."""
    duck, on_spark, summary = first
    lake = Lake(on_spark.lake)
    reasons = set(lake.read_pandas("quarantine", "silver", "salesline").quarantine_reason)
    assert reasons == {"salesprice: greater_than_or_equal_to(0)"}
    contacts = lake.read_pandas("silver", "contact").set_index("contactid")
    assert contacts.loc["padded-key", "emailaddress1"] == "a@b.c"
    assert {"+12025550199", "12345"} <= set(contacts.telephone1)  # E.164, or as given
    assert "q@r.s" in set(contacts.emailaddress1)
    assert {"US", "ZZ"} <= set(contacts.address1_country)
    blank = lake.read_pandas("quarantine", "silver", "contact")
    assert set(blank.quarantine_reason) == {"contactid: not_nullable"}
    generic = lake.read_pandas("silver", "generic_transactions")
    assert generic.order_id.str.endswith("05:06:07.12+00").any()
    for name in LOGGED:
        assert lake.count(*change_log(name)) == 0
    rows = {r["table"]: r for r in summary.rows()}
    assert rows["contact"]["quarantined"] == lake.count("quarantine", "silver", "contact") > 0
    assert all(r["balanced"] == "yes" for r in summary.rows())


@pytest.mark.parametrize("name", ["duckdb+spark", "spark", "spark+duckdb"])
@pytest.mark.parametrize("where", outputs(), ids="/".join)
def test_after_an_increment_each_lake_equals_duckdb(incremented, name, where):
    """After an increment with erasures: Spark after Spark, Spark after DuckDB and DuckDB
    after Spark give DuckDB's incremental silver."""
    assert_same_table(Lake(incremented["duckdb"].lake), Lake(incremented[name].lake), where)


@pytest.mark.parametrize("name", ["duckdb+spark", "spark", "spark+duckdb"])
def test_the_change_logs_hold_duckdbs_keys(incremented, name):
    expected, got = Lake(incremented["duckdb"].lake), Lake(incremented[name].lake)
    for table in LOGGED:
        assert len(_log_keys(got, table)) > 0, table
        pd.testing.assert_frame_equal(_log_keys(got, table), _log_keys(expected, table))
    if name.endswith("spark"):  # logged under the silver version Spark's rebuild made
        for table in LOGGED:
            logged = got.read_pandas(*change_log(table)).silver_version
            assert set(logged) == {got.version("silver", table)}, table


def test_a_build_with_nothing_new_writes_nothing(incremented, spark):
    """Spark after Spark, DuckDB after Spark, Spark after DuckDB: no new Delta version."""
    for name, build in (
        ("spark", lambda s: spark_silver(s, spark)),
        ("spark", duckdb_silver),
        ("duckdb", lambda s: spark_silver(s, spark)),
    ):
        settings = incremented[name]
        before = _versions(settings)
        summary = build(settings)
        assert _versions(settings) == before, name
        assert all(r["new bronze rows"] == 0 and r["balanced"] == "yes" for r in summary.rows())


def test_a_failure_mid_build_is_one_line_and_a_rerun_completes_it(
    base, first, incremented, spark, tmp_path
):
    """A bronze file of salesline gone: one line naming the table; the tables before it
    are built, salesline's silver, quarantine and change log and the tables after it are
    as they were. With the file back, the rerun builds the rest and equals DuckDB."""
    settings = _copy(first[0], tmp_path / "lake")
    _new_bronze(base, settings)
    lake = Lake(settings.lake)
    bronze = lake.path("bronze", "d365", "salesline")
    missing = sorted(bronze.glob("*.parquet"), key=lambda p: p.stat().st_mtime)[-1]
    kept = missing.rename(tmp_path / missing.name)
    before = _versions(settings)

    with pytest.raises(SparkBuildError) as failed:
        spark_silver(settings, spark)

    said = str(failed.value)
    assert "\n" not in said and said.startswith("silver/salesline: Spark failed: "), said
    assert missing.name in said
    names = [t.name for t in SOURCE_TABLES.values()]
    done = {"generic_transactions", *names[: names.index("salesline")]}
    duck = Lake(incremented["duckdb"].lake)
    for where, version in _versions(settings).items():
        if where[-1] in done:
            assert_same_table(duck, lake, where)
        elif where[-1].removesuffix("_changes") not in done:
            assert version == before[where], where
    assert lake.version("silver", "salestable") > before[("silver", "salestable")]

    kept.rename(missing)
    spark_silver(settings, spark)
    for where in outputs():
        assert_same_table(Lake(incremented["duckdb"].lake), lake, where)


def test_spark_replaces_the_change_log_rows_of_a_merge_duckdb_did_not_finish(
    base, first, incremented, spark, tmp_path
):
    """A DuckDB merge of salesline killed after its change log commit (the log ahead of
    silver): Spark's build replaces those rows (Delta DELETE, then its own), so the log
    holds DuckDB's keys once each, under the silver version Spark made."""
    from c360ml.medallion import silver as duck

    settings = _copy(first[0], tmp_path / "lake")
    _new_bronze(base, settings)
    lake, table = Lake(settings.lake), SOURCE_TABLES[("d365", "salesline")]
    since = duck._last_recorded(lake, table.name, duck.BRONZE_VERSION_KEY)
    watermark = duck._last_recorded(lake, table.name, duck.BRONZE_INGESTED_KEY)
    raw, version = duck._new_bronze(lake, table, since, watermark)
    latest, _, _, _ = duck._resolved(raw, table, duck.SILVER_SCHEMAS[table.name])
    matched = duck._matched(lake, ("silver", table.name), table, latest)
    duck._log_changes(lake, table, latest, matched, version)
    assert duck.log_version(lake, table)[1], "the log is not ahead of silver"

    spark_silver(settings, spark)

    expected = _log_keys(Lake(incremented["duckdb"].lake), table.name)
    pd.testing.assert_frame_equal(_log_keys(lake, table.name), expected)
    logged = lake.read_pandas(*change_log(table.name)).silver_version
    assert set(logged) == {lake.version("silver", table.name)}
    assert_same_table(Lake(incremented["duckdb"].lake), lake, ("silver", table.name))


def test_the_workers_need_the_core_only(tmp_path):
    """The function mapInArrow runs on the executors imports and works with c360ml's
    core dependencies alone: no pyspark and no `ml` extra (blocked here) on a worker."""
    from tests.spark.test_gold import _python

    said = _python(
        "import sys\n"
        "for name in ('pyspark', 'pysail', 'featuretools', 'xgboost', 'mlflow', 'sklearn',\n"
        "             'bentoml', 'rapidfuzz'):\n"
        "    sys.modules[name] = None\n"
        "import pyarrow as pa\n"
        "from c360ml.medallion.silver import silver_arrow_schema\n"
        "from c360ml.sources.tables import SOURCE_TABLES\n"
        "from c360ml.spark.silver import standardise_batches\n"
        "schema = silver_arrow_schema(SOURCE_TABLES[('dataverse', 'contact')])\n"
        "row = dict.fromkeys(schema.names) | {'contactid': ' c1 ', 'emailaddress1': ' A@B.COM',\n"
        "      'telephone1': '(212) 555-0123', 'address1_country': 'usa'}\n"
        "batch = pa.RecordBatch.from_pylist([row], schema=schema)\n"
        "(out,) = standardise_batches('contact', iter([batch]))\n"
        "got = out.to_pylist()[0]\n"
        "print(got['contactid'], got['emailaddress1'], got['telephone1'], got['address1_country'])\n",
        tmp_path,
    )
    assert said == "c1 a@b.com +12125550123 US"


def test_spark_finishes_a_merge_duckdb_left_without_its_quarantine_commit(
    base, first, incremented, spark, tmp_path
):
    """A DuckDB build killed before salesline's quarantine commit (its last commit taken
    off the log): Spark finds the merge unfinished and completes it, equal to DuckDB."""
    settings = _copy(first[0], tmp_path / "lake")
    _new_bronze(base, settings)
    duckdb_silver(settings)
    lake = Lake(settings.lake)
    where = ("quarantine", "silver", "salesline")
    commits = sorted(lake.path(*where).joinpath("_delta_log").glob("*.json"))
    commits[-1].unlink()
    logged = lake.version(*change_log("salesline"))

    summary = spark_silver(settings, spark)

    assert lake.version(*where) == len(commits) - 1
    assert lake.version(*change_log("salesline")) == logged  # no new rows: nothing to log
    assert {r["table"]: r["balanced"] for r in summary.rows()}["salesline"] == "yes"
    for table in (("silver", "salesline"), where):
        assert_same_table(Lake(incremented["duckdb"].lake), lake, table)
