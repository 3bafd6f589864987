"""The SparkSession a Spark build runs on: a Spark Connect URL when one is given, else
the active session of the Spark job or notebook c360ml runs in.

A session is a client's: this module never starts a cluster (tests start Sail, see
tests/spark/conftest.py) and never stops one it did not make.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

CONNECT_PORT = 15002  # Spark Connect's default port, when the URL names none
PROBE_SECONDS = 5.0
# A Spark build's timestamps are instants; its SQL is written for a session in UTC (as
# every DuckDB connection of c360ml is).
SESSION_CONF = {"spark.sql.session.timeZone": "UTC"}


class SparkUnavailableError(RuntimeError):
    """No Spark to run on: the message is the one line a user is shown."""


def _client() -> type[SparkSession]:
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise SparkUnavailableError(
            "the Spark engine needs pyspark: pip install 'c360ml[spark]' "
            "(or run inside a Spark job, which provides it)"
        ) from exc
    return SparkSession


def _probe(remote: str) -> None:
    """One TCP connection to the server first: Spark Connect's client retries an
    unreachable server for about ten minutes before it gives up."""
    url = urlparse(remote)
    if url.scheme != "sc" or not url.hostname:
        raise SparkUnavailableError(
            f"spark_remote {remote!r} is not a Spark Connect URL (sc://host:port)"
        )
    port = url.port or CONNECT_PORT
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        raise SparkUnavailableError(
            f"Spark Connect at {url.hostname}:{port} is not reachable ({exc.strerror or exc})"
        ) from exc


def spark_session(remote: str | None = None) -> SparkSession:
    """The session to run Spark work on.

    With `remote` (`sc://host:port[/;param=value...]`), a Spark Connect session to that
    server; without, the active SparkSession of the process (a Spark job or notebook:
    Synapse Spark has no Spark Connect endpoint). SparkUnavailableError, in one line, when
    neither is there. The session's time zone is set to UTC (`SESSION_CONF`)."""
    spark_cls = _client()
    if remote:
        _probe(remote)
        spark = spark_cls.builder.remote(remote).getOrCreate()
    else:
        spark = _active(spark_cls)
        if spark is None:
            raise SparkUnavailableError(
                "no Spark session: set spark_remote (sc://host:port) or run inside a Spark "
                "job or notebook"
            )
    for key, value in SESSION_CONF.items():
        spark.conf.set(key, value)
    return spark


def _active(spark_cls: type[SparkSession]) -> SparkSession | None:
    """The process's active session: a classic one (not in a Connect-only install, where
    asking for it would look for a JVM), else a Spark Connect one."""
    try:
        from pyspark.util import is_remote_only
    except ImportError:  # pyspark < 4 (Synapse's 3.4, Fabric's 3.5): no Connect-only install
        remote_only = False
    else:
        remote_only = is_remote_only()
    if not remote_only:
        active = spark_cls.getActiveSession()
        if active is not None:
            return active
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    return ConnectSession.getActiveSession()
