"""A simulated year of operation: does the model notice a regime change and recover?

`make bench STAGE=lifecycle` (or `python benchmarks/bench_lifecycle.py`): four years side
by side, each on the demo lake (20,000 customers, seed 42, history to 2025-12-31, champion
trained as of that day), then 12 months of weekly increments (a month = the weekly syncs
whose cut falls in it), each month `refresh` then `retrain --if-needed`, with
`max_model_age_days` above a year so only drift and realized performance can trigger:
"competitor" (a competitor opens at the start of month 3, `generate --increment --shock`),
"recession" (a recession from the same day), "severe_recession" (`recession*3`: what
size of shock the triggers see) and "control" (no shock: what the calendar alone does). `--runs recession` runs one of them; the combined files are rewritten from
whatever runs' files exist. Per month: the label-free estimate of ROC AUC,
the realized ROC AUC once the 90-day window has closed, the score PSI, the highest PSI of a
top-10 feature, the trigger that fired and the gate's decision. For every as_of scored by a
retrained champion whose window closed, the old (initial) champion and the one that scored
it are both scored on the same customers' stored features and judged on the same labels.

Per month it also counts, from the generator's truth, how many scored customers the shock
exposes and how many of the scored have dropped out since it (the oracle's knowledge, not
the model's). Calendar-scaled features (`drift.calendar_scaled`) are reported apart: their
PSI measures elapsed time and does not trigger.

Writes lifecycle_<run>.json/.md/.png per run and the combined lifecycle.json, lifecycle.md
and lifecycle.png (matplotlib) to benchmarks/results/, and the README's section. Each run's
lake, MLflow store and logs live under benchmarks/cache/lifecycle/<run>/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = HERE / "cache" / "lifecycle"
AS_OF0 = pd.Timestamp("2025-12-31", tz="UTC")  # the demo's trained_as_of and history end
WEEK = 7 * 86_400

log = logging.getLogger("bench_lifecycle")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def lifecycle_settings(base: Path, max_model_age_days: int = 400):
    from c360ml.config import Settings, WatchSettings

    return Settings(
        root=ROOT,
        lake_root=base / "lake",
        truth_root=base / "truth",
        mlflow_dir=base / "mlflow",
        reports_dir=base / "reports",
        log_dir=base / "logs",
        watch=WatchSettings(max_model_age_days=max_model_age_days),
    )


def _build_all(settings) -> None:
    from c360ml.medallion.build import build_gold, build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing

    for step in (ingest_landing, build_silver, build_unify, build_gold):
        step(settings)


def _advance_month(settings, month_end: pd.Timestamp, shock: str | None, applied: bool) -> bool:
    """Weekly increments until the next cut would pass `month_end`; the shock goes with the
    increment whose week holds its date. Returns whether the shock has been applied."""
    from c360ml.synth import generate_increment
    from c360ml.synth.generate import read_meta

    end = int(month_end.timestamp())
    shock_at = int(pd.Timestamp(shock.split(":")[0], tz="UTC").timestamp()) if shock else None
    while True:
        cut = read_meta(settings.truth)["cuts"][-1]
        if cut + WEEK > end:
            return applied
        carry = shock if shock and not applied and cut <= shock_at < cut + WEEK else None
        generate_increment(settings, shock=carry)
        applied = applied or carry is not None


def _month_figures(settings, as_of: pd.Timestamp, top: list[str]) -> dict:
    """The drift and the label-free estimate this refresh recorded for its as_of."""
    from c360ml.model import drift, watch
    from c360ml.refresh import SCORED
    from c360ml.steps import DRIFT
    from c360ml.storage.lake import Lake

    lake = Lake(settings.lake)
    rows = lake.read_pandas("gold", DRIFT)
    rows = rows[rows["ScoredAsOf"] == as_of].set_index("column")
    scores = lake.read_pandas("gold", "churn_scores")
    scores = scores[(scores["ScoredAsOf"] == as_of) & (scores["ScoreStatus"] == SCORED)]
    present = [f for f in top if f in rows.index]
    feature_psi = rows.loc[[f for f in present if not drift.calendar_scaled(f)], "psi"]
    ageing = rows.loc[[f for f in present if drift.calendar_scaled(f)], "psi"]
    return {
        "model_version": str(scores["ModelVersion"].iloc[0]),
        "scored": int(len(scores)),
        "mean_score": round(float(scores["ChurnScore"].mean()), 4),
        "estimated_roc_auc": round(watch.estimated_roc_auc(scores["ChurnScore"].to_numpy()), 4),
        "score_psi": round(float(rows.loc[drift.SCORE, "psi"]), 4),
        "max_top_feature_psi": round(float(feature_psi.max()), 4) if len(feature_psi) else None,
        "top_feature_max": str(feature_psi.idxmax()) if len(feature_psi) else None,
        "max_calendar_psi": round(float(ageing.max()), 4) if len(ageing) else None,
        "calendar_feature_max": str(ageing.idxmax()) if len(ageing) else None,
        "features_at_alarm": int(rows["alarm"].sum() - int(rows.loc[drift.SCORE, "alarm"])),
    }


def _exposure(settings, as_of: pd.Timestamp, shock_day: int | None) -> dict:
    """The truth behind this as_of's scored customers: how many the shocks expose, and how
    many of them (and of the rest) have dropped out since the shock day (their purchases
    stop; the model sees only the silence)."""
    from c360ml.refresh import SCORED
    from c360ml.storage.lake import Lake
    from c360ml.synth.generate import read_meta
    from c360ml.synth.shock import SHOCKS_FILE

    if shock_day is None:
        return {}
    lake, truth = Lake(settings.lake), settings.truth
    scores = lake.read_pandas("gold", "churn_scores")
    scored = scores[(scores["ScoredAsOf"] == as_of) & (scores["ScoreStatus"] == SCORED)]
    source_map = lake.read_pandas("gold", "customer_source_map")
    keys = pd.read_parquet(truth / "person_keys.parquet")
    persons = source_map.merge(keys, on=["source", "source_key"])
    persons = persons.drop_duplicates("customer_id").set_index("customer_id")["person_id"]
    ids = persons.reindex(scored["CustomerId"]).dropna().astype("int64").to_numpy()
    exposed = np.isin(ids, pd.read_parquet(truth / SHOCKS_FILE).person_id.to_numpy())
    meta = read_meta(truth)
    truth_persons = pd.read_parquet(truth / "persons.parquet").set_index("person_id")
    dropout = truth_persons["dropout_day"].reindex(ids).to_numpy(dtype=np.float64)
    day = (int(as_of.timestamp()) - int(meta["start_epoch"])) // 86_400
    gone = (dropout >= shock_day) & (dropout < day)

    def rate(mask: np.ndarray) -> float | None:
        return round(float(gone[mask].mean()), 4) if mask.any() else None

    return {
        "scored_exposed": int(exposed.sum()),
        "scored_exposed_share": round(float(exposed.mean()), 4),
        "dropped_since_shock_exposed": rate(exposed),
        "dropped_since_shock_unexposed": rate(~exposed),
    }


def _both_ways(settings, as_of: pd.Timestamp, old: str, new: str) -> dict | None:
    """Old and new champion scored on the same customers at as_of and judged on the same
    realized labels (None: the window has not closed). The features are the stored
    snapshot when it holds both models' features; otherwise both models' features are
    recomputed from the lake's as-of view at as_of (the same data vintage for both, so a
    late-arriving row cannot favour one), for the customers the snapshot holds."""
    import pyarrow.dataset as ds
    from sklearn.metrics import roc_auc_score

    import c360ml.features as ft
    from c360ml.features import FeatureSet
    from c360ml.model import registry, scoring
    from c360ml.refresh import snapshot_profiles
    from c360ml.steps import latest_event_time
    from c360ml.storage.lake import Lake

    lake = Lake(settings.lake)
    cfg = ft.load_churn_config(settings.path(settings.feature_spec))
    if as_of + pd.Timedelta(days=cfg.prediction_window_days) > latest_event_time(lake):
        return None
    stored = lake.read_pandas("gold", "customer_features", filter=ds.field("as_of") == as_of)
    labels = ft.compute_labels(ft.read_gold(lake), [as_of], cfg)
    labels = labels[labels["customer_id"].isin(stored["customer_id"])][["customer_id", "label"]]
    bundles = {
        name: registry.load_bundle(f"models:/{settings.model_name}/{version}")
        for name, version in (("old", old), ("new", new))
    }
    needed = {f for b in bundles.values() for f in b.feature_names}
    recompute = bool(needed - set(stored.columns))
    out = {"ScoredAsOf": str(as_of), "old": old, "new": new}
    out["features"] = "recomputed at as_of" if recompute else "stored snapshot"
    frames = {}
    for name, bundle in bundles.items():
        if recompute:
            fs = FeatureSet.from_json(bundle.feature_set_json)
            frame = snapshot_profiles(settings, as_of, False, fs).features
        else:
            frame = stored
        frames[name] = frame.merge(labels, on="customer_id")
    customers = set(frames["old"]["customer_id"]) & set(frames["new"]["customer_id"])
    for name, bundle in bundles.items():
        joined = frames[name][frames[name]["customer_id"].isin(customers)]
        joined = joined.sort_values("customer_id")
        # each model gets its own features (a retrained champion may have chosen others)
        request = joined[["customer_id", *bundle.feature_names]]
        request = request.rename(columns={"customer_id": "CustomerId"})
        p = scoring.score(bundle, request, explain="none")["ChurnScore"].to_numpy()
        y = joined["label"].to_numpy()
        out[f"{name}_roc_auc"] = round(float(roc_auc_score(y, p)), 4)
        out[f"{name}_brier"] = round(float(np.mean((p - y) ** 2)), 4)
        out[f"{name}_mean_score"] = round(float(p.mean()), 4)
        out["customers"] = int(len(joined))
        out["churn_rate"] = round(float(y.mean()), 4)
    return out


def run(
    base: Path = CACHE,
    customers: int = 20_000,
    seed: int = 42,
    months: int = 12,
    shock_month: int = 3,
    kind: str = "competitor",
    train_config=None,
    name: str | None = None,
) -> dict:
    """The year, month by month; returns the document written to lifecycle.json."""
    import shutil

    import mlflow

    from c360ml.model import registry, watch
    from c360ml.model.pipeline import retrain_if_needed, run_training
    from c360ml.refresh import run_refresh
    from c360ml.storage.lake import Lake
    from c360ml.synth import generate_lake
    from c360ml.synth.generate import read_meta

    started = time.perf_counter()
    shutil.rmtree(base, ignore_errors=True)
    settings = lifecycle_settings(base)
    first_day = AS_OF0 + pd.Timedelta(days=1)
    shock_date = first_day + pd.DateOffset(months=shock_month - 1)
    shock = f"{shock_date:%Y-%m-%d}:{kind}" if shock_month > 0 else None  # 0: a control year
    say(f"generate {customers} customers, seed {seed}, a year of future")
    generate_lake(settings, customers=customers, seed=seed, future_days=months * 31 + 7)
    _build_all(settings)
    say("train the first champion as of 2025-12-31")
    first = run_training(settings, AS_OF0, config=train_config)
    if not first.promoted:
        raise SystemExit(f"the first model was not promoted: {first.gate_reason}")
    initial = first.model_version
    champions = {initial: {"trained_as_of": str(AS_OF0), "test_roc_auc": first.roc_auc}}
    mlflow.set_tracking_uri(settings.tracking_uri)
    rows, applied = [], False
    for m in range(1, months + 1):
        month_end = first_day + pd.DateOffset(months=m)
        applied = _advance_month(settings, month_end, shock, applied)
        t0 = time.perf_counter()
        summary = run_refresh(settings)
        refresh_s = time.perf_counter() - t0
        as_of = summary.as_of
        bundle = registry.load_bundle(f"models:/{settings.model_name}@champion")
        top = list(bundle.metadata.get("top_features", []))
        active = bool(applied and shock and as_of >= shock_date)
        shock_day = None
        if active:
            start = int(read_meta(settings.truth)["start_epoch"])
            shock_day = (int(shock_date.timestamp()) - start) // 86_400
        row = {
            "month": m,
            "as_of": str(as_of),
            "shock_active": active,
            "refresh_s": round(refresh_s, 1),
            **_month_figures(settings, as_of, top),
            **_exposure(settings, as_of, shock_day),
        }
        t0 = time.perf_counter()
        outcome = retrain_if_needed(settings)
        row["triggers"] = outcome.fired
        row["health"] = outcome.health
        if outcome.summary is not None:
            s = outcome.summary
            row["retrain"] = {
                "version": s.model_version,
                "promoted": bool(s.promoted),
                "gate": s.gate_reason,
                "test_roc_auc": round(float(s.roc_auc), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            champions[s.model_version] = {
                "trained_as_of": str(s.trained_as_of),
                "test_roc_auc": round(float(s.roc_auc), 4),
                "promoted": bool(s.promoted),
            }
        rows.append(row)
        say(
            f"month {m} as_of {as_of:%Y-%m-%d}: v{row['model_version']} est AUC "
            f"{row['estimated_roc_auc']} score PSI {row['score_psi']} triggers {outcome.fired} "
            f"retrain {row.get('retrain')}"
        )
    lake = Lake(settings.lake)
    outcomes = lake.read_pandas("gold", watch.OUTCOMES)
    realized = outcomes[outcomes["population"] == "all"].set_index("ScoredAsOf")
    for row in rows:
        ts = pd.Timestamp(row["as_of"])
        hit = realized[realized.index == ts]
        row["realized_roc_auc"] = round(float(hit["roc_auc"].iloc[0]), 4) if len(hit) else None
        row["realized_churn_rate"] = (
            round(float(hit["churn_rate"].iloc[0]), 4) if len(hit) else None
        )
    both = []
    for row in rows:
        if row["model_version"] != initial:
            pair = _both_ways(settings, pd.Timestamp(row["as_of"]), initial, row["model_version"])
            if pair is not None:
                pair["month"] = row["month"]
                both.append(pair)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": "benchmarks/run.py --stage lifecycle",
        "customers": customers,
        "seed": seed,
        "months": months,
        "run": name or (kind if shock else "control"),
        "shock": shock,
        "shock_month": shock_month,
        "shock_entry": (read_meta(settings.truth).get("shocks") or [None])[0],
        "watch": settings.watch.model_dump(),
        "initial_champion": initial,
        "champions": champions,
        "months_detail": rows,
        "old_vs_new": both,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def expected_shape(doc: dict) -> list[str]:
    """#29's expected shape, checked against the figures (not assumed)."""
    rows, alarm = doc["months_detail"], doc["watch"]["psi_alarm"]
    fired = [r["month"] for r in rows if r["triggers"]]
    promoted = [r["month"] for r in rows if r.get("retrain", {}).get("promoted")]
    wins = [p for p in doc["old_vs_new"] if p.get("new_roc_auc") and p.get("old_roc_auc")]
    better = sum(p["new_roc_auc"] > p["old_roc_auc"] for p in wins)
    drops = [
        doc["champions"][r["model_version"]]["test_roc_auc"] - r["realized_roc_auc"]
        for r in rows
        if r["realized_roc_auc"] is not None
    ]
    worst = max(drops) if drops else float("nan")
    margin = doc["watch"]["realized_auc_drop"]
    out = ["Expected shape (#29), as measured:", ""]
    if doc["shock"]:
        after = [r for r in rows if r["shock_active"]][:2]
        psi = [max(r["score_psi"], r["max_top_feature_psi"] or 0) for r in after]
        out.append(
            f"- drift alarm within two refreshes of the shock: "
            f"{'yes' if psi and max(psi) >= alarm else 'no'} (largest score or top-10 "
            f"feature PSI in them {max(psi) if psi else float('nan'):.3f}, alarm {alarm})"
        )
    else:
        out.append("- no shock (control): any trigger here is a false alarm")
    out += [
        f"- a trigger fired in month(s): {fired or 'none'}; largest realized ROC AUC drop "
        f"below the scoring champion's test figure {worst:.3f} (margin {margin})",
        f"- a retrain promoted in month(s): {promoted or 'none'}",
        f"- new champion beats the old on windows closed after the retrain: {better} of "
        f"{len(wins)} by ROC AUC, {_lower_brier(wins)} of {len(wins)} by Brier score (a level "
        "shift moves the Brier score, not the ranking)",
    ]
    return out


def _lower_brier(pairs: list[dict]) -> int:
    return sum(
        p.get("new_brier") is not None
        and p.get("old_brier") is not None
        and p["new_brier"] < p["old_brier"]
        for p in pairs
    )


def month_table(doc: dict) -> list[str]:
    """One row per month: the model's figures, the triggers and the gate, and the truth."""
    lines = [
        "| month | as_of | model | mean score | realized churn rate | est. ROC AUC "
        "| realized ROC AUC | score PSI "
        "| top-10 feature PSI (max, can alarm) | calendar-scaled PSI | trigger | gate "
        "| scored exposed | dropped since shock: exposed / rest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["months_detail"]:
        gate = "–"
        if r.get("retrain"):
            rt = r["retrain"]
            verdict = "promoted" if rt["promoted"] else "refused"
            gate = f"v{rt['version']} {verdict}: {rt['gate']}"
        trig = "; ".join(r["triggers"]) or "none"
        shock = " (shock)" if r["shock_active"] else ""
        exposed = "–"
        if r.get("scored_exposed") is not None:
            exposed = f"{r['scored_exposed']:,} ({r['scored_exposed_share']:.0%})"
        dropped = "–"
        if r.get("dropped_since_shock_exposed") is not None:
            dropped = (
                f"{_fmt(r['dropped_since_shock_exposed'])} / "
                f"{_fmt(r['dropped_since_shock_unexposed'])}"
            )
        lines.append(
            f"| {r['month']}{shock} | {r['as_of'][:10]} | v{r['model_version']} | "
            f"{_fmt(r['mean_score'])} | {_fmt(r.get('realized_churn_rate'))} | "
            f"{_fmt(r['estimated_roc_auc'])} | "
            f"{_fmt(r['realized_roc_auc'])} | {_fmt(r['score_psi'])} | "
            f"{_fmt(r['max_top_feature_psi'])} ({r['top_feature_max'] or '–'}) | "
            f"{_fmt(r.get('max_calendar_psi'))} | {trig} | {gate} | {exposed} | {dropped} |"
        )
    return lines


def _pairs_table(pairs: list[dict]) -> list[str]:
    lines = [
        "| month | ScoredAsOf | customers | churn rate | old | ROC AUC old | Brier old "
        "| mean score old | new | ROC AUC new | Brier new | mean score new |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['month']} | {p['ScoredAsOf'][:10]} | {p['customers']:,} | "
            f"{_fmt(p['churn_rate'])} | v{p['old']} | {_fmt(p['old_roc_auc'])} | "
            f"{_fmt(p.get('old_brier'))} | {_fmt(p.get('old_mean_score'))} | v{p['new']} | "
            f"{_fmt(p['new_roc_auc'])} | {_fmt(p.get('new_brier'))} | "
            f"{_fmt(p.get('new_mean_score'))} |"
        )
    return lines


def old_vs_new(doc: dict) -> list[str]:
    lines = ["Old (initial) vs new champion on the same customers, windows closed:", ""]
    if not doc["old_vs_new"]:
        lines.append("none: no retrained champion scored an as_of whose window closed.")
    else:
        lines += _pairs_table(doc["old_vs_new"])
    w = doc.get("what_if")
    if w:
        verdict = "promoted" if w["promoted"] else "refused"
        lines += [
            "",
            f"What if a trigger had fired in month {w['month']} (as_of {w['as_of'][:10]}, "
            f"{w['why']}): `run_training` as of that day on the same lake made v{w['version']} "
            f"(test ROC AUC {w['test_roc_auc']:.3f}; the gate {verdict} it: {w['gate']}; "
            f"{w['seconds'] / 60:.0f} min). Initial and this model on the same customers of "
            "every later as_of whose window closed:",
            "",
            *_pairs_table(w["old_vs_new"]),
        ]
    return lines


def _header(doc: dict) -> str:
    entry = doc.get("shock_entry") or {}
    what = f"shock `{doc['shock']}` (month {doc['shock_month']})" if doc["shock"] else "no shock"
    if entry:
        what += (
            f": {entry['description']}; {entry['exposed']:,} persons exposed, "
            f"{entry['dropouts_brought_forward']:,} dropouts brought forward, "
            f"{entry.get('purchases_skipped', 0):,} orders not placed over the simulated future"
        )
    return (
        f"`{doc['command']}`: {doc['customers']:,} customers, seed {doc['seed']}, "
        f"{doc['months']} monthly refreshes, {what}; watch settings {json.dumps(doc['watch'])}; "
        f"{doc['wall_s'] / 60:.0f} min, peak RSS {doc['peak_rss_mb']:.0f} MB."
    )


def markdown(doc: dict) -> str:
    """One run: the per-month table, the expected shape and the old-vs-new comparison."""
    lines = [f"# Lifecycle, {doc['run']}: a simulated year ({doc['date']})", "", _header(doc)]
    lines += ["", *month_table(doc), "", *expected_shape(doc), "", *old_vs_new(doc)]
    return "\n".join(lines) + "\n"


def _panels(doc: dict, top, bottom, level) -> None:
    rows = doc["months_detail"]
    x = [r["month"] for r in rows]
    level.plot(x, [r["mean_score"] for r in rows], "o--", label="mean ChurnScore (at as_of)")
    churn = [np.nan if r["realized_churn_rate"] is None else r["realized_churn_rate"] for r in rows]
    level.plot(x, churn, "s-", label="realized churn rate (window closed)")
    level.set_ylabel("share")
    level.legend(fontsize=7, loc="lower left")
    top.plot(x, [r["estimated_roc_auc"] for r in rows], "o--", label="estimated (label-free)")
    real = [np.nan if r["realized_roc_auc"] is None else r["realized_roc_auc"] for r in rows]
    top.plot(x, real, "s-", label="realized")
    test = [doc["champions"].get(r["model_version"], {}).get("test_roc_auc") for r in rows]
    top.step(x, test, where="mid", color="grey", alpha=0.6, label="scoring champion's test")
    for p in doc["old_vs_new"]:
        top.plot(p["month"], p["old_roc_auc"], "x", color="crimson")
    if doc["old_vs_new"]:
        top.plot([], [], "x", color="crimson", label="initial champion, same customers")
    top.set_ylabel("ROC AUC")
    top.legend(fontsize=7, loc="lower left")
    bottom.bar(x, [r["score_psi"] for r in rows], color="steelblue", label="score PSI")
    bottom.plot(
        x,
        [r["max_top_feature_psi"] or 0 for r in rows],
        "d-",
        color="darkorange",
        label="max top-10 feature PSI (can alarm)",
    )
    bottom.plot(
        x,
        [r.get("max_calendar_psi") or np.nan for r in rows],
        ".:",
        color="grey",
        label="calendar-scaled top feature PSI (no alarm)",
    )
    bottom.axhline(doc["watch"]["psi_alarm"], color="red", lw=1, ls=":", label="psi_alarm")
    for r in rows:
        if r.get("retrain"):
            colour = "green" if r["retrain"]["promoted"] else "grey"
            for ax in (top, bottom, level):
                ax.axvline(r["month"], color=colour, lw=1, alpha=0.5)
    for ax in (top, bottom, level):
        if doc["shock"]:
            ax.axvline(doc["shock_month"] - 0.5, color="black", lw=1.5, ls="--")
    bottom.set_ylabel("PSI vs the test rows")
    level.set_xlabel("month (shock: dashed; retrain promoted: green, refused: grey)")
    bottom.legend(fontsize=7, loc="upper left")
    level.set_xticks(x)
    top.set_title(f"{doc['run']}: {doc['shock'] or 'no shock'}", fontsize=9)


def chart(docs: list[dict], path: Path) -> None:
    """Per month, one column a run: ROC AUC (estimated, realized, champion's test), PSI, and
    the mean score beside the realized churn rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        3, len(docs), figsize=(6 * len(docs), 9), squeeze=False, sharex=True, sharey="row"
    )
    for k, doc in enumerate(docs):
        _panels(doc, axes[0, k], axes[1, k], axes[2, k])
    fig.suptitle(f"A simulated year, {docs[0]['customers']:,} customers, monthly refreshes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# run name -> shock kind (None: no shock), in the order of the combined files. The severe
# recession (the declared recession three times as strong on the log scale: hazard x3.4,
# orders kept x0.51) measures what size of shock the triggers see; it is not a story.
RUN_SHOCKS = {
    "competitor": "competitor",
    "recession": "recession",
    "severe_recession": "recession*3",
    "control": None,
}
RUNS = tuple(RUN_SHOCKS)


def summary_table(docs: list[dict]) -> list[str]:
    """The runs side by side: what the monitoring saw, what fired, what the gate did."""
    lines = [
        "| run | largest score PSI (month) | largest top-10 feature PSI that can alarm "
        "| largest realized ROC AUC drop below test | triggers fired (months) "
        "| retrains promoted | new beats old on closed windows: ROC AUC (Brier) |",
        "|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        rows = doc["months_detail"]
        top_score = max(rows, key=lambda r: r["score_psi"])
        top_feat = max(rows, key=lambda r: r["max_top_feature_psi"] or 0)
        drops = [
            (doc["champions"][r["model_version"]]["test_roc_auc"] - r["realized_roc_auc"], r)
            for r in rows
            if r["realized_roc_auc"] is not None
        ]
        worst = max(drops, key=lambda d: d[0]) if drops else None
        fired = [r["month"] for r in rows if r["triggers"]]
        promoted = [r["month"] for r in rows if r.get("retrain", {}).get("promoted")]
        wins = [p for p in doc["old_vs_new"] if p.get("new_roc_auc") and p.get("old_roc_auc")]
        better = sum(p["new_roc_auc"] > p["old_roc_auc"] for p in wins)
        better = f"{better} (Brier {_lower_brier(wins)})"
        lines.append(
            f"| {doc['run']} | {top_score['score_psi']:.3f} ({top_score['month']}) | "
            f"{_fmt(top_feat['max_top_feature_psi'])} ({top_feat['month']}, "
            f"{top_feat['top_feature_max']}) | "
            + (f"{worst[0]:.3f} (month {worst[1]['month']})" if worst else "–")
            + f" | {fired or 'none'} | {promoted or 'none'} | {better} of {len(wins)} |"
        )
    return lines


def combine(out: Path, findings: Path | None = None) -> None:
    """lifecycle.json/.md/.png from the runs' files present in `out`, and the README."""
    docs = [
        json.loads((out / f"lifecycle_{name}.json").read_text())
        for name in RUNS
        if (out / f"lifecycle_{name}.json").exists()
    ]
    if not docs:
        return
    (out / "lifecycle.json").write_text(
        json.dumps({"runs": {d["run"]: d for d in docs}}, indent=1, default=str)
    )
    lines = [
        f"# Lifecycle: a simulated year, {len(docs)} run(s) side by side",
        "",
        "`make bench STAGE=lifecycle` (`python benchmarks/bench_lifecycle.py`; one run: "
        "`--runs recession`). Each run: the demo lake, the champion trained as of "
        "2025-12-31, 12 months of weekly increments, each month `refresh` then "
        "`retrain --if-needed`. Per run: `lifecycle_<run>.json/.md/.png`.",
        "",
        *summary_table(docs),
    ]
    notes = out / "lifecycle_findings.md"
    if notes.exists():  # the written analysis of these figures (by hand, not generated)
        lines += ["", *notes.read_text().splitlines()]
    for doc in docs:
        lines += ["", f"## {doc['run']}", "", _header(doc), "", *month_table(doc)]
        lines += ["", *expected_shape(doc), "", *old_vs_new(doc)]
    (out / "lifecycle.md").write_text("\n".join(lines) + "\n")
    chart(docs, out / "lifecycle.png")
    if out.resolve() == RESULTS.resolve():
        sys.path.insert(0, str(HERE))
        from run import write_readme

        write_readme()


def what_if(base: Path, out: Path, name: str, month: int) -> None:
    """A finished run, replayed from its cache: train a challenger as of month `month`'s
    as_of (nothing after it is read) and score every later as_of whose window closed with
    it and with the initial champion, on the same customers and labels. Which month: the
    issue expects the alarm within two refreshes of the shock, so the shock month + 2 is
    when a retrain would have happened at the latest; the control gets the same month, so
    what plain retraining on fresher data gains is measured beside what the shock adds."""
    import mlflow

    from c360ml.model.pipeline import run_training

    settings = lifecycle_settings(base / name)
    path = out / f"lifecycle_{name}.json"
    doc = json.loads(path.read_text())
    rows = doc["months_detail"]
    as_of = pd.Timestamp(rows[month - 1]["as_of"])
    mlflow.set_tracking_uri(settings.tracking_uri)
    t0 = time.perf_counter()
    summary = run_training(settings, as_of)
    pairs = []
    for r in rows[month:]:
        ts = pd.Timestamp(r["as_of"])
        pair = _both_ways(settings, ts, doc["initial_champion"], summary.model_version)
        if pair is not None:
            pairs.append(pair | {"month": r["month"]})
    doc["what_if"] = {
        "month": month,
        "as_of": str(as_of),
        "why": "the shock month + 2" if doc["shock"] else "the same month as the shock runs",
        "version": summary.model_version,
        "promoted": bool(summary.promoted),
        "gate": summary.gate_reason,
        "test_roc_auc": round(float(summary.roc_auc), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "old_vs_new": pairs,
    }
    path.write_text(json.dumps(doc, indent=1, default=str))
    say(f"what-if {name} month {month}: v{summary.model_version}, {len(pairs)} windows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated: competitor, recession, severe_recession and/or control",
    )
    parser.add_argument("--shock-month", type=int, default=3, help="month the shock starts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--base", type=Path, default=CACHE)
    parser.add_argument("--combine-only", action="store_true", help="rewrite combined files")
    parser.add_argument(
        "--what-if",
        action="store_true",
        help="after the runs: on each finished run of --runs (its cache), a challenger "
        "trained at the shock month + 2 against the initial champion on later windows",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in RUNS if args.combine_only else []:  # rewrite each run's md/png from its json
        stem = args.out / f"lifecycle_{name}"
        if stem.with_suffix(".json").exists():
            doc = json.loads(stem.with_suffix(".json").read_text())
            stem.with_suffix(".md").write_text(markdown(doc))
            chart([doc], stem.with_suffix(".png"))
    for name in [] if args.combine_only else args.runs.split(","):
        if name not in RUNS:
            raise SystemExit(f"--runs: unknown run {name!r} (one of {', '.join(RUNS)})")
        kind = RUN_SHOCKS[name]
        month = args.shock_month if kind else 0
        doc = run(
            args.base / name,
            args.customers,
            args.seed,
            args.months,
            month,
            kind or "competitor",
            name=name,
        )
        doc["command"] = "python benchmarks/bench_lifecycle.py --runs " + name
        stem = args.out / f"lifecycle_{name}"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(doc))
        chart([doc], stem.with_suffix(".png"))
        say(f"wrote {stem}.json, .md, .png")
    for name in args.runs.split(",") if args.what_if else []:
        what_if(args.base, args.out, name, args.shock_month + 2)
        stem = args.out / f"lifecycle_{name}"
        doc = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(doc))
    combine(args.out)
    say(f"wrote {args.out / 'lifecycle'}.json, .md, .png")


if __name__ == "__main__":
    main()
