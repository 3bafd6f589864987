"""--format delta: current-state Delta tables with the declared Arrow schema."""

from __future__ import annotations

from c360ml.sources.tables import SOURCE_TABLES
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from tests.synth.conftest import make_settings


def test_delta_landing_holds_current_state(tmp_path):
    settings = make_settings(tmp_path)
    generate_lake(settings, customers=400, seed=3, fmt="delta")
    lake = Lake(settings.lake)
    for (source, name), decl in SOURCE_TABLES.items():
        table = lake.read("landing", "delta", source, name)
        assert table.schema == decl.arrow_schema, name
        frame = table.to_pandas()
        assert not frame.IsDelete.any(), name
        assert not frame.duplicated(list(decl.key)).any(), name
    assert not (settings.lake / "landing" / "d365").exists()
    before = lake.version("landing", "delta", "d365", "custtable")
    generate_increment(settings)
    assert lake.version("landing", "delta", "d365", "custtable") == before + 1
    cust = lake.read_pandas("landing", "delta", "d365", "custtable")
    erased = __import__("pandas").read_parquet(settings.truth / "erased.parquet")
    keys = __import__("pandas").read_parquet(settings.truth / "person_keys.parquet")
    gone = keys[keys.person_id.isin(erased.person_id) & (keys.source == "d365")]
    assert not (cust.dataareaid + "-" + cust.accountnum).isin(gone.source_key).any()
