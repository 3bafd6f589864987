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


def _on_emulator(monkeypatch: pytest.MonkeyPatch, azurite: Azurite) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)


@pytest.fixture
def emulator_env(azurite, monkeypatch) -> Azurite:
    """The environment of a user on Azurite: no other Azure credential set."""
    _on_emulator(monkeypatch, azurite)
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


@pytest.fixture(scope="module")
def module_az_root(azurite) -> Iterator[str]:
    """An az:// lake root in a container the tests of one module share: a project its
    tests continue in order (its fixtures run in the environment of `emulator_env`)."""
    name = f"lake-{uuid.uuid4().hex[:12]}"
    azurite.create_container(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _on_emulator(monkeypatch, azurite)
        yield f"az://{name}/c360ml/lake"
