"""`c360ml build all --engine spark` on an az:// lake in Azurite (#26): the Spark engine's
tables and scratch folders reached by URI, as a user on a container runs it.

Sail is the Spark here, started in the emulator's environment (it reaches the container
through the same variables as c360ml, see tests/storage/test_sail_azurite.py). A
generated landing is copied into the container and built by Spark there and on a local
folder: every gold table is equal, written by Sail, and no scratch is left in the
container."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from c360ml.cli import main
from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.conftest import user_project
from tests.storage.test_build_azurite import _assert_same_gold

CUSTOMERS = 200
SEED = 5


@pytest.fixture
def sail_on_azurite(emulator_env) -> Iterator[str]:
    """The Spark Connect URL of a Sail server started in the emulator's environment (the
    session-wide one of tests/spark/conftest.py may predate it), with a client session to
    it made the process's default: the build's `getOrCreate` would otherwise return an
    older session, to another server. Both stopped after the test, the session first (a
    client left to a stopped server retries for minutes, and the next `getOrCreate` of
    the process would return it)."""
    from pysail.spark import SparkConnectServer
    from pyspark.sql import SparkSession

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    url = f"sc://{host}:{port}"
    session = SparkSession.builder.remote(url).create()
    try:
        yield url
    finally:
        session.stop()
        server.stop()


def _build(monkeypatch: pytest.MonkeyPatch, root: str | None) -> None:
    """`c360ml build all --engine spark` on the project's lake, or on `root`."""
    with monkeypatch.context() as local:
        if root is not None:
            local.setenv("C360ML_LAKE_ROOT", root)
        assert main(["build", "all", "--engine", "spark"]) == 0


def test_spark_build_all_on_an_az_lake_equals_a_local_one(
    tmp_path, monkeypatch, az_root, sail_on_azurite, capsys
):
    home = tmp_path / "project"
    home.mkdir()
    user_project(home)
    monkeypatch.chdir(home)
    for name in [n for n in os.environ if n.startswith("C360ML_")]:
        monkeypatch.delenv(name)
    assert main(["generate", "--customers", str(CUSTOMERS), "--seed", str(SEED)]) == 0
    lake, reference = Lake(az_root), Lake(home / "data" / "lake")
    upload_folder(reference.path("landing"), lake.store, "landing")
    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_on_azurite)
    _build(monkeypatch, az_root)
    out = capsys.readouterr().out
    assert "Traceback" not in out and "gold/orders" in out
    _build(monkeypatch, None)

    _assert_same_gold(lake, reference)
    for where in (("silver", "salestable"), ("gold", "customer_source_map"), ("gold", "orders")):
        assert lake.delta(*where).history(1)[0]["engineInfo"].startswith("sail"), where
    scratch = ("unify_spark_scratch", "features_spark_scratch")
    left = [k for k in lake.list_files("state") if k.split("/")[1] in scratch]
    assert not left, left
    assert not (home / "data" / "lake" / "az:").exists()
