"""Unify: the only stage that assigns customer_id (silver -> unify -> gold).

For now the identity map of DESIGN.md (one Commerce person account = one customer;
contacts joined by exact normalised e-mail; other contacts become contact-only
profiles), declared in `pipelines/sql/gold/unify_identity.sql`. It writes
`gold/customer_source_map` (source, source_key -> customer_id), the backstamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from c360ml.config import Settings
from c360ml.lake import Lake
from c360ml.medallion.gold import write_gold
from c360ml.medallion.sql import connect, run_sql
from c360ml.schemas import CustomerSourceMap


@dataclass
class UnifySummary:
    records: dict[str, int]
    customers: int
    written: bool

    def rows(self) -> list[dict]:
        return [
            {
                "source": s,
                "records": n,
                "customers": self.customers,
                "written": "yes" if self.written else "unchanged",
            }
            for s, n in self.records.items()
        ]


def build_unify(settings: Settings) -> UnifySummary:
    lake = Lake(settings.lake)
    con = connect(lake)
    parts = []
    if lake.exists("silver", "custtable") or lake.exists("silver", "contact"):
        parts.append(run_sql(con, settings, "gold/unify_identity"))
    if lake.exists("silver", "generic_transactions"):
        parts.append(run_sql(con, settings, "gold/unify_generic"))
    if not parts:
        raise FileNotFoundError(f"no silver customer tables under {lake.path('silver')}")
    source_map = pa.concat_tables(parts)
    written = write_gold(
        lake, "customer_source_map", source_map, CustomerSourceMap, inputs=_silver_versions(lake)
    )
    counts = pc.value_counts(source_map["source"]).to_pylist()
    return UnifySummary(
        records={c["values"]: c["counts"] for c in counts},
        customers=len(pc.unique(source_map["customer_id"])),
        written=written,
    )


def _silver_versions(lake: Lake) -> dict[str, int]:
    return {"/".join(p): lake.version("silver", *p) for p in lake.tables("silver")}
