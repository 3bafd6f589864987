"""Features, measures, populations, batch scores and training's frames on Spark: the
refresh's snapshot and scoring and training's matrix as Spark work, from the same saved
definitions as the DuckDB engine.

What runs where:
- the lake's gold Delta tables are read by Spark as the `gold_<table>` relations
  (`c360ml.features.asof.GOLD_RELATIONS`, through `SparkTables`: Delta by default), and
  the as-of SQL of `c360ml.features.asof` runs in Spark's dialect (`SPARK`): the session's
  relations once (`session_statements`), the view at as_of (`view_statements`), the
  active population, the buyers, the labels and RFM (`purchasers`, `labels_sql`,
  `population_sql`, `rfm_sql`);
- every feature and measure is the compiled aggregate `c360ml.features.aggregates`
  generates (`_aggregate` of its Featuretools definition), the per-table scans of
  `aggregate_view` joined to the population in one Spark query
  (`c360ml.features.aggregates.request_sql`): the DuckDB engine lines those scans up with
  the ids in pandas, which on Spark would bring each scan to the driver. A feature or
  measure the SQL generator cannot express (and a user's SQL feature) is refused before
  it is computed, in one line naming it (`SparkFeatureError`): the DuckDB engine
  computes those with Featuretools on the view's rows, which at a cluster's scale would
  collect the lake to the driver;
- batch scoring is `mapInPandas` around `c360ml.model.scoring.score` with the champion's
  bundle, whose files travel to the workers inside the function (bytes: Spark Connect has
  no broadcast variables; a bundle is a booster and a few small JSON files). The workers
  need the c360ml wheel (the function and scoring are shipped by reference); Sail runs them
  in its own process. The features and the scores come out of one Spark pass;
- training (`training_frames`, the Spark side of
  `c360ml.model.pipeline.prepare_training`): a session of the sampled customers, their
  labels and RFM, the candidate definitions derived from the spec on Spark's view
  (`derive_features`: Featuretools is given the view's schema, categories and top values
  by Spark, as the DuckDB engine gives them) and the matrix a cutoff at a time
  (`population_features`).

What reaches the driver: in the refresh, counts (`measures_and_scores`: the measures,
the features and the scores are written by Spark, `replace_as_of_on_spark`, to the same
tables with the same commit records as the DuckDB engine's `c360ml.steps.replace_as_of`,
so either engine's next refresh keeps what the other wrote), and the refresh's later
steps get this as_of's churn_scores as a Spark DataFrame, whose counts, CI-D export and
drift are Spark work too (`c360ml.spark.outputs`); in `c360ml build
measures` (`snapshot_profiles`), the ids and the measures; in training, the labels, RFM
and sampled matrix, which XGBoost is fitted on there.

The values equal the DuckDB engine's. Spark's sums are not compensated, DuckDB's are: the
measures differ in their last bits, the features not at all, since both engines encode
sums, means and deviations on a grid the order of the additions does not reach
(`c360ml.features.aggregates.encoded`). tests/spark/test_features.py checks the
features, the measures and the scores against the DuckDB refresh on the same lake,
tests/spark/test_training.py training's frames against DuckDB's.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from c360ml import progress
from c360ml.config import Settings
from c360ml.features import asof
from c360ml.features.aggregates import LINE_ID, Aggregate, request_sql
from c360ml.features.asof import CUSTOMER_ID, GOLD_RELATIONS, NEEDED, SPARK, AsOfSql, LakeGold
from c360ml.features.gold import GOLD_TABLES
from c360ml.schemas import Orders, SupportCases
from c360ml.spark.gold import (
    DELTA,
    SparkBuildError,
    SparkTables,
    _first_line,
    _spark_errors,
    keep_parquet,
    write_delta,
)
from c360ml.storage.lake import Lake
from c360ml.timestamps import utc

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from c360ml.features import ChurnConfig, FeatureSet, Measure
    from c360ml.model.pipeline import TrainingFrames
    from c360ml.model.scoring import ModelBundle
    from c360ml.refresh import Snapshot
    from c360ml.steps import StepResult

log = logging.getLogger(__name__)

ACTIVE = "c360ml_active"  # customer_id of the active population at as_of
KEYS = "c360ml_keys"  # customer_id of the training population at one cutoff
PROFILES = "c360ml_profiles"  # customer_id of every profile in the view
MEASURES = "c360ml_measures"  # the refresh's customer_measures rows at as_of
SCORED = "c360ml_scored"  # customer_id, the features and the scores of the active profiles
SCORES = "c360ml_scores"  # the refresh's churn_scores rows at as_of
SCRATCH = ("state", "features_spark_scratch")  # a pass's kept relations (Parquet), removed after
# The relations computed once and kept (`SparkAsOf.keep`): those DuckDB's engine stores
# that are read more than once, and the view's activity tables the aggregates scan.
KEPT = frozenset(
    [r for _, *made in asof.HISTORIES.values() for r in made]
    + [asof.CANDIDATES, "orders", "order_lines", "support_cases", ACTIVE]
)
_DAY_NS = 86_400 * 10**9
_SPARK_TYPES = {  # Arrow type of a declared gold column -> Spark SQL type
    "string": "STRING",
    "double": "DOUBLE",
    "int64": "BIGINT",
    "bool": "BOOLEAN",
    "timestamp[us, tz=UTC]": "TIMESTAMP",
}


class SparkFeatureError(SparkBuildError):
    """A feature or measure the Spark engine does not compute, or Spark failed the
    feature work: the message is the one line a user is shown, naming it."""


# ---------------------------------------------------------------- definitions -> SQL


def plan_features(fs: FeatureSet) -> list[Aggregate]:
    """fs's features as compiled aggregates, in fs.names order; SparkFeatureError naming
    the first one the SQL cannot express (a user's SQL feature included)."""
    from c360ml.features import btyd, custom
    from c360ml.features.dfs import _load

    for sql in custom.definitions(fs.meta):
        raise SparkFeatureError(
            f"feature {sql.name!r} is a SQL feature (sql_features:), which only the DuckDB "
            "engine computes; drop it from the spec or use --engine duckdb"
        )
    for name in btyd.feature_names(fs.meta):
        raise SparkFeatureError(BTYD_REFUSED.format(name=name))
    return _planned(_load(fs), "feature")


BTYD_REFUSED = (
    "feature {name!r} is a BTYD feature (btyd: enabled in the spec), which only the DuckDB "
    "engine computes; set btyd: {{enabled: false}} or use --engine duckdb"
)


def plan_measures(measures: list[Measure]) -> list[Aggregate]:
    """The measures as compiled aggregates (their Featuretools definitions made on the
    view's declared columns, `empty_view`); SparkFeatureError naming one the SQL cannot
    express."""
    from c360ml.features.dfs import _entityset, measure_features

    return _planned(measure_features(_entityset(empty_view()), measures), "measure")


def empty_view() -> dict[str, pd.DataFrame]:
    """The view's relations as empty activity frames of the declared gold columns (what
    `AsOfSql.frames(rows=False)` gives the DuckDB engine): the column types Featuretools
    makes measure definitions on, known before any engine runs."""
    from c360ml.features.asof import _empty

    gold = {entity: _empty(model).to_pandas() for entity, (_, model) in GOLD_TABLES.items()}
    sources = {"order_lines": ("order_lines", "orders")}
    out = {}
    for name in asof.VIEW:
        columns = {}
        for column in asof.VIEW_COLUMNS[name]:
            found = [gold[s][column] for s in sources.get(name, (name,)) if column in gold[s]]
            columns[column] = found[0] if found else pd.Series([], dtype=bool)  # is_purchase
        out[name] = pd.DataFrame(columns)
    out["orders"] = out["orders"].drop(columns=[Orders.status])
    lines = out["order_lines"].drop(columns=[Orders.customer_id, Orders.order_ts])
    lines.insert(0, LINE_ID, np.arange(len(lines)))
    out["order_lines"] = lines
    return out


def _planned(features: list, kind: str) -> list[Aggregate]:
    from c360ml.features.dfs import _aggregate

    plans = []
    for feature in features:
        plan = _aggregate(feature)
        if plan is None:
            raise SparkFeatureError(
                f"{kind} {feature.get_name()!r}: the SQL generator cannot express it, and the "
                "Spark engine does not compute with Featuretools (that would collect the "
                f"view's rows to the driver); drop the {kind} or use --engine duckdb"
            )
        plans.append(plan)
    return plans


# ---------------------------------------------------------------- the as-of SQL on Spark


def register_gold(spark: SparkSession, lake: Lake, tables: SparkTables = DELTA) -> None:
    """The lake's gold tables as the `gold_<table>` relations the as-of SQL reads; a
    table the lake lacks is an empty relation of its declared columns (as DuckDB's engine
    registers it). SparkFeatureError naming a table that lacks a needed column."""
    from c360ml.features.asof import _empty

    for entity, (table, model) in GOLD_TABLES.items():
        relation = GOLD_RELATIONS[entity]
        if not lake.exists("gold", table):
            schema = ", ".join(
                f"`{f.name}` {_SPARK_TYPES.get(str(f.type), 'STRING')}"
                for f in _empty(model).schema
            )
            spark.createDataFrame([], schema).createOrReplaceTempView(relation)
            continue
        frame = tables.read(spark, lake, ("gold", table))
        missing = sorted(set(NEEDED[entity]) - set(frame.columns))
        if missing:
            raise SparkFeatureError(f"gold table {table} lacks column(s) {missing}")
        frame.createOrReplaceTempView(relation)


class SparkAsOf:
    """A Spark session that reads gold through the as-of SQL: gold registered
    (`register_gold`), the session's relations made (`session_statements`), the view at a
    cutoff (`build_view`), and the populations and labels as queries over them.

    The relations DuckDB's engine stores (`KEPT`: the statuses, the candidate purchases,
    the view's orders, lines and cases, the active population) are computed once and kept
    in scratch Parquet in the lake's folder `scratch` (what follows reads them, not the plans that made
    them: Sail's cache is a no-op, and the status relations are read many times over), as
    `c360ml.spark.unify` keeps its steps. Use as a context manager: the scratch is removed
    on exit."""

    def __init__(
        self,
        spark: SparkSession,
        lake: Lake,
        scratch: tuple[str, ...],
        tables: SparkTables = DELTA,
        customers: pd.Index | None = None,
    ) -> None:
        self.spark, self.lake, self.scratch = spark, lake, scratch
        self.view_at: pd.Timestamp | None = None
        self.restricted = customers is not None  # a session of these customers only
        self._kept = 0
        try:
            register_gold(spark, lake, tables)
            if customers is not None:  # asof.SAMPLE, and the views' asof.RESTRICTION
                self.register_ids(asof.SAMPLE, customers)
                self.register_ids(asof.RESTRICTION, customers)
            self._run(asof.session_statements(self.restricted, SPARK))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SparkAsOf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lake.delete_folder(*self.scratch)

    def _run(self, statements: list[str]) -> None:
        """Each statement, then its relation kept when it is one of `KEPT`."""
        for statement in statements:
            made = re.match(r"CREATE OR REPLACE TEMP VIEW (\w+) AS", statement)
            try:
                self.spark.sql(statement)
                if made and made.group(1) in KEPT:
                    self.keep(made.group(1))
            except _spark_errors() as exc:
                raise SparkFeatureError(f"as-of SQL failed on Spark: {_first_line(exc)}") from exc

    def keep(self, relation: str) -> None:
        """The relation computed once, written to scratch Parquet and read back under its
        name (read with its schema: an empty result is written as no file at all)."""
        frame = self.spark.table(relation)
        self._kept += 1  # a new folder: a relation kept again may be read by an older one
        where = (*self.scratch, f"{self._kept}_{relation}")
        keep_parquet(self.spark, frame, self.lake, where).createOrReplaceTempView(relation)

    def register_ids(self, relation: str, ids: pd.Index) -> None:
        """customer_id of `ids` as the relation `relation` (kept: a plan holding the ids
        would carry them to the server with every query that reads it)."""
        frame = pd.DataFrame({CUSTOMER_ID: np.asarray(ids, dtype=object).astype(str)})
        rows = self.spark.createDataFrame(frame, f"`{CUSTOMER_ID}` STRING")
        rows.createOrReplaceTempView(relation)
        self.keep(relation)

    def build_view(self, t: pd.Timestamp) -> None:
        """The view at t (customers, orders, order_lines, support_cases, products) for the
        queries that follow; the profiles of it as the relation `PROFILES`."""
        t = utc(t)
        if self.view_at == t:
            return
        self._run(asof.view_statements(t, self.restricted, SPARK))
        self._run([SPARK.alias(PROFILES, f"SELECT DISTINCT {CUSTOMER_ID} FROM customers")])
        self.view_at = t

    def ids(self, sql: str) -> pd.Index:
        """customer_id of a query's rows, sorted (the one column that reaches the driver)."""
        rows = self.spark.sql(f"SELECT {CUSTOMER_ID} FROM ({sql}) q").toPandas()
        return pd.Index(np.sort(rows[CUSTOMER_ID].to_numpy(dtype=str)).astype(object))

    def profile_ids(self) -> pd.Index:
        """customer_id of every profile in the view (`build_view` first), sorted."""
        return self.ids(f"SELECT {CUSTOMER_ID} FROM {PROFILES}")

    def activate(self, t: pd.Timestamp, cfg: ChurnConfig) -> None:
        """The active population at t, customers with a purchase in (t - L, t], as the
        relation `ACTIVE`."""
        t = utc(t)
        self._run([SPARK.alias(ACTIVE, asof.purchasers(t - cfg.lookback, t, SPARK))])

    def buyers(self, t: pd.Timestamp) -> pd.Index:
        """Customers with a purchase at or before t, sorted."""
        return self.ids(asof.purchasers(None, utc(t), SPARK))

    def labels(self, cutoffs: list[pd.Timestamp], cfg: ChurnConfig) -> pd.DataFrame:
        """customer_id, cutoff_time, label (int8) of the active population at each
        cutoff, as `AsOfSql.labels` gives them."""
        cutoffs = asof._cutoffs(cutoffs)
        rows = self.spark.sql(asof.labels_sql(cutoffs, cfg, SPARK)).toPandas()
        out = asof._keyed(rows, cutoffs)
        out[asof.LABEL] = rows[asof.LABEL].to_numpy().astype(np.int8)
        return out

    def population(self, cutoffs: list[pd.Timestamp], cfg: ChurnConfig) -> pd.DataFrame:
        """customer_id, cutoff_time of the active population at each cutoff."""
        cutoffs = asof._cutoffs(cutoffs)
        rows = self.spark.sql(asof.population_sql(cutoffs, cfg, SPARK)).toPandas()
        return asof._keyed(rows, cutoffs)

    def rfm(self, cutoffs: list[pd.Timestamp], lookback: pd.Timedelta) -> pd.DataFrame:
        """Recency, frequency and monetary value at each cutoff, as `AsOfSql.rfm` gives
        them (float32)."""
        cutoffs = asof._cutoffs(cutoffs)
        rows = self.spark.sql(asof.rfm_sql(cutoffs, lookback, SPARK)).toPandas()
        out = asof._keyed(rows, cutoffs)
        t_ns = np.array([t.value for t in cutoffs], dtype=np.int64)[rows["cutoff"].to_numpy()]
        last = asof._as_utc_us(rows["last_ts"]).dt.as_unit("ns").array.asi8
        out["recency_days"] = ((t_ns - last) / _DAY_NS).astype(np.float32)
        out["frequency_365d"] = rows["n"].to_numpy(dtype=np.float64).astype(np.float32)
        net = rows["net"].fillna(0.0).to_numpy(dtype=np.float64)
        out["monetary_365d"] = net.astype(np.float32)
        return out

    # -- what `derive_feature_set` reads of the view (`_SchemaSource`)

    def latest_time(self) -> pd.Timestamp | None:
        """The latest event or status change of the session's customers."""
        sql = (
            f"SELECT MAX(t) AS t FROM (SELECT MAX({Orders.order_ts}) AS t FROM {asof.ORDERS} "
            f"UNION ALL SELECT MAX({SupportCases.created_ts}) FROM {asof.CASES} "
            f"UNION ALL SELECT MAX(valid_from) FROM {asof.HISTORIES['orders'][1]} "
            f"UNION ALL SELECT MAX(valid_from) FROM {asof.HISTORIES['support_cases'][1]}) m"
        )
        value = self.spark.sql(sql).toPandas()["t"].iloc[0]
        return None if pd.isna(value) else utc(pd.Timestamp(value))

    def frames(self, rows: int) -> dict[str, pd.DataFrame]:
        """Up to `rows` rows of each relation of the built view as activity frames (the
        first orders by id with their lines, the first rows by key of the others), as
        `AsOfSql.frames(rows)` gives them: the column types Featuretools derives on."""
        if self.view_at is None:
            raise RuntimeError("build_view(t) first")
        n = int(rows)
        first = f"SELECT {Orders.order_id} FROM orders ORDER BY 1 LIMIT {n}"
        queries = {name: f"SELECT * FROM {name} ORDER BY 1 LIMIT {n}" for name in asof.VIEW}
        queries["orders"] = f"SELECT * FROM orders WHERE {Orders.order_id} IN ({first})"
        queries["order_lines"] = f"SELECT * FROM order_lines WHERE {Orders.order_id} IN ({first})"
        out = {name: self.spark.sql(sql).toPandas() for name, sql in queries.items()}
        for name, cols in asof.TIMESTAMPS.items():
            for column in cols:
                out[name][column] = asof._as_utc_us(out[name][column])
        out["orders"] = out["orders"].drop(columns=[Orders.status])
        lines = out["order_lines"].drop(columns=[Orders.customer_id, Orders.order_ts])
        lines.insert(0, LINE_ID, np.arange(len(lines)))
        out["order_lines"] = lines
        return out

    def distinct(self, relation: str, column: str) -> list:
        """The distinct non-null values of a column of the built view."""
        c = SPARK.quote(column)
        rows = self.spark.sql(f"SELECT DISTINCT {c} AS v FROM {relation} WHERE {c} IS NOT NULL")
        return rows.toPandas()["v"].tolist()

    def top_values(self, relation: str, column: str, n: int) -> list:
        """The n most frequent non-null values of a column of the built view (ties: the
        lesser value first)."""
        c = SPARK.quote(column)
        sql = (  # the count a column: Sail does not order by an aggregate
            f"SELECT v FROM (SELECT {c} AS v, COUNT(*) AS n FROM {relation} WHERE {c} IS NOT "
            f"NULL GROUP BY {c}) counted ORDER BY n DESC, v LIMIT {int(n)}"
        )
        return self.spark.sql(sql).toPandas()["v"].tolist()

    def aggregates(self, ids: str, plans: list[Aggregate]) -> DataFrame:
        """customer_id of the relation `ids` and each planned aggregate over the view at
        its cutoff (`build_view` first), as a Spark DataFrame (nothing computed yet)."""
        if self.view_at is None:
            raise RuntimeError("build_view(t) first")
        sql = request_sql(ids, plans, self.view_at, SPARK)
        try:
            frame = self.spark.sql(sql)
            frame.columns  # noqa: B018 (analysed now: an error names the aggregates' query)
        except _spark_errors() as exc:
            raise SparkFeatureError(
                f"the features' SQL failed on Spark: {_first_line(exc)}"
            ) from exc
        return frame


# ---------------------------------------------------------------- the snapshot


@dataclass
class SparkSnapshot:
    """The refresh's pass at one as_of on Spark: the measures of every profile and the
    features of the active ones as Spark DataFrames (customer_id, then the measures or
    fs.names; None when not asked) and the session's view, whose relations `PROFILES`
    and `ACTIVE` hold the populations (`profiles` and `buyers` bring ids to the driver,
    for the callers that want them there)."""

    measures: DataFrame | None
    features: DataFrame | None
    view: SparkAsOf
    as_of: pd.Timestamp

    def profiles(self) -> pd.Index:
        """Every profile's customer_id, sorted."""
        return self.view.profile_ids()

    def buyers(self) -> pd.Index:
        """The profiles with a purchase at or before as_of, sorted."""
        return self.view.buyers(self.as_of)


def _scratch_done(lake: Lake) -> None:
    """A local lake's scratch folder removed once no pass's scratch is left in it (each
    pass removes its own; a container has no empty folder to remove)."""
    if not lake.remote:
        with contextlib.suppress(OSError):
            lake.path(*SCRATCH).rmdir()


@contextlib.contextmanager
def spark_snapshot(
    spark: SparkSession,
    lake: Lake,
    as_of: pd.Timestamp,
    cfg: ChurnConfig,
    measures: list[Aggregate] | None,
    features: list[Aggregate] | None,
    tables: SparkTables = DELTA,
) -> Iterator[SparkSnapshot]:
    """`calculate_snapshot`'s pass on Spark (see the module docstring), for the duration
    (its frames read the pass's scratch): the measures and features planned
    (`plan_measures`, `plan_features`: what cannot be computed is refused before)."""
    as_of = utc(as_of)
    scratch = (*SCRATCH, uuid.uuid4().hex)
    try:
        with SparkAsOf(spark, lake, scratch, tables) as view:
            view.build_view(as_of)
            view.activate(as_of, cfg)
            yield SparkSnapshot(
                measures=None if measures is None else view.aggregates(PROFILES, measures),
                features=None if features is None else view.aggregates(ACTIVE, features),
                view=view,
                as_of=as_of,
            )
    finally:
        _scratch_done(lake)


def _session(settings: Settings) -> SparkSession:
    from c360ml.spark import spark_session

    return spark_session(settings.spark_remote or None)


def _collect(frame: DataFrame, what: str) -> pd.DataFrame:
    """A Spark DataFrame's rows in pandas, sorted by customer_id and indexed by it."""
    try:
        rows = frame.toPandas()
    except _spark_errors() as exc:
        raise SparkFeatureError(f"Spark failed the {what}: {_first_line(exc)}") from exc
    rows[CUSTOMER_ID] = rows[CUSTOMER_ID].astype(str)
    return rows.sort_values(CUSTOMER_ID, ignore_index=True).set_index(CUSTOMER_ID)


def _measures(matrix: pd.DataFrame, measures: list[Measure], as_of: pd.Timestamp) -> pd.DataFrame:
    from c360ml.features import measures_frame

    return measures_frame(matrix, measures, as_of)


def _features(matrix: pd.DataFrame, fs: FeatureSet, as_of: pd.Timestamp) -> pd.DataFrame:
    """customer_id, as_of, fs.names (float32): the refresh's feature snapshot rows."""
    from c360ml.features.dfs import _feature_part
    from c360ml.refresh import AS_OF

    part = _feature_part(matrix, matrix.index, as_of, fs)
    part["cutoff_time"] = part["cutoff_time"].dt.as_unit("us")
    return part.rename(columns={"cutoff_time": AS_OF})


def snapshot_profiles(
    settings: Settings, as_of: pd.Timestamp, measures: bool, fs: FeatureSet | None
) -> Snapshot:
    """`c360ml.refresh.snapshot_profiles` on Spark: the same Snapshot, computed by Spark
    over the lake's gold (the refresh dispatches here when `engine` is spark)."""
    from c360ml.features import load_churn_config, load_measures
    from c360ml.refresh import Snapshot

    as_of = utc(as_of)
    cfg = load_churn_config(settings.path(settings.feature_spec))
    wanted = load_measures(settings.path(settings.measures)) if measures else None
    lake = Lake(settings.lake)
    plans = (
        plan_measures(wanted) if wanted else None,
        plan_features(fs) if fs is not None else None,
    )
    with spark_snapshot(_session(settings), lake, as_of, cfg, *plans) as snap:
        profiles = snap.profiles()
        return Snapshot(
            measures=None
            if snap.measures is None
            else _measures(_collect(snap.measures, "measures"), wanted, as_of),
            features=None
            if snap.features is None
            else _features(_collect(snap.features, "features"), fs, as_of),
            profiles=pd.Series(profiles.to_numpy(), name=CUSTOMER_ID),
            buyers=pd.Series(snap.buyers().to_numpy(), name=CUSTOMER_ID),
            note=f"on Spark: {len(profiles):,} profiles",
        )


# ---------------------------------------------------------------- training


class _SchemaSource(AsOfSql):
    """A SparkAsOf as `derive_feature_set` reads an AsOfSql: the view at the latest event,
    a few rows of each relation, each category's values and the top values, all answered
    by Spark, so the definitions are derived as the DuckDB engine derives them (on the
    same rows, the same definitions) and nothing of the view but those reaches the
    driver. Only the methods that derivation calls exist; it holds no DuckDB connection."""

    def __init__(self, view: SparkAsOf) -> None:  # AsOfSql.__init__ is not run
        self.view = view

    def close(self) -> None:
        pass

    def restrict(self, customers: pd.Index | None) -> None:
        if customers is not None:
            raise ValueError("a Spark schema source keeps its session's customers")

    def latest_time(self) -> pd.Timestamp | None:
        return self.view.latest_time()

    def build_view(self, t: pd.Timestamp) -> None:
        self.view.build_view(t)

    def frames(self, rows: bool | int = True) -> dict[str, pd.DataFrame]:
        if rows is True:
            raise ValueError("the Spark engine reads no whole view into pandas")
        return self.view.frames(int(rows))

    def distinct(self, relation: str, column: str) -> list:
        return self.view.distinct(relation, column)

    def top_values(self, relation: str, column: str, n: int) -> list:
        return self.view.top_values(relation, column, n)


def derive_features(view: SparkAsOf, spec: Path) -> FeatureSet:
    """`derive_feature_set` on Spark's view: the same definitions from the same spec (the
    view's schema, categories and top values are Spark's answers; a user's SQL feature is
    refused, `refuse_sql_features`)."""
    from c360ml.features import derive_feature_set

    refuse_sql_features(spec)
    return derive_feature_set(_SchemaSource(view), spec)


def refuse_sql_features(spec: Path) -> None:
    """SparkFeatureError naming the spec's first SQL feature (sql_features:), or its first
    BTYD feature (btyd: enabled): those are computed on the view's rows in pandas (the
    BTYD fits in scipy, on the population's purchase summary), by the DuckDB engine only."""
    from c360ml.features import btyd, custom
    from c360ml.features.spec import load_btyd_spec

    for sql in custom.load_sql_features(spec):
        raise SparkFeatureError(
            f"feature {sql.name!r} is a SQL feature (sql_features:), which only the DuckDB "
            "engine computes; drop it from the spec or use --engine duckdb"
        )
    if load_btyd_spec(spec).enabled:
        raise SparkFeatureError(BTYD_REFUSED.format(name=btyd.BTYD_FEATURES[0]))


def population_features(
    view: SparkAsOf, population: pd.DataFrame, fs: FeatureSet, plans: list[Aggregate]
) -> pd.DataFrame:
    """customer_id, cutoff_time, fs.names (float32) of each population row, as
    `calculate_features` gives them: per cutoff, the view at it and the planned aggregates
    of its customers (the relation `KEYS`) in one Spark query, collected before the next
    cutoff's view replaces the relations it reads (Spark Connect resolves a temporary
    view's name when a query runs)."""
    from c360ml.features.dfs import _feature_part
    from c360ml.timestamps import utc_column

    keys = population[[CUSTOMER_ID, asof.CUTOFF_TIME]].copy()
    keys[asof.CUTOFF_TIME] = utc_column(keys[asof.CUTOFF_TIME])
    parts = []
    groups = keys.groupby(asof.CUTOFF_TIME, sort=True)[CUSTOMER_ID]
    with progress.track("features per cutoff on Spark", groups.ngroups) as advance:
        for t, rows in groups:
            ids = pd.Index(rows.unique())
            view.build_view(t)
            view.register_ids(KEYS, ids)
            matrix = _collect(view.aggregates(KEYS, plans), "features").reindex(ids)
            parts.append(_feature_part(matrix, ids, utc(t), fs))
            log.info("features at %s on Spark: %d customers x %d", t, len(ids), len(fs.names))
            advance()
    result = pd.concat(parts, ignore_index=True)
    result[asof.CUTOFF_TIME] = result[asof.CUTOFF_TIME].dt.as_unit("us")
    return keys.merge(result, on=[CUSTOMER_ID, asof.CUTOFF_TIME], how="left", validate="m:1")


def training_frames(
    settings: Settings,
    gold: LakeGold,
    cutoffs: list[pd.Timestamp],
    cfg: ChurnConfig,
    spec: Path,
    sample: Callable[[pd.DataFrame], pd.DataFrame],
    lap: Callable[[str], None],
) -> TrainingFrames:
    """`c360ml.model.pipeline`'s training frames computed by Spark over the lake's gold
    (its sampled customers: `gold.customers`): the labels, RFM, the candidate features
    derived from the spec and their matrix for the population `sample` keeps. What reaches
    the driver: the labels (ids), RFM and the sampled matrix. A candidate the SQL cannot
    express is refused naming it (`plan_features`), before the labels and the matrix are
    computed; a user's SQL feature before any Spark work."""
    from c360ml.features.labels import RFM_LOOKBACK
    from c360ml.model.pipeline import TrainingFrames

    refuse_sql_features(spec)  # before any Spark work
    lake = gold.lake
    scratch = (*SCRATCH, uuid.uuid4().hex)
    try:
        with SparkAsOf(_session(settings), lake, scratch, customers=gold.customers) as view:
            candidates = derive_features(view, spec)
            plans = plan_features(candidates)  # what cannot be computed: refused now
            labels = view.labels(cutoffs, cfg)
            population = sample(labels)
            rfm = view.rfm(cutoffs, RFM_LOOKBACK)
            lap("labels_seconds")  # and the definitions
            matrix = population_features(view, population, candidates, plans)
    finally:
        _scratch_done(lake)
    return TrainingFrames(labels, population, rfm, candidates, matrix)


def features_for(
    settings: Settings, gold: LakeGold, population: pd.DataFrame, fs: FeatureSet
) -> pd.DataFrame:
    """fs's features of `population`'s rows (customer_id, cutoff_time) computed by Spark
    over the lake's gold of `gold.customers` (a training session's sample), as
    `c360ml.features.calculate_features` gives them: the training gate's rows of a
    champion whose features the challenger's matrix lacks. A feature the SQL cannot
    express is refused naming it (`plan_features`), before any Spark work."""
    plans = plan_features(fs)
    lake = gold.lake
    scratch = (*SCRATCH, uuid.uuid4().hex)
    try:
        with SparkAsOf(_session(settings), lake, scratch, customers=gold.customers) as view:
            return population_features(view, population, fs, plans)
    finally:
        _scratch_done(lake)


# ---------------------------------------------------------------- batch scoring


def bundle_files(bundle: ModelBundle) -> dict[str, bytes]:
    """The bundle's folder as file name -> bytes (what the workers load it from)."""
    with tempfile.TemporaryDirectory(prefix="c360ml_bundle_") as folder:
        bundle.save(Path(folder))
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _load_bundle(files: dict[str, bytes]) -> ModelBundle:
    from c360ml.model.scoring import ModelBundle

    with tempfile.TemporaryDirectory(prefix="c360ml_bundle_") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        # One XGBoost thread: a worker scores one partition, beside the others.
        return ModelBundle.load(Path(folder), nthread=1)


def score_batches(
    files: dict[str, bytes],
    names: list[str],
    summed: frozenset[str],
    explain: str,
    batches: Iterator[pd.DataFrame],
) -> Iterator[pd.DataFrame]:
    """The `mapInPandas` function: each batch of the feature snapshot (customer_id, the
    features) with its features encoded as the DuckDB engine encodes them (`encoded`:
    what the booster reads, and the refresh writes) and its `score` columns,
    InfluentialFactors as JSON text (what gold/churn_scores stores)."""
    from c360ml.features.aggregates import encoded
    from c360ml.model import scoring

    bundle = None
    for batch in batches:
        if not len(batch):
            continue
        if bundle is None:
            bundle = _load_bundle(files)
        columns = {CUSTOMER_ID: batch[CUSTOMER_ID].astype(str).to_numpy()}
        for name in names:
            columns[name] = encoded(batch[name], name in summed)
        features = pd.DataFrame(columns)
        request = features.rename(columns={CUSTOMER_ID: "CustomerId"})
        scored = scoring.score(bundle, request, explain, factors_as="json")
        yield pd.concat([features, scored.drop(columns=["CustomerId"])], axis=1)


def score_frame(
    features: DataFrame, fs: FeatureSet, bundle: ModelBundle, explain: str
) -> DataFrame:
    """The feature snapshot (customer_id, fs.names) scored on the workers: customer_id,
    the features (FLOAT), ChurnScore, IsChurn, RiskLevel, InfluentialFactors (JSON)."""
    from pyspark.sql.types import (
        BooleanType,
        DoubleType,
        FloatType,
        StringType,
        StructField,
        StructType,
    )

    from c360ml.features.dfs import summed_names

    schema = StructType(
        [StructField(CUSTOMER_ID, StringType())]
        + [StructField(n, FloatType()) for n in fs.names]
        + [
            StructField("ChurnScore", DoubleType()),
            StructField("IsChurn", BooleanType()),
            StructField("RiskLevel", StringType()),
            StructField("InfluentialFactors", StringType()),
        ]
    )
    summed = summed_names(fs.definitions_json)
    job = partial(score_batches, bundle_files(bundle), list(fs.names), summed, explain)
    return features.mapInPandas(job, schema)


def measures_table(measures: DataFrame, wanted: list[Measure], as_of: pd.Timestamp) -> DataFrame:
    """gold/customer_measures' rows of the measures' aggregates, as `measures_frame`
    makes them: customer_id, as_of, then each measure, numeric ones (counts and flags
    included) as DOUBLE, the others as STRING."""
    types = dict(measures.dtypes)
    numeric = re.compile(r"(tiny|small|big)?int|bigint|long|short|byte|float|double|decimal|bool")
    columns = [
        f"CAST({CUSTOMER_ID} AS STRING) AS {CUSTOMER_ID}",
        f"{SPARK.timestamp(as_of)} AS as_of",
    ]
    for m in wanted:
        kind = "DOUBLE" if numeric.match(types[m.name]) else "STRING"
        columns.append(f"CAST({SPARK.quote(m.name)} AS {kind}) AS {SPARK.quote(m.name)}")
    return measures.selectExpr(*columns)


def scores_sql(
    scored: str, explain: str, version: str, as_of: pd.Timestamp, at: pd.Timestamp
) -> str:
    """gold/churn_scores' rows at as_of on Spark, as `c360ml.refresh.churn_score_rows`
    makes them: one per profile (`PROFILES`), the scores of `scored` (the output of
    `score_frame`) for the active ones (`ACTIVE`), the others unscored with their status."""
    from c360ml.medallion.checks import string
    from c360ml.refresh import INACTIVE, INSUFFICIENT, SCORED

    buyers = asof.purchasers(None, as_of, SPARK)
    c = CUSTOMER_ID
    return (
        f"SELECT p.{c} AS CustomerId, s.ChurnScore, s.IsChurn, s.RiskLevel, "
        f"s.InfluentialFactors, {string(explain, 'spark')} AS ExplainMethod, "
        f"{string(version, 'spark')} AS ModelVersion, {SPARK.timestamp(as_of)} AS ScoredAsOf, "
        f"{SPARK.timestamp(at)} AS ScoredAt, CASE WHEN a.{c} IS NOT NULL THEN '{SCORED}' "
        f"WHEN b.{c} IS NOT NULL THEN '{INACTIVE}' ELSE '{INSUFFICIENT}' END AS ScoreStatus "
        f"FROM {PROFILES} p LEFT JOIN {scored} s ON s.{c} = p.{c} "
        f"LEFT JOIN (SELECT DISTINCT {c} FROM {ACTIVE}) a ON a.{c} = p.{c} "
        f"LEFT JOIN (SELECT DISTINCT {c} FROM ({buyers}) q) b ON b.{c} = p.{c}"
    )


def replace_as_of_on_spark(
    frame: DataFrame, lake: Lake, table: str, column: str, as_of: pd.Timestamp, inputs: dict
) -> bool:
    """`c360ml.steps.replace_as_of` written by Spark: this as_of's rows of a gold table
    replaced in one commit recording the same inputs (so either engine keeps what the
    other wrote); skipped when the same inputs made them. Nothing reaches the driver."""
    from c360ml.steps import same_inputs
    from c360ml.storage.inputs import stamp

    if same_inputs(lake, table, as_of, inputs):
        return False
    meta = stamp({**inputs, "as_of": str(as_of)})
    exists = lake.exists("gold", table)
    condition = f"{SPARK.quote(column)} = {SPARK.timestamp(as_of)}" if exists else None
    write_delta(frame, lake, "gold", table, metadata=meta, replace_where=condition)
    return True


def _count(spark: SparkSession, sql: str) -> int:
    return int(spark.sql(f"SELECT COUNT(*) FROM ({sql}) q").first()[0])


def measures_and_scores(
    settings: Settings,
    as_of: pd.Timestamp,
    bundle: ModelBundle,
    model_version: str,
    explain: str,
) -> tuple[list[StepResult], DataFrame]:
    """`c360ml.refresh.measures_and_scores` on Spark: the measures, the feature snapshot
    and the scores computed by Spark (the features and scores in one pass, kept in the
    pass's scratch) and written to the same tables by Spark, with the same commit
    records; what these inputs (and this model) already produced is kept. The driver
    receives counts; the scores are returned as a Spark DataFrame of this as_of's rows of
    churn_scores (read from the lake by Spark), for the rest of the refresh
    (`c360ml.spark.outputs`)."""
    from c360ml import refresh
    from c360ml.features import load_churn_config, load_measures
    from c360ml.schemas import ChurnScores, CustomerMeasures
    from c360ml.spark import outputs
    from c360ml.spark.gold import check_view
    from c360ml.steps import StepResult

    as_of = utc(as_of)
    lake = Lake(settings.lake)
    plan = refresh.scoring_plan(lake, as_of, bundle, model_version, explain)
    inputs, score_inputs, need_measures, fs = (
        plan.inputs, plan.score_inputs, plan.measures, plan.fs
    )  # fmt: skip
    kept = refresh.KEPT
    if not (need_measures or fs):
        scores = outputs.scores_at(settings, as_of)
        return [StepResult("measures + features + scores", scores.count(), kept)], scores
    started = time.perf_counter()
    cfg = load_churn_config(settings.path(settings.feature_spec))
    wanted = load_measures(settings.path(settings.measures)) if need_measures else None
    plans = (
        plan_measures(wanted) if wanted else None,
        plan_features(fs) if fs is not None else None,
    )
    spark = _session(settings)
    steps: list[StepResult] = []
    with spark_snapshot(spark, lake, as_of, cfg, *plans) as snap:
        profiles = _count(spark, f"SELECT {CUSTOMER_ID} FROM {PROFILES}")
        note = f"on Spark; {profiles:,} profiles; written by Spark"
        steps.append(StepResult("snapshot", profiles, note, time.perf_counter() - started))
        started = time.perf_counter()
        if wanted:
            rows = measures_table(snap.measures, wanted, as_of)
            rows.createOrReplaceTempView(MEASURES)
            check_view(spark, CustomerMeasures, "gold/customer_measures", MEASURES)
            _spark_step(
                lambda: replace_as_of_on_spark(
                    rows, lake, "customer_measures", refresh.AS_OF, as_of, inputs
                ),
                "measures",
            )
            steps.append(StepResult("measures", profiles, "", time.perf_counter() - started))
        else:
            steps.append(StepResult("measures", 0, kept))
        if fs is None:
            scores = outputs.scores_at(settings, as_of)
            steps.append(StepResult("features + scores", scores.count(), kept))
            return steps, scores
        started = time.perf_counter()
        score_frame(snap.features, fs, bundle, explain).createOrReplaceTempView(SCORED)
        _spark_step(lambda: snap.view.keep(SCORED), "features and scores")  # one scoring pass
        names = ", ".join(SPARK.quote(n) for n in fs.names)
        features = spark.sql(
            f"SELECT {CUSTOMER_ID}, {SPARK.timestamp(as_of)} AS as_of, {names} FROM {SCORED}"
        )
        active = _count(spark, f"SELECT {CUSTOMER_ID} FROM {SCORED}")
        _spark_step(
            lambda: replace_as_of_on_spark(
                features, lake, "customer_features", refresh.AS_OF, as_of, inputs
            ),
            "feature snapshot",
        )
        note = f"{len(fs.names)} features; computed and scored in one Spark pass"
        steps.append(StepResult("feature snapshot", active, note, time.perf_counter() - started))
        started = time.perf_counter()
        now = pd.Timestamp.now(tz="UTC").floor("us")
        spark.sql(scores_sql(SCORED, explain, model_version, as_of, now)).createOrReplaceTempView(
            SCORES
        )
        check_view(spark, ChurnScores, "gold/churn_scores", SCORES)
        _spark_step(
            lambda: replace_as_of_on_spark(
                spark.table(SCORES), lake, "churn_scores", "ScoredAsOf", as_of, score_inputs
            ),
            "batch scores",
        )
    note = f"model v{model_version}, explain={explain}, on Spark (mapInPandas)"
    steps.append(StepResult("batch scores", profiles, note, time.perf_counter() - started))
    return steps, outputs.scores_at(settings, as_of)


def _spark_step(run: Callable[[], object], what: str) -> None:
    """`run`, a Spark failure as SparkFeatureError naming `what`."""
    try:
        run()
    except _spark_errors() as exc:
        raise SparkFeatureError(f"Spark failed the {what}: {_first_line(exc)}") from exc


__all__ = [
    "SparkAsOf",
    "SparkFeatureError",
    "SparkSnapshot",
    "derive_features",
    "features_for",
    "measures_and_scores",
    "plan_features",
    "plan_measures",
    "refuse_sql_features",
    "register_gold",
    "score_frame",
    "population_features",
    "snapshot_profiles",
    "spark_snapshot",
    "training_frames",
]
