"""Benchmarks: `make bench [STAGE=<stage>[,<stage>...]|all] [SIZES=100000,1000000] [ENGINE=…]`.

Stages, in order: generate, medallion, unify, splink, features, train, refresh, serve;
and crash (a refresh killed at each commit) and checks (silver's row checks before and
after #23; its size is rows, not customers), run only when named; so is real (c360ml
against BG/NBD and Pareto/NBD on the CDNOW purchase log, bench_real.py; SIZES ignored).
Each (stage, size) runs in a fresh subprocess so its peak RSS is its own; lakes are
generated once per size under benchmarks/cache/<size>-v<lake version>/ (lake_cache.py)
and reused by later stages.
Figures are written to benchmarks/results/<stage>.json (serve: serve.json and serve.md)
and tabulated in benchmarks/results/README.md with the date and the command.
`--profile NAME` (PROFILE=sparse): the lakes of another generator profile
(c360ml.synth.params.PROFILES), cached apart (<size>-v<lake version>-<profile>/) and
their figures in <stage>_<profile>.json (results_name), e.g. train_sparse.json.
`--engine spark` (ENGINE=spark) changes the medallion stage: silver, unify and gold built by
DuckDB and by Spark (Sail in local mode) side by side from the same bronze (bench_spark.py),
to medallion_spark.json; and the features and refresh stages: training's frames and the
whole refresh by both engines, interleaved, with the driver's memory and the engines'
agreement (bench_spark_part2.py), to features_spark.json and refresh_spark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from lake_cache import DEFAULT_PROFILE, bench_profile, profiled, size_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
STAGES = ("generate", "medallion", "unify", "splink", "features", "train", "refresh", "serve")
TABLE_STAGES = STAGES[:-1]  # serve.json has its own format (see serve.md)
RULES = ROOT / "pipelines" / "unify.yaml"
OTHER_RULES = ("benchmarks/unify_without_common.yaml",)  # BENCH_UNIFY_RULES runs tabulated


def settings_for(size: int):
    from c360ml.config import Settings

    return Settings(
        # a comparison's child runs another copy of the code: its SQL and specs (bench_compare)
        root=Path(os.environ.get("BENCH_ROOT", ROOT)),
        # other match rules than the project's (benchmarks/unify_without_common.yaml)
        unify_rules=Path(os.environ.get("BENCH_UNIFY_RULES", "pipelines/unify.yaml")),
        lake_root=size_dir(size) / "lake",
        truth_root=size_dir(size) / "truth",
        mlflow_dir=size_dir(size) / "mlflow",
    )


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS of this process or (RUSAGE_CHILDREN) of its largest finished child."""
    return resource.getrusage(who).ru_maxrss / 1024


def stage_generate(size: int) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_generate import run

    # bench_generate writes its own generate.json; the harness merges sizes into RESULTS.
    return {"runs": run([size], size_dir(size), size_dir)}


def work_settings(size: int):
    """Settings of a scratch copy of the cached lake: landing hard-linked (the generator
    only adds files to it), truth copied (an increment rewrites its pending rows), so a
    run can add an increment without changing the cache that later runs start from."""
    import shutil

    cached = settings_for(size)
    if not (cached.lake / "landing").exists():
        raise SystemExit(f"no cached lake for {size}: run STAGE=generate first")
    work = size_dir(size) / "work"
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
        else:  # unify: how many records were matched and merged again
            detail[name] = {"records": summary.records, "unified": summary.unified}
        print(f"  {name}: {out[name]} s, rss {peak_rss_mb():.0f} MB", file=sys.stderr, flush=True)
    out["total"] = round(sum(out.values()), 2)
    out["detail"] = detail
    return out


def stage_medallion(size: int) -> dict:
    """Full bronze -> gold build, then a ~1% increment and the incremental refresh."""
    from c360ml.storage.lake import Lake
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
        "incremental_share_bronze_to_gold": round(
            (incremental["total"] - incremental["ingest"]) / (full["total"] - full["ingest"]), 3
        ),
    }


AZURITE_CONTAINER = "bench"  # the container the medallion stage's az:// lake is built in


def stage_medallion_azurite(size: int) -> dict:
    """The medallion stage with the lake in a container on Azurite (`--lake azurite`).

    The emulator is the one the tests start (node_modules, 127.0.0.1, its blobs in a
    temporary folder, stopped at the end). The cached landing is uploaded first and timed
    apart: Synapse Link writes it there, it is no build's work. The generator writes local
    folders only, so the increment is generated in the local copy's landing and its new
    files uploaded (model.json last, as Synapse Link writes a sync folder)."""
    import tempfile

    from c360ml.storage.lake import Lake
    from c360ml.storage.objects import upload_folder
    from c360ml.synth import generate_increment

    sys.path.insert(0, str(ROOT))
    from tests.storage.azurite import Azurite

    local = work_settings(size)
    landing = local.lake / "landing"
    with tempfile.TemporaryDirectory(prefix="bench-azurite-") as folder:
        server = Azurite(Path(folder))
        try:
            for name in [n for n in os.environ if n.startswith(("AZURE_", "AZURITE_"))]:
                del os.environ[name]
            os.environ["AZURE_STORAGE_USE_EMULATOR"] = "true"
            os.environ["AZURITE_BLOB_STORAGE_URL"] = server.url
            server.create_container(AZURITE_CONTAINER)
            settings = local.model_copy(update={"lake_root": f"az://{AZURITE_CONTAINER}/lake"})
            lake = Lake(settings.lake)
            started = time.perf_counter()
            sent = upload_folder(landing, lake.store, "landing")
            upload_s = round(time.perf_counter() - started, 2)
            landing_mb = round(sum(lake.store.sizes("landing").values()) / 2**20, 1)
            print(f"  upload: {len(sent)} files, {upload_s} s", file=sys.stderr, flush=True)
            full = timed_build(settings)
            orders = lake.dataset("gold", "orders").count_rows()
            lines = lake.dataset("gold", "order_lines").count_rows()
            bronze_rows = sum(
                lake.dataset("bronze", *p).count_rows() for p in lake.tables("bronze")
            )
            before = {p for p in landing.rglob("*") if p.is_file()}
            increment = generate_increment(local)
            increment_rows = sum(r["rows"] for r in increment.rows())
            started = time.perf_counter()
            new = _upload_new(landing, before, lake.store)
            increment_upload_s = round(time.perf_counter() - started, 2)
            incremental = timed_build(settings)
            lake_mb = round(sum(lake.store.sizes("").values()) / 2**20, 1)
            azurite_rss = _peak_rss_of(server.proc.pid)
        finally:
            server.stop()
    return {
        "lake": "azurite",
        "full": full,
        "incremental": incremental,
        "upload_s": upload_s,
        "landing_mb": landing_mb,
        "increment_upload_s": increment_upload_s,
        "increment_files": len(new),
        "container_mb": lake_mb,
        "azurite_peak_rss_mb": azurite_rss,
        "bronze_rows": bronze_rows,
        "increment_landing_rows": increment_rows,
        "gold_orders": orders,
        "gold_order_lines": lines,
        "incremental_share": round(incremental["total"] / full["total"], 3),
    }


def _upload_new(landing: Path, before: set[Path], store) -> list[str]:
    """The landing files written since `before`, uploaded, model.json files last."""
    new = sorted(
        (p for p in landing.rglob("*") if p.is_file() and p not in before),
        key=lambda p: (p.name == "model.json", p.as_posix()),
    )
    for path in new:
        store.write_bytes(f"landing/{path.relative_to(landing).as_posix()}", path.read_bytes())
    return [p.name for p in new]


def _peak_rss_of(pid: int) -> float | None:
    """A running process's peak RSS in MB (Linux's VmHWM), None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


SILVER_READY = "silver_ready"  # marker: the work lake holds a full silver build, no increment


def silver_settings(size: int):
    """A work lake with bronze and silver built (once; reused by unify and splink).

    The build runs in its own process so that the caller's peak RSS is its own."""
    work = size_dir(size) / "work"
    if not (work / SILVER_READY).exists():
        subprocess.run([sys.executable, __file__, "--silver", str(size)], check=True)
    return settings_for(size).model_copy(
        update={"lake_root": work / "lake", "truth_root": work / "truth"}
    )


def build_silver_only(size: int) -> None:
    from c360ml.medallion.build import build_silver
    from c360ml.medallion.ingest import ingest_landing

    settings = work_settings(size)
    ingest_landing(settings)
    build_silver(settings)
    (size_dir(size) / "work" / SILVER_READY).touch()


def truth_labels(settings, records) -> np.ndarray:
    """The generator's person id per unify record (-1: not in the truth)."""
    import pandas as pd

    keys = pd.read_parquet(settings.truth / "person_keys.parquet")
    keys = keys[keys["source"] != "generic"]  # generic is not ingested by default
    person = records[["source", "source_key"]].merge(keys, on=["source", "source_key"], how="left")
    codes, _ = pd.factorize(person["person_id"], use_na_sentinel=True)
    return codes


def labels_quality(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise precision/recall of a clustering (labels) against the truth, counted by
    combinatorics over cluster/person intersections (records without a truth are out)."""
    import pandas as pd

    from c360ml.medallion.unify import pair_quality

    known = truth >= 0
    frame = pd.DataFrame({"customer_id": labels[known], "person_id": truth[known]})
    frame["source"], frame["source_key"] = "x", np.arange(len(frame)).astype(str)
    q = pair_quality(
        frame[["source", "source_key", "customer_id"]], frame[["source", "source_key", "person_id"]]
    )
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in q.items()}


def name_band_flags(records, rules) -> np.ndarray:
    """Per record, whether its name is common by the name rule's `common` test, or by that
    of pipelines/unify.yaml when the rules have none (so that runs with and
    without the test are split into the same bands)."""
    from c360ml.medallion.unify import common_flags, load_rules, value_frequencies

    spec = next((r.common for r in rules.rules if r.common and r.common.per), None)
    if spec is None:
        spec = next(r.common for r in load_rules(RULES).rules if r.common)
    frequencies = value_frequencies(records, [spec.field, spec.per])
    return common_flags(records, spec, frequencies)


def band_quality(labels: np.ndarray, truth: np.ndarray, flags: np.ndarray) -> dict:
    """Pair precision and recall of a clustering per name band: a pair (predicted: two
    records of one cluster; true: of one person) is in the common band when either
    record's name is common (`flags`). Records without a truth are left out."""
    from c360ml.medallion.unify import _block_runs, _pairs_in_runs

    known = np.flatnonzero(truth >= 0)

    def pairs_of(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(groups, kind="stable")
        starts, lengths = _block_runs(groups[order])
        multi = lengths > 1
        left, right = _pairs_in_runs(starts[multi], lengths[multi])
        return known[order[left]], known[order[right]]

    predicted, true = pairs_of(labels[known]), pairs_of(truth[known])
    out = {}
    for band, want in (("common", True), ("rare", False)):
        p = (flags[predicted[0]] | flags[predicted[1]]) == want
        t = (flags[true[0]] | flags[true[1]]) == want
        right = truth[predicted[0][p]] == truth[predicted[1][p]]
        found = labels[true[0][t]] == labels[true[1][t]]
        out[band] = {
            "predicted_pairs": int(p.sum()),
            "true_pairs": int(t.sum()),
            "precision": round(float(right.mean()), 4) if p.any() else None,
            "recall": round(float(found.mean()), 4) if t.any() else None,
        }
    return out


def stage_unify(size: int) -> dict:
    """build_unify on a full silver, then quality against the generator's truth:
    overall, per rule (precision of the pairs each rule emitted; precision and recall
    of the clusters of the rules up to it), and the cluster-size histogram."""
    import pandas as pd

    from c360ml.medallion.unify import (
        build_unify,
        cluster,
        load_rules,
        match_rule,
        prepare_records,
        read_records,
    )
    from c360ml.storage.lake import Lake

    settings = silver_settings(size)
    lake = Lake(settings.lake)
    for table in ("customer_source_map", "customer_profile", "customer_id_redirects"):
        import shutil

        shutil.rmtree(lake.path("gold", table), ignore_errors=True)
    started = time.perf_counter()
    summary = build_unify(settings)
    seconds = round(time.perf_counter() - started, 2)
    unify_rss = round(peak_rss_mb(), 1)
    source_map = lake.read_pandas("gold", "customer_source_map")
    keys = pd.read_parquet(settings.truth / "person_keys.parquet")
    from c360ml.medallion.unify import pair_quality

    overall = pair_quality(source_map, keys[keys["source"] != "generic"])
    # Per rule, on the same records and rules (the pure functions build_unify runs).
    rules = load_rules(settings.path(settings.unify_rules))
    records = prepare_records(read_records(lake, settings).to_pandas())
    truth = truth_labels(settings, records)
    per_rule, done = [], []
    for rule in rules.rules:
        pairs = match_rule(records, rule, rules.junk_max_records, rules.max_block_size)
        done.append(pairs)
        both = (truth[pairs.left] >= 0) & (truth[pairs.right] >= 0)
        same = truth[pairs.left][both] == truth[pairs.right][both]
        alone = labels_quality(cluster(len(records), [pairs]), truth)
        upto = labels_quality(cluster(len(records), done), truth)
        per_rule.append(
            {
                "rule": rule.name,
                "pairs": int(len(pairs.left)),
                "pair_precision": round(float(same.mean()), 4) if len(same) else None,
                "rule_clusters_precision": alone["precision"],
                "cumulative_precision": upto["precision"],
                "cumulative_recall": upto["recall"],
                "junk_values": pairs.junk,
                "skipped_blocks": pairs.skipped_blocks,
            }
        )
        if pairs.common is not None:  # a rule with `common`: its pairs by value frequency
            known = (truth[pairs.left] >= 0) & (truth[pairs.right] >= 0)
            right = truth[pairs.left] == truth[pairs.right]
            per_rule[-1]["by_value_frequency"] = {
                band: {
                    "pairs": int(mask.sum()),
                    "pair_precision": round(float(right[mask & known].mean()), 4)
                    if (mask & known).any()
                    else None,
                }
                for band, mask in (("common", pairs.common), ("rare", ~pairs.common))
            }
    sizes = np.bincount(np.bincount(source_map["customer_id"].factorize()[0]))
    by_band = band_quality(cluster(len(records), done), truth, name_band_flags(records, rules))
    return {
        "unify_s": seconds,
        "unify_peak_rss_mb": unify_rss,
        "records": summary.records,
        "customers": summary.customers,
        "precision": round(overall["precision"], 4),
        "recall": round(overall["recall"], 4),
        "true_pairs": overall["true_pairs"],
        "predicted_pairs": overall["predicted_pairs"],
        "per_rule": per_rule,
        "by_name_band": by_band,
        "cluster_sizes": {str(i): int(n) for i, n in enumerate(sizes) if n and i},
    }


def stage_splink(size: int) -> dict:
    """Splink 5 (DuckDB) dedupe_only on the same prepared unify records, as a peer."""
    sys.path.insert(0, str(HERE))
    from bench_splink import run_splink

    from c360ml.medallion.unify import load_rules, prepare_records, read_records
    from c360ml.storage.lake import Lake

    settings = silver_settings(size)
    lake = Lake(settings.lake)
    records = prepare_records(read_records(lake, settings).to_pandas())
    rules = load_rules(settings.path(settings.unify_rules))
    truth = truth_labels(settings, records)
    out = run_splink(records, rules)
    out["quality"] = labels_quality(out.pop("labels"), truth)
    out["precision"], out["recall"] = out["quality"]["precision"], out["quality"]["recall"]
    return out


def _ml_paths(size: int):
    # BENCH_ML_DIR: a comparison run's own copy of the ML lake (bench_compare)
    base = Path(os.environ.get("BENCH_ML_DIR", size_dir(size) / "ml"))
    settings = settings_for(size).model_copy(
        update={
            "lake_root": base / "lake",
            "truth_root": base / "truth",
            "mlflow_dir": base / "mlflow",
        }
    )
    return base, settings


def ml_settings(size: int):
    """A lake built bronze -> gold once per size (benchmarks/cache/<size>/ml), for the stages
    after gold. The build runs in its own process (`--build-ml SIZE`), so neither its time
    nor its memory is part of the calling stage's figures."""
    from c360ml.storage.lake import Lake

    _, settings = _ml_paths(size)
    if not Lake(settings.lake).exists("gold", "orders"):
        subprocess.run([sys.executable, __file__, "--build-ml", str(size)], check=True)
    return settings


def build_ml_lake(size: int) -> None:
    """Child process of ml_settings: copy the cached landing and build it through gold."""
    import shutil

    cached = settings_for(size)
    base, settings = _ml_paths(size)
    if not (cached.lake / "landing").exists():
        raise SystemExit(f"no cached lake for {size}: run STAGE=generate first")
    shutil.rmtree(base, ignore_errors=True)
    (base / "lake").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(cached.lake / "landing"), str(base / "lake")], check=True)
    shutil.copytree(cached.truth, base / "truth")
    timed_build(settings)


def stage_features(size: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_ml

    return bench_ml.features(ml_settings(size), RESULTS)


def stage_train(size: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_ml

    return bench_ml.train(ml_settings(size), RESULTS)


def stage_refresh(size: int) -> dict:
    """Needs the train stage's champion in the same lake's MLflow store."""
    sys.path.insert(0, str(HERE))
    import bench_ml

    return bench_ml.refresh(ml_settings(size), RESULTS)


def stage_crash(size: int) -> dict:
    """SIGKILL a refresh at each of its commits (bench_crash.py; not part of `all`)."""
    sys.path.insert(0, str(HERE))
    from bench_crash import run

    return run(size, CACHE / f"crash-{size}")


def stage_checks(size: int) -> dict:
    """Silver's row checks on `size` generated rows, before and after #23 (bench_checks.py)."""
    sys.path.insert(0, str(HERE))
    from bench_checks import run

    return run(size)


def one(stage: str, size: int) -> None:
    """Child process: run one stage at one size, print JSON with the peak RSS."""
    started = time.perf_counter()
    result = globals()[f"stage_{stage}"](size)
    result.update(
        stage=stage,
        size=size,
        wall_s=round(time.perf_counter() - started, 2),
        peak_rss_mb=round(peak_rss_mb(), 1),
        # e.g. a refresh worker, or the ML lake build when this stage had to run it
        child_peak_rss_mb=round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
    )
    print("RESULT " + json.dumps(result))


def results_name(stage: str, rules: str | None = None, profile: str | None = None) -> str:
    """The figures' file of `stage`: unify with other rules than the project's
    (BENCH_UNIFY_RULES=benchmarks/unify_without_common.yaml) keeps its own
    (unify_without_common.json), and so does a lake of another generator profile than
    the default (`--profile sparse`: train_sparse.json). `rules` and `profile` default to
    this run's (BENCH_UNIFY_RULES, BENCH_PROFILE)."""
    rules = rules if rules is not None else os.environ.get("BENCH_UNIFY_RULES")
    return profiled(Path(rules).stem if stage == "unify" and rules else stage, profile)


def _refused_with_profile(stages: tuple[str, ...], engine: str) -> str | None:
    """What a run of another profile than the default cannot do yet: the side-by-side
    runs (Spark, BENCH_BASELINE) write one file whatever the profile."""
    if bench_profile() == DEFAULT_PROFILE:
        return None
    if engine == "spark" and {"medallion", "features", "refresh"} & set(stages):
        return "not with --engine spark"
    if os.environ.get("BENCH_BASELINE") and {"refresh", "train"} & set(stages):
        return "not with BENCH_BASELINE"
    return None


def _command_env() -> list[str]:
    """The variables that changed what the command measured, as a shell prefix."""
    rules = os.environ.get("BENCH_UNIFY_RULES")
    out = [f"BENCH_UNIFY_RULES={rules}"] if rules else []
    if bench_profile() != DEFAULT_PROFILE and "--profile" not in sys.argv:
        out.append(f"BENCH_PROFILE={bench_profile()}")
    return out


def _row(stage: str, r: dict) -> str:
    """One README line per (stage, size): the figures that stage is judged by."""
    run = r["runs"][0]
    if stage == "medallion":
        med = {k: statistics.median(x[k] for x in r["runs"]) for k in ("incremental_share",)}
        f, i = run["full"], run["incremental"]
        steps = ", ".join(f"{k} {f[k]}" for k in ("ingest", "silver", "unify", "gold"))
        inc = ", ".join(f"{k} {i[k]}" for k in ("ingest", "silver", "unify", "gold"))
        return (
            f"full {f['total']} s ({steps}); incremental {i['total']} s ({inc}); "
            f"share {med['incremental_share']}; bronze→gold share "
            f"{run.get('incremental_share_bronze_to_gold', '')}"
        )
    if stage == "unify":
        rules = "; ".join(
            f"{x['rule']}: pair precision {x['pair_precision']}, "
            f"cumulative P {x['cumulative_precision']} R {x['cumulative_recall']}"
            for x in run["per_rule"]
        )
        bands = "".join(
            f"; {band} names P {x['precision']} R {x['recall']} ({x['true_pairs']} true pairs)"
            for band, x in run.get("by_name_band", {}).items()
        )
        return (
            f"unify {run['unify_s']} s, {run['unify_peak_rss_mb']} MB; precision "
            f"{run['precision']}, recall {run['recall']} ({rules}){bands}"
        )
    if stage == "splink":
        return (
            f"total {run['total_s']} s (train {run['train_s']}, predict {run['predict_s']}, "
            f"cluster {run['cluster_s']}); precision {run['precision']}, recall {run['recall']}"
        )
    if stage == "generate":
        inner = run.get("runs", [run])[0]
        return (
            f"{inner.get('wall_s', 0):.1f} s, child peak {inner.get('peak_rss_mb', 0):.0f} MB, "
            f"{inner.get('sales_lines', '')} sales lines, {inner.get('landing_mb', 0):.0f} MB"
        )
    if stage in ("train", "refresh"):
        # Medians over the runs: of each scalar figure and of each step's seconds.
        runs = r["runs"]
        steps = ", ".join(
            f"{k} {statistics.median(x['steps_s'][k] for x in runs if k in x['steps_s'])}"
            for k in run.get("steps_s", {})
        )
        scalars = {
            k: statistics.median(x[k] for x in runs if k in x)
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else v
            for k, v in run.items()
            if not isinstance(v, (dict, list))
        }
        head = _headroom(runs) if stage == "train" else ""
        return f"{head}{len(runs)} run(s), medians: {json.dumps(scalars)}; steps: {steps}"
    return json.dumps({k: v for k, v in run.items() if not isinstance(v, (dict, list))})


def _headroom(runs: list[dict]) -> str:
    """Issue #31's figures of training runs, each with its 95% interval: the headroom
    closed, (AUC_model - AUC_RFM) / (AUC_oracle - AUC_RFM), and model - RFM logistic ROC
    AUC (runs written before they were recorded: empty)."""

    def ci(run: dict, key: str) -> str | None:
        if run.get(key) is None:
            return None
        low, high = run.get(f"{key}_ci") or (None, None)
        return f"{run[key]} [{low}, {high}]"

    parts = []
    for key, label in (
        ("headroom_closed", "headroom closed"),
        ("roc_auc_minus_rfm", "model − RFM ROC AUC"),
    ):
        values = [v for v in (ci(run, key) for run in runs) if v is not None]
        if values:
            parts.append(f"{label} {' / '.join(values)}")
    return "; ".join(parts) + " (95% CI); " if parts else ""


def write_readme() -> None:
    """benchmarks/results/README.md: one table over every stage's latest results."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run.py` (`make bench STAGE=... SIZES=...`) from the JSON",
        "files next to this one; each (stage, size) runs in its own process, on the",
        "2-core / 24 GiB machine shared with other work. Medians where repeated.",
        "Peak RSS is the stage process's own; `child_peak_rss_mb` (in the figures, where",
        "recorded) is its largest child's: a refresh worker of the snapshot (one of",
        "`refresh_workers`, on top of the parent), or the ML lake build if the stage ran it.",
        "`report.png`: the report's first screen on the demo lake in headless Chromium",
        "(`python benchmarks/report_screenshot.py` after `make demo`).",
        "",
        "| stage | size | date | wall s (median) | peak RSS MB | figures | command |",
        "|---|---|---|---|---|---|---|",
    ]
    from c360ml.synth.params import PROFILES

    files = []
    for profile in PROFILES:  # the default's first, then each other profile's
        names = [(s, results_name(s, rules="", profile=profile)) for s in (*TABLE_STAGES, "crash")]
        names += [("unify", results_name("unify", rules=r, profile=profile)) for r in OTHER_RULES]
        files += [(stage, RESULTS / f"{name}.json") for stage, name in names]
    for stage, path in files:
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        for r in doc["results"]:
            try:
                figures = _row(stage, r)
            except (KeyError, IndexError, TypeError):
                figures = ""
            lines.append(
                f"| {path.stem} | {r['size']:,} | {r.get('date', doc['date'])} | "
                f"{r['wall_s_median']} | {r['peak_rss_mb_max']} | {figures} | "
                f"`{r.get('command', doc['command'])}` |"
            )
    lines += spark_section()
    sys.path.insert(0, str(HERE))
    import bench_spark_part2

    lines += bench_spark_part2.section(RESULTS)
    lines += azurite_section()
    lines += compare_section()
    if (RESULTS / "real.md").exists():
        lines += ["", *(RESULTS / "real.md").read_text().splitlines()]
    if (RESULTS / "lifecycle.md").exists():
        lines += ["", "## lifecycle (a simulated year: drift, outcomes, retraining)", ""]
        lines += (RESULTS / "lifecycle.md").read_text().splitlines()[2:]
        lines += ["", "![lifecycle](lifecycle.png)"]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")


AZURITE_JSON = "medallion_azurite.json"
STEPS = ("ingest", "silver", "unify", "gold")


def azurite_section() -> list[str]:
    """The README's section on the medallion stage with the lake on Azurite beside the
    same size on a local folder (medallion_azurite.json, medallion.json)."""
    path = RESULTS / AZURITE_JSON
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    local_doc = json.loads((RESULTS / "medallion.json").read_text())
    local = {r["size"]: r for r in local_doc["results"]}
    lines = [
        "",
        "## medallion on Azurite: the lake in a container, beside a local folder",
        "",
        "`make bench STAGE=medallion SIZES=… LAKE=azurite` (`stage_medallion_azurite` in",
        "`benchmarks/run.py`): the same build as the medallion stage with `lake_root` an",
        "`az://` container on Azurite (Microsoft's emulator, on 127.0.0.1 on this machine, its",
        "blobs on the same disk), so the ratio is the cost of the object-store path (HTTP",
        "requests, blob uploads, put-if-absent commits, the lease), not of a network. The",
        "landing is uploaded before the build and timed apart. Seconds per step; Azurite's",
        "own peak RSS is the emulator process's (Node).",
        "",
        "| size | lake | date | full s (ingest, silver, unify, gold) | incremental s "
        "(ingest, silver, unify, gold) | wall s | peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def steps(x: dict) -> str:
        return f"{x['total']} ({', '.join(str(x[k]) for k in STEPS)})"

    ratios = []
    for r in doc["results"]:
        run = r["runs"][0]
        there = local.get(r["size"])
        if there is not None:
            base = there["runs"][0]
            lines.append(
                f"| {r['size']:,} | local | {there.get('date', local_doc['date'])} | "
                f"{steps(base['full'])} | {steps(base['incremental'])} | {base['wall_s']} | "
                f"{base['peak_rss_mb']} | `{there.get('command', local_doc['command'])}` |"
            )
            ratios.append(
                f"{r['size']:,}: full build {run['full']['total'] / base['full']['total']:.2f}x, "
                f"incremental {run['incremental']['total'] / base['incremental']['total']:.2f}x"
            )
        lines.append(
            f"| {r['size']:,} | Azurite | {r.get('date', doc['date'])} | {steps(run['full'])} | "
            f"{steps(run['incremental'])} | {run['wall_s']} | {run['peak_rss_mb']} (Azurite "
            f"{run.get('azurite_peak_rss_mb')}) | `{r.get('command', doc['command'])}` |"
        )
        lines.append("")
    for r in doc["results"]:
        run = r["runs"][0]
        lines.append(
            f"At {r['size']:,}: landing {run['landing_mb']} MB uploaded in {run['upload_s']} s "
            f"before the build; the increment's {run['increment_files']} files in "
            f"{run['increment_upload_s']} s; the container holds {run['container_mb']} MB after."
        )
    if ratios:
        lines += ["", "Azurite / local: " + "; ".join(ratios) + "."]
    if doc.get("note"):  # what the figures were measured under, written by hand
        lines += ["", doc["note"]]
    return lines


def compare_section() -> list[str]:
    """The README's section on two codes compared on one lake (bench_compare.py)."""
    lines = []
    for stage in ("refresh", "train"):
        path = RESULTS / f"{stage}_compare.json"
        if not path.exists():
            continue
        key = "refresh_s" if stage == "refresh" else "train_s"
        if not lines:
            lines = [
                "",
                "## refresh and train: two versions of the code on the same lake, interleaved",
                "",
                "`BENCH_BASELINE=<rev> make bench STAGE=refresh|train SIZES=…`",
                "(`benchmarks/bench_compare.py`): the baseline revision's code and the code under",
                "test alternate run by run (baseline, new, new, baseline, …), each run a fresh",
                "process on its own copy of the same built lake and champion; medians. Tree peak:",
                "the peak of the summed RSS of the run's processes (workers included), sampled",
                "every 0.2 s; the max over the runs. (getrusage's child figure is left out: a",
                "child forked late inherits its parent's RSS.)",
                "",
                "| stage | size | date | code | runs (s) | median s | median wall s "
                "| peak RSS MB (own median / tree max) | figures | command |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        for r in json.loads(path.read_text())["results"]:
            for label in ("baseline", "new"):
                mine = [x for x in r["runs"] if x["code"] == label]
                m = r[label]["medians"]
                figures = ", ".join(
                    f"{k} {m[k]}" for k in ("roc_auc", "sample_rate", "test_sample_rate") if k in m
                )
                steps = ", ".join(f"{k} {v}" for k, v in r[label]["steps_s_medians"].items())
                lines.append(
                    f"| {stage} | {r['size']:,} | {r['date']} | {label}: {r[label]['code']} | "
                    f"{', '.join(str(x[key]) for x in mine)} | {m[key]} | {m['wall_s']} | "
                    f"{m.get('peak_rss_mb')} / {r[label]['max_tree_peak_rss_mb']} | "
                    f"{figures}; steps: {steps} | "
                    f"`{r['command']}` |"
                )
            lines.append(
                f"| {stage} | {r['size']:,} | {r['date']} | new / baseline | | "
                f"{r[f'{key}_ratio_new_to_baseline']} | | | loads before each run: "
                f"{', '.join(str(x['load_1min_before']) for x in r['runs'])} | |"
            )
    return lines


SPARK_JSON = "medallion_spark.json"


SPARK_LONG = 1_000_000  # from this size a build is long: one of each engine, no warm-up


def spark_medallion(sizes: list[int], repeats: int) -> None:
    """The medallion layers by DuckDB and by Spark side by side (bench_spark.run), to
    medallion_spark.json."""
    sys.path.insert(0, str(HERE))
    import bench_spark

    spark_side_by_side(SPARK_JSON, bench_spark.run, sizes, repeats)


def spark_side_by_side(name: str, measure, sizes: list[int], repeats: int) -> None:
    """`measure(size, repeats, warm_up)` of each size (both engines, interleaved: from
    SPARK_LONG one run of each and no warm-up, else at least 3) into results/`name`; sizes
    run before (another invocation) are kept unless run again now."""
    results = []
    for size in sizes:
        long = size >= SPARK_LONG
        result = measure(size, repeats if long else max(repeats, 3), warm_up=not long)
        code = f"BENCH_CODE={os.environ['BENCH_CODE']} " if os.environ.get("BENCH_CODE") else ""
        result.update(date=time.strftime("%Y-%m-%d"), command=code + " ".join(sys.argv))
        results.append(result)
        summary = {k: result[k] for k in ("size", "duckdb", "spark", "agreement") if k in result}
        print(json.dumps(summary, indent=1))
    path = RESULTS / name
    ran = {r["size"] for r in results}
    kept = []
    if path.exists():
        kept = [r for r in json.loads(path.read_text()).get("results", []) if r["size"] not in ran]
    path.write_text(
        json.dumps({"results": sorted(kept + results, key=lambda r: r["size"])}, indent=1) + "\n"
    )


def spark_section() -> list[str]:
    """The README's section on the medallion layers by Spark beside DuckDB
    (medallion_spark.json)."""
    path = RESULTS / SPARK_JSON
    if not path.exists():
        return []
    lines = [
        "",
        "## medallion on Spark: silver, unify and gold by DuckDB and by Spark, side by side",
        "",
        "`make bench STAGE=medallion ENGINE=spark SIZES=…` (`benchmarks/bench_spark.py`). Ingest",
        "(landing -> bronze) runs once, on DuckDB; every build starts from a copy of that bronze",
        "and makes silver, unify and gold with one engine (the layers Spark does not build yet",
        "run on DuckDB in the Spark column: `on Spark` names the ones it built). Spark is Sail",
        "0.7.2 in local mode on this machine (no JVM; Delta on the JVM, what Databricks,",
        "Synapse and Fabric run, cannot be fetched here), started by the benchmark on 127.0.0.1",
        "as a child process and stopped at the end. Each build runs in a fresh process; one",
        "untimed warm-up of each engine, then interleaved duckdb, spark, duckdb, spark, … (3",
        "of each below 1M customers; from 1M, one of each and no warm-up, to fit a session).",
        "Times: medians per layer. Memory: the peak RSS of the process that ran the build (for",
        "Spark, c360ml's driver: the Spark Connect client) and, apart, of the Sail server",
        "during that build (its high-water mark reset before each build). Both engines wrote",
        "the same row counts in every layer (checked by the benchmark).",
        "",
        "| size | date | on Spark | DuckDB s: silver, unify, gold (total) "
        "| Spark s: silver, unify, gold (total) | Spark / DuckDB | DuckDB peak RSS MB "
        "| Spark driver peak RSS MB | Sail server peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in json.loads(path.read_text())["results"]:
        d, s = r["duckdb"], r["spark"]
        notes += _spark_notes(r)

        def layers(x: dict) -> str:
            m = x["seconds_median"]
            return f"{m['silver']}, {m['unify']}, {m['gold']} ({x['total_s_median']})"

        lines.append(
            f"| {r['size']:,} | {r['date']} | {', '.join(s['on_spark'])} | {layers(d)} | "
            f"{layers(s)} | {s['total_s_median'] / d['total_s_median']:.1f}× | "
            f"{d['driver_peak_rss_mb_max']} | {s['driver_peak_rss_mb_max']} | "
            f"{s['server_peak_rss_mb_max']} | `{r['command']}` |"
        )
    projection = "A projection for a 10M-customer lake on a cluster: spark_projection.md."
    return lines + ["", *notes, "", projection]


def _spark_notes(r: dict) -> list[str]:
    """What a reader needs beside a row of the Spark table: code, versions, order, load."""
    runs = [*r.get("warm_up", []), *r["runs"]]
    order = ", ".join(
        f"{x['engine']} {x['total_s']} s (load {x['load_1min_before']})" for x in runs
    )
    sail = [x["server_rss_before_mb"] for x in runs if x["engine"] == "spark"]
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    out = [
        f"- {r['size']:,}: code {r.get('code', '?')}" + (f"; {versions}" if versions else "") + ".",
        f"  Ingest once before: {r['before_duckdb_s']['ingest']} s. Builds in order (warm-ups "
        f"first): {order}.",
        f"  Sail's RSS before each Spark build (it keeps memory between sessions): "
        f"{', '.join(f'{m:.0f}' for m in sail)} MB.",
    ]
    if r.get("note"):
        out.append(f"  {r['note']}")
    return out


def spark_part2(stage: str, sizes: list[int], repeats: int) -> None:
    """features or refresh by DuckDB and by Spark side by side (bench_spark_part2.run), to
    <stage>_spark.json."""
    sys.path.insert(0, str(HERE))
    from functools import partial

    import bench_spark_part2

    spark_side_by_side(f"{stage}_spark.json", partial(bench_spark_part2.run, stage), sizes, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="all")
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--engine",
        choices=["duckdb", "spark"],
        default="duckdb",
        help="medallion, features, refresh: spark runs the stage with DuckDB and Spark side by "
        "side (bench_spark.py, bench_spark_part2.py)",
    )
    parser.add_argument(
        "--lake",
        choices=["local", "azurite"],
        default="local",
        help="medallion: azurite builds the lake in a container on Azurite (medallion_azurite.json)",
    )
    parser.add_argument(
        "--profile",
        help="the generator profile of the lakes measured (c360ml.synth.params.PROFILES; "
        "default: BENCH_PROFILE or default): cached apart, figures in <stage>_<profile>.json",
    )
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "SIZE"))
    parser.add_argument("--silver", type=int, metavar="SIZE", help="internal: build silver")
    parser.add_argument("--build-ml", type=int, metavar="SIZE", help="internal: build ml lake")
    args = parser.parse_args()
    if args.profile:  # the stages' child processes (bench_compare's, bench_spark's) inherit it
        os.environ["BENCH_PROFILE"] = args.profile
    if bench_profile() != DEFAULT_PROFILE:
        from c360ml.synth.params import process_profile

        try:
            process_profile(bench_profile())
        except ValueError as error:
            raise SystemExit(f"--profile: {error}") from None
    if args.silver:
        build_silver_only(args.silver)
        return
    if args.build_ml:
        build_ml_lake(args.build_ml)
        return
    if args.one:
        one(args.one[0], int(args.one[1]))
        return
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    refused = _refused_with_profile(stages, args.engine)
    if refused:
        raise SystemExit(
            f"--profile {bench_profile()}: {refused} (their figures have no file per profile)"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if stage == "lifecycle":  # only when named, not in "all": a simulated year on the
            # demo settings whatever SIZES says; writes lifecycle.json/.md/.png itself
            subprocess.run(
                [sys.executable, str(HERE / "bench_lifecycle.py"), "--what-if"], check=True
            )
            continue
        if stage == "real":  # only when named: the CDNOW log, whatever SIZES says; writes
            # real.json and real.md itself
            subprocess.run([sys.executable, str(HERE / "bench_real.py")], check=True)
            continue
        if stage == "medallion" and args.engine == "spark":
            spark_medallion([int(s) for s in args.sizes.split(",")], args.repeats)
            continue
        if stage in ("features", "refresh") and args.engine == "spark":
            spark_part2(stage, [int(s) for s in args.sizes.split(",")], args.repeats)
            continue
        if stage in ("refresh", "train") and os.environ.get("BENCH_BASELINE"):
            # BENCH_BASELINE=<rev>: that revision's code against this one, interleaved
            sys.path.insert(0, str(HERE))
            import bench_compare

            bench_compare.main(stage, [int(s) for s in args.sizes.split(",")], args.repeats)
            continue
        if stage == "medallion" and args.lake == "azurite":
            stage = "medallion_azurite"  # its own figures, beside the local ones
        if stage == "serve":  # one model, any size: bench_serve writes serve.json/serve.md
            subprocess.run(
                [sys.executable, str(HERE / "bench_serve.py"), "--out", str(RESULTS)], check=True
            )
            continue
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
        # Sizes run before (another invocation) are kept unless run again now.
        path = RESULTS / f"{results_name(stage)}.json"
        kept = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                ran = {r["size"] for r in results}
                # a kept size keeps its own date and command (set when it was first kept)
                kept = [{"date": old.get("date"), "command": old.get("command"), **r}
                        for r in old.get("results", []) if r.get("size") not in ran]  # fmt: skip
            except (json.JSONDecodeError, AttributeError, TypeError):
                kept = []
        path.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join([*_command_env(), *sys.argv]),
                    "results": sorted(kept + results, key=lambda r: r["size"]),
                },
                indent=1,
            )
        )
    write_readme()


if __name__ == "__main__":
    main()
