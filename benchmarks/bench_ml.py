"""Stages of `make bench` after gold: features, train and the full refresh, on the cached
lake of one size (benchmarks/cache/<size>/, built by the generate and medallion stages).

Each function runs inside the harness's per-(stage, size) subprocess, so its peak RSS is
its own. The demo as_of (2025-12-31) is the generator's default history end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

AS_OF = pd.Timestamp("2025-12-31", tz="UTC")


def features(settings, out_dir: Path) -> dict:
    """Labels and the Featuretools matrix for all active customers x 12 cutoffs."""
    from bench_features import run

    from c360ml.features import read_gold
    from c360ml.storage.lake import Lake

    gold = read_gold(Lake(settings.lake))
    return {"runs": run(gold, AS_OF, out_dir, repeats=1)}


def train(settings, out_dir: Path, config=None) -> dict:
    """`c360ml train` into the cached lake's own MLflow store (the refresh stage uses it).

    `config` (a TrainConfig) overrides the defaults, e.g. a forced customer cap; the
    default caps sample customers above 100k (training) / 200k (test cutoff). Model - RFM
    ROC AUC and the headroom closed, (AUC_model - AUC_RFM) / (AUC_oracle - AUC_RFM), with
    their 95% intervals are the training's own (evaluate.bootstrap_intervals on the test
    cutoff, via the summary); the headroom is None on a lake without an oracle."""
    from c360ml.model.pipeline import run_training

    started = time.perf_counter()
    summary = run_training(settings, AS_OF, config=config)
    return {
        "train_s": round(time.perf_counter() - started, 1),
        "steps_s": {k: round(v, 1) for k, v in summary.seconds.items()},
        "sample_rate": summary.sample_rate,
        "test_sample_rate": summary.test_sample_rate,
        "rows": summary.split_rows,
        "features": summary.n_features,
        "trees": summary.n_trees,
        "roc_auc": round(summary.roc_auc, 4),
        "rfm_roc_auc": round(summary.rfm_roc_auc, 4),
        "oracle_roc_auc": summary.oracle_roc_auc and round(summary.oracle_roc_auc, 4),
        "roc_auc_minus_rfm": round(summary.roc_auc_minus_rfm, 4),
        "roc_auc_minus_rfm_ci": _rounded(summary.roc_auc_minus_rfm_ci),
        "headroom_closed": _rounded(summary.headroom_closed),
        "headroom_closed_ci": _rounded(summary.headroom_closed_ci),
        "grade": summary.grade,
        "gate": summary.gate_label,
        "gate_path": summary.gate_path,  # a repeated run retrains at the same as_of: recipe
    }


def _rounded(value):
    """A figure or an interval to 4 decimals (None stays None; an interval becomes a list)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return [round(float(v), 4) for v in value]
    return round(float(value), 4)


def refresh(settings, out_dir: Path) -> dict:
    """A refresh after one new weekly sync: the increment through gold, then measures,
    snapshot, scores of every profile, export and report.

    The increment is generated before the clock starts; the scores, snapshot and measures
    tables are dropped first, so the step really re-scores every profile.
    """
    from c360ml.refresh import run_refresh
    from c360ml.report import build_report
    from c360ml.storage.lake import Lake
    from c360ml.synth import generate_increment

    lake = Lake(settings.lake)
    increment_rows = sum(r["rows"] for r in generate_increment(settings).rows())
    for table in ("churn_scores", "customer_features", "customer_measures"):
        if lake.exists("gold", table):
            import shutil

            shutil.rmtree(lake.path("gold", table))
    started = time.perf_counter()
    summary = run_refresh(settings, report=build_report)
    return {
        "refresh_s": round(time.perf_counter() - started, 1),
        "increment_landing_rows": increment_rows,
        "steps_s": {s.step: round(s.seconds, 1) for s in summary.items},
        "profiles": summary.status_counts,
        "risk": summary.risk_counts,
    }
