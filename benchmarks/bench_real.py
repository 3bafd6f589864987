"""Stage `real`: c360ml against BG/NBD and Pareto/NBD on a real purchase log (CDNOW).

`make bench STAGE=real` (or `python benchmarks/bench_real.py`). The CDNOW master log (the
23,570 customers of CDNOW's Q1-1997 cohort, every purchase to 1998-06-30) ships in the
lifetimes wheel, a bench/dev dependency installed for its data only. For each (as_of,
window) pair:

1. The log's rows dated before as_of become `landing/generic/cdnow.csv` (customer_id,
   timestamp, amount): nothing after as_of is in the lake at all. A row's date is stamped
   at 12:00 UTC, so that an as_of at midnight splits whole days: the label window
   (as_of, as_of + w] then holds exactly the dates as_of .. as_of + w - 1.
2. The README's commands on that lake: `c360ml build all`, `c360ml train --as-of`, with a
   feature spec whose churn section sets the window and the training cutoffs (below).
3. The champion scores the population at as_of (`c360ml.Project.score`).
4. BG/NBD and Pareto/NBD (`c360ml.features.btyd`) are fitted on the same history (purchase
   days before as_of, in days) of every customer with one; their churn score is
   P(no purchase in the window).
5. The outcome comes from the full log: churned = no purchase (amount > 0) dated in
   [as_of, as_of + w). All three are scored on the same customers: c360ml's population.
6. An experiment towards BTYD features (`btyd_feature_ablation`): the built-in recipe
   refitted on the same training matrix without and with per-cutoff BTYD columns.

Training cutoffs: spaced 30 days back from as_of - w (the last whose label window ends by
as_of), as many as leave each cutoff at least 30 days after the log's first day (at most
12, the default). Chosen before any figure was seen; not tuned per split.

With the BTYD features on (`BENCH_REAL_BTYD=1 make bench STAGE=real`, or `--btyd`): the
spec gets `btyd: {enabled: true}`, so training derives the BTYD quantities as candidate
features at each cutoff and scoring computes them at as_of (`c360ml.features.btyd`); the
ablation is skipped (its columns are then the model's own).

Figures go to benchmarks/results/real.json (real_btyd.json with the BTYD features on) and
real.md, which shows both runs (a section of the results README).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache" / "real"
RESULTS = HERE / "results"
SPACING_DAYS = 30
MAX_CUTOFFS = 12
# (as_of, prediction window in days): the issue's split first, then later as_ofs.
PAIRS = (("1997-10-01", 90), ("1998-01-01", 90), ("1998-04-01", 90), ("1997-10-01", 180))
BOOTSTRAP = 200


def _three(metrics: dict, key: str) -> str:
    """One metric of c360ml, BG/NBD and Pareto/NBD, as a table cell."""
    return " / ".join(f"{metrics[k][key]:.4f}" for k in ("c360ml", "bg_nbd", "pareto_nbd"))


def read_cdnow() -> pd.DataFrame:
    """CDNOW_master.txt from the installed lifetimes distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution("lifetimes")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("stage real needs lifetimes==0.11.3 (make bench installs it)") from None
    path = Path(str(dist.locate_file("lifetimes/datasets/CDNOW_master.txt")))
    if not path.exists():
        raise SystemExit(f"stage real: {path} is missing from the lifetimes wheel")
    frame = pd.read_csv(
        path,
        sep=r"\s+",
        header=None,
        skiprows=1,  # its header line names the columns with spaces in them
        names=["customer_id", "date", "cds", "amount"],
        dtype={"customer_id": str, "date": str},
    )
    frame["ts"] = pd.to_datetime(frame["date"], format="%Y%m%d", utc=True) + pd.Timedelta(hours=12)
    return frame[["customer_id", "ts", "amount"]]


def training_cutoff_count(log_start: pd.Timestamp, as_of: pd.Timestamp, window: int) -> int:
    """30-day-spaced cutoffs back from as_of - w that stay >= 30 days after the log starts."""
    last = as_of - pd.Timedelta(days=window)
    room = (last - log_start - pd.Timedelta(days=SPACING_DAYS)) // pd.Timedelta(days=SPACING_DAYS)
    return int(max(1, min(MAX_CUTOFFS, room + 1)))


def write_project(
    work: Path, history: pd.DataFrame, window: int, cutoffs: int, btyd: bool = False
) -> Path:
    """The landing CSV, a feature spec with this churn section (and the BTYD candidate
    features when `btyd`), and c360ml.yaml naming both."""
    landing = work / "lake" / "landing" / "generic"
    landing.mkdir(parents=True)
    out = history.assign(timestamp=history["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    out[["customer_id", "timestamp", "amount"]].to_csv(landing / "cdnow.csv", index=False)
    spec = yaml.safe_load((ROOT / "features" / "retention.yaml").read_text())
    spec["churn"].update(
        prediction_window_days=window, cutoff_count=cutoffs, cutoff_spacing_days=SPACING_DAYS
    )
    if btyd:
        spec["btyd"] = {"enabled": True}
    (work / "retention.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    config = {
        "root": str(ROOT),
        "lake_root": str(work / "lake"),
        "truth_root": str(work / "truth"),
        "mlflow_dir": str(work / "mlflow"),
        "log_dir": str(work / "logs"),
        "reports_dir": str(work / "reports"),
        "feature_spec": str(work / "retention.yaml"),
        "sources": ["generic"],
    }
    path = work / "c360ml.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def c360ml(config: Path, *args: str) -> float:
    """One README command on the bench project; its seconds."""
    env = {**os.environ, "C360ML_CONFIG": str(config)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    exe = Path(sys.executable).parent / "c360ml"
    subprocess.run([str(exe), *args], check=True, env=env, cwd=config.parent)
    return round(time.perf_counter() - started, 1)


def c360ml_scores(config: Path, as_of: pd.Timestamp) -> tuple[pd.Series, dict]:
    """ChurnScore at as_of of the version just trained, for its population, indexed by
    CDNOW customer id; and that version's registry record (test AUC, gate decision).

    The version is scored whatever the gate decided: the gate compares it with RFM on its
    own test cutoff, and a first version it keeps as challenger is still what `train` made.
    """
    import c360ml
    from c360ml.storage.lake import Lake

    project = c360ml.open(config)
    versions = project.versions()
    version = int(versions.index.max())
    scores = project.score(as_of=as_of, version=version, explain="none")
    keys = Lake(project.settings.lake).read_pandas("gold", "customer_source_map")
    key = keys.set_index("customer_id")["source_key"]
    record = versions.loc[version].to_dict()
    record = {k: record[k] for k in ("test_roc_auc", "grade", "gate_decision", "gate_reason")}
    series = pd.Series(
        scores["ChurnScore"].to_numpy(float), index=key.loc[scores["CustomerId"]].to_numpy()
    )
    return series, {"version": version, **record}


def btyd_scores(history: pd.DataFrame, as_of: pd.Timestamp, window: int) -> dict:
    """BG/NBD and Pareto/NBD on purchase days before as_of: P(no purchase in the window)."""
    from c360ml.features import btyd

    buys = history[history["amount"] > 0]
    summary = btyd.summarise_purchases(buys, as_of)
    x, t_x, age = (summary[c] for c in (btyd.FREQUENCY, btyd.RECENCY, btyd.AGE))
    out = {}
    for name, fit, predict in (
        ("bg_nbd", btyd.fit_bgnbd, btyd.bgnbd_predict),
        ("pareto_nbd", btyd.fit_pareto_nbd, btyd.pareto_nbd_predict),
    ):
        started = time.perf_counter()
        params = fit(x, t_x, age)
        pred = predict(params, x, t_x, age, window=float(window))
        out[name] = {
            "params": {k: round(v, 4) for k, v in vars(params).items()},
            "fit_s": round(time.perf_counter() - started, 2),
            "score": pd.Series(pred["p_no_purchase"].to_numpy(), index=summary.index),
        }
    return out


def _utc_ns(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]")


def btyd_feature_ablation(config: Path, log: pd.DataFrame, as_of: pd.Timestamp, window: int):
    """An experiment outside the pipeline, towards BTYD features (#31): the built-in recipe
    (`train_and_evaluate`: the same splits, early stopping, calibrator choice, refit) on the
    training matrix `c360ml train` fitted, once with the selected features alone and once
    with `btyd.BTYD_FEATURES` added (refitted at each cutoff on purchase days up to it),
    each scored at as_of. Returns per variant the churn scores by CDNOW id and the recipe's
    own test-cutoff ROC AUC.
    """
    import c360ml
    from c360ml import features as ft
    from c360ml.features import btyd
    from c360ml.model.train import train_and_evaluate
    from c360ml.storage.lake import Lake

    project = c360ml.open(config)
    data = project.training_data(as_of)
    lake = Lake(project.settings.lake)
    key = lake.read_pandas("gold", "customer_source_map").set_index("customer_id")["source_key"]
    gold = ft.read_gold(lake)
    population = ft.active_population(gold, [as_of], data.cfg)[["customer_id", "cutoff_time"]]
    at_as_of = ft.calculate_features(gold, population, data.features)
    matrix = data.model_matrix()
    cutoffs = [*sorted(pd.to_datetime(matrix["cutoff_time"].unique(), utc=True)), as_of]
    buys = log[(log["amount"] > 0) & (log["ts"] <= as_of)].rename(
        columns={"customer_id": "source_key"}
    )
    extra = btyd.btyd_features(buys, cutoffs, window, customer_col="source_key")
    extra["cutoff_time"] = _utc_ns(extra["cutoff_time"])

    def joined(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.assign(
            source_key=key.reindex(frame["customer_id"]).to_numpy(),
            cutoff_time=_utc_ns(frame["cutoff_time"]),
        )
        return frame.merge(extra, on=["source_key", "cutoff_time"], how="left")

    train_rows, score_rows = joined(matrix), joined(at_as_of)
    out = {}
    for name, names in (
        ("refit_without_btyd", tuple(data.feature_names)),
        ("with_btyd_features", (*data.feature_names, *btyd.BTYD_FEATURES)),
    ):
        result = train_and_evaluate(train_rows, names, data.rfm, window, data.config)
        x = score_rows[list(names)].to_numpy(np.float32)
        p = 1.0 / (1.0 + np.exp(-result.booster.inplace_predict(x, predict_type="margin")))
        if result.calibrator is not None:
            p = result.calibrator.apply(p)
        out[name] = {
            "score": pd.Series(p, index=score_rows["source_key"].to_numpy()),
            "test_roc_auc": round(float(result.metrics["test_roc_auc"]), 4),
            "trees": int(result.n_trees),
        }
    return out


def metrics(churned: np.ndarray, score: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "roc_auc": round(float(roc_auc_score(churned, score)), 4),
        "pr_auc_churned": round(float(average_precision_score(churned, score)), 4),
        "pr_auc_returned": round(float(average_precision_score(1 - churned, -score)), 4),
        "accuracy_at_0_5": round(float(((score >= 0.5) == (churned == 1)).mean()), 4),
        "mean_score": round(float(score.mean()), 4),
    }


def auc_difference_ci(churned: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int = 0):
    """Paired customer bootstrap (BOOTSTRAP resamples) of ROC AUC(a) - ROC AUC(b): 95% bounds."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, churned.size, churned.size)
        diffs.append(roc_auc_score(churned[i], a[i]) - roc_auc_score(churned[i], b[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def run_pair(log: pd.DataFrame, as_of_text: str, window: int, btyd: bool = False) -> dict:
    as_of = pd.Timestamp(as_of_text, tz="UTC")
    work = CACHE / f"{as_of_text}_{window}d"
    shutil.rmtree(work, ignore_errors=True)
    history = log[log["ts"] < as_of]
    cutoffs = training_cutoff_count(log["ts"].min().floor("D"), as_of, window)
    config = write_project(work, history, window, cutoffs, btyd)
    seconds = {"build_all": c360ml(config, "build", "all")}
    seconds["train"] = c360ml(config, "train", "--as-of", as_of_text)
    started = time.perf_counter()
    model, registered = c360ml_scores(config, as_of)
    seconds["score"] = round(time.perf_counter() - started, 1)
    baselines = btyd_scores(history, as_of, window)
    ablation = {}
    if not btyd:
        started = time.perf_counter()
        ablation = btyd_feature_ablation(config, log, as_of, window)
        seconds["ablation"] = round(time.perf_counter() - started, 1)

    end = as_of + pd.Timedelta(days=window)
    future = log[(log["ts"] >= as_of) & (log["ts"] < end) & (log["amount"] > 0)]
    customers = model.index.intersection(baselines["bg_nbd"]["score"].index)
    if ablation:
        customers = customers.intersection(ablation["with_btyd_features"]["score"].index)
    churned = (~customers.isin(future["customer_id"].unique())).astype(int)
    scores = {"c360ml": model.reindex(customers).to_numpy()}
    scores |= {k: v["score"].reindex(customers).to_numpy() for k, v in baselines.items()}
    figures = {k: metrics(churned, s) for k, s in scores.items()}
    ablated = {
        k: metrics(churned, v["score"].reindex(customers).to_numpy()) for k, v in ablation.items()
    }
    for k, v in ablation.items():
        ablated[k] |= {"recipe_test_roc_auc": v["test_roc_auc"], "trees": v["trees"]}
    best = max(("bg_nbd", "pareto_nbd"), key=lambda k: figures[k]["roc_auc"])
    return {
        "as_of": as_of_text,
        "window_days": window,
        "label_window": f"{as_of.date()} .. {(end - pd.Timedelta(days=1)).date()}",
        "training_cutoffs": cutoffs,
        "cutoff_spacing_days": SPACING_DAYS,
        "history_rows": len(history),
        "customers_with_history": int(history["customer_id"].nunique()),
        "customers_scored": len(customers),
        "c360ml_population": len(model),
        "churn_rate": round(float(churned.mean()), 4),
        "metrics": figures,
        "best_btyd": best,
        "roc_auc_minus_best_btyd": round(
            figures["c360ml"]["roc_auc"] - figures[best]["roc_auc"], 4
        ),
        "roc_auc_minus_best_btyd_ci": auc_difference_ci(churned, scores["c360ml"], scores[best]),
        "c360ml_model": registered,
        "ablation_btyd_features": ablated or None,
        "btyd_features_in_spec": btyd,
        "model_btyd_features": model_btyd_features(config, registered["version"]),
        "btyd_params_days": {k: v["params"] for k, v in baselines.items()},
        "btyd_fit_s": {k: v["fit_s"] for k, v in baselines.items()},
        "seconds": seconds,
    }


def model_btyd_features(config: Path, version: int) -> list[str]:
    """The BTYD features the trained version kept (after feature selection)."""
    import c360ml
    from c360ml.features import FeatureSet, btyd

    bundle, _ = c360ml.open(config).model(version)
    return btyd.feature_names(FeatureSet.from_json(bundle.feature_set_json).meta)


def markdown(doc: dict, btyd_doc: dict | None = None) -> str:
    lines = [
        "## real: c360ml against BG/NBD and Pareto/NBD on CDNOW",
        "",
        "Without the BTYD features (the spec's default; the run below it has them on).",
        "",
        "`make bench STAGE=real` (`benchmarks/bench_real.py`): CDNOW's master log (23,570",
        "customers of one Q1-1997 cohort, purchases to 1998-06-30) through the generic-CSV",
        "landing, history before as_of only, `c360ml build all` and `c360ml train --as-of`;",
        "BG/NBD and Pareto/NBD (c360ml.features.btyd) fitted on the same purchase days. Scored",
        "on the same customers (c360ml's population at as_of); positive class = churned (no",
        "purchase in the window); a BTYD model's score is P(no purchase in the window).",
        "ROC AUC difference: c360ml minus the better BTYD model, 95% paired bootstrap interval.",
        "",
        "| as_of | window | cutoffs | customers | churn rate | ROC AUC c360ml / BG/NBD / "
        "Pareto/NBD | PR AUC (churned) | accuracy at 0.5 | AUC c360ml − best BTYD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        m = r["metrics"]

        lo, hi = r["roc_auc_minus_best_btyd_ci"]
        lines.append(
            f"| {r['as_of']} | {r['window_days']} d | {r['training_cutoffs']} | "
            f"{r['customers_scored']:,} | {r['churn_rate']:.3f} | {_three(m, 'roc_auc')} | "
            f"{_three(m, 'pr_auc_churned')} | {_three(m, 'accuracy_at_0_5')} | "
            f"{r['roc_auc_minus_best_btyd']:+.4f} [{lo:+.4f}, {hi:+.4f}] |"
        )
    gates = "; ".join(
        f"{r['as_of']} {r['window_days']} d: {r['c360ml_model']['gate_decision']} "
        f"(test cutoff ROC AUC {r['c360ml_model']['test_roc_auc']})"
        for r in doc["results"]
        if r.get("c360ml_model")
    )
    lines += ["", f"c360ml's champion gate on each trained version: {gates}."]
    lines += [
        "",
        "Towards BTYD features (an experiment outside the pipeline, `btyd_feature_ablation`):",
        "the built-in recipe on the same training matrix, refitted without and with the BTYD",
        "columns of `c360ml.features.btyd.btyd_features` (both models refitted at each cutoff),",
        "scored at as_of on the same customers.",
        "",
        "| as_of | window | ROC AUC without / with BTYD columns | accuracy at 0.5 without / with |",
        "|---|---|---|---|",
    ]
    for r in doc["results"]:
        a = r.get("ablation_btyd_features")
        if not a:
            continue
        off, on = a["refit_without_btyd"], a["with_btyd_features"]
        lines.append(
            f"| {r['as_of']} | {r['window_days']} d | {off['roc_auc']:.4f} / {on['roc_auc']:.4f} "
            f"| {off['accuracy_at_0_5']:.4f} / {on['accuracy_at_0_5']:.4f} |"
        )
    lines += ["", f"{doc['date']}, `{doc['command']}`."]
    if btyd_doc is not None:
        lines += ["", *btyd_markdown(btyd_doc, doc)]
    return "\n".join(lines) + "\n"


def btyd_markdown(doc: dict, without: dict) -> list[str]:
    """The run with the BTYD candidate features in the spec (`btyd: {enabled: true}`), beside
    the run `without` them."""
    before = {(r["as_of"], r["window_days"]): r for r in without["results"]}
    lines = [
        "### With the BTYD features in the pipeline (`btyd: {enabled: true}`)",
        "",
        "The same stage with the spec's BTYD candidates on: BG/NBD and Pareto/NBD refitted at",
        "each training cutoff on the population's purchase days up to it, and at as_of when",
        'scoring; feature selection and the recipe as above. "kept": the BTYD features the',
        'trained version carries; "train s": wall seconds of `c360ml train` with / without',
        "them (on a machine shared with other runs: the load differed between the runs).",
        "",
        "| as_of | window | ROC AUC c360ml / BG/NBD / Pareto/NBD | c360ml ROC AUC without "
        "BTYD features | accuracy at 0.5 | AUC c360ml − best BTYD | BTYD features kept | "
        "train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        m = r["metrics"]

        lo, hi = r["roc_auc_minus_best_btyd_ci"]
        kept = len(r.get("model_btyd_features") or [])
        off = before.get((r["as_of"], r["window_days"]))
        auc_off = f"{off['metrics']['c360ml']['roc_auc']:.4f}" if off else "–"
        train_off = off["seconds"]["train"] if off else "–"
        lines.append(
            f"| {r['as_of']} | {r['window_days']} d | {_three(m, 'roc_auc')} | {auc_off} | "
            f"{_three(m, 'accuracy_at_0_5')} | {r['roc_auc_minus_best_btyd']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] | {kept} of 8 | {r['seconds']['train']} / {train_off} |"
        )
    return [*lines, "", f"{doc['date']}, `{doc['command']}`."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs",
        default=",".join(f"{a}:{w}" for a, w in PAIRS),
        help="as_of:window_days pairs, comma separated",
    )
    parser.add_argument(
        "--btyd",
        action="store_true",
        default=os.environ.get("BENCH_REAL_BTYD") == "1",
        help="the spec's BTYD candidate features on (also BENCH_REAL_BTYD=1)",
    )
    args = parser.parse_args()
    log = read_cdnow()
    results = []
    for item in args.pairs.split(","):
        as_of, window = item.split(":")
        print(f"real: as_of {as_of}, window {window} d", file=sys.stderr, flush=True)
        results.append(run_pair(log, as_of, int(window), args.btyd))
        print(json.dumps(results[-1]["metrics"]), file=sys.stderr, flush=True)
    command = " ".join(["python benchmarks/bench_real.py", *sys.argv[1:]])
    if not sys.argv[1:]:
        command = "make bench STAGE=real"
        command = f"BENCH_REAL_BTYD=1 {command}" if args.btyd else command
    doc = {"date": time.strftime("%Y-%m-%d"), "command": command, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "real_btyd.json" if args.btyd else "real.json"
    (RESULTS / name).write_text(json.dumps(doc, indent=1) + "\n")
    runs = [RESULTS / n for n in ("real.json", "real_btyd.json")]
    if runs[0].exists():  # both runs in real.md: each run keeps the other's figures
        other = json.loads(runs[1].read_text()) if runs[1].exists() else None
        (RESULTS / "real.md").write_text(markdown(json.loads(runs[0].read_text()), other))
        print((RESULTS / "real.md").read_text())


if __name__ == "__main__":
    main()
