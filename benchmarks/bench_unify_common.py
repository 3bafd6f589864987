"""The name rule's term-frequency test (`common`, #32) at several thresholds, on one lake.

`python benchmarks/bench_unify_common.py SIZE [--lake DIR --truth DIR] [--max-expected ...]`
matches the records of the benchmark's silver work lake of SIZE (run.py's cache; or a lake
and truth given, e.g. one made by an older generator) with the rules of pipelines/unify.yaml,
then with the `common` test of pipelines/unify.yaml at each max_expected, and writes
pair precision and recall against the generator's truth, and the name rule's pairs and
their precision per value-frequency band, to benchmarks/results/unify_common.json.
Frequencies are counted once from the records, as a first build counts them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import ROOT, labels_quality, silver_settings, truth_labels  # noqa: E402

from c360ml.config import Settings  # noqa: E402
from c360ml.medallion.unify import (  # noqa: E402
    UnifyRules,
    cluster,
    frequency_fields,
    load_rules,
    match_rule,
    prepare_records,
    read_records,
    value_frequencies,
)
from c360ml.storage.lake import Lake  # noqa: E402


def with_threshold(rules: UnifyRules, max_expected: float) -> UnifyRules:
    """`rules` with each `common` test's max_expected set."""
    changed = [
        r.model_copy(update={"common": r.common.model_copy(update={"max_expected": max_expected})})
        if r.common is not None
        else r
        for r in rules.rules
    ]
    return rules.model_copy(update={"rules": changed})


def evaluate(records, truth: np.ndarray, rules: UnifyRules, frequencies) -> dict:
    """Precision and recall of the rules' clusters; per rule with `common`, by band."""
    started = time.perf_counter()
    pairs = [
        match_rule(
            records, r, rules.junk_max_records, rules.max_block_size, frequencies=frequencies
        )
        for r in rules.rules
    ]
    out = labels_quality(cluster(len(records), pairs), truth)
    out["match_s"] = round(time.perf_counter() - started, 2)
    for p in (p for p in pairs if p.common is not None):
        known = (truth[p.left] >= 0) & (truth[p.right] >= 0)
        right = truth[p.left] == truth[p.right]
        out[p.rule] = {
            band: {
                "pairs": int(mask.sum()),
                "pair_precision": round(float(right[mask & known].mean()), 4)
                if (mask & known).any()
                else None,
            }
            for band, mask in (("common", p.common), ("rare", ~p.common))
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", help="customers of run.py's cached lake, or a label with --lake")
    parser.add_argument("--lake", type=Path, help="a lake with silver built")
    parser.add_argument("--truth", type=Path, help="the generator's truth of that lake")
    parser.add_argument("--max-expected", default="0.05,0.01,0.005,0.002")
    args = parser.parse_args()
    if args.lake is not None:
        settings = Settings(root=ROOT, lake_root=args.lake, truth_root=args.truth)
    else:
        settings = silver_settings(int(args.size))
    base = load_rules(HERE / "unify_without_common.yaml")
    common = load_rules(ROOT / "pipelines" / "unify.yaml")
    records = prepare_records(read_records(Lake(settings.lake), settings).to_pandas())
    truth = truth_labels(settings, records)
    frequencies = value_frequencies(records, frequency_fields(common))
    runs = [
        {"rules": "benchmarks/unify_without_common.yaml", **evaluate(records, truth, base, None)}
    ]
    for max_expected in (float(x) for x in args.max_expected.split(",")):
        rules = with_threshold(common, max_expected)
        runs.append({"max_expected": max_expected, **evaluate(records, truth, rules, frequencies)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out = HERE / "results" / "unify_common.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.size] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["benchmarks/bench_unify_common.py", *sys.argv[1:]]),
        "records": len(records),
        "runs": runs,
    }
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
