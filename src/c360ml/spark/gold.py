"""Gold on Spark: the gold declarations (`c360ml.medallion.declarations`) made by Spark SQL.

The same models, SQL files and checks as the DuckDB engine (`c360ml.medallion.gold`),
run on a SparkSession (`c360ml.spark.session`) over the same Delta tables: each
declared read is a temp view (a lake table read by Spark's Delta reader, an earlier
model's output as it was written, a helper's query), a model is the union of its SQL
files of the sources present, its rows with a `quarantine_reason` go to
`quarantine/gold/<name>`, the others are checked against the model's pandera schema by
its SQL checks in Spark's dialect (`c360ml.medallion.checks`) and written as a Delta
table by Spark. Nothing is collected to the driver but the checks' counts.

Across builds it behaves as the DuckDB engine: each commit of a model, its quarantine
and the helpers' state records the inputs it was made from and (a model's) the digest
of its SQL, in the keys DuckDB records (`c360ml.storage.inputs.stamp`, `SQL_KEY`), so a
model whose parts record the current inputs is not written again, whichever engine
wrote it, and DuckDB patches a table Spark wrote as one it wrote itself. Spark's Delta
writers record custom metadata as one string (`.option("userMetadata", ...)`, Sail's
and Delta's on the JVM alike): it holds the same keys as a JSON object, in the write's
own commit (`Lake.commit_metadata` reads them back).

Not yet (DuckDB does): patches. Where DuckDB patches, Spark rebuilds; the tables are
equal. A failure stops the build at that model: a failing check or SQL error raises
before its table is written (`SparkBuildError`: one line naming the model and file),
the tables of the models before it are written whole (each write is one Delta commit),
and the helpers' state (written last, from which DuckDB's next patch finds what
changed) is not.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Protocol

from c360ml.config import Settings
from c360ml.medallion import declarations
from c360ml.medallion.checks import REASON, ident, sql_checks
from c360ml.medallion.declarations import (
    HELPERS,
    SOURCES,
    GoldModel,
    Helper,
    lake_table,
    source_files,
)
from c360ml.medallion.gold import GoldResult, GoldSummary, lake_versions, model_digest
from c360ml.medallion.patch import SQL_KEY
from c360ml.medallion.sql import sql_text
from c360ml.storage.inputs import stamp, unchanged
from c360ml.storage.lake import USER_METADATA, Lake
from c360ml.storage.lease import writes_lake

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

RESULT = "c360ml_result_{}"  # the temp view of a model's query while it is checked and split


class SparkBuildError(RuntimeError):
    """Spark refused or failed a model's work: the message is the one line a user is
    shown (the model, the SQL file when one is to blame, Spark's first line)."""


def _first_line(exc: BaseException) -> str:
    """The line of a Spark error a user is shown: its first; for a Python worker's failure
    (a UDF raised), the traceback's last, the exception itself (the first line, on Sail
    and on the JVM alike, only says that a Python worker failed)."""
    from pyspark.errors import PythonException

    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return lines[-1].strip() if isinstance(exc, PythonException) else lines[0]


def _spark_errors() -> tuple[type[BaseException], ...]:
    """What a Spark Connect or classic session raises for a query or a write."""
    from pyspark.errors import PySparkException

    return (PySparkException,)


def read_delta(spark: SparkSession, lake: Lake, *where: str) -> DataFrame:
    """A lake table as Spark's Delta reader sees it (deletion vectors applied), by its
    URI: a local folder, or an object store's (Spark reaches that through its own
    configuration: Sail through the same environment variables as c360ml)."""
    return spark.read.format("delta").load(lake.uri(*where))


def keep_parquet(
    spark: SparkSession, frame: DataFrame, lake: Lake, where: tuple[str, ...]
) -> DataFrame:
    """`frame` computed once, written as scratch Parquet to the lake's folder `where` and
    read back: what follows reads the result, not the plan that made it (Sail's cache is
    a no-op, and a checkpoint needs a directory a cluster may not have). The folder is
    the lake's (a local folder or a prefix of its container) because the driver and the
    workers must all reach it. Read with the frame's schema: an empty result is written
    as no file at all (a local folder is made for it; an empty prefix reads as no rows)."""
    uri = lake.uri(*where)
    frame.write.mode("overwrite").parquet(uri)
    if not lake.remote:
        lake.path(*where).mkdir(parents=True, exist_ok=True)
    return spark.read.schema(frame.schema).parquet(uri)


def _made_parent(lake: Lake, where: tuple[str, ...]) -> None:
    """A local table's parent folder, made before Spark writes it (a container has no
    folders to make)."""
    if not lake.remote:
        lake.path(*where).parent.mkdir(parents=True, exist_ok=True)


def nullable(frame: DataFrame) -> DataFrame:
    """The frame with every column nullable, as the DuckDB engine's tables declare them
    (the checks say which may hold a null). Spark derives NOT NULL for expressions such
    as a CASE with an ELSE, and its Delta writer records that in the table's schema,
    which would refuse a null in that column for good. `NULLIF(c, NULL)` is `c` (a
    comparison with NULL is never true) of the same type, and nullable; Sail's writer
    ignores a nullable schema given by `DataFrame.to`."""
    return frame.selectExpr(
        *(f"NULLIF({ident(c, 'spark')}, NULL) AS {ident(c, 'spark')}" for c in frame.columns)
    )


def write_delta(
    frame: DataFrame,
    lake: Lake,
    *where: str,
    metadata: dict[str, str],
    replace_where: str | None = None,
) -> None:
    """One overwrite commit of a lake table by Spark, every column nullable, the table's
    schema replaced (as the DuckDB engine's overwrite replaces it), `metadata` recorded
    in that commit (as a JSON object in its `userMetadata`). With `replace_where` (a
    Spark SQL condition) only the rows matching it are replaced, in the same one commit
    (Delta's replaceWhere: delta-rs' overwrite with a predicate); columns of `frame`
    the table lacks are added to it first (`add_missing_columns`: a champion with new
    features adds theirs to customer_features, as the DuckDB engine's `Lake.write` with a
    predicate merges the schemas). SparkBuildError when Spark fails it: a Delta write commits whole or not at
    all, so the table is as it was."""
    _made_parent(lake, where)
    writer = nullable(frame).write.format("delta").mode("overwrite")
    if replace_where is None:
        writer = writer.option("overwriteSchema", "true")
    else:
        add_missing_columns(frame, lake, *where)
        writer = writer.option("replaceWhere", replace_where)
    try:
        writer.option(USER_METADATA, json.dumps(metadata)).save(lake.uri(*where))
    except _spark_errors() as exc:
        table = "/".join(where)
        raise SparkBuildError(f"{table}: Spark failed to write it: {_first_line(exc)}") from exc


def add_missing_columns(frame: DataFrame, lake: Lake, *where: str) -> list[str]:
    """The columns of `frame` the table at `where` lacks, added to its schema (nullable:
    its rows null in them) in one commit of their own, by delta-rs: an explicit ALTER
    TABLE ADD COLUMNS. Delta's `mergeSchema` would do it within the replaceWhere commit,
    but Sail ignores the option and writes the frame without those columns, silently.
    The commit adds no rows (a reader between the two commits sees the new columns null)
    and records nothing the refresh looks for. Returns the added columns' names."""
    from deltalake.schema import Field
    from pyspark.sql.pandas.types import to_arrow_schema

    table = lake.delta(*where)
    have = {f.name for f in table.schema().fields}
    wanted = to_arrow_schema(frame.schema, timezone="UTC")
    missing = [f.with_nullable(True) for f in wanted if f.name not in have]
    if missing:
        table.alter.add_columns([Field.from_arrow(f) for f in missing])
    return [f.name for f in missing]


def append_delta(frame: DataFrame, lake: Lake, *where: str, metadata: dict[str, str]) -> None:
    """One append commit of a lake table by Spark (the table made when missing), every
    column nullable, `metadata` recorded as `write_delta` records it. SparkBuildError
    when Spark fails it (the table as it was)."""
    _made_parent(lake, where)
    writer = nullable(frame).write.format("delta").mode("append")
    try:
        writer.option(USER_METADATA, json.dumps(metadata)).save(lake.uri(*where))
    except _spark_errors() as exc:
        table = "/".join(where)
        raise SparkBuildError(f"{table}: Spark failed to write it: {_first_line(exc)}") from exc


class SparkTables(Protocol):
    """How Spark reads and writes the lake's tables: Delta (`DELTA`), what every platform
    c360ml runs on reads and writes. The tests of the classic session on Apache Spark's
    own local mode, which has no Delta here (its jars cannot be fetched), hand the same
    tables over as parquet through this seam.

    `write` is one overwrite of a table, `append` one append (the table made when
    missing), both recording `metadata` in their commit. `delete` removes the rows
    matching a Spark SQL condition in place: Delta's DELETE. Only a silver change log
    ahead of silver needs it (a DuckDB merge stopped after its log commit), which a
    first build never meets; a format without row deletes refuses it in one line
    naming the table (`SparkBuildError`)."""

    def read(self, spark: SparkSession, lake: Lake, where: tuple[str, ...]) -> DataFrame: ...

    def write(
        self, frame: DataFrame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]
    ) -> None: ...

    def append(
        self, frame: DataFrame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]
    ) -> None: ...

    def delete(
        self, spark: SparkSession, lake: Lake, where: tuple[str, ...], condition: str
    ) -> None: ...


class DeltaTables:
    """The lake's Delta tables read and written by Spark's own Delta reader and writers."""

    def read(self, spark: SparkSession, lake: Lake, where: tuple[str, ...]) -> DataFrame:
        return read_delta(spark, lake, *where)

    def write(
        self, frame: DataFrame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]
    ) -> None:
        write_delta(frame, lake, *where, metadata=metadata)

    def append(
        self, frame: DataFrame, lake: Lake, where: tuple[str, ...], metadata: dict[str, str]
    ) -> None:
        append_delta(frame, lake, *where, metadata=metadata)

    def delete(
        self, spark: SparkSession, lake: Lake, where: tuple[str, ...], condition: str
    ) -> None:
        spark.sql(f"DELETE FROM delta.`{lake.uri(*where)}` WHERE {condition}")


DELTA = DeltaTables()


@dataclass
class SparkGold:
    """What the models of one Spark gold build share: the session, the lake, the sources
    present and the views registered so far."""

    settings: Settings
    lake: Lake
    spark: SparkSession
    sources: frozenset[str]
    inputs: dict[str, int] = field(default_factory=dict)  # what this build is made from
    views: set[str] = field(default_factory=set)
    tables: SparkTables = DELTA

    def register(self, view: str, where: tuple[str, ...]) -> None:
        self.tables.read(self.spark, self.lake, where).createOrReplaceTempView(view)
        self.views.add(view)

    def register_reads(self, reads: tuple[str, ...]) -> None:
        """The lake tables among `reads` not registered yet (helpers and the models of
        this build are registered when they are made)."""
        for view in reads:
            if view not in self.views and (where := lake_table(self.lake, view)) is not None:
                self.register(view, where)

    def query(self, name: str, files: list[str]) -> DataFrame:
        """The union of the SQL files' results, by column name (as DuckDB unions them).
        Each file is analysed on its own first (its columns asked for): a SQL error is a
        SparkBuildError naming the model or helper (`name`) and the file."""
        frames = []
        for file in files:
            try:
                frame = self.spark.sql(sql_text(self.settings, f"gold/{file}"))
                frame.columns  # noqa: B018 (analysed now: the error names this file)
            except _spark_errors() as exc:
                raise SparkBuildError(
                    f"{name}: gold/{file}.sql fails on Spark: {_first_line(exc)}"
                ) from exc
            frames.append(frame)
        return reduce(lambda a, b: a.unionByName(b), frames)


def check_gold(spark: SparkSession, model: GoldModel, view: str) -> None:
    """The model's pandera checks over `view` in Spark SQL: ValueError naming every failed
    check and how many rows fail it, as the DuckDB engine's `ArrowCheck` names them.
    Only counts come back to the driver."""
    check_view(spark, model.schema, f"gold/{model.name}", view)


def check_view(spark: SparkSession, schema: object, where: str, view: str) -> None:
    """A pandera schema's checks over `view` in Spark SQL (`check_gold`), `where` naming
    the table in the ValueError."""
    checks = sql_checks(schema, "spark")
    columns = set(spark.table(view).columns)
    missing = [c for c in checks.dtypes if c not in columns]
    problems = [f"{c}: column missing" for c in missing]
    rows = tuple(c for c in checks.rows if not set(c.columns) & set(missing))
    if rows:
        counts = spark.sql(checks.counts_sql(view, rows)).first()
        problems += [f"{c.reason} fails {n} rows" for c, n in zip(rows, counts, strict=True) if n]
    for column in checks.unique:
        if column not in missing:
            duplicated = spark.sql(checks.duplicates_sql(view, column)).first()[0]
            if duplicated:
                problems.append(f"{column}: field_uniqueness ({duplicated} duplicated values)")
    if problems:
        raise ValueError(f"{where} fails its schema:\n" + "\n".join(problems[:20]))


def materialise(build: SparkGold, model: GoldModel) -> GoldResult | None:
    """Make one gold model on Spark: nothing when its parts (the table and its
    quarantine) record the current inputs, else a full rebuild, checked before anything
    is written; then register its output (and its quarantine) as views for the models
    after it. None when no source of it is in the lake."""
    files = source_files(model.sql, build.sources)
    if not files:
        return None
    started = time.perf_counter()
    lake, name = build.lake, model.name
    how = "unchanged"
    if not unchanged(lake, model.parts, build.inputs):
        meta = stamp(build.inputs, **{SQL_KEY: model_digest(build.settings, model, files)})
        _rebuild(build, model, files, meta)
        how = "rebuilt"
        log.info("gold/%s rebuilt on Spark", name)
    if model.quarantine:
        build.register(f"quarantine_{name}", ("quarantine", "gold", name))
    build.register(f"gold_{name}", ("gold", name))
    return _result(build, model, started, how)


def _rebuild(build: SparkGold, model: GoldModel, files: list[str], meta: dict[str, str]) -> None:
    """The model's rows checked, then written: the table, then its quarantine (its
    unit's last part, as DuckDB writes them), both commits recording `meta`."""
    spark, lake, name = build.spark, build.lake, model.name
    build.register_reads(model.reads)
    result = RESULT.format(name)
    build.query(f"gold/{name}", files).createOrReplaceTempView(result)
    checks = sql_checks(model.schema, "spark")
    reason = checks.q(REASON)
    valid = f"(SELECT * FROM {result} WHERE {reason} IS NULL)" if model.quarantine else result
    checked = f"{result}_valid"
    spark.sql(f"SELECT * FROM {valid}").createOrReplaceTempView(checked)
    try:  # the model's query runs first here (its checks' counts): its errors show now
        check_gold(spark, model, checked)
    except _spark_errors() as exc:
        raise SparkBuildError(f"gold/{name}: Spark failed it: {_first_line(exc)}") from exc
    rows = spark.sql(f"SELECT {checks.cast_sql()} FROM {checked}")
    build.tables.write(rows, lake, ("gold", name), meta)
    if model.quarantine:
        rejected = spark.sql(f"SELECT * FROM {result} WHERE {reason} IS NOT NULL")
        build.tables.write(rejected, lake, ("quarantine", "gold", name), meta)


def _result(build: SparkGold, model: GoldModel, started: float, how: str) -> GoldResult:
    """The summary row of a model (`how`: rebuilt or unchanged), counted by Spark."""
    spark, name = build.spark, model.name
    note, rows = "", None
    if model.null_note is not None:
        column, meaning = model.null_note
        q = sql_checks(model.schema, "spark").q(column)
        rows, nulls = spark.sql(f"SELECT COUNT(*), COUNT_IF({q} IS NULL) FROM gold_{name}").first()
        note = f"{nulls} {meaning}"
    if rows is None:
        rows = spark.table(f"gold_{name}").count()
    quarantined = spark.table(f"quarantine_{name}").count() if model.quarantine else 0
    return GoldResult(
        table=f"gold/{name}",
        rows=rows,
        quarantined=quarantined,
        note=note,
        written=how,
        seconds=round(time.perf_counter() - started, 2),
    )


def run_helpers(build: SparkGold, helpers: tuple[Helper, ...]) -> list[Helper]:
    """The helpers of the sources present registered as views of their queries; the ones
    registered."""
    made = []
    for helper in helpers:
        files = source_files(helper.sql, build.sources)
        if files:
            for file in files:
                build.register_reads(_views_named(build, file))
            build.query(helper.name, files).createOrReplaceTempView(helper.name)
            build.views.add(helper.name)
            made.append(helper)
    return made


def _views_named(build: SparkGold, file: str) -> tuple[str, ...]:
    """The lake views a helper's SQL file names (a helper declares no reads)."""
    words = set(re.findall(r"\w+", sql_text(build.settings, f"gold/{file}")))
    return tuple(w for w in words if w.startswith(("bronze_", "silver_", "gold_")))


def make_gold(settings: Settings, spark: SparkSession, tables: SparkTables = DELTA) -> GoldSummary:
    """Every declared gold model made on Spark (`materialise`), in declaration order (a
    model reads only models before it), then the helpers' state
    (`state/gold/order_accounts`), unless it records the current inputs: last, so that a
    build stopped before it leaves DuckDB's next patch the changes to find again."""
    lake = Lake(settings.lake)
    if not lake.exists("gold", "customer_source_map"):
        raise FileNotFoundError("gold/customer_source_map missing: run `c360ml build unify` first")
    models = declarations.GOLD_MODELS  # read now: a test may declare one more
    sources = frozenset(s for s, table in SOURCES.items() if lake.exists("silver", table))
    inputs = lake_versions(lake)
    build = SparkGold(settings, lake, spark, sources, inputs, tables=tables)
    helpers = run_helpers(build, HELPERS)
    results = [r for m in models if (r := materialise(build, m)) is not None]
    for helper in helpers:
        if not unchanged(lake, [helper.state], inputs):
            tables.write(spark.table(helper.name), lake, helper.state, stamp(inputs))
    return GoldSummary(items=results)


@writes_lake("build gold")
def build_gold(settings: Settings, spark: SparkSession, tables: SparkTables = DELTA) -> GoldSummary:
    """`make_gold` under the lake's lease (one writer per lake)."""
    return make_gold(settings, spark, tables)
