"""`make bench STAGE=crash SIZES=<customers>`: SIGKILL a refresh at every one of its
commits, rerun it, and record per point whether gold, quarantine and state came out as
in the refresh that was not killed (and the silver accounting held).

The lake: `tests.crash.prepare` (built, champion trained, refreshed once, an increment and
rows silver rejects landed), under benchmarks/cache/crash-<size>/. The kill and the
comparison are tests/crash.py's, shared with tests/test_crash.py (which kills at a few
points per run).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import crash  # noqa: E402 (the repo root is on the path only from here)


def run(size: int, folder: Path, seed: int = 11) -> dict:
    """Every commit point of a refresh of a `size`-customer lake; the outcome per point
    (also written to folder/points.jsonl as it goes: a long run can be followed)."""
    base = folder / "base"
    if not (base / "c360ml.yaml").exists():
        shutil.rmtree(base, ignore_errors=True)
        crash.prepare(base, size, seed)
    ref = crash.reference(base, folder / "reference")
    progress = folder / "points.jsonl"
    progress.write_text("")
    outcomes = []
    for i, point in enumerate(ref.points[:-1]):
        started = time.perf_counter()
        # A folder per point: Lake caches tables by path, and a copy at the same path
        # can look like the table it cached.
        out = crash.kill_and_rerun(base, folder / f"killed{i}", point, ref)
        shutil.rmtree(folder / f"killed{i}")
        out |= {"index": i, "ok": not out["differences"] and not out.get("accounting")}
        out["seconds"] = round(time.perf_counter() - started, 2)
        outcomes.append(out)
        with progress.open("a") as fh:
            fh.write(json.dumps(out) + "\n")
        print(f"[{i + 1}/{len(ref.points) - 1}] {point}: {'ok' if out['ok'] else out}",
              file=sys.stderr, flush=True)  # fmt: skip
    failed = [o for o in outcomes if not o["ok"]]
    return {
        "customers": size,
        "commit_points": len(ref.points),
        "killed_at": len(outcomes),  # every point but the last (after it there is no work)
        "equal_after_rerun": len(outcomes) - len(failed),
        "failed": len(failed),
        "failed_points": "; ".join(o["point"] for o in failed)[:500],
        "refresh_s": ref.seconds,
        "rerun_s_median": sorted(o["rerun"]["seconds"] for o in outcomes)[len(outcomes) // 2],
        "points": outcomes,
    }
