"""Bad credentials and places on a real Azurite: one clear line naming the URI, never the
key or the SAS token, from the lake's every way in (delta-rs, obstore, the lease)."""

from __future__ import annotations

import base64

import pyarrow as pa
import pytest

from c360ml.storage.lake import Lake
from c360ml.storage.lease import exclusive
from tests.storage.azurite import free_port

WRONG_KEY = base64.b64encode(
    b"not-the-devstoreaccount1-key-but-64-bytes-long-enough-to-sign!!"
).decode()
SAS_SIG = "LeakedSignature0123456789"
SAS = f"sv=2022-11-02&ss=b&srt=sco&sp=rwdlac&se=2030-01-01T00:00:00Z&sig={SAS_SIG}"


def _attempts(lake: Lake):
    """Each way c360ml reaches a lake: a Delta write and read, JSON state, the lease."""
    yield lambda: lake.write(pa.table({"k": [1]}), "gold", "t")
    yield lambda: lake.read("gold", "t")
    yield lambda: lake.write_json({"a": 1}, "state", "x.json")
    yield lambda: lake.read_json("state", "x.json")
    yield lambda: exclusive(lake.root, "build", 0).__enter__()


def _errors(lake: Lake) -> list[str]:
    found = []
    for attempt in _attempts(lake):
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each layer's own type
            attempt()
        found.append(str(caught.value))
    return found


def test_a_wrong_key_is_denied_and_never_shown(az_root, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", WRONG_KEY)
    lake = Lake(az_root)
    assert WRONG_KEY not in repr(lake.store) and "account key" in repr(lake.store)
    for message in _errors(lake):
        assert az_root in message, message
        assert WRONG_KEY not in message and WRONG_KEY[:20] not in message
    store_message = _errors(lake)[2]
    assert store_message == f"{az_root}/state/x.json: access denied with the account key credential"


def test_a_sas_token_is_never_shown(az_root, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", SAS)
    lake = Lake(az_root)
    for message in _errors(lake):
        assert az_root in message, message
        assert SAS_SIG not in message


def test_a_missing_container_is_named(emulator_env):
    lake = Lake("az://no-such-container/lake")
    with pytest.raises(
        FileNotFoundError,
        match=r"^az://no-such-container/lake/state/x.json: the container does not exist$",
    ):
        lake.write_json({"a": 1}, "state", "x.json")
    for attempt in _attempts(lake):
        with pytest.raises(FileNotFoundError) as caught:
            attempt()
        assert str(caught.value).endswith(": the container does not exist")
        assert str(caught.value).startswith("az://no-such-container/lake")


def test_an_unreachable_endpoint_is_named(emulator_env, monkeypatch):
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{free_port()}")
    lake = Lake("az://lake/c360ml")
    expected = r": the storage endpoint cannot be reached \(Connection refused\)$"
    with pytest.raises(ConnectionError, match=r"^az://lake/c360ml/state/x.json" + expected):
        lake.write_json({"a": 1}, "state", "x.json")
    with pytest.raises(ConnectionError, match=r"^az://lake/c360ml/gold/t" + expected):
        lake.exists("gold", "t")
