"""Label scale: compute_labels for 1M customers x 12 cutoffs on a synthetic gold
(benchmarks/bench_features.make_synthetic_gold), 3 runs each of the numpy reference
(features.labels) and of the SQL (features.asof, DuckDB over the same frames), interleaved;
medians to results/labels.json. The SQL's labels are checked equal to the reference's.

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

from c360ml.features import asof, compute_labels, load_churn_config, training_cutoffs

cfg = load_churn_config(Path("features/retention.yaml"))
gold = make_synthetic_gold(1_000_000, seed=0, lines=False)
cutoffs = training_cutoffs(cfg, pd.Timestamp("2025-12-31", tz="UTC"))
walls: dict[str, list[float]] = {"numpy": [], "sql": []}
for _ in range(3):
    t = time.perf_counter()
    labels = compute_labels(gold, cutoffs, cfg)
    walls["numpy"].append(time.perf_counter() - t)
    t = time.perf_counter()
    sql = asof.compute_labels(gold, cutoffs, cfg)  # registers the frames, then the SQL
    walls["sql"].append(time.perf_counter() - t)
    pd.testing.assert_frame_equal(sql, labels)
out = {
    "date": time.strftime("%Y-%m-%d"),
    "command": "python benchmarks/bench_labels.py",
    "customers": 1_000_000,
    "orders": len(gold.orders),
    "cutoffs": len(cutoffs),
    "label_rows": len(labels),
    "wall_s_runs": [round(w, 2) for w in walls["numpy"]],
    "wall_s_median": round(statistics.median(walls["numpy"]), 2),
    "sql_wall_s_runs": [round(w, 2) for w in walls["sql"]],
    "sql_wall_s_median": round(statistics.median(walls["sql"]), 2),
    "sql_equal": True,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}
Path("benchmarks/results/labels.json").write_text(json.dumps(out, indent=1))
print(out)
