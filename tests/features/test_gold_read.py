"""read_gold restricted to customers, and the light read that sizes a training sample."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.features import compute_labels, read_gold, read_ordering_customers
from c360ml.storage.lake import Lake
from tests.conftest import write_gold

from .tiny_gold import CFG, DAY, T, make_gold


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    write_gold(lake, make_gold())
    return lake


def _ids(frame: pd.DataFrame, col: str) -> list[str]:
    return sorted(frame[col].unique())


def test_full_read_is_unchanged(lake):
    gold = read_gold(lake)
    assert _ids(gold.customers, "customer_id") == ["C1", "C2", "C3", "C4", "C5"]
    assert len(gold.orders) == 11 and len(gold.order_lines) == 12 and len(gold.case_status) == 5


def test_restricted_read_holds_only_those_customers_and_their_activity(lake):
    gold = read_gold(lake, customers=pd.Index(["C1", "C5"]))
    assert _ids(gold.customers, "customer_id") == ["C1", "C5"]
    assert _ids(gold.orders, "order_id") == ["O1", "O2", "O3", "O8", "O9"]
    assert _ids(gold.order_lines, "order_id") == ["O1", "O2", "O3", "O8", "O9"]
    assert _ids(gold.order_status, "entity_id") == ["O1", "O2", "O3", "O8", "O9"]
    assert _ids(gold.support_cases, "case_id") == ["K1"]
    assert _ids(gold.case_status, "entity_id") == ["K1"]
    assert len(gold.products) == 3  # the catalogue is read whole
    # C2's cancelled order O6 is not read: its status history is not needed either.
    assert "O6" not in set(gold.order_status["entity_id"])
    # Labels need only a customer's own orders: the restricted read labels them the same.
    full = compute_labels(read_gold(lake), [T], CFG)
    part = compute_labels(gold, [T], CFG)
    expected = full[full["customer_id"].isin(["C1", "C5"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(part, expected)


def test_ordering_customers_is_a_windowed_distinct_read(lake):
    # (T - 30 d, T]: O2 exactly at T - 30 d is out, O3 and O9 exactly at T are in; C2's
    # return O5 counts (the read is a superset of the active population).
    window = read_ordering_customers(lake, T - 30 * DAY, T)
    assert window.tolist() == ["C1", "C2", "C5"]
    assert read_ordering_customers(lake, T - 365 * DAY, T).tolist() == ["C1", "C2", "C4", "C5"]
    assert read_ordering_customers(lake, T + 200 * DAY, T + 300 * DAY).empty


def test_ordering_customers_without_gold_names_the_lake(tmp_path):
    with pytest.raises(FileNotFoundError, match="no gold/orders table"):
        read_ordering_customers(Lake(tmp_path / "empty"), T - DAY, T)
