"""The one module that reads and writes lake tables (Delta, through `deltalake`).

Why Delta everywhere: each write is a single atomic commit, so a reader (or a crashed
run's re-run) never sees half a batch, and every table keeps its versions for
incremental reads and audit. Paths are built from the configured lake root only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

log = logging.getLogger(__name__)

LAYERS = ("landing", "bronze", "silver", "gold", "quarantine", "export", "state")


@dataclass(frozen=True)
class Lake:
    """A lake rooted at one folder; tables are addressed as (layer, name parts...)."""

    root: Path

    def path(self, layer: str, *parts: str) -> Path:
        if layer not in LAYERS:
            raise ValueError(f"unknown lake layer {layer!r}; expected one of {LAYERS}")
        return self.root.joinpath(layer, *parts)

    def exists(self, layer: str, *parts: str) -> bool:
        return DeltaTable.is_deltatable(str(self.path(layer, *parts)))

    def tables(self, layer: str, *parts: str) -> list[tuple[str, ...]]:
        """Every Delta table below a folder, as name parts relative to the layer."""
        base = self.path(layer, *parts)
        if not base.exists():
            return []
        found = sorted(p.parent for p in base.rglob("_delta_log"))
        return [tuple(p.relative_to(self.path(layer)).parts) for p in found]

    def delta(self, layer: str, *parts: str) -> DeltaTable:
        where = self.path(layer, *parts)
        try:
            return DeltaTable(str(where))
        except TableNotFoundError as exc:
            raise FileNotFoundError(f"no Delta table at {where}") from exc

    def delta_at(self, layer: str, *parts: str, version: int) -> DeltaTable:
        return DeltaTable(str(self.path(layer, *parts)), version=version)

    def version(self, layer: str, *parts: str) -> int | None:
        return self.delta(layer, *parts).version() if self.exists(layer, *parts) else None

    def dataset(self, layer: str, *parts: str, version: int | None = None) -> ds.Dataset:
        """Arrow dataset of the live files (zero-copy input for DuckDB)."""
        table = self.delta(layer, *parts)
        if version is not None:
            table.load_as_version(version)
        return table.to_pyarrow_dataset()

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
        return self.dataset(layer, *parts, version=version).to_table(columns=cols, filter=filter)

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
    ) -> int:
        """One atomic commit; returns the new table version.

        `metadata` lands in the commit info (e.g. the batch id), which is what lets
        ingest tell a committed batch from one that crashed before its commit.
        """
        table = (
            pa.Table.from_pandas(data, preserve_index=False)
            if isinstance(data, pd.DataFrame)
            else data
        )
        where = self.path(layer, *parts)
        where.parent.mkdir(parents=True, exist_ok=True)
        write_deltalake(
            str(where),
            table,
            mode=mode,
            partition_by=partition_by,
            schema_mode="overwrite" if mode == "overwrite" else None,
            commit_properties=_commit(metadata),
        )
        return DeltaTable(str(where)).version()

    def commit_metadata(self, layer: str, *parts: str) -> list[dict[str, str]]:
        """The custom metadata of every commit of a table, oldest first."""
        history = self.delta(layer, *parts).history()
        return [{k: v for k, v in h.items() if isinstance(v, str)} for h in reversed(history)]


def _commit(metadata: dict[str, str] | None) -> CommitProperties | None:
    """Custom commit metadata (what ingest and gold record their progress in)."""
    return CommitProperties(custom_metadata=metadata) if metadata else None
