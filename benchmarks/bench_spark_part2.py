"""The features and refresh stages on Spark beside DuckDB (`make bench STAGE=features,refresh
ENGINE=spark SIZES=...`): time, the driver's memory and the engines' agreement (#28).

Per size, from the stages' ML lake (benchmarks/cache/<size>-v<version>/ml, built through
gold first if missing; the refresh needs the champion the train stage registered there):

- features: training's frames as `c360ml train --engine X` computes them
  (`c360ml.model.pipeline.prepare_training` at the bench as_of, default caps: every
  customer up to 100k, a sample above): labels, RFM, the candidate definitions, the
  matrix of the sampled population and the feature selection. The truth is hidden from
  it (the reference model's figures read the lake in pandas, which is neither engine's
  work). DuckDB runs in the child itself (and its `refresh_workers` processes), Spark in
  Sail; either way only the labels, RFM and the sampled matrix reach the child;
- refresh: what the refresh stage does (`bench_ml.refresh`): one weekly increment, then
  the whole refresh with the engine (ingest on DuckDB, silver/unify/gold, the snapshot,
  the scores, the export, outcomes and drift on Spark for the Spark engine, the report
  in the driver). Besides the whole child's peak, the driver's high-water mark before
  the measures-and-scores step and before the report (the marks of
  spark_refresh_memory.py), so the steps that read tables into the driver are told apart.

Each run is a fresh child process (`--child STAGE ENGINE RUN [REMOTE]`) on its own copy
of the lake (hard links; truth and MLflow store copied: `bench_compare.run_dir`), so its
VmHWM is its own: for Spark that is the driver, c360ml's side of Spark Connect. The Sail
server and the order of the runs are those of bench_spark.py: one server per (stage,
size), its peak reset before each Spark run (and its process tree's RSS sampled, should
it start workers of its own), one untimed warm-up of each engine below 1M, then duckdb,
spark, duckdb, spark, ...

Agreement: the first run of each engine keeps its output beside the runs (after its
peak is read): features, the sample, the labels of the sampled rows and the definitions
compared exactly, RFM and the matrix by the largest relative difference (differences
within 1e-9 count as none: sums that cancel leave residues of either sign), count-like
features (count, num_unique) exactly; refresh, this as_of's churn_scores: the same
customers and statuses, ChurnScore's largest absolute difference, the customers whose
ChurnScore differs by more than 1e-5 (the first 20 listed, with both scores and risk
levels) and the share of IsChurn and RiskLevel that agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from bench_compare import _has_champion, _tree_rss_kb, run_dir
from bench_spark import ROOT, Sail, code_under, reset_peak, settings_at, status_mb
from lake_cache import size_dir

HERE = Path(__file__).resolve().parent
ENGINES = ("duckdb", "spark")
STAGES = ("features", "refresh")
ACCEPT_GROWTH = 1.5  # #28: the Spark driver's peak from the smallest size to the largest


def base_lake(size: int, stage: str) -> Path:
    """The stages' ML lake of `size` (built through gold when missing, as run.py does)."""
    base = size_dir(size) / "ml"
    if not (base / "lake" / "gold" / "orders").exists():
        subprocess.run([sys.executable, str(HERE / "run.py"), "--build-ml", str(size)], check=True)
    code = Path(os.environ.get("BENCH_ROOT", ROOT))
    if stage == "refresh" and not _has_champion(base, code):
        raise SystemExit(f"no champion in {base}: run STAGE=train SIZES={size} first")
    return base


# ---------------------------------------------------------------- children


def _settings(stage: str, engine: str, run: Path, remote: str):
    settings = settings_at(run / "lake", engine=engine, spark_remote=remote)
    hidden = run / "no-truth" if stage == "features" else settings.truth_root
    return settings.model_copy(update={"truth_root": hidden, "reports_dir": run / "reports"})


def _session_seconds(settings) -> float:
    """Spark Connect's session opened first (the stage reuses it), timed apart."""
    if settings.engine != "spark":
        return 0.0
    from c360ml.spark import spark_session

    started = time.perf_counter()
    spark_session(settings.spark_remote)
    return round(time.perf_counter() - started, 2)


def features_child(settings, keep: Path | None) -> dict:
    import bench_ml

    from c360ml.model.pipeline import prepare_training

    started = time.perf_counter()
    data = prepare_training(settings, bench_ml.AS_OF)
    seconds = {k.removesuffix("_seconds"): round(v, 2) for k, v in data.seconds.items()}
    figures = {
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 2)},
        "peak_rss_mb": round(status_mb("self", "VmHWM"), 1),
        "sample_rate": data.sample_rate,
        "test_sample_rate": data.test_sample_rate,
        "matrix_rows": len(data.matrix),
        "candidates": len(data.candidates.names),
        "features": len(data.features.names),
    }
    if keep is not None:
        from c360ml.features.dfs import _aggregate, _load

        keep.mkdir(parents=True)
        counts = [
            f.get_name()
            for f in _load(data.candidates)
            if getattr(_aggregate(f), "primitive", None) in ("count", "num_unique")
        ]
        data.matrix.to_parquet(keep / "matrix.parquet")
        data.rfm.to_parquet(keep / "rfm.parquet")
        (keep / "definitions.json").write_text(
            json.dumps(
                {
                    "candidates": data.candidates.names,
                    "definitions": data.candidates.definitions_json,
                    "features": data.features.names,
                    "dropped": data.dropped,
                    "counts": counts,
                    "rates": [data.sample_rate, data.test_sample_rate],
                },
                default=str,
            )
        )
    return figures


def refresh_child(settings, keep: Path | None) -> dict:
    import bench_ml

    from c360ml import refresh, report

    marks = {}
    scoring, building = refresh.measures_and_scores, report.build_report

    def measures_and_scores(*args, **kwargs):
        marks["before_scoring"] = round(status_mb("self", "VmHWM"), 1)
        out = scoring(*args, **kwargs)
        marks["after_scoring"] = round(status_mb("self", "VmHWM"), 1)
        return out

    def build_report(*args, **kwargs):  # the report reads the lake's tables itself
        marks["before_report"] = round(status_mb("self", "VmHWM"), 1)
        return building(*args, **kwargs)

    refresh.measures_and_scores, report.build_report = measures_and_scores, build_report
    figures = bench_ml.refresh(settings, HERE / "results")
    figures["peak_rss_mb"] = round(status_mb("self", "VmHWM"), 1)
    figures["peak_rss_marks_mb"] = marks
    figures["seconds"] = {**figures.pop("steps_s"), "total": figures.pop("refresh_s")}
    if keep is not None:
        from c360ml.storage.lake import Lake

        columns = ["CustomerId", "ScoredAsOf", "ScoreStatus", "ChurnScore", "IsChurn", "RiskLevel"]
        scores = Lake(settings.lake).read_pandas("gold", "churn_scores", columns=columns)
        scores = scores[scores["ScoredAsOf"] == scores["ScoredAsOf"].max()]
        keep.mkdir(parents=True)
        scores.to_parquet(keep / "scores.parquet")
    return figures


def child(stage: str, engine: str, run: Path, remote: str = "") -> None:
    """Child process: one run of `stage` by `engine` on the lake under `run`; prints its
    figures as JSON (`keep` set by the parent: where its output is kept for agreement)."""
    settings = _settings(stage, engine, run, remote)
    session_s = _session_seconds(settings)
    keep = Path(os.environ["BENCH_KEEP"]) if os.environ.get("BENCH_KEEP") else None
    figures = (features_child if stage == "features" else refresh_child)(settings, keep)
    figures.update(
        engine=engine,
        session_s=session_s,
        # DuckDB's refresh_workers (a Spark driver starts none)
        children_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    )
    print("RESULT " + json.dumps(figures, default=str), flush=True)
    os._exit(0)  # the Spark Connect client's threads would keep the process alive


# ---------------------------------------------------------------- the parent


class TreePeak:
    """The peak of a process tree's summed RSS, sampled from /proc while in the block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self._done = pid, 0, threading.Event()

    def __enter__(self) -> TreePeak:
        def sample() -> None:
            while not self._done.wait(0.5):
                with contextlib.suppress(OSError):
                    self.peak_kb = max(self.peak_kb, _tree_rss_kb(self.pid))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def one_run(stage: str, engine: str, base: Path, work: Path, sail: Sail) -> dict:
    run = run_dir(base, work, stage)
    keep = work / "kept" / engine
    env = dict(os.environ, BENCH_KEEP="" if keep.exists() else str(keep))
    args = [sys.executable, __file__, "--child", stage, engine, str(run)]
    if engine == "spark":
        args.append(sail.remote)
        server_reset = reset_peak(sail.proc.pid)
        server_before = status_mb(sail.proc.pid, "VmRSS")
    load = os.getloadavg()[0]  # other work on the machine, for the reader of the figures
    started = time.perf_counter()
    with TreePeak(sail.proc.pid) as tree:
        done = subprocess.run(args, stdout=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the {stage} on {engine} failed (exit {done.returncode})")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result.update(process_wall_s=round(wall, 2), load_1min_before=round(load, 2))
    if engine == "spark":
        result["server_rss_before_mb"] = round(server_before, 1)
        result["server_peak_rss_mb"] = round(status_mb(sail.proc.pid, "VmHWM"), 1)
        result["server_peak_reset"] = server_reset
        result["server_tree_peak_rss_mb"] = round(tree.peak_kb / 1024, 1)
    print(
        f"  {stage} {engine}: {result['seconds']}, driver peak {result['peak_rss_mb']:.0f} MB"
        + (f", Sail peak {result['server_peak_rss_mb']:.0f} MB" if engine == "spark" else ""),
        file=sys.stderr,
        flush=True,
    )
    return result


def run(stage: str, size: int, repeats: int = 3, warm_up: bool = True) -> dict:
    """`stage` by DuckDB and by Spark (Sail, local mode) on copies of the same lake: one
    untimed warm-up of each unless `warm_up` is off, then interleaved; the figures per
    engine and the engines' agreement."""
    work = size_dir(size) / "spark_part2"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env, code = code_under(work)
    os.environ.update(env)  # for every child from here on
    base = base_lake(size, stage)
    sail = Sail()
    try:
        warm = [one_run(stage, e, base, work, sail) for e in ENGINES if warm_up]
        runs = [one_run(stage, e, base, work, sail) for _ in range(repeats) for e in ENGINES]
    finally:
        sail.stop()
    agreement = (features_agreement if stage == "features" else scores_agreement)(
        work / "kept" / "duckdb", work / "kept" / "spark"
    )
    shutil.rmtree(work)
    return {
        "stage": stage,
        "size": size,
        "repeats": repeats,
        **code,
        "versions": {p: version(p) for p in ("pysail", "pyspark", "duckdb", "deltalake")},
        **summarise(runs),
        "agreement": agreement,
        "warm_up": warm,
        "runs": runs,
    }


def summarise(runs: list[dict]) -> dict:
    """Per engine: medians of each step's seconds, the runs' totals, the peaks (max)."""
    out = {}
    for engine in ENGINES:
        mine = [r for r in runs if r["engine"] == engine]
        steps = [k for k in mine[0]["seconds"] if all(k in r["seconds"] for r in mine)]
        out[engine] = {
            "seconds_median": {
                k: round(statistics.median(r["seconds"][k] for r in mine), 2) for k in steps
            },
            "total_s_runs": [r["seconds"]["total"] for r in mine],
            "driver_peak_rss_mb_max": max(r["peak_rss_mb"] for r in mine),
            "children_peak_rss_mb_max": max(r["children_peak_rss_mb"] for r in mine),
        }
        if mine[0].get("peak_rss_marks_mb"):
            out[engine]["driver_marks_mb_max"] = {
                k: max(r["peak_rss_marks_mb"].get(k, 0) for r in mine)
                for k in mine[0]["peak_rss_marks_mb"]
            }
    spark = [r for r in runs if r["engine"] == "spark"]
    out["spark"].update(
        session_s_median=round(statistics.median(r["session_s"] for r in spark), 2),
        server_peak_rss_mb_max=max(r["server_peak_rss_mb"] for r in spark),
        server_tree_peak_rss_mb_max=max(r["server_tree_peak_rss_mb"] for r in spark),
    )
    return out


ATOL, RTOL = 1e-9, 1e-6  # tests/spark's tolerance of a non-count feature
SCORE_ATOL = 1e-5  # #28: ChurnScore within this of DuckDB's
LISTED = 20  # customers listed whose ChurnScore differs by more


def _relative(a, b):
    """|a - b| / max(|a|, |b|) per row, 0 where the two are within ATOL (a sum that
    cancels to about zero leaves residues of either sign, whose ratio says nothing) or
    both NaN, inf where only one is NaN."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(np.abs(a - b) <= ATOL, 0.0, np.abs(a - b) / scale)
    both_nan = np.isnan(a) & np.isnan(b)
    one_nan = np.isnan(a) ^ np.isnan(b)
    return np.where(both_nan, 0.0, np.where(one_nan, np.inf, rel))


def _columns_agreement(duck, spark, columns: list[str], exact: set[str]) -> dict:
    """The largest relative difference over `columns` (which column), how many values
    are beyond the tests' tolerance (RTOL), and how many of the count-like ones (`exact`)
    differ at all."""
    worst, where, count_rows, beyond = 0.0, None, 0, 0
    for name in columns:
        a, b = spark[name].to_numpy(float), duck[name].to_numpy(float)
        rel = _relative(a, b)
        if name in exact:
            count_rows += int(((a != b) & ~(np.isnan(a) & np.isnan(b))).sum())
            continue
        beyond += int((rel > RTOL).sum())
        if len(rel) and rel.max() > worst:
            worst, where = float(rel.max()), name
    return {
        "max_relative_difference": worst,
        "worst_column": where,
        "values_beyond_rtol": beyond,
        "count_like_columns": len([c for c in columns if c in exact]),
        "count_like_values_differing": count_rows,
    }


def features_agreement(duck_dir: Path, spark_dir: Path) -> dict:
    import pandas as pd

    keys = ["customer_id", "cutoff_time"]
    duck_defs = json.loads((duck_dir / "definitions.json").read_text())
    spark_defs = json.loads((spark_dir / "definitions.json").read_text())
    out = {
        f"same_{k}": duck_defs[k] == spark_defs[k]
        for k in ("rates", "candidates", "definitions", "features", "dropped")
    }
    rfm = [pd.read_parquet(d / "rfm.parquet").sort_values(keys, ignore_index=True)
           for d in (duck_dir, spark_dir)]  # fmt: skip
    out["rfm_rows_equal"] = len(rfm[0]) == len(rfm[1]) and rfm[0][keys].equals(rfm[1][keys])
    numeric = [c for c in rfm[0].columns if c not in keys and c in rfm[1].columns]
    if out["rfm_rows_equal"]:
        out["rfm"] = _columns_agreement(rfm[0], rfm[1], numeric, {"frequency_365d"})
    names = [c for c in duck_defs["candidates"] if c in spark_defs["candidates"]]
    matrix = [pd.read_parquet(d / "matrix.parquet").sort_values(keys, ignore_index=True)
              for d in (duck_dir, spark_dir)]  # fmt: skip
    same_rows = len(matrix[0]) == len(matrix[1]) and matrix[0][keys].equals(matrix[1][keys])
    out["matrix_rows"] = len(matrix[0])
    out["same_labels"] = matrix[0][[*keys, "label"]].equals(matrix[1][[*keys, "label"]])
    out["matrix_rows_equal"] = same_rows
    if same_rows:
        out["matrix"] = _columns_agreement(matrix[0], matrix[1], names, set(duck_defs["counts"]))
    return out


def scores_agreement(duck_dir: Path, spark_dir: Path) -> dict:
    import pandas as pd

    duck, spark = (pd.read_parquet(d / "scores.parquet") for d in (duck_dir, spark_dir))
    both = duck.merge(spark, on="CustomerId", how="outer", suffixes=("_duckdb", "_spark"))
    matched = both.dropna(subset=["ScoredAsOf_duckdb", "ScoredAsOf_spark"])
    a, b = (matched[f"ChurnScore_{e}"].to_numpy(float) for e in ENGINES)
    scored = ~np.isnan(a) & ~np.isnan(b)

    def share(column: str) -> float:
        a, b = (matched[f"{column}_{e}"].astype(str).to_numpy() for e in ENGINES)
        return round(float((a == b).mean()), 6) if len(a) else 0.0

    apart = matched[scored & (np.abs(a - b) > SCORE_ATOL)]
    listed = ["CustomerId", *(f"{c}_{e}" for c in ("ChurnScore", "RiskLevel") for e in ENGINES)]
    return {
        "rows": {"duckdb": len(duck), "spark": len(spark), "both": len(matched)},
        "same_as_of": bool(duck["ScoredAsOf"].max() == spark["ScoredAsOf"].max()),
        "churn_score_max_abs_difference": float(np.abs(a - b)[scored].max())
        if scored.any()
        else None,
        "churn_score_on_one_engine_only": int((np.isnan(a) ^ np.isnan(b)).sum()),
        "churn_scores_beyond_atol": len(apart),
        "churn_scores_beyond_atol_listed": json.loads(
            apart[listed].head(LISTED).to_json(orient="records")
        ),
        "score_status_agreement": share("ScoreStatus"),
        "is_churn_agreement": share("IsChurn"),
        "risk_level_agreement": share("RiskLevel"),
    }


# ---------------------------------------------------------------- the README's section


def section(results: Path) -> list[str]:
    """The README's section on features and refresh by Spark beside DuckDB
    (features_spark.json, refresh_spark.json)."""
    docs = {s: results / f"{s}_spark.json" for s in STAGES}
    docs = {s: json.loads(p.read_text())["results"] for s, p in docs.items() if p.exists()}
    if not docs:
        return []
    lines = [
        "",
        "## features and refresh on Spark: training's frames and the refresh by DuckDB and "
        "by Spark, side by side",
        "",
        "`make bench STAGE=features,refresh ENGINE=spark SIZES=…`",
        "(`benchmarks/bench_spark_part2.py`), on the ML lake of the train stage (the refresh",
        "uses its champion). features: training's frames as `c360ml train --engine …` computes",
        "them (`prepare_training`: labels and RFM at 12 cutoffs, the candidate definitions, the",
        "matrix of the sampled population, the selection; every customer up to 100k, a sample",
        "above; not the Featuretools-on-pandas stage of the table above). refresh: one weekly",
        "increment, then the whole refresh (the refresh stage's). Sail in local mode as for the",
        "medallion; each run a fresh process on its own copy of the lake; one untimed warm-up",
        "of each engine below 1M, then interleaved duckdb, spark, … (3 of each below 1M, one",
        "of each from 1M). Times: medians per step. Memory: the peak RSS (VmHWM) of the process",
        "that ran the stage (for Spark the driver, c360ml's Spark Connect client; for DuckDB",
        "its `refresh_workers` apart, in brackets) and, apart, Sail's during that run.",
        "Agreement: the first run of each engine compared (see the module docstring).",
        "",
        "| stage | size | date | DuckDB s: steps (total) | Spark s: steps (total) "
        "| Spark / DuckDB | DuckDB peak RSS MB (workers) | Spark driver peak RSS MB "
        "| Sail server peak RSS MB | agreement | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes, growth = [], []
    for stage, rows in docs.items():
        for r in rows:
            d, s = r["duckdb"], r["spark"]
            lines.append(
                f"| {stage} | {r['size']:,} | {r['date']} | {_steps(d)} | {_steps(s)} | "
                f"{s['seconds_median']['total'] / d['seconds_median']['total']:.1f}× | "
                f"{d['driver_peak_rss_mb_max']} ({d['children_peak_rss_mb_max']}) | "
                f"{s['driver_peak_rss_mb_max']}{_marks(s)} | {s['server_peak_rss_mb_max']} | "
                f"{_agreement(stage, r['agreement'])} | `{r['command']}` |"
            )
            notes += _notes(stage, r)
        if len(rows) > 1:
            low, high = rows[0], rows[-1]
            ratio = high["spark"]["driver_peak_rss_mb_max"] / low["spark"]["driver_peak_rss_mb_max"]
            growth.append(
                f"- {stage}: Spark driver peak {high['size']:,} / {low['size']:,}: "
                f"{ratio:.2f}× ({'within' if ratio <= ACCEPT_GROWTH else 'above'} "
                f"#28's {ACCEPT_GROWTH}×)."
            )
    return lines + ["", *growth, *notes]


def _steps(x: dict) -> str:
    m = {k: v for k, v in x["seconds_median"].items() if k != "total"}
    return ", ".join(f"{k} {v}" for k, v in m.items()) + f" ({x['seconds_median']['total']})"


def _marks(x: dict) -> str:
    marks = x.get("driver_marks_mb_max")
    if not marks:
        return ""
    before = (marks.get(k) for k in ("before_scoring", "before_report"))
    return " (before scoring {}, before report {})".format(*before)


def _agreement(stage: str, a: dict) -> str:
    if stage == "refresh":
        return (
            f"{a['rows']['both']:,} customers on both ({a['rows']['duckdb']:,} / "
            f"{a['rows']['spark']:,}); ChurnScore max abs diff "
            f"{a['churn_score_max_abs_difference']:.2g} "
            f"({a.get('churn_scores_beyond_atol', 'not counted')} beyond {SCORE_ATOL:g}); "
            "IsChurn agree "
            f"{a['is_churn_agreement']:.4%}, RiskLevel {a['risk_level_agreement']:.4%}"
        )
    same = [k.removeprefix("same_") for k, v in a.items() if k.startswith("same_") and v]
    differ = [k.removeprefix("same_") for k, v in a.items() if k.startswith("same_") and not v]
    text = f"equal: {', '.join(same)}" + (f"; differ: {', '.join(differ)}" if differ else "")
    for part in ("rfm", "matrix"):
        if part in a:
            p = a[part]
            text += (
                f"; {part} max rel diff {p['max_relative_difference']:.2g}"
                f" ({p['worst_column']}; {p['values_beyond_rtol']} values beyond {RTOL:g}), "
                f"count-like values differing {p['count_like_values_differing']}"
            )
        else:
            text += f"; {part}: rows differ"
    return text


def _notes(stage: str, r: dict) -> list[str]:
    """What a reader needs beside a row: code, versions, order and load, Sail's RSS."""
    runs = [*r.get("warm_up", []), *r["runs"]]
    order = ", ".join(
        f"{x['engine']} {x['seconds']['total']} s (load {x['load_1min_before']})" for x in runs
    )
    sail = [x["server_rss_before_mb"] for x in runs if x["engine"] == "spark"]
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    out = [
        f"- {stage} {r['size']:,}: code {r.get('code', '?')}; {versions}.",
        f"  Runs in order (warm-ups first): {order}.",
        f"  Sail's RSS before each Spark run: {', '.join(f'{m:.0f}' for m in sail)} MB; "
        f"its process tree's peak {r['spark']['server_tree_peak_rss_mb_max']} MB.",
    ]
    if r.get("note"):
        out.append(f"  {r['note']}")
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), *(sys.argv[5:6]))
    else:
        raise SystemExit("internal entry points only: run benchmarks/run.py")
