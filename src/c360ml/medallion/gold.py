"""Gold: the activity and supporting tables, keyed by customer_id, made by DuckDB.

What gold holds is declared in `c360ml.medallion.declarations` (`GOLD_MODELS`: each
table's SQL files in `pipelines/sql/gold/`, key, contract, what it reads and how its
affected rows are found); this module runs those declarations. `materialise` makes one
model, fully or as a patch; `build_gold` makes them all.

Each query's result is streamed batch by batch into its Delta commit (memory holds a
batch, not a 20M-row table). A model with a patch rule is patched on a refresh: only the
rows that the refresh's changes touch are recomputed, by the same SQL over inputs
restricted to them, the replaced rows deleted by deletion vectors and the other rows
kept where they are (`c360ml.medallion.patch` says how the affected rows are found, and
when a table is rebuilt instead). The others are rebuilt. A table is written only when
its inputs' versions changed, so a build with nothing new adds no Delta versions. Rows
that cannot be tied to a profile go to `quarantine/gold/<table>` with a reason, never
away.

A table and its quarantine are one unit of work, and the models that read one another
with the helpers they read (the order tables and `state/gold/order_accounts`) another:
each commit of a unit records the inputs it was made from, and a unit counts as done
only when every part records the current ones. A build killed between two commits of a
unit does it again (a patch again from the inputs its last part records: recomputing a
row twice gives the same rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa_arrow
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.medallion import declarations
from c360ml.medallion.checks import ArrowCheck
from c360ml.medallion.declarations import (
    HELPERS,
    SOURCES,
    UNLOGGED_SOURCES,
    GoldModel,
    Helper,
    lake_table,
    source_files,
)
from c360ml.medallion.patch import (
    CHANGES,
    SQL_KEY,
    Affected,
    AffectedCases,
    Recomputed,
    restrict,
    sql_digest,
)
from c360ml.medallion.sql import (
    connect,
    duckdb_connection,
    register,
    rows_by_file,
    run_sql,
    sql_text,
)
from c360ml.schemas import QUARANTINE_REASON
from c360ml.storage.inputs import last_record, stamp, unchanged, versions
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake
from c360ml.summary import Summary

log = logging.getLogger(__name__)

# A patch of more than this share of a table's rows (and more than PATCH_ALWAYS rows'
# keys) rebuilds the table instead: it would cost as much and hold more.
PATCH_MAX_SHARE, PATCH_ALWAYS = 0.3, 100_000


@dataclass(frozen=True)
class GoldResult:
    """What a build did to one gold table: a row of the summary the CLI prints."""

    table: str  # gold/<name>
    rows: int
    quarantined: int
    note: str
    written: str  # unchanged | rebuilt | patched (<n> <noun>)
    seconds: float


@dataclass(kw_only=True)
class GoldSummary(Summary[GoldResult]):
    """What a gold build did, one result per table in declaration order."""


def lake_versions(lake: Lake) -> dict[str, int]:
    """Versions of every bronze/silver table and the source map: what gold is built from."""
    found = versions(lake, "bronze") | versions(lake, "silver")
    found["gold/customer_source_map"] = lake.version("gold", "customer_source_map")
    return found


def recorded_inputs(lake: Lake, where: tuple[str, ...], digest: str) -> dict[str, int] | None:
    """The inputs a unit was last completed from, as its last part (`where`) records
    them, if it was built from this SQL."""
    record = last_record(lake, where)
    if record is None or record[1].get(SQL_KEY) != digest:
        return None
    return record[0]


def replace_rows(
    lake: Lake,
    where: tuple[str, ...],
    keys: pa_arrow.Table,
    rows: pa_arrow.Table,
    metadata: dict[str, str],
) -> None:
    """One commit that deletes the rows of a table matching `keys` (on its columns) by
    position and appends `rows` (`Lake.delete_and_append`: no file is rewritten)."""
    con = duckdb_connection()
    register(con, lake, "target", *where, positions=True)
    con.register("keys_", keys)
    found = con.sql(
        "SELECT filename, file_row_number FROM target "
        f"SEMI JOIN keys_ USING ({', '.join(keys.column_names)})"
    ).to_arrow_table()
    con.close()
    lake.delete_and_append(*where, deletes=rows_by_file(found), rows=rows, metadata=metadata)


def _checked(
    readers: list[pa_arrow.RecordBatchReader],
    check: ArrowCheck,
    rejected: list[pa_arrow.Table] | None,
) -> Iterator[pa_arrow.RecordBatch]:
    """The query results checked batch by batch; with `rejected` (quarantine), rows with a
    `quarantine_reason` go there instead. Uniqueness is checked after the last batch."""
    for reader in readers:
        for batch in reader:
            rows = pa_arrow.Table.from_batches([batch])
            if rejected is not None:
                bad = pc.is_valid(rows[QUARANTINE_REASON])
                rejected.append(rows.filter(bad))
                rows = rows.filter(pc.invert(bad))
            yield from check(rows).to_batches()
    check.finish()


def _write_quarantine(
    lake: Lake,
    name: str,
    schema: pa_arrow.Schema,
    rejected: list[pa_arrow.Table],
    metadata: dict[str, str],
) -> int:
    bad = pa_arrow.concat_tables(
        [schema.empty_table()] + [t.select(schema.names).cast(schema) for t in rejected]
    )
    lake.write(bad, "quarantine", "gold", name, mode="overwrite", metadata=metadata)
    return len(bad)


def write_gold(
    lake: Lake,
    model: GoldModel,
    readers: list[pa_arrow.RecordBatchReader],
    metadata: dict[str, str],
) -> tuple[int, int]:
    """Query results -> one gold commit, batch by batch; (rows, quarantined rows).

    With `model.quarantine`, rows with a `quarantine_reason` go to
    `quarantine/gold/<name>` instead (written after the gold commit, with the same
    metadata: the unit is done when it is). Memory holds one batch, the quarantined rows
    and the unique columns, never the table: a check that fails (uniqueness at the end)
    raises inside the stream, so nothing is committed.
    """
    check = ArrowCheck(model.schema, f"gold/{model.name}")
    rejected: list[pa_arrow.Table] | None = [] if model.quarantine else None
    failed: list[ValueError] = []

    def batches():
        try:
            yield from _checked(readers, check, rejected)
        except ValueError as exc:
            failed.append(exc)  # the writer wraps it; re-raised as it was, below
            raise

    try:
        lake.write(
            pa_arrow.RecordBatchReader.from_batches(check.schema, batches()),
            "gold",
            model.name,
            mode="overwrite",
            metadata=metadata,
        )
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    if rejected is None:
        return check.rows, 0
    return check.rows, _write_quarantine(lake, model.name, readers[0].schema, rejected, metadata)


def patch_gold(
    lake: Lake,
    model: GoldModel,
    readers: list[pa_arrow.RecordBatchReader],
    metadata: dict[str, str],
    ids: pa_arrow.Array,
) -> dict[tuple[str, ...], pa_arrow.Table]:
    """Query results for the affected ids (`model.key` in `ids`) -> one gold commit that
    deletes the table's rows of those ids by position (deletion vectors,
    `Lake.delete_and_append`) and appends the results; the same in the quarantine for
    the rejected results, with the same metadata (the unit's inputs).

    The results are checked as `write_gold` checks a whole table; a unique column stays
    unique because every kept row's id is outside `ids` and every result's inside.
    Returns the rows written, per table: those tables' rows of `ids` now.
    """
    name = model.name
    check = ArrowCheck(model.schema, f"gold/{name}")
    rejected: list[pa_arrow.Table] | None = [] if model.quarantine else None
    rows = pa_arrow.Table.from_batches(list(_checked(readers, check, rejected)), check.schema)
    keys = pa_arrow.table({model.key: ids})
    replace_rows(lake, ("gold", name), keys, rows, metadata)
    written = {("gold", name): rows}
    if rejected is not None:
        bad = pa_arrow.concat_tables([readers[0].schema.empty_table(), *rejected])
        replace_rows(lake, ("quarantine", "gold", name), keys, bad, metadata)
        written["quarantine", "gold", name] = bad
    return written


@dataclass
class GoldBuild:
    """What one unit's models share while a build makes them: the inputs, the sources
    present, a DuckDB connection with the lake views and helpers registered (each model
    re-registers its own output for those after it), and what was recomputed."""

    settings: Settings
    lake: Lake
    inputs: dict[str, int]
    sources: frozenset[str]
    con: duckdb.DuckDBPyConnection
    helpers: dict[str, pa_arrow.Table] = field(default_factory=dict)
    # Models written by this build: the inputs they were last built from, and the rows
    # they recomputed (None: rebuilt).
    recomputed: Recomputed = field(default_factory=dict)
    # Tables patched by this build: the ids recomputed and the rows written for them.
    patched: dict[tuple[str, ...], tuple[pa_arrow.Array, pa_arrow.Table]] = field(
        default_factory=dict
    )

    @property
    def patchable(self) -> bool:
        """A source without a change log means nothing says what changed."""
        return not self.sources & set(UNLOGGED_SOURCES)


def _affected(
    build: GoldBuild, model: GoldModel, digest: str
) -> tuple[dict | None, Affected | AffectedCases | None]:
    """(the inputs the model's unit last recorded, the rows to recompute since then), or
    None for the rows when the model is rebuilt: no rule, a first build, other SQL, a
    source without a change log, a rule that cannot tell, or too many rows."""
    lake = build.lake
    last = model.parts[-1]
    patchable = model.changes is not None and build.patchable
    since = recorded_inputs(lake, last, digest) if patchable else None
    if since is None:
        return since, None
    affected = CHANGES[model.changes](lake, build.con, since, build.recomputed)
    if affected is not None and affected.size > max(
        PATCH_MAX_SHARE * lake.count("gold", model.name), PATCH_ALWAYS
    ):
        affected = None  # much changes: a rebuild costs no more, holds less
    return since, affected


def _patch(
    build: GoldBuild,
    model: GoldModel,
    files: list[str],
    affected: Affected | AffectedCases,
    meta: dict[str, str],
) -> None:
    """The affected rows recomputed by the model's SQL over its reads restricted to them
    (`restrict`) on a connection of their own, and written in their place."""
    settings, lake = build.settings, build.lake
    scoped = connect(lake, [sql_text(settings, f"gold/{f}") for f in files])
    for helper, rows in build.helpers.items():
        if helper in model.reads:
            scoped.register(helper, rows)
    views = {v: where for v in model.reads if (where := lake_table(build.lake, v)) is not None}
    restrict(scoped, lake, views, affected, build.patched)
    readers = [run_sql(scoped, settings, f"gold/{f}", stream=True) for f in files]
    meta = {**meta, **stamp(build.inputs)}
    ids = affected.ids()
    written = patch_gold(lake, model, readers, meta, ids)
    build.patched.update({where: (ids, rows) for where, rows in written.items()})
    scoped.close()


def model_digest(settings: Settings, model: GoldModel, files: list[str]) -> str:
    """The digest of a model's SQL files and of the helpers' it reads, as every engine
    records it: other SQL or settings rebuild the model."""
    helpers = [f for h in HELPERS if h.name in model.reads for f in h.sql.values()]
    return sql_digest(settings, *(f"gold/{f}" for f in [*helpers, *files]))


def materialise(build: GoldBuild, model: GoldModel) -> GoldResult | None:
    """Make one gold model: nothing when its unit's parts record the current inputs, a
    patch when its rule finds the affected rows, else a rebuild; then register it (and
    its quarantine) for the models after it. None when no source of it is in the lake.

    Its commits record the inputs and the digest of its SQL (with the helpers it
    reads): other SQL or settings rebuild it."""
    files = source_files(model.sql, build.sources)
    if not files:
        return None
    started = time.perf_counter()
    settings, lake, name = build.settings, build.lake, model.name
    how = "unchanged"
    if not unchanged(lake, model.parts, build.inputs):
        digest = model_digest(settings, model, files)
        since, affected = _affected(build, model, digest)
        build.recomputed[name] = (since, affected)
        meta = {SQL_KEY: digest}
        if affected is None:
            readers = [run_sql(build.con, settings, f"gold/{f}", stream=True) for f in files]
            write_gold(lake, model, readers, stamp(build.inputs, **meta))
            how = "rebuilt"
        else:
            _patch(build, model, files, affected, meta)
            how = f"patched ({affected.size} {affected.noun})"
        log.info("gold/%s %s", name, how)
    register(build.con, lake, f"gold_{name}", "gold", name)
    if model.quarantine:
        register(build.con, lake, f"quarantine_{name}", "quarantine", "gold", name)
    note = ""
    if model.null_note is not None:
        column, meaning = model.null_note
        nulls = lake.dataset("gold", name).count_rows(filter=pc.field(column).is_null())
        note = f"{nulls} {meaning}"
    return GoldResult(
        table=f"gold/{name}",
        rows=lake.count("gold", name),
        quarantined=lake.count("quarantine", "gold", name) if model.quarantine else 0,
        note=note,
        written=how,
        seconds=round(time.perf_counter() - started, 2),
    )


def units(
    models: tuple[GoldModel, ...], helpers: tuple[Helper, ...]
) -> list[tuple[list[GoldModel], list[Helper]]]:
    """The models grouped with those whose output they read (`gold_<name>`,
    `quarantine_<name>`) and with the helpers they read, in declaration order; a model
    that reads a later one is refused. Units read nothing of one another."""
    names = [m.name for m in models]
    groups: list[set[str]] = []
    for i, model in enumerate(models):
        links = {model.name} | {h.name for h in helpers if h.name in model.reads}
        for view in model.reads:
            layer, _, table = view.partition("_")
            if layer in ("gold", "quarantine") and table in names:
                if names.index(table) >= i:
                    raise ValueError(f"gold/{model.name} reads {view}, declared after it")
                links.add(table)
        joined = [g for g in groups if g & links]
        groups = [g for g in groups if not g & links] + [links.union(*joined)]
    groups.sort(key=lambda g: min(names.index(n) for n in g if n in names))
    return [
        ([m for m in models if m.name in g], [h for h in helpers if h.name in g]) for g in groups
    ]


def make_unit(
    settings: Settings,
    lake: Lake,
    inputs: dict[str, int],
    sources: frozenset[str],
    models: list[GoldModel],
    helpers: list[Helper],
) -> list[GoldResult]:
    """One unit's helpers run and registered, its models made in order, then the helpers'
    state written: last, so that a build stopped before it finds the same affected rows
    again; with the inputs, so that one stopped just before writes it next time (the
    unit's models then count as done)."""
    texts = [sql_text(settings, f"gold/{f}") for x in (*helpers, *models) for f in x.sql.values()]
    build = GoldBuild(settings, lake, inputs, sources, connect(lake, texts))
    try:
        for helper in helpers:
            files = source_files(helper.sql, sources)
            if files:
                rows = pa_arrow.concat_tables(
                    [run_sql(build.con, settings, f"gold/{f}") for f in files]
                )
                build.con.register(helper.name, rows)
                build.helpers[helper.name] = rows
        results = [r for m in models if (r := materialise(build, m)) is not None]
        for helper in helpers:
            if helper.name in build.helpers and not unchanged(lake, [helper.state], inputs):
                rows = build.helpers[helper.name]
                lake.write(rows, *helper.state, mode="overwrite", metadata=stamp(inputs))
    finally:
        build.con.close()
    return results


@writes_lake("build gold")
def build_gold(settings: Settings) -> GoldSummary:
    """Every declared gold model made from silver and the source map (`materialise`).
    Units that read nothing of one another are made alongside: a build is partly
    single-threaded, and the cases need no order table."""
    lake = Lake(settings.lake)
    if not lake.exists("gold", "customer_source_map"):
        raise FileNotFoundError("gold/customer_source_map missing: run `c360ml build unify` first")
    models = declarations.GOLD_MODELS  # read now: a test may declare one more
    unknown = sorted({m.changes for m in models if m.changes} - set(CHANGES))
    if unknown:
        raise ValueError(f"no patch rule named {unknown} (c360ml.medallion.patch.CHANGES)")
    # customer_profile and the source map are unify's outputs; gold builds the rest.
    inputs = lake_versions(lake)
    sources = frozenset(s for s, table in SOURCES.items() if lake.exists("silver", table))
    work = [
        (ms, hs)
        for ms, hs in units(models, HELPERS)
        if any(source_files(m.sql, sources) for m in ms)
    ]
    results: list[GoldResult] = []
    with ThreadPoolExecutor(1) as pool:
        others = [pool.submit(make_unit, settings, lake, inputs, sources, *u) for u in work[1:]]
        if work:
            results += make_unit(settings, lake, inputs, sources, *work[0])
        for other in others:
            results += other.result()
    order = [f"gold/{m.name}" for m in models]
    return GoldSummary(items=sorted(results, key=lambda r: order.index(r.table)))
