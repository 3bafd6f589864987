"""Scale benchmark of the feature stage: labels, population and feature matrices.

Runs on the real gold lake when one exists (`run(read_gold(lake), as_of, out_dir)`), or on a
synthetic gold made here (`make_synthetic_gold`) until the medallion pipeline delivers one.
The synthetic gold follows the gold contract (schemas.py) with a simple churn process:
each customer buys at a personal Poisson rate until a personal exponential lifetime ends.

    .venv/bin/python benchmarks/bench_features.py --customers 100000 --labels-customers 1000000

Writes `benchmarks/results/features.json` (one record per measurement) and logs a summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from c360ml.features import (
    GoldTables,
    active_population,
    calculate_features,
    compute_labels,
    compute_rfm,
    derive_feature_set,
    load_churn_config,
    training_cutoffs,
)

log = logging.getLogger("bench_features")
ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "features" / "retention.yaml"
UTC = "UTC"


def _ids(prefix: str, n: int) -> np.ndarray:
    return (prefix + pd.Series(np.arange(n)).astype(str).str.zfill(8)).to_numpy(object)


def make_synthetic_gold(
    customers: int,
    seed: int = 0,
    start: str = "2023-01-01",
    end: str = "2025-12-31",
    lines: bool = True,
    orders_per_year: float = 4.0,
) -> GoldTables:
    """A gold lake's worth of frames with a known churn process (vectorised, ~1 s / 100k)."""
    rng = np.random.default_rng(seed)
    t0, t1 = pd.Timestamp(start, tz=UTC), pd.Timestamp(end, tz=UTC)
    span = (t1 - t0).total_seconds()
    cust_ids = _ids("C", customers)
    created = t0.value + (rng.random(customers) ** 2 * span * 0.8 * 1e9).astype(np.int64)
    life = rng.exponential(500, customers) * 86_400e9  # days of activity, then churn
    stop = np.minimum(created + life.astype(np.int64), t1.value)
    rate = rng.gamma(2.0, orders_per_year / 2.0, customers) / (365 * 86_400e9)
    n_orders = rng.poisson(rate * (stop - created))
    n = int(n_orders.sum())
    cust = np.repeat(np.arange(customers), n_orders)
    ts = created[cust] + (rng.random(n) * (stop - created)[cust]).astype(np.int64)
    is_return = rng.random(n) < 0.05
    gross = np.round(rng.lognormal(3.5, 0.8, n), 2)
    discount = np.round(gross * rng.choice([0, 0, 0, 0.1, 0.2], n), 2)
    net = np.where(is_return, -(gross - discount), gross - discount)
    cancelled = rng.random(n) < 0.03
    order_ids = _ids("SO:", n)
    order_ts = pd.to_datetime(ts, utc=True).as_unit("us")
    orders = pd.DataFrame(
        {
            "order_id": order_ids,
            "customer_id": cust_ids[cust],
            "order_ts": order_ts,
            "channel": rng.choice(["online", "store", "call-center"], n, p=[0.5, 0.4, 0.1]),
            "store": rng.choice(["S1", "S2", "S3", "S4"], n),
            "currency": "USD",
            "gross_amount": gross,
            "discount_amount": discount,
            "net_amount": net,
            "item_count": rng.integers(1, 5, n).astype(float),
            "is_return": is_return,
            "status": np.where(cancelled, "cancelled", "invoiced"),
            "is_cancelled": cancelled,
        }
    )
    # History: one open row, or open -> cancelled a few days later.
    cancel_ts = order_ts[cancelled] + pd.to_timedelta(rng.integers(1, 20, cancelled.sum()), "D")
    order_status = pd.concat(
        [
            pd.DataFrame(
                {
                    "entity_id": order_ids,
                    "status": np.where(cancelled, "open", "invoiced"),
                    "is_cancelled": False,
                    "valid_from": order_ts,
                    "valid_to": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]"),
                }
            ),
            pd.DataFrame(
                {
                    "entity_id": order_ids[cancelled],
                    "status": "cancelled",
                    "is_cancelled": True,
                    "valid_from": cancel_ts,
                    "valid_to": pd.NaT,
                }
            ),
        ],
        ignore_index=True,
    )
    order_status.loc[np.flatnonzero(cancelled), "valid_to"] = cancel_ts
    order_status["valid_to"] = pd.to_datetime(order_status["valid_to"], utc=True).dt.as_unit("us")
    products = pd.DataFrame(
        {
            "item_id": _ids("I", 200),
            "name": _ids("Item ", 200),
            "category": np.array([f"cat{i % 8}" for i in range(200)], dtype=object),
        }
    )
    if lines:
        per = rng.integers(1, 4, n)
        li = np.repeat(np.arange(n), per)
        item = rng.integers(0, 200, len(li))
        share = rng.dirichlet(np.ones(3), n)
        line_no = np.arange(len(li)) - np.repeat(np.cumsum(per) - per, per)
        order_lines = pd.DataFrame(
            {
                "order_id": order_ids[li],
                "line": line_no + 1,
                "item_id": products["item_id"].to_numpy()[item],
                "category": products["category"].to_numpy()[item],
                "qty": rng.integers(1, 3, len(li)).astype(float),
                "unit_price": np.round(gross[li] / per[li], 2),
                "net_amount": np.round(net[li] * share[li, line_no] / share[li, :3].sum(1), 2),
                "is_return": is_return[li],
            }
        )
    else:
        order_lines = pd.DataFrame(
            {c: pd.Series(dtype=d) for c, d in [("order_id", object), ("line", int)]}
            | {"item_id": pd.Series(dtype=object), "category": pd.Series(dtype=object)}
            | {k: pd.Series(dtype=float) for k in ("qty", "unit_price", "net_amount")}
            | {"is_return": pd.Series(dtype=bool)}
        )
    n_cases = rng.poisson(0.3 * customers)
    case_cust = rng.integers(0, customers, n_cases)
    case_ts = created[case_cust] + (rng.random(n_cases) * (t1.value - created[case_cust])).astype(
        np.int64
    )
    case_ts = pd.to_datetime(case_ts, utc=True).as_unit("us")
    case_ids = _ids("CASE", n_cases)
    resolved_ts = case_ts + pd.to_timedelta(rng.integers(1, 30, n_cases), "D")
    support_cases = pd.DataFrame(
        {
            "case_id": case_ids,
            "customer_id": cust_ids[case_cust],
            "created_ts": case_ts,
            "case_type": rng.choice(["question", "problem", "request"], n_cases),
            "priority": rng.choice(["low", "normal", "high"], n_cases, p=[0.3, 0.5, 0.2]),
            "title": "case",
            "status": np.where(resolved_ts <= t1, "resolved", "active"),
        }
    )
    case_status = pd.concat(
        [
            pd.DataFrame(
                {
                    "entity_id": case_ids,
                    "status": "active",
                    "is_cancelled": False,
                    "valid_from": case_ts,
                    "valid_to": resolved_ts,
                }
            ),
            pd.DataFrame(
                {
                    "entity_id": case_ids,
                    "status": "resolved",
                    "is_cancelled": False,
                    "valid_from": resolved_ts,
                    "valid_to": pd.Series(pd.NaT, index=range(n_cases)),
                }
            ),
        ],
        ignore_index=True,
    )
    case_status["valid_to"] = pd.to_datetime(case_status["valid_to"], utc=True).dt.as_unit("us")
    none = [None] * customers
    customers_df = pd.DataFrame(
        {
            "customer_id": cust_ids,
            "first_name": none,
            "last_name": none,
            "full_name": none,
            "email": none,
            "phone": none,
            "street": none,
            "city": none,
            "postal_code": none,
            "country": "US",
            "customer_group": rng.choice(["retail", "vip"], customers),
            "currency": "USD",
            "created_ts": pd.to_datetime(created, utc=True).as_unit("us"),
            "source_count": 1,
            "sources": "d365",
        }
    )
    return GoldTables(
        customers=customers_df,
        orders=orders,
        order_lines=order_lines,
        products=products,
        support_cases=support_cases,
        order_status=order_status,
        case_status=case_status,
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn: Callable, repeats: int) -> tuple[object, list[float]]:
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def run(gold: GoldTables, as_of: pd.Timestamp, out_dir: Path, repeats: int = 3) -> list[dict]:
    """Time labels (population x 12 cutoffs) and the feature matrix for the active population."""
    cfg = load_churn_config(SPEC)
    cutoffs = training_cutoffs(cfg, as_of)
    n_customers, n_orders = len(gold.customers), len(gold.orders)
    records: list[dict] = []

    def record(step: str, times: list[float], **extra) -> None:
        rec = {
            "step": step,
            "customers": n_customers,
            "orders": n_orders,
            "cutoffs": len(cutoffs),
            "wall_s_best": round(min(times), 3),
            "wall_s_all": [round(t, 3) for t in times],
            "peak_rss_mb": round(_peak_rss_mb()),
            **extra,
        }
        records.append(rec)
        log.info("%s", rec)

    labels, times = _time(lambda: compute_labels(gold, cutoffs, cfg), repeats)
    record("compute_labels", times, rows=len(labels), churn_rate=float(labels["label"].mean()))
    _, times = _time(lambda: active_population(gold, cutoffs, cfg), repeats)
    record("active_population", times)
    rfm, times = _time(lambda: compute_rfm(gold, cutoffs), repeats)
    record("compute_rfm", times, rows=len(rfm))
    if len(gold.order_lines):
        fs, times = _time(lambda: derive_feature_set(gold, SPEC), 1)
        record("derive_feature_set", times, features=len(fs.names))
        population = labels[["customer_id", "cutoff_time"]]
        matrix, times = _time(lambda: calculate_features(gold, population, fs), 1)
        record(
            "calculate_features",
            times,
            rows=len(matrix),
            features=len(fs.names),
            matrix_mb=round(matrix.memory_usage(deep=True).sum() / 2**20),
            all_float32=bool((matrix[fs.names].dtypes == np.float32).all()),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "features.json").write_text(json.dumps(records, indent=1))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000, help="features benchmark")
    parser.add_argument("--labels-customers", type=int, default=1_000_000, help="label scale")
    parser.add_argument("--as-of", default="2025-12-31")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    as_of = pd.Timestamp(args.as_of, tz=UTC)
    records = []
    if args.labels_customers:
        gold = make_synthetic_gold(args.labels_customers, lines=False)
        records += run(gold, as_of, args.out / "labels_scale")
        del gold
        gc.collect()
    if args.customers:
        gold = make_synthetic_gold(args.customers)
        records += run(gold, as_of, args.out / "features_scale", repeats=1)
    (args.out / "features.json").write_text(json.dumps(records, indent=1))
    for rec in records:
        log.info(
            "%-20s %9d customers  best %.2f s  peak %d MB",
            rec["step"],
            rec["customers"],
            rec["wall_s_best"],
            rec["peak_rss_mb"],
        )


if __name__ == "__main__":
    main()
