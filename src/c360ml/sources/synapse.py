"""Reader for Synapse Link exports: timestamped folders of headerless CSV + `model.json`.

Why strings first: a malformed value (an unparseable date or amount) must not fail the
whole file, so every CSV is read as text and each column is cast on its own; a row that
fails a cast or has the wrong number of fields goes to quarantine with the file, line
and reason, and the rest of the batch goes on.

Why through a store: the export lands in an ADLS container as often as on a disk. Files
are read through the lake's `LakeStore` (`c360ml.storage.objects`) as streams, a local
file or a blob in ranged pieces, by the same parser; `sync_folders` says which sync
folders Synapse Link has finished writing.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from c360ml.schemas import QUARANTINE_REASON
from c360ml.sources.tables import CDM_TO_ARROW, Column
from c360ml.storage.location import LOCAL, LakeLocation
from c360ml.storage.objects import ContainerNotFoundError, LakeStore, LocalStore

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("_source_file", pa.string()),
        ("_line", pa.int64()),
        (QUARANTINE_REASON, pa.string()),
        ("_raw", pa.string()),
    ]
)
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
ISO_Z = "%Y-%m-%dT%H:%M:%S%z"  # what Synapse Link writes: 2024-01-01T07:44:51Z
_TRUE = ["true", "1", "yes"]
_FALSE = ["false", "0", "no"]
BLOCK_SIZE = 1 << 20  # CSV bytes per parsed block: small blocks parse fastest (cache)
CAST_BYTES = 64 << 20  # text bytes per cast step: bounds memory on 20M-line files
STRICT_SLICE = 1024  # smallest slice of a column tried with the one-call cast


# Folders Synapse Link writes beside its sync folders (lower case): not sync folders.
NOT_SYNC_FOLDERS = frozenset(
    {"changelog", "microsoft.athena.tricklefeedservice", "optionsetmetadata"}
)
CHANGELOG = "Changelog/changelog.info"  # names the sync folder Synapse Link is writing


@dataclass(frozen=True)
class LandingFile:
    """A data file of the landing zone, read through the lake's store: a local file, or a
    blob read in ranged pieces (never copied to local disk first). `key` is relative to
    the lake root; errors name `uri`."""

    store: LakeStore
    key: str
    size: int

    @property
    def uri(self) -> str:
        return self.store.uri(self.key)

    def open(self) -> BinaryIO:
        return self.store.open_stream(self.key, self.size)

    def __str__(self) -> str:
        return self.uri


def local_file(path: Path) -> LandingFile:
    """A local file by its path (the generic source's files, tests)."""
    store = LocalStore(LakeLocation(LOCAL, str(path.parent)))
    return LandingFile(store, path.name, path.stat().st_size)


def _as_file(file: LandingFile | Path) -> LandingFile:
    return file if isinstance(file, LandingFile) else local_file(Path(file))


@dataclass(frozen=True)
class Entity:
    """One table of a model.json: its columns and its data files, in export order."""

    name: str
    columns: tuple[Column, ...]
    files: tuple[LandingFile, ...]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.arrow_type) for c in self.columns])


@dataclass(frozen=True)
class SyncFolders:
    """A source's sync folders: those complete (to ingest, in order) and those waiting,
    each with why."""

    complete: tuple[str, ...]
    waiting: tuple[tuple[str, str], ...]


def sync_folders(store: LakeStore, prefix: str) -> SyncFolders:
    """The sync folders below `prefix` (keys), split into complete ones and ones Synapse
    Link may still be writing.

    The rule: a sync folder is complete unless (1) it is the folder that
    `Changelog/changelog.info` names (Synapse Link names there the folder it is writing,
    and Microsoft's documentation tells consumers not to read it until another is named),
    or a later one; or (2) it is the newest folder and has no `model.json` yet (Synapse
    Link, like the generator and `upload_folder`, writes a sync folder's model.json after
    its data files; a copy of an export without the changelog is judged by this alone). A
    folder after a waiting one waits too, so bronze takes the syncs in their order. An
    older folder without a model.json is not being written (a later one was begun): it
    is a broken export, and reading it fails naming its missing model.json."""
    folders = [f for f in store.folders(prefix) if _name(f).lower() not in NOT_SYNC_FOLDERS]
    current = _changelog_current(store, prefix)
    complete: list[str] = []
    waiting: list[tuple[str, str]] = []
    for i, folder in enumerate(folders):
        if waiting:
            why = f"after {_name(waiting[0][0])}, which is not complete"
        elif current and _name(folder) >= current:
            why = f"{store.uri(f'{prefix}/{CHANGELOG}')} names {current} as being written"
        elif i == len(folders) - 1 and not store.exists(f"{folder}/model.json"):
            why = "no model.json yet (Synapse Link writes it last)"
        else:
            complete.append(folder)
            continue
        waiting.append((folder, why))
    return SyncFolders(tuple(complete), tuple(waiting))


def _name(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]


def _changelog_current(store: LakeStore, prefix: str) -> str:
    """The folder `Changelog/changelog.info` names, or "" without one."""
    try:
        text = store.read_bytes(f"{prefix}/{CHANGELOG}").decode("utf-8", "replace")
    except ContainerNotFoundError:
        raise
    except FileNotFoundError:
        return ""
    return text.strip().strip("/")


def read_model_json(store: LakeStore, folder: str) -> dict[str, Entity]:
    """Parse a sync folder's model.json (`folder`: its key in the store); every problem
    names the file (its URI) and the field."""
    model = f"{folder}/model.json"
    path = store.uri(model)
    try:
        raw = store.read_bytes(model)
    except ContainerNotFoundError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{path}: missing model.json in Synapse Link folder") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    entities = doc.get("entities") if isinstance(doc, dict) else None
    if not isinstance(entities, list):
        raise ValueError(f"{path}: no 'entities' list")
    listing: dict[str, int] | None = None  # the folder's files, listed once when needed
    out: dict[str, Entity] = {}
    for i, ent in enumerate(entities):
        name = ent.get("name") if isinstance(ent, dict) else None
        if not name or not isinstance(ent.get("attributes"), list):
            raise ValueError(f"{path}: entities[{i}] needs 'name' and 'attributes'")
        cols = []
        for j, attr in enumerate(ent["attributes"]):
            dtype = attr.get("dataType")
            if dtype not in CDM_TO_ARROW:
                raise ValueError(
                    f"{path}: entity {name!r} attribute {attr.get('name')!r} (#{j}) has "
                    f"unsupported dataType {dtype!r}; known: {sorted(CDM_TO_ARROW)}"
                )
            cols.append(Column(attr["name"], dtype))
        if ent.get("partitions") == []:
            continue  # declared with no partitions: no changes in this sync
        if listing is None:
            listing = store.sizes(folder)
        files = _entity_files(store, folder, name.lower(), ent.get("partitions") or [], listing)
        if not files:
            raise ValueError(f"{path}: entity {name!r} has no data files under {store.uri(folder)}")
        out[name.lower()] = Entity(name.lower(), tuple(cols), tuple(files))
    return out


def _entity_files(
    store: LakeStore, folder: str, name: str, partitions: list, listing: dict[str, int]
) -> list[LandingFile]:
    """Partition locations from model.json, else the CSVs in the entity's folder."""
    model = store.uri(f"{folder}/model.json")
    keys = []
    for p in partitions:
        if isinstance(p, dict) and "location" in p:
            try:
                keys.append(partition_key(folder, p["location"]))
            except ValueError as exc:
                raise ValueError(f"{model}: {exc}") from None
    if not keys:
        below = f"{folder}/{name}/"
        keys = sorted(
            k
            for k in listing
            if k.startswith(below) and "/" not in k[len(below) :] and k.endswith(".csv")
        )
    missing = [k for k in keys if k not in listing]
    if missing:
        raise ValueError(f"{model}: entity {name!r} lists missing file {store.uri(missing[0])}")
    return [LandingFile(store, k, listing[k]) for k in keys]


def partition_key(folder: str, location: str) -> str:
    """The key of the file a model.json partition `location` names, in the sync folder
    whose key is `folder`.

    The generator writes locations relative to the folder (by default); Synapse Link
    writes absolute ones (`https://<account>.dfs.core.windows.net/<container>/.../<sync
    folder>/<entity>/<file>.csv`). An absolute one is resolved by its part below the sync
    folder, so a sync folder resolves the same wherever the export is read from (its
    container, a lake's landing/ on another container, or a local copy)."""
    name = _name(folder)
    shown = location.split("?", 1)[0]  # never a SAS token
    if "://" in location:
        parts = [unquote(p) for p in urlsplit(location).path.split("/") if p]
        if name not in parts:
            raise ValueError(f"partition location {shown} is not under the sync folder {name!r}")
        below = parts[len(parts) - parts[::-1].index(name) :]
    else:
        below = [p for p in location.split("/") if p]
    if not below or any(p in (".", "..") for p in below):
        raise ValueError(f"partition location {shown} names no file below the sync folder")
    return "/".join([folder.rstrip("/"), *below])


def read_csv_file(
    file: LandingFile | Path, entity: Entity, relname: str, header: bool = False
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Yield (typed rows, quarantined rows) per block of a CSV file.

    Synapse Link files are headerless (columns in model.json order); with `header` the
    first line names the columns and only the entity's columns are kept. A row's `_line`
    is its number as Arrow counts rows (the header is line 1): the file's line number,
    unless an empty line or a quoted line break comes before it (neither starts a row).

    Arrow's block reader is the fast path. A file it stops on (a line longer than a
    block can hold, bytes that are not UTF-8, a quoted line break across two blocks:
    each would fail the whole sync) is read again by `_read_careful`, which yields only
    the rows after those already yielded, so every row ends in bronze or in quarantine
    exactly once. An empty file holds no rows (logged, nothing in quarantine).

    The file is read as a stream from the lake's store (a local file, or a blob in ranged
    pieces), once by the block reader and, when it stops, once more by the careful one.
    """
    path = _as_file(file)
    if path.size == 0:
        log.info("%s: empty file (0 bytes): no rows", relname)
        return
    cursor = _Cursor(2 if header else 1)
    try:
        yield from _read_fast(path, entity, relname, header, cursor)
        return
    except pa.ArrowInvalid as exc:
        log.info(
            "%s: the block reader stopped (%s); the careful reader reads on from line %d",
            relname,
            exc,
            cursor.line,
        )
    try:
        yield from _read_careful(path, entity, relname, header, cursor.line)
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(f"{path}: cannot read as CSV of {entity.name}: {exc}") from exc


@dataclass
class _Cursor:
    line: int  # the first line not yielded yet


def _read_fast(
    file: LandingFile | Path, entity: Entity, relname: str, header: bool, cursor: _Cursor
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Arrow's block reader. Rows with a wrong field count are reported by Arrow with
    their line; the others are numbered by counting around those. Raises ArrowInvalid
    where Arrow cannot go on; `cursor` says which lines were yielded before."""
    path = _as_file(file)
    with path.open() as stream:
        yield from _read_stream(stream, path, entity, relname, header, cursor)


def _read_stream(
    stream: BinaryIO,
    path: LandingFile,
    entity: Entity,
    relname: str,
    header: bool,
    cursor: _Cursor,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    names = [c.name for c in entity.columns]
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, _field_count(row), row.text))
        return "skip"

    _quiet_undecodable_rows()
    read = pcsv.ReadOptions(use_threads=False, block_size=BLOCK_SIZE)
    if not header:
        read.column_names = names
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=read,
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=_text_columns(names),
        )
    except KeyError as exc:
        raise ValueError(f"{path}: cannot read as CSV of {entity.name}: {exc}") from exc
    seen = 0
    for text in _chunks(reader):
        new_invalid, seen = invalid[seen:], len(invalid)
        lines = _row_lines(cursor.line, len(text), new_invalid)
        out = _split_rows(text, lines, new_invalid, entity, relname)
        cursor.line += len(text) + len(new_invalid)
        yield out
    rest = invalid[seen:]  # after the last block with a valid row (or a file of none)
    if rest:
        cursor.line += len(rest)
        yield _split_rows(_empty_text(names), _NO_LINES, rest, entity, relname)


_HOOK_LOCK = threading.Lock()
_hook_installed = False


def _quiet_undecodable_rows() -> None:
    """Arrow decodes a row with a wrong field count to text before it calls the invalid
    row handler. Bytes that are not UTF-8 fail that decode, which Python reports on
    stderr ("Exception ignored in ... on_invalid": a traceback), and Arrow then stops
    with a parse error that `read_csv_file` handles: the careful reader quarantines the
    line. Those reports (only those) are dropped; any other goes to the previous hook."""
    global _hook_installed
    with _HOOK_LOCK:
        if _hook_installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable) -> None:
            if unraisable.exc_type is UnicodeDecodeError and getattr(
                unraisable.object, "__qualname__", ""
            ).startswith(f"{_read_stream.__name__}."):
                return
            previous(unraisable)

        sys.unraisablehook = hook
        _hook_installed = True


def _read_careful(
    file: LandingFile | Path, entity: Entity, relname: str, header: bool, start: int
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """A file the block reader stopped on, from line `start` on.

    The file is cut into pieces of whole rows (`_pieces`), each parsed by Arrow as one
    block, however long its rows (a long row that is valid is a row). A piece with bytes
    that are not UTF-8 is split into rows first, and each row with such bytes is
    quarantined with the position of the first. The rows before `start` (which the fast
    path yielded) are parsed only to be counted: they are numbered as it numbered them.
    """
    path = _as_file(file)
    names = [c.name for c in entity.columns]
    columns = None if header else names
    line = 2 if header else 1
    parts: list[tuple[pa.Table, np.ndarray, list[tuple[int, str, str]]]] = []
    size = 0
    for i, piece in enumerate(_pieces(path)):
        if i == 0:
            piece = piece.removeprefix(b"\xef\xbb\xbf")  # a BOM, as Arrow skips it
        if columns is None:
            columns, piece = _header_names(path, piece)
        for rows, bad_line in _utf8_runs(piece):
            if bad_line is not None:
                text, lines, invalid = _empty_text(names), _NO_LINES, [(line, *bad_line)]
            else:
                text, relative = _parse_piece(rows, columns, names)
                invalid = [(line + n - 1, reason, raw) for n, reason, raw in relative]
                lines = _row_lines(line, len(text), invalid)
            line += len(text) + len(invalid)
            parts.append((text, lines, invalid))
            size += text.nbytes
            if size >= CAST_BYTES:
                yield from _careful_chunk(parts, start, entity, relname)
                parts, size = [], 0
    yield from _careful_chunk(parts, start, entity, relname)


_NO_LINES = np.empty(0, np.int64)


def _careful_chunk(
    parts: list[tuple[pa.Table, np.ndarray, list[tuple[int, str, str]]]],
    start: int,
    entity: Entity,
    relname: str,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """The pieces' rows from line `start` on, typed and quarantined as one chunk."""
    if not parts:
        return
    text = pa.concat_tables([t for t, _, _ in parts])
    lines = np.concatenate([n for _, n, _ in parts])
    invalid = [r for _, _, rows in parts for r in rows if r[0] >= start]
    keep = lines >= start
    if not keep.all():
        text, lines = text.filter(pa.array(keep)), lines[keep]
    if len(text) or invalid:
        yield _split_rows(text, lines, invalid, entity, relname)


def _pieces(path: LandingFile) -> Iterator[bytes]:
    """The file in pieces of whole rows: each BLOCK_SIZE window up to its last row end
    (the rest goes with the next window; a row longer than a window, with the next).

    A row ends at a line end outside quotes. Past CAST_BYTES without one (a stray quote
    in an unquoted value makes every line end look quoted), a piece is cut at its last
    line end, and quotes are counted again from there."""
    carry: list[bytes] = []  # the bytes since the last row end
    size, quoted = 0, False  # their length; whether they end inside quotes
    with path.open() as fh:
        while block := fh.read(BLOCK_SIZE):
            ends, after = _row_ends(block, quoted)
            if not len(ends) and size + len(block) > CAST_BYTES:
                ends, after = _row_ends(block, quoted, quote_aware=False)
            if len(ends):
                cut = int(ends[-1])
                yield b"".join([*carry, block[:cut]])
                carry, size = [block[cut:]], len(block) - cut
            else:
                carry.append(block)
                size += len(block)
            quoted = after
    if size:
        yield b"".join(carry)


def _row_ends(data: bytes, quoted: bool, quote_aware: bool = True) -> tuple[np.ndarray, bool]:
    """The offsets just after the line ends of `data` that end a row, and whether the
    bytes after the last of them end inside quotes; `quoted`: whether `data` starts
    inside quotes.

    A line end ends a row when an even number of quotes comes before it since the last
    row end: Synapse Link quotes every value that holds a line break or a quote (doubled
    inside), so this finds the rows Arrow parses. Not `quote_aware`: every line end."""
    raw = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero((raw == 10) | (raw == 13))
    at = np.flatnonzero(raw == 34)  # '"'
    if quote_aware:
        ends = breaks[(np.searchsorted(at, breaks) + quoted) % 2 == 0]
        after = len(at) + quoted  # a row end has an even count before it
    else:
        ends = breaks
        after = len(at) - np.searchsorted(at, ends[-1]) if len(ends) else len(at) + quoted
    return ends + 1, bool(after % 2)


def _header_names(path: LandingFile, piece: bytes) -> tuple[list[str], bytes]:
    """The column names of a file's header line (the first line of its first piece),
    and the rest of the piece."""
    piece = piece.lstrip(b"\r\n")
    ends = [i for i in (piece.find(b"\n"), piece.find(b"\r")) if i >= 0]
    end = min(ends) if ends else len(piece)
    try:
        first = piece[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the header line is not UTF-8 text: {exc}") from exc
    return next(csv.reader([first]), []), piece[end:]


def _utf8_runs(piece: bytes) -> Iterator[tuple[bytes, None] | tuple[None, tuple[str, str]]]:
    """The piece as runs of UTF-8 rows (to parse) and single lines that are not UTF-8
    (reason, text with the bad bytes escaped), in file order.

    A UTF-8 piece is one run: rows are split only in a piece that has bad bytes, and a
    row with bad bytes that spans lines (a quote in binary junk opens a "value" that
    runs on) is split into its lines, so that only the lines with bad bytes are lost."""
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        yield piece, None
        return
    run: list[bytes] = []
    ends = _row_ends(piece, False)[0].tolist()
    for a, b in zip([0, *ends], [*ends, len(piece)], strict=True):
        try:
            piece[a:b].decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            run.append(piece[a:b])
            continue
        for raw in piece[a:b].splitlines(keepends=True):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if run:
                    yield b"".join(run), None
                    run = []
                at = f"byte 0x{raw[exc.start]:02x} at position {exc.start + 1}"
                text = raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
                yield None, (f"not UTF-8 text: {at}", text)
            else:
                run.append(raw)
    if run:
        yield b"".join(run), None


def _parse_piece(
    data: bytes, columns: list[str], names: list[str]
) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """One piece (UTF-8, no header) parsed in one block: its rows as text and the rows
    with a wrong field count (line within the piece, reason, text)."""
    invalid: list[tuple[int, str, str]] = []
    if not data.strip(b"\r\n"):
        return _empty_text(names), invalid

    def on_invalid(row) -> str:
        invalid.append((row.number, _field_count(row), row.text))
        return "skip"

    text = pcsv.read_csv(
        pa.BufferReader(data),
        read_options=pcsv.ReadOptions(
            use_threads=False, block_size=max(BLOCK_SIZE, len(data) + 1), column_names=columns
        ),
        parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=_text_columns(names),
    )
    return text, invalid


def _text_columns(names: list[str]) -> pcsv.ConvertOptions:
    return pcsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        include_columns=names,
        strings_can_be_null=True,  # empty text is null from the start
        null_values=[""],
    )


def _empty_text(names: list[str]) -> pa.Table:
    return pa.schema([(n, pa.string()) for n in names]).empty_table()


def _field_count(row) -> str:
    return f"wrong column count: expected {row.expected_columns}, got {row.actual_columns}"


def _row_lines(start: int, rows: int, invalid: list[tuple[int, str, str]]) -> np.ndarray:
    """The lines of a block's rows: the next `rows` line numbers from `start` not taken
    by the block's rows with a wrong field count (`invalid`, numbered by Arrow)."""
    span = np.arange(start, start + rows + len(invalid), dtype=np.int64)
    if not invalid:
        return span
    # A lookup table, not setdiff1d's sort (which dominated at a million customers).
    taken = np.asarray(sorted(n for n, _, _ in invalid), dtype=np.int64)
    return span[np.isin(span, taken, invert=True, kind="table")][:rows]


def _split_rows(
    text: pa.Table,
    lines: np.ndarray,
    invalid: list[tuple[int, str, str]],
    entity: Entity,
    relname: str,
) -> tuple[pa.Table, pa.Table]:
    """A block's text rows cast to their types: (typed rows, quarantined rows), the
    rows that failed a cast and those Arrow could not split (`invalid`) in quarantine."""
    typed, bad_reason = cast_columns(text, entity.columns)
    bad = pc.is_valid(bad_reason)
    quarantined = _quarantine_rows(
        relname, pa.array(lines).filter(bad), bad_reason.filter(bad), text.filter(bad)
    )
    if invalid:
        quarantined = pa.concat_tables(
            [
                quarantined,
                pa.table(
                    {
                        "_source_file": [relname] * len(invalid),
                        "_line": [n for n, _, _ in invalid],
                        QUARANTINE_REASON: [r for _, r, _ in invalid],
                        "_raw": [t for _, _, t in invalid],
                    },
                    schema=QUARANTINE_SCHEMA,
                ),
            ]
        )
    return typed.filter(pc.invert(bad)), quarantined


def _chunks(reader: pcsv.CSVStreamingReader) -> Iterator[pa.Table]:
    """The reader's small blocks (fast to parse) gathered into CAST_BYTES tables (cheap
    to cast: the per-call overhead of ~20 compute calls per column is paid less often)."""
    parts, size = [], 0
    for batch in reader:
        parts.append(batch)
        size += batch.nbytes
        if size >= CAST_BYTES:
            yield pa.Table.from_batches(parts)
            parts, size = [], 0
    if parts:
        yield pa.Table.from_batches(parts)


def _quarantine_rows(relname: str, lines: pa.Array, reasons: pa.Array, text: pa.Table) -> pa.Table:
    raw = pc.binary_join_element_wise(
        *[text[c] for c in text.column_names], ",", null_handling="replace"
    )
    return pa.table(
        {
            "_source_file": pa.array([relname] * len(lines), pa.string()),
            "_line": lines,
            QUARANTINE_REASON: reasons,
            "_raw": raw,
        },
        schema=QUARANTINE_SCHEMA,
    )


def cast_columns(text: pa.Table, columns: tuple[Column, ...]) -> tuple[pa.Table, pa.Array]:
    """Cast text columns to their CDM types; empty text is null. String columns stay as
    exported (bronze is a copy; silver trims them), without a copy of their text.

    Returns the typed table and, per row, the first failed cast as a reason (null = ok).
    """
    arrays, reason = [], pa.nulls(len(text), pa.string())
    for col in columns:
        if pa.types.is_string(CDM_TO_ARROW[col.cdm_type]):
            arrays.append(text[col.name])
            continue
        typed, failed = _cast_column(text[col.name].combine_chunks(), col.cdm_type)
        if failed is not None:
            msg = f"column {col.name}: not a valid {col.cdm_type}"
            reason = pc.if_else(pc.and_(failed, pc.is_null(reason)), msg, reason)
        arrays.append(typed)
    return pa.Table.from_arrays(arrays, names=[c.name for c in columns]), reason


def _cast_column(values: pa.Array, cdm: str) -> tuple[pa.Array, pa.Array | None]:
    """One text column: typed values (null where empty or invalid) and which values
    failed (None: none did).

    A few dirty values in a 200k-row block should not send the whole column down the
    careful path (a regex per value, several times slower): slices that cast strictly are kept,
    and only the failing slices are split further, down to STRICT_SLICE values.
    """
    fast = _cast_strict(values, cdm)
    if fast is not None:  # every value valid or empty: nothing to report
        return fast, None
    if len(values) > STRICT_SLICE:
        step = max(STRICT_SLICE, -(-len(values) // 16))
        parts = [_cast_column(values.slice(i, step), cdm) for i in range(0, len(values), step)]
        target = CDM_TO_ARROW[cdm]
        typed = pa.concat_arrays([t.cast(target) for t, _ in parts])
        if all(f is None for _, f in parts):
            return typed, None
        return typed, pa.concat_arrays(
            [pa.nulls(len(t), pa.bool_()).fill_null(False) if f is None else f for t, f in parts]
        )
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    typed, ok = _cast_one(values, empty, cdm)
    failed = pc.fill_null(pc.and_(pc.invert(ok), pc.invert(empty)), False)
    return pc.if_else(pc.or_(empty, failed), pa.scalar(None, typed.type), typed), failed


def _cast_strict(values: pa.Array, cdm: str) -> pa.Array | None:
    """The common case at Arrow's cast speed: a column whose every value is empty or in
    the canonical form Arrow parses (ISO 8601 with a zone, plain numbers, true/false)
    is cast in one call; None means "not that simple", and `_cast_one` decides per value
    (what it accepts is a superset of what this accepts, with the same result)."""
    target = CDM_TO_ARROW[cdm]
    try:
        typed = values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if pa.types.is_floating(target) and pc.all(pc.is_finite(typed)).as_py() not in (True, None):
        return None  # "nan"/"inf" parse in Arrow but are not valid amounts
    return typed


def _cast_one(values: pa.Array, empty: pa.Array, cdm: str) -> tuple[pa.Array, pa.Array]:
    """One column: typed values (garbage where invalid) and a validity mask."""
    target = CDM_TO_ARROW[cdm]
    if pa.types.is_timestamp(target):
        # The canonical "...T..:..:..Z" form in one strptime; the rest (fractions, offsets,
        # naive, dirt) through the general parser, on those rows only.
        parsed = pc.strptime(values, format=ISO_Z, unit="us", error_is_null=True)
        todo = pc.and_(pc.is_null(parsed), pc.invert(empty))
        if pc.any(todo).as_py():
            parsed = pc.replace_with_mask(parsed, todo, _parse_timestamps(values.filter(todo)))
        return parsed, pc.is_valid(parsed)
    if pa.types.is_boolean(target):
        low = pc.utf8_lower(pc.utf8_trim_whitespace(values))
        ok = pc.or_(pc.is_in(low, pa.array(_TRUE)), pc.is_in(low, pa.array(_FALSE)))
        return pc.is_in(low, pa.array(_TRUE)), ok
    ok = pc.match_substring_regex(values, _NUMBER)
    clean = pc.if_else(ok, pc.utf8_trim_whitespace(values), "0")
    if pa.types.is_integer(target):
        as_float = pc.cast(clean, pa.float64())
        ok = pc.and_(ok, pc.equal(pc.floor(as_float), as_float))
        return pc.cast(pc.if_else(ok, as_float, 0.0), target), ok
    return pc.cast(clean, target), ok


def _parse_timestamps(values: pa.Array) -> pa.Array:
    """ISO 8601 instants (Z, offset, or naive = UTC; fractional seconds kept to the
    microsecond, as Synapse Link writes up to 7 digits) to timestamp[us, UTC]."""
    out = pa.nulls(len(values), pa.timestamp("us", tz="UTC"))
    trimmed = pc.utf8_trim_whitespace(values)
    whole = pc.replace_substring_regex(trimmed, r"\.\d+", "")
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"):
        got = pc.strptime(whole, format=fmt, unit="us", error_is_null=True)
        out = pc.coalesce(out, pc.cast(got, out.type))
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        got = pc.strptime(whole, format=fmt, unit="us", error_is_null=True)
        out = pc.coalesce(out, pc.assume_timezone(got, "UTC"))
    digits = pc.struct_field(pc.extract_regex(trimmed, r"\.(?P<f>\d+)"), "f")
    micros = pc.cast(
        pc.utf8_slice_codeunits(pc.binary_join_element_wise(digits, "000000", ""), 0, 6),
        pa.int64(),
    )
    return pc.add(out, pc.cast(pc.fill_null(micros, 0), pa.duration("us")))
