"""Gold on Spark beside gold on DuckDB, on the same lake (`make bench STAGE=medallion
ENGINE=spark SIZES=...`).

Per size: the cached landing (generated first if missing) is copied to
benchmarks/cache/<size>/spark/ and ingested, and silver and unify are built there once by
DuckDB (the only engine for them today). Then gold is built from that same silver and
source map by both engines, interleaved so that other load on the machine falls on both
alike: one untimed warm-up of each, then duckdb, spark, duckdb, spark, ... `repeats`
times. Before every build the gold models, their quarantine and `state/gold` are
removed, so that each build is a full one (the DuckDB engine would otherwise skip the
models whose inputs did not change; every table is checked to have been "rebuilt").

Each build runs in a fresh child process (`--gold ENGINE LAKE [REMOTE]`), so its peak
RSS (VmHWM) is its own: for DuckDB the process that runs the whole build, for Spark the
Python client (the driver side of Spark Connect). Sail, the Spark Connect server, runs in
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


def prepare(size: int) -> tuple[Path, dict, dict]:
    """A lake with bronze, silver and unify built by DuckDB, from the cached landing of
    `size` customers (generated first when missing); the seconds of each step; what code
    the children run (`code_under`)."""
    cached = CACHE / str(size)
    if not (cached / "lake" / "landing").exists():
        sys.path.insert(0, str(HERE))
        from bench_generate import measure

        print(f"  generating {size:,} customers", file=sys.stderr, flush=True)
        measure(size, cached)
    work = cached / "spark"
    shutil.rmtree(work, ignore_errors=True)
    (work / "lake").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(cached / "lake" / "landing"), str(work / "lake")], check=True)
    shutil.copytree(cached / "truth", work / "truth")
    env, code = code_under(work)
    os.environ.update(env)  # for every child from here on
    done = subprocess.run(
        [sys.executable, __file__, "--prepare", str(work / "lake")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return work / "lake", json.loads(done.stdout.strip().splitlines()[-1]), code


def prepare_child(lake_root: Path) -> None:
    """Child process of `prepare`: ingest, silver and unify on DuckDB."""
    from c360ml.medallion.build import build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing

    settings = settings_at(lake_root)
    seconds = {}
    for name, step in (
        ("ingest", ingest_landing),
        ("silver", build_silver),
        ("unify", build_unify),
    ):
        started = time.perf_counter()
        step(settings)
        seconds[name] = round(time.perf_counter() - started, 2)
        print(f"  {name} (duckdb): {seconds[name]} s", file=sys.stderr, flush=True)
    print(json.dumps(seconds))


def clear_gold(lake_root: Path) -> None:
    """Remove what a gold build writes (its models, their quarantine, its helpers' state),
    keeping unify's outputs, so that the next build is a full one."""
    from c360ml.medallion.declarations import GOLD_MODELS, HELPERS

    for model in GOLD_MODELS:
        shutil.rmtree(lake_root / "gold" / model.name, ignore_errors=True)
        shutil.rmtree(lake_root / "quarantine" / "gold" / model.name, ignore_errors=True)
    for helper in HELPERS:
        shutil.rmtree(lake_root.joinpath(*helper.state), ignore_errors=True)


def gold_child(engine: str, lake_root: Path, remote: str = "") -> None:
    """Child process: one full gold build by `engine`; prints its figures as JSON."""
    settings = settings_at(lake_root, engine=engine, spark_remote=remote)
    session_s = 0.0
    if engine == "spark":
        from c360ml.spark import spark_session
        from c360ml.spark.gold import build_gold

        started = time.perf_counter()
        spark = spark_session(settings.spark_remote)
        session_s = time.perf_counter() - started
        started = time.perf_counter()
        summary = build_gold(settings, spark)
        seconds = time.perf_counter() - started
        spark.stop()
    else:
        from c360ml.medallion.build import build_gold

        started = time.perf_counter()
        summary = build_gold(settings)
        seconds = time.perf_counter() - started
    tables = {
        r.table: {"rows": r.rows, "quarantined": r.quarantined, "written": r.written}
        for r in summary.items
    }
    figures = {
        "engine": engine,
        "gold_s": round(seconds, 2),
        "session_s": round(session_s, 2),
        "peak_rss_mb": round(status_mb("self", "VmHWM"), 1),
        "tables": tables,
    }
    print("RESULT " + json.dumps(figures))


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


def one_build(engine: str, lake_root: Path, sail: Sail) -> dict:
    clear_gold(lake_root)
    args = [sys.executable, __file__, "--gold", engine, str(lake_root)]
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
        raise SystemExit(f"gold on {engine} failed")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["process_wall_s"] = round(wall, 2)
    result["load_1min_before"] = round(load, 2)
    if engine == "spark":
        result["server_rss_before_mb"] = round(server_before, 1)
        result["server_peak_rss_mb"] = round(status_mb(sail.proc.pid, "VmHWM"), 1)
        result["server_peak_reset"] = server_reset
    not_rebuilt = {
        t: v["written"] for t, v in result["tables"].items() if v["written"] != "rebuilt"
    }
    if not_rebuilt:
        raise SystemExit(f"gold on {engine}: not a full build: {not_rebuilt}")
    print(
        f"  gold ({engine}): {result['gold_s']} s, client/process peak "
        f"{result['peak_rss_mb']:.0f} MB"
        + (f", Sail peak {result['server_peak_rss_mb']:.0f} MB" if engine == "spark" else ""),
        file=sys.stderr,
        flush=True,
    )
    return result


def _rows(result: dict) -> dict:
    return {t: (v["rows"], v["quarantined"]) for t, v in result["tables"].items()}


def run(size: int, repeats: int = 3) -> dict:
    """Gold by DuckDB and by Spark (Sail, local mode) on the same silver and source map."""
    lake_root, before_gold, code = prepare(size)
    sail = Sail()
    try:
        warm = [one_build(e, lake_root, sail) for e in ("duckdb", "spark")]
        runs = [one_build(e, lake_root, sail) for _ in range(repeats) for e in ("duckdb", "spark")]
    finally:
        sail.stop()
    by = {e: [r for r in runs if r["engine"] == e] for e in ("duckdb", "spark")}
    counts = {_json_rows(r) for r in (*warm, *runs)}
    if len(counts) != 1:
        raise SystemExit(f"the engines' gold row counts differ: {counts}")

    def median(engine: str, key: str) -> float:
        return round(statistics.median(r[key] for r in by[engine]), 2)

    summary = {
        "duckdb": {
            "gold_s_median": median("duckdb", "gold_s"),
            "gold_s_runs": [r["gold_s"] for r in by["duckdb"]],
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in by["duckdb"]),
        },
        "spark": {
            "gold_s_median": median("spark", "gold_s"),
            "gold_s_runs": [r["gold_s"] for r in by["spark"]],
            "session_s_median": median("spark", "session_s"),
            "client_peak_rss_mb_max": max(r["peak_rss_mb"] for r in by["spark"]),
            "server_peak_rss_mb_max": max(r["server_peak_rss_mb"] for r in by["spark"]),
        },
    }
    return {
        "size": size,
        "repeats": repeats,
        **code,
        "versions": {p: version(p) for p in ("pysail", "pyspark", "duckdb", "deltalake")},
        "before_gold_duckdb_s": before_gold,
        "gold_tables": {t: {"rows": n, "quarantined": q} for t, (n, q) in _rows(runs[0]).items()},
        **summary,
        "warm_up": warm,
        "runs": runs,
    }


def _json_rows(result: dict) -> str:
    return json.dumps(_rows(result), sort_keys=True)


if __name__ == "__main__":
    if sys.argv[1] == "--prepare":
        prepare_child(Path(sys.argv[2]))
    elif sys.argv[1] == "--gold":
        gold_child(sys.argv[2], Path(sys.argv[3]), *(sys.argv[4:5]))
    else:
        raise SystemExit("internal entry points only: run benchmarks/run.py")
