"""Write generated change rows the way the sources deliver them, with the export's dirt.

- `CsvSync`: one Synapse Link sync folder (`<ts>/model.json` + headerless CSV per table
  and calendar year of the row's createddatetime / createdon, also for change rows, as
  Synapse Link partitions). model.json names each partition relative to the folder, or,
  given the folder's URL, by its absolute https location as Synapse Link writes it. Exact duplicate change rows and malformed rows are added
  here; a malformed row is an *extra* corrupted copy of a real row, so rejecting it loses
  no data and the truth stays exact. Counts are kept for generator.json.
- `DeltaExport`: the same tables as Delta tables of current state (change feed resolved).
- `GenericCsv`: the generic path's transactions.csv (with header).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from c360ml.sources.tables import SourceTable, source_table
from c360ml.storage.lake import Lake
from c360ml.synth.records import HIDDEN

log = logging.getLogger(__name__)

SYNC_TS_FORMAT = "%Y-%m-%dT%H.%M.%SZ"  # Synapse Link folder names
MALFORMED_KINDS = ("bad_date", "bad_amount", "wrong_columns")
_BAD_DATES = ("2024-13-45T25:61:00Z", "not a date", "31/12/2024 10:00", "0000-00-00T00:00:00Z")
_BAD_AMOUNTS = ("12.34.56", "N/A", "1,234.50", "$19.99", "--")
_CODE_COLUMNS = {  # generated codes: never hold a structural character
    "dataareaid",
    "accountnum",
    "custgroup",
    "currency",
    "currencycode",
    "partynumber",
    "languageid",
    "locationid",
    "countryregionid",
    "salesid",
    "custaccount",
    "returnitemnum",
    "returnreasoncodeid",
    "itemid",
    "transactionid",
    "store",
    "terminal",
    "loyaltycardid",
    "returntransactionid",
    "itemgroupid",
    "zipcode",
    "streetnumber",
    "state",
}


def created_column(table: SourceTable) -> str:
    return "createddatetime" if table.source == "d365" else "createdon"


def year_of(epoch: np.ndarray) -> np.ndarray:
    return (
        np.asarray(epoch, dtype="int64").astype("datetime64[s]").astype("datetime64[Y]").astype(int)
        + 1970
    )


def format_iso(epoch: pa.Array) -> pa.Array:
    """int64 epoch seconds -> '2024-05-01T10:15:00Z' (null stays null)."""
    text = pc.cast(epoch.cast(pa.timestamp("s")), pa.string())
    return pc.binary_join_element_wise(pc.replace_substring(text, " ", "T"), "Z", "")


def format_rows(table: pa.Table, decl: SourceTable) -> pa.Table:
    """Internal rows -> CSV cell values: ISO times, True/False, declared columns only."""
    arrays = []
    for col in decl.columns:
        arr = table.column(col.name).combine_chunks()
        if col.cdm_type in ("dateTime", "dateTimeOffset"):
            arr = format_iso(arr)
        elif col.cdm_type == "boolean":
            arr = pc.if_else(arr, "True", "False")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=decl.names)


def _needs_quotes(table: pa.Table, decl: SourceTable) -> np.ndarray:
    """Rows with a comma, quote or newline in a text cell (those get csv quoting).

    Generated ids, codes and formatted numbers never contain one, so only free-text
    columns are scanned (a plain substring search: regexes cost seconds at scale).
    """
    mask = np.zeros(table.num_rows, dtype=bool)
    for col in decl.columns:
        if col.cdm_type != "string" or col.name in _CODE_COLUMNS:
            continue
        cells = table.column(col.name)
        for char in (",", '"', "\n", "\r"):
            mask |= np.asarray(pc.fill_null(pc.match_substring(cells, char), False))
    return mask


def _render(rows: list[list]) -> str:
    """Rows as RFC 4180 text with minimal quoting (None -> empty field)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if x is None else x for x in row])
    return buf.getvalue()


def _cells(table: pa.Table) -> list[list]:
    cols = [c.to_pylist() for c in table.columns]
    return [list(r) for r in zip(*cols, strict=True)] if cols else []


def corrupt(row: list, decl: SourceTable, kind: str, rng: np.random.Generator) -> list:
    """A corrupted copy of a formatted row (an unparseable date/amount, or a column too few/many)."""
    row = ["" if x is None else str(x) for x in row]
    dates = [i for i, c in enumerate(decl.columns) if c.cdm_type == "dateTime"]
    amounts = [i for i, c in enumerate(decl.columns) if c.cdm_type == "decimal"]
    if kind == "bad_amount" and amounts:
        row[amounts[rng.integers(len(amounts))]] = _BAD_AMOUNTS[rng.integers(len(_BAD_AMOUNTS))]
    elif kind in ("bad_date", "bad_amount"):
        row[dates[rng.integers(len(dates))]] = _BAD_DATES[rng.integers(len(_BAD_DATES))]
    elif rng.random() < 0.5:
        row = row[:-1]
    else:
        row = [*row, "EXTRA"]
    return row


@dataclass
class Dirt:
    """How much dirt a sync adds (0 for an exact export, e.g. in unit tests)."""

    duplicate_share: float = 0.0
    malformed_share: float = 0.0


@dataclass
class CsvSync:
    """One timestamped Synapse Link sync folder of one source, filled block by block."""

    root: Path  # <lake>/landing/<source>/<ts>
    source: str
    modified_time: str
    dirt: Dirt
    # the sync folder's https URL when model.json names partitions by absolute locations,
    # as Synapse Link does ("" = locations relative to the folder, the default)
    url: str = ""
    rows: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    malformed: dict = field(default_factory=lambda: defaultdict(Counter))
    partitions: dict = field(default_factory=lambda: defaultdict(set))
    tables: list = field(default_factory=list)

    def note_table(self, name: str) -> None:
        """Record that the sync covers a table (model.json lists it even when empty)."""
        if name not in self.tables:
            self.tables.append(name)

    def append(self, name: str, table: pa.Table, rng: np.random.Generator) -> None:
        """Add rows of one table (internal representation) to this sync."""
        decl = source_table(self.source, name)
        self.note_table(name)
        if table.num_rows == 0:
            return
        n_dup = rng.binomial(table.num_rows, self.dirt.duplicate_share)
        if n_dup:
            dup = np.sort(rng.choice(table.num_rows, n_dup, replace=False))
            table = pa.concat_tables([table, table.take(pa.array(dup))])
            self.duplicates[name] += int(n_dup)
        years = year_of(table.column(created_column(decl)).to_numpy(zero_copy_only=False))
        for year in np.unique(years):
            part = table.filter(pa.array(years == year))
            self._write_part(decl, int(year), part, rng)

    def _write_part(self, decl: SourceTable, year: int, part: pa.Table, rng) -> None:
        cells = format_rows(part, decl)
        quoted = _needs_quotes(cells, decl)
        path = self.root / decl.name / f"{year}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = cells.filter(pa.array(~quoted)) if quoted.any() else cells
        extra: list[list] = _cells(cells.filter(pa.array(quoted))) if quoted.any() else []
        n_bad = rng.binomial(part.num_rows, self.dirt.malformed_share)
        if n_bad:
            picks = rng.choice(part.num_rows, n_bad, replace=False)
            kinds = rng.choice(len(MALFORMED_KINDS), n_bad)
            src = _cells(cells.take(pa.array(np.sort(picks))))
            for row, k in zip(src, kinds, strict=True):
                extra.append(corrupt(row, decl, MALFORMED_KINDS[k], rng))
                self.malformed[decl.name][MALFORMED_KINDS[k]] += 1
        with open(path, "ab") as fh:
            if plain.num_rows:
                opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
                pacsv.write_csv(plain, fh, opts)
            if extra:
                fh.write(_render(extra).encode("utf-8"))
        self.rows[decl.name] += part.num_rows
        self.partitions[decl.name].add(year)

    def finish(self) -> Path:
        """Write model.json listing every table (also empty ones) and its partitions."""
        entities = []
        for name in self.tables:
            decl = source_table(self.source, name)
            entity = decl.model_json_entity()
            entity["partitions"] = [
                {"name": str(y), "location": self.location(name, y)}
                for y in sorted(self.partitions.get(name, ()))
            ]
            entities.append(entity)
        self.root.mkdir(parents=True, exist_ok=True)
        model = {
            "name": self.source,
            "version": "1.0",
            "modifiedTime": self.modified_time,
            "entities": entities,
        }
        path = self.root / "model.json"
        path.write_text(json.dumps(model, indent=2))
        return path

    def files(self, name: str) -> int:
        return len(self.partitions.get(name, ()))

    def location(self, name: str, year: int) -> str:
        """A partition's model.json location: relative to the folder, or absolute."""
        relative = f"{name}/{year}.csv"
        return f"{self.url}/{relative}" if self.url else relative


def resolve_current(table: pa.Table, decl: SourceTable) -> pa.Table:
    """Current state of a change feed: latest version per key, deleted keys removed."""
    if table.num_rows == 0:
        return table
    keys = list(decl.key)
    order = [(k, "ascending") for k in keys] + [
        ("versionnumber", "ascending"),
        ("SinkModifiedOn", "ascending"),
    ]
    t = table.sort_by(order)
    key_cols = [t.column(k).to_numpy(zero_copy_only=False) for k in keys]
    last = np.ones(t.num_rows, dtype=bool)
    same = np.ones(t.num_rows - 1, dtype=bool)
    for col in key_cols:
        same &= col[1:] == col[:-1]
    last[:-1] = ~same
    t = t.filter(pa.array(last))
    return t.filter(pc.invert(t.column("IsDelete")))


def to_arrow_types(table: pa.Table, decl: SourceTable) -> pa.Table:
    """Internal rows -> the declared Arrow schema (dateTime as timestamp[us, UTC])."""
    arrays = []
    for col in decl.columns:
        arr = table.column(col.name).combine_chunks()
        if col.cdm_type in ("dateTime", "dateTimeOffset"):
            arr = pc.multiply(arr, 1_000_000).cast(pa.timestamp("us", tz="UTC"))
        arrays.append(arr.cast(col.arrow_type))
    return pa.Table.from_arrays(arrays, schema=decl.arrow_schema)


@dataclass
class DeltaExport:
    """Current-state Delta tables under landing/delta/<source>/<table>."""

    lake: Lake
    written: set = field(default_factory=set)
    rows: Counter = field(default_factory=Counter)

    def append(self, source: str, name: str, table: pa.Table) -> None:
        """Resolve a block's rows (keys never span blocks) and append them."""
        decl = source_table(source, name)
        current = to_arrow_types(resolve_current(table, decl), decl)
        mode = "append" if (source, name) in self.written else "overwrite"
        self.lake.write(current, "landing", "delta", source, name, mode=mode)
        self.written.add((source, name))
        self.rows[name] += current.num_rows

    def apply_changes(self, source: str, name: str, changes: pa.Table) -> None:
        """A new Delta version: current state merged with an increment's change rows."""
        decl = source_table(source, name)
        current = self.lake.read("landing", "delta", source, name)
        as_rows = _from_arrow_types(current, decl)
        merged = pa.concat_tables([as_rows, changes.select(decl.names)])
        state = to_arrow_types(resolve_current(merged, decl), decl)
        self.lake.write(state, "landing", "delta", source, name, mode="overwrite")
        self.rows[name] += changes.num_rows


def _from_arrow_types(table: pa.Table, decl: SourceTable) -> pa.Table:
    arrays = []
    for col in decl.columns:
        arr = table.column(col.name).combine_chunks()
        if col.cdm_type in ("dateTime", "dateTimeOffset"):
            arr = pc.divide(arr.cast(pa.int64()), 1_000_000)
        typ = pa.int64() if col.cdm_type in ("dateTime", "dateTimeOffset") else col.arrow_type
        arrays.append(arr.cast(typ))
    return pa.Table.from_arrays(arrays, names=decl.names)


GENERIC_COLUMNS = ("customer_id", "timestamp", "amount", "order_id", "product_id", "is_return")


@dataclass
class GenericCsv:
    """landing/generic/transactions.csv: one header, then rows appended block by block."""

    path: Path
    rows: int = 0

    def append(self, table: pa.Table) -> None:
        cells = pa.table(
            {
                "customer_id": table["customer_id"],
                "timestamp": format_iso(table["timestamp"].combine_chunks()),
                "amount": table["amount"],
                "order_id": table["order_id"],
                "product_id": table["product_id"],
                "is_return": pc.if_else(table["is_return"], "True", "False"),
            }
        )
        first = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            if first:
                fh.write((",".join(GENERIC_COLUMNS) + "\n").encode())
            opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
            pacsv.write_csv(cells, fh, opts)
        self.rows += table.num_rows


def drop_hidden(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in HIDDEN if c in table.column_names])
