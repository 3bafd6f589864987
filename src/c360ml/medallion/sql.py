"""Run the SQL files of `pipelines/sql/` with DuckDB over lake tables (their Parquet files).

A lake on object storage is read by the same Parquet scans, through an fsspec filesystem
registered with DuckDB for the lake's URI scheme (DuckDB's own Azure extension is
downloaded at run time, which a machine without that host cannot do).

The SQL is kept to constructs Spark SQL also accepts (no QUALIFY, no `::` casts), so the
same files can run on Spark. `${name}` placeholders are filled from typed settings.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from string import Template

import duckdb
import numpy as np
import pyarrow as pa

from c360ml.config import Settings
from c360ml.storage.lake import Lake
from c360ml.storage.location import redact

STREAM_ROWS = 500_000  # rows per record batch of a streamed result
MEMORY_LIMIT = "3GB"  # DuckDB spills to disk beyond this (a build's budget is 8 GB)


_database: list[duckdb.DuckDBPyConnection] = []  # this process's DuckDB, once opened
_opening = threading.Lock()
# URI scheme -> what the filesystem DuckDB reads it with was made for (credentials)
_reaching: dict[str, object] = {}


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection as every stage uses it: UTC, bounded memory (spilling to the
    system temp folder, not the working directory), results streamed without keeping
    insertion order (every query's result is written as a set).

    A cursor of one in-memory database per process: opening a database costs a hundred
    times what a cursor does, and an incremental build opens dozens. A cursor keeps its
    own registered tables, temporary tables and views, so callers (and threads, a cursor
    each) share nothing; which is why every view here is TEMP."""
    with _opening:
        if not _database:
            database = duckdb.connect()
            database.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
            temp = Path(tempfile.gettempdir()) / "c360ml-duckdb"
            database.execute(f"SET temp_directory = '{temp}'")
            database.execute("SET preserve_insertion_order = false")
            _database.append(database)
    con = _database[0].cursor()
    con.execute("SET TimeZone = 'UTC'")
    return con


def connect(lake: Lake, queries: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with lake tables registered as views named layer_table.

    Bronze views are `bronze_<source>_<table>`, silver `silver_<table>`, gold `gold_<table>`;
    a table that does not exist yet is simply not registered. With `queries` (SQL texts,
    see `sql_text`), only the tables they name: each registration opens the table's log
    and reads its deletion vectors, and an incremental gold build registered 167.
    """
    words = None if queries is None else {w for q in queries for w in re.findall(r"\w+", q)}
    con = duckdb_connection()
    for layer in ("bronze", "silver", "gold"):
        for parts in lake.tables(layer):
            view = f"{layer}_{'_'.join(parts)}"
            if words is None or view in words:
                register(con, lake, view, layer, *parts)
    return con


def register(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    view: str,
    layer: str,
    *parts: str,
    positions: bool = False,
) -> None:
    """The live rows of a lake table as a view, read by DuckDB's own Parquet reader.

    Why not the Arrow dataset (zero copy, as before): DuckDB reads Parquet on every core
    and reads only the columns a query uses, with the files' statistics for planning
    (gold's largest queries run markedly faster this way). Files
    written at other schema versions are read by column name. A table with no files is
    registered from its Arrow schema. The rows a file's deletion vector deletes are
    anti-joined away by (filename, file_row_number), in those files only; with
    `positions` every row keeps both columns (what `c360ml.storage.lake.Lake.delete_and_append`
    takes).
    """
    files, deleted = lake.live_files(layer, *parts)
    if lake.remote:
        _reach_store(con, lake)
    if not files:
        empty = lake.dataset(layer, *parts).schema.empty_table()
        if positions:
            empty = empty.append_column("filename", pa.array([], pa.string()))
            empty = empty.append_column("file_row_number", pa.array([], pa.int64()))
        con.register(view, empty)
        return
    where = ""
    if deleted:
        names = np.repeat(np.array(list(deleted), dtype=object), [len(r) for r in deleted.values()])
        rows = np.concatenate(list(deleted.values())).astype(np.int64)
        con.register(f"{view}__deleted", pa.table({"filename": names, "file_row_number": rows}))
        where = f" ANTI JOIN {view}__deleted USING (filename, file_row_number)"
    clean = [] if positions else [f for f in files if f not in deleted]
    tracked = files if positions else [f for f in files if f in deleted]
    scans = [f"SELECT * FROM {_read_parquet(clean)}"] if clean else []
    if tracked:
        keep = "*" if positions else "* EXCLUDE (filename, file_row_number)"
        scans.append(f"SELECT {keep} FROM {_read_parquet(tracked, positions=True)}{where}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS " + " UNION ALL BY NAME ".join(scans))


def _reach_store(con: duckdb.DuckDBPyConnection, lake: Lake) -> None:
    """Let DuckDB read the files of a lake on object storage by their URIs (as delta-rs
    names them, so the anti-join on `filename` and `rows_by_file` work unchanged).

    A filesystem is registered with the process's database, once per scheme: again only
    when a lake with other credentials is read (then the one before is replaced)."""
    store = lake.store
    scheme = lake.location.scheme
    made_for = (scheme, getattr(store, "credentials", None))
    with _opening:
        if _reaching.get(scheme) == made_for:
            return
        if scheme in _reaching and scheme in con.list_filesystems():
            con.unregister_filesystem(scheme)
        con.register_filesystem(store.fsspec())  # type: ignore[attr-defined]
        _reaching[scheme] = made_for


def rows_by_file(found: pa.Table) -> dict[str, np.ndarray]:
    """Rows of a `positions` view (filename, file_row_number) as `Lake.delete_and_append`
    takes them: file -> row positions."""
    files = found["filename"].to_numpy(zero_copy_only=False)
    rows = found["file_row_number"].to_numpy()
    return {f: rows[files == f] for f in np.unique(files)}


def _read_parquet(files: list[str], positions: bool = False) -> str:
    """DuckDB's scan of these files, by column name; with each row's file and position."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    extra = ", filename = true, file_row_number = true" if positions else ""
    return f"read_parquet([{listed}], union_by_name = true{extra})"


def render(path: Path, settings: Settings) -> str:
    """The SQL text with ${...} filled from settings (a missing value names the file)."""
    values = {
        "person_party_type": str(settings.person_party_type),
        "call_center_channels": ", ".join(str(c) for c in settings.call_center_channels),
    }
    try:
        return Template(path.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: unknown or malformed placeholder {exc}") from exc


def sql_text(settings: Settings, name: str) -> str:
    """pipelines/sql/<name>.sql, rendered."""
    path = settings.path(settings.sql_dir) / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"SQL file {path} not found (sql_dir = {settings.sql_dir})")
    return render(path, settings)


def run_sql(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    name: str,
    stream: bool = False,
    select: str = "",
) -> pa.Table | pa.RecordBatchReader:
    """Run pipelines/sql/<name>.sql; its result as an Arrow table, or with `stream` as a
    reader of record batches (for results too large to hold). `select`: a projection
    (DuckDB's) of the result, computed in the same query.

    A streamed query starts when its first batch is read, not here: a connection holds
    one open result at a time, and a table made of several files (one per source) reads
    them one after another from the same connection."""
    path = settings.path(settings.sql_dir) / f"{name}.sql"
    text = sql_text(settings, name)
    query = f"SELECT {select} FROM ({text})" if select else text
    try:
        if not stream:
            return con.sql(query).to_arrow_table()
        schema = con.sql(query).limit(0).to_arrow_table().schema
    except duckdb.Error as exc:
        raise ValueError(f"{path}: {_safe(exc)}") from exc

    def batches():  # a query can also fail while it streams: name the file then too
        try:
            yield from con.sql(query).to_arrow_reader(STREAM_ROWS)
        except duckdb.Error as exc:
            raise ValueError(f"{path}: {_safe(exc)}") from exc

    return pa.RecordBatchReader.from_batches(schema, batches())


def _safe(exc: Exception) -> str:
    """A query's error without a SAS signature: on object storage DuckDB's errors may
    quote the request URL of a file it failed to read."""
    return redact(str(exc), [])
