"""Unify on Spark (Sail) equals unify on DuckDB: the source map, the profiles, the
redirects and the report, row for row after sorting, after a first build and after an
increment with erasures (which DuckDB unifies incrementally); either engine skips the
other's unchanged work; a Spark failure mid-build leaves every table as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from c360ml.config import Settings
from c360ml.medallion.build import build_silver
from c360ml.medallion.gold import lake_versions
from c360ml.medallion.ingest import ingest_landing
from c360ml.medallion.unify import (
    FREQUENCIES,
    KEYS_ONLY,
    STATE,
    STATE_KEY,
    load_rules,
    new_id,
    state_digest,
)
from c360ml.medallion.unify import build_unify as duckdb_unify
from c360ml.spark.gold import SparkBuildError
from c360ml.spark.unify import SCRATCH, SparkUnify, _found, connected_components
from c360ml.spark.unify import build_unify as spark_unify
from c360ml.storage.inputs import last_record
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from tests.conftest import make_settings
from tests.spark.test_gold import assert_same_table

CUSTOMERS, SEED = 1500, 7
SOURCES = ("d365", "dataverse", "generic")  # Commerce and Dataverse records, and generic ones
TABLES = [("gold", "customer_source_map"), ("gold", "customer_profile"), ("gold", "unify_report")]
REDIRECTS = ("gold", "customer_id_redirects")
WRITTEN = [*TABLES, REDIRECTS, STATE]  # every table a unify may write


def _copy(settings: Settings, folder: Path) -> Settings:
    """A copy of the lake and the generator's truth, with settings pointing at them."""
    copied = settings.model_copy(
        update={"lake_root": folder / "lake", "truth_root": folder / "truth"}
    )
    shutil.copytree(settings.lake, copied.lake)
    shutil.copytree(settings.truth, copied.truth)
    return copied


def _versions(settings: Settings) -> dict[tuple[str, ...], int | None]:
    lake = Lake(settings.lake)
    return {where: lake.version(*where) if lake.exists(*where) else None for where in WRITTEN}


def assert_same_unify(duck: Settings, on_spark: Settings) -> None:
    """The map, profiles and report equal (`assert_same_table`); the redirects equal but
    for the instant each engine wrote its own (`redirected_at`)."""
    for where in TABLES:
        assert_same_table(Lake(duck.lake), Lake(on_spark.lake), where)
    lakes = [Lake(s.lake) for s in (duck, on_spark)]
    assert lakes[0].exists(*REDIRECTS) == lakes[1].exists(*REDIRECTS)
    if lakes[0].exists(*REDIRECTS):
        assert lakes[0].schema(*REDIRECTS) == lakes[1].schema(*REDIRECTS)
        frames = [lake.read_pandas(*REDIRECTS) for lake in lakes]
        assert frames[1]["redirected_at"].notna().all()
        kept = ["retired_id", "surviving_id", "reason"]
        expected, got = (f[kept].sort_values(kept).reset_index(drop=True) for f in frames)
        pd.testing.assert_frame_equal(got, expected)


@pytest.fixture(scope="module")
def silver(tmp_path_factory) -> Settings:
    """A generated lake (Commerce, Dataverse and generic sources) through silver."""
    folder = tmp_path_factory.mktemp("spark_unify") / "base"
    settings = make_settings(folder).model_copy(update={"sources": SOURCES})
    generate_lake(settings, customers=CUSTOMERS, seed=SEED)
    ingest_landing(settings)
    build_silver(settings)
    return settings


@pytest.fixture(scope="module")
def first(silver, tmp_path_factory, spark):
    """(DuckDB's copy, Spark's copy, Spark's summary): the first unify of each engine."""
    folder = tmp_path_factory.mktemp("spark_unify_first")
    duck, on_spark = _copy(silver, folder / "duckdb"), _copy(silver, folder / "spark")
    duckdb_unify(duck)
    return duck, on_spark, spark_unify(on_spark, spark)


def _merge_and_split(settings: Settings, previous: pd.DataFrame) -> dict[str, str]:
    """Changes to silver/contact that the stable-id rules must resolve: a contact-only
    customer given the e-mail of another (a merge: one id kept, one redirected), and the
    contact of a customer of one Commerce account and one contact given a name and
    e-mail of its own and no phone (a split). Returns the contacts' keys."""
    lake = Lake(settings.lake)
    table = lake.read("silver", "contact")
    contacts = table.to_pandas()
    size = previous.groupby("customer_id")["source"].transform("size")
    dataverse = previous["source"] == "dataverse"
    alone = set(previous.loc[(size == 1) & dataverse, "source_key"])
    paired = set(previous.loc[(size == 2) & dataverse, "source_key"])
    emails = contacts["emailaddress1"].str.strip().str.lower()
    once = contacts[emails.map(emails.value_counts()).eq(1)]
    a, b = once.loc[once["contactid"].isin(alone), "contactid"].iloc[:2]
    split = once.loc[once["contactid"].isin(paired), "contactid"].iloc[0]
    given = contacts.loc[contacts["contactid"] == a, "emailaddress1"].iloc[0]
    contacts.loc[contacts["contactid"] == b, "emailaddress1"] = given
    row = contacts["contactid"] == split
    own = ["Zed", "Qvist", "Zed Qvist", "zed.qvist@example.invalid"]
    contacts.loc[row, ["firstname", "lastname", "fullname", "emailaddress1"]] = own
    contacts.loc[row, ["telephone1", "mobilephone"]] = None
    changed = pa.Table.from_pandas(contacts, schema=table.schema, preserve_index=False)
    lake.write(changed, "silver", "contact", mode="overwrite")
    partner = previous.loc[previous["source_key"] == split, "customer_id"].iloc[0]
    account = previous.loc[(previous["customer_id"] == partner) & ~dataverse, "source_key"]
    return {"kept": a, "merged": b, "split": split, "account": account.iloc[0]}


@pytest.fixture(scope="module")
def increment(first, tmp_path_factory) -> tuple[Settings, dict[str, str]]:
    """DuckDB's first unify, then the next increment (new, changed and deleted rows;
    persons erased at the source) through silver, and a merge and a split made by hand
    (`_merge_and_split`, whose keys are returned too): unify is behind."""
    settings = _copy(first[0], tmp_path_factory.mktemp("spark_unify_increment"))
    previous = Lake(settings.lake).read_pandas("gold", "customer_source_map")
    generate_increment(settings)
    ingest_landing(settings)
    build_silver(settings)
    assert len(pd.read_parquet(settings.truth / "erased.parquet")), "the increment erased nobody"
    return settings, _merge_and_split(settings, previous)


@pytest.fixture(scope="module")
def after(increment, tmp_path_factory, spark):
    """(DuckDB's copy, Spark's copy, DuckDB's summary, Spark's summary): the increment
    unified by each engine, DuckDB incrementally, Spark wholly."""
    folder = tmp_path_factory.mktemp("spark_unify_after")
    settings = increment[0]
    duck, on_spark = _copy(settings, folder / "duckdb"), _copy(settings, folder / "spark")
    return duck, on_spark, duckdb_unify(duck), spark_unify(on_spark, spark)


def test_first_unify_equals_duckdb(first):
    duck, on_spark, summary = first
    assert_same_unify(duck, on_spark)
    lake = Lake(on_spark.lake)
    sources = set(lake.read_pandas("gold", "customer_source_map")["source"])
    assert sources == set(SOURCES)
    assert summary.records == lake.count("gold", "customer_source_map") == summary.unified
    assert summary.customers == lake.count("gold", "customer_profile") < summary.records
    report = summary.report
    assert report[report["section"] == "rule"]["count"].sum() > 0
    assert not lake.path(*SCRATCH).exists()


def test_after_an_increment_with_erasures_spark_equals_duckdb(first, increment, after):
    duck, on_spark, by_duckdb, by_spark = after
    ids = Lake(on_spark.lake).read_pandas("gold", "customer_source_map")
    ids = dict(zip(ids["source_key"], ids["customer_id"], strict=True))
    keys = increment[1]
    assert ids[keys["kept"]] == ids[keys["merged"]] and ids[keys["split"]] != ids[keys["account"]]
    assert by_duckdb.unified < by_spark.unified == by_spark.records  # DuckDB: the changes only
    assert by_spark.redirects == by_duckdb.redirects > 0
    before = set(Lake(first[0].lake).read_pandas("gold", "customer_source_map").customer_id)
    now = set(Lake(on_spark.lake).read_pandas("gold", "customer_source_map").customer_id)
    assert before - now, "no customer left the source map"
    assert_same_unify(duck, on_spark)


def test_both_engines_record_the_same_inputs(after):
    """The map and profile commits record the inputs as DuckDB's do; the state records
    them with the rules' digest, marked as the Spark engine's (keys only)."""
    duck, on_spark, _, _ = after
    inputs = lake_versions(Lake(on_spark.lake))
    inputs.pop("gold/customer_source_map")
    for where in TABLES[:2]:
        records = [last_record(Lake(s.lake), where) for s in (duck, on_spark)]
        assert records[0][0] == records[1][0] == inputs, where
    digest = state_digest(load_rules(on_spark.path(on_spark.unify_rules)))
    inputs_, meta = last_record(Lake(on_spark.lake), STATE)
    assert inputs_ == inputs and meta[STATE_KEY] == digest + KEYS_ONLY
    state = Lake(on_spark.lake).read_pandas(*STATE)
    assert list(state.columns) == ["source", "source_key"]
    assert len(state) == Lake(on_spark.lake).count("gold", "customer_source_map")


def test_an_unchanged_unify_of_either_engine_writes_nothing(after, spark):
    """Spark after Spark, DuckDB after Spark, Spark after DuckDB: no new Delta version of
    any table a unify writes, and the last report returned."""
    duck, on_spark, _, _ = after
    for settings, unify in (
        (on_spark, lambda s: spark_unify(s, spark)),
        (on_spark, duckdb_unify),
        (duck, lambda s: spark_unify(s, spark)),
    ):
        before = _versions(settings)
        summary = unify(settings)
        assert summary.unified == 0 and summary.redirects == 0
        assert _versions(settings) == before
        expected = Lake(settings.lake).read_pandas("gold", "unify_report")
        pd.testing.assert_frame_equal(summary.report, expected)


def test_duckdb_after_a_spark_unify_unifies_everything_and_agrees(after, tmp_path):
    """The Spark engine's state holds no hashes: after a change, DuckDB's next unify is a
    whole one (not one comparing with that state), equal to what Spark wrote."""
    _, on_spark, _, _ = after
    settings = _copy(on_spark, tmp_path / "copy")
    lake = Lake(settings.lake)
    before = lake.read_pandas("gold", "customer_source_map")
    # A new version of an input with the same rows: the inputs changed, the records not.
    lake.write(lake.read("silver", "contact"), "silver", "contact", mode="overwrite")
    summary = duckdb_unify(settings)
    assert summary.unified == summary.records == len(before)
    for where in TABLES:
        assert_same_table(Lake(on_spark.lake), lake, where)


def test_a_spark_failure_mid_build_leaves_every_table_as_it_was(increment, after, spark, tmp_path):
    """A worker failure while the profiles are merged (a merge attribute the records do
    not have), after records, matches, clusters and ids were computed: one line naming
    the step, no table written, the scratch removed. The rerun with the rules mended
    completes and equals DuckDB's unify."""
    settings = _copy(increment[0], tmp_path / "copy")
    rules = yaml.safe_load(settings.path(settings.unify_rules).read_text())
    rules["merge"]["most_recent"].append("no_such_attribute")
    (tmp_path / "unify.yaml").write_text(yaml.safe_dump(rules))
    broken = settings.model_copy(update={"unify_rules": tmp_path / "unify.yaml"})
    before = _versions(settings)

    with pytest.raises(SparkBuildError) as failed:
        spark_unify(broken, spark)

    said = str(failed.value)
    assert "\n" not in said
    assert said.startswith("unify: merging profiles failed on Spark (no table written): ")
    assert _versions(settings) == before
    assert not Lake(settings.lake).path(*SCRATCH).exists()
    spark_unify(settings, spark)
    assert_same_unify(after[0], settings)


def _graph_labels(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """The smallest node of each node's component, by scipy (the DuckDB engine's)."""
    left, right = (np.array([e[i] for e in edges], dtype=np.int64) for i in (0, 1))
    graph = coo_matrix((np.ones(len(edges)), (left, right)), shape=(n, n))
    components = scipy_components(graph, directed=False)[1]
    smallest = pd.Series(np.arange(n)).groupby(components).transform("min")
    return smallest.to_numpy()


def test_connected_components_of_chains_stars_and_isolated_nodes(spark, tmp_path):
    """A long chain whose ids zigzag (the smallest in the middle), stars whose centre is
    not their smallest node, a cycle, self-loops, a duplicated edge and nodes without
    edges: every node labelled with its component's smallest id, as scipy finds it; the
    same for a random sparse graph."""

    def keep(frame, name):
        frame.write.mode("overwrite").parquet(str(tmp_path / name))
        (tmp_path / name).mkdir(exist_ok=True)
        return spark.read.schema(frame.schema).parquet(str(tmp_path / name))

    chain = [40, 12, 33, 7, 28, 3, 19, 45, 2, 30, 41, 15, 22, 9, 36]
    edges = list(zip(chain, chain[1:], strict=False))
    edges += [(50, s) for s in (51, 55, 48, 60)] + [(70, 71), (71, 70), (70, 70), (80, 80)]
    edges += [(61, 62), (62, 63), (63, 61)]
    n = 100
    rng = np.random.default_rng(3)
    random_edges = [tuple(int(v) for v in rng.integers(n, 400, 2)) for _ in range(250)]
    found = {}
    for case, (graph, size) in {"hand-made": (edges, n), "random": (random_edges, 400)}.items():
        frame = spark.createDataFrame(pd.DataFrame(graph, columns=["src", "dst"]))
        nodes = spark.range(size).select("id")
        got = connected_components(frame, keep, nodes).toPandas().sort_values("id")
        assert got["id"].tolist() == list(range(size)), case
        assert got["label"].tolist() == _graph_labels(size, graph).tolist(), case
        found[case] = dict(zip(got["id"], got["label"], strict=True))
    hand = found["hand-made"]
    assert {hand[v] for v in chain} == {2}
    assert {hand[v] for v in (50, 51, 55, 48, 60)} == {48}
    assert hand[71] == hand[70] == 70 and hand[80] == 80 and hand[5] == 5
    assert {hand[v] for v in (61, 62, 63)} == {61}


def test_a_new_id_in_use_as_an_old_one_is_salted(spark, silver):
    """A cluster founded by a record whose `new_id` (and its first salt) is an old id
    still owned (a split after a merge can do it) gets the next salt, as `assign_ids`
    salts it; a founder without a clash keeps the unsalted id."""
    rules = load_rules(silver.path(silver.unify_rules))
    run = SparkUnify(silver, Lake(silver.lake), spark, rules, ("state", "test_scratch"))
    taken = [new_id("d365", "a"), new_id("d365", "a", 1)]
    spark.createDataFrame(pd.DataFrame({"old_id": taken})).createOrReplaceTempView("u_owner")
    founders = pd.DataFrame(
        {"cluster": [1, 2], "source": ["d365", "dataverse"], "source_key": ["a", "b"]}
    )
    got = _found(run, spark.createDataFrame(founders)).toPandas().sort_values("cluster")
    assert got["id"].tolist() == [new_id("d365", "a", 2), new_id("dataverse", "b")]


def test_a_generic_only_lake_through_the_engine_choice(tmp_path, sail_remote, spark):
    """A lake of the generic source alone (its records have no match field: one customer
    each), unified by `medallion.build.build_unify` with the settings naming Spark: Sail
    wrote the tables, equal to DuckDB's."""
    from c360ml.medallion.build import build_unify as on_engine

    base = make_settings(tmp_path / "base").model_copy(update={"sources": ("generic",)})
    generate_lake(base, customers=300, seed=3)
    ingest_landing(base)
    build_silver(base)
    duck, on_spark = _copy(base, tmp_path / "duckdb"), _copy(base, tmp_path / "spark")
    duckdb_unify(duck)
    summary = on_engine(
        on_spark.model_copy(update={"engine": "spark", "spark_remote": sail_remote})
    )
    history = Lake(on_spark.lake).delta("gold", "customer_source_map").history(1)[0]
    assert history["engineInfo"].startswith("sail")
    assert summary.customers == summary.records > 0
    assert_same_unify(duck, on_spark)


def test_a_sql_error_names_the_file_and_writes_nothing(increment, spark, tmp_path):
    settings = _copy(increment[0], tmp_path / "copy")
    sql = tmp_path / "sql"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipelines" / "sql", sql)
    (sql / "gold" / "unify_records_generic.sql").write_text("SELECT * FROM no_such_table\n")
    before = _versions(settings)

    with pytest.raises(SparkBuildError) as failed:
        spark_unify(settings.model_copy(update={"sql_dir": sql}), spark)

    said = str(failed.value)
    assert "\n" not in said
    assert said.startswith("unify: gold/unify_records_generic.sql fails on Spark: ")
    assert _versions(settings) == before


# ---------------------------------------------------------------- value frequencies (#32)

NAME_COMMON = {"field": "full_name", "per": "postal_code", "max_expected": 0.001,
               "require_any": ["email", "phone", "street"]}  # fmt: skip
PHONE_COMMON = {
    "field": "phone",
    "per": None,
    "max_expected": 1,
    "require_any": ["email", "street"],
}


def _rules_with_common(settings: Settings, folder: Path) -> Path:
    """The settings' rules with `common` on: the name rule per postal code (a threshold
    under which most of this lake's name links are on common names, some on rare ones),
    and a household's phone (without `per`) on the phone rule."""
    rules = yaml.safe_load(settings.path(settings.unify_rules).read_text())
    for rule in rules["rules"]:
        rule.update({"name_postal_code": {"common": NAME_COMMON},
                     "phone_last_name": {"common": PHONE_COMMON}}.get(rule["name"], {}))  # fmt: skip
    path = folder / "unify_common.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _rules_without_common(settings: Settings, folder: Path) -> Path:
    """The settings' rules less every `common` test."""
    rules = yaml.safe_load(settings.path(settings.unify_rules).read_text())
    for rule in rules["rules"]:
        rule.pop("common", None)
    path = folder / "unify_without_common.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _namesakes(settings: Settings) -> tuple[str, str]:
    """Two contacts given the lake's most common full name and postal code, each its own
    e-mail, no phone and a street of its own: no veto (no phone on both), so the name rule
    links them, unless its `common` test asks for an agreeing field. Their keys."""
    lake = Lake(settings.lake)
    table = lake.read("silver", "contact")
    contacts = table.to_pandas()
    emails = contacts["emailaddress1"].str.strip().str.lower()
    once = contacts[emails.map(emails.value_counts()).eq(1) & contacts["lastname"].notna()]
    first, last = contacts.groupby(["firstname", "lastname"]).size().idxmax()
    postal = contacts["address1_postalcode"].value_counts().idxmax()
    keys = once["contactid"].iloc[-2:].tolist()
    for n, key in enumerate(keys):
        row = contacts["contactid"] == key
        contacts.loc[row, ["firstname", "lastname", "fullname"]] = [first, last, f"{first} {last}"]
        contacts.loc[row, ["address1_postalcode", "address1_line1"]] = [
            postal,
            f"{n + 1} Nowhere Ln",
        ]
        contacts.loc[row, ["telephone1", "mobilephone"]] = None
    changed = pa.Table.from_pandas(contacts, schema=table.schema, preserve_index=False)
    lake.write(changed, "silver", "contact", mode="overwrite")
    return keys[0], keys[1]


@pytest.fixture(scope="module")
def common_first(silver, tmp_path_factory, spark):
    """(DuckDB's copy, Spark's copy, the namesakes' keys, the rules file, the rules without
    `common`): the silver lake
    with two namesakes made (`_namesakes`), first unified with the `common` tests on by
    each engine."""
    folder = tmp_path_factory.mktemp("spark_unify_common")
    base = _copy(silver, folder / "base")
    keys = _namesakes(base)
    default, rules = _rules_without_common(base, folder), _rules_with_common(base, folder)
    base = base.model_copy(update={"unify_rules": rules})
    duck, on_spark = _copy(base, folder / "duckdb"), _copy(base, folder / "spark")
    duckdb_unify(duck)
    spark_unify(on_spark, spark)
    return duck, on_spark, keys, rules, default


def _ids(settings: Settings) -> dict[str, str]:
    frame = Lake(settings.lake).read_pandas("gold", "customer_source_map")
    return dict(zip(frame["source_key"], frame["customer_id"], strict=True))


def _frequencies(settings: Settings) -> pd.DataFrame:
    frame = Lake(settings.lake).read_pandas(*FREQUENCIES)
    return frame.sort_values(["field", "value"]).reset_index(drop=True)


def test_with_common_tests_spark_equals_duckdb_and_keeps_the_same_frequencies(
    common_first, tmp_path
):
    """With `common` on (a name per postal code, a household phone): the map, profiles
    and report equal; the report's links on common and rare values of both rules equal
    and not empty; the namesakes (linked without the test: a whole DuckDB unify with the
    default rules) are two customers on both engines; the frequency state Spark counted
    equals DuckDB's, kept with the rules' digest as DuckDB keeps it."""
    duck, on_spark, (a, b), rules, without = common_first
    assert_same_unify(duck, on_spark)
    report = Lake(on_spark.lake).read_pandas("gold", "unify_report")
    bands = report[report["section"] == "rule by value frequency"]
    counts = bands.set_index(["name", "scope"])["count"]
    for rule in ("name_postal_code", "phone_last_name"):
        assert counts[(rule, "common value")] > 0 and counts[(rule, "rare value")] > 0, rule
    default = _copy(duck, tmp_path / "default").model_copy(update={"unify_rules": without})
    duckdb_unify(default)
    assert _ids(default)[a] == _ids(default)[b]
    for settings in (duck, on_spark):
        assert _ids(settings)[a] != _ids(settings)[b]
    pd.testing.assert_frame_equal(_frequencies(on_spark), _frequencies(duck))
    digest = state_digest(load_rules(rules))
    for settings in (duck, on_spark):
        assert last_record(Lake(settings.lake), FREQUENCIES)[1][STATE_KEY] == digest


def test_with_common_tests_spark_reads_the_frequencies_duckdb_kept(common_first, spark, tmp_path):
    """After a merge and a split (`_merge_and_split`) of DuckDB's lake, DuckDB unifies the
    changes and Spark (a copy of the same lake) all the records, both with the frequencies
    DuckDB's first build kept (neither writes them again): equal."""
    duck = _copy(common_first[0], tmp_path / "changed")
    _merge_and_split(duck, Lake(duck.lake).read_pandas("gold", "customer_source_map"))
    on_spark = _copy(duck, tmp_path / "spark")
    kept = Lake(duck.lake).version(*FREQUENCIES)
    by_duckdb, by_spark = duckdb_unify(duck), spark_unify(on_spark, spark)
    assert by_duckdb.unified < by_spark.unified == by_spark.records
    assert by_spark.redirects == by_duckdb.redirects > 0
    for settings in (duck, on_spark):
        assert Lake(settings.lake).version(*FREQUENCIES) == kept
    assert_same_unify(duck, on_spark)


@pytest.mark.parametrize("engine", ["duckdb", "spark"])
def test_with_common_tests_either_engine_reads_the_frequencies_spark_kept(
    common_first, engine, spark, tmp_path
):
    """After Spark's unify with `common` on, a new version of an input with the same rows:
    DuckDB (whose next unify is a whole one: Spark's state holds keys only) and Spark
    decide with the frequencies Spark kept, not counting them again: equal."""
    on_spark = common_first[1]
    settings = _copy(on_spark, tmp_path / "copy")
    lake = Lake(settings.lake)
    kept = lake.version(*FREQUENCIES)
    lake.write(lake.read("silver", "contact"), "silver", "contact", mode="overwrite")
    summary = duckdb_unify(settings) if engine == "duckdb" else spark_unify(settings, spark)
    assert summary.unified == summary.records > 0
    assert lake.version(*FREQUENCIES) == kept
    for where in TABLES:
        assert_same_table(Lake(on_spark.lake), lake, where)
