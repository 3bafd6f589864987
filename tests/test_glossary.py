"""Readable feature labels: every feature of the default spec against a reviewed list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c360ml import glossary

GOLDEN = Path(__file__).with_name("golden_feature_labels.json")


@pytest.fixture(scope="module")
def default_names(shared_lake) -> list[str]:
    """The candidate features the default spec derives on a generated lake."""
    import c360ml.features as ft
    from c360ml.storage.lake import Lake

    settings = shared_lake
    gold = ft.read_gold(Lake(settings.lake))
    return list(ft.derive_feature_set(gold, settings.path(settings.feature_spec)).names)


def test_default_spec_labels_match_the_reviewed_list(default_names):
    """A new feature without a reviewed label, or a changed label, fails here: review the
    label, then add it to golden_feature_labels.json."""
    reviewed = json.loads(GOLDEN.read_text())
    labels = {n: glossary.describe(n) for n in default_names}
    unreviewed = sorted(set(default_names) - set(reviewed))
    assert not unreviewed, f"features without a reviewed label: {unreviewed}"
    changed = {n: (reviewed[n], lab.label) for n, lab in labels.items() if reviewed[n] != lab.label}
    assert not changed, f"labels differ from the reviewed list: {changed}"
    assert len({lab.label for lab in labels.values()}) == len(labels)  # unique
    assert all(lab.label != n and "(" not in lab.label for n, lab in labels.items())
    assert {lab.unit for lab in labels.values()} <= {"count", "amount", "days", "number"}


def test_labels_units_and_sentences_from_the_definition():
    recency = glossary.describe("MIN(orders.TIME_SINCE(order_ts, unit=days))")
    assert (recency.label, recency.unit) == ("Days since last order", "days")
    purchases = glossary.describe("COUNT(orders WHERE is_purchase = True)_90d")
    assert purchases.label == "Purchases, last 90 days" and purchases.unit == "count"
    assert "not cancelled or voided" in purchases.description
    assert purchases.description.endswith("in the 90 days before the score date.")
    store = glossary.describe("SUM(orders.net_amount WHERE channel = store)")
    assert (store.label, store.unit) == ("Spend in store, all time", "amount")
    cases = glossary.describe("COUNT(support_cases WHERE priority = urgent)_30d")
    assert cases.label == "Urgent-priority support cases, last 30 days"
    # Outside the vocabulary the expression stays the label, never a made-up name.
    for name in ("COUNT(orders WHERE coupon = x)", "SKEW(orders.net_amount)", "f_custom"):
        assert glossary.describe(name).label == name


def test_values_read_in_their_unit():
    assert glossary.format_value(14.776110649108887, "days") == "15 days"
    assert glossary.format_value(2.25, "days") == "2.2 days"
    assert glossary.format_value(1234.5, "amount") == "1,234.50"
    assert glossary.format_value(3.0, "count") == "3"
    assert glossary.format_value(None, "count") == "no data"
    assert glossary.format_value(float("nan"), "amount") == "no data"
