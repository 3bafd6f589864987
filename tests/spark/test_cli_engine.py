"""`c360ml build gold --engine spark`: gold built by Spark (Sail here) from the command line."""

from __future__ import annotations

import os
import shutil

from c360ml.cli import main
from c360ml.storage.lake import Lake
from tests.conftest import generated_lake, user_project


def test_build_gold_on_spark_from_the_command_line(tmp_path, monkeypatch, sail_remote, capsys):
    generated_lake(tmp_path / "data", customers=300, seed=3)  # built by DuckDB
    lake = Lake(tmp_path / "data" / "lake")
    # The tables DuckDB wrote record the current inputs: Spark would skip them all.
    shutil.rmtree(lake.path("gold", "orders"))
    shutil.rmtree(lake.path("quarantine", "gold", "orders"))
    products = lake.version("gold", "products")
    user_project(tmp_path)  # its c360ml.yaml: every output under tmp_path/data
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("C360ML_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("C360ML_SPARK_REMOTE", sail_remote)
    assert main(["build", "gold", "--engine", "spark"]) == 0
    assert lake.delta("gold", "orders").history(1)[0]["engineInfo"].startswith("sail")
    assert lake.version("gold", "products") == products  # unchanged: not written again
    assert "gold/orders" in capsys.readouterr().out

    monkeypatch.setenv("C360ML_SPARK_REMOTE", "sc://127.0.0.1:1")
    assert main(["build", "gold", "--engine", "spark"]) == 2
    said = capsys.readouterr().out
    assert "error: Spark Connect at 127.0.0.1:1 is not reachable" in said
