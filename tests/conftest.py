"""Shared fixtures: settings pointing at a temporary lake, and landing-folder writers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from c360ml.config import Settings
from c360ml.sources.tables import Column, source_table


def user_project(home: Path) -> dict[str, str]:
    """A project folder as a user has one: its c360ml.yaml (every output under data/, the
    repo's specs, SQL and service); returns the environment `c360ml` runs in there."""
    import yaml

    data = home / "data"
    config = {
        "root": str(Path(__file__).resolve().parents[1]),
        "lake_root": str(data / "lake"),
        "truth_root": str(data / "truth"),
        "reports_dir": str(data / "reports"),
        "mlflow_dir": str(data / "mlflow"),
        "log_dir": str(data / "logs"),
    }
    (home / "c360ml.yaml").write_text(yaml.safe_dump(config))
    return user_env(home)


def user_env(home: Path) -> dict[str, str]:
    """This environment without c360ml's and MLflow's variables, BentoML's store under
    the project's data/."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360ML_", "MLFLOW_"))}
    return env | {"BENTOML_HOME": str(home / "data" / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}


def make_settings(tmp_path: Path) -> Settings:
    """Settings whose every path lives under tmp_path (the repo's specs are still used)."""
    repo = Path(__file__).resolve().parents[1]
    return Settings(
        root=repo,
        lake_root=tmp_path / "lake",
        truth_root=tmp_path / "truth",
        reports_dir=tmp_path / "reports",
        mlflow_dir=tmp_path / "mlflow",
        log_dir=tmp_path / "logs",
    )


def build_all(settings: Settings) -> None:
    """ingest -> silver -> unify -> gold, as `c360ml build all` does."""
    from c360ml.medallion.build import build_gold, build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing

    for step in (ingest_landing, build_silver, build_unify, build_gold):
        step(settings)


def generated_lake(folder: Path, customers: int, seed: int) -> Settings:
    """A generated landing of `customers` persons, built through gold."""
    from c360ml.synth import generate_lake

    settings = make_settings(folder)
    generate_lake(settings, customers=customers, seed=seed)
    build_all(settings)
    return settings


def write_gold(lake, gold) -> None:
    """Write GoldTables frames as the gold Delta tables the feature stage reads."""
    from dataclasses import fields

    from c360ml.features import GoldTables
    from c360ml.features.gold import GOLD_TABLES

    for f in fields(GoldTables):
        lake.write(getattr(gold, f.name), "gold", GOLD_TABLES[f.name][0], mode="overwrite")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def shared_lake(tmp_path_factory) -> Settings:
    """One generated lake (1,500 persons, built through gold) for every test of a run
    that only reads it; `own_outputs` gives a test its own MLflow store, reports and
    logs beside it. A test that writes to the lake generates its own."""
    return generated_lake(tmp_path_factory.mktemp("shared_lake"), customers=1500, seed=7)


def own_outputs(settings: Settings, folder: Path) -> Settings:
    """`settings` with the outputs a test writes (MLflow, reports, logs) under `folder`."""
    return settings.model_copy(
        update={
            "mlflow_dir": folder / "mlflow",
            "reports_dir": folder / "reports",
            "log_dir": folder / "logs",
        }
    )


def write_sync_folder(
    landing: Path,
    source: str,
    stamp: str,
    tables: dict[str, list[dict | str | bytes]],
    attributes: dict[str, list[tuple[str, str]]] | None = None,
) -> Path:
    """Write one Synapse Link sync folder: model.json + headerless CSV per table.

    Rows are dicts over the declared columns (missing keys = empty); a row given as a
    plain string (or bytes, for bytes that are not UTF-8) is written verbatim, to make
    malformed lines. `attributes` gives a table's model.json attributes as (name, CDM
    type) instead of the declared ones, as a later export that adds or retypes one;
    dict rows are written over those names.
    """
    folder = landing / source / stamp
    entities = []
    for name, rows in tables.items():
        table = source_table(source, name)
        columns = [Column(*a) for a in (attributes or {}).get(name, [])] or list(table.columns)
        (folder / name).mkdir(parents=True, exist_ok=True)
        with open(folder / name / "2024.csv", "wb") as fh:
            for row in rows:
                if isinstance(row, bytes | str):
                    fh.write((row if isinstance(row, bytes) else row.encode()) + b"\n")
                else:
                    line = io.StringIO()
                    csv.writer(line).writerow(
                        ["" if row.get(c.name) is None else row.get(c.name) for c in columns]
                    )
                    fh.write(line.getvalue().encode())
        entity = {
            "$type": "LocalEntity",
            "name": name,
            "attributes": [{"name": c.name, "dataType": c.cdm_type} for c in columns],
            "partitions": [{"name": "2024", "location": f"{name}/2024.csv"}],
        }
        entities.append(entity)
    (folder / "model.json").write_text(json.dumps({"name": source, "entities": entities}))
    return folder


# ---------------------------------------------------------------- two workers (pytest-xdist)
# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: a module runs whole
# on one worker (its module fixtures are built once), the modules that open Spark sessions
# run together on one (`_spark_module`), and the long units are handed out first.

# Units of a minute or more on a quiet 2-core machine, longest first, so that neither
# worker is left alone with one at the end; the others follow in collection order. A
# stale list only schedules worse.
LONG_FIRST = (
    "spark",
    "tests/storage/test_jobs_azurite.py",
    "tests/model/test_pipeline.py",
    "tests/test_cli.py",
    "tests/test_lifecycle.py",
    "tests/storage/test_crash_azurite.py",
    "tests/storage/test_build_azurite.py",
    "tests/test_erasure.py",
    "tests/test_crash.py",
    "tests/test_refresh.py",
    "tests/service/test_service.py",
)
_SPARK_SOURCE = ("SparkConnectServer", "SparkSession")
_spark_modules: dict[str, bool] = {}


def _spark_module(root: Path, module: str) -> bool:
    """A module under tests/spark/, or one that starts Sail or opens a Spark session itself.
    Spark Connect's `getOrCreate` returns the process's default session, and some modules
    stop the session they got: these run in one process, in collection order, as without
    workers."""
    if module not in _spark_modules:
        path = root / module
        _spark_modules[module] = module.startswith("tests/spark/") or (
            path.suffix == ".py" and any(w in path.read_text() for w in _SPARK_SOURCE)
        )
    return _spark_modules[module]


def _unit(root: Path, nodeid: str) -> str:
    """The work unit of a test: its module, or "spark"."""
    module = nodeid.split("::", 1)[0]
    return "spark" if _spark_module(root, module) else module


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the Spark modules as one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(config.rootpath, nodeid)

    return Units(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Tell the workers (their own `dist` option reads "no") that `Units` schedules."""
    node.workerinput["c360ml_units"] = node.config.getvalue("dist") == "loadfile"


def pytest_collection_modifyitems(config, items):
    """On a worker of `--dist loadfile`: the tests of LONG_FIRST's units first (the order
    of the collection is the order units are handed out in, with --no-loadscope-reorder);
    within a unit, and without workers, the order is pytest's."""
    if not getattr(config, "workerinput", {}).get("c360ml_units"):
        return
    last = len(LONG_FIRST)

    def rank(item) -> int:
        unit = _unit(config.rootpath, item.nodeid)
        return LONG_FIRST.index(unit) if unit in LONG_FIRST else last

    items.sort(key=rank)


_exit_status = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """Leave with pytest's own status once it has reported everything.

    Native thread pools (Arrow, DuckDB, delta-rs' runtime) have been seen, rarely and under
    load, to abort during interpreter teardown ("terminate called without an active
    exception") after every test had passed; skipping teardown keeps the exit status true.
    """
    import os
    import sys

    if _exit_status["code"] is not None and os.environ.get("C360ML_TEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])


PATCHED_GOLD = {  # the tables gold patches, and the columns that order their rows
    ("gold", "orders"): ["order_id"],
    ("quarantine", "gold", "orders"): ["order_id"],
    ("gold", "order_lines"): ["order_id", "line"],
    ("quarantine", "gold", "order_lines"): ["order_id", "line"],
    ("gold", "order_status_history"): ["entity_id", "valid_from"],
    ("gold", "support_cases"): ["case_id"],
    ("gold", "case_status_history"): ["entity_id", "valid_from"],
}


def assert_gold_equals_a_rebuild(settings: Settings, folder: Path) -> None:
    """The patched order tables of `settings`' lake equal a gold build from scratch of a
    copy (in `folder`) without them and without gold's state."""
    import shutil

    import pandas as pd

    from c360ml.medallion.build import build_gold
    from c360ml.storage.lake import Lake

    fresh = settings.model_copy(update={"lake_root": folder / "rebuilt"})
    shutil.copytree(settings.lake, fresh.lake)
    for where in [*PATCHED_GOLD, ("state", "gold")]:
        shutil.rmtree(fresh.lake.joinpath(*where))
    rebuilt = {t["table"]: t["written"] for t in build_gold(fresh).rows()}
    assert rebuilt["gold/orders"] == rebuilt["gold/order_status_history"] == "rebuilt"
    for where, key in PATCHED_GOLD.items():
        a, b = (Lake(s.lake).read_pandas(*where) for s in (settings, fresh))
        a, b = (f.sort_values(key).reset_index(drop=True) for f in (a, b))
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
