"""A small simulated year end to end (#29): monthly increments carrying a competitor shock,
each month `refresh` then `retrain --if-needed`, a webhook receiving what happened.

2,000 customers and four months keep it near a minute. What it can catch: a shock that does
not reach the scores, outcomes judged before their window closed or twice, a retrain that
fires before anything matured or not once realized performance is in, drift alarms that
do not reach the refresh summary, the report or the webhook, a payload with a customer id.
The realized-AUC trigger is set so any realized figure fires it (realized_auc_drop -1):
the test is about when it can fire, not about the size of the drop (the lifecycle
benchmark measures that on the demo lake). Nor does it assert that the drift alarm fires
after the shock: at this size neither shock kind brings a PSI near the alarm (a recession
from month 2 left the score PSI at 0.017-0.034; benchmarks/results/lifecycle.md).
"""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest

from c360ml.config import WatchSettings
from c360ml.model import watch
from c360ml.model.pipeline import retrain_if_needed, run_training
from c360ml.refresh import SCORED, run_refresh
from c360ml.report import build_report
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment, generate_lake
from c360ml.synth.generate import read_meta
from tests.conftest import build_all, make_settings
from tests.test_webhook import Receiver

pytestmark = pytest.mark.slow
FIRST = pd.Timestamp("2026-01-01", tz="UTC")  # the day after the history ends
SHOCK = "2026-02-01:competitor"  # month 2
WEEK = 7 * 86_400


def _month(settings, m: int, shock: str | None = None) -> None:
    """Weekly increments up to the end of month m; the shock rides with its week."""
    end = int((FIRST + pd.DateOffset(months=m)).timestamp())
    at = int(pd.Timestamp(shock.split(":")[0], tz="UTC").timestamp()) if shock else None
    while (cut := read_meta(settings.truth)["cuts"][-1]) + WEEK <= end:
        carry = shock if shock and cut <= at < cut + WEEK else None
        generate_increment(settings, shock=carry)


def _mean_score(settings, as_of) -> float:
    scores = Lake(settings.lake).read_pandas("gold", "churn_scores")
    mine = scores[(scores.ScoredAsOf == as_of) & (scores.ScoreStatus == SCORED)]
    return float(mine.ChurnScore.mean())


@pytest.fixture(scope="module")
def year(tmp_path_factory):
    receiver = Receiver()
    root = tmp_path_factory.mktemp("year")
    watch_settings = WatchSettings(
        max_model_age_days=400, realized_auc_drop=-1.0, webhook_url=receiver.url + "/c360"
    )
    settings = make_settings(root / "shock").model_copy(update={"watch": watch_settings})
    generate_lake(settings, customers=2000, seed=42, future_days=200)
    build_all(settings)
    first = run_training(settings, pd.Timestamp("2025-12-31", tz="UTC"))
    assert first.promoted, first.gate_reason
    months = []
    for m in range(1, 5):
        _month(settings, m, SHOCK)
        summary = run_refresh(settings)
        if m == 1:  # the same lake without the shock, from here on
            control = settings.model_copy(
                update={
                    "lake_root": root / "control" / "lake",
                    "truth_root": root / "control" / "truth",
                }
            )
            shutil.copytree(root / "shock" / "lake", control.lake)
            shutil.copytree(root / "shock" / "truth", control.truth)
        months.append((summary, retrain_if_needed(settings)))
    yield settings, control, months, receiver
    receiver.close()


def test_the_shock_reaches_the_scores(year):
    """Same model, same history up to the shock: the shocked lake's customers look riskier
    after it than the same lake's without it, and more so as the dropped stay silent."""
    settings, control, months, _ = year
    gaps = []
    for m in (2, 3):
        _month(control, m)
        summary = run_refresh(control)
        shocked = months[m - 1][0]
        assert summary.as_of == shocked.as_of
        gaps.append(_mean_score(settings, shocked.as_of) - _mean_score(control, summary.as_of))
    assert 0 < gaps[0] < gaps[1], gaps
    assert read_meta(settings.truth)["shocks"][0]["dropouts_brought_forward"] > 0
    assert "shocks" not in read_meta(control.truth)


def test_outcomes_once_each_window_has_closed(year):
    settings, _, months, _ = year
    outcomes = Lake(settings.lake).read_pandas("gold", watch.OUTCOMES)
    everyone = outcomes[outcomes.population == "all"]
    assert not everyone.duplicated(watch.KEY).any()
    end = months[-1][0].as_of
    judged = set(everyone.ScoredAsOf)
    for summary, _ in months:
        closed = summary.as_of + pd.Timedelta(days=90) <= end
        assert (summary.as_of in judged) == closed, summary.as_of
    assert months[0][0].as_of in judged  # month 1's window closed in month 4
    assert everyone.roc_auc.between(0.6, 1).all()


def test_retrain_waits_for_a_trigger_then_the_gate_is_announced(year):
    settings, _, months, receiver = year
    fired = [outcome.fired for _, outcome in months]
    assert fired[:3] == [[], [], []]  # nothing matured, nothing drifted past 0.25
    assert any("realized ROC AUC" in t for t in fired[3])
    assert "realized churn minus mean score" in months[3][1].health  # calibration looked at
    decision = months[3][1].summary
    assert "realized" in decision.gate_reason  # the gate saw the churn the refresh measured
    gates = [body for path, _, body in receiver.received if body["event"] == "gate_decision"]
    assert [g["command"] for g in gates] == ["train", "retrain --if-needed"]
    assert gates[1]["triggers"] == fired[3]
    assert gates[1]["ModelVersion"] == decision.model_version
    assert gates[1]["promoted"] == decision.promoted
    assert gates[1]["gate_reason"] == decision.gate_reason


def test_drift_alarms_reach_the_summary_the_report_and_the_webhook(year):
    """A refresh whose alarm is set at 0 flags every column: named in the summary, in the
    report's drift table and POSTed, with model ids, dates and figures only."""
    settings, _, months, receiver = year
    touchy = settings.model_copy(
        update={"watch": settings.watch.model_copy(update={"psi_alarm": 0.0})}
    )
    before = len(receiver.received)
    summary = run_refresh(touchy, as_of=months[-1][0].as_of)
    step = next(s for s in summary.items if s.step == "drift")
    assert step.note.startswith("ALARM (PSI >= 0.0): ") and step.rows == len(step.detail["alarms"])
    [(_, _, event)] = receiver.received[before:]
    assert event["event"] == "drift_alarm" and event["alarms"] == step.detail["alarms"]
    assert event["ScoredAsOf"] == summary.as_of.isoformat()
    profiles = Lake(settings.lake).read_pandas("gold", "customer_profile").customer_id
    text = repr(receiver.received)
    assert not any(cid in text for cid in profiles.astype(str)), "a customer id in a payload"
    html = build_report(touchy).read_text()
    assert 'id="drift-alarms">' + str(len(step.detail["alarms"])) in html
    table = re.search(r"<h3>Drift at the latest refresh[^<]*</h3>(.*?)</table>", html, re.S)
    assert table and step.detail["alarms"][0]["label"] in table.group(1)
