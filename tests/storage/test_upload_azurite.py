"""`LakeStore.open_output` on Azurite: the stream the CI-D export's Parquet parts are
written through (#26). It writes what it is given, publishes nothing when its writer fails
halfway, and its errors are the store's: one line naming the blob, never the SAS token or
key, neither in the message nor in the traceback the CLI logs."""

from __future__ import annotations

import logging
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c360ml.storage.objects import open_store
from tests.storage.test_credentials_azurite import SAS, SAS_SIG, WRONG_KEY

KEY = "export/ci-d/churn_scores/part-00000.parquet"
BIG = 12 * 2**20  # past obstore's 10 MiB buffer: a multipart upload, errors raised by write


def _table(size: int) -> pa.Table:
    """About `size` bytes of Parquet that no encoding shrinks (random floats)."""
    return pa.table({"x": np.random.default_rng(0).random(max(1, size // 8))})


def _write(store, size: int) -> None:
    with store.open_output(KEY) as out:
        pq.write_table(_table(size), out, compression="none")


@pytest.mark.parametrize("size", [1_000, BIG])
def test_a_stream_writes_the_blob_and_a_failed_writer_publishes_nothing(az_root, size):
    store = open_store(az_root)
    _write(store, size)
    with store.open_input(KEY) as file:
        assert pq.read_table(file).equals(_table(size))

    with pytest.raises(ZeroDivisionError), store.open_output("export/half.parquet") as out:
        out.write(b"x" * size)
        1 / 0  # noqa: B018 - the writer fails halfway
    assert not store.exists("export/half.parquet")


@pytest.mark.parametrize("size", [1_000, BIG])
@pytest.mark.parametrize(
    ("variable", "secret", "kind"),
    [
        ("AZURE_STORAGE_SAS_TOKEN", SAS, "SAS token"),
        ("AZURE_STORAGE_ACCOUNT_KEY", WRONG_KEY, "account key"),
    ],
    ids=["sas-token", "wrong-key"],
)
def test_a_refused_upload_names_the_blob_and_no_secret(
    az_root, monkeypatch, caplog, size, variable, secret, kind
):
    monkeypatch.setenv(variable, secret)
    store = open_store(az_root)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PermissionError) as caught:
        _write(store, size)
    assert str(caught.value) == f"{az_root}/{KEY}: access denied with the {kind} credential"
    logged = "".join(traceback.format_exception(caught.value)) + caplog.text
    for shown in (str(caught.value), logged):
        assert SAS_SIG not in shown and secret not in shown and secret[:20] not in shown


def test_a_missing_container_is_named_by_the_stream(emulator_env):
    store = open_store("az://no-such-container/lake")
    with pytest.raises(FileNotFoundError) as caught:
        _write(store, 1_000)
    assert str(caught.value) == f"az://no-such-container/lake/{KEY}: the container does not exist"


def test_a_folder_is_uploaded_its_large_files_streamed_and_model_json_last(az_root, tmp_path):
    """`upload_folder` (what generate publishes a staged landing with): a partition past
    the stream threshold arrives whole, and each model.json is written after every data
    file, so an ingest that finds a sync's model.json finds its partitions."""
    from c360ml.storage.objects import CHUNK, upload_folder

    big = np.random.default_rng(1).bytes(CHUNK + 12_345)  # streamed, in two pieces
    sync = tmp_path / "d365" / "2026-01-01T01.00.00Z"
    (sync / "salesline").mkdir(parents=True)
    (sync / "salesline" / "2025.csv").write_bytes(big)
    (sync / "model.json").write_text("{}")
    (tmp_path / "generic").mkdir()
    (tmp_path / "generic" / "transactions.csv").write_text("customer_id\n")
    store = open_store(az_root)
    done = upload_folder(tmp_path, store, "landing")
    assert done[-1] == "landing/d365/2026-01-01T01.00.00Z/model.json" and len(done) == 3
    assert store.read_bytes("landing/d365/2026-01-01T01.00.00Z/salesline/2025.csv") == big
    assert store.read_text("landing/generic/transactions.csv") == "customer_id\n"
