"""model.json partition locations: relative ones (the generator's) and absolute ones
(https://<account>.dfs.core.windows.net/..., what Synapse Link writes) name the same file."""

from __future__ import annotations

import json

import pytest

from c360ml.sources.synapse import partition_key, read_model_json
from c360ml.storage.objects import open_store

SYNC = "2026-11-03T07.44.51Z"
BASE = f"https://contosolake.dfs.core.windows.net/dataverse-contoso-unq1/{SYNC}"
FOLDER = f"landing/d365/{SYNC}"


def test_relative_and_absolute_locations_resolve_to_the_same_file():
    assert partition_key(FOLDER, "CustTable/1.csv") == f"{FOLDER}/CustTable/1.csv"
    assert partition_key(FOLDER, f"{BASE}/CustTable/1.csv") == f"{FOLDER}/CustTable/1.csv"
    # percent-encoded names, and a SAS query (never echoed) do not change the file
    url = f"{BASE}/Sales%20Line/1.csv?sv=2022&sig=SECRET"
    assert partition_key(FOLDER, url) == f"{FOLDER}/Sales Line/1.csv"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (
            "https://contosolake.dfs.core.windows.net/c/2026-01-01T00.00.00Z/CustTable/1.csv",
            rf"partition location https://\S+/1.csv is not under the sync folder '{SYNC}'",
        ),
        (f"{BASE}", "names no file below the sync folder"),
        (f"{BASE}/../x.csv?sig=SECRET", "names no file below the sync folder"),
        ("../../x.csv", "names no file below the sync folder"),
    ],
)
def test_a_location_outside_the_sync_folder_is_refused(tmp_path, location, message):
    folder = tmp_path / "landing" / "d365" / SYNC
    (folder / "CustTable").mkdir(parents=True)
    entity = {
        "name": "CustTable",
        "attributes": [{"name": "AccountNum", "dataType": "string"}],
        "partitions": [{"name": "1", "location": location}],
    }
    (folder / "model.json").write_text(json.dumps({"entities": [entity]}))
    with pytest.raises(ValueError, match=message) as caught:
        read_model_json(open_store(tmp_path), FOLDER)
    assert str(caught.value).startswith(f"{folder / 'model.json'}: ")
    assert "SECRET" not in str(caught.value)


def test_model_json_with_absolute_locations_is_read(tmp_path):
    folder = tmp_path / "landing" / "d365" / SYNC
    (folder / "CustTable").mkdir(parents=True)
    (folder / "CustTable" / "1.csv").write_text("a,1\n")
    entity = {
        "name": "CustTable",
        "attributes": [{"name": "AccountNum", "dataType": "string"}],
        "partitions": [{"name": "1", "location": f"{BASE}/CustTable/1.csv"}],
    }
    (folder / "model.json").write_text(json.dumps({"entities": [entity]}))
    (file,) = read_model_json(open_store(tmp_path), FOLDER)["custtable"].files
    assert (file.key, file.size, file.uri) == (
        f"{FOLDER}/CustTable/1.csv",
        4,
        str(folder / "CustTable" / "1.csv"),
    )


def test_the_generator_writes_absolute_locations_and_increments_keep_them(tmp_path):
    from c360ml.synth import generate_increment, generate_lake
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    root = "https://contosolake.dfs.core.windows.net/dataverse-contoso-unq1/lake"
    first = generate_lake(settings, customers=50, seed=1, absolute_locations=root)
    later = generate_increment(settings)
    for stamp in (first.sync, later.sync):
        doc = json.loads((settings.lake / "landing" / "d365" / stamp / "model.json").read_text())
        locations = [p["location"] for e in doc["entities"] for p in e["partitions"]]
        assert locations and all(
            loc.startswith(f"{root}/landing/d365/{stamp}/") for loc in locations
        )
        store, folder = open_store(settings.lake), f"landing/d365/{stamp}"
        for entity in read_model_json(store, folder).values():
            assert all(store.exists(f.key) for f in entity.files)


@pytest.mark.parametrize(
    "url",
    [
        "az://lake/path",
        "https://contosolake.blob.core.windows.net/lake/path",
        "https://example.com/lake/path",
    ],
)
def test_the_generator_refuses_a_url_that_is_not_an_adls_location(tmp_path, url):
    from c360ml.synth import generate_lake
    from tests.conftest import make_settings

    with pytest.raises(ValueError, match=r"https://<account>.dfs.core.windows.net|Azure storage"):
        generate_lake(make_settings(tmp_path), customers=5, seed=1, absolute_locations=url)
    assert not (tmp_path / "lake" / "landing").exists()


def test_which_sync_folders_are_complete_on_local_disk(tmp_path):
    from c360ml.sources.synapse import sync_folders

    source = tmp_path / "landing" / "d365"
    stamps = ["2026-11-03T07.00.00Z", "2026-11-03T08.00.00Z", "2026-11-03T09.00.00Z"]
    for stamp in stamps:
        (source / stamp / "custtable").mkdir(parents=True)
        (source / stamp / "model.json").write_text("{}")
    for other in ("Changelog", "OptionsetMetadata", "Microsoft.Athena.TrickleFeedService"):
        (source / other).mkdir()
    store, prefix = open_store(tmp_path), "landing/d365"
    keys = [f"{prefix}/{s}" for s in stamps]
    assert sync_folders(store, prefix).complete == tuple(keys)
    (source / stamps[2] / "model.json").unlink()  # the newest, still being written
    found = sync_folders(store, prefix)
    assert found.complete == tuple(keys[:2]) and [k for k, _ in found.waiting] == keys[2:]
    (source / "Changelog" / "changelog.info").write_text(stamps[1])
    found = sync_folders(store, prefix)
    assert found.complete == tuple(keys[:1]) and [k for k, _ in found.waiting] == keys[1:]
    assert found.waiting[1][1] == f"after {stamps[1]}, which is not complete"
    (source / stamps[1] / "model.json").unlink()  # older than a folder begun: broken, read
    (source / "Changelog" / "changelog.info").write_text(stamps[2])
    assert sync_folders(store, prefix).complete == tuple(keys[:2])
