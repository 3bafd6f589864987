"""Ingest: landing -> bronze. Exact copies plus lineage, only what is new.

What has been ingested is read from the bronze tables' own Delta commit metadata (the
files of each commit), so the record of progress is atomic with the data: a crash
between two commits leaves no partial batch visible, and a re-run ingests exactly the
files that did not commit. Quarantine commits carry the same record, so a crash
between a bronze commit and its quarantine commit is completed without duplicates.

Synapse Link changes a table's model.json over time. An added attribute is a new bronze
column (null in the rows before it). A changed type cannot be one bronze column: that
table stops at the sync that changes it (nothing of it is committed from there on), the
other tables are ingested, and the run ends with an `IngestError` naming table and column.

The landing zone is read through the lake's store, so a lake on object storage (`az://`,
`abfss://`) is ingested straight from its container: model.json and the CSV partitions
are read as streams in ranged pieces, never copied to local disk. Files are named in the
progress record, bronze lineage and quarantine by their path below `landing/` (the same
on every lake, so a lake copied between a disk and a container stays consistent); errors
and logs name the file's URI. A sync folder Synapse Link is still writing waits for a
later run (`c360ml.sources.synapse.sync_folders` says when a folder is complete).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import duckdb
import pyarrow as pa
import yaml
from rich.progress import Progress

from c360ml.config import Settings
from c360ml.medallion.checks import REASON, upgrade_quarantine
from c360ml.sources.synapse import (
    QUARANTINE_SCHEMA,
    Entity,
    LandingFile,
    read_csv_file,
    read_model_json,
    sync_folders,
)
from c360ml.sources.tables import Column, source_table
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake
from c360ml.summary import Summary

log = logging.getLogger(__name__)

FILES_KEY = "c360ml.files"
BATCH_KEY = "c360ml.batch_id"
SYNAPSE_SOURCES = ("d365", "dataverse")
INGEST_THREADS = 2  # entities ingested at once (the machine has 2 cores)
LINEAGE = pa.schema(
    [
        ("_source_file", pa.string()),
        ("_ingested_at", pa.timestamp("us", tz="UTC")),
        ("_batch_id", pa.string()),
    ]
)
# Canonical columns of a generic transactions source; the YAML maps them to file columns.
GENERIC_COLUMNS = (
    Column("customer_id", "string"),
    Column("timestamp", "dateTime"),
    Column("amount", "decimal"),
    Column("order_id", "string"),
    Column("product_id", "string"),
    Column("is_return", "boolean"),
)
# Needed in the mapping and in every file. The others are optional in both: bronze holds
# them null where a file lacks them, and silver defaults them (one order per customer and
# instant, is_return = amount < 0; see pipelines/sql/silver/generic_transactions.sql).
GENERIC_REQUIRED = tuple(c.name for c in GENERIC_COLUMNS[:3])


@dataclass
class TableIngest:
    source: str
    table: str
    batches: int = 0
    files: int = 0
    rows: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    error: str = ""  # why the table stopped (it is not ingested from that sync on)


@dataclass(kw_only=True)
class IngestSummary(Summary[TableIngest]):
    def rows(self) -> list[dict]:
        """The error column only when a table stopped (most runs have none)."""
        rows = super().rows()
        if not any(t.error for t in self.items):
            for row in rows:
                del row["error"]
        return rows

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.items)

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.items if t.error]


class SchemaChangeError(ValueError):
    """A sync's model.json gives a bronze column another type."""


class IngestError(ValueError):
    """Tables that stopped; every other table was ingested and committed (`summary`)."""

    def __init__(self, summary: IngestSummary) -> None:
        self.summary = summary
        done = [t for t in summary.items if not t.error]
        rows = sum(t.rows for t in done)
        quarantined = sum(t.quarantined for t in done)
        super().__init__(
            f"{_many(len(summary.errors), 'table')} not ingested: {'; '.join(summary.errors)}."
            f" The others were ingested ({_many(len(done), 'table')}, {_many(rows, 'row')}, "
            f"{quarantined:,} quarantined); once the export is fixed, a re-run goes on from "
            "the sync that stopped"
        )


def _many(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def committed_files(lake: Lake, layer: str, *parts: str) -> set[str]:
    """Files recorded in a table's commits (empty if the table does not exist yet)."""
    if not lake.exists(layer, *parts):
        return set()
    done: set[str] = set()
    for meta in lake.commit_metadata(layer, *parts):
        if FILES_KEY in meta:
            done.update(json.loads(meta[FILES_KEY]))
    return done


@writes_lake("ingest")
def ingest_landing(settings: Settings) -> IngestSummary:
    """Ingest every new landing file/version of every source into bronze.

    A table whose model.json changes a column's type stops at that sync (see
    `check_bronze_types`) while the others go on; the run then raises `IngestError`,
    which names table and column and holds the summary of what was ingested."""
    lake = Lake(settings.lake)
    store = lake.store
    if not _landing_exists(lake):
        raise FileNotFoundError(
            f"no landing folder at {lake.uri('landing')}: run `c360ml generate` first"
        )
    summary = IngestSummary()
    ingested_at = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
    # Each table's log read once per run, not once per sync folder: a lake refreshed four
    # times a day has hundreds of folders. Files committed during this run belong to other
    # folders, so the record read at the start stays right for the folders after it.
    committed = cache(lambda *where: frozenset(committed_files(lake, *where)))
    stopped: set[tuple[str, str]] = set()  # tables a type change stopped in this run
    with Progress(transient=True) as progress:
        task = progress.add_task("ingest", total=None)
        for source in (s for s in SYNAPSE_SOURCES if s in settings.sources):
            folders = sync_folders(store, lake.key("landing", source))
            for folder, why in folders.waiting:
                log.info("%s: not ingested yet: %s", store.uri(folder), why)
            for folder in folders.complete:
                # Entities of one sync folder are independent tables: two at a time (Arrow
                # parses and casts without the GIL), committed folder by folder in order.
                entities = []
                for entity in read_model_json(store, folder).values():
                    if (source, entity.name) in stopped:
                        continue  # later syncs wait for the one that stopped it
                    try:
                        if _has_new_files(lake, source, folder, entity, committed):
                            check_bronze_types(lake, source, folder, entity)
                    except SchemaChangeError as exc:  # raised at the end (IngestError)
                        log.info("%s", exc)
                        stopped.add((source, entity.name))
                        _merge(summary, TableIngest(source, entity.name, error=str(exc)))
                        continue
                    entities.append(entity)
                progress.update(task, description=f"{source}/{_name(folder)}")
                with ThreadPoolExecutor(max_workers=INGEST_THREADS) as pool:
                    done = pool.map(
                        lambda e, s=source, f=folder: ingest_entity(
                            lake, s, f, e, ingested_at, committed
                        ),
                        _largest_first(entities),
                    )
                    for result in sorted(done, key=lambda r: entities_order(entities, r)):
                        _merge(summary, result)
        for source_dir in store.folders(lake.key("landing", "delta")):
            if _name(source_dir) not in settings.sources:
                continue
            for table_dir in store.folders(source_dir):
                source, table = _name(source_dir), _name(table_dir)
                progress.update(task, description=f"delta/{source}/{table}")
                _merge(summary, ingest_delta_table(lake, source, table, ingested_at))
        if "generic" in settings.sources:
            generic = ingest_generic(lake, settings.path(settings.generic_mapping), ingested_at)
            if generic is not None:
                _merge(summary, generic)
    if summary.errors:
        raise IngestError(summary)
    return summary


def _landing_exists(lake: Lake) -> bool:
    """A local lake's landing folder, or any object below an object store's `landing/`
    (object storage has no empty folders)."""
    if not lake.remote:
        return lake.path("landing").exists()
    return bool(lake.store.folders("landing")) or bool(lake.store.list("landing"))


def _name(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]


def _rel(file: LandingFile) -> str:
    """A landing file's name in bronze lineage, quarantine and the progress record: its
    path below `landing/`."""
    return file.key.removeprefix("landing/")


def _has_new_files(
    lake: Lake,
    source: str,
    folder: str,
    entity: Entity,
    committed: Callable[..., frozenset[str]],
) -> bool:
    """Whether a sync folder has files of this entity not committed to bronze or to
    its quarantine (what `ingest_entity` will read)."""
    rel = [_rel(f) for f in entity.files]
    done_q = committed("quarantine", "bronze", source, entity.name)
    return any(r not in committed("bronze", source, entity.name) or r not in done_q for r in rel)


def check_bronze_types(lake: Lake, source: str, folder: str, entity: Entity) -> None:
    """Raise SchemaChangeError if the sync's model.json gives a column of the bronze
    table another Arrow type (CDM types of one Arrow type, int32 and int64 say, are the
    same column). Added and missing attributes are fine: a bronze column is added, or
    is null in the new rows."""
    if not lake.exists("bronze", source, entity.name):
        return
    bronze = pa.schema(lake.delta("bronze", source, entity.name).schema().to_arrow())
    have = {f.name: _plain(f.type) for f in bronze}
    changed = [c for c in entity.columns if c.name in have and have[c.name] != c.arrow_type]
    if changed:
        what = ", ".join(
            f"column {c.name!r} is {have[c.name]} in bronze but {c.cdm_type!r} ({c.arrow_type})"
            for c in changed
        )
        raise SchemaChangeError(
            f"{source}/{entity.name}: {what} in {lake.store.uri(f'{folder}/model.json')}: "
            "a bronze column "
            f"cannot change type, so {entity.name} is not ingested from this sync on"
        )


def _plain(t: pa.DataType) -> pa.DataType:
    """A Delta schema's Arrow type as ingest writes it (strings as plain strings)."""
    return pa.string() if t in (pa.large_string(), pa.string_view()) else t


def _largest_first(entities: list[Entity]) -> list[Entity]:
    """Big tables first, so the two workers finish together."""
    return sorted(entities, key=lambda e: -sum(f.size for f in e.files))


def entities_order(entities: list[Entity], result: TableIngest) -> int:
    return [e.name for e in entities].index(result.table)


def _merge(summary: IngestSummary, result: TableIngest) -> None:
    for t in summary.items:
        if (t.source, t.table) == (result.source, result.table):
            t.batches += result.batches
            t.files += result.files
            t.rows += result.rows
            t.quarantined += result.quarantined
            t.seconds += result.seconds
            t.error = t.error or result.error
            return
    summary.items.append(result)


def _with_lineage(table: pa.Table, source_file: str, batch_id: str, at: pa.Scalar) -> pa.Table:
    """The lineage columns, one value repeated (built in Arrow: a Python list with a copy
    per row was a visible part of a large ingest)."""
    n = len(table)
    return (
        table.append_column(LINEAGE.field(0), pa.repeat(pa.scalar(source_file), n))
        .append_column(LINEAGE.field(1), pa.repeat(at.cast(LINEAGE.field(1).type), n))
        .append_column(LINEAGE.field(2), pa.repeat(pa.scalar(batch_id), n))
    )


def ingest_entity(
    lake: Lake,
    source: str,
    folder: str,
    entity: Entity,
    at: pa.Scalar,
    committed: Callable[..., frozenset[str]],
) -> TableIngest:
    """One Synapse Link entity of one sync folder: one bronze commit, one quarantine commit.

    `committed(layer, *parts)` gives the files a table's commits record."""
    started = time.perf_counter()
    result = TableIngest(source, entity.name)
    rel = {f: _rel(f) for f in entity.files}
    todo_bronze = [
        f for f in entity.files if rel[f] not in committed("bronze", source, entity.name)
    ]
    done_q = committed("quarantine", "bronze", source, entity.name)
    todo_q = [f for f in entity.files if rel[f] not in done_q]
    if not todo_bronze and not todo_q:
        return result
    batch_id = f"{source}/{_name(folder)}"
    quarantined: list[pa.Table] = []
    schema = pa.unify_schemas([entity.arrow_schema, LINEAGE])

    def typed_batches(files: list[LandingFile], keep: bool) -> Iterator[pa.RecordBatch]:
        for f in files:
            for typed, bad in read_csv_file(f, entity, rel[f]):
                if f in todo_q:
                    quarantined.append(bad)
                if keep and len(typed):
                    result.rows += len(typed)
                    yield from _with_lineage(typed, rel[f], batch_id, at).to_batches()

    if todo_bronze:
        reader = pa.RecordBatchReader.from_batches(schema, typed_batches(todo_bronze, True))
        lake.write(
            reader,
            "bronze",
            source,
            entity.name,
            metadata=_meta(batch_id, todo_bronze, rel),
            add_columns=True,  # an attribute added to model.json (types: checked before)
        )
        result.batches, result.files = 1, len(todo_bronze)
    # Crash recovery only: files in bronze whose quarantine commit did not happen.
    for _ in typed_batches([f for f in todo_q if f not in todo_bronze], False):
        pass
    if todo_q:
        q = _quarantine_lineage(quarantined, batch_id, at)
        upgrade_quarantine(lake, "quarantine", "bronze", source, entity.name)  # (before #23)
        lake.write(
            q, "quarantine", "bronze", source, entity.name, metadata=_meta(batch_id, todo_q, rel)
        )
        result.quarantined = len(q)
        if len(q):  # counted in the summary; the first reason is logged
            log.info(
                "%s/%s: %d rows quarantined (first: %s line %s: %s)",
                source,
                entity.name,
                len(q),
                lake.uri("landing", q["_source_file"][0].as_py()),
                q["_line"][0],
                q[REASON][0],
            )
    result.seconds = time.perf_counter() - started
    return result


def _quarantine_lineage(parts: list[pa.Table], batch_id: str, at: pa.Scalar) -> pa.Table:
    """Quarantined rows already carry file and line; add when and in which batch."""
    q = pa.concat_tables(parts) if parts else QUARANTINE_SCHEMA.empty_table()
    n = len(q)
    return q.append_column(
        LINEAGE.field(1), pa.array([at.value] * n, LINEAGE.field(1).type)
    ).append_column(LINEAGE.field(2), pa.array([batch_id] * n, pa.string()))


def _meta(
    batch_id: str, files: Iterable[LandingFile], rel: dict[LandingFile, str]
) -> dict[str, str]:
    return {BATCH_KEY: batch_id, FILES_KEY: json.dumps(sorted(rel[f] for f in files))}


def ingest_delta_table(lake: Lake, source: str, name: str, at: pa.Scalar) -> TableIngest:
    """A current-state Delta source table: each new source version becomes a change batch.

    A Link-to-Fabric Delta table holds current state, not a change feed, so the batch is
    the rows that are new or changed since the last ingested version, plus one
    synthesised `IsDelete = true` row per key that disappeared. Bronze thus stays an
    append-only change feed whatever the source format, and silver has one code path.
    """
    started = time.perf_counter()
    result = TableIngest(source, name)
    src = lake.delta("landing", "delta", source, name)
    latest = src.version()
    marker = f"landing/delta/{source}/{name}@v"
    seen = [
        int(f.rsplit("@v", 1)[1])
        for f in committed_files(lake, "bronze", source, name)
        if f.startswith(marker)
    ]
    previous = max(seen) if seen else None
    if previous == latest:
        return result
    new = lake.read("landing", "delta", source, name, version=latest)
    if previous is None:
        changes = new
    else:
        old = lake.read("landing", "delta", source, name, version=previous)
        changes = _snapshot_changes(old, new, source_table(source, name).key)
    file_id = f"{marker}{latest}"
    batch_id = f"{source}/delta@v{latest}"
    lake.write(
        _with_lineage(changes, file_id, batch_id, at),
        "bronze",
        source,
        name,
        metadata={BATCH_KEY: batch_id, FILES_KEY: json.dumps([file_id])},
    )
    result.batches, result.files, result.rows = 1, 1, len(changes)
    result.seconds = time.perf_counter() - started
    return result


def _snapshot_changes(old: pa.Table, new: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """Rows of `new` not identical in `old`, plus delete markers for keys gone from `new`."""
    con = duckdb.connect()
    con.register("old_t", old)
    con.register("new_t", new)
    on = " AND ".join(f'n."{k}" = o."{k}"' for k in key)
    cols = ", ".join(
        f'o."{c}"'
        if c not in ("IsDelete", "SinkModifiedOn")
        else ("TRUE AS IsDelete" if c == "IsDelete" else "now() AS SinkModifiedOn")
        for c in new.column_names
    )
    sql = f"""
        SELECT * FROM (SELECT * FROM new_t EXCEPT SELECT * FROM old_t)
        UNION ALL
        SELECT {cols} FROM old_t o ANTI JOIN new_t n ON {on}
    """
    return con.sql(sql).to_arrow_table().cast(new.schema)


def load_generic_mapping(path: Path) -> dict | None:
    """The generic source's YAML mapping (None when the project declares no generic source)."""
    if not path.exists():
        return None
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        spec = doc["transactions"]
        mapping = spec["columns"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: needs transactions.columns mapping ({exc})") from exc
    missing = [name for name in GENERIC_REQUIRED if name not in mapping]
    if missing:
        raise ValueError(f"{path}: transactions.columns lacks required {missing}")
    return spec


def ingest_generic(lake: Lake, mapping_path: Path, at: pa.Scalar) -> TableIngest | None:
    """Generic CSV transactions (header row), typed through the YAML column mapping."""
    spec = load_generic_mapping(mapping_path)
    if spec is None:
        return None
    folder = lake.key("landing", "generic")
    listing = lake.store.sizes(folder)
    if not listing:
        return None
    started = time.perf_counter()
    result = TableIngest("generic", "transactions")
    pattern = spec.get("files", "*.csv")
    files = [
        LandingFile(lake.store, key, size)
        for key, size in sorted(listing.items())
        if _matches(key.removeprefix(f"{folder}/"), pattern)
    ]
    rel = {f: f"{_rel(f)}#{f.size}" for f in files}
    done = committed_files(lake, "bronze", "generic", "transactions")
    todo = [f for f in files if rel[f] not in done]
    if not todo:
        return result
    # Canonical name -> the files' column: named by the mapping, typed by GENERIC_COLUMNS.
    mapped = {
        c.name: Column(spec["columns"][c.name], c.cdm_type)
        for c in GENERIC_COLUMNS
        if c.name in spec["columns"]
    }
    schema = Entity("transactions", tuple(mapped.values()), ()).arrow_schema
    batch_id = f"generic/{time.strftime('%Y-%m-%dT%H.%M.%SZ', time.gmtime())}"
    typed_parts, bad_parts = [], []
    lacking: Counter[str] = Counter()  # optional column -> new files without it
    for f in todo:
        if f.size == 0:  # no header and no rows: nothing to ingest or quarantine
            log.info("%s: empty file (0 bytes): no rows", rel[f])
            continue
        absent = _absent_columns(f, mapped, mapping_path)
        lacking.update(absent)
        entity = Entity(
            "transactions", tuple(c for n, c in mapped.items() if n not in absent), (f,)
        )
        for typed, bad in read_csv_file(f, entity, rel[f], header=True):
            typed_parts.append(_with_lineage(_with_nulls(typed, schema), rel[f], batch_id, at))
            bad_parts.append(bad)
    for name, n in lacking.items():
        log.info(
            "generic: %d of %d new files have no %r column (%s): null in bronze, "
            "defaulted in silver",
            n,
            len(todo),
            mapped[name].name,
            name,
        )
    meta = {BATCH_KEY: batch_id, FILES_KEY: json.dumps(sorted(rel[f] for f in todo))}
    q = _quarantine_lineage(bad_parts, batch_id, at)
    upgrade_quarantine(lake, "quarantine", "bronze", "generic", "transactions")  # (before #23)
    lake.write(q, "quarantine", "bronze", "generic", "transactions", metadata=meta)
    typed = (
        pa.concat_tables(typed_parts)
        if typed_parts
        else _with_lineage(schema.empty_table(), "", batch_id, at)
    )
    lake.write(typed, "bronze", "generic", "transactions", metadata=meta)
    result.batches, result.files = 1, len(todo)
    result.rows = len(typed)
    result.quarantined = len(q)
    result.seconds = time.perf_counter() - started
    return result


def _matches(name: str, pattern: str) -> bool:
    """Whether a file's path below the folder matches the mapping's glob pattern, as
    `Path.glob` matches it (each part on its own: "*.csv" does not reach into folders)."""
    parts, pats = name.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats, strict=True)
    )


def _absent_columns(path: LandingFile, mapped: dict[str, Column], mapping_path: Path) -> list[str]:
    """The mapped columns (canonical names) a generic CSV's header row lacks.

    Read before any row, so that a file without a required column stops the ingest with
    one error naming the file and the column, and nothing of the batch is committed.
    """
    # The first line only, as bytes: a later line that is not UTF-8 is quarantined by
    # the reader, it must not fail here.
    with path.open() as fh:
        head = b""
        while (block := fh.read(1 << 16)) and b"\n" not in head and b"\r" not in head:
            head += block
        first = head.split(b"\n")[0].split(b"\r")[0]
    try:
        text = first.removeprefix(b"\xef\xbb\xbf").decode("utf-8")  # Excel writes a BOM
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the header row is not UTF-8 text ({exc})") from exc
    header = next(csv.reader([text]), [])
    absent = [name for name, c in mapped.items() if c.name not in header]
    required = [name for name in absent if name in GENERIC_REQUIRED]
    if required:
        named = ", ".join(f"{mapped[n].name!r} ({n})" for n in required)
        raise ValueError(
            f"{path}: required column {named} is not in the header row {header}; "
            f"file columns are mapped in {mapping_path}"
        )
    return absent


def _with_nulls(typed: pa.Table, schema: pa.Schema) -> pa.Table:
    """The file's typed columns in `schema`'s order, null where the file lacks one: every
    generic file lands in the one bronze table, whichever optional columns it has."""
    return pa.table(
        {
            f.name: typed[f.name] if f.name in typed.column_names else pa.nulls(len(typed), f.type)
            for f in schema
        },
        schema=schema,
    )
