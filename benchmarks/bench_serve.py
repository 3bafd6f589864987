"""Serving benchmark: the BentoML service against `mlflow models serve`, same model.

`run(out_dir, model_dir)` trains a realistic model (120 float32 features, TrainConfig's
default size: depth 4, up to 300 trees) on a synthetic matrix, registers it as champion
in a throwaway MLflow sqlite store and copies it into a throwaway BentoML home (the way
`c360ml serve` does), then starts both servers on localhost and drives each with wrk
(a C load generator; bodies pre-built, one per request shape and explain method):

- single-row requests at concurrency 1, 16 and 64: requests/s, p50 and p99 latency;
- 1,000-row requests at concurrency 4: rows/s, p50 and p99 latency;
- each with explain none, approx and exact.

Both servers stay up but only one is under load at a time; every cell runs `repeats`
times, interleaved (repeat -> cell -> server) so a change in the machine's background
load hits both servers alike; medians are reported. The machine has 2 cores shared with
the load generator and other work: the 1-minute load average is recorded per run.
Then py-spy samples the BentoML processes under single-row load, and an in-process
breakdown times each step of one /predict call.

    .venv/bin/python benchmarks/bench_serve.py [--seconds 10] [--repeats 3]

Figures go to benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("bench_serve")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODEL_NAME = "c360-retention"
N_FEATURES = 120
TOKEN = "bench-token-" + "x" * 20
EXPLAINS = ("none", "approx", "exact")
# (shape, rows per request, concurrency)
CELLS = (("single", 1, 1), ("single", 1, 16), ("single", 1, 64), ("batch", 1000, 4))
TARGET_RATIO = 5.0
TARGET_P99_MS = 100.0


# --------------------------------------------------------------------------- the model


def synthetic_matrix(n_customers: int = 2500, n_cutoffs: int = 8, seed: int = 0):
    """A labelled float32 matrix with N_FEATURES features (~5% missing in a third of them)
    and a nonlinear label on a dozen of them, so the booster grows its full tree budget."""
    rng = np.random.default_rng(seed)
    names = [f"f_{i:03d}" for i in range(N_FEATURES)]
    ids = [f"cust-{i:06d}" for i in range(n_customers)]
    first = pd.Timestamp("2024-01-01", tz="UTC")
    frames, rfm = [], []
    for k in range(n_cutoffs):
        n = len(ids)
        f = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        f[:, 60:] = np.abs(f[:, 60:]) * rng.gamma(2, 20, N_FEATURES - 60).astype(np.float32)
        f[rng.random((n, N_FEATURES)) < 0.05 * (np.arange(N_FEATURES) % 3 == 0)] = np.nan
        g = np.nan_to_num(f[:, :12])
        margin = (
            1.2 * g[:, 0]
            - 0.9 * g[:, 1]
            + 0.7 * g[:, 2] * g[:, 3]
            + 0.6 * np.sin(2 * g[:, 4])
            + 0.5 * (g[:, 5] > 0.5)
            - 0.4 * np.abs(g[:, 6])
            + 0.3 * g[:, 7:12].sum(axis=1)
        )
        label = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int8)
        frame = pd.DataFrame(f, columns=names)
        frame.insert(0, "cutoff_time", first + pd.Timedelta(days=30 * k))
        frame.insert(0, "customer_id", ids)
        frame["label"] = label
        frames.append(frame)
        rfm.append(
            pd.DataFrame(
                {
                    "customer_id": ids,
                    "cutoff_time": first + pd.Timedelta(days=30 * k),
                    "recency_days": rng.uniform(0, 25, n) + 3 * label,
                    "frequency_365d": rng.poisson(4, n).astype(float),
                    "monetary_365d": rng.gamma(2, 50, n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True), pd.concat(rfm, ignore_index=True), tuple(names)


def make_model(model_dir: Path):
    """Train, register as champion in model_dir/mlflow, import into model_dir/bentoml.

    Returns (settings, request frame of the test cutoff, model facts). Reuses a champion
    already registered there."""
    from c360ml.config import Settings

    settings = Settings(root=ROOT, mlflow_dir=model_dir / "mlflow", model_name=MODEL_NAME)
    cache = model_dir / "requests.parquet"
    if not cache.exists():
        import mlflow

        from c360ml.model import pipeline, registry
        from c360ml.model.report import CardContext
        from c360ml.model.train import TrainConfig, train_and_evaluate

        matrix, rfm, names = synthetic_matrix()
        started = time.perf_counter()
        result = train_and_evaluate(
            matrix,
            names,
            rfm,
            90,
            TrainConfig(nthread=2, bootstrap_resamples=30, learning_rate=0.02),
        )
        log.info("trained %d trees in %.1f s", result.n_trees, time.perf_counter() - started)
        as_of = result.plan.test_cutoff
        bundle = registry.build_bundle(
            result, {n: "float32" for n in names}, None, {"prediction_window_days": 90}, as_of
        )
        test = matrix[matrix.cutoff_time == matrix.cutoff_time.max()]
        card = CardContext(
            model_name=MODEL_NAME,
            trained_as_of=pd.Timestamp(as_of),
            window_days=90,
            lookback_days=365,
            cutoff_spacing_days=30,
            sample_rate=1.0,
            population_rows=len(matrix),
            n_candidate_features=N_FEATURES,
            dropped_features=0,
            code_version="bench_serve",
        )
        mlflow.set_tracking_uri(settings.tracking_uri)
        _, decision = pipeline.log_and_gate(
            result,
            bundle,
            settings,
            {"trained_as_of": str(as_of)},
            card,
            lambda champion: test[["customer_id", *champion.feature_names]],
        )
        log.info("gate: %s", decision.label)
        request = test.rename(columns={"customer_id": "CustomerId"})[
            ["CustomerId", *bundle.feature_names]
        ].reset_index(drop=True)
        request.to_parquet(cache)
    env = server_env(settings, model_dir)
    code = (
        "from c360ml.config import load_settings; from c360ml.model.packaging import "
        "import_champion; print(import_champion(load_settings()).tag)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    import mlflow

    from c360ml.model.registry import load_bundle

    mlflow.set_tracking_uri(settings.tracking_uri)
    bundle = load_bundle(f"models:/{MODEL_NAME}@champion")
    facts = {
        "features": len(bundle.feature_names),
        "trees": bundle.booster.num_boosted_rounds(),
        "max_depth": int(bundle.metadata.get("params", {}).get("max_depth", 4)),
        "grade": bundle.metadata.get("grade"),
        "test_roc_auc": bundle.metadata.get("test_metrics", {}).get("test_roc_auc"),
    }
    return settings, pd.read_parquet(cache), facts, bundle


def server_env(settings, model_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "BENTOML_HOME": str(model_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "C360ML_MLFLOW_DIR": str(settings.mlflow_dir),
        "C360ML_MODEL_NAME": MODEL_NAME,
        "C360ML_API_TOKENS": TOKEN,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "PYTHONUNBUFFERED": "1",
        # `mlflow models serve` execs `uvicorn` from PATH: the venv's, as when activated
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("C360ML_DEV_NO_AUTH", None)
    return env


# --------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, ready: str, env: dict, logf: Path):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = logf
        self.handle = open(logf, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.handle, stderr=subprocess.STDOUT
        )
        self.cmd = " ".join(cmd)
        self._wait(ready)

    def _wait(self, path: str, seconds: float = 180) -> None:
        import httpx

        started = time.time()
        while time.time() < started + seconds:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    self.ready_s = round(time.time() - started, 1)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def settle(self, seconds: float = 90) -> float:
        """Wait until the server has finished the requests a stopped wrk left behind (its
        processes use < 5% of a core for half a second); returns the seconds waited."""
        started = time.time()
        last = self.cpu_seconds()
        while time.time() < started + seconds:
            time.sleep(0.5)
            now = self.cpu_seconds()
            if now - last < 0.025:
                break
            last = now
        return round(time.time() - started, 1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.handle.close()


def start_bentoml(env: dict, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:RetentionService"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    return Server("bentoml", cmd, port, "/readyz", env, work / "bentoml.log")


def start_mlflow(env: dict, work: Path) -> Server:
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "models", "serve", "-m", f"models:/{MODEL_NAME}@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    return Server("mlflow", cmd, port, "/ping", env, work / "mlflow.log")


# --------------------------------------------------------------------------- request bodies


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def body(server: str, frame: pd.DataFrame, explain: str) -> str:
    """The request each server documents: BentoML {"rows": [records], "explain"}; MLflow
    {"dataframe_split": ..., "params": {"explain"}} (the signature carries `explain`)."""
    if server == "bentoml":
        return json.dumps({"rows": records(frame), "explain": explain})
    split = json.loads(frame.to_json(orient="split", index=False))
    return json.dumps({"dataframe_split": split, "params": {"explain": explain}})


def path_of(server: str) -> str:
    return "/predict" if server == "bentoml" else "/invocations"


def write_bodies(work: Path, request: pd.DataFrame) -> dict[tuple[str, str, str], Path]:
    """One file of pre-built bodies (one per line) per (server, shape, explain): 200
    different single rows, 4 different 1,000-row tables (unique CustomerIds each)."""
    rng = np.random.default_rng(7)
    singles = [request.iloc[[i]] for i in rng.choice(len(request), 200, replace=False)]
    tables = []
    for k in range(4):
        t = request.sample(1000, replace=len(request) < 1000, random_state=k).copy()
        t["CustomerId"] = [f"t{k}-{i}" for i in range(1000)]
        tables.append(t.reset_index(drop=True))
    out = {}
    for server in ("bentoml", "mlflow"):
        for shape, frames in (("single", singles), ("batch", tables)):
            for explain in EXPLAINS:
                p = work / "bodies" / f"{server}-{shape}-{explain}.jsonl"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("".join(body(server, f, explain) + "\n" for f in frames))
                out[server, shape, explain] = p
    return out


def check_servers(servers: dict[str, Server], request: pd.DataFrame, bundle) -> dict:
    """Both servers answer the same rows with the same scores (and what a reply weighs)."""
    import httpx

    from c360ml.model.scoring import score

    frame = request.head(20)
    want = score(bundle, frame, "approx")
    out = {}
    for name, server in servers.items():
        reply = httpx.post(
            server.url + path_of(name),
            content=body(name, frame, "approx"),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            timeout=60,
        )
        reply.raise_for_status()
        doc = reply.json()
        preds = doc["predictions"]
        got = [p["ChurnScore"] for p in preds]
        np.testing.assert_allclose(got, want.ChurnScore, rtol=1e-5)
        top = [p["InfluentialFactors"][0]["feature"] for p in preds]
        assert top == [f[0]["feature"] for f in want.InfluentialFactors], name
        out[name] = {"same_scores_as_in_process": True, "reply_bytes_20_rows": len(reply.content)}
    return out


# --------------------------------------------------------------------------- wrk

LUA = r"""
local bodies, n, i = {}, 0, 0
for line in io.lines(os.getenv("BENCH_BODIES")) do n = n + 1; bodies[n] = line end
local path = os.getenv("BENCH_PATH")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
request = function()
  i = i % n + 1
  return wrk.format(nil, path, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,'
    .. '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk(url: str, bodies: Path, path: str, conns: int, seconds: float, lua: Path) -> dict:
    env = {
        **os.environ,
        "BENCH_BODIES": str(bodies),
        "BENCH_PATH": path,
        "BENCH_TOKEN": TOKEN,
    }
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "60s",
        "-s",
        str(lua),
        url,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    return json.loads(line[len("RESULT ") :])


def measure(server: Server, bodies: Path, conns: int, rows: int, seconds, warmup, lua) -> dict:
    path = path_of(server.name)
    server.settle()
    wrk(server.url, bodies, path, conns, warmup, lua)  # warm-up, discarded
    server.settle()
    load = os.getloadavg()[0]
    cpu0 = server.cpu_seconds()
    r = wrk(server.url, bodies, path, conns, seconds, lua)
    cpu = server.cpu_seconds() - cpu0
    server.settle()  # not counted: requests wrk abandoned at the end of its run
    secs = r["duration_us"] / 1e6
    errors = sum(r[k] for k in r if k.startswith("err_"))
    return {
        "requests": r["requests"],
        "errors": errors,
        "rps": round(r["requests"] / secs, 2),
        "rows_per_s": round(r["requests"] * rows / secs, 1),
        "p50_ms": round(r["p50_us"] / 1000, 2),
        "p90_ms": round(r["p90_us"] / 1000, 2),
        "p99_ms": round(r["p99_us"] / 1000, 2),
        "max_ms": round(r["max_us"] / 1000, 2),
        "server_cpu_s_per_req_ms": round(1000 * cpu / max(r["requests"], 1), 2),
        "server_cores_busy": round(cpu / secs, 2),
        "loadavg_1m_before": round(load, 2),
    }


# --------------------------------------------------------------------------- profile


# Where a py-spy sample's time went. Libraries that own a whole computation (SHAP,
# XGBoost, pandera) count wherever they are on the stack; everything else by the frame
# nearest the leaf that matches, so framework layers are not all charged to uvicorn.
OWNERS = (
    ("SHAP (xgboost pred_contribs)", ("contributions (",)),
    ("xgboost predict", ("xgboost/",)),
    ("pandera validation", ("pandera/",)),
)
LEAF_CATEGORIES = (
    ("pandas/numpy", ("pandas/", "numpy/")),
    ("pydantic (BentoML IO models)", ("pydantic",)),
    ("inner hop: pickle/JSON serde", ("_bentoml_impl/serde", "pickle")),
    ("JSON encode/decode", ("json/", "orjson")),
    ("OpenTelemetry tracing", ("opentelemetry", "trace/")),
    ("Prometheus metrics", ("prometheus_client",)),
    ("logging", ("logging/",)),
    ("inner hop: aiohttp client", ("aiohttp", "_bentoml_impl/client")),
    ("BentoML batching dispatcher", ("dispatcher",)),
    ("HTTP server (uvicorn/h11/httptools)", ("uvicorn/", "h11/", "httptools")),
    ("starlette", ("starlette/",)),
    ("BentoML server/middleware", ("_bentoml_impl/", "bentoml/", "_bentoml_sdk/")),
    ("c360ml service code", ("service.py", "c360ml/")),
    ("asyncio loop / socket I/O", ("asyncio/", "selectors")),
)


def categorize(stack: str) -> str:
    frames = stack.split(";")
    for name, needles in OWNERS:
        if any(n in frame for frame in frames for n in needles):
            return name
    for frame in reversed(frames):
        for name, needles in LEAF_CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def py_spy_profile(server: Server, bodies: Path, conns: int, seconds: float, lua, work: Path):
    """py-spy on every process of the server while wrk loads it; samples by category per
    process (the outer API service vs the inner Scorer) and the top leaf functions."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    pids = [p for p in server.pids() if p != server.proc.pid]
    import psutil

    procs, outs = [], {}
    for pid in pids:
        cmdline = " ".join(psutil.Process(pid).cmdline())
        if "multiprocessing" in cmdline or "resource_tracker" in cmdline:
            continue
        out = work / f"pyspy-{pid}.txt"
        cmd = [str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200"]
        cmd += ["-f", "raw", "-o", str(out), "--nonblocking"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        outs[pid] = (out, cmdline)
    time.sleep(0.5)
    load = wrk(server.url, bodies, path_of(server.name), conns, seconds - 1, lua)
    errs = [p.communicate()[1].decode()[-500:] for p in procs]
    result: dict[str, Any] = {"requests": load["requests"], "processes": {}}
    for pid, (out, cmdline) in outs.items():
        if not out.exists():
            result["processes"][str(pid)] = {"cmdline": cmdline[-120:], "error": errs}
            continue
        by_cat: Counter = Counter()
        leaf: Counter = Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            by_cat[categorize(stack)] += n
            leaf[stack.split(";")[-1].strip()] += n
        if not total:
            continue
        kind = "scorer" if "Scorer" in cmdline or "c360-scorer" in cmdline else "api"
        if "--worker-id" not in cmdline and "worker" not in cmdline:
            kind = "arbiter"
        result["processes"][f"{kind}-{pid}"] = {
            "cmdline": cmdline[-160:],
            "samples": total,
            "busy_share_of_wall": round(total / (200 * seconds), 3),
            "by_category_pct": {k: round(100 * v / total, 1) for k, v in by_cat.most_common()},
            "top_leaf_pct": {k: round(100 * v / total, 1) for k, v in leaf.most_common(12)},
        }
    return result


def step_breakdown(bundle, request: pd.DataFrame, repeats: int = 200) -> dict:
    """In-process cost (ms per call) of each step a /predict call takes, for one row and
    for 1,000 rows, without HTTP: the functions the service runs (typed decode, block,
    scoring on one XGBoost thread as the API process does, reply), the pandera path that
    rows which do not decode take, the hop of small requests to the inner scorer, and
    BentoML's pydantic IO that /predict no longer goes through."""
    import pickle

    import msgspec
    import pydantic

    from c360ml.model import scoring

    class Body(pydantic.BaseModel):  # what BentoML built from the old predict's signature
        rows: list[dict[str, Any]]
        explain: str = "approx"

    from c360ml.serving import feature_frame as _frame
    from c360ml.serving import plain_matrix, request_decoder
    from c360ml.serving import records as _records

    decoder = request_decoder(bundle.feature_names)
    local = dataclasses.replace(bundle, booster=bundle.booster.copy(), nthread=1)
    local.booster.set_param({"nthread": 1})  # as the service's API process scores

    def t(fn, n):
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return round(1000 * (time.perf_counter() - started) / n, 3)

    def pandera_path(raw):
        frame = scoring.validate_request(bundle, pd.DataFrame(json.loads(raw)["rows"]))
        return scoring.feature_matrix(bundle, frame)

    def steps(frame: pd.DataFrame, n: int) -> dict[str, float]:
        raw = json.dumps({"rows": records(frame), "explain": "none"}).encode()
        parsed = Body.model_validate_json(raw)
        doc = decoder.decode(raw)
        ids, x = plain_matrix(doc.rows)
        items = [(i, "none", row.tobytes()) for i, row in zip(ids, x, strict=True)]
        scored = scoring.score(local, _frame(local, ids, x), "approx", validate=False)
        reply = {"model": {"explain": "approx"}, "predictions": _records(scored)}

        def score(explain):
            return scoring.score(local, _frame(local, ids, x), explain, validate=False)

        return {
            "old: BentoML pydantic parse of the body": t(lambda: Body.model_validate_json(raw), n),
            "old: BentoML model_dump": t(parsed.model_dump, n),
            "msgspec typed decode": t(lambda: decoder.decode(raw), n),
            "plain_matrix (ids + float32 block)": t(lambda: plain_matrix(doc.rows), n),
            "pandera path (rows that do not decode)": t(lambda: pandera_path(raw), n),
            "inner hop (< 256 rows): pickle of items": t(
                lambda: pickle.loads(pickle.dumps(items)), n
            ),
            "xgboost margins (1 thread)": t(lambda: scoring.margins(local, x), n),
            "score(none), 1 thread": t(lambda: score("none"), n),
            "score(approx), 1 thread": t(lambda: score("approx"), n),
            "score(exact), 1 thread": t(lambda: score("exact"), max(n // 10, 2)),
            "_records (approx)": t(lambda: _records(scored), n),
            "reply JSON (approx, msgspec)": t(lambda: msgspec.json.encode(reply), n),
        }

    table = request.sample(1000, replace=True, random_state=0).reset_index(drop=True)
    table["CustomerId"] = [f"s{i}" for i in range(1000)]
    return {"1_row": steps(request.head(1), repeats), "1000_rows": steps(table, 5)}


# --------------------------------------------------------------------------- run


def versions() -> dict[str, str]:
    import bentoml
    import mlflow
    import pandera
    import xgboost

    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "python": platform.python_version(),
        "bentoml": bentoml.__version__,
        "mlflow": mlflow.__version__,
        "xgboost": xgboost.__version__,
        "pandas": pd.__version__,
        "pandera": pandera.__version__,
        "wrk": wrk_v.strip(),
        "cpus": str(os.cpu_count()),
    }


def run(
    out_dir: Path,
    model_dir: Path | None = None,
    seconds: float = 10,
    warmup: float = 2,
    repeats: int = 3,
    servers_to_run: tuple[str, ...] = ("bentoml", "mlflow"),
    profile: bool = True,
    label: str = "",
    baseline: Path | None = None,
    findings: Path | None = None,
) -> list[dict]:
    """Every (server, shape, concurrency, explain) cell, medians of `repeats` runs; writes
    out_dir/serve.json and out_dir/serve.md and returns the cells."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        model_dir = Path(tmp.name)
    model_dir.mkdir(parents=True, exist_ok=True)
    work = model_dir / "run"
    work.mkdir(exist_ok=True)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    settings, request, facts, bundle = make_model(model_dir)
    log.info("model: %s", facts)
    env = server_env(settings, model_dir)
    lua = work / "post.lua"
    lua.write_text(LUA)
    bodies = write_bodies(work, request)
    servers: dict[str, Server] = {}
    raw: dict[tuple, list[dict]] = defaultdict(list)
    profile_out: dict[str, Any] = {}
    try:
        for name in servers_to_run:
            servers[name] = (start_bentoml if name == "bentoml" else start_mlflow)(env, work)
            log.info("%s ready in %s s", name, servers[name].ready_s)
        check = check_servers(servers, request, bundle)
        for rep in range(repeats):
            for shape, rows, conns in CELLS:
                for explain in EXPLAINS:
                    for name, server in servers.items():
                        m = measure(
                            server, bodies[name, shape, explain], conns, rows, seconds, warmup, lua
                        )
                        raw[name, shape, rows, conns, explain].append(m)
                        log.info("rep %d %s %s c%d %s: %s", rep, name, shape, conns, explain, m)
        if profile and "bentoml" in servers:
            for name in servers:
                if name != "bentoml":  # profile with nothing else running
                    servers[name].stop()
            profile_out = {
                "load": "single-row, concurrency 16, explain none, 12 s, py-spy 200 Hz",
                "bentoml": py_spy_profile(
                    servers["bentoml"], bodies["bentoml", "single", "none"], 16, 12, lua, work
                ),
            }
            profile_out["steps_ms_in_process"] = step_breakdown(bundle, request)
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.stop()
    cells = []
    for (name, shape, rows, conns, explain), runs in raw.items():
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in runs[0]
            if k not in ("requests", "errors")
        }
        cells.append(
            {
                "server": name,
                "shape": shape,
                "rows_per_request": rows,
                "concurrency": conns,
                "explain": explain,
                **{k: round(v, 2) for k, v in med.items()},
                "errors_total": sum(r["errors"] for r in runs),
                "runs": runs,
            }
        )
    doc = {
        "date": started_at,
        "label": label,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds_per_run": seconds,
        "warmup_s": warmup,
        "repeats": repeats,
        "load_generator": "wrk -t1 (one thread), --timeout 60s, closed loop, localhost",
        "servers": {n: {"command": s.cmd, "ready_s": s.ready_s} for n, s in servers.items()},
        "model": facts,
        "versions": versions(),
        "check": check,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "cells": cells,
        "targets": targets(cells),
        "profile": profile_out,
    }
    if baseline is not None:  # an earlier run to compare with (same cells format)
        doc["baseline"] = json.loads(baseline.read_text())
    if findings is not None:  # prose written after looking at the figures
        doc["findings"] = findings.read_text()
    (out_dir / "serve.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "serve.md").write_text(markdown(doc))
    if tmp is not None:
        tmp.cleanup()
    return cells


def _cell(cells, server, shape, conns, explain):
    return next(
        (
            c
            for c in cells
            if (c["server"], c["shape"], c["concurrency"], c["explain"])
            == (server, shape, conns, explain)
        ),
        None,
    )


def targets(cells: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for shape, conns in (("single", 1), ("single", 16), ("single", 64), ("batch", 4)):
        for explain in EXPLAINS:
            b = _cell(cells, "bentoml", shape, conns, explain)
            m = _cell(cells, "mlflow", shape, conns, explain)
            if b and m and m["rows_per_s"]:
                key = f"{shape}_c{conns}_{explain}_ratio"
                out[key] = round(b["rows_per_s"] / m["rows_per_s"], 2)
    p99 = _cell(cells, "bentoml", "single", 16, "none")
    out["single_c16_none_p99_ms"] = p99["p99_ms"] if p99 else None
    single = [out.get(f"single_c{c}_none_ratio") for c in (1, 16, 64)]
    out["met_5x_single_none"] = all(r is not None and r >= TARGET_RATIO for r in single)
    out["met_5x_batch_none"] = (out.get("batch_c4_none_ratio") or 0) >= TARGET_RATIO
    out["met_p99_c16"] = p99 is not None and p99["p99_ms"] < TARGET_P99_MS
    return out


def markdown(doc: dict) -> str:
    cells = doc["cells"]
    lines = [
        "# Serving benchmark: BentoML service vs `mlflow models serve`",
        "",
        f"{doc['date']} — `{doc['command']}` — {doc['label']}".rstrip(" —"),
        "",
        f"Model: {doc['model']['features']} float32 features, {doc['model']['trees']} trees, "
        f"depth {doc['model']['max_depth']} (synthetic, registered as champion; both servers "
        "serve the same registered version). "
        f"Load: {doc['load_generator']}; {doc['warmup_s']} s warm-up then "
        f"{doc['seconds_per_run']} s per run; median of {doc['repeats']} interleaved runs. "
        f"2 cores shared by server, load generator and other work (1-min load average before "
        f"each run is in serve.json; at the end {doc['loadavg_at_end']}).",
        "",
        "| shape | conc. | explain | BentoML req/s | BentoML rows/s | p50 ms | p99 ms | "
        "MLflow req/s | MLflow rows/s | p50 ms | p99 ms | ratio | BentoML CPU ms/req | "
        "MLflow CPU ms/req | errors B/M |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, _, conns in CELLS:
        for explain in EXPLAINS:
            b = _cell(cells, "bentoml", shape, conns, explain) or {}
            m = _cell(cells, "mlflow", shape, conns, explain) or {}
            ratio = (
                f"{b['rows_per_s'] / m['rows_per_s']:.1f}×"
                if b.get("rows_per_s") and m.get("rows_per_s")
                else ""
            )
            rows = "1" if shape == "single" else "1,000"
            lines.append(
                f"| {rows} row(s) | {conns} | {explain} | {b.get('rps', '')} | "
                f"{b.get('rows_per_s', '')} | {b.get('p50_ms', '')} | {b.get('p99_ms', '')} | "
                f"{m.get('rps', '')} | {m.get('rows_per_s', '')} | {m.get('p50_ms', '')} | "
                f"{m.get('p99_ms', '')} | {ratio} | {b.get('server_cpu_s_per_req_ms', '')} | "
                f"{m.get('server_cpu_s_per_req_ms', '')} | "
                f"{b.get('errors_total', '')}/{m.get('errors_total', '')} |"
            )
    t = doc["targets"]
    lines += [
        "",
        f"Targets: ≥ {TARGET_RATIO:g}× MLflow with explain=none — single-row "
        f"{'met' if t.get('met_5x_single_none') else 'NOT met'}, 1,000-row "
        f"{'met' if t.get('met_5x_batch_none') else 'NOT met'}; single-row p99 at "
        f"concurrency 16 = {t.get('single_c16_none_p99_ms')} ms "
        f"({'met' if t.get('met_p99_c16') else 'NOT met'}, target < {TARGET_P99_MS:g} ms).",
        "",
    ]
    prof = doc.get("profile") or {}
    if prof.get("bentoml"):
        lines += [f"## Profile ({prof['load']})", ""]
        for proc, p in prof["bentoml"].get("processes", {}).items():
            if "by_category_pct" not in p:
                continue
            cats = ", ".join(f"{k} {v}%" for k, v in p["by_category_pct"].items())
            lines.append(
                f"- **{proc}** ({p['samples']} samples, busy {p['busy_share_of_wall']:.0%} of "
                f"wall): {cats}"
            )
        lines.append("")
    steps = prof.get("steps_ms_in_process")
    if steps:
        lines += ["## In-process cost of each /predict step (ms per call)", ""]
        lines += ["| step | 1 row | 1,000 rows |", "|---|---|---|"]
        for k in steps["1_row"]:
            lines.append(f"| {k} | {steps['1_row'][k]} | {steps['1000_rows'][k]} |")
        lines.append("")
    base = doc.get("baseline")
    if base:
        lines += [
            f"## BentoML before / after ({base.get('label', '')})",
            "",
            "| shape | conc. | explain | before req/s | before p50 / p99 ms | before errors | "
            "after req/s | after p50 / p99 ms | after errors | MLflow req/s then / now |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for shape, _, conns in CELLS:
            for explain in EXPLAINS:
                old = _cell(base["cells"], "bentoml", shape, conns, explain) or {}
                new = _cell(cells, "bentoml", shape, conns, explain) or {}
                mo = _cell(base["cells"], "mlflow", shape, conns, explain) or {}
                mn = _cell(cells, "mlflow", shape, conns, explain) or {}
                lines.append(
                    f"| {shape} | {conns} | {explain} | {old.get('rps', '')} | "
                    f"{old.get('p50_ms', '')} / {old.get('p99_ms', '')} | "
                    f"{old.get('errors_total', '')} | {new.get('rps', '')} | "
                    f"{new.get('p50_ms', '')} / {new.get('p99_ms', '')} | "
                    f"{new.get('errors_total', '')} | {mo.get('rps', '')} / {mn.get('rps', '')} |"
                )
        lines.append("")
        for proc, p in (
            ((base.get("profile") or {}).get("bentoml") or {}).get("processes", {}).items()
        ):
            if "by_category_pct" in p:
                cats = ", ".join(f"{k} {v}%" for k, v in p["by_category_pct"].items())
                lines.append(f"- before, py-spy **{proc}** ({p['samples']} samples): {cats}")
        lines.append("")
    if doc.get("findings"):
        lines += ["## Findings", "", doc["findings"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", default="bentoml,mlflow")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--label", default="")
    parser.add_argument("--baseline", type=Path, help="JSON with the cells of an earlier run")
    parser.add_argument("--findings", type=Path, help="markdown findings to include")
    parser.add_argument("--render", action="store_true", help="only rewrite serve.md from json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.render:
        doc = json.loads((args.out / "serve.json").read_text())
        if args.baseline:
            doc["baseline"] = json.loads(args.baseline.read_text())
        if args.findings:
            doc["findings"] = args.findings.read_text()
        (args.out / "serve.json").write_text(json.dumps(doc, indent=1))
        (args.out / "serve.md").write_text(markdown(doc))
        return
    cells = run(
        args.out,
        args.model_dir,
        seconds=args.seconds,
        warmup=args.warmup,
        repeats=args.repeats,
        servers_to_run=tuple(args.servers.split(",")),
        profile=not args.no_profile,
        label=args.label,
        baseline=args.baseline,
        findings=args.findings,
    )
    print(json.dumps(targets(cells), indent=1))


if __name__ == "__main__":
    main()
