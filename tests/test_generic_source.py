"""The generic CSV path (customer, timestamp, amount only) reaches features and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from c360ml import features as ft
from c360ml.config import Settings
from c360ml.medallion.build import build_gold, build_silver, build_unify
from c360ml.medallion.ingest import ingest_landing
from c360ml.storage.lake import Lake

DAY = pd.Timedelta(days=1)


def _transactions(seed: int = 3, rows: int = 400) -> pd.DataFrame:
    """Customers c0..c39 buying on random days of two years (amounts > 0)."""
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 700, rows)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i % 40}" for i in range(rows)],
            "timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(days, "D"),
            "amount": rng.gamma(2, 30, rows).round(2),
        }
    )


def _generic_lake(settings: Settings, files: dict[str, pd.DataFrame]) -> Path:
    """Write the frames as CSVs under landing/generic (timestamps as ISO-8601 Z)."""
    folder = Lake(settings.lake).path("landing", "generic")
    folder.mkdir(parents=True)
    for name, frame in files.items():
        out = frame.copy()
        for col in out.select_dtypes("datetimetz"):
            out[col] = out[col].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        out.to_csv(folder / name, index=False)
    return folder


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
    frame = _transactions().set_axis(["cust", "ts", "amt"], axis=1)
    _generic_lake(settings, {"tx.csv": frame})
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
    expected = frame.query("ts <= @cutoff[0]").groupby("cust")["ts"].nunique()
    got = dict(zip(matrix.customer_id, counts, strict=True))
    ids = Lake(settings.lake).read_pandas("gold", "customer_source_map").set_index("source_key")
    for cust, n in expected.items():
        cid = ids.loc[cust, "customer_id"]
        if cid in got:
            assert got[cid] == n


def test_default_mapping_reads_a_file_with_only_the_required_columns(settings, caplog):
    """Issue #30: the default pipelines/generic.yaml maps order_id, product_id and
    is_return too; a file without them still ingests, and every gold table gets a value:
    one order per customer and instant, a return when the amount is negative, the item
    "unknown". Features that then carry no information (one item, one channel) are
    dropped as constant by feature selection, with that reason."""
    settings = settings.model_copy(update={"sources": ("generic",)})  # default mapping
    frame = _transactions()
    returns = frame.sample(30, random_state=1).index
    frame.loc[returns, "amount"] *= -1
    # A basket: two more rows at the instant of c0's first row are the same order.
    basket = frame[frame.customer_id == "c0"].head(1)
    frame = pd.concat([frame, basket.assign(amount=5.0), basket.assign(amount=7.0)])
    _generic_lake(settings, {"tx.csv": frame})
    with caplog.at_level("INFO", logger="c360ml.medallion.ingest"):
        summary = ingest_landing(settings)
    assert (summary.total_rows, summary.items[0].quarantined) == (len(frame), 0)
    for name in ("order_id", "product_id", "is_return"):
        assert f"no '{name}' column ({name}): null in bronze" in caplog.text
    build_silver(settings)
    build_unify(settings)
    build_gold(settings)
    lake = Lake(settings.lake)

    silver = lake.read_pandas("silver", "generic_transactions")
    assert silver.product_id.isna().all()
    assert (silver.is_return == (silver.amount < 0)).all()
    first = basket.iloc[0]
    in_basket = silver[(silver.customer_id == "c0") & (silver.ts == first.timestamp)]
    assert len(in_basket) == 3 and in_basket.order_id.nunique() == 1

    # What gold should hold, from the CSV: orders are (customer, instant) groups.
    orders = frame.groupby(["customer_id", "timestamp"], as_index=False)["amount"].sum()
    orders["is_return"] = orders.amount < 0
    ids = lake.read_pandas("gold", "customer_source_map").set_index("source_key")["customer_id"]
    orders["cid"] = orders.customer_id.map(ids)
    gold_orders = lake.read_pandas("gold", "orders")
    assert len(gold_orders) == len(orders)
    by_key = gold_orders.set_index(["customer_id", "order_ts"]).sort_index()
    want = orders.set_index(["cid", "timestamp"]).sort_index()
    np.testing.assert_allclose(by_key.net_amount, want.amount)
    assert (by_key.is_return.to_numpy() == want.is_return.to_numpy()).all()
    assert by_key.loc[(ids["c0"], first.timestamp), "item_count"] == 3
    lines = lake.read_pandas("gold", "order_lines")
    assert len(lines) == len(frame) and set(lines.item_id) == {"unknown"}
    assert lines.is_return.sum() == len(returns)

    gold = ft.read_gold(lake)
    cfg = ft.ChurnConfig()
    t = pd.Timestamp("2025-06-01", tz="UTC")
    labels = ft.compute_labels(gold, [t], cfg).set_index("customer_id")
    buy = orders[orders.amount > 0]
    active = buy[(buy.timestamp > t - cfg.lookback) & (buy.timestamp <= t)].cid.unique()
    bought_after = set(buy[(buy.timestamp > t) & (buy.timestamp <= t + cfg.window)].cid)
    assert sorted(labels.index) == sorted(active)
    assert 0 < labels.label.sum() < len(labels)
    for cid, label in labels.label.items():
        assert label == int(cid not in bought_after)

    fs = ft.derive_feature_set(gold, settings.path(settings.feature_spec))
    rows = labels.reset_index()[["customer_id", "cutoff_time"]]
    matrix = ft.calculate_features(gold, rows, fs).set_index("customer_id")
    known = orders[orders.timestamp <= t].groupby("cid")
    np.testing.assert_array_equal(
        matrix["COUNT(orders)"], known.size().reindex(matrix.index).to_numpy()
    )
    np.testing.assert_allclose(
        matrix["SUM(orders.net_amount)"], known.amount.sum().reindex(matrix.index)
    )
    kept, dropped = ft.select_features(matrix.reset_index(), fs)
    reasons = {d["feature"]: d["reason"] for d in dropped}
    assert reasons["NUM_UNIQUE(order_lines.item_id)"].startswith("constant")
    assert "NUM_UNIQUE(order_lines.item_id)" not in kept.names
    assert "COUNT(orders)" in kept.names


def test_files_with_and_without_optional_columns_share_bronze(settings):
    """A later file may bring columns an earlier one lacked (and the reverse)."""
    settings = settings.model_copy(update={"sources": ("generic",)})
    full = pd.DataFrame(
        {
            "customer_id": ["a", "a"],
            "timestamp": pd.to_datetime(["2024-01-01", "2024-01-01"], utc=True),
            "amount": [10.0, 5.0],
            "order_id": ["o1", "o1"],
            "product_id": ["p1", "p2"],
            "is_return": [False, False],
        }
    )
    bare = pd.DataFrame(
        {
            "amount": [-4.0, 8.0],  # columns in another order, and no order_id or is_return
            "product_id": ["p2", None],
            "timestamp": pd.to_datetime(["2024-02-01", "2024-03-01"], utc=True),
            "customer_id": ["a", "b"],
        }
    )
    _generic_lake(settings, {"1.csv": full, "2.csv": bare})
    assert ingest_landing(settings).total_rows == 4
    build_silver(settings)
    silver = Lake(settings.lake).read_pandas("silver", "generic_transactions")
    got = silver.sort_values(["ts", "product_id"], kind="stable").set_index("ts")
    assert list(got.order_id) == [
        "o1",
        "o1",
        "a@2024-02-01 00:00:00+00",
        "b@2024-03-01 00:00:00+00",
    ]
    assert list(got.is_return) == [False, False, True, False]
    assert list(got.product_id.fillna("-")) == ["p1", "p2", "p2", "-"]


@pytest.mark.parametrize("mapping", [None, "{customer_id: cust, timestamp: ts, amount: amt}"])
def test_a_file_without_a_required_column_is_one_error_naming_file_and_column(settings, mapping):
    settings = settings.model_copy(update={"sources": ("generic",)})
    names = {"customer_id": "customer_id", "timestamp": "timestamp", "amount": "amount"}
    if mapping is not None:
        settings = settings.model_copy(
            update={"generic_mapping": settings.lake.parent / "generic.yaml"}
        )
        (settings.lake.parent / "generic.yaml").write_text(f"transactions:\n  columns: {mapping}\n")
        names = {"customer_id": "cust", "timestamp": "ts", "amount": "amt"}
    good = _transactions(rows=4).set_axis(list(names.values()), axis=1)
    bad = good.drop(columns=names["amount"]).assign(product_id="p1")
    folder = _generic_lake(settings, {"a.csv": good, "b.csv": bad})
    with pytest.raises(
        ValueError, match=f"required column '{names['amount']}' \\(amount\\)"
    ) as err:
        ingest_landing(settings)
    assert str(folder / "b.csv") in str(err.value)
    # Nothing of the batch is committed, not even the good file.
    assert not Lake(settings.lake).exists("bronze", "generic", "transactions")


def test_a_lake_with_commerce_and_generic_transactions_builds_gold_from_both(tmp_path):
    """Each gold table with a file per source unions the sources present: the generic
    query runs on the connection after the Commerce one, not beside it."""
    from c360ml.synth import generate_lake
    from tests.conftest import build_all, make_settings

    settings = make_settings(tmp_path).model_copy(
        update={"sources": ("d365", "dataverse", "generic")}
    )
    generate_lake(settings, customers=200, seed=3)
    build_all(settings)
    orders = Lake(settings.lake).read_pandas("gold", "orders", columns=["order_id"])
    kinds = set(orders["order_id"].str.split(":").str[0])
    assert {"SO", "POS", "GEN"} <= kinds, kinds
    lines = Lake(settings.lake).read_pandas("gold", "order_lines", columns=["order_id"])
    assert lines["order_id"].str.startswith("GEN:").any()
