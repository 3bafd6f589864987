"""Benchmarks: `make bench [STAGE=generate|medallion|features|train|all] [SIZES=100000,1000000]`.

Each (stage, size) runs in a fresh subprocess so its peak RSS is its own; lakes are
generated once per size under benchmarks/cache/<size>/ and reused by later stages.
Figures (medians of the repeats) are written to benchmarks/results/<stage>.json and
appended to benchmarks/results/README.md with the date and the command.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
STAGES = ("generate", "medallion", "features", "train")


def settings_for(size: int):
    from c360ml.config import Settings

    return Settings(
        root=ROOT,
        lake_root=CACHE / str(size) / "lake",
        truth_root=CACHE / str(size) / "truth",
        mlflow_dir=CACHE / str(size) / "mlflow",
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_generate(size: int) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_generate import run

    return {"runs": run([size], RESULTS, CACHE)}


def work_settings(size: int):
    """Settings of a scratch copy of the cached lake: landing hard-linked (the generator
    only adds files to it), truth copied (an increment rewrites its pending rows), so a
    run can add an increment without changing the cache that later runs start from."""
    import shutil

    cached = settings_for(size)
    if not (cached.lake / "landing").exists():
        raise SystemExit(f"no cached lake for {size}: run STAGE=generate first")
    work = CACHE / str(size) / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "lake").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(cached.lake / "landing"), str(work / "lake")], check=True)
    shutil.copytree(cached.truth, work / "truth")
    return cached.model_copy(update={"lake_root": work / "lake", "truth_root": work / "truth"})


def timed_build(settings) -> dict:
    """ingest, silver, unify, gold: seconds per step, plus the per-table detail."""
    from c360ml.medallion.build import build_gold, build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing

    out: dict = {}
    detail: dict = {}
    for name, fn in (
        ("ingest", ingest_landing),
        ("silver", build_silver),
        ("unify", build_unify),
        ("gold", build_gold),
    ):
        started = time.perf_counter()
        summary = fn(settings)
        out[name] = round(time.perf_counter() - started, 2)
        if name == "ingest":
            detail[name] = {f"{r['source']}/{r['table']}": r["seconds"] for r in summary.rows()}
        elif name in ("silver", "gold"):
            detail[name] = {r["table"]: r["seconds"] for r in summary.rows()}
        print(f"  {name}: {out[name]} s, rss {peak_rss_mb():.0f} MB", file=sys.stderr, flush=True)
    out["total"] = round(sum(out.values()), 2)
    out["detail"] = detail
    return out


def stage_medallion(size: int) -> dict:
    """Full bronze -> gold build, then a ~1% increment and the incremental refresh."""
    from c360ml.lake import Lake
    from c360ml.synth import generate_increment

    settings = work_settings(size)
    lake = Lake(settings.lake)
    full = timed_build(settings)
    orders = lake.dataset("gold", "orders").count_rows()
    lines = lake.dataset("gold", "order_lines").count_rows()
    bronze_rows = sum(lake.dataset("bronze", *p).count_rows() for p in lake.tables("bronze"))
    increment = generate_increment(settings)
    increment_rows = sum(r["rows"] for r in increment.rows())
    incremental = timed_build(settings)
    return {
        "full": full,
        "incremental": incremental,
        "bronze_rows": bronze_rows,
        "increment_landing_rows": increment_rows,
        "gold_orders": orders,
        "gold_order_lines": lines,
        "incremental_share": round(incremental["total"] / full["total"], 3),
    }


def one(stage: str, size: int) -> None:
    """Child process: run one stage at one size, print JSON with the peak RSS."""
    started = time.perf_counter()
    result = globals()[f"stage_{stage}"](size)
    result.update(
        stage=stage,
        size=size,
        wall_s=round(time.perf_counter() - started, 2),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="all")
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "SIZE"))
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]))
        return
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        results = []
        for size in (int(s) for s in args.sizes.split(",")):
            runs = []
            for _ in range(args.repeats):
                # stderr is inherited: the child's progress lines show as it runs
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", stage, str(size)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"benchmark {stage} at {size} failed")
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                runs.append(json.loads(line[len("RESULT ") :]))
            median = {
                "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            }
            results.append({"size": size, **median, "runs": runs})
            print(json.dumps(results[-1], indent=1))
        (RESULTS / f"{stage}.json").write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(sys.argv),
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
