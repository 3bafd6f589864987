"""A simulated year of operation: does the model notice a regime change and recover?

`make bench STAGE=lifecycle` (or `python benchmarks/bench_lifecycle.py`): the demo lake
(20,000 customers, seed 42, history to 2025-12-31, champion trained as of that day), then
12 months of weekly increments (a month = the weekly syncs whose cut falls in it), a
competitor opening at the start of month 3 (`generate --increment --shock`), and each
month `refresh` then `retrain --if-needed`, with `max_model_age_days` above a year so only
drift and realized performance can trigger. Per month: the label-free estimate of ROC AUC,
the realized ROC AUC once the 90-day window has closed, the score PSI, the highest PSI of a
top-10 feature, the trigger that fired and the gate's decision. For every as_of scored by a
retrained champion whose window closed, the old (initial) champion and the one that scored
it are both scored on the same customers' stored features and judged on the same labels.

Writes lifecycle.json, lifecycle.md and lifecycle.png (matplotlib) to benchmarks/results/.
The lake, MLflow store and logs live under benchmarks/cache/lifecycle/ (ignored).
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
    from c360ml.lake import Lake
    from c360ml.model import drift, watch
    from c360ml.refresh import DRIFT, SCORED

    lake = Lake(settings.lake)
    rows = lake.read_pandas("gold", DRIFT)
    rows = rows[rows["ScoredAsOf"] == as_of].set_index("column")
    scores = lake.read_pandas("gold", "churn_scores")
    scores = scores[(scores["ScoredAsOf"] == as_of) & (scores["ScoreStatus"] == SCORED)]
    feature_psi = rows.loc[[f for f in top if f in rows.index], "psi"]
    return {
        "model_version": str(scores["ModelVersion"].iloc[0]),
        "scored": int(len(scores)),
        "mean_score": round(float(scores["ChurnScore"].mean()), 4),
        "estimated_roc_auc": round(watch.estimated_roc_auc(scores["ChurnScore"].to_numpy()), 4),
        "score_psi": round(float(rows.loc[drift.SCORE, "psi"]), 4),
        "max_top_feature_psi": round(float(feature_psi.max()), 4) if len(feature_psi) else None,
        "top_feature_max": str(feature_psi.idxmax()) if len(feature_psi) else None,
        "features_at_alarm": int(rows["alarm"].sum() - int(rows.loc[drift.SCORE, "alarm"])),
    }


def _both_ways(settings, as_of: pd.Timestamp, old: str, new: str) -> dict | None:
    """Old and new champion scored on the same customers' stored features at as_of and
    judged on the same realized labels (None: the window has not closed)."""
    import pyarrow.dataset as ds
    from sklearn.metrics import roc_auc_score

    import c360ml.features as ft
    from c360ml.lake import Lake
    from c360ml.model import registry, scoring
    from c360ml.refresh import latest_event_time

    lake = Lake(settings.lake)
    cfg = ft.load_churn_config(settings.path(settings.feature_spec))
    if as_of + pd.Timedelta(days=cfg.prediction_window_days) > latest_event_time(lake):
        return None
    features = lake.read_pandas("gold", "customer_features", filter=ds.field("as_of") == as_of)
    labels = ft.compute_labels(ft.read_gold(lake), [as_of], cfg)
    joined = features.merge(labels[["customer_id", "label"]], on="customer_id")
    request = joined.drop(columns=["as_of", "label"]).rename(columns={"customer_id": "CustomerId"})
    out = {"ScoredAsOf": str(as_of), "customers": int(len(joined)), "old": old, "new": new}
    for name, version in (("old", old), ("new", new)):
        bundle = registry.load_bundle(f"models:/{settings.model_name}/{version}")
        missing = set(bundle.feature_names) - set(request.columns)
        if missing:
            out[f"{name}_roc_auc"] = None
            out[f"{name}_note"] = f"features not in the snapshot: {sorted(missing)[:3]}"
            continue
        p = scoring.score(bundle, request, explain="none")["ChurnScore"].to_numpy()
        out[f"{name}_roc_auc"] = round(float(roc_auc_score(joined["label"], p)), 4)
    out["churn_rate"] = round(float(joined["label"].mean()), 4)
    return out


def run(
    base: Path = CACHE,
    customers: int = 20_000,
    seed: int = 42,
    months: int = 12,
    shock_month: int = 3,
    kind: str = "competitor",
    train_config=None,
) -> dict:
    """The year, month by month; returns the document written to lifecycle.json."""
    import shutil

    import mlflow

    from c360ml.lake import Lake
    from c360ml.model import registry, watch
    from c360ml.model.pipeline import retrain_if_needed, run_training
    from c360ml.refresh import run_refresh
    from c360ml.synth import generate_lake

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
        row = {
            "month": m,
            "as_of": str(as_of),
            "shock_active": bool(applied and shock and as_of >= shock_date),
            "refresh_s": round(refresh_s, 1),
            **_month_figures(settings, as_of, top),
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
        "shock": shock,
        "shock_month": shock_month,
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
    after = [r for r in rows if r["shock_active"]][:2]
    psi = [max(r["score_psi"], r["max_top_feature_psi"] or 0) for r in after]
    fired = [r["month"] for r in rows if r["triggers"]]
    promoted = [r["month"] for r in rows if r.get("retrain", {}).get("promoted")]
    wins = [p for p in doc["old_vs_new"] if p.get("new_roc_auc") and p.get("old_roc_auc")]
    better = sum(p["new_roc_auc"] > p["old_roc_auc"] for p in wins)
    drops = [
        doc["champions"][r["model_version"]]["test_roc_auc"] - r["realized_roc_auc"]
        for r in rows
        if r["realized_roc_auc"] is not None
    ]
    return [
        "Expected shape (#29), as measured:",
        "",
        f"- drift alarm within two refreshes of the shock: "
        f"{'yes' if psi and max(psi) >= alarm else 'no'} (largest score or top-10 feature PSI "
        f"in them {max(psi) if psi else float('nan'):.3f}, alarm {alarm})",
        f"- a trigger fired in month(s): {fired or 'none'}; largest realized ROC AUC drop "
        f"below the champion's test figure {max(drops) if drops else float('nan'):.3f} "
        f"(margin {doc['watch']['realized_auc_drop']})",
        f"- a retrain promoted in month(s): {promoted or 'none'}",
        f"- new champion beats the old on post-shock windows: {better} of {len(wins)}",
    ]


def markdown(doc: dict) -> str:
    """The per-month table and the old-vs-new comparison."""
    lines = [
        f"# Lifecycle: a simulated year ({doc['date']})",
        "",
        f"`{doc['command']}`: {doc['customers']:,} customers, seed {doc['seed']}, "
        f"{doc['months']} monthly refreshes, shock `{doc['shock']}` (month "
        f"{doc['shock_month'] or 'none'}), watch settings {json.dumps(doc['watch'])}; "
        f"{doc['wall_s'] / 60:.0f} min, peak RSS {doc['peak_rss_mb']:.0f} MB.",
        "",
        "| month | as_of | model | est. ROC AUC | realized ROC AUC | score PSI | top-10 "
        "feature PSI (max) | trigger | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["months_detail"]:
        gate = "–"
        if r.get("retrain"):
            rt = r["retrain"]
            verdict = "promoted" if rt["promoted"] else "refused"
            gate = f"v{rt['version']} {verdict}: {rt['gate']}"
        trig = "; ".join(r["triggers"]) or "none"
        shock = " (shock)" if r["shock_active"] else ""
        lines.append(
            f"| {r['month']}{shock} | {r['as_of'][:10]} | v{r['model_version']} | "
            f"{_fmt(r['estimated_roc_auc'])} | {_fmt(r['realized_roc_auc'])} | "
            f"{_fmt(r['score_psi'])} | {_fmt(r['max_top_feature_psi'])} "
            f"({r['top_feature_max'] or '–'}) | {trig} | {gate} |"
        )
    lines += ["", *expected_shape(doc)]
    lines += ["", "Old (initial) vs new champion on the same customers, windows closed:", ""]
    if doc["old_vs_new"]:
        lines += [
            "| month | ScoredAsOf | customers | churn rate | old | ROC AUC old | new | "
            "ROC AUC new |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in doc["old_vs_new"]:
            lines.append(
                f"| {p['month']} | {p['ScoredAsOf'][:10]} | {p['customers']:,} | "
                f"{_fmt(p['churn_rate'])} | v{p['old']} | {_fmt(p['old_roc_auc'])} | "
                f"v{p['new']} | {_fmt(p['new_roc_auc'])} |"
            )
    else:
        lines.append("none: no retrained champion scored an as_of whose window closed.")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    """ROC AUC (estimated, realized, champion's test) and score PSI per month."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["months_detail"]
    x = [r["month"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
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
    top.legend(fontsize=8, loc="lower left")
    bottom.bar(x, [r["score_psi"] for r in rows], color="steelblue", label="score PSI")
    bottom.plot(
        x,
        [r["max_top_feature_psi"] or 0 for r in rows],
        "d-",
        color="darkorange",
        label="max top-10 feature PSI",
    )
    bottom.axhline(doc["watch"]["psi_alarm"], color="red", lw=1, ls=":", label="psi_alarm")
    for r in rows:
        if r.get("retrain"):
            colour = "green" if r["retrain"]["promoted"] else "grey"
            for ax in (top, bottom):
                ax.axvline(r["month"], color=colour, lw=1, alpha=0.5)
    for ax in (top, bottom):
        if doc["shock"]:
            ax.axvline(doc["shock_month"] - 0.5, color="black", lw=1.5, ls="--")
    bottom.set_ylabel("PSI vs the test rows")
    bottom.set_xlabel("month (shock: dashed; retrain promoted: green, refused: grey)")
    bottom.legend(fontsize=8, loc="upper left")
    bottom.set_xticks(x)
    fig.suptitle(f"A simulated year, {doc['customers']:,} customers, shock {doc['shock']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--shock-month", type=int, default=3, help="0: no shock (a control)")
    parser.add_argument("--name", default="lifecycle", help="output file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--base", type=Path, default=CACHE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    doc = run(args.base, args.customers, args.seed, args.months, args.shock_month)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.name != "lifecycle":
        doc["command"] = "python " + " ".join(sys.argv)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.out / f"{args.name}.md").write_text(markdown(doc))
    chart(doc, args.out / f"{args.name}.png")
    say(f"wrote {args.out / args.name}.json, .md, .png")


if __name__ == "__main__":
    main()
