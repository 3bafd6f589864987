"""`python benchmarks/run.py --stage checks --sizes <rows>`: silver's row checks, before
and after #23, on generated batches of `rows` rows (salesline: five required columns and
a non-negative price; dirpersonname: required columns and an ordered validity period).

Before: `failed_checks` / `split_valid_arrow` of silver.py at 7c4d9a4 (Arrow compute,
hand-written from the Rules). After: the silver pandera schema's SQL checks, run by
DuckDB over the same Arrow table (`c360ml.medallion.checks`). Each is timed three times
(taking turns, after an untimed round), the median kept; both must reject the same rows
for the same reasons.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "7c4d9a4"  # the last commit with silver's hand-written Arrow checks
BAD_SHARE = 0.001  # rows given a defect per check (the demo lake rejects fewer)
REPEATS = 3


def old_silver() -> types.ModuleType:
    """silver.py as it was before #23, loaded as a module of its own."""
    text = subprocess.run(
        ["git", "show", f"{BEFORE}:src/c360ml/medallion/silver.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("silver_before_23")
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    exec(compile(text, "silver_before_23.py", "exec"), module.__dict__)
    return module


def generated(name: str, rows: int, seed: int = 7) -> pa.Table:
    """A silver batch of `name` (its silver Arrow schema), typed, with defects: nulls in
    the required columns, negative prices, periods that end before they start."""
    from c360ml.medallion.silver import silver_arrow_schema
    from c360ml.sources.tables import SOURCE_TABLES

    rng = np.random.default_rng(seed)
    table = next(t for t in SOURCE_TABLES.values() if t.name == name)
    schema = silver_arrow_schema(table)
    ids = np.arange(rows)
    start = np.datetime64("2020-01-01T00:00:00", "us") + rng.integers(0, 10**14, rows)
    columns = {}
    for f in schema:
        if pa.types.is_string(f.type):
            values = pc.binary_join_element_wise(f.name[:3], pa.array(ids).cast(pa.string()), "-")
        elif pa.types.is_integer(f.type):
            values = pa.array(ids)
        elif pa.types.is_floating(f.type):
            values = pa.array(rng.random(rows) * 100)
        elif pa.types.is_boolean(f.type):
            values = pa.array(rng.random(rows) < 0.5)
        else:
            offset = 10**12 if f.name == "validto" else 0
            values = pa.array(start + np.timedelta64(offset, "us")).cast(f.type)
        columns[f.name] = _spoil(f.name, values, rng, rows)
    return pa.table(columns).cast(schema)


def _spoil(column: str, values: pa.Array, rng: np.random.Generator, rows: int) -> pa.Array:
    bad = rng.random(rows) < BAD_SHARE
    if column in ("salesid", "itemid", "salesqty", "person", "validfrom"):
        return pc.if_else(pa.array(bad), pa.nulls(rows, values.type), values)
    if column == "salesprice":
        return pc.if_else(pa.array(bad), pc.negate(values), values)
    if column == "validto":  # before validfrom
        early = pc.subtract(values, pa.scalar(2 * 10**12, pa.duration("us")))
        return pc.if_else(pa.array(bad), early, values)
    return values


def _race(*calls: tuple[Callable, tuple]) -> list[tuple[float, object]]:
    """(median seconds, last result) per call. One untimed round first, then the calls
    take turns: whichever ran first would otherwise pay for the memory the process
    has not yet taken from the system (page faults on the batch-sized copies)."""
    times: list[list[float]] = [[] for _ in calls]
    results: list[object] = [None] * len(calls)
    for round_ in range(REPEATS + 1):
        for i, (fn, args) in enumerate(calls):
            results[i] = None  # (the previous result's memory back first)
            started = time.perf_counter()
            results[i] = fn(*args)
            if round_:
                times[i].append(time.perf_counter() - started)
    return [(round(statistics.median(t), 3), r) for t, r in zip(times, results, strict=True)]


def compare(old: types.ModuleType, name: str, rows: int) -> dict:
    """One table: seconds (median of 3) of the reasons alone and of the whole split,
    before and after, and the rows rejected (the same both ways, or this raises)."""
    from c360ml.medallion.checks import failures
    from c360ml.medallion.silver import SILVER_CHECKS, SILVER_SCHEMAS, split_valid_arrow
    from c360ml.sources.tables import SOURCE_TABLES

    source = next(t for t in SOURCE_TABLES.values() if t.name == name)
    batch, rules = generated(name, rows), old.RULES[name]
    (old_reasons_s, reasons), (new_reasons_s, (at, why)) = _race(
        (old.failed_checks, (batch, source, rules)), (failures, (batch, SILVER_CHECKS[name]))
    )
    (old_split_s, (_, old_bad)), (new_split_s, (_, new_bad)) = _race(
        (old.split_valid_arrow, (batch, source, rules)),
        (split_valid_arrow, (batch, SILVER_SCHEMAS[name])),
    )
    valid = pc.is_valid(reasons)
    before = (np.flatnonzero(valid.to_numpy(zero_copy_only=False)).tolist(),
              reasons.filter(valid).to_pylist())  # fmt: skip
    if before != (at.tolist(), why.to_pylist()) or len(old_bad) != len(new_bad):
        raise AssertionError(f"{name}: the checks before and after reject different rows")
    return {
        "rejected": len(new_bad),
        "reasons_s": {"before": old_reasons_s, "after": new_reasons_s},
        "split_s": {"before": old_split_s, "after": new_split_s},
    }


def run(rows: int) -> dict:
    """Both tables at `rows` rows each (see `compare`)."""
    old = old_silver()
    out = {"rows": rows, "before": BEFORE, "repeats": REPEATS, "tables": {}}
    for name in ("salesline", "dirpersonname"):
        out["tables"][name] = compare(old, name, rows)
        print(name, out["tables"][name], file=sys.stderr)
    return out


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
