"""The refresh loop on a small generated lake: batch scores, idempotence, history, the
CI-D hand-back read through its manifest, the service's answers, erasure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest

from c360ml.medallion.build import build_silver
from c360ml.medallion.silver import bronze_current_rows
from c360ml.model import scoring
from c360ml.model.train import TrainConfig
from c360ml.refresh import SCORED, load_champion, run_refresh
from c360ml.sources.tables import SOURCE_TABLES
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment
from tests.conftest import build_all, write_sync_folder

pytestmark = pytest.mark.slow
AS_OF = pd.Timestamp("2025-12-31", tz="UTC")


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from c360ml.model.pipeline import run_training
    from tests.conftest import generated_lake

    settings = generated_lake(tmp_path_factory.mktemp("refresh"), customers=700, seed=11)
    config = TrainConfig(nthread=2, max_trees=40, early_stopping_rounds=10, bootstrap_resamples=30)
    trained = run_training(settings, AS_OF, config=config)
    assert trained.promoted, trained.gate_reason
    first = run_refresh(settings)
    return settings, first


def test_every_profile_gets_a_row(lake):
    settings, first = lake
    lk = Lake(settings.lake)
    scores = lk.read_pandas("gold", "churn_scores")
    profiles = lk.read_pandas("gold", "customer_profile")
    assert set(scores.CustomerId) == set(profiles.customer_id) and scores.CustomerId.is_unique
    scored = scores[scores.ScoreStatus == SCORED]
    assert len(scored) > 0 and scored.ChurnScore.notna().all()
    assert scores.loc[scores.ScoreStatus != SCORED, "ChurnScore"].isna().all()
    assert set(scores.ScoreStatus) <= {"scored", "inactive", "insufficient_history"}
    assert (
        scored.RiskLevel
        == np.select(
            [scored.ChurnScore >= 0.66, scored.ChurnScore >= 0.33], ["High", "Medium"], "Low"
        )
    ).all()
    assert first.as_of == lk.read_pandas("gold", "orders").order_ts.max()


def test_scores_equal_in_process_scoring_of_the_snapshot(lake):
    settings, first = lake
    lk = Lake(settings.lake)
    snapshot = lk.read_pandas("gold", "customer_features")
    snapshot = snapshot[snapshot.as_of == first.as_of].drop(columns="as_of")
    bundle, _ = load_champion(settings)
    want = scoring.score(bundle, snapshot.rename(columns={"customer_id": "CustomerId"}), "approx")
    scores = lk.read_pandas("gold", "churn_scores").set_index("CustomerId")
    np.testing.assert_allclose(scores.loc[want.CustomerId, "ChurnScore"], want.ChurnScore)


def test_each_refresh_measures_drift_against_the_models_test_rows(lake):
    from c360ml.model import drift

    """Before the erasure tests, which purge erased customers from the score history."""
    settings, first = lake
    step = next(s for s in first.items if s.step == "drift")
    assert "score PSI" in step.note and "outside the tested range" in step.note
    lk = Lake(settings.lake)
    table = lk.read_pandas("gold", "score_drift")
    bundle, version = load_champion(settings)
    assert set(table.column) == {*bundle.feature_names, drift.SCORE}
    assert (table.ModelVersion == version).all() and (table.psi >= 0).all()
    expected = [
        drift.alarming(c, v, settings.watch.psi_alarm)
        for c, v in zip(table.column, table.psi, strict=True)
    ]
    assert (table.alarm == expected).all()  # calendar-scaled columns never alarm
    assert step.rows == int(table.alarm.sum())
    # The score's PSI as the stored reference and this as_of's scores give it.
    scores = lk.read_pandas("gold", "churn_scores")
    scored = scores[(scores.ScoredAsOf == first.as_of) & (scores.ScoreStatus == SCORED)]
    ref = bundle.metadata["drift_reference"][drift.SCORE]
    score_row = table[table.column == drift.SCORE].iloc[0]
    assert score_row.psi == pytest.approx(drift.psi(ref, scored.ChurnScore.to_numpy()))


def test_same_as_of_and_inputs_twice_writes_nothing(lake):
    settings, first = lake
    lk = Lake(settings.lake)
    versions = {
        t: lk.version("gold", t) for t in ("churn_scores", "customer_features", "customer_measures")
    }
    rows = lk.dataset("gold", "churn_scores").count_rows()
    again = run_refresh(settings, first.as_of)
    assert {t: lk.version("gold", t) for t in versions} == versions
    assert lk.dataset("gold", "churn_scores").count_rows() == rows
    assert again.status_counts == first.status_counts


def test_chunks_change_no_measure_or_feature(lake):
    """A refresh featurises a chunk of profiles at a time (the as-of SQL over the lake for
    those customers), chunks in worker processes; small chunks on two processes must give
    the values one chunk gives: counts exactly, others to float32's precision (a chunk
    stores its customers' rows by time, one chunk reads the lake's files in their order,
    so a sum may differ in its last bit)."""
    from c360ml.features import FeatureSet
    from c360ml.refresh import snapshot_profiles

    settings, first = lake
    bundle, _ = load_champion(settings)
    fs = FeatureSet.from_json(bundle.feature_set_json)

    def snap(size):
        out = snapshot_profiles(
            settings.model_copy(update={"refresh_chunk_customers": size, "refresh_workers": 2}),
            first.as_of,
            True,
            fs,
        )
        order = {n: f.sort_values("customer_id", ignore_index=True)
                 for n, f in (("measures", out.measures), ("features", out.features))}  # fmt: skip
        return out, order

    whole, whole_frames = snap(10**6)
    chunked, chunked_frames = snap(97)
    assert len(chunked.profiles) == len(whole.profiles) > 5 * 97  # several chunks really ran
    assert "2 process(es)" in chunked.note and "1 process(es)" in whole.note
    assert set(chunked.buyers) == set(whole.buyers)
    for name, frame in whole_frames.items():
        pd.testing.assert_frame_equal(chunked_frames[name], frame, obj=name, rtol=1e-6)
        counts = [c for c in frame.columns if c.startswith(("COUNT(", "orders_"))]
        pd.testing.assert_frame_equal(chunked_frames[name][counts], frame[counts], check_exact=True)


def test_cid_snapshot_read_through_its_manifest(lake):
    settings, _ = lake
    root = Lake(settings.lake).path("export", "ci-d")
    manifest = json.loads((root / "c360ml.manifest.cdm.json").read_text())
    entity = next(e for e in manifest["entities"] if e["entityName"] == "ChurnScores")
    definition = json.loads((root / entity["entityPath"].split("/")[0]).read_text())
    attributes = {a["name"]: a["dataFormat"] for a in definition["definitions"][0]["hasAttributes"]}
    assert attributes["CustomerId"] == "String" and attributes["ChurnScore"] == "Double"
    assert attributes["ScoredAsOf"] == "DateTimeOffset"
    pattern = entity["dataPartitionPatterns"][0]
    base = root / pattern["rootLocation"]
    files = [
        p
        for p in base.rglob("*")
        if p.is_file()
        and re.fullmatch(pattern["regularExpression"], p.relative_to(base).as_posix())
    ]
    assert files and all(p.suffix == ".parquet" for p in files)
    snapshot = pd.concat(pd.read_parquet(p) for p in files)
    assert snapshot.CustomerId.is_unique
    profiles = Lake(settings.lake).read_pandas("gold", "customer_profile")
    assert set(snapshot.CustomerId) == set(profiles.customer_id)
    # Only the live snapshot folder exists: no older snapshot a pattern could pick up.
    assert len(list((root / "churn_scores").glob("snapshot=*"))) == 1
    contacts = next(e for e in manifest["entities"] if e["entityName"] == "ContactBackstamp")
    assert contacts["dataPartitionPatterns"][0]["regularExpression"] == ".+\\.parquet$"
    assert (snapshot.ContractVersion == scoring.CONTRACT_VERSION).all()
    assert f"contract {scoring.CONTRACT_VERSION}" in manifest["explanation"]
    # The glossary: every feature of the champion with its readable label, for CI-D users.
    glossary = next(e for e in manifest["entities"] if e["entityName"] == "FeatureGlossary")
    folder = root / glossary["dataPartitionPatterns"][0]["rootLocation"]
    terms = pd.concat(pd.read_parquet(p) for p in folder.glob("*.parquet"))
    bundle, _ = load_champion(settings)
    assert list(terms.Feature) == list(bundle.feature_names)
    assert terms.Label.is_unique and not terms.Label.str.contains(r"\(").any()
    assert set(terms.Unit) <= {"count", "amount", "days", "number"}
    # On the lake's own scores every factor carries its label and a formatted value.
    factors = [f for text in snapshot.InfluentialFactors.dropna() for f in json.loads(text)]
    assert factors and all(
        f["label"] == bundle.feature_labels[f["feature"]]["label"] for f in factors
    )
    assert all(f["direction"] in ("raises risk", "lowers risk") for f in factors)
    assert any(f["display_value"].endswith(" days") for f in factors)


def test_scores_equal_the_services_answers(lake, tmp_path):
    from tests.service.conftest import start_server, stop

    settings, first = lake
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "C360ML_LAKE_ROOT": str(settings.lake),
        "C360ML_MLFLOW_DIR": str(settings.mlflow_dir),
        "C360ML_API_TOKENS": "t0k3n",
        "BENTOML_DO_NOT_TRACK": "True",
    }
    code = (
        "from c360ml.config import load_settings; from c360ml.model.packaging import "
        "import_champion; import_champion(load_settings())"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=settings.root)
    url, proc = start_server("service.service:RetentionService", env, tmp_path / "s.log")
    try:
        lk = Lake(settings.lake)
        snapshot = lk.read_pandas("gold", "customer_features")
        rows = snapshot[snapshot.as_of == first.as_of].drop(columns="as_of").head(200)
        rows = rows.rename(columns={"customer_id": "CustomerId"})
        reply = httpx.post(
            f"{url}/predict",
            json={"rows": json.loads(rows.to_json(orient="records")), "explain": "approx"},
            headers={"Authorization": "Bearer t0k3n"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text[:300]
        served = pd.DataFrame(reply.json()["predictions"]).set_index("CustomerId")
        scores = lk.read_pandas("gold", "churn_scores").set_index("CustomerId")
        np.testing.assert_allclose(
            served.ChurnScore, scores.loc[served.index, "ChurnScore"], rtol=1e-6
        )
        assert (served.RiskLevel == scores.loc[served.index, "RiskLevel"]).all()
        stored = scores.loc[served.index, "InfluentialFactors"].map(json.loads)
        assert [f[0]["feature"] for f in stored] == [
            f[0]["feature"] for f in served.InfluentialFactors
        ]
    finally:
        stop(proc)


def test_increment_scores_new_as_of_keeps_history_and_erases(lake):
    settings, first = lake
    lk = Lake(settings.lake)
    before_map = lk.read_pandas("gold", "customer_source_map")
    # A journey export as the segment step writes it, naming every contact-linked profile.
    contacts = before_map[before_map.source == "dataverse"]
    journeys = lk.path("export", "journeys")
    journeys.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "CustomerId": contacts.customer_id,
            "ContactId": contacts.source_key,
            "Email": [f"c{i}@mail.example" for i in range(len(contacts))],
        }
    ).to_csv(journeys / "high_risk.csv", index=False)
    generate_increment(settings)
    # A rejected line naming a person the increment erases (a sync's malformed contact row
    # with their contact id and e-mail): quarantined, then purged with them.
    erased_persons = pd.read_parquet(settings.truth / "erased.parquet").person_id
    person_keys = pd.read_parquet(settings.truth / "person_keys.parquet")
    contact = person_keys[
        person_keys.person_id.isin(erased_persons) & (person_keys.source == "dataverse")
    ].source_key.iloc[0]
    email = lk.read_pandas("silver", "contact").set_index("contactid").emailaddress1.get(contact)
    write_sync_folder(
        lk.path("landing"),
        "dataverse",
        "2026-03-01T00.00.00Z",
        {"contact": [f'"{contact}",not-a-date,"{email}",extra,fields,,,,'] * 2},
    )
    # A build between two refreshes applies the source's deletes to silver and gold first;
    # the refresh must still find and purge the persons erased since the last refresh.
    build_all(settings)
    planted = lk.read_pandas("quarantine", "bronze", "dataverse", "contact")._raw
    assert planted.str.contains(contact, regex=False).sum() == 2  # the line is in quarantine
    second = run_refresh(settings)
    assert second.as_of > first.as_of
    scores = lk.read_pandas("gold", "churn_scores")
    assert set(scores.ScoredAsOf) == {first.as_of, second.as_of}
    assert not scores.duplicated(["CustomerId", "ScoredAsOf"]).any()
    erased = pd.read_parquet(settings.truth / "erased.parquet")
    keys = pd.read_parquet(settings.truth / "person_keys.parquet")
    gone_keys = keys[keys.person_id.isin(erased.person_id) & (keys.source != "generic")]
    gone_ids = set(before_map.merge(gone_keys, on=["source", "source_key"]).customer_id)
    assert gone_ids, "the increment erased nobody we had"
    gone_ids -= set(lk.read_pandas("gold", "customer_source_map").customer_id)  # merged, not erased
    texts = set(gone_keys.source_key) | gone_ids
    for layer in ("bronze", "silver", "gold"):
        for parts in lk.tables(layer):
            frame = lk.read_pandas(layer, *parts)
            if "IsDelete" in frame:  # delete markers stay: the key only, no personal data
                frame = frame[~frame.IsDelete.fillna(False).astype(bool)]
            found = frame.astype(str).isin(texts).any(axis=None)
            assert not found, f"{layer}/{'/'.join(parts)} still holds an erased person's row"
    # Nor any file on disk: a table rebuilt or merged since keeps its older versions' files
    # (time travel) until vacuumed, and those still hold the person.
    for layer in ("bronze", "silver", "gold", "state", "export"):
        for file in lk.path(layer).rglob("*.parquet"):
            if file.parent.name == "_delta_log":  # checkpoints: tests/test_erasure.py
                continue
            frame = pd.read_parquet(file)
            if "IsDelete" in frame:
                frame = frame[~frame.IsDelete.fillna(False).astype(bool)]
            assert not frame.astype(str).isin(texts).any(axis=None), f"{file} holds an erased row"
    # The rejected lines that named an erased person went with them (the rest stayed).
    rejected = lk.read_pandas("quarantine", "bronze", "dataverse", "contact")
    assert len(rejected) and not rejected._raw.str.contains(contact, regex=False).any()
    for file in lk.path("quarantine", "bronze").rglob("*.parquet"):  # older versions too
        if file.parent.name == "_delta_log":
            continue
        raw = pd.read_parquet(file, columns=["_raw"])._raw
        assert not raw.str.contains(contact, regex=False).any(), f"{file} names the person"
    # The journey export lost the erased persons' rows, and only those.
    journey = pd.read_csv(journeys / "high_risk.csv", dtype=str)
    assert not (set(journey.CustomerId) | set(journey.ContactId)) & texts
    assert (
        len(journey)
        == (~contacts.customer_id.isin(gone_ids) & ~contacts.source_key.isin(texts)).sum()
    )
    accounts = {
        k.split("-", 1)[1] for k in gone_keys.source_key if k.startswith(("usrt-", "ussi-"))
    }
    cust = lk.read_pandas("bronze", "d365", "custtable")
    live = cust[~cust.IsDelete.fillna(False).astype(bool)]
    assert accounts and not set(live.accountnum) & accounts
    snapshot = pd.read_parquet(
        next((lk.path("export", "ci-d", "churn_scores")).glob("snapshot=*/*.parquet"))
    )
    assert not set(snapshot.CustomerId) & gone_ids
    # The purge changed bronze and silver: the next build's accounting still balances
    # (build_silver raises if bronze current-state rows != silver + quarantined rows).
    assert all(t.balanced for t in build_silver(settings).items)
    for (_, name), table in SOURCE_TABLES.items():  # and against bronze itself, recounted
        if lk.exists("silver", name):
            kept = [("silver", name), ("quarantine", "silver", name)]
            have = sum(lk.dataset(*w).count_rows() for w in kept if lk.exists(*w))
            assert bronze_current_rows(lk, table) == have, name


def test_report_opens_in_a_real_browser_and_matches_the_tables(lake):
    from playwright.sync_api import sync_playwright

    from c360ml.report import build_report

    settings, _ = lake
    path = build_report(settings)
    lk = Lake(settings.lake)
    scores = lk.read_pandas("gold", "churn_scores")
    latest = scores[scores.ScoredAsOf == scores.ScoredAsOf.max()]
    scored = latest[latest.ScoreStatus == SCORED]
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(
            "**/*", lambda r: r.abort() if not r.request.url.startswith("file:") else r.continue_()
        )  # self-contained: any network request fails the page
        page.set_viewport_size({"width": 1400, "height": 1000})
        page.goto(path.as_uri())
        page.wait_for_selector(".plotly-graph-div")
        figures = {
            k: page.inner_text(f"#{k}")
            for k in ("profile-count", "scored-count", "risk-Low", "risk-Medium", "risk-High")
        }
        plots = page.locator(".plotly-graph-div").count()
        grade = page.inner_text("#grade-sentence")
        model_top = page.locator("#model-page").bounding_box()["y"]
        bands = page.inner_text("#risk-bands")
        browser.close()
    assert errors == []
    # The model page comes first and opens above the fold, in words a marketer reads.
    assert model_top < 400 and grade.startswith("Grade ") and "simple rule" in grade
    assert "churn rate on the test cutoff" in bands
    # Feature expressions appear only in the appendix (the glossary), labels elsewhere.
    page_text = path.read_text()
    body, _, appendix = page_text.partition('<h2 id="appendix">')
    bundle, _ = load_champion(settings)
    assert appendix and not [n for n in bundle.feature_names if n in body]
    assert any(n in appendix for n in bundle.feature_names)
    assert any(label["label"] in body for label in bundle.feature_labels.values())
    profiles = lk.dataset("gold", "customer_profile").count_rows()
    assert figures["profile-count"] == f"{profiles:,}"
    assert figures["scored-count"] == f"{len(scored):,}"
    for level in ("Low", "Medium", "High"):
        assert figures[f"risk-{level}"] == f"{(scored.RiskLevel == level).sum():,}"
    assert plots >= 6  # the model page's five charts and the profiles' charts


def test_past_scores_get_their_realized_outcome_once_the_window_closed(lake):
    """Scores made at a past as_of whose 90-day window the lake has passed: the refresh
    records how they turned out (ROC AUC against what the customers then did), once.
    Last in the module: it adds a second ScoredAsOf to the score history."""
    from sklearn.metrics import roc_auc_score

    import c360ml.features as ft
    from c360ml.model import watch

    settings, _ = lake
    past = pd.Timestamp("2025-08-31", tz="UTC")
    lk = Lake(settings.lake)
    # A segment's control group at that as_of, as the segment step writes it (every
    # third profile): its outcome is reported on its own beside everyone's.
    profiles = lk.read_pandas("gold", "customer_profile")["customer_id"].iloc[::3]
    held = pd.DataFrame({"segment": "high_risk", "customer_id": profiles.to_numpy()})
    held = held.assign(as_of=past, control=True)
    held["as_of"] = held["as_of"].dt.as_unit("us")
    lk.write(held, "gold", "segment_membership", mode="append")
    summary = run_refresh(settings, as_of=past)
    step = next(s for s in summary.items if s.step == "outcomes")
    assert step.rows == 2 and "2025-08-31" in step.note and "control" in step.note
    outcomes = lk.read_pandas("gold", "score_outcomes").set_index("population")
    control = outcomes.loc["control"]
    row = outcomes.loc["all"]
    assert pd.Timestamp(row.ScoredAsOf) == past
    scores = lk.read_pandas("gold", "churn_scores")
    scored = scores[(scores.ScoredAsOf == past) & (scores.ScoreStatus == SCORED)]
    cfg = ft.load_churn_config(settings.path(settings.feature_spec))
    labels = ft.compute_labels(ft.read_gold(lk), [past], cfg)
    joined = scored.merge(labels, left_on="CustomerId", right_on="customer_id")
    assert row.customers == len(joined) > 0.9 * len(scored)
    assert row.roc_auc == pytest.approx(roc_auc_score(joined.label, joined.ChurnScore))
    assert row.churn_rate == pytest.approx(joined.label.mean())
    in_control = joined[joined.customer_id.isin(set(held.customer_id))]
    assert control.customers == len(in_control) and 0 < control.customers < row.customers
    assert control.roc_auc == pytest.approx(roc_auc_score(in_control.label, in_control.ChurnScore))
    # What the scores promised when made (no labels), beside what they achieved.
    assert row.estimated_roc_auc == pytest.approx(
        watch.estimated_roc_auc(joined.ChurnScore.to_numpy())
    )
    # A second refresh finds nothing new to judge and leaves the row alone.
    again = next(s for s in run_refresh(settings, as_of=past).items if s.step == "outcomes")
    assert again.rows == 0 and len(lk.read_pandas("gold", "score_outcomes")) == 2
