"""Azurite for the storage tests: one emulator per test session, one container per test.

The emulator is found through the project's own package.json (installed into node_modules
on first use, see `tests.storage.azurite`), so `pytest tests/storage` needs no Makefile
step. A test reaches it through the environment variables a user would set for Azurite
(`AZURE_STORAGE_USE_EMULATOR`, and `AZURITE_BLOB_STORAGE_URL` for its port).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.storage.azurite import Azurite


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator_env(azurite, monkeypatch) -> Azurite:
    """The environment of a user on Azurite: no other Azure credential set."""
    import os

    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)
    return azurite


@pytest.fixture
def container(emulator_env) -> str:
    """A fresh container of its own for each test."""
    name = f"lake-{uuid.uuid4().hex[:12]}"
    emulator_env.create_container(name)
    return name


@pytest.fixture
def az_root(container) -> str:
    """An az:// lake root in the test's container (below a path, as a user's may be)."""
    return f"az://{container}/c360ml/lake"
