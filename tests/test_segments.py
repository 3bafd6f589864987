"""Segment rules, movements and journey exports on hand-made rows."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.segments import (
    Segment,
    SegmentSpec,
    control_members,
    evaluate_rules,
    journey_export,
    movements,
)

SPEC = SegmentSpec(
    segments=[
        Segment(name="high_value_risk", rule="RiskLevel = 'High' AND total_spend_365d > 500"),
        Segment(name="low", rule="RiskLevel = 'Low'"),
    ]
)
ROWS = pd.DataFrame(
    {
        "customer_id": ["a", "b", "c", "d"],
        "RiskLevel": ["High", "High", "Low", "Medium"],
        "ChurnScore": [0.9, 0.8, 0.1, 0.5],
        "total_spend_365d": [900.0, 100.0, 50.0, None],
    }
)


def test_rules_select_the_right_profiles():
    members = evaluate_rules(ROWS, SPEC)
    assert members.groupby("segment")["customer_id"].apply(sorted).to_dict() == {
        "high_value_risk": ["a"],
        "low": ["c"],
    }


def test_a_bad_rule_names_its_segment():
    spec = SegmentSpec(segments=[Segment(name="broken", rule="no_such_column > 1")])
    with pytest.raises(ValueError, match="segment 'broken'"):
        evaluate_rules(ROWS, spec)


def test_movements_follow_redirects_so_a_merge_is_not_an_exit():
    previous = pd.DataFrame({"segment": ["low", "low", "low"], "customer_id": ["x", "y", "z"]})
    current = pd.DataFrame({"segment": ["low", "low"], "customer_id": ["x", "w"]})
    redirects = pd.DataFrame({"retired_id": ["y"], "surviving_id": ["w"]})
    moves = movements(current, previous, redirects).set_index("segment").loc["low"]
    assert (moves["size"], moves.entered, moves.left) == (2, 0, 1)  # only z left


def test_journey_export_leaves_out_contacts_without_consent():
    members = pd.DataFrame({"customer_id": ["a", "b", "c"]})
    contacts = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c"],
            "contactid": ["k1", "k2", "k3"],
            "emailaddress1": ["a@x.com", "b@x.com", "c@x.com"],
            "donotemail": [False, True, False],
            "donotbulkemail": [False, False, True],
        }
    )
    export, excluded = journey_export(members, contacts)
    assert export.to_dict("records") == [{"CustomerId": "a", "ContactId": "k1", "Email": "a@x.com"}]
    assert excluded == 2


def test_control_groups_are_random_stable_and_sized_by_their_share():
    spec = SegmentSpec(
        segments=[
            Segment(name="risk", rule="true", control_share=0.2),
            Segment(name="none", rule="true"),
        ]
    )
    ids = [f"c{i}" for i in range(5_000)]
    t = pd.Timestamp("2025-12-31", tz="UTC")
    members = pd.DataFrame(
        {"segment": ["risk"] * 5_000 + ["none"] * 5_000, "customer_id": ids * 2, "as_of": t}
    )
    control = control_members(members, spec)
    risk = control[members["segment"] == "risk"]
    assert 0.18 < risk.mean() < 0.22 and not control[members["segment"] == "none"].any()
    assert control.equals(control_members(members, spec))  # a rerun holds out the same
    later = members.assign(as_of=t + pd.Timedelta(days=1))
    redrawn = control_members(later, spec)[members["segment"] == "risk"]
    assert 0.18 < redrawn.mean() < 0.22 and (redrawn != risk).mean() > 0.2  # drawn anew
    with pytest.raises(ValueError):
        Segment(name="x", rule="true", control_share=1.0)
