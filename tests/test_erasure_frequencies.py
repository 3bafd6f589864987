"""Erasure and unify's value frequencies (#32): an erased person's share of
`state/unify/frequencies` is subtracted, and a value only they carried (a rare name's hash,
which a dictionary attack links back to them) is left in no file and no log of the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c360ml.medallion import erasure
from c360ml.medallion.build import build_silver, build_unify
from c360ml.medallion.ingest import ingest_landing
from c360ml.medallion.unify import (
    COUNT_KEY,
    COUNTED,
    FREQUENCIES,
    FREQUENCY_SCHEMA,
    STATE,
    STATE_KEY,
    frequency_fields,
    load_rules,
    prepare_records,
    read_records,
    unify_all,
    value_frequencies,
)
from c360ml.refresh import erase
from c360ml.storage.inputs import stamp
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from tests.conftest import make_settings

pytestmark = pytest.mark.slow
H1, H2 = 8123456789012345671, -7123456789012345672  # two values' hashes


def _common_on(tmp_path: Path):
    """The project's settings, whose rules have the `common` test on (pipelines/unify.yaml)."""
    settings = make_settings(tmp_path)
    assert any(r.common for r in load_rules(settings.path(settings.unify_rules)).rules)
    return settings


def _rows(table: pa.Table) -> set[tuple]:
    return set(zip(*(table[n].to_pylist() for n in FREQUENCY_SCHEMA.names), strict=True))


def _files_naming(folder: Path, values: set[int]) -> list[str]:
    """Files below `folder` (data files and the Delta log, checkpoints included) holding
    one of `values`: Parquet read down to every value, any other file as bytes."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), default=str)
        else:
            text = path.read_bytes().decode(errors="replace")
        if any(str(v) in text for v in values):
            found.append(str(path.relative_to(folder)))
    return found


def test_an_erased_persons_frequencies_are_subtracted_and_their_rare_values_gone(tmp_path):
    settings = _common_on(tmp_path)
    rules = load_rules(settings.path(settings.unify_rules))
    fields = frequency_fields(rules)
    generate_lake(settings, customers=400, seed=3)
    for step in (ingest_landing, build_silver, build_unify):
        step(settings)
    lake = Lake(settings.lake)
    previous_map = lake.read_pandas("gold", "customer_source_map")
    counted_on = prepare_records(read_records(lake, settings).to_pandas())  # as counted
    counted = lake.delta(*FREQUENCIES).version()
    assert _rows(lake.read(*FREQUENCIES)) == _rows(value_frequencies(counted_on, fields))

    generate_increment(settings)
    for step in (ingest_landing, build_silver, build_unify):
        step(settings)
    assert lake.delta(*FREQUENCIES).version() == counted  # kept, not counted again
    erased = erasure.erased_records(lake, previous_map)
    assert len(erased), "the increment erases nobody"
    job = erasure.plan(lake, erased, [])
    assert job.count not in ("", erasure.DROP) and job.frequencies

    result = erase(lake, previous_map)
    assert result.rows > 0
    # The values only erased records carried (a rare name, a postal code) are gone, from
    # the table and from every file and log of it; the others keep their counts (a value
    # other records carry too, and the total), so no decision of the state changes.
    gone = counted_on.source.str.cat(counted_on.source_key, "/").isin(
        erased.source.str.cat(erased.source_key, "/")
    )
    hashed = value_frequencies(counted_on[gone.to_numpy()].reset_index(drop=True), fields)
    before = value_frequencies(counted_on, fields)
    theirs = before.to_pandas().merge(
        hashed.to_pandas(), on=["field", "value"], suffixes=("", "_erased")
    )
    theirs = theirs[theirs.field != "_records"]
    only = set(theirs.value[theirs["count"] == theirs.count_erased])
    assert only, "no erased record has a value of its own"
    assert (theirs["count"] > theirs.count_erased).any(), "nor one shared with others"
    assert _rows(lake.read(*FREQUENCIES)) == {r for r in _rows(before) if r[1] not in only}
    assert not lake.read_pandas(*COUNTED).source_key.isin(erased.source_key).any()
    assert _files_naming(lake.path(*FREQUENCIES), only) == []
    assert _files_naming(lake.path(*COUNTED), only) == []  # the per-record hashes kept
    assert erase(lake, previous_map).rows == 0  # a rerun: nothing more goes

    # The next build with changes unifies again only the clusters the changes reach, and
    # clusters as a whole unify with the same kept frequencies does.
    kept = lake.read(*FREQUENCIES)
    generate_increment(settings)
    ingest_landing(settings)
    build_silver(settings)
    summary = build_unify(settings)
    assert 0 < summary.unified < summary.records
    assert _rows(lake.read(*FREQUENCIES)) == _rows(kept)
    whole = unify_all(read_records(lake, settings), rules, None, pd.Timestamp.now(tz="UTC"), kept)
    assert _clusters(lake.read_pandas("gold", "customer_source_map")) == _clusters(whole.source_map)


def _clusters(source_map: pd.DataFrame) -> set[frozenset[str]]:
    """The records of each customer, whatever the customer's id."""
    keys = source_map.source + ":" + source_map.source_key
    return set(keys.groupby(source_map.customer_id).agg(frozenset))


def test_the_step_drops_the_erased_values_only_and_a_rerun_nothing_more(tmp_path):
    """Erasing a1 (the only H1) and a3 (one of four H2): H1 goes, H2 and the total keep
    their counts; a refresh killed after the frequencies were written runs the step again
    and drops nothing more."""
    lake = Lake(tmp_path)
    meta = stamp({}, **{COUNT_KEY: "c1", STATE_KEY: "rules"})
    freq = pa.table(
        {"field": ["_records", "full_name", "full_name"], "value": [0, H1, H2], "count": [5, 1, 4]}
    ).cast(FREQUENCY_SCHEMA)
    lake.write(freq, *FREQUENCIES, metadata=meta)
    counted = pa.table(
        {"source": ["dataverse"] * 3, "source_key": ["a1", "a2", "a3"], "h_full_name": [H1, H2, H2]}
    )
    lake.write(counted, *COUNTED, metadata=meta)
    lake.write(pa.table({"source": ["dataverse"], "source_key": ["a2"]}), *STATE)
    erased = pd.DataFrame({"source": ["dataverse"] * 2, "source_key": ["a1", "a3"]})
    job = erasure.plan(lake, erased, [])
    assert job.count == "c1"
    assert sorted(job.frequencies) == sorted(
        [["_records", 0, 2], ["full_name", H1, 1], ["full_name", H2, 1]]
    )
    for _ in range(2):
        erasure._subtract_frequencies(lake, job, erasure.ErasureResult())
    assert _rows(lake.read(*FREQUENCIES)) == {("_records", 0, 5), ("full_name", H2, 4)}
    assert _files_naming(lake.path(*FREQUENCIES), {H1}) == []

    # Frequencies of another count (the Spark engine's, a lake from before COUNTED) cannot
    # be decremented: they are dropped, and counted again by the next build.
    spark = stamp({}, **{STATE_KEY: "rules"})  # counted by the Spark engine: no count key
    lake.write(freq, *FREQUENCIES, mode="overwrite", metadata=spark)
    job = erasure.plan(lake, pd.DataFrame({"source": ["dataverse"], "source_key": ["a2"]}), [])
    assert job.count == erasure.DROP
    erasure.run(lake, job)
    assert not lake.exists(*FREQUENCIES) and not lake.path(*FREQUENCIES).exists()
