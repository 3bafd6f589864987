"""Training pipeline: `python pipelines/train.py --as-of 2025-12-31 [--tune N] [--sample-rate R]`.

Thin wiring around `c360ml.model.pipeline.run_training`, which does, in order:
training_cutoffs -> read_ordering_customers (customer ids only) -> customer sample under the
caps -> read_gold (the sampled customers only) -> compute_labels -> derive_feature_set ->
calculate_features (population = the labelled rows) -> select_features (training rows
only) -> train and evaluate (out-of-time splits, baselines, grade) -> log to MLflow ->
register -> gate.
`c360ml train` is the same command: this file passes its arguments on to it.
"""

from __future__ import annotations

import sys

from c360ml.cli import main

if __name__ == "__main__":
    # The same command as `c360ml train`: its options, output, log file and exit codes.
    sys.exit(main(["train", *sys.argv[1:]]))
