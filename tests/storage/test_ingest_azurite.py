"""Ingest on a real Azurite: a Synapse Link landing in an az:// lake's `landing/` is read
straight from the container (model.json and CSV partitions as streams) into bronze on
az://, equal to a local-disk ingest of the same landing; later syncs incrementally; a
sync folder Synapse Link is still writing waits until it is complete; bad rows are
quarantined naming the blob, and errors name its URI, never a credential."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from c360ml.config import Settings
from c360ml.medallion.ingest import ingest_landing
from c360ml.schemas import QUARANTINE_REASON
from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from c360ml.synth import generate_increment, generate_lake
from tests.conftest import make_settings, write_sync_folder
from tests.storage.azurite import ACCOUNT, ACCOUNT_KEY

CUSTOMERS = 300
SEED = 3
S1, S2, S3 = "2024-01-05T00.00.00Z", "2024-01-06T00.00.00Z", "2024-01-07T00.00.00Z"


def _on(settings: Settings, root: str) -> Settings:
    """The same project with its lake at `root` (a URI)."""
    return settings.model_copy(update={"lake_root": root})


def _upload(local: Settings, root: str, *folders: str) -> None:
    """The local landing (or only `folders` below it) copied to the az:// lake's landing."""
    store = Lake(root).store
    landing = Path(local.lake) / "landing"
    for folder in folders or ("",):
        upload_folder(landing / folder, store, f"landing/{folder}".rstrip("/"))


def _sorted(table: pa.Table) -> pa.Table:
    """A table's rows in one order, without the ingest time (the one column two ingests
    of the same landing may differ in)."""
    table = table.drop_columns([c for c in ("_ingested_at",) if c in table.column_names])
    return table.sort_by([(c, "ascending") for c in table.column_names])


def _layer(lake: Lake, *where: str) -> dict[tuple[str, ...], pa.Table]:
    return {t: _sorted(lake.read(where[0], *t)) for t in lake.tables(*where)}


def _assert_same(remote: Lake, local: Lake) -> None:
    for where in (("bronze",), ("quarantine", "bronze")):
        ours, theirs = _layer(remote, *where), _layer(local, *where)
        assert ours.keys() == theirs.keys() and ours
        for name, table in ours.items():
            assert table.equals(theirs[name]), (where, name)


@pytest.fixture(scope="module")
def landings(tmp_path_factory) -> dict[str, Settings]:
    """One generated landing twice: model.json with relative partition locations (the
    generator's default) and with absolute https ones (Synapse Link's), each ingested on
    local disk as the reference."""
    out = {}
    for form, url in (
        ("relative", None),
        ("absolute", "https://contoso.dfs.core.windows.net/synapse/export"),
    ):
        settings = make_settings(tmp_path_factory.mktemp(form))
        generate_lake(settings, customers=CUSTOMERS, seed=SEED, absolute_locations=url)
        out[form] = settings
    return out


def _locations(settings: Settings) -> list[str]:
    landing = Path(settings.lake) / "landing"
    docs = [json.loads(p.read_text()) for p in landing.glob("*/*/model.json")]
    return [p["location"] for d in docs for e in d["entities"] for p in e["partitions"]]


def test_the_generator_writes_absolute_locations_and_both_forms_ingest_alike(
    landings, az_root, tmp_path
):
    relative, absolute = _locations(landings["relative"]), _locations(landings["absolute"])
    assert relative and not any("://" in loc for loc in relative)
    assert all(
        loc.startswith("https://contoso.dfs.core.windows.net/synapse/export/landing/")
        for loc in absolute
    )
    # the reference: the relative form ingested on local disk
    reference = landings["relative"]
    ingest_landing(reference)
    # the absolute form on local disk (a copy of the landing alone, lake of its own)
    local_abs = make_settings(tmp_path)
    shutil.copytree(Path(landings["absolute"].lake) / "landing", Path(local_abs.lake) / "landing")
    ingest_landing(local_abs)
    _assert_same(Lake(local_abs.lake), Lake(reference.lake))
    # the absolute form read from the container
    _upload(landings["absolute"], az_root)
    summary = ingest_landing(_on(landings["absolute"], az_root))
    ref = Lake(reference.lake)
    assert summary.total_rows == sum(ref.count("bronze", *t) for t in ref.tables("bronze"))
    _assert_same(Lake(az_root), Lake(reference.lake))


def test_generated_landing_and_an_increment_ingest_on_azurite_as_on_disk(tmp_path, az_root):
    local = make_settings(tmp_path)
    generate_lake(local, customers=CUSTOMERS, seed=SEED)
    _upload(local, az_root)
    remote = _on(local, az_root)
    first = ingest_landing(remote)
    ingest_landing(local)
    assert first.total_rows > CUSTOMERS and sum(t.quarantined for t in first.items) > 0
    _assert_same(Lake(az_root), Lake(local.lake))
    assert ingest_landing(remote).total_rows == 0  # nothing new: nothing read again
    # The next sync: only its folder is uploaded, only its files are ingested.
    stamp = generate_increment(local).sync
    _upload(local, az_root, f"d365/{stamp}", f"dataverse/{stamp}")
    second = ingest_landing(remote)
    ingest_landing(local)
    assert 0 < second.total_rows < first.total_rows
    _assert_same(Lake(az_root), Lake(local.lake))
    batches = set(Lake(az_root).read("bronze", "d365", "salestable")["_batch_id"].to_pylist())
    assert len(batches) == 2 and f"d365/{stamp}" in batches


def _cust(recid: int, account: str) -> dict:
    return {
        "Id": f"g{recid}",
        "SinkModifiedOn": "2024-01-02T00:00:00Z",
        "versionnumber": 1,
        "recid": recid,
        "createddatetime": "2024-01-01T00:00:00Z",
        "dataareaid": "usrt",
        "accountnum": account,
        "party": 1000 + recid,
        "custgroup": "10",
        "currency": "USD",
        "blocked": 0,
    }


def _batches(root: str) -> list[str]:
    lake = Lake(root)
    if not lake.exists("bronze", "d365", "custtable"):
        return []
    return sorted(set(lake.read("bronze", "d365", "custtable")["_batch_id"].to_pylist()))


def test_a_sync_folder_still_being_written_waits_until_complete(tmp_path, az_root, caplog):
    """The newest folder without its model.json waits; so does the folder that
    Changelog/changelog.info names, and any after it. Each is ingested once complete."""
    local = make_settings(tmp_path)
    landing = Path(local.lake) / "landing"
    remote = _on(local, az_root)
    store = Lake(az_root).store
    for i, stamp in enumerate((S1, S2, S3), start=1):
        write_sync_folder(landing, "d365", stamp, {"custtable": [_cust(i, f"C{i}")]})
    upload_folder(landing / "d365" / S1, store, f"landing/d365/{S1}")
    # S2's data files are there, its model.json not yet
    store.write_bytes(
        f"landing/d365/{S2}/custtable/2024.csv",
        (landing / "d365" / S2 / "custtable" / "2024.csv").read_bytes(),
    )
    caplog.set_level(logging.INFO, logger="c360ml")
    assert ingest_landing(remote).total_rows == 1
    assert _batches(az_root) == [f"d365/{S1}"]
    assert f"{az_root}/landing/d365/{S2}: not ingested yet: no model.json yet" in caplog.text
    # S2 complete; S3 begun, and named as being written by the changelog
    upload_folder(landing / "d365" / S2, store, f"landing/d365/{S2}")
    upload_folder(landing / "d365" / S3, store, f"landing/d365/{S3}")
    store.write_bytes("landing/d365/Changelog/changelog.info", f"{S3}\n".encode())
    assert ingest_landing(remote).total_rows == 1
    assert _batches(az_root) == [f"d365/{S1}", f"d365/{S2}"]
    assert f"changelog.info names {S3} as being written" in caplog.text
    # Synapse Link moves on to a new folder: S3 is complete
    store.write_bytes("landing/d365/Changelog/changelog.info", b"2024-01-08T00.00.00Z")
    assert ingest_landing(remote).total_rows == 1
    assert _batches(az_root) == [f"d365/{S1}", f"d365/{S2}", f"d365/{S3}"]
    assert ingest_landing(remote).total_rows == 0


def test_a_malformed_row_is_quarantined_naming_the_blob_and_no_key_is_shown(
    tmp_path, az_root, monkeypatch, caplog
):
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)  # Azurite's, by key
    local = make_settings(tmp_path)
    landing = Path(local.lake) / "landing"
    rows = [_cust(1, "C1"), dict(_cust(2, "C2"), recid="two"), "a,b,c", _cust(4, "C4")]
    write_sync_folder(landing, "d365", S1, {"custtable": rows})
    _upload(local, az_root)
    caplog.set_level(logging.INFO, logger="c360ml")
    summary = ingest_landing(_on(local, az_root))
    assert (summary.items[0].rows, summary.items[0].quarantined) == (2, 2)
    lake = Lake(az_root)
    q = lake.read("quarantine", "bronze", "d365", "custtable").sort_by("_line").to_pylist()
    assert [(r["_line"], r[QUARANTINE_REASON]) for r in q] == [
        (2, "column recid: not a valid int64"),
        (3, "wrong column count: expected 15, got 3"),
    ]
    blob = f"{az_root}/landing/d365/{S1}/custtable/2024.csv"
    assert {lake.uri("landing", r["_source_file"]) for r in q} == {blob}
    assert lake.store.exists(f"landing/{q[0]['_source_file']}")
    assert f"2 rows quarantined (first: {blob} line 2" in caplog.text
    assert ACCOUNT_KEY not in caplog.text and ACCOUNT_KEY[:20] not in caplog.text
    # an error in the export names the blob's URI, never the key
    folder = landing / "d365" / S2
    folder.mkdir(parents=True)
    entity = {
        "name": "custtable",
        "attributes": [{"name": "recid", "dataType": "int64"}],
        "partitions": [{"name": "2025", "location": "custtable/2025.csv"}],
    }
    (folder / "model.json").write_text(json.dumps({"entities": [entity]}))
    _upload(local, az_root, f"d365/{S2}")
    with pytest.raises(ValueError) as caught:
        ingest_landing(_on(local, az_root))
    assert str(caught.value) == (
        f"{az_root}/landing/d365/{S2}/model.json: entity 'custtable' lists missing file "
        f"{az_root}/landing/d365/{S2}/custtable/2025.csv"
    )


def test_a_partition_is_read_in_ranged_pieces_not_whole(tmp_path, az_root, monkeypatch):
    """Small pieces: the blob is read by many ranged requests, none of them the whole
    blob, and the rows are those a local ingest finds."""
    from c360ml.sources import synapse
    from c360ml.storage import objects

    monkeypatch.setattr(objects, "CHUNK", 4096)
    monkeypatch.setattr(synapse, "BLOCK_SIZE", 4096)
    local = make_settings(tmp_path)
    landing = Path(local.lake) / "landing"
    rows = [_cust(i, f"C{i}") for i in range(1, 1001)]
    rows[500] = "a,b"
    folder = write_sync_folder(landing, "d365", S1, {"custtable": rows})
    size = (folder / "custtable" / "2024.csv").stat().st_size
    _upload(local, az_root)
    lengths: list[int] = []
    read_range = objects.AzureLakeStore.get_range

    def counted(self, key: str, start: int, length: int) -> bytes:
        lengths.append(length)
        return read_range(self, key, start, length)

    monkeypatch.setattr(objects.AzureLakeStore, "get_range", counted)
    ingest_landing(_on(local, az_root))
    ingest_landing(local)
    assert len(lengths) >= size // 4096 and max(lengths) < size
    _assert_same(Lake(az_root), Lake(local.lake))


def test_delta_and_generic_landings_ingest_on_azurite_as_on_disk(tmp_path, az_root):
    """The other landing forms read through the store too: Link to Fabric's Delta tables
    (copied with their logs) and the generic CSV source (a header row, a YAML mapping)."""
    local = make_settings(tmp_path).model_copy(update={"sources": ("d365", "dataverse", "generic")})
    generate_lake(local, customers=CUSTOMERS, seed=SEED, fmt="delta")
    _upload(local, az_root)
    remote = _on(local, az_root)
    first = ingest_landing(remote)
    ingest_landing(local)
    tables = {(t.source, t.table) for t in first.items if t.rows}
    assert ("generic", "transactions") in tables and ("d365", "salesline") in tables
    # a generic batch is named by the time it ran: the one column that differs here
    for lake in (Lake(az_root), Lake(local.lake)):
        assert (
            len(set(lake.read("bronze", "generic", "transactions")["_batch_id"].to_pylist())) == 1
        )
    remote_lake, local_lake = Lake(az_root), Lake(local.lake)
    assert remote_lake.tables("bronze") == local_lake.tables("bronze")
    for t in remote_lake.tables("bronze"):
        ours, theirs = (
            _sorted(lake.read("bronze", *t).drop_columns(["_batch_id"]))
            for lake in (remote_lake, local_lake)
        )
        assert ours.equals(theirs), t
    assert ingest_landing(remote).total_rows == 0


@pytest.fixture(params=["local", "azurite"])
def any_root(request, tmp_path) -> str:
    return (
        str(tmp_path / "lake") if request.param == "local" else request.getfixturevalue("az_root")
    )


def test_streams_sizes_and_an_uploaded_folder_alike_on_disk_and_azurite(any_root, tmp_path):
    from c360ml.storage import objects

    store = objects.open_store(any_root)
    export = tmp_path / "export"
    (export / S1 / "custtable").mkdir(parents=True)
    big = bytes(range(256)) * 40_000  # about 10 MiB: more than one ranged read
    (export / S1 / "custtable" / "2024.csv").write_bytes(big)
    (export / S1 / "model.json").write_text("{}")
    keys = objects.upload_folder(export, store, "landing/d365")
    assert keys[-1] == f"landing/d365/{S1}/model.json"  # last: the folder is complete
    assert store.sizes("landing/d365") == {
        f"landing/d365/{S1}/custtable/2024.csv": len(big),
        f"landing/d365/{S1}/model.json": 2,
    }
    assert store.sizes("nothing") == {}
    key = f"landing/d365/{S1}/custtable/2024.csv"
    with store.open_stream(key) as stream:
        first = stream.read(10)
        assert first == big[:10] and first + stream.read() == big
    assert b"".join(store.iter_bytes(key, chunk=3 * 2**20)) == big
    with pytest.raises(FileNotFoundError, match=rf"^{any_root}/landing/missing.csv: no such"):
        store.open_stream("landing/missing.csv").read()
