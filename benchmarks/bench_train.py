"""Scale benchmark of training and of scoring with explanations.

`run(settings, as_of, out_dir)` trains on the lake named by `settings` (into a throwaway
MLflow store under out_dir, so the real registry is untouched) and then times the one
scoring function on the trained model: no explanations, Saabas ("approx") and TreeSHAP
("exact"), extrapolated to 1M customers. Peak RSS is this process's.

    .venv/bin/python benchmarks/bench_train.py --as-of 2025-12-31 [--lake data/lake]

Without a gold lake, `--synthetic N` uses the features benchmark's synthetic gold.
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

from c360ml.config import Settings, load_settings

log = logging.getLogger("bench_train")
HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scoring_rates(bundle, request: pd.DataFrame) -> list[dict]:
    """Rows/s of score() per explain method on a request tiled to a useful size."""
    from c360ml.model.scoring import score

    out = []
    for explain, rows in (("none", 200_000), ("approx", 200_000), ("exact", 20_000)):
        reps = int(np.ceil(rows / len(request)))
        frame = pd.concat([request] * reps, ignore_index=True).head(rows)
        frame["CustomerId"] = [f"b{i}" for i in range(len(frame))]
        started = time.perf_counter()
        score(bundle, frame, explain=explain)
        seconds = time.perf_counter() - started
        out.append(
            {
                "measure": f"score explain={explain}",
                "rows": len(frame),
                "seconds": round(seconds, 2),
                "rows_per_s": round(len(frame) / seconds),
                "minutes_per_1m": round(1e6 / (len(frame) / seconds) / 60, 2),
                "trees": bundle.booster.num_boosted_rounds(),
                "features": len(bundle.feature_names),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            }
        )
        log.info("%s", out[-1])
    return out


def run(settings: Settings, as_of: pd.Timestamp, out_dir: Path) -> list[dict]:
    """Time run_training and scoring; write out_dir/train.json; return the records."""
    import mlflow

    from c360ml.model.pipeline import run_training

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_settings = settings.model_copy(
        update={"mlflow_tracking_uri": "", "mlflow_dir": out_dir / "mlflow"}
    )
    started = time.perf_counter()
    summary = run_training(bench_settings, as_of)
    wall = time.perf_counter() - started
    records = [
        {
            "measure": "run_training",
            "seconds": round(wall, 1),
            **{k: round(v, 1) for k, v in summary.seconds.items()},
            "rows": sum(summary.split_rows.values()),
            "test_rows": summary.split_rows["test"],
            "sample_rate": summary.sample_rate,
            "test_sample_rate": summary.test_sample_rate,
            "features": summary.n_features,
            "trees": summary.n_trees,
            "roc_auc": round(summary.roc_auc, 4),
            "grade": summary.grade,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        }
    ]
    log.info("%s", records[0])
    mlflow.set_tracking_uri(bench_settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{summary.model_version}")
    bundle = model.unwrap_python_model().bundle
    rng = np.random.default_rng(0)
    request = pd.DataFrame(
        rng.normal(size=(1000, len(bundle.feature_names))).astype(np.float32),
        columns=list(bundle.feature_names),
    )
    request.insert(0, "CustomerId", [f"r{i}" for i in range(len(request))])
    records += _scoring_rates(bundle, request)
    (out_dir / "train.json").write_text(json.dumps(records, indent=1))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--as-of", required=True)
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic gold customers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings()
    if args.lake:
        settings = settings.model_copy(update={"lake_root": args.lake.resolve()})
    if args.synthetic:
        from dataclasses import fields

        from c360ml.features import GoldTables
        from c360ml.features.gold import GOLD_TABLES
        from c360ml.storage.lake import Lake

        sys.path.insert(0, str(HERE))
        from bench_features import make_synthetic_gold

        # The benchmark's stand-in for a built lake: the synthetic frames as gold tables.
        gold = make_synthetic_gold(args.synthetic, seed=0)
        lake = Lake(args.out.resolve() / "synthetic_lake")
        for f in fields(GoldTables):
            lake.write(getattr(gold, f.name), "gold", GOLD_TABLES[f.name][0], mode="overwrite")
        del gold
        settings = settings.model_copy(update={"lake_root": lake.root})
    for record in run(settings, pd.Timestamp(args.as_of, tz="UTC"), args.out):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
