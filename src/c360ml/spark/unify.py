"""Unify on Spark: identity resolution as Spark work, equal to the DuckDB engine's unify
(`c360ml.medallion.unify`): the same rules, the same match fields, scores, clusters,
stable ids, redirects, merged profiles and report.

How the work is split:
- the records (`pipelines/sql/gold/unify_records*.sql`, the DuckDB engine's files) are
  read by Spark SQL from the silver tables; their match fields are computed on the
  workers by DuckDB's own function (`match_fields`, in `mapInPandas`);
- blocking is Spark SQL: junk values by a group-by, each rule's blocks by joins on its
  exact fields; exact rules link a block's records as stars (the report counts the same
  pairs within and across sources as `_stars` does), fuzzy rules pair all records of a
  block within the size limit, drop vetoed pairs in SQL and score the rest in a pandas
  UDF around DuckDB's scoring function (`fuzzy_pair_mask`: rapidfuzz, same thresholds);
- a rule's `common` test (value frequencies) runs the DuckDB engine's definitions: the
  values are hashed on the workers by `hash_fields` (with the match fields), counted by
  `frequency_sql` and flagged by `common_sql` and `common_pass_sql` (SQL text both
  engines run); the frequencies are the same state (`state/unify/frequencies`): those
  the last unify of either engine kept are read while they serve (`frequencies_kept`),
  and counted ones are written as DuckDB writes them, with the rules' digest;
- clusters are the connected components of the links, by min-label propagation with
  pointer jumping (`connected_components`), each round written to scratch Parquet so the
  plan never grows, until no label changes;
- ids follow `assign_ids`' rules in Spark SQL (an old id belongs to the cluster of its
  oldest record, a cluster keeps its oldest old id, the others are redirected), new ids
  are `new_id` (in a pandas UDF, salted on a clash with an old id);
- profiles are `merge_profiles`, run by `applyInPandas` on buckets of whole customers.
Only counts and small aggregates (the report's) reach the driver. The workers run
`c360ml.medallion.unify`'s functions (shipped by reference, not by value): they need the
c360ml wheel and what that module imports, rapidfuzz and scipy included, with pandas
and pyarrow for the pandas UDFs.

Spark reads the silver tables and the previous source map, and writes the outputs,
through `SparkTables` (`c360ml.spark.gold`): Delta by default (parquet for Apache Spark's
local mode in the tests); redirects are one append, which a first build (no old ids)
does not make. The scratch is parquet whatever the format; the state marks and commit
records go through `Lake` on the driver.

Incremental behaviour: a build whose inputs are those the last unify (of either engine)
recorded writes nothing (`current_summary`). Otherwise Spark matches the whole population
again, with the previous source map's ids kept: simpler than DuckDB's `unify_changes`,
and the outputs are equal (the incremental path equals a whole unify). Its state
(`state/unify/records`) holds the records' keys only (KEYS_ONLY), so DuckDB's next build
after a change unifies everything once, then incrementally again.

A failure: every intermediate result is written to scratch Parquet
(`state/unify_spark_scratch` under the lake root, a local folder or a container's prefix
the driver and the workers reach as they reach the lake's tables; removed after the
build) before any lake table is touched, so a Spark error in the work is one line (SparkBuildError) and every table is as it was.
The commits then follow DuckDB's order (state marked as being rewritten, map, profile,
redirects, report, state), so a build stopped among them is followed by a whole unify.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from c360ml.config import Settings
from c360ml.medallion.declarations import GoldModel, lake_table
from c360ml.medallion.gold import lake_versions
from c360ml.medallion.sql import sql_text
from c360ml.medallion.unify import (
    FREQUENCIES,
    KEYS_ONLY,
    MATCH_FIELDS,
    STATE,
    STATE_KEY,
    MatchRule,
    MergePolicy,
    RuleTotals,
    UnifyRules,
    UnifySummary,
    common_pass_sql,
    common_sql,
    current_summary,
    frequencies_kept,
    frequency_fields,
    frequency_sql,
    fuzzy_pair_mask,
    hash_fields,
    load_rules,
    mark_state_rewriting,
    match_fields,
    merge_profiles,
    new_id,
    report_frame,
    state_digest,
)
from c360ml.schemas import CustomerIdRedirects, CustomerProfile, CustomerSourceMap, columns
from c360ml.spark.gold import (
    DELTA,
    SparkBuildError,
    SparkTables,
    _first_line,
    _spark_errors,
    check_gold,
    keep_parquet,
)
from c360ml.storage.inputs import stamp
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SCRATCH = ("state", "unify_spark_scratch")  # this build's intermediate Parquet, removed after
MAX_ROUNDS = 100  # connected components: rounds before giving up (pointer jumping needs few)
BUCKET_RECORDS = 100_000  # records per applyInPandas call of `merge_profiles` (whole customers)
OUTPUTS = {
    "customer_source_map": CustomerSourceMap,
    "customer_profile": CustomerProfile,
}


@dataclass
class SparkUnify:
    """What the steps of one Spark unify share."""

    settings: Settings
    lake: Lake
    spark: SparkSession
    rules: UnifyRules
    scratch: tuple[str, ...]  # the lake folder of this build's scratch Parquet
    tables: SparkTables = DELTA  # how Spark reads and writes the lake's tables

    def read(self, where: tuple[str, ...]) -> DataFrame:
        """A lake table as Spark reads it (`tables`)."""
        return self.tables.read(self.spark, self.lake, where)

    def keep(self, frame: DataFrame, name: str) -> DataFrame:
        """`frame` computed once and written to scratch Parquet, read back (see
        `keep_parquet`)."""
        return keep_parquet(self.spark, frame, self.lake, (*self.scratch, name))

    def view(self, frame: DataFrame, name: str) -> DataFrame:
        """`frame` as the temp view `name` (the steps' SQL reads each other's results)."""
        frame.createOrReplaceTempView(name)
        return frame

    def sql(self, text: str) -> DataFrame:
        return self.spark.sql(text)

    def one(self, sql: str) -> tuple:
        """The one row of a small aggregate."""
        return tuple(self.spark.sql(sql).first())


@contextmanager
def _step(what: str) -> Iterator[None]:
    """A Spark error in a step of the work as one line; no lake table is written yet."""
    try:
        yield
    except _spark_errors() as exc:
        raise SparkBuildError(
            f"unify: {what} failed on Spark (no table written): {_first_line(exc)}"
        ) from exc


# ---------------------------------------------------------------- records


def _match_fields_of(hashed: list[str]) -> Callable[[Iterator[pd.DataFrame]], Iterator]:
    """The records of each batch with their match fields and the value hashes of `hashed`
    (`hash_fields`), on the workers."""

    def prepare(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield hash_fields(match_fields(batch.reset_index(drop=True)), hashed)

    return prepare


def read_records(run: SparkUnify) -> DataFrame:
    """The records to unify, as the DuckDB engine reads them (the same SQL files, over the
    silver tables as temp views), with a numeric `id`, the match fields and the value
    hashes the rules' `common` tests count (`h_<field>`), kept in scratch (view
    `u_records`). FileNotFoundError when no silver customer table exists."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    lake, names = run.lake, []
    if lake.exists("silver", "custtable") and lake.exists("silver", "contact"):
        names.append("gold/unify_records")
    if lake.exists("silver", "generic_transactions"):
        names.append("gold/unify_records_generic")
    if not names:
        raise FileNotFoundError(f"no silver customer tables under {lake.uri('silver')}")
    frames = []
    for name in names:
        text = sql_text(run.settings, name)
        for word in {w for w in re.findall(r"\w+", text) if w.startswith("silver_")}:
            if (where := lake_table(lake, word)) is not None:
                with _step(f"reading {'/'.join(where)}"):
                    run.read(where).createOrReplaceTempView(word)
        try:
            frame = run.spark.sql(text)
            frame.columns  # noqa: B018 (analysed now: the error names this file)
        except _spark_errors() as exc:
            raise SparkBuildError(f"unify: {name}.sql fails on Spark: {_first_line(exc)}") from exc
        frames.append(frame)
    with _step("reading the records"):
        records = frames[0]
        for frame in frames[1:]:
            records = records.unionByName(frame)
        hashed = frequency_fields(run.rules)
        fields = [StructField(f"m_{f}", StringType()) for f in MATCH_FIELDS]
        fields += [StructField(f"h_{f}", LongType()) for f in hashed]
        schema = StructType(records.schema.fields + fields)
        prepared = records.mapInPandas(_match_fields_of(hashed), schema)
        with_id = prepared.withColumn("id", sf.monotonically_increasing_id())
        return run.view(run.keep(with_id, "records"), "u_records")


# ---------------------------------------------------------------- matching


def _junk(run: SparkUnify) -> dict[str, int]:
    """Views `u_junk_<field>` (values shared by more records than junk_max_records, not
    matched on), and how many there are per field."""
    counts = {}
    for name in run.rules.junk_fields:
        junk = run.spark.sql(
            f"""SELECT m_{name} AS v FROM u_records WHERE m_{name} IS NOT NULL
                GROUP BY 1 HAVING COUNT(*) > {run.rules.junk_max_records}"""
        )
        counts[name] = run.view(run.keep(junk, f"junk_{name}"), f"u_junk_{name}").count()
    return counts


def value_frequencies(run: SparkUnify, records: int, digest: str) -> DataFrame | None:
    """View `u_frequencies`, the value counts the rules' `common` tests read: those kept
    by the last unify (of either engine) when they serve these records
    (`frequencies_kept`), else counted from the records by the DuckDB engine's SQL
    (`frequency_sql`). Returns the counted ones (for the build to keep), None when the
    kept ones serve or no rule has a `common` test."""
    fields = frequency_fields(run.rules)
    if not fields:
        return None
    if frequencies_kept(run.lake, run.rules, digest, records):
        run.view(run.read(FREQUENCIES), "u_frequencies")
        return None
    counted = run.keep(run.sql(frequency_sql("u_records", fields)), "frequencies")
    return run.view(counted, "u_frequencies")


def _usable(run: SparkUnify, rule: MatchRule) -> str:
    """The records a rule blocks: every exact field present, none a junk value."""
    present = " AND ".join(f"r.m_{f} IS NOT NULL" for f in rule.exact)
    guarded = [f for f in rule.exact if f in run.rules.junk_fields]
    anti = "".join(f" LEFT ANTI JOIN u_junk_{f} j_{f} ON r.m_{f} = j_{f}.v" for f in guarded)
    return f"SELECT r.* FROM u_records r{anti} WHERE {present}"


def exact_links(run: SparkUnify, rule: MatchRule) -> tuple[DataFrame, int, int]:
    """An exact rule's links (src, dst): each record of a block to its block's first
    (a star: the same clusters as every pair), and the report's pair counts within and
    across sources, as DuckDB's `_stars` counts them (a star per source, then one linking
    the sources' stars): records minus (block, source) groups; groups minus blocks."""
    keys = ", ".join(f"m_{f}" for f in rule.exact)
    run.view(run.spark.sql(_usable(run, rule)), f"u_usable_{rule.name}")
    links = run.spark.sql(
        f"""SELECT id AS src, MIN(id) OVER (PARTITION BY {keys}) AS dst
            FROM u_usable_{rule.name}"""
    ).where("src <> dst")
    records, groups, blocks = run.one(
        f"""SELECT COUNT(*), COUNT(DISTINCT {keys}, source), COUNT(DISTINCT {keys})
            FROM u_usable_{rule.name}"""
    )
    return links, int(records - groups), int(groups - blocks)


def _scorer(rule: MatchRule):
    """A pandas UDF: whether each pair of fuzzy values matches under `rule`."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("boolean")
    def matches(left: pd.Series, right: pd.Series) -> pd.Series:
        # One thread: Spark runs a task per core already.
        mask = fuzzy_pair_mask(rule, left.to_numpy(object), right.to_numpy(object), workers=1)
        return pd.Series(mask)

    return matches


def fuzzy_links(run: SparkUnify, rule: MatchRule) -> tuple[DataFrame, int, int, int, int | None]:
    """A fuzzy rule's matched pairs (src, dst), the pairs within and across sources, the
    blocks skipped for their size and (a rule with `common`) the pairs on a common value:
    every pair of a block of at most max_block_size records (counted with the records
    whose fuzzy field is missing, as `match_rule` counts them), not vetoed, passing the
    `common` test (`common_sql` per record over `u_frequencies`, `common_pass_sql` per
    pair: the DuckDB engine's SQL), scored by `fuzzy_pair_mask`."""
    from pyspark.sql import functions as sf

    keys = [f"m_{f}" for f in rule.exact]
    most, field = run.rules.max_block_size, f"m_{rule.fuzzy.field}"
    flag, flagged, common = "FALSE", "", ""
    if rule.common is not None:
        flags = run.sql(common_sql(rule.common, "u_records", "u_frequencies", "id"))
        run.view(run.keep(flags, f"common_{rule.name}"), f"u_common_{rule.name}")
        flag, flagged = "c.is_common", f" JOIN u_common_{rule.name} c ON c.id = u.id"
        common = f" AND {common_pass_sql(rule.common, 'is_common', 'm_{}', 'a', 'b')}"
    run.view(
        run.spark.sql(
            f"""SELECT u.*, COUNT(*) OVER (PARTITION BY {", ".join(keys)}) AS block_size,
                       {flag} AS is_common
                FROM ({_usable(run, rule)}) u{flagged}"""
        ),
        f"u_sized_{rule.name}",
    )
    skipped = run.one(
        f"SELECT COUNT(DISTINCT {', '.join(keys)}) FROM u_sized_{rule.name} "
        f"WHERE block_size > {most}"
    )[0]
    same_block = " AND ".join(f"a.{k} = b.{k}" for k in keys)
    differ = [f"a.m_{v} <> b.m_{v}" for v in rule.veto_if_all_differ]  # null: not vetoed
    veto = f" AND NOT COALESCE({' AND '.join(differ)}, FALSE)" if differ else ""
    candidates = run.spark.sql(
        f"""SELECT a.id AS src, b.id AS dst, a.source = b.source AS same,
                   a.is_common OR b.is_common AS common, a.{field} AS l, b.{field} AS r
            FROM u_sized_{rule.name} a JOIN u_sized_{rule.name} b
              ON {same_block} AND a.id < b.id
            WHERE a.block_size <= {most} AND a.{field} IS NOT NULL
              AND b.{field} IS NOT NULL{veto}{common}"""
    )
    scored = candidates.withColumn("hit", _scorer(rule)(sf.col("l"), sf.col("r")))
    found = scored.where("hit").select("src", "dst", "same", "common")
    pairs = run.keep(found, f"pairs_{rule.name}")
    pairs.createOrReplaceTempView(f"u_pairs_{rule.name}")
    within, across, on_common = run.one(
        f"SELECT COUNT_IF(same), COUNT_IF(NOT same), COUNT_IF(common) FROM u_pairs_{rule.name}"
    )
    on_common = int(on_common or 0) if rule.common is not None else None
    return pairs.select("src", "dst"), int(within), int(across), int(skipped), on_common


def match(run: SparkUnify) -> tuple[DataFrame, list[RuleTotals]]:
    """Every rule's links, unioned, and each rule's lines of the report."""
    with _step("finding junk values"):
        junk = _junk(run)
    links, totals = [], []
    for rule in run.rules.rules:
        guarded = {f: junk[f] for f in rule.exact if f in run.rules.junk_fields and junk[f]}
        with _step(f"matching rule {rule.name}"):
            if rule.fuzzy is None:
                found, within, across = exact_links(run, rule)
                skipped, common = 0, None
            else:
                found, within, across, skipped, common = fuzzy_links(run, rule)
        links.append(found)
        totals.append(RuleTotals(rule.name, within, across, guarded, skipped, common))
    union = links[0]
    for found in links[1:]:
        union = union.unionByName(found)
    return union, totals


# ---------------------------------------------------------------- clusters


def connected_components(
    edges: DataFrame,
    keep: Callable[[DataFrame, str], DataFrame],
    nodes: DataFrame | None = None,
    max_rounds: int = MAX_ROUNDS,
) -> DataFrame:
    """(id, label) for every node of `edges` (src, dst: longs, undirected) and of `nodes`
    (id), if given: label is the smallest id of its connected component (a node without
    edges is its own).

    Min-label propagation with pointer jumping: each round a node takes the smallest
    label among its own and its neighbours', then the label of that label (a node whose
    label is l jumps to l's label), so labels travel a path in a logarithmic number of
    rounds, not one hop per round. A label is always an id of the component no greater
    than the node's own; at the fixed point it is the same for neighbours, so for the
    whole component, and the component's smallest id keeps itself as label. Each round
    is kept (`keep`: written and read back) and compared with the one before: only a
    count of changed labels reaches the driver.
    """
    from pyspark.sql import functions as sf

    pairs = edges.select("src", "dst").where("src <> dst")
    both = pairs.unionByName(pairs.select(sf.col("dst").alias("src"), sf.col("src").alias("dst")))
    both = keep(both.distinct(), "cc_edges")
    labels = keep(
        both.groupBy("src").agg(sf.least(sf.col("src"), sf.min("dst")).alias("label")), "cc_0"
    ).withColumnRenamed("src", "id")
    for round_ in range(1, max_rounds + 1):
        seen = (
            both.join(
                labels.select(sf.col("id").alias("dst"), sf.col("label").alias("seen")), "dst"
            )
            .groupBy("src")
            .agg(sf.min("seen").alias("seen"))
            .withColumnRenamed("src", "id")
        )
        step = labels.join(seen, "id").select("id", sf.least("label", "seen").alias("label"))
        jumped = step.select("id", sf.col("label").alias("via")).join(
            step.select(sf.col("id").alias("via"), sf.col("label").alias("root")), "via"
        )
        kept = keep(jumped.select("id", sf.col("root").alias("label")), f"cc_{round_}")
        changed = (
            kept.join(labels.withColumnRenamed("label", "was"), "id").where("label <> was").count()
        )
        labels = kept
        if not changed:
            log.info("unify on Spark: clusters found in %d rounds", round_)
            if nodes is None:
                return labels
            alone = nodes.select("id").join(labels, "id", "left_anti")
            return labels.unionByName(alone.select("id", sf.col("id").alias("label")))
    raise SparkBuildError(
        f"unify: connected components did not settle in {max_rounds} rounds (no table written)"
    )


# ---------------------------------------------------------------- ids


def _new_ids():
    """A pandas UDF: `new_id(source, source_key, salt)` per founder."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def ids(source: pd.Series, key: pd.Series, salt: pd.Series) -> pd.Series:
        made = [new_id(s, k, int(n)) for s, k, n in zip(source, key, salt, strict=True)]
        return pd.Series(made, dtype=object)

    return ids


def _previous(run: SparkUnify) -> None:
    """View `u_previous`: the source map the last unify wrote (empty before the first)."""
    if run.lake.exists("gold", "customer_source_map"):
        run.read(("gold", "customer_source_map")).createOrReplaceTempView("u_previous")
        return
    run.spark.sql(
        "SELECT CAST(NULL AS STRING) AS source, CAST(NULL AS STRING) AS source_key, "
        "CAST(NULL AS STRING) AS customer_id WHERE FALSE"
    ).createOrReplaceTempView("u_previous")


def _found(run: SparkUnify, founders: DataFrame) -> DataFrame:
    """(cluster, id): the new id of each cluster that keeps no old id, `new_id` of its
    oldest record, salted (1, 2, ...) while it is an old id still in use, as
    `assign_ids` salts it. A clash is rare: the loop usually ends at once."""
    from pyspark.sql import functions as sf

    ids = _new_ids()
    used = run.spark.table("u_owner").select(sf.col("old_id").alias("id"))
    founded = founders.withColumn("salt", sf.lit(0))
    founded = run.keep(founded.withColumn("id", ids("source", "source_key", "salt")), "found_0")
    for salt in range(1, MAX_ROUNDS + 1):
        clash = founded.join(used, "id", "left_semi")
        if not clash.count():
            return founded.select("cluster", "id")
        salted = clash.withColumn("salt", sf.col("salt") + 1)
        salted = salted.withColumn("id", ids("source", "source_key", "salt"))
        kept = founded.join(clash.select("cluster"), "cluster", "left_anti")
        founded = run.keep(kept.unionByName(salted), f"found_{salt}")
    raise SparkBuildError(f"unify: no free customer_id after {MAX_ROUNDS} salts")


def assign_customer_ids(run: SparkUnify, labels: DataFrame, today: pd.Timestamp) -> None:
    """Views `u_map` (id, source, source_key, customer_id) and `u_redirects`, by
    `assign_ids`' rules: an old id belongs to the cluster holding its oldest record
    (created_ts, missing last; source; source_key), a cluster keeps the oldest of the old
    ids it owns and the others are redirected to it, a cluster owning none gets a new id."""
    from pyspark.sql import functions as sf

    spark = run.spark
    _previous(run)
    run.view(labels, "u_labels")
    ranked = spark.sql(
        """SELECT x.id, x.source, x.source_key, c.label AS cluster, p.customer_id AS old_id,
                  named_struct('late', x.created_ts IS NULL, 'ts', x.created_ts,
                               'source', x.source, 'key', x.source_key) AS age
           FROM u_records x JOIN u_labels c ON c.id = x.id
           LEFT JOIN u_previous p ON p.source = x.source AND p.source_key = x.source_key"""
    )
    run.view(run.keep(ranked, "ranked"), "u_ranked")
    owner = spark.sql(
        """SELECT old_id, min_by(cluster, age) AS cluster, MIN(age) AS age FROM u_ranked
           WHERE old_id IS NOT NULL GROUP BY old_id"""
    )
    run.view(run.keep(owner, "owner"), "u_owner")
    chosen = spark.sql(
        """SELECT cluster, min_by(old_id, named_struct('age', age, 'id', old_id)) AS id
           FROM u_owner GROUP BY cluster"""
    )
    run.view(run.keep(chosen, "chosen"), "u_chosen")
    founders = spark.sql(
        """SELECT r.cluster, min_by(r.source, r.age) AS source,
                  min_by(r.source_key, r.age) AS source_key
           FROM u_ranked r LEFT ANTI JOIN u_chosen c ON c.cluster = r.cluster
           GROUP BY r.cluster"""
    )
    run.view(run.spark.table("u_chosen").unionByName(_found(run, founders)), "u_ids")
    mapped = spark.sql(
        """SELECT r.id, r.source, r.source_key, i.id AS customer_id
           FROM u_ranked r JOIN u_ids i ON i.cluster = r.cluster"""
    )
    run.view(run.keep(mapped, "map"), "u_map")
    redirects = spark.sql(
        """SELECT o.old_id AS retired_id, c.id AS surviving_id FROM u_owner o
           JOIN u_chosen c ON c.cluster = o.cluster WHERE o.old_id <> c.id"""
    ).select(
        "retired_id",
        "surviving_id",
        sf.lit(today.to_pydatetime()).alias("redirected_at"),
        sf.lit("merge").alias("reason"),
    )
    run.view(run.keep(redirects, "redirects"), "u_redirects")


# ---------------------------------------------------------------- profiles and report


def _merger(policy: MergePolicy) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """`merge_profiles` of one bucket of whole customers (on the workers)."""

    def merge(records: pd.DataFrame) -> pd.DataFrame:
        records = records.reset_index(drop=True)
        return merge_profiles(records, records["customer_id"], policy)

    return merge


def _profile_ddl() -> str:
    types = {"created_ts": "timestamp", "source_count": "bigint"}
    return ", ".join(f"{c} {types.get(c, 'string')}" for c in columns(CustomerProfile))


def merge_customer_profiles(run: SparkUnify, records: int) -> None:
    """View `u_profile`: one profile per customer_id by `merge_profiles`, which sees all
    the records of a customer at once: the records are grouped in buckets of whole
    customers (a hash of the id), about BUCKET_RECORDS records each."""
    policy = run.rules.merge
    attributes = list(dict.fromkeys([*policy.most_recent, *policy.by_source_priority]))
    buckets = max(1, -(-records // BUCKET_RECORDS))
    wanted = ", ".join(f"r.{a}" for a in attributes)
    bucketed = run.spark.sql(
        f"""SELECT m.customer_id, r.source, r.source_key, r.created_ts, r.modified_ts, {wanted},
                   pmod(xxhash64(m.customer_id), {buckets}) AS bucket
            FROM u_records r JOIN u_map m ON m.id = r.id"""
    )
    merged = bucketed.groupBy("bucket").applyInPandas(_merger(policy), _profile_ddl())
    run.view(run.keep(merged, "profile"), "u_profile")


def unify_report(run: SparkUnify, totals: list[RuleTotals]) -> pd.DataFrame:
    """The report (`report_frame`), from the rules' counts and the cluster-size histogram
    (one row per distinct size reaches the driver)."""
    import numpy as np

    sizes = run.spark.sql(
        """SELECT size, COUNT(*) AS n FROM
             (SELECT COUNT(*) AS size FROM u_map GROUP BY customer_id) GROUP BY size"""
    ).collect()
    histogram = np.zeros(max((int(r["size"]) for r in sizes), default=0) + 1, dtype=np.int64)
    for row in sizes:
        histogram[int(row["size"])] = int(row["n"])
    return report_frame(totals, histogram)


# ---------------------------------------------------------------- the build


def _checked(run: SparkUnify, name: str, view: str) -> DataFrame:
    """A staged output checked against its gold schema (`check_gold`: counts only), its
    columns cast to the declared types."""
    from c360ml.medallion.checks import sql_checks

    schema = OUTPUTS[name]
    model = GoldModel(name=name, schema=schema, description=name, sql={}, reads=())
    check_gold(run.spark, model, view)
    return run.spark.sql(f"SELECT {sql_checks(schema, 'spark').cast_sql()} FROM {view}")


@dataclass
class _Outputs:
    """What `unify` computed: the checked map and profiles (read from scratch), the
    report, and counts."""

    tables: dict[str, DataFrame]
    report: pd.DataFrame
    records: int
    redirects: int
    frequencies: DataFrame | None = None  # counted by this build: kept with the state


def unify(run: SparkUnify, today: pd.Timestamp, digest: str) -> _Outputs:
    """Every output computed and kept in scratch (views `u_map`, `u_profile`,
    `u_redirects`), checked; no lake table is written here."""
    records = read_records(run)
    with _step("reading the records"):
        count = records.count()
    with _step("counting value frequencies"):
        frequencies = value_frequencies(run, count, digest)
    links, totals = match(run)
    with _step("clustering"):
        labels = connected_components(links, run.keep, run.spark.table("u_records"))
    with _step("assigning customer ids"):
        assign_customer_ids(run, labels, today)
        redirects = run.spark.table("u_redirects").count()
    with _step("merging profiles"):
        merge_customer_profiles(run, count)
    with _step("counting the report and checking the outputs"):
        report = unify_report(run, totals)
        views = {"customer_source_map": "u_map", "customer_profile": "u_profile"}
        tables = {name: _checked(run, name, view) for name, view in views.items()}
    return _Outputs(tables, report, count, redirects, frequencies)


def write_outputs(run: SparkUnify, done: _Outputs, inputs: dict, digest: str) -> None:
    """The commits, in the DuckDB engine's order: the state marked as being rewritten,
    the map and profiles (recording the inputs), redirects appended, the report, the
    value frequencies when this build counted them (recording the rules, as DuckDB's:
    either engine's next build reads them), the state (the records' keys, recording the
    inputs and the rules) last."""
    spark, lake, tables, meta = run.spark, run.lake, run.tables, stamp(inputs)
    mark_state_rewriting(lake)
    for name, rows in done.tables.items():
        tables.write(rows, lake, ("gold", name), meta)
    if done.redirects:
        cast = ", ".join(columns(CustomerIdRedirects))
        redirects = spark.sql(f"SELECT {cast} FROM u_redirects")
        tables.append(redirects, lake, ("gold", "customer_id_redirects"), {})
    tables.write(spark.createDataFrame(done.report), lake, ("gold", "unify_report"), {})
    if done.frequencies is not None:  # before the state they go with, as DuckDB keeps them
        tables.write(done.frequencies, lake, FREQUENCIES, stamp(inputs, **{STATE_KEY: digest}))
    keys = spark.sql("SELECT source, source_key FROM u_records")
    state = stamp(inputs, **{STATE_KEY: digest + KEYS_ONLY})
    tables.write(keys, lake, STATE, state)


@writes_lake("build unify")
def build_unify(
    settings: Settings, spark: SparkSession, tables: SparkTables = DELTA
) -> UnifySummary:
    """silver -> unify on Spark: the source map, profiles, redirects and report, equal to
    the DuckDB engine's; nothing when the last unify (of either engine) was made from the
    current inputs with these rules. Spark reads and writes the lake's tables through
    `tables` (Delta by default); the state marks and commit records go through `Lake`."""
    started = time.perf_counter()
    lake = Lake(settings.lake)
    rules = load_rules(settings.path(settings.unify_rules))
    digest = state_digest(rules)
    inputs = lake_versions(lake)
    inputs.pop("gold/customer_source_map", None)  # our own output
    if (current := current_summary(lake, digest, inputs, started)) is not None:
        return current
    lake.delete_folder(*SCRATCH)  # a stopped build's leftovers
    run = SparkUnify(settings, lake, spark, rules, SCRATCH, tables)
    try:
        done = unify(run, pd.Timestamp.now(tz="UTC").floor("us"), digest)
        write_outputs(run, done, inputs, digest)
    finally:
        lake.delete_folder(*SCRATCH)
    return UnifySummary(
        done.report,
        customers=lake.count("gold", "customer_profile"),
        records=done.records,
        redirects=done.redirects,
        seconds=time.perf_counter() - started,
        unified=done.records,
    )
