"""Keep MLflow's Spark probe from ending a `python -c` process.

MLflow looks for an active Spark session when it starts a run or loads a model (is this a
Databricks cluster?). Where pyspark's Connect client is installed (the `spark` extra), its
first import takes a process whose `__main__` has neither a file nor a spec (`python -c`,
`python -`) for a doctest run and, finding no Spark installation, exits the process.
Imported once with a `__main__` that names a file, it stays imported, and MLflow's probe
just finds no session. Nothing happens where pyspark is absent or `__main__` is a file.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def import_spark_connect_safely() -> None:
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None or hasattr(main, "__file__"):
        return  # a program or a module: the CLI, the service, pytest
    if "pyspark.sql.connect" in sys.modules or importlib.util.find_spec("pyspark") is None:
        return
    main.__file__ = "<string>"
    try:
        importlib.import_module("pyspark.sql.connect")
    except Exception as exc:  # a client that cannot load is MLflow's "no Spark" as well
        log.debug("pyspark.sql.connect not importable: %s", exc)
    finally:
        del main.__file__
