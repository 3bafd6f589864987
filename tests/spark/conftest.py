"""Spark for the tests: Sail, a Spark Connect server written in Rust (pip-installable, no
JVM), started on 127.0.0.1 on a free port for the session and stopped at its end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def sail_remote() -> Iterator[str]:
    """The Spark Connect URL of a Sail server this test session started."""
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)  # port 0: the system picks a free one
    server.start(background=True)
    host, port = server.listening_address
    try:
        yield f"sc://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark(sail_remote: str):
    """A Spark Connect session to that server, as c360ml opens one; stopped before the
    server (a client left open retries its release call for minutes)."""
    from c360ml.spark import spark_session

    session = spark_session(sail_remote)
    try:
        yield session
    finally:
        session.stop()
