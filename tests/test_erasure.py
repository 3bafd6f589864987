"""Erasure that survives kills and leaves nothing behind (#24's acceptance).

A small lake is scored once (its score history, journey export, logs, MLflow and
BentoML stores all name the persons); an increment erases some of them; the refresh
that erases them is SIGKILLed twice, in the purge of the rows and while the table
histories are cut, and run again to the end. Then every byte c360ml wrote (lake data
and Delta logs, state, quarantine, exports, reports, logs, the MLflow and BentoML
stores) is searched for the erased persons' unique identifiers. Not searched: the
landing folder (the source's own export, which Synapse Link owns) and the generator's
truth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from c360ml.config import load_settings
from c360ml.medallion.unify import read_redirects
from c360ml.storage.lake import Lake
from tests.conftest import user_env, user_project

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("erasure")
    user_project(home)
    return home


def _cli(home: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "c360ml.cli", *args],
        cwd=home,
        env=user_env(home),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _refresh_killed_when(home: Path, ready, what: str) -> None:
    """Start `c360ml refresh`, SIGKILL its process group once `ready()` holds."""
    output = home / "killed_refresh.out"
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "c360ml.cli", "refresh"],
            cwd=home,
            env=user_env(home),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait()
    assert code == -signal.SIGKILL, f"no kill at {what}: exit {code}\n{output.read_text()[-2000:]}"


def _commit_after(log_dir: Path, moment: float) -> bool:
    return any(p.stat().st_mtime >= moment for p in log_dir.glob("*.json"))


def _job(lake: Lake) -> dict | None:
    try:
        return json.loads(lake.path("state", "erasure", "job.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _identifiers(lake: Lake, settings) -> tuple[set[str], set[str]]:
    """The unique identifiers of the persons the increment erases (customer ids, source
    keys, contact ids, e-mails, phones as stored), read before the refresh that erases
    them, less any value another person also has; and the customer ids of the rest."""
    erased = set(pd.read_parquet(settings.truth / "erased.parquet").person_id)
    keys = pd.read_parquet(settings.truth / "person_keys.parquet")
    keys = keys[keys.source.isin(["d365", "dataverse"])]
    source_map = lake.read_pandas("gold", "customer_source_map").merge(
        keys, on=["source", "source_key"]
    )
    per_person = source_map.groupby("customer_id").person_id.agg(set)
    values: dict[str, set] = {}  # identifier -> persons

    def note(value, person) -> None:
        if isinstance(value, str) and value:
            values.setdefault(value, set()).add(person)

    for row in keys.itertuples():
        note(row.source_key, row.person_id)
    for customer, persons in per_person.items():
        for person in persons:
            note(customer, person)
    contacts = lake.read_pandas("silver", "contact").merge(
        keys.rename(columns={"source_key": "contactid"}), on="contactid"
    )
    for column in ("emailaddress1", "telephone1", "mobilephone"):
        for value, person in zip(contacts[column], contacts.person_id, strict=True):
            note(value, person)
    raw = lake.read_pandas("bronze", "dataverse", "contact")
    raw = raw.merge(keys.rename(columns={"source_key": "contactid"}), on="contactid")
    for column in ("emailaddress1", "telephone1", "mobilephone"):
        for value, person in zip(raw[column], raw.person_id, strict=True):
            note(value, person)
    unique = {v for v, persons in values.items() if persons <= erased}
    kept_ids = {c for c, persons in per_person.items() if not persons & erased}
    return unique, kept_ids


def _found(root: Path, needles: set[str], skip: tuple[Path, ...]) -> dict[str, list[str]]:
    """Every file below `root` that contains a needle: Parquet files read (their pages
    are compressed) down to every value, nested ones (checkpoints) included; any other
    file as bytes (JSON logs, CSV, HTML, SQLite, model files, text logs)."""
    hits: dict[str, list[str]] = {}
    encoded = {n: n.encode() for n in needles}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(path.is_relative_to(s) for s in skip):
            continue
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), default=str)
            found = [n for n in needles if n in text]
        else:
            data = path.read_bytes()
            found = [n for n, b in encoded.items() if b in data]
        if found:
            hits[str(path.relative_to(root))] = sorted(found)[:3]
    return hits


def test_erasure_killed_twice_leaves_no_identifier_anywhere(home):
    _cli(home, "generate", "--customers", "600", "--seed", "5", "--fresh")
    _cli(home, "build", "all")
    settings = load_settings(home / "c360ml.yaml", environ={})  # as the CLI sees it
    # A small champion, trained in a process of its own as `c360ml train` would (MLflow's
    # tracking and registry URIs are process-wide: this one's may point at another store).
    train = (
        "import pandas as pd; from c360ml.config import load_settings; "
        "from c360ml.model.pipeline import run_training; from c360ml.model.train import "
        "TrainConfig; config = TrainConfig(nthread=2, max_trees=30, early_stopping_rounds=10, "
        "bootstrap_resamples=20); assert run_training(load_settings(), "
        "pd.Timestamp('2025-12-31', tz='UTC'), config=config).promoted"
    )
    subprocess.run(
        [sys.executable, "-c", train], cwd=home, env=user_env(home), check=True, timeout=600
    )
    _cli(home, "refresh")
    lake = Lake(settings.lake)
    # The segment workflow's journey export and BentoML's copy of the champion, as a
    # deployment has them.
    source_map = lake.read_pandas("gold", "customer_source_map")
    contacts = source_map[source_map.source == "dataverse"]
    journeys = lake.path("export", "journeys")
    journeys.mkdir(parents=True)
    contacts.rename(columns={"customer_id": "CustomerId", "source_key": "ContactId"})[
        ["CustomerId", "ContactId"]
    ].to_csv(journeys / "high_risk.csv", index=False)
    subprocess.run(
        [sys.executable, "-c", "from c360ml.config import load_settings; "
         "from c360ml.model.packaging import import_champion; import_champion(load_settings())"],
        cwd=home, env=user_env(home), check=True, capture_output=True, timeout=300,
    )  # fmt: skip

    _cli(home, "generate", "--increment")
    needles, kept_ids = _identifiers(lake, settings)
    assert any(n.startswith("C") and len(n) == 17 for n in needles), "nobody we scored erased"
    data = home / "data"
    skip = (lake.path("landing"), settings.truth)
    assert _found(data, needles, skip), "the identifiers are not where the scan looks"

    # Killed in the purge of the rows (the first commit after the job was recorded) ...
    scores_log = lake.path("gold", "churn_scores", "_delta_log")
    job_file = lake.path("state", "erasure", "job.json")
    _refresh_killed_when(
        home,
        lambda: job_file.exists() and _commit_after(scores_log, job_file.stat().st_mtime),
        "the erasure's first delete",
    )
    assert _job(lake) is not None and "rows" not in _job(lake)["done"]
    # ... then, rerun, while the table histories are cut (its last step) ...
    _refresh_killed_when(
        home, lambda: "files" in ((_job(lake) or {}).get("done") or []), "the history step"
    )
    assert _job(lake) is not None, "killed too late: the erasure had finished"
    # ... then run to the end: the job finishes, and nobody is left anywhere.
    out = _cli(home, "refresh")
    assert not job_file.exists(), out
    assert _found(data, needles, skip) == {}
    # Only the erased went: every other customer is still scored.
    scores = lake.read_pandas("gold", "churn_scores")
    assert kept_ids <= set(scores.CustomerId) | set(read_redirects(lake).retired_id)


def test_a_pseudonymised_marker_still_erases_a_record_that_comes_back(tmp_path):
    """After an erasure bronze keeps the delete marker under `erased:<sha256 of the key>`.
    A marker alone names nobody and erases nothing again; an older change of the same
    record arriving late is found by the same hash, and erased again under its own key."""
    import hashlib

    import pyarrow as pa

    from c360ml.medallion.erasure import erased_records

    lake = Lake(tmp_path)
    ts = pd.Timestamp("2026-01-01", tz="UTC")

    def rows(keys, versions, deletes):
        return pa.table(
            {
                "contactid": keys,
                "versionnumber": pa.array(versions, pa.int64()),
                "SinkModifiedOn": pa.array([ts] * len(keys), pa.timestamp("us", tz="UTC")),
                "IsDelete": deletes,
            }
        )

    pseudonym = "erased:" + hashlib.sha256(b"c1").hexdigest()
    lake.write(
        rows([pseudonym, "c2", "c2"], [5, 1, 2], [True, False, True]),
        "bronze",
        "dataverse",
        "contact",
    )
    previous = pd.DataFrame({"source": ["dataverse"] * 2, "source_key": ["c1", "c2"]})
    assert erased_records(lake, previous).source_key.tolist() == ["c2"]
    lake.write(rows(["c1"], [3], [False]), "bronze", "dataverse", "contact")  # came back
    assert sorted(erased_records(lake, previous).source_key) == ["c1", "c2"]


def test_a_customer_is_erased_only_when_all_its_records_are_and_it_was_not_merged():
    from c360ml.medallion.erasure import erased_customers

    previous = pd.DataFrame(
        {
            "source": ["d365", "dataverse", "d365", "dataverse", "dataverse", "dataverse", "d365"],
            "source_key": ["a1", "c1", "a2", "c2", "c3", "c4", "a5"],
            "customer_id": ["A", "A", "B", "B", "C", "D", "E"],
        }
    )
    erased = pd.DataFrame(
        {"source": ["d365", "dataverse", "dataverse", "dataverse", "dataverse"],
         "source_key": ["a1", "c1", "c2", "c3", "c4"]}
    )  # fmt: skip
    current = pd.DataFrame({"customer_id": ["B", "C", "E"]})  # C's id lives on elsewhere
    redirects = pd.DataFrame({"retired_id": ["D"]})  # D was merged into another customer
    # A: every record erased; B: one of two; C: still mapped; D: redirected; E: untouched
    assert erased_customers(previous, current, redirects, erased) == ["A"]
    # a d365 key equal to an erased dataverse key is another record
    erased_a5 = pd.DataFrame({"source": ["dataverse"], "source_key": ["a5"]})
    assert erased_customers(previous, current.iloc[:0], redirects, erased_a5) == []


def test_a_file_a_killed_write_left_is_removed_not_read(tmp_path):
    """A kill can leave a 0-byte or truncated Parquet file that no version refers to; the
    erasure's file step removes it instead of failing to read it (the crash benchmark
    found a rerun stopping on "Parquet file size is 0 bytes")."""
    import pyarrow as pa

    from c360ml.medallion.erasure import Delete, ErasureJob, run

    lake = Lake(tmp_path)
    lake.write(pa.table({"customer_id": ["C1", "C2"]}), "gold", "customer_measures")
    orphans = [lake.path("gold", "customer_measures", f"part-{i}.parquet") for i in (0, 1)]
    orphans[0].write_bytes(b"")
    orphans[1].write_bytes(b"PAR1 cut short")
    job = ErasureJob(["C1"], [], [], [Delete(["gold", "customer_measures"], "customer_id", ["C1"])])
    result = run(lake, job)
    assert not any(p.exists() for p in orphans) and result.files_removed >= 2
    assert lake.read_pandas("gold", "customer_measures").customer_id.tolist() == ["C2"]
