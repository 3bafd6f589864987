"""Label scale: compute_labels for 1M customers x 12 cutoffs on a synthetic gold
(benchmarks/bench_features.make_synthetic_gold), 3 runs, median to results/labels.json.

    .venv/bin/python benchmarks/bench_labels.py
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, "benchmarks")
from bench_features import make_synthetic_gold

from c360ml.features import compute_labels, load_churn_config, training_cutoffs

cfg = load_churn_config(Path("features/retention.yaml"))
gold = make_synthetic_gold(1_000_000, seed=0, lines=False)
cutoffs = training_cutoffs(cfg, pd.Timestamp("2025-12-31", tz="UTC"))
walls = []
for _ in range(3):
    t = time.perf_counter()
    labels = compute_labels(gold, cutoffs, cfg)
    walls.append(time.perf_counter() - t)
out = {
    "date": time.strftime("%Y-%m-%d"),
    "command": "python benchmarks/bench_labels.py",
    "customers": 1_000_000,
    "orders": len(gold.orders),
    "cutoffs": len(cutoffs),
    "label_rows": len(labels),
    "wall_s_runs": [round(w, 2) for w in walls],
    "wall_s_median": round(statistics.median(walls), 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}
Path("benchmarks/results/labels.json").write_text(json.dumps(out, indent=1))
print(out)
