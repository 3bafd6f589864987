"""Gold as declarations: a new gold table is one declaration and one SQL file, and the
declarations agree with their SQL, the patch rules and the feature stage."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import pytest
from pandera.typing import Series

from c360ml.medallion import declarations
from c360ml.medallion.build import build_gold, build_silver, build_unify, describe_layer
from c360ml.medallion.declarations import GOLD_MODELS, HELPERS, GoldModel
from c360ml.medallion.ingest import ingest_landing
from c360ml.storage.lake import Lake
from tests.conftest import write_sync_folder
from tests.medallion.test_gold import _second_sync, through_unify


class OrderSizes(pa.DataFrameModel):
    """Lines and items of each gold order."""

    order_id: Series[str] = pa.Field(unique=True)
    customer_id: Series[str]
    lines: Series[int] = pa.Field(ge=1, description="lines of the order")
    items: Series[float] = pa.Field(ge=0, description="units bought or returned")


ORDER_SIZES_SQL = """
SELECT o.order_id, o.customer_id, CAST(COUNT(l.line) AS BIGINT) AS lines,
       CAST(COALESCE(SUM(ABS(l.qty)), 0) AS DOUBLE) AS items,
       CASE WHEN COUNT(l.line) = 0 THEN 'order without lines' END AS quarantine_reason
FROM gold_orders o LEFT JOIN gold_order_lines l ON l.order_id = o.order_id
GROUP BY o.order_id, o.customer_id
"""

# The new table: one declaration (and the SQL file above).
ORDER_SIZES = GoldModel(
    name="order_sizes",
    schema=OrderSizes,
    description="lines and items of each gold order",
    sql={"d365": "order_sizes"},
    reads=("gold_orders", "gold_order_lines"),
    key="order_id",
    changes="order_lines",  # its rows change with the orders' lines
    quarantine=True,
)
REPO_SQL = Path(__file__).resolve().parents[2] / "pipelines" / "sql"


@pytest.fixture
def declared(settings, monkeypatch, tmp_path):
    """Settings whose SQL folder holds the new table's file, with the new declaration
    added to the registry (nothing else is changed)."""
    sql = tmp_path / "sql"
    shutil.copytree(REPO_SQL, sql)
    (sql / "gold" / "order_sizes.sql").write_text(ORDER_SIZES_SQL)
    monkeypatch.setattr(declarations, "GOLD_MODELS", (*GOLD_MODELS, ORDER_SIZES))
    settings = settings.model_copy(update={"sql_dir": sql})
    through_unify(settings)
    return settings


def _sizes(lake: Lake) -> pd.DataFrame:
    return lake.read_pandas("gold", "order_sizes").sort_values("order_id").reset_index(drop=True)


def test_a_new_gold_table_is_one_declaration_and_one_sql_file(declared, tmp_path):
    """Built (its rows those of its SQL, checked), quarantined as declared, described by
    `c360ml describe`, patched on an increment (only the affected orders' rows change)
    and then equal to a rebuild."""
    settings, lake = declared, Lake(declared.lake)
    written = {t["table"]: t for t in build_gold(settings).rows()}
    assert written["gold/order_sizes"]["written"] == "rebuilt"
    sizes = _sizes(lake).set_index("order_id")
    lines = lake.read_pandas("gold", "order_lines").groupby("order_id").size()
    assert sizes["lines"].to_dict() == lines.to_dict()
    assert sizes.loc["SO:usrt-SO1", "items"] == 3  # 2 + 1 units
    quarantined = lake.read_pandas("quarantine", "gold", "order_sizes")
    assert quarantined.set_index("order_id")["quarantine_reason"].to_dict() == {
        "POS:T3": "order without lines"
    }
    assert written["gold/order_sizes"]["quarantined"] == 1

    described = {k.split(" ")[0]: (k, v) for k, v in describe_layer(settings, "gold").items()}
    title, columns = described["order_sizes"]
    assert title.endswith("lines and items of each gold order")
    assert {c["column"]: c["meaning"] for c in columns}["lines"] == "lines of the order"

    before = _sizes(lake)
    write_sync_folder(lake.path("landing"), "d365", "2024-05-01T00.00.00Z", _second_sync())
    ingest_landing(settings)
    build_silver(settings)
    build_unify(settings)
    written = {t["table"]: t["written"] for t in build_gold(settings).rows()}
    assert written["gold/order_sizes"] == written["gold/order_lines"] == "patched (6 orders)"
    after = _sizes(lake)
    changed = before.merge(after, how="outer", indicator=True).query("_merge != 'both'")
    # Affected: SO1..SO5 and T4. SO1 gained a line, SO3 lost its only one, SO4 entered
    # gold with its line; SO2 changed status only, so its row is recomputed the same; T1
    # is not affected and kept.
    assert set(changed.order_id) == {"SO:usrt-SO1", "SO:usrt-SO3", "SO:usrt-SO4"}
    assert after.set_index("order_id").loc["SO:usrt-SO1", "lines"] == 3
    quarantined = lake.read_pandas("quarantine", "gold", "order_sizes")
    # SO5 (now a person's) and the new T4 have no lines either.
    assert set(quarantined.order_id) == {"POS:T3", "SO:usrt-SO3", "SO:usrt-SO5", "POS:T4"}

    fresh = settings.model_copy(update={"lake_root": tmp_path / "rebuilt"})
    shutil.copytree(settings.lake, fresh.lake)
    for model in declarations.GOLD_MODELS:  # every built table, and gold's state
        for where in [("gold", model.name), ("quarantine", "gold", model.name)]:
            shutil.rmtree(fresh.lake.joinpath(*where), ignore_errors=True)
    shutil.rmtree(fresh.lake / "state" / "gold")
    rebuilt = {t["table"]: t["written"] for t in build_gold(fresh).rows()}
    assert rebuilt["gold/order_sizes"] == "rebuilt"
    for where in [("gold", "order_sizes"), ("quarantine", "gold", "order_sizes")]:
        a, b = (
            Lake(s.lake).read_pandas(*where).sort_values("order_id").reset_index(drop=True)
            for s in (settings, fresh)
        )
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_a_declared_check_that_fails_stops_the_table(declared, monkeypatch):
    """Without a quarantine, the order without lines breaks the declared check (lines
    >= 1): the build raises naming the table and the check, and writes nothing of it."""
    strict = dataclasses.replace(ORDER_SIZES, quarantine=False)
    monkeypatch.setattr(declarations, "GOLD_MODELS", (*GOLD_MODELS, strict))
    with pytest.raises(ValueError, match=r"gold/order_sizes fails its schema:\n.*lines: greater"):
        build_gold(declared)
    assert not Lake(declared.lake).exists("gold", "order_sizes")


def test_declarations_name_what_their_sql_reads():
    """A model's `reads` are the views its SQL files read (what a patch restricts and the
    units are made of), every rule exists, and models read only models before them."""
    from c360ml.medallion.gold import units
    from c360ml.medallion.patch import CHANGES

    for model in GOLD_MODELS:
        read = set()
        for file in model.sql.values():
            text = re.sub(r"--[^\n]*", "", (REPO_SQL / "gold" / f"{file}.sql").read_text())
            ctes = set(re.findall(r"(\w+) AS \(", text))
            read |= set(re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", text)) - ctes
        assert read == set(model.reads), model.name
        if model.changes is not None:
            assert model.changes in CHANGES and model.key is not None, model.name
    grouped = [m.name for ms, _ in units(GOLD_MODELS, HELPERS) for m in ms]
    assert sorted(grouped) == sorted(m.name for m in GOLD_MODELS)
    backwards = dataclasses.replace(GOLD_MODELS[0], reads=("gold_order_lines",))
    with pytest.raises(ValueError, match="gold/orders reads gold_order_lines, declared after"):
        units((backwards, *GOLD_MODELS[1:]), HELPERS)


def test_the_feature_stage_reads_the_declared_tables():
    """The feature stage's tables are the declared ones with an entity name."""
    from c360ml.features.gold import GOLD_TABLES, GoldTables

    assert set(GOLD_TABLES) == {f.name for f in dataclasses.fields(GoldTables)}
    assert GOLD_TABLES["order_status"] == (
        "order_status_history",
        declarations.schemas.StatusHistory,
    )
