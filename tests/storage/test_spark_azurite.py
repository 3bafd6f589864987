"""The Spark engine on an az:// lake in Azurite (#26): `c360ml build all`, `build measures`,
`train`, `refresh` and `retrain` with the Spark engine, as a user on a container runs
them, its tables, scratch folders and CI-D export reached by URI.

Sail is the Spark here, started in the emulator's environment (it reaches the container
through the same variables as c360ml, see tests/storage/test_sail_azurite.py). A
generated landing is copied into the container and built by Spark there and on a local
folder: every gold table is equal, written by Sail, and no scratch is left in the
container. Then, on both lakes with Spark, the measures, one model trained on the
container (the champion of both: one MLflow store) and a refresh scored with it: the
measures, the feature snapshot, the scores and the export equal the local lake's, and the
model has the features, trees and test metrics of the built-in recipe fitted on DuckDB's
training frames of the local lake."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.cli import main
from c360ml.refresh import MANIFEST
from c360ml.storage.lake import Lake
from c360ml.storage.objects import upload_folder
from tests.conftest import user_project
from tests.storage.test_build_azurite import _sorted

CUSTOMERS = 200
SEED = 5
MEASURED_AS_OF = "2025-06-30"
TRAINED_AS_OF = "2025-12-31"
SCRATCH = ("unify_spark_scratch", "features_spark_scratch")


@dataclass
class Project:
    home: Path
    root: str  # the az:// lake's root
    lake: Lake  # ... and the lake
    reference: Lake  # the local folder's
    told: dict[str, str]  # what each command printed, by "<command> <az|local>"
    built: list[tuple[str, ...]]  # the gold tables of `build all`


def _cli(monkeypatch: pytest.MonkeyPatch, root: str | None, *args: str) -> str:
    """`c360ml <args>` in this process on the project's lake, or on `root`; its output."""
    out = io.StringIO()
    with monkeypatch.context() as local, contextlib.redirect_stdout(out):
        if root is not None:
            local.setenv("C360ML_LAKE_ROOT", root)
        code = main(list(args))
    said = " ".join(out.getvalue().split())
    assert code == 0, (args, said)
    assert "Traceback" not in said, said
    return said


@pytest.fixture(scope="module")
def project(azurite, tmp_path_factory) -> Iterator[Project]:
    """A user's project on the emulator with a Sail server started in its environment (the
    session-wide one of tests/spark/conftest.py may predate it) and a client session to it
    made the process's default (the commands' `getOrCreate` would otherwise return an older
    session, to another server): the generated landing built by Spark on both lakes, then
    `build measures` on both, `train` on the container and `refresh` on both. The
    session and server are stopped after the module, the session first (a client left to
    a stopped server retries for minutes, and the next `getOrCreate` would return it)."""
    from pysail.spark import SparkConnectServer
    from pyspark.sql import SparkSession

    home = tmp_path_factory.mktemp("spark_az") / "project"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("AZURE_", "AZURITE_", "C360ML_", "MLFLOW_")):
                mp.delenv(name)
        mp.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        mp.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)
        container = f"lake-{uuid.uuid4().hex[:12]}"
        azurite.create_container(container)
        root = f"az://{container}/c360ml/lake"
        user_project(home)
        mp.chdir(home)
        server = SparkConnectServer(ip="127.0.0.1", port=0)
        server.start(background=True)
        host, port = server.listening_address
        session = SparkSession.builder.remote(f"sc://{host}:{port}").create()
        try:
            mp.setenv("C360ML_SPARK_REMOTE", f"sc://{host}:{port}")
            _cli(mp, None, "generate", "--customers", str(CUSTOMERS), "--seed", str(SEED))
            lake, reference = Lake(root), Lake(home / "data" / "lake")
            upload_folder(reference.path("landing"), lake.store, "landing")
            told = {}
            lakes = (("az", root), ("local", None))
            for name, where in lakes:
                told[f"build {name}"] = _cli(mp, where, "build", "all", "--engine", "spark")
            built = reference.tables("gold")
            measures = ("build", "measures", "--as-of", MEASURED_AS_OF, "--engine", "spark")
            for name, where in lakes:
                told[f"measures {name}"] = _cli(mp, where, *measures)
            train = ("train", "--as-of", TRAINED_AS_OF, "--engine", "spark")
            told["train az"] = _cli(mp, root, *train)
            # the champion of both lakes (at this size it need not beat the RFM baseline)
            _cli(mp, root, "model", "approve", "1", "--force")
            for name, where in lakes:
                told[f"refresh {name}"] = _cli(mp, where, "refresh", "--engine", "spark")
            yield Project(home, root, lake, reference, told, built)
        finally:
            session.stop()
            server.stop()


def test_spark_build_all_on_an_az_lake_equals_a_local_one(project):
    lake, reference = project.lake, project.reference
    assert "gold/orders" in project.told["build az"]
    assert set(lake.tables("gold")) >= set(project.built) >= {("customer_profile",), ("orders",)}
    for table in project.built:  # the later commands add tables, not rows to these
        ours, theirs = lake.read("gold", *table), reference.read("gold", *table)
        assert ours.schema == theirs.schema, table
        assert len(theirs), table
        pd.testing.assert_frame_equal(
            _sorted(ours), _sorted(theirs), check_exact=False, rtol=1e-9, atol=0, obj=str(table)
        )
    for where in (("silver", "salestable"), ("gold", "customer_source_map"), ("gold", "orders")):
        assert lake.delta(*where).history()[-1]["engineInfo"].startswith("sail"), where
    _assert_no_scratch(project)


def test_spark_measures_train_refresh_on_an_az_lake_equal_a_local_one(project, monkeypatch):
    lake, reference, told = project.lake, project.reference, project.told
    for name in ("az", "local"):
        assert "gold/customer_measures" in told[f"measures {name}"]
    assert "c360-retention v1" in told["train az"]
    for name, where in (("az", lake), ("local", reference)):
        refreshed = told[f"refresh {name}"]
        assert f"scores: {where.uri('gold', 'churn_scores')}" in refreshed, refreshed
        assert f"ci-d manifest: {where.uri('export', 'ci-d', MANIFEST)}" in refreshed
    measures = reference.read_pandas("gold", "customer_measures")
    assert {str(t.date()) for t in pd.to_datetime(measures.as_of, utc=True)} >= {MEASURED_AS_OF}
    for table in ("customer_measures", "customer_features", "churn_scores"):
        # Written by Sail on the container: the refresh's Spark work, not a fallback.
        assert lake.delta("gold", table).history(1)[0]["engineInfo"].startswith("sail"), table
        _assert_same_table(lake, reference, table)
    _assert_same_export(lake, reference)
    _assert_trained_as_duckdb_would(project)
    _assert_no_scratch(project)
    # retrain's health read from the container (no trigger: it would train a second time)
    monkeypatch.setenv("C360ML_WATCH__PSI_ALARM", "10")
    monkeypatch.setenv("C360ML_ENGINE", "spark")  # retrain has no --engine: the setting
    out = _cli(monkeypatch, project.root, "retrain", "--if-needed")
    assert "no retrain: no trigger fired (champion 0 days old; score PSI" in out, out


def _assert_same_table(remote: Lake, local: Lake, name: str) -> None:
    """The same schema and rows (features 1e-6 relative, ChurnScore 1e-5: the project's
    engine tolerances; the wall clock's ScoredAt left out)."""
    ours, theirs = remote.read("gold", name), local.read("gold", name)
    assert ours.schema == theirs.schema, name
    drop = [c for c in ("ScoredAt",) if c in theirs.column_names]
    ours, theirs = _sorted(ours.drop(drop)), _sorted(theirs.drop(drop))
    assert len(theirs), name
    pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-5, obj=name)
    numbers = [c for c in theirs.columns if pd.api.types.is_float_dtype(theirs[c])]
    features = [c for c in numbers if c != "ChurnScore"]
    pd.testing.assert_frame_equal(
        ours[features], theirs[features], check_exact=False, rtol=1e-6, obj=name
    )


def _assert_same_export(remote: Lake, local: Lake) -> None:
    """The CI-D export's entities: ChurnScores and the contacts written by Spark into the
    container's snapshot folder, the same rows as the local lake's."""
    ours, theirs = _export(remote), _export(local)
    assert set(ours) == set(theirs) >= {"ChurnScores", "ContactBackstamp", "FeatureGlossary"}
    for entity, frame in theirs.items():
        assert len(frame), entity
        drop = [c for c in ("ScoredAt",) if c in frame.columns]
        mine = ours[entity].drop(columns=drop)
        pd.testing.assert_frame_equal(
            _sorted_frame(mine), _sorted_frame(frame.drop(columns=drop)), rtol=1e-5, obj=entity
        )


def _export(lake: Lake) -> dict[str, pd.DataFrame]:
    """Each entity of the CI-D manifest: the rows of its snapshot's Parquet files."""
    store = lake.store
    manifest = json.loads(store.read_text(lake.key("export", "ci-d", MANIFEST)))
    found = {}
    for entity in manifest["entities"]:
        folder = entity["dataPartitionPatterns"][0]["rootLocation"].rstrip("/")
        keys = [
            k
            for k in lake.list_files("export", "ci-d", *folder.split("/"))
            if k.endswith(".parquet")
        ]
        assert keys, (entity["entityName"], folder)
        parts = []
        for key in keys:
            with store.open_input(key) as file:
                parts.append(pq.read_table(file).to_pandas())
        found[entity["entityName"]] = pd.concat(parts, ignore_index=True)
    return found


def _sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    import pyarrow as pa

    return _sorted(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False))


def _assert_trained_as_duckdb_would(project: Project) -> None:
    """The model trained by Spark on the container is the one DuckDB's training frames of
    the local lake give: the same selected features, rows per split and test metrics (the
    built-in recipe fitted on them here; the matrix itself is compared with DuckDB's in
    tests/spark/test_training.py)."""
    import mlflow

    from c360ml.config import load_settings
    from c360ml.model.pipeline import fit_builtin, prepare_training
    from c360ml.model.registry import load_bundle

    # one process (the workers' start would cost more than this lake's features)
    environ = {"C360ML_REFRESH_WORKERS": "1"}
    settings = load_settings(project.home / "c360ml.yaml", environ=environ)
    duck = prepare_training(settings, pd.Timestamp(TRAINED_AS_OF, tz="UTC"))
    result = fit_builtin(duck)
    uri = settings.tracking_uri
    mlflow.set_tracking_uri(uri)  # load_bundle reads through MLflow's current store
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    version = client.get_model_version_by_alias(settings.model_name, "champion")
    assert str(version.version) == "1"
    bundle = load_bundle(f"models:/{settings.model_name}/1")
    assert list(bundle.feature_names) == list(duck.features.names)
    run = client.get_run(version.run_id)
    assert run.data.params["n_trees"] == str(result.n_trees)
    # Not the oracle's figures: its Monte Carlo draws follow the order the source map's
    # rows are read in, which is not part of a table's contract.
    logged = {
        k: v
        for k, v in run.data.metrics.items()
        if k.startswith("test_") and "oracle" not in k and "headroom" not in k
    }
    assert "test_roc_auc" in logged
    expected = {k: float(result.metrics[k]) for k in logged}
    assert logged == pytest.approx(expected, rel=1e-6), (logged, expected)


def _assert_no_scratch(project: Project) -> None:
    left = [k for k in project.lake.list_files("state") if k.split("/")[1] in SCRATCH]
    assert not left, left
    assert not (project.home / "data" / "lake" / "az:").exists()
