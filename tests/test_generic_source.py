"""The generic CSV path (customer, timestamp, amount only) reaches features and labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from c360ml import features as ft
from c360ml.lake import Lake
from c360ml.medallion.build import build_gold, build_silver, build_unify
from c360ml.medallion.ingest import ingest_landing


def test_generic_only_lake_gives_features_and_labels(settings):
    settings = settings.model_copy(
        update={
            "sources": ("generic",),
            "generic_mapping": settings.lake.parent / "generic.yaml",
        }
    )
    (settings.lake.parent / "generic.yaml").write_text(
        "transactions:\n  columns: {customer_id: cust, timestamp: ts, amount: amt}\n"
    )
    rng = np.random.default_rng(3)
    days = rng.integers(0, 700, 400)
    frame = pd.DataFrame(
        {
            "cust": [f"c{i % 40}" for i in range(400)],
            "ts": (pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(days, "D")).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "amt": rng.gamma(2, 30, 400).round(2),
        }
    )
    folder = Lake(settings.lake).path("landing", "generic")
    folder.mkdir(parents=True)
    frame.to_csv(folder / "tx.csv", index=False)
    for step in (ingest_landing, build_silver, build_unify, build_gold):
        step(settings)
    gold = ft.read_gold(Lake(settings.lake))
    assert gold.support_cases.empty and gold.products.empty  # absent tables come back empty
    cfg = ft.ChurnConfig()
    cutoff = [pd.Timestamp("2025-06-01", tz="UTC")]
    labels = ft.compute_labels(gold, cutoff, cfg)
    assert len(labels) > 0 and set(labels.label) <= {0, 1}
    fs = ft.derive_feature_set(gold, settings.path(settings.feature_spec))
    matrix = ft.calculate_features(gold, labels[["customer_id", "cutoff_time"]], fs)
    assert len(matrix) == len(labels) and len(fs.names) > 10
    counts = matrix["COUNT(orders)"].to_numpy()
    # Without an order_id column, one customer's rows at one instant are one order.
    expected = (
        frame.assign(ts=pd.to_datetime(frame.ts))
        .query("ts <= @cutoff[0]")
        .groupby("cust")["ts"]
        .nunique()
    )
    got = dict(zip(matrix.customer_id, counts, strict=True))
    ids = Lake(settings.lake).read_pandas("gold", "customer_source_map").set_index("source_key")
    for cust, n in expected.items():
        cid = ids.loc[cust, "customer_id"]
        if cid in got:
            assert got[cid] == n
