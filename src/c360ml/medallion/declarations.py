"""The gold tables, declared: one registry that every reader and every engine uses.

What it covers: every gold table with a contract in `c360ml.schemas`. The models
(`GOLD_MODELS`) are the tables the gold build computes from silver by SQL
(`pipelines/sql/gold/`), declared fully: how each is made, patched and checked. The
others (`MADE_ELSEWHERE`) are written by another stage (unify: the profiles, the source
map, the retired ids; the refresh and the segments: scores and membership) and are
declared here only as readers need them: contract, description, and the names the
feature stage and the glossary use. Tables without a pandera contract (unify's report,
measures and feature snapshots whose columns come from the user's spec) are not here.

Why data and not code: the same declarations are run by DuckDB
(`c360ml.medallion.gold`) and are to be run by Spark, and they are read by
`c360ml describe` (the descriptions), the feature stage (which table and contract an
entity is) and the glossary (the nouns of a feature label). Adding a gold table is one
`GoldModel` here and one SQL file; nothing else needs to know its name.

This module imports only the schemas: the service reaches it through the glossary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandera.pandas as pa

from c360ml import schemas

if TYPE_CHECKING:
    from c360ml.storage.lake import Lake

# Which silver table's presence says a source is in the lake. A model's SQL files are
# per source; the files of the sources present run (their rows unioned).
SOURCES: Mapping[str, str] = {
    "d365": "custtable",
    "generic": "generic_transactions",
    "dataverse": "incident",
}
# Sources whose silver keeps no change log: a lake with one is rebuilt, never patched.
UNLOGGED_SOURCES = ("generic",)


@dataclass(frozen=True)
class GoldTable:
    """A gold table as its readers know it."""

    name: str  # gold/<name>
    schema: type[pa.DataFrameModel]  # its contract, in c360ml.schemas
    description: str  # one line for readers (`c360ml describe`)
    made_by: str = "gold"  # the stage that writes it
    entity: str | None = None  # the feature stage's name for it (`features.gold.GoldTables`)
    noun: tuple[str, str] | None = None  # (one, many) in feature labels (`c360ml.glossary`)


@dataclass(frozen=True, kw_only=True)
class GoldModel(GoldTable):
    """A gold table the gold build computes, as any engine needs it.

    The table is the union of the rows of its SQL files (one per source present);
    `reads` names every view those files read: lake tables as `<layer>_<table>`, the
    outputs of earlier models as `gold_<name>` / `quarantine_<name>`, and helpers
    (`HELPERS`) by name. With `quarantine`, the SQL gives each row a `quarantine_reason`,
    and the rows with one go to `quarantine/gold/<name>`: the table and its quarantine
    are one unit of work.

    A patch recomputes only the rows of the affected `key` values that the rule named
    `changes` finds (its rules are the engine's; DuckDB's are in
    `c360ml.medallion.patch`), by the same SQL over its reads restricted to them: a
    read with the key column, or with the source key columns of the affected rows, is
    restricted; a read with neither (a lookup, such as the products for the lines) is
    read whole. `changes=None`: always rebuilt (when its inputs changed).
    """

    sql: Mapping[str, str]  # source (`SOURCES`) -> SQL file under pipelines/sql/gold
    reads: tuple[str, ...]  # the views the SQL reads (see above)
    key: str | None = None  # the column a patch replaces rows by
    changes: str | None = None  # the rule that finds the affected keys; None: rebuilt
    quarantine: bool = False  # rows with a quarantine_reason go to quarantine/gold/<name>
    null_note: tuple[str, str] | None = None  # (column, meaning): its nulls counted in the summary

    @property
    def parts(self) -> list[tuple[str, ...]]:
        """The lake tables of its unit of work: the table, then its quarantine (the last
        part written, whose commit says the unit is done)."""
        quarantine = [("quarantine", "gold", self.name)] if self.quarantine else []
        return [("gold", self.name), *quarantine]


@dataclass(frozen=True)
class Helper:
    """A query that models read as a view, not a gold table. Its result is kept in
    `state` (written after every model of its unit of work): what the next build
    compares against to find the affected rows."""

    name: str
    sql: Mapping[str, str]  # source -> SQL file, as GoldModel.sql
    state: tuple[str, ...]
    description: str


HELPERS: tuple[Helper, ...] = (
    Helper(
        "order_accounts",
        {"d365": "order_accounts"},
        state=("state", "gold", "order_accounts"),
        description="per Commerce account: its customer_id, whether it is known, its party type",
    ),
)

_ORDER_FEEDS = ("salestable", "salesline", "retailtransactiontable")

# In dependency order: a model reads only models before it.
GOLD_MODELS: tuple[GoldModel, ...] = (
    GoldModel(
        name="orders",
        schema=schemas.Orders,
        description="one row per order (sales order or POS transaction), keyed by customer_id",
        entity="orders",
        noun=("order", "orders"),
        sql={"d365": "orders", "generic": "generic_orders"},
        reads=(
            *(f"silver_{t}" for t in _ORDER_FEEDS),
            "order_accounts",
            "silver_generic_transactions",
            "gold_customer_source_map",
        ),
        key="order_id",
        changes="orders",
        quarantine=True,
    ),
    GoldModel(
        name="order_lines",
        schema=schemas.OrderLines,
        description="one row per line of a gold order; lines of quarantined orders are quarantined",
        entity="order_lines",
        noun=("order line", "order lines"),
        sql={"d365": "order_lines", "generic": "generic_order_lines"},
        reads=(
            "silver_salesline",
            "silver_retailtransactionsalestrans",
            "silver_inventtable",
            "silver_generic_transactions",
            "gold_orders",
            "quarantine_orders",
        ),
        key="order_id",
        changes="order_lines",
        quarantine=True,
    ),
    GoldModel(
        name="products",
        schema=schemas.Products,
        description="the product catalogue: item id, name and category",
        entity="products",
        sql={"d365": "products"},
        reads=("silver_inventtable",),
    ),
    GoldModel(
        name="order_status_history",
        schema=schemas.StatusHistory,
        description="valid-from/valid-to status of each gold order, from every version the source sent",
        entity="order_status",
        sql={"d365": "order_status_history"},
        reads=("bronze_d365_salestable", "bronze_d365_retailtransactiontable", "gold_orders"),
        key="entity_id",
        changes="order_history",
    ),
    GoldModel(
        name="support_cases",
        schema=schemas.SupportCases,
        description="Dataverse incidents (service cases), keyed by customer_id when linked",
        entity="support_cases",
        noun=("support case", "support cases"),
        sql={"dataverse": "support_cases"},
        reads=("silver_incident", "gold_customer_source_map"),
        null_note=("customer_id", "unlinked (no profile)"),
    ),
    GoldModel(
        name="case_status_history",
        schema=schemas.StatusHistory,
        description="valid-from/valid-to status of each support case, from every version sent",
        entity="case_status",
        sql={"dataverse": "case_status_history"},
        reads=("bronze_dataverse_incident", "gold_support_cases"),
        key="entity_id",
        changes="case_history",
    ),
)

MADE_ELSEWHERE: tuple[GoldTable, ...] = (
    GoldTable(
        "customer_profile",
        schemas.CustomerProfile,
        "one row per unified customer",
        made_by="unify",
        entity="customers",
        noun=("customer", "customers"),
    ),
    GoldTable(
        "customer_source_map",
        schemas.CustomerSourceMap,
        "the backstamp: every source record's customer_id",
        made_by="unify",
    ),
    GoldTable(
        "customer_id_redirects",
        schemas.CustomerIdRedirects,
        "ids retired by a merge, with the surviving id",
        made_by="unify",
    ),
    GoldTable(
        "churn_scores",
        schemas.ChurnScores,
        "every profile's score at every ScoredAsOf, in CI-D's names",
        made_by="refresh",
    ),
    GoldTable(
        "segment_membership",
        schemas.SegmentMembership,
        "who is in which segment at which as_of",
        made_by="segments",
    ),
)


def gold_tables() -> dict[str, GoldTable]:
    """Every declared gold table by name (the registry as it is now: a test may add a
    model to `GOLD_MODELS`)."""
    return {t.name: t for t in (*MADE_ELSEWHERE, *GOLD_MODELS)}


def entities() -> dict[str, GoldTable]:
    """The tables the feature stage reads, by its name for each."""
    return {t.entity: t for t in gold_tables().values() if t.entity}


def lake_table(lake: Lake, view: str) -> tuple[str, ...] | None:
    """The lake table a view of `GoldModel.reads` names (`<layer>_<table>`, bronze as
    `bronze_<source>_<table>`, `quarantine_<name>` for quarantine/gold/<name>); None for
    a helper or a table not in the lake. Every engine resolves reads this way."""
    layer, _, rest = view.partition("_")
    if layer == "quarantine":
        where: tuple[str, ...] = ("quarantine", "gold", rest)
    elif layer == "bronze":
        found = [p for p in lake.tables("bronze") if "_".join(p) == rest]
        where = ("bronze", *found[0]) if found else ("bronze", rest)
    elif layer in ("silver", "gold"):
        where = (layer, rest)
    else:
        return None
    return where if lake.exists(*where) else None


def source_files(sql: Mapping[str, str], sources: frozenset[str]) -> list[str]:
    """The SQL files of the sources present (a model's, or a helper's)."""
    return [file for source, file in sql.items() if source in sources]
