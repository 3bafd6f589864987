"""The medallion layers on Spark beside DuckDB, from the same bronze (`make bench
STAGE=medallion ENGINE=spark SIZES=...`).

Per size: the cached landing (generated first if missing) is copied to
benchmarks/cache/<size>/spark/ and ingested once by DuckDB (ingest is not Spark work).
Every build then starts from a hard-linked copy of that bronze-only lake and makes
silver, unify and gold with one engine (a layer the Spark engine does not build yet runs
on DuckDB: the JSON's `on_spark` names the layers Spark built), interleaved so that other
load on the machine falls on both alike: one untimed warm-up of each, then duckdb,
spark, duckdb, spark, ... `repeats` times. The engines must write the same row counts
in every layer (checked).

Each build runs in a fresh child process (`--build ENGINE LAKE [REMOTE]`), so its peak
RSS (VmHWM) is its own: for DuckDB the process that runs the whole build, for Spark the
Python client (the driver: c360ml's side of Spark Connect). Sail, the Spark Connect server, runs in
local mode as a separate child process of this benchmark (pysail's SparkConnectServer on
127.0.0.1, as the test fixture starts it), one server for all the Spark builds, stopped
at the end; its peak RSS per build is read from /proc after resetting its high-water
mark before each build (`/proc/<pid>/clear_refs`).

The code measured is the working tree, or with `BENCH_CODE=<git revision>` that commit
(`git archive` of src/, pipelines/ and features/ under the work directory, put first on
the children's PYTHONPATH): a shared working tree being edited meanwhile then does not
change what is measured. The JSON names which.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from lake_cache import size_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"

_SAIL = """
import sys
from pysail.spark import SparkConnectServer
server = SparkConnectServer(ip="127.0.0.1", port=0)
server.start(background=True)
host, port = server.listening_address
print(f"sc://{host}:{port}", flush=True)
sys.stdin.read()  # the benchmark closes stdin to stop the server
server.stop()
"""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()


def code_under(work: Path) -> tuple[dict, dict]:
    """What the children run: (the environment that makes them run it, its description)."""
    rev = os.environ.get("BENCH_CODE", "")
    if not rev:
        changed = _git("status", "--porcelain", "--", "src", "pipelines", "features")
        return {}, {
            "code": "working tree",
            "head": _git("rev-parse", "HEAD"),
            "uncommitted": changed.splitlines(),
        }
    sha = _git("rev-parse", f"{rev}^{{commit}}")
    code = work / "code"
    code.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", sha, "src", "pipelines", "features"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
    )
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    env = {"PYTHONPATH": str(code / "src"), "BENCH_ROOT": str(code)}
    return env, {"code": f"commit {sha} ({rev})", "head": sha, "uncommitted": []}


def settings_at(lake_root: Path, **update):
    from c360ml.config import Settings

    base = lake_root.parent
    return Settings(
        root=Path(os.environ.get("BENCH_ROOT", ROOT)),
        lake_root=lake_root,
        truth_root=base / "truth",
        mlflow_dir=base / "mlflow",
        log_dir=base / "logs",
        **update,
    )


def status_mb(pid: int | str, field: str) -> float:
    """A memory figure (VmHWM, VmRSS) of a process from /proc, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(pid: int) -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS; False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


LAYERS = ("silver", "unify", "gold")


def prepare(size: int) -> tuple[Path, dict, dict]:
    """A lake with bronze only (landing ingested by DuckDB: ingest is not Spark work),
    from the cached landing of `size` customers (generated first when missing): every
    build starts from a hard-linked copy of it. The ingest's seconds; what code the
    children run (`code_under`)."""
    cached = size_dir(size)
    if not (cached / "lake" / "landing").exists():
        sys.path.insert(0, str(HERE))
        from bench_generate import measure

        print(f"  generating {size:,} customers", file=sys.stderr, flush=True)
        measure(size, cached)
    work = cached / "spark"
    shutil.rmtree(work, ignore_errors=True)
    (work / "bronze" / "lake").mkdir(parents=True)
    subprocess.run(
        ["cp", "-al", str(cached / "lake" / "landing"), str(work / "bronze" / "lake")], check=True
    )
    shutil.copytree(cached / "truth", work / "truth")
    env, code = code_under(work)
    os.environ.update(env)  # for every child from here on
    done = subprocess.run(
        [sys.executable, __file__, "--prepare", str(work / "bronze" / "lake")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return work / "bronze" / "lake", json.loads(done.stdout.strip().splitlines()[-1]), code


def prepare_child(lake_root: Path) -> None:
    """Child process of `prepare`: landing -> bronze."""
    from c360ml.medallion.ingest import ingest_landing

    started = time.perf_counter()
    ingest_landing(settings_at(lake_root))
    seconds = round(time.perf_counter() - started, 2)
    print(f"  ingest (duckdb): {seconds} s", file=sys.stderr, flush=True)
    print(json.dumps({"ingest": seconds}))


def fresh_copy(bronze: Path, run: Path) -> Path:
    """A lake of bronze only for one build: hard links (Delta never rewrites a file and
    c360ml replaces its state files by rename, so the copy's writes leave `bronze` as it
    was)."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(bronze), str(run)], check=True)
    return run / bronze.name


def build_child(engine: str, lake_root: Path, remote: str = "") -> None:
    """Child process: silver, unify and gold built by `engine` (each layer on Spark when
    the Spark engine builds it, `medallion.build.SPARK_LAYERS`, else DuckDB); prints the
    figures as JSON."""
    from c360ml.medallion import build

    settings = settings_at(lake_root, engine=engine, spark_remote=remote)
    session_s = 0.0
    if engine == "spark":
        from c360ml.spark import spark_session

        started = time.perf_counter()
        spark = spark_session(settings.spark_remote)
        session_s = time.perf_counter() - started
    seconds, counts = {}, {}
    for layer in LAYERS:
        started = time.perf_counter()
        summary = getattr(build, f"build_{layer}")(settings)
        seconds[layer] = round(time.perf_counter() - started, 2)
        counts[layer] = summary.rows()
    if engine == "spark":
        spark.stop()
    figures = {
        "engine": engine,
        "on_spark": [x for x in LAYERS if engine == "spark" and x in build.SPARK_LAYERS],
        "seconds": seconds,
        "total_s": round(sum(seconds.values()), 2),
        "session_s": round(session_s, 2),
        "peak_rss_mb": round(status_mb("self", "VmHWM"), 1),
        "counts": _counts(counts),
    }
    print("RESULT " + json.dumps(figures, default=str))


def _counts(rows: dict[str, list[dict]]) -> dict:
    """What each layer wrote, without its timings (to compare the engines' outputs)."""
    return {
        layer: [
            {k: v for k, v in row.items() if k not in ("seconds", "written")} for row in layer_rows
        ]
        for layer, layer_rows in rows.items()
    }


class Sail:
    """A Sail Spark Connect server in local mode, a child process of this benchmark."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SAIL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.remote = self.proc.stdout.readline().strip()
        if not self.remote.startswith("sc://"):
            self.proc.kill()
            raise SystemExit("Sail did not start")

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_build(engine: str, bronze: Path, sail: Sail) -> dict:
    lake_root = fresh_copy(bronze, bronze.parent.parent / "run")
    args = [sys.executable, __file__, "--build", engine, str(lake_root)]
    server_reset = False
    if engine == "spark":
        args.append(sail.remote)
        server_reset = reset_peak(sail.proc.pid)
        server_before = status_mb(sail.proc.pid, "VmRSS")
    load = os.getloadavg()[0]  # other work on the machine, for the reader of the figures
    started = time.perf_counter()
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the build on {engine} failed")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["process_wall_s"] = round(wall, 2)
    result["load_1min_before"] = round(load, 2)
    if engine == "spark":
        result["server_rss_before_mb"] = round(server_before, 1)
        result["server_peak_rss_mb"] = round(status_mb(sail.proc.pid, "VmHWM"), 1)
        result["server_peak_reset"] = server_reset
    print(
        f"  {engine}: {result['seconds']}, driver peak {result['peak_rss_mb']:.0f} MB"
        + (f", Sail peak {result['server_peak_rss_mb']:.0f} MB" if engine == "spark" else ""),
        file=sys.stderr,
        flush=True,
    )
    return result


def run(size: int, repeats: int = 3, warm_up: bool = True) -> dict:
    """silver -> unify -> gold by DuckDB and by Spark (Sail, local mode), each build from
    the same bronze: one untimed warm-up of each (unless `warm_up` is off: at 1M a build
    is long enough for the caches to matter little), then interleaved."""
    bronze, before, code = prepare(size)
    sail = Sail()
    try:
        warm = [one_build(e, bronze, sail) for e in ("duckdb", "spark") if warm_up]
        runs = [one_build(e, bronze, sail) for _ in range(repeats) for e in ("duckdb", "spark")]
    finally:
        sail.stop()
    counts = {json.dumps(r["counts"], sort_keys=True) for r in (*warm, *runs)}
    if len(counts) != 1:
        raise SystemExit(f"the engines wrote different row counts: {counts}")
    by = {e: [r for r in runs if r["engine"] == e] for e in ("duckdb", "spark")}

    def median(engine: str, layer: str) -> float:
        return round(statistics.median(r["seconds"][layer] for r in by[engine]), 2)

    summary = {
        e: {
            "seconds_median": {x: median(e, x) for x in LAYERS},
            "total_s_median": round(statistics.median(r["total_s"] for r in by[e]), 2),
            "total_s_runs": [r["total_s"] for r in by[e]],
            "driver_peak_rss_mb_max": max(r["peak_rss_mb"] for r in by[e]),
        }
        for e in by
    }
    summary["spark"]["on_spark"] = by["spark"][0]["on_spark"]
    summary["spark"]["session_s_median"] = round(
        statistics.median(r["session_s"] for r in by["spark"]), 2
    )
    summary["spark"]["server_peak_rss_mb_max"] = max(r["server_peak_rss_mb"] for r in by["spark"])
    return {
        "size": size,
        "repeats": repeats,
        **code,
        "versions": {p: version(p) for p in ("pysail", "pyspark", "duckdb", "deltalake")},
        "before_duckdb_s": before,
        "counts": runs[0]["counts"],
        **summary,
        "warm_up": warm,
        "runs": runs,
    }


if __name__ == "__main__":
    if sys.argv[1] == "--prepare":
        prepare_child(Path(sys.argv[2]))
    elif sys.argv[1] == "--build":
        build_child(sys.argv[2], Path(sys.argv[3]), *(sys.argv[4:5]))
    else:
        raise SystemExit("internal entry points only: run benchmarks/run.py")
