"""Benchmark of the synthetic lake generator: wall time, peak memory, rows written.

Each run happens in a fresh Python process, so the peak resident set size (VmHWM from
/proc) belongs to that one generation and not to earlier, larger runs. The lake of each
size is kept under `cache_dir(size)` (lake/ and truth/) for the later stages to reuse.
The generator profile is the harness's (lake_cache.bench_profile(): BENCH_PROFILE, set by
`run.py --profile`), recorded in each result.
Target: 1,000,000 customers (~20M sales lines) in < 10 min and < 6 GB.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from lake_cache import bench_profile, profiled

log = logging.getLogger(__name__)

SMALL = 20_000  # sizes up to this are repeated to see the spread
REPEATS_SMALL = 3
SEED = 42

_CHILD = """
import json, sys, time
from pathlib import Path
from c360ml.config import Settings
from c360ml.synth import generate_lake
size, root = int(sys.argv[1]), Path(sys.argv[2])
settings = Settings(root=root, lake_root=root / "lake", truth_root=root / "truth")
started = time.perf_counter()
summary = generate_lake(
    settings, customers=size, seed=int(sys.argv[3]), fresh=True, profile=sys.argv[4]
)
wall = time.perf_counter() - started
peak_kb = 0
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        peak_kb = int(line.split()[1])
rows = summary.rows()
lines = sum(r["rows"] for r in rows if r["table"] in ("salesline", "retailtransactionsalestrans"))
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_kb / 1024,
                  "rows_written": sum(r["rows"] for r in rows), "sales_lines": lines}))
"""


def _landing_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "lake" / "landing").rglob("*") if p.is_file())


def measure(size: int, root: Path, seed: int = SEED, profile: str | None = None) -> dict:
    """One generation of `size` customers of `profile` (None: the harness's) into `root`,
    in a child process."""
    profile = profile or bench_profile()
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size), str(root), str(seed), profile],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(customers=size, profile=profile, landing_mb=_landing_bytes(root) / 2**20)
    return result


def run(sizes: list[int], out_dir: Path, cache_dir: Callable[[int], Path]) -> list[dict]:
    """Time generate_lake at each size; returns (and writes) one result dict per run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = bench_profile()
    results = []
    for size in sizes:
        repeats = REPEATS_SMALL if size <= SMALL else 1
        for repeat in range(repeats):
            result = measure(size, cache_dir(size), profile=profile)
            result.update(
                stage="generate",
                repeat=repeat,
                lines_per_s=result["sales_lines"] / result["wall_s"],
            )
            log.info(
                "generate %d customers: %.1fs, %.0f MB peak",
                size,
                result["wall_s"],
                result["peak_rss_mb"],
            )
            results.append(result)
    (out_dir / f"{profiled('generate', profile)}.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "10000").split(",")]
    repo = Path(__file__).resolve().parents[1]
    bench = repo / "data" / "bench"
    for row in run(sizes, repo / "benchmarks" / "results", lambda size: bench / str(size)):
        print(row)
