"""The one module that reads and writes lake tables (Delta, through `deltalake`).

Why Delta everywhere: each write is a single atomic commit, so a reader (or a crashed
run's re-run) never sees half a batch, and every table keeps its versions for
incremental reads and audit. Paths are built from the configured lake root only.

Row-level changes (silver merges, gold patches) are merge on read: the replaced rows are
deleted by a Delta deletion vector on their file and the new rows appended, in one
commit this module writes itself (`delete_and_append`); every reader here applies the
vectors, and `purge_deleted` rewrites the files when the hidden rows must physically go.

The root is a local folder (the embedded default) or a container on Azure storage
(`az://`, `abfss://`, see `c360ml.storage.location`): delta-rs reaches both with the
storage options of the root, and the files c360ml writes itself (its commits, JSON state)
go through `c360ml.storage.objects`, whose put-if-absent publishes a commit on either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, TableFeatures, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from c360ml.storage import deletion_vectors
from c360ml.storage.location import LakeLocation, parse_location
from c360ml.storage.objects import (
    AzureLakeStore,
    ContainerNotFoundError,
    LakeStore,
    LocalStore,
    first_line,
    known_error,
    open_store,
)

log = logging.getLogger(__name__)

LAYERS = ("landing", "bronze", "silver", "gold", "quarantine", "export", "state")
# Rows per Parquet row group. DuckDB scans a file's row groups in parallel, and the
# writers' default (1,048,576) leaves a 1M-row table in one, read by one core. Smaller
# row groups read a little faster still, but delta-rs writes slower with them; at this
# size it writes as fast as with the default.
ROW_GROUP = 524_288


class CommitConflictError(RuntimeError):
    """Another writer committed the version a c360ml commit was built for. Never retried
    blindly: a deletion-vector commit computed on the older version would undo the
    winner's deletes. The table stays valid (the loser published nothing)."""


@dataclass(frozen=True)
class _Where:
    """One table: its store and key (for the files c360ml writes itself), and the URI and
    storage options delta-rs opens it with (a local table's URI is its folder, as always)."""

    store: LakeStore
    key: str
    uri: str
    options: dict[str, str] | None

    @property
    def remote(self) -> bool:
        return self.options is not None

    def log(self, name: str = "") -> str:
        return f"{self.key}/_delta_log/{name}" if name else f"{self.key}/_delta_log"

    def relative(self, uri: str) -> str:
        """A file's path in the log: relative to the table's folder."""
        if self.remote:
            return _local(uri).removeprefix(self.uri.rstrip("/") + "/")
        return os.path.relpath(_local(uri), self.uri)

    def arrow(self, uri: str) -> tuple[pafs.FileSystem | None, str]:
        """A data file as pyarrow opens it: (filesystem, path); local files by their path
        alone, as pyarrow infers the local filesystem."""
        if not self.remote:
            return None, _local(uri)
        fs, _ = self.store.filesystem()
        return fs, self.store.arrow_path(f"{self.key}/{self.relative(uri)}")

    def table(self, version: int | None = None) -> DeltaTable:
        return DeltaTable(self.uri, version=version, storage_options=self.options)

    @contextmanager
    def errors(self) -> Iterator[None]:
        """delta-rs' errors on object storage in one line naming the table's URI, without a
        secret (their messages run over many lines and quote request URLs, where a SAS
        token rides); a refused credential or a missing container as such."""
        if not self.remote or not isinstance(self.store, AzureLakeStore):
            yield
            return
        credentials = self.store.credentials
        try:
            yield
        except (DeltaError, OSError) as exc:
            found = known_error(exc, self.uri, credentials)
            if found is not None:
                raise found from None
            line = f"{self.uri}: {first_line(exc, credentials)}"
            try:
                again = type(exc)(line)
            except TypeError:  # an error type that takes other arguments
                again = RuntimeError(line)
            raise again from None


def _as_where(root: Path | _Where) -> _Where:
    """A local table folder as a `_Where` (callers and tests that name a folder)."""
    if isinstance(root, _Where):
        return root
    store = LocalStore(parse_location(Path(root).parent))
    return _Where(store, Path(root).name, str(Path(root).resolve()), None)


@dataclass(frozen=True)
class Lake:
    """A lake rooted at one folder or container; tables are addressed as (layer, name
    parts...). `root` is a local folder (a `Path`) or a URI (`az://container/path`,
    `abfss://container@account.dfs.core.windows.net/path`); credentials come from the
    environment (see `c360ml.storage.location.AzureCredentials`)."""

    root: Path | str
    location: LakeLocation = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # delta-rs names files by the table's real path: a root reached through a
        # symbolic link would not match them (parse_location resolves a local one).
        location = parse_location(self.root)
        object.__setattr__(self, "location", location)
        root = location.uri() if location.remote else Path(location.path)
        object.__setattr__(self, "root", root)

    @property
    def remote(self) -> bool:
        """Whether the lake is on object storage (else a local folder)."""
        return self.location.remote

    @cached_property
    def store(self) -> LakeStore:
        """The lake's files that are not table data: state, commits, leases, landing."""
        return open_store(self.location)

    @property
    def storage_options(self) -> dict[str, str] | None:
        """delta-rs' `storage_options` for this lake's tables (None on local disk). They
        hold credentials: pass them on, never log them."""
        store = self.store
        return store.storage_options() if isinstance(store, AzureLakeStore) else None

    def path(self, layer: str, *parts: str) -> Path:
        """A local lake's folder of a table or file. A lake on object storage has no local
        path: use `uri` (delta-rs, Spark) or `store` (files) there."""
        _check_layer(layer)
        if self.remote:
            raise NotImplementedError(
                f"{self.uri(layer, *parts)}: a lake on object storage has no local path "
                "(Lake.uri and Lake.store reach it)"
            )
        return self.root.joinpath(layer, *parts)  # type: ignore[union-attr]

    def uri(self, layer: str, *parts: str) -> str:
        """What delta-rs (or Spark) opens for a table or file: a local lake's folder, else
        the object's URI."""
        _check_layer(layer)
        return self.location.uri(layer, *parts)

    def key(self, layer: str, *parts: str) -> str:
        """A file's key in `store` (relative to the lake root)."""
        _check_layer(layer)
        return "/".join((layer, *parts))

    def _where(self, layer: str, *parts: str) -> _Where:
        return _Where(
            self.store, self.key(layer, *parts), self.uri(layer, *parts), self.storage_options
        )

    def exists(self, layer: str, *parts: str) -> bool:
        where = self._where(layer, *parts)
        with where.errors():
            return DeltaTable.is_deltatable(where.uri, storage_options=where.options)

    def tables(self, layer: str, *parts: str) -> list[tuple[str, ...]]:
        """Every Delta table below a folder, as name parts relative to the layer."""
        if self.remote:
            found = _table_folders(self.store, self.key(layer, *parts))
            return [tuple(k.split("/")[1:]) for k in sorted(found)]
        base = self.path(layer, *parts)
        if not base.exists():
            return []
        found = sorted(p.parent for p in base.rglob("_delta_log"))
        return [tuple(p.relative_to(self.path(layer)).parts) for p in found]

    def delta(self, layer: str, *parts: str) -> DeltaTable:
        """The table at its latest version, shared by the callers in this process: load no
        other version into it (`delta_at` gives one of its own)."""
        where = self._where(layer, *parts)
        try:
            with where.errors():
                return _latest(where)
        except ContainerNotFoundError:
            raise
        except (TableNotFoundError, FileNotFoundError) as exc:
            raise FileNotFoundError(f"no Delta table at {where.uri}") from exc

    def delta_at(self, layer: str, *parts: str, version: int | None) -> DeltaTable:
        """The table at `version`, an object of its own (None: the latest, `delta`)."""
        if version is None:
            return self.delta(layer, *parts)
        where = self._where(layer, *parts)
        with where.errors():
            return where.table(version)

    def files_at(self, layer: str, *parts: str, version: int) -> set[str] | None:
        """The file URIs of an older version; None when its log is gone (an erasure cuts
        the history before it, see `forget_history`): the caller falls back to a full read."""
        try:
            return set(self.delta_at(layer, *parts, version=version).file_uris())
        except (DeltaError, OSError):
            return None

    def version(self, layer: str, *parts: str) -> int | None:
        return self.delta(layer, *parts).version() if self.exists(layer, *parts) else None

    def dataset(self, layer: str, *parts: str, version: int | None = None) -> ds.Dataset:
        """Arrow dataset of the live rows (zero-copy input for DuckDB).

        delta-rs builds no Arrow dataset of a table with deletion vectors: then the files
        without one are scanned lazily and those with one are read, masked, into memory
        (`read` streams them one file at a time instead)."""
        where = self._where(layer, *parts)
        clean, masked = _split(self.delta_at(layer, *parts, version=version), where)
        if not masked:
            return clean
        return ds.dataset([clean, ds.dataset(pa.concat_tables(m() for m in masked))])

    def files_dataset(
        self, layer: str, *parts: str, files: Iterable[str], schema: pa.Schema
    ) -> ds.Dataset:
        """Some data files of a table (URIs as `file_uris` names them) as one Arrow
        dataset, read whole: no deletion vector is applied (for the files an append-only
        table gained since a version). On object storage through the store's filesystem."""
        where = self._where(layer, *parts)
        found = [where.arrow(f) for f in files]
        fs = found[0][0] if found else None
        return ds.dataset([p for _, p in found], schema=schema, format="parquet", filesystem=fs)

    def read(
        self,
        layer: str,
        *parts: str,
        columns: Iterable[str] | None = None,
        version: int | None = None,
        filter: ds.Expression | None = None,
    ) -> pa.Table:
        """The table, or only `columns` and the rows matching `filter` (both pushed into
        the Arrow scan, so what is dropped is never held in memory as a whole)."""
        cols = list(columns) if columns is not None else None
        where = self._where(layer, *parts)
        clean, masked = _split(self.delta_at(layer, *parts, version=version), where)
        pieces = [clean.to_table(cols, filter=filter)]
        pieces += [_select(m, cols, filter).to_table(cols, filter=filter) for m in masked]
        return pa.concat_tables(pieces)

    def batches(
        self,
        layer: str,
        *parts: str,
        columns: list[str] | None = None,
        filter: ds.Expression | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """`read`'s rows as a stream of batches (memory: a batch, or a masked file)."""
        clean, masked = _split(self.delta(layer, *parts), self._where(layer, *parts))
        yield from clean.to_batches(columns=columns, filter=filter)
        for m in masked:
            yield from _select(m, columns, filter).to_batches(columns=columns, filter=filter)

    # Files of the lake that are not tables (JSON state, markers): through `store`, on
    # local disk and object storage alike.
    def read_json(self, layer: str, *parts: str) -> Any:
        """A JSON file of the lake, or None when it does not exist."""
        try:
            return json.loads(self.store.read_text(self.key(layer, *parts)))
        except ContainerNotFoundError:
            raise
        except FileNotFoundError:
            return None

    def write_json(self, value: Any, layer: str, *parts: str) -> None:
        """Write (or replace) a JSON file of the lake, atomically."""
        self.store.write_text(self.key(layer, *parts), json.dumps(value, indent=1))

    def delete_file(self, layer: str, *parts: str) -> None:
        """Remove a file of the lake (one already gone is no error)."""
        self.store.delete(self.key(layer, *parts))

    def delete_folder(self, layer: str, *parts: str) -> None:
        """Remove a folder of the lake and everything below it (a table that is no longer
        written): the local folder itself, or every object under its prefix."""
        if not self.remote:
            shutil.rmtree(self.path(layer, *parts), ignore_errors=True)
            return
        for key in self.list_files(layer, *parts):
            self.store.delete(key)

    def list_files(self, layer: str, *parts: str) -> list[str]:
        """Every file below a folder, as keys relative to the lake root, sorted."""
        return self.store.list(self.key(layer, *parts))

    def schema(self, layer: str, *parts: str) -> pa.Schema:
        """The table's Arrow schema, without reading its rows."""
        return _file_schema(self.delta(layer, *parts), self._where(layer, *parts))

    def count(self, layer: str, *parts: str) -> int:
        """Live rows: the files' record counts less their deletion vectors' (no scan)."""
        table, where = self.delta(layer, *parts), self._where(layer, *parts)
        records = pa.table(table.get_add_actions(flatten=True))["num_records"]
        hidden = sum(len(r) for r in _deleted(table, where).values())
        return int(pc.sum(records).as_py() or 0) - hidden

    def live_files(self, layer: str, *parts: str) -> tuple[list[str], dict[str, np.ndarray]]:
        """The live files (as `file_uris` names them), and per file with a deletion vector
        the row positions it deletes, from one load of the table."""
        table = self.delta(layer, *parts)
        return table.file_uris(), _deleted(table, self._where(layer, *parts))

    def delete_and_append(
        self,
        layer: str,
        *parts: str,
        deletes: dict[str, np.ndarray],
        rows: pa.Table | None = None,
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Delete rows by position (file URI -> row positions) and append `rows`, in one
        commit, without rewriting a file: each touched file gets a deletion vector (the
        union of its old one and the new positions; a file it would leave with less than
        1 - REWRITE_SHARE of its rows is rewritten instead), the rows a new file (with the
        untouched small files folded in, past SMALL_FILES_MAX of them). Returns the new
        version.

        Why not delta-rs' merge: it rewrites every file holding a changed row, and a
        refresh's changes lie in every file (see `c360ml.storage.deletion_vectors`). The commit
        is written as delta-rs writes its own: the next version's JSON, created only if
        absent, so a concurrent writer fails instead of being overwritten.
        """
        where = self._where(layer, *parts)
        table = self.delta(layer, *parts)
        if not _has_dvs(table):
            _enable_deletion_vectors(table, where)
            table = self.delta(layer, *parts)
        version, schema, now = table.version(), _file_schema(table, where), _now()
        live, old = _live_adds(where, version), _deleted(table, where)
        actions: list[dict] = []
        for uri, positions in deletes.items():
            if len(positions):
                union = np.union1d(old.get(uri, np.empty(0, np.int64)), positions)
                add = live[where.relative(uri)]
                actions += _replace_file(where, uri, add, union, schema, now)
        if rows is not None and len(rows):
            # Each merge appends a small file: past SMALL_FILES_MAX of them, the untouched
            # ones are folded into this one (a refresh runs up to 4 times a day).
            small = [
                uri
                for uri in table.file_uris()
                if live[where.relative(uri)]["size"] < SMALL_FILE and uri not in deletes
            ]
            if len(small) >= SMALL_FILES_MAX:
                empty = np.empty(0, np.int64)
                folded = [_masked_file(where, u, schema, old.get(u, empty)) for u in small]
                actions += [_remove(live[where.relative(u)], now) for u in small]
                rows = pa.concat_tables([*folded, rows.select(schema.names).cast(schema)])
            actions.append({"add": _write_file(where, rows, schema, now)})
        _commit_actions(where, version, "DELETE AND APPEND", actions, metadata)
        return version + 1

    def read_pandas(self, layer: str, *parts: str, **kwargs) -> pd.DataFrame:
        return self.read(layer, *parts, **kwargs).to_pandas()

    def write(
        self,
        data: pa.Table | pd.DataFrame,
        layer: str,
        *parts: str,
        mode: str = "append",
        partition_by: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        add_columns: bool = False,
        predicate: str | None = None,
    ) -> int:
        """One atomic commit; returns the new table version.

        `metadata` lands in the commit info (e.g. the batch id), which is what lets
        ingest tell a committed batch from one that crashed before its commit. With
        `add_columns` an append may bring columns the table lacks (null in its older rows)
        and lack some it has (null in the new rows); the caller checks that the columns
        both have keep their type (delta-rs would cast, e.g. "12" to 12). Without it a
        schema that differs is an error: in silver and gold it would be a defect. With
        `predicate` (a SQL condition; mode "overwrite") only the rows matching it are
        replaced, the others kept, the schemas merged (one as_of of a job's output).
        """
        table = (
            pa.Table.from_pandas(data, preserve_index=False)
            if isinstance(data, pd.DataFrame)
            else data
        )
        where = self._where(layer, *parts)
        if not where.remote:
            Path(where.uri).parent.mkdir(parents=True, exist_ok=True)
        schema_mode = "overwrite" if mode == "overwrite" else "merge" if add_columns else None
        if predicate is not None:
            if mode != "overwrite":
                raise ValueError(f"{where.uri}: rows replaced by a predicate need mode overwrite")
            schema_mode = "merge"
        with where.errors():
            write_deltalake(
                where.uri,
                table,
                mode=mode,
                partition_by=partition_by,
                schema_mode=schema_mode,
                predicate=predicate,
                commit_properties=_commit(metadata),
                writer_properties=WriterProperties(max_row_group_size=ROW_GROUP),
                storage_options=where.options,
            )
            return _latest(where).version()

    def purge_deleted(
        self, layer: str, *parts: str, holding: tuple[str, list] | None = None
    ) -> int:
        """Rewrite the files with a deletion vector without the rows it hides (which are
        still in the file): for an erasure. With `holding` (column, values), only the
        files whose hidden rows have one of the values. Returns the files rewritten."""
        where = self._where(layer, *parts)
        table = self.delta(layer, *parts)
        deleted = _deleted(table, where)
        version, schema, now = table.version(), _file_schema(table, where), _now()
        if holding is not None:
            column, values = holding
            wanted = pa.array(values).cast(schema.field(column).type)
            deleted = {
                uri: rows
                for uri, rows in deleted.items()
                if pc.any(pc.is_in(_hidden(where, uri, schema, rows, column), wanted)).as_py()
            }
        if not deleted:
            return 0
        live = _live_adds(where, version)
        actions: list[dict] = []
        for uri, rows in deleted.items():
            actions += _replace_file(where, uri, live[where.relative(uri)], rows, schema, now, 0)
        _commit_actions(where, version, "PURGE", actions)
        return len(deleted)

    def unreferenced_files(self, layer: str, *parts: str) -> list[str]:
        """The files of a table that no version in its log uses, as keys of `store`
        (delta-rs' vacuum, dry run, every retention waived): what an erasure reads and
        removes on a local folder and a container alike."""
        where = self._where(layer, *parts)
        with where.errors():
            names = self.delta(layer, *parts).vacuum(
                retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True
            )
        relative = (where.relative(n) if "://" in n else n for n in names)
        return sorted(f"{where.key}/{n}" for n in relative)

    def forget_history(self, layer: str, *parts: str) -> int:
        """Make the current version the table's first: what delta-rs' `cleanup_metadata`
        does once `delta.logRetentionDuration` has passed, at once (for an erasure: older
        commits name the erased in their file statistics and predicates). A commit with
        no action but its own info comes first, checkpointed, so the log kept names
        nobody; it carries the custom metadata of the commits it replaces (what ingest,
        silver and gold read back, see `commit_metadata`: file names, versions, counts,
        never a row's value). Returns the log files deleted."""
        where = self._where(layer, *parts)
        version = _latest(where).version()
        carried = {HISTORY_KEY: json.dumps(self.commit_metadata(layer, *parts))}
        _commit_actions(where, version, "FORGET HISTORY", [], carried)
        with where.errors():
            where.table().create_checkpoint()
        names = [k.removeprefix(where.log() + "/") for k in where.store.list(where.log())]
        gone = [n for n in names if "/" not in n and n[:20].isdigit() and int(n[:20]) <= version]
        for name in gone:
            where.store.delete(where.log(name))
        return len(gone)

    def vacuum(self, retention_hours: int, keep: dict[tuple[str, ...], int] | None = None) -> int:
        """Remove the files of every table that no version of the last `retention_hours`
        needs (delta-rs' vacuum), except those of the versions in `keep` (table -> version):
        the normal retention, after which a reader still on an older version loses it.
        Returns the files removed."""
        removed = 0
        for layer in ("bronze", "silver", "gold", "state", "quarantine"):
            for parts in self.tables(layer):
                version = (keep or {}).get((layer, *parts))
                removed += len(
                    self.delta(layer, *parts).vacuum(
                        retention_hours=retention_hours,
                        enforce_retention_duration=False,
                        dry_run=False,
                        keep_versions=None if version is None else [version],
                    )
                )
        return removed

    def commit_metadata(self, layer: str, *parts: str) -> list[dict[str, str]]:
        """The custom metadata of every commit of a table, oldest first (those of commits
        an erasure cut from the log included, see `forget_history`)."""
        found: list[dict[str, str]] = []
        for h in reversed(self.delta(layer, *parts).history()):
            meta = {k: v for k, v in h.items() if isinstance(v, str)}
            found += json.loads(meta.pop(HISTORY_KEY, "[]"))
            found.append(meta | user_metadata(meta.get(USER_METADATA)))
        return found


USER_METADATA = "userMetadata"  # the commit info field Spark's writers fill (see below)


def user_metadata(text: str | None) -> dict[str, str]:
    """Custom metadata a Spark writer recorded: Delta's `userMetadata` holds one string
    (Spark's `.option("userMetadata", ...)`, Sail's and Delta's on the JVM alike), which
    c360ml's Spark engine fills with a JSON object of strings, so that one commit records
    what delta-rs records in the commit info's own keys. Any other string: nothing."""
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str)}


HISTORY_KEY = "c360ml.forgotten_commits"  # custom metadata of commits cut from the log
CHECKPOINT_INTERVAL = 100  # delta-rs' default: a checkpoint every 100 versions
# A file whose vector deletes more than this share of its rows is rewritten instead: reads
# of a masked file load it whole, so what they skip stays bounded (at ~1% of rows changed
# per refresh, a file is rewritten every 20-odd refreshes).
REWRITE_SHARE = 0.2
SMALL_FILE = 32 * 2**20  # bytes: smaller than a first build's files (~100 MB)
SMALL_FILES_MAX = 8  # small files a table may hold before a merge folds them into its own


def _replace_file(
    where: _Where,
    uri: str,
    add: dict,
    deleted: np.ndarray,
    schema: pa.Schema,
    now: int,
    rewrite_share: float = REWRITE_SHARE,
) -> list[dict]:
    """The actions that delete these rows (all of the file's deleted rows) from a live
    file: its remove, and its add with the new vector, or a rewritten file beyond
    `rewrite_share`, or nothing when no row is left."""
    remove = _remove(add, now)
    stats = json.loads(add.get("stats") or "{}")  # optional in Delta: else the footer's
    records = stats.get("numRecords") or _footer(where, uri).num_rows
    if len(deleted) >= records:
        return [remove]
    if len(deleted) > rewrite_share * records:
        kept = _masked_file(where, uri, schema, deleted)
        return [remove, {"add": _write_file(where, kept, schema, now)}]
    same = {k: v for k, v in add.items() if v is not None and k != "deletionVector"}
    same["deletionVector"] = deletion_vectors.descriptor(deleted)
    if stats:  # its bounds still count the hidden rows: wide, as Delta's own DELETE marks them
        same["stats"] = json.dumps(stats | {"tightBounds": False})
    return [remove, {"add": same | {"dataChange": True}}]


def _remove(add: dict, now: int) -> dict:
    """The remove action of a live file, naming the vector it had (how a reader pairs the
    two: a file's identity is its path and its vector)."""
    remove = {
        "path": add["path"],
        "deletionTimestamp": now,
        "dataChange": True,
        "extendedFileMetadata": True,
        "partitionValues": add.get("partitionValues") or {},
        "size": add["size"],
    }
    if add.get("deletionVector"):
        remove["deletionVector"] = add["deletionVector"]
    return {"remove": remove}


_LOADED = threading.local()  # .tables: path -> (identity, table), per thread (see _latest)


def _latest(where: _Where) -> DeltaTable:
    """The table at `where`, brought up to its latest version.

    Loaded once (per thread) and then updated with the commits since: an update costs a
    fraction of a load, and a build asks for tables hundreds of times.
    The first commit file's identity tells a table removed and written again (whose
    versions restart) from the one loaded. Per thread, as delta-rs refuses a table object
    used by two threads at once (one updating it while the other reads it)."""
    first = where.store.head(where.log(f"{0:020d}.json"))
    if first is None:  # no table, or its first commits cleaned up: not cached
        return where.table()
    identity = first.identity
    if not hasattr(_LOADED, "tables"):
        _LOADED.tables = {}
    cached = _LOADED.tables.get(where.uri)
    if cached is not None and cached[0] == identity:
        cached[1].update_incremental()
        return cached[1]
    table = where.table()
    _LOADED.tables[where.uri] = (identity, table)
    return table


_DELETED_CACHE: dict[tuple, dict[str, np.ndarray]] = {}
_DELETED_CACHE_SIZE = 256  # tables x versions; a version's vectors never change


def _deleted(table: DeltaTable, where: _Where) -> dict[str, np.ndarray]:
    """File URI (as `file_uris` spells it) -> deleted row positions, for files with a DV.

    Cached per table version: delta-rs expands each vector into a whole-file mask, and a
    build registers every table in each of its DuckDB connections (over a hundred times
    in an incremental gold build)."""
    if not _has_dvs(table):
        return {}
    # The version's commit file identifies it: a table removed and written again reaches
    # the same version numbers with other contents.
    commit = where.store.head(where.log(f"{table.version():020d}.json"))
    if commit is None:  # a version known from a checkpoint only: not cached
        return _read_deleted(table)
    key = (table.table_uri, table.version(), commit.identity)
    found = _DELETED_CACHE.get(key)  # one lookup: another thread may clear the cache
    if found is None:
        if len(_DELETED_CACHE) >= _DELETED_CACHE_SIZE:
            _DELETED_CACHE.clear()
        found = _DELETED_CACHE[key] = _read_deleted(table)
    return found


def _read_deleted(table: DeltaTable) -> dict[str, np.ndarray]:
    reader = pa.RecordBatchReader.from_stream(table.deletion_vectors())
    out = {}
    for batch in reader:
        masks = batch["selection_vector"]  # keep-masks of whole files: not as Python lists
        keep = masks.values.to_numpy(zero_copy_only=False)
        bounds = masks.offsets.to_numpy()
        for i, path in enumerate(batch["filepath"].to_pylist()):
            deleted = np.flatnonzero(~keep[bounds[i] : bounds[i + 1]])
            out[_local(path)] = deleted
    return out


def _split(table: DeltaTable, where: _Where) -> tuple[ds.Dataset, list]:
    """The table's files without a deletion vector as a lazy Arrow dataset, and a loader
    per file with one (its rows less those it deletes). A table that never had one is
    delta-rs' own dataset: delta-rs refuses tables with the feature from then on."""
    if not _has_dvs(table):
        return table.to_pyarrow_dataset(), []
    deleted, schema = _deleted(table, where), _file_schema(table, where)
    clean = [where.arrow(f) for f in table.file_uris() if f not in deleted]
    masked = [partial(_masked_file, where, f, schema, r) for f, r in deleted.items()]
    fs = clean[0][0] if clean else None
    return ds.dataset([p for _, p in clean], schema=schema, format="parquet", filesystem=fs), masked


def _enable_deletion_vectors(table: DeltaTable, where: _Where) -> None:
    """Add the deletionVectors feature; a writer that lost the race to add it finds it
    added (the same protocol change) and goes on."""
    try:
        with where.errors():
            table.alter.add_feature(
                TableFeatures.DeletionVectors, allow_protocol_versions_increase=True
            )
    except CommitFailedError:
        if not _has_dvs(where.table()):
            raise


def _has_dvs(table: DeltaTable) -> bool:
    return "deletionVectors" in (table.protocol().reader_features or [])


def _file_schema(table: DeltaTable, where: _Where) -> pa.Schema:
    """The Arrow schema the table's files are written with (its newest file's), with
    delta-rs' string_view as string (Arrow's filter has no string_view kernel), and the
    columns the newest file lacks (a file rewritten from one older than a column) from
    the table's own schema."""
    logical = pa.schema(table.schema().to_arrow())
    files = table.file_uris()
    if files:
        path, fs = _open(where, _newest(where, table, files))
        newest = pq.read_schema(path, filesystem=fs)
    else:
        newest = logical
    views = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}
    fields = [newest.field(f.name) if f.name in newest.names else f for f in logical]
    return pa.schema([f.with_type(views.get(f.type, f.type)) for f in fields])


def _masked_file(
    where: _Where,
    path: str,
    schema: pa.Schema,
    deleted: np.ndarray,
    columns: list[str] | None = None,
) -> pa.Table:
    """One data file's rows (`columns` of them) without those its deletion vector deletes."""
    fs, file = where.arrow(path)
    rows = ds.dataset(file, schema=schema, format="parquet", filesystem=fs).to_table(columns)
    keep = np.ones(len(rows), bool)
    keep[deleted[deleted < len(rows)]] = False
    return rows.filter(pa.array(keep))


def _select(masked, columns: list[str] | None, filter: ds.Expression | None) -> ds.Dataset:
    """One masked file as a dataset: only `columns` of it, all of them for a filter (which
    may read others)."""
    return ds.dataset(masked(columns if filter is None else None))


def _hidden(
    where: _Where, path: str, schema: pa.Schema, deleted: np.ndarray, column: str
) -> pa.Array:
    """The values of one column in the rows a file's deletion vector hides."""
    fs, file = where.arrow(path)
    data = ds.dataset(file, schema=schema, format="parquet", filesystem=fs)
    values = data.to_table([column])[column]
    return values.take(pa.array(deleted[deleted < len(values)]))


def _local(uri: str) -> str:
    """A file URI as `file_uris` spells it (no scheme)."""
    return uri.removeprefix("file://")


def _table_folders(store: LakeStore, prefix: str) -> list[str]:
    """The keys of the Delta tables at or below a folder, found level by level: a folder
    with a `_delta_log` is a table, and what lies in it is not walked (its data files)."""
    below = store.folders(prefix)
    if f"{prefix}/_delta_log" in below:
        return [prefix]
    return [table for folder in below for table in _table_folders(store, folder)]


def _now() -> int:
    return int(time.time() * 1000)


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"unknown lake layer {layer!r}; expected one of {LAYERS}")


def _open(where: _Where, uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) of a data file, the argument order of pyarrow.parquet's readers."""
    fs, path = where.arrow(uri)
    return path, fs


def _footer(where: _Where, uri: str) -> pq.FileMetaData:
    path, fs = _open(where, uri)
    return pq.read_metadata(path, filesystem=fs)


def _newest(where: _Where, table: DeltaTable, files: list[str]) -> str:
    """The table's most recently written file: by its modification time on local disk (as
    always), by its add action's on object storage (a blob's time would cost a request)."""
    if not where.remote:
        return max(files, key=os.path.getmtime)
    adds = pa.table(table.get_add_actions(flatten=True))
    times = dict(zip(adds["path"].to_pylist(), adds["modification_time"].to_pylist(), strict=True))
    return max(files, key=lambda f: times.get(where.relative(f)) or 0)


def _live_adds(where: _Where, version: int) -> dict[str, dict]:
    """The live add actions (path -> action) at `version`, replayed from the log: the last
    checkpoint, then the JSON commits after it (delta-rs' API gives no DV descriptors, and
    a file's remove must name the one it had)."""
    store = where.store
    live: dict[str, dict] = {}
    start = 0
    try:
        marker = json.loads(store.read_text(where.log("_last_checkpoint")))
    except FileNotFoundError:
        marker = None
    if marker is not None and marker["version"] <= version:
        checkpoint = marker["version"]
        start = checkpoint + 1
        with store.open_input(where.log(f"{checkpoint:020d}.checkpoint.parquet")) as file:
            adds = pq.read_table(file, columns=["add"])
        for add in adds["add"].drop_null().to_pylist():
            add["partitionValues"] = dict(add.get("partitionValues") or [])
            live[add["path"]] = add
    for v in range(start, version + 1):
        for line in store.read_text(where.log(f"{v:020d}.json")).splitlines():
            action = json.loads(line) if line.strip() else {}
            if "add" in action:
                live[action["add"]["path"]] = action["add"]
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    return live


def _write_file(where: _Where, rows: pa.Table, schema: pa.Schema, now: int) -> dict:
    """A new data file of `rows` in the table's folder, and its add action."""
    name = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
    fs, path = where.arrow(f"{where.uri}/{name}")
    pq.write_table(
        rows.select(schema.names).cast(schema),
        path,
        compression="snappy",
        row_group_size=ROW_GROUP,
        filesystem=fs,
    )
    written = where.store.head(f"{where.key}/{name}")
    if written is None:
        raise FileNotFoundError(f"{where.uri}/{name}: written, then not found")
    return {
        "path": name,
        "partitionValues": {},
        "size": written.size,
        "modificationTime": now,
        "dataChange": True,
        "stats": json.dumps({"numRecords": len(rows)}),
    }


def _commit_actions(
    where: _Where,
    read_version: int,
    operation: str,
    actions: list[dict],
    metadata: dict[str, str] | None = None,
) -> None:
    """Commit the actions as the version after `read_version` (a checkpoint every
    CHECKPOINT_INTERVAL versions, as delta-rs would write)."""
    info = {
        "timestamp": _now(),
        "operation": operation,
        "operationParameters": {},
        "readVersion": read_version,
        "clientVersion": "c360ml",
        **(metadata or {}),
    }
    _commit_json(where, read_version + 1, [{"commitInfo": info}, *actions])
    if (read_version + 1) % CHECKPOINT_INTERVAL == 0:
        with where.errors():
            where.table().create_checkpoint()


def _commit_json(root: Path | _Where, version: int, actions: list[dict]) -> None:
    """Publish a commit as `_delta_log/<version>.json`, atomically and only if absent: a
    local file linked into place, a blob put with `mode="create"` (see
    `c360ml.storage.objects`). A commit that loses the race raises CommitConflictError
    naming the table and version, and leaves the winner's commit as it was."""
    where = _as_where(root)
    body = ("\n".join(json.dumps(a) for a in actions) + "\n").encode()
    try:
        where.store.create(where.log(f"{version:020d}.json"), body)
    except FileExistsError:
        raise CommitConflictError(
            f"{where.uri}: version {version} was committed by another writer; this commit "
            "was built on the version before it and is not retried (run the step again)"
        ) from None


def _commit(metadata: dict[str, str] | None) -> CommitProperties | None:
    """Custom commit metadata (what ingest and gold record their progress in)."""
    return CommitProperties(custom_metadata=metadata) if metadata else None
