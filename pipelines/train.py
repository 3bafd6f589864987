"""Training pipeline: `python pipelines/train.py --as-of 2025-12-31 [--tune N] [--sample-rate R]`.

Thin wiring around `c360ml.model.pipeline.run_training`, which does, in order:
training_cutoffs -> read_ordering_customers (customer ids only) -> customer sample under the
caps -> read_gold (the sampled customers only) -> compute_labels -> derive_feature_set ->
calculate_features (population = the labelled rows) -> select_features (training rows
only) -> train and evaluate (out-of-time splits, baselines, grade) -> log to MLflow ->
register -> gate.
`c360ml train` calls the same function.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from c360ml.config import load_settings
from c360ml.model.pipeline import TrainSummary, run_training

log = logging.getLogger("pipelines.train")


def main(argv: list[str] | None = None) -> TrainSummary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--as-of", required=True, help="trained_as_of, a UTC date YYYY-MM-DD")
    parser.add_argument("--tune", type=int, default=0, help="Optuna trials (needs optuna)")
    parser.add_argument("--sample-rate", type=float, default=None, help="training customers")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    summary = run_training(
        load_settings(), pd.Timestamp(args.as_of, tz="UTC"), args.tune, args.sample_rate
    )
    width = max(len(r["item"]) for r in summary.rows())
    for row in summary.rows():
        log.info("%s  %s", row["item"].ljust(width), row["value"])
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        sys.exit(2)
