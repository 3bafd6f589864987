"""Reader for Synapse Link exports: timestamped folders of headerless CSV + `model.json`.

Why strings first: a malformed value (an unparseable date or amount) must not fail the
whole file, so every CSV is read as text and each column is cast on its own; a row that
fails a cast or has the wrong number of fields goes to quarantine with the file, line
and reason, and the rest of the batch goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from c360ml.sources.tables import CDM_TO_ARROW, Column

QUARANTINE_SCHEMA = pa.schema(
    [
        ("_source_file", pa.string()),
        ("_line", pa.int64()),
        ("_reason", pa.string()),
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


@dataclass(frozen=True)
class Entity:
    """One table of a model.json: its columns and its data files, in export order."""

    name: str
    columns: tuple[Column, ...]
    files: tuple[Path, ...]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.arrow_type) for c in self.columns])


def read_model_json(folder: Path) -> dict[str, Entity]:
    """Parse a sync folder's model.json; every problem names the file and the field."""
    path = folder / "model.json"
    if not path.exists():
        raise ValueError(f"{path}: missing model.json in Synapse Link folder")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    entities = doc.get("entities") if isinstance(doc, dict) else None
    if not isinstance(entities, list):
        raise ValueError(f"{path}: no 'entities' list")
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
        files = _entity_files(folder, name.lower(), ent.get("partitions") or [])
        if not files:
            raise ValueError(f"{path}: entity {name!r} has no data files under {folder}")
        out[name.lower()] = Entity(name.lower(), tuple(cols), tuple(files))
    return out


def _entity_files(folder: Path, name: str, partitions: list) -> list[Path]:
    """Partition locations from model.json, else the CSVs in the entity's folder."""
    files = [folder / p["location"] for p in partitions if isinstance(p, dict) and "location" in p]
    if not files:
        files = sorted((folder / name).glob("*.csv"))
    missing = [f for f in files if not f.exists()]
    if missing:
        raise ValueError(
            f"{folder / 'model.json'}: entity {name!r} lists missing file {missing[0]}"
        )
    return files


def read_csv_file(
    path: Path, entity: Entity, relname: str, header: bool = False
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Yield (typed rows, quarantined rows) per block of a CSV file.

    Synapse Link files are headerless (columns in model.json order); with `header` the
    first line names the columns and only the entity's columns are kept. Physical line
    numbers are kept exact: rows with a wrong field count are reported by Arrow with
    their line; the others are numbered by counting around those.
    """
    names = [c.name for c in entity.columns]
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        reason = f"wrong column count: expected {row.expected_columns}, got {row.actual_columns}"
        invalid.append((row.number, reason, row.text))
        return "skip"

    read = pcsv.ReadOptions(use_threads=False, block_size=BLOCK_SIZE)
    if not header:
        read.column_names = names
    try:
        reader = pcsv.open_csv(
            path,
            read_options=read,
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                include_columns=names,
                strings_can_be_null=True,  # empty text is null from the start
                null_values=[""],
            ),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(f"{path}: cannot read as CSV of {entity.name}: {exc}") from exc
    next_line, seen_invalid = (2 if header else 1), 0
    for text in _chunks(reader):
        # Lines of this block: the next len(text) line numbers not taken by invalid rows.
        new_invalid = sorted(n for n, _, _ in invalid[seen_invalid:])
        seen_invalid = len(invalid)
        span = np.arange(next_line, next_line + len(text) + len(new_invalid), dtype=np.int64)
        if new_invalid:  # a lookup table, not setdiff1d's sort (30 s of CPU at 1M customers)
            taken = np.asarray(new_invalid, dtype=np.int64)
            lines = span[np.isin(span, taken, invert=True, kind="table")][: len(text)]
        else:
            lines = span
        next_line = int(span[-1]) + 1 if len(span) else next_line
        typed, bad_reason = cast_columns(text, entity.columns)
        bad = pc.is_valid(bad_reason)
        yield (
            typed.filter(pc.invert(bad)),
            _quarantine_rows(
                relname, pa.array(lines).filter(bad), bad_reason.filter(bad), text.filter(bad)
            ),
        )
    if invalid:
        yield (
            entity.arrow_schema.empty_table(),
            pa.table(
                {
                    "_source_file": [relname] * len(invalid),
                    "_line": [n for n, _, _ in invalid],
                    "_reason": [r for _, r, _ in invalid],
                    "_raw": [t for _, _, t in invalid],
                },
                schema=QUARANTINE_SCHEMA,
            ),
        )


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
            "_reason": reasons,
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
    careful path (a regex per value, 3x slower): slices that cast strictly are kept,
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
