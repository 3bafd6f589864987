"""Driver memory of `c360ml refresh --engine spark` (#28), one run per process.

`python benchmarks/spark_refresh_memory.py LABEL CUSTOMERS WORK` runs the refresh in this
process (the driver: c360ml's side of Spark Connect) against a Sail server started as a
child process, on the lake and MLflow store under WORK (a fresh copy of a lake made by
`c360ml generate --customers N`, `c360ml build all` and `c360ml train` on DuckDB), and
prints one `RESULT {json}` line: the driver's peak RSS (VmHWM) before the measures and
scores step, after it, before the report and at the end, and Sail's peak. Run it with PYTHONPATH at a
`git archive` of src/ to measure a given commit (the code is imported from there, Sail's
Python workers included). The figures of benchmarks/results/spark_refresh_memory.json
were made this way (its `method` names the commands)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SAIL = """
import sys
from pysail.spark import SparkConnectServer
server = SparkConnectServer(ip="127.0.0.1", port=0)
server.start(background=True)
host, port = server.listening_address
print(f"sc://{host}:{port}", flush=True)
sys.stdin.read()
server.stop()
"""


def hwm(pid="self", field="VmHWM"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)


def main():
    label, size, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    sail = subprocess.Popen(
        [sys.executable, "-c", SAIL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    remote = sail.stdout.readline().strip()
    os.environ.update(
        C360ML_LAKE_ROOT=str(work / "lake"),
        C360ML_MLFLOW_DIR=str(work / "mlflow"),
        C360ML_LOG_DIR=str(work / "logs"),
        C360ML_TRUTH_ROOT=str(work / "truth"),
        C360ML_REPORTS_DIR=str(work / "reports"),
        C360ML_SPARK_REMOTE=remote,
    )
    from c360ml import refresh
    from c360ml.cli import main as cli

    seen = {}
    inner = refresh.measures_and_scores

    def wrapped(*a, **k):
        seen["driver_hwm_before_scoring_mb"] = hwm()
        out = inner(*a, **k)
        seen["driver_hwm_after_scoring_mb"] = hwm()
        seen["driver_rss_after_scoring_mb"] = hwm(field="VmRSS")
        # pandas rows before #28's Spark outputs; a Spark DataFrame (no rows here) since
        seen["scores_frame_rows"] = len(out[1]) if hasattr(out[1], "__len__") else None
        seen["scores_returned_as"] = type(out[1]).__module__.split(".")[0]
        return out

    refresh.measures_and_scores = wrapped
    from c360ml import report

    build = report.build_report

    def reported(*a, **k):  # the mark before the report, which reads the tables itself
        seen["driver_hwm_before_report_mb"] = hwm()
        return build(*a, **k)

    report.build_report = reported
    started = time.perf_counter()
    rc = cli(["refresh", "--engine", "spark"])
    seconds = round(time.perf_counter() - started, 1)
    result = {
        "code": label,
        "customers": size,
        "rc": rc,
        "seconds": seconds,
        "driver_peak_rss_mb": hwm(),
        **seen,
        "sail_peak_rss_mb": hwm(sail.pid),
        "load_1min_end": os.getloadavg()[0],
    }
    sail.stdin.close()
    sail.wait(timeout=120)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the Spark Connect client's threads would keep the process alive


main()
