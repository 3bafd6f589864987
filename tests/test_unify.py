"""Unify: match rules, junk guard, transitive clusters, stable ids, merge policy."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from rapidfuzz import fuzz

from c360ml.medallion.unify import (
    RECORDS_TOTAL,
    CommonValues,
    assign_ids,
    cluster,
    common_flags,
    load_rules,
    match_rule,
    merge_profiles,
    pair_quality,
    prepare_records,
    unify_all,
    unify_changes,
    value_frequencies,
)

PROJECT_RULES = load_rules(Path(__file__).parents[1] / "pipelines" / "unify.yaml")
# The project's rules less the name rule's `common` test (the tests of it add their own):
# in a hand-made set of a few records every name is common in its postal code.
RULES = PROJECT_RULES.model_copy(
    update={"rules": [r.model_copy(update={"common": None}) for r in PROJECT_RULES.rules]}
)
BY_NAME = {r.name: r for r in RULES.rules}


def rec(
    key,
    first="Ann",
    last="Lee",
    email=None,
    phone=None,
    postal="77001",
    source="d365",
    created="2020-01-01",
    modified="2024-01-01",
    group=None,
):
    return {
        "source": source,
        "source_key": key,
        "first_name": first,
        "last_name": last,
        "email": email,
        "phone": phone,
        "street": None,
        "city": None,
        "postal_code": postal,
        "country": "US",
        "customer_group": group,
        "currency": None,
        "created_ts": pd.Timestamp(created, tz="UTC"),
        "modified_ts": pd.Timestamp(modified, tz="UTC"),
    }


def run(rows):
    records = prepare_records(pd.DataFrame(rows))
    pairs = [
        match_rule(records, r, RULES.junk_max_records, RULES.max_block_size) for r in RULES.rules
    ]
    return records, pairs, cluster(len(records), pairs)


def same(records, labels, a, b):
    where = dict(zip(records.source_key, labels, strict=True))
    return where[a] == where[b]


def test_email_rule_is_case_insensitive_across_sources():
    records, pairs, labels = run(
        [
            rec("A", email="ann@x.com"),
            rec("K", email=" ANN@X.com", source="dataverse"),
            rec("B", first="Bob", last="Ray", email="bob@x.com", postal="10001"),
        ]
    )
    assert same(records, labels, "A", "K") and not same(records, labels, "A", "B")
    assert len(pairs[0].left) == 1


def test_phone_needs_last_name_too():
    records, _, labels = run(
        [
            rec("A", phone="+12125550147", last="Lee", postal="1"),
            rec("B", phone="+12125550147", last="Lee", first="Annie", postal="2"),
            rec("C", phone="+12125550147", last="Park", first="Jin", postal="3"),
        ]
    )
    assert same(records, labels, "A", "B") and not same(records, labels, "A", "C")


def test_fuzzy_name_within_postal_block_only():
    records, _, labels = run(
        [
            rec("A", first="Jonathan", last="Smith", postal="77001"),
            rec("B", first="Jonathon", last="Smith", postal="77001"),  # typo: same person
            rec("C", first="Jonathan", last="Smith", postal="90210"),  # other block
            rec("D", first="Maria", last="Sanchez", postal="77001"),
        ]
    )
    assert same(records, labels, "A", "B")
    assert not same(records, labels, "A", "C") and not same(records, labels, "A", "D")


def test_junk_value_guard_stops_a_giant_cluster():
    store_phone = "+17135550100"
    rows = [
        rec(f"P{i}", first=f"F{i}", last="Lee", phone=store_phone, postal=str(i))
        for i in range(RULES.junk_max_records + 1)
    ]
    records, pairs, labels = run(rows)
    assert len(set(labels)) == len(rows)  # nobody merged through the shared phone
    assert pairs[1].junk == {"phone": 1}


def test_transitive_chain_is_one_cluster():
    records, _, labels = run(
        [
            rec("A", first="Ann", last="Lee", email="ann@x.com", postal="1"),
            rec(
                "B",
                first="Anne",
                last="Lee",
                email="ann@x.com",
                phone="+12125550147",
                postal="2",
                source="dataverse",
            ),
            rec("C", first="Annie", last="Lee", phone="+12125550147", postal="3"),
        ]
    )
    assert len(set(labels)) == 1


def test_ids_stable_merge_keeps_oldest_and_split_keeps_oldest_part():
    today = pd.Timestamp("2025-01-01", tz="UTC")
    rows = [
        rec("A", email="a@x.com", created="2020-01-01"),
        rec("B", first="Bo", last="Kim", email="b@x.com", created="2021-01-01", postal="9"),
    ]
    records, _, labels = run(rows)
    ids, redirects = assign_ids(records, labels, None, today)
    first = dict(zip(records.source_key, ids, strict=True))
    assert first["A"] != first["B"] and redirects.empty
    previous = pd.DataFrame(
        {"source": "d365", "source_key": ["A", "B"], "customer_id": [first["A"], first["B"]]}
    )
    # A new contact joins A's cluster: A's id is kept.
    rows.append(rec("K", email="a@x.com", source="dataverse", created="2024-01-01"))
    records, _, labels = run(rows)
    ids, redirects = assign_ids(records, labels, previous, today)
    again = dict(zip(records.source_key, ids, strict=True))
    assert again["A"] == again["K"] == first["A"] and again["B"] == first["B"]
    # B changes e-mail to A's: clusters merge; the oldest id (A's) survives.
    rows[1] = rec("B", first="Bo", last="Kim", email="a@x.com", created="2021-01-01", postal="9")
    records, _, labels = run(rows)
    ids, redirects = assign_ids(records, labels, previous, today)
    merged = dict(zip(records.source_key, ids, strict=True))
    assert merged["B"] == merged["A"] == first["A"]
    assert redirects.to_dict("records") == [
        {
            "retired_id": first["B"],
            "surviving_id": first["A"],
            "redirected_at": today,
            "reason": "merge",
        }
    ]
    # Split: A and K were one customer; K moves away -> A (oldest) keeps the id.
    prev2 = pd.DataFrame(
        {
            "source": ["d365", "dataverse"],
            "source_key": ["A", "K"],
            "customer_id": [first["A"], first["A"]],
        }
    )
    rows = [
        rec("A", email="a@x.com"),
        rec(
            "K",
            first="Kay",
            last="Zed",
            email="k@x.com",
            source="dataverse",
            created="2024-01-01",
            postal="5",
        ),
    ]
    records, _, labels = run(rows)
    ids, _ = assign_ids(records, labels, prev2, today)
    split = dict(zip(records.source_key, ids, strict=True))
    assert split["A"] == first["A"] and split["K"] != first["A"]


def test_merge_policy_most_recent_and_source_priority():
    records, _, labels = run(
        [
            rec("A", email="a@x.com", last="Lee", modified="2024-01-01", group="10"),
            rec(
                "K",
                email="a@x.com",
                last="Lee-Park",
                modified="2024-06-01",
                source="dataverse",
                group=None,
            ),
        ]
    )
    ids, _ = assign_ids(records, labels, None, pd.Timestamp("2025-01-01", tz="UTC"))
    profile = merge_profiles(records, ids, RULES.merge).iloc[0]
    assert profile.last_name == "Lee-Park"  # most recent non-empty
    assert profile.customer_group == "10"  # Commerce first by priority
    assert (profile.source_count, profile.sources) == (2, "d365,dataverse")


def test_merge_ties_are_broken_by_source_key_whatever_the_order():
    """Two accounts of one customer modified at the same instant: each attribute comes
    from the smaller source_key, whichever order the records arrive in (engines promise
    none); a third account, modified later, still wins what it has."""
    rows = [
        rec("B", email="a@x.com", last="Brown", group="20"),
        rec("A", email="a@x.com", last="Adams", group="10"),
        rec("C", email="a@x.com", last=None, group=None, modified="2024-02-01"),
    ]
    for ordered in (rows, rows[::-1], [rows[1], rows[2], rows[0]]):
        records = prepare_records(pd.DataFrame(ordered))
        ids = pd.Series(["C1"] * len(records), index=records.index)
        profile = merge_profiles(records, ids, RULES.merge).iloc[0]
        assert (profile.last_name, profile.customer_group, profile.email) == (
            "Adams",
            "10",
            "a@x.com",
        )


def test_pair_quality_counts_pairs():
    source_map = pd.DataFrame(
        {"source": "d365", "source_key": list("ABCD"), "customer_id": ["c1", "c1", "c1", "c2"]}
    )
    truth = pd.DataFrame({"source": "d365", "source_key": list("ABCD"), "person_id": [1, 1, 2, 2]})
    q = pair_quality(source_map, truth)
    assert (q["predicted_pairs"], q["true_pairs"]) == (3, 2)
    assert q["precision"] == pytest.approx(1 / 3) and q["recall"] == pytest.approx(1 / 2)


def test_bad_rules_file_names_the_file(tmp_path):
    bad = tmp_path / "unify.yaml"
    bad.write_text("rules: [{name: x, exact: [shoe_size]}]\nmerge: {}\n")
    with pytest.raises(ValueError, match=str(bad)):
        load_rules(bad)


def test_household_sharing_phone_and_last_name_is_not_one_person():
    records, _, labels = run(
        [
            rec("A", first="George", last="Rodriguez", phone="+14155556689", postal="1"),
            rec("B", first="William", last="Rodriguez", phone="+14155556689", postal="2"),
        ]
    )
    assert not same(records, labels, "A", "B")


def test_namesakes_with_their_own_email_and_phone_are_vetoed():
    records, _, labels = run(
        [
            rec("A", first="Scott", last="Adams", email="s1@x.com", phone="+12065550101"),
            rec("B", first="Scott", last="Adams", email="s2@x.com", phone="+12065550199"),
            rec("C", first="Scott", last="Adams", email="s3@x.com", phone="+12065550101"),
        ]
    )
    assert not same(records, labels, "A", "B")  # both identifiers differ: vetoed
    assert same(records, labels, "A", "C")  # the phone agrees: the name rule may link


# ---------------------------------------------------------------- chunked fuzzy matching


def synthetic_records(n=3000, seed=7):
    """Records crowded into few postal codes, with typo'd names, namesakes, shared,
    junk and missing e-mails and phones, missing names: many blocks, some above the cap.
    A phone's records mostly share a last name (households, duplicates)."""
    rng = np.random.default_rng(seed)
    firsts = ["Ann", "Anne", "Annie", "Bob", "Rob", "Jon", "John", "Jonathan", "Jonathon"]
    firsts += ["Maria", "Mario", "José", "Jose", "Li", "Lee", "Kim", "Sam", "Samuel", None]
    lasts = ["Smith", "Smyth", "Smithe", "Sanchez", "Sánchez", "Lee", "Li", "Park", "Parks"]
    lasts += ["O'Neil", "ONeil", "Oneill", "Stone", "Stein", "Adams", "Adam", None]
    postals = [f"7700{i}" for i in range(9)] + ["10001", "1 0001", None]
    rows = []
    for i in range(n):
        phone = int(rng.integers(0, 700)) if rng.random() < 0.6 else None
        household = phone is not None and rng.random() < 0.7
        last = lasts[phone % len(lasts)] if household else lasts[rng.integers(len(lasts))]
        email = f"p{rng.integers(0, 1200)}@x.com" if rng.random() < 0.5 else None
        rows.append(
            rec(
                f"R{i}",
                first=firsts[rng.integers(len(firsts))],
                last=last,
                email=email,
                phone=None if phone is None else f"+1212555{phone:04d}",
                postal=postals[rng.integers(len(postals))],
                source="d365" if i % 3 else "dataverse",
            )
        )
    for k in range(30):  # small blocks where a nameless record leaves 1 or 2 scored
        for j in range(k % 3 + 2):
            nameless = j == 0
            first, last = (None, None) if nameless else (firsts[(k + j) % 3], "Smith")
            rows.append(rec(f"S{k}-{j}", first=first, last=last, postal=f"9{k:04d}"))
    return prepare_records(pd.DataFrame(rows))


def brute_force_pairs(records, rule, junk_max, max_block):
    """The reference: plain Python over every pair of every block, no chunks."""
    fields = {*rule.exact, rule.fuzzy.field, *rule.veto_if_all_differ}
    rows = records[[f"m_{f}" for f in fields] + ["record"]].to_dict("records")
    missing = lambda v: v is None or v != v  # noqa: E731
    junk = {
        f: {v for v, k in Counter(r[f"m_{f}"] for r in rows).items() if k > junk_max}
        for f in rule.exact
        if f in ("email", "phone")
    }
    blocks = defaultdict(list)
    for r in rows:
        key = tuple(r[f"m_{f}"] for f in rule.exact)
        if any(missing(v) for v in key) or any(r[f"m_{f}"] in junk[f] for f in junk):
            continue
        blocks[key].append(r)
    scorer = getattr(fuzz, rule.fuzzy.scorer)
    name = f"m_{rule.fuzzy.field}"
    pairs = set()
    for members in blocks.values():
        if len(members) > max_block:
            continue
        for a, b in combinations(members, 2):
            if missing(a[name]) or missing(b[name]):
                continue
            if scorer(a[name], b[name]) < rule.fuzzy.threshold:
                continue
            vetoed = rule.veto_if_all_differ and all(
                not missing(a[f"m_{f}"]) and not missing(b[f"m_{f}"]) and a[f"m_{f}"] != b[f"m_{f}"]
                for f in rule.veto_if_all_differ
            )
            if not vetoed:
                pairs.add((a["record"], b["record"]))
    skipped = sum(len(m) > max_block for m in blocks.values())
    return pairs, skipped


FUZZY_RULES = [
    BY_NAME["name_postal_code"],
    BY_NAME["phone_last_name"],
    # a block without the last name: records without any name sit in it, unscored
    BY_NAME["name_postal_code"].model_copy(update={"exact": ["postal_code"]}),
]


@pytest.mark.parametrize("rule", FUZZY_RULES, ids=["postal_initial", "phone_last", "postal"])
def test_chunked_fuzzy_matching_equals_brute_force(rule):
    records = synthetic_records()
    max_block = 260  # some postal-code blocks are larger: skipped
    want, skipped = brute_force_pairs(records, rule, RULES.junk_max_records, max_block)
    assert want  # the data exercises the rule
    runs = [
        match_rule(records, rule, RULES.junk_max_records, max_block, chunk_pairs=chunk)
        for chunk in (1, 37, 1000, 10**9)  # one block per chunk ... all in one chunk
    ]
    for got in runs:
        pairs = list(zip(got.left.tolist(), got.right.tolist(), strict=True))
        assert len(pairs) == len(set(pairs)) and set(pairs) == want
        assert got.skipped_blocks == skipped
        # the same pairs in the same order, whatever the chunk size
        assert np.array_equal(got.left, runs[0].left)
        assert np.array_equal(got.right, runs[0].right)
    if rule.exact == ["postal_code"]:
        assert skipped > 0


def test_sorted_words_make_ratio_equal_token_sort_ratio():
    from c360ml.medallion.unify import _sorted_words

    names = np.array(["ann  lee smith", "smith ann lee", None, "lee ann", "bob o neil"], object)
    words = _sorted_words(names)
    assert words[2] is None and words[0] == words[1] == "ann lee smith"
    for a, b in [(0, 1), (0, 3), (3, 4), (1, 4)]:
        assert fuzz.ratio(words[a], words[b]) == fuzz.token_sort_ratio(names[a], names[b])


def _records_table(rows: list[dict]) -> pa.Table:
    """Records as `read_records` gives them: with the hash of each whole record."""
    frame = pd.DataFrame(rows)
    frame["record_hash"] = pd.util.hash_pandas_object(frame, index=False).to_numpy().view(np.int64)
    return pa.Table.from_pandas(frame, preserve_index=False)


def with_common(rules, max_expected=0.25, require_any=("email", "phone", "street")):
    """`rules` with a `common` test on the name rule (full name frequency per postal code)."""
    spec = CommonValues(max_expected=max_expected, require_any=list(require_any))
    changed = [
        r.model_copy(update={"common": spec}) if r.name == "name_postal_code" else r
        for r in rules.rules
    ]
    return rules.model_copy(update={"rules": changed})


def namesake_rows():
    """40 James Smiths and 400 rare names in four postal codes; in a fifth, two James
    Smiths (one e-mail, one phone, B the newer) and two Zebulon Quackenbush."""
    background = [
        rec(f"S{i}", first="James", last="Smith", postal=f"7700{i % 4}", email=f"js{i}@x.com")
        for i in range(40)
    ]
    background += [
        rec(f"N{i}", first=f"Name{i}", last=f"Family{i}", postal=f"7700{i % 4}") for i in range(400)
    ]
    people = [
        rec("A", first="James", last="Smith", postal="77009", email="james@x.com"),
        rec(
            "B",
            first="James",
            last="Smith",
            postal="77009",
            phone="+12125550147",
            created="2021-01-01",
        ),
        rec("C", first="Zebulon", last="Quackenbush", postal="77009", email="zq@x.com"),
        rec("D", first="Zebulon", last="Quackenbush", postal="77009", email="zeb.q@y.com"),
    ]
    return background + people


def test_common_name_needs_more_evidence_a_rare_one_does_not():
    """Two people named James Smith in one postal code, one with an e-mail, the other a
    phone (no veto: neither field is on both), are not merged once the name is common in
    the data; Zebulon Quackenbush with two e-mails (one differing field) still is."""
    # James Smith is 40 of 444 records, and 77009 holds 4: ~0.36 expected by chance there.
    rows = namesake_rows()
    for rules, merged in ((RULES, True), (with_common(RULES), False)):
        records = prepare_records(pd.DataFrame(rows))
        pairs = [
            match_rule(records, r, rules.junk_max_records, rules.max_block_size)
            for r in rules.rules
        ]
        labels = cluster(len(records), pairs)
        assert bool(same(records, labels, "A", "B")) is merged
        assert same(records, labels, "C", "D")  # a rare name: the name and postal code do
    # Every link the name rule kept is on a rare name (the background's James Smiths,
    # with their own e-mails and no phone, are not linked either).
    common = pairs[-1].common
    assert common is not None and len(common) > 0 and not common.any()
    flags = dict(zip(records.source_key, common_flags(records, rules.rules[-1].common,
        value_frequencies(records, ["full_name", "postal_code"])), strict=True))  # fmt: skip
    assert flags["A"] and flags["B"] and not flags["C"] and not flags["D"]


def test_a_common_name_links_when_the_street_agrees_however_spelled():
    streets = {"A": "12 Main Street", "B": "12 MAIN ST."}
    rows = [{**r, "street": streets.get(r["source_key"])} for r in namesake_rows()]
    rules = with_common(RULES)
    records = prepare_records(pd.DataFrame(rows))
    pairs = [
        match_rule(records, r, rules.junk_max_records, rules.max_block_size) for r in rules.rules
    ]
    labels = cluster(len(records), pairs)
    assert same(records, labels, "A", "B") and pairs[-1].common.sum() == 1


def test_a_phone_three_records_share_needs_more_than_a_similar_name():
    """Without `per`, a value is common when more than max_expected other records carry
    it: a household's phone on three records links Maria and Mario Garcia (name score
    over 80) only with another agreeing field; a phone on two records still links."""
    home, pair = "+13055550123", "+13055550999"
    rows = [
        rec("A", first="Maria", last="Garcia", phone=home, postal="1"),
        rec("B", first="Mario", last="Garcia", phone=home, postal="2"),
        rec("C", first="Lucia", last="Garcia", phone=home, postal="3"),
        rec("D", first="Ana", last="Ortiz", phone=pair, postal="4"),
        rec("E", first="Anna", last="Ortiz", phone=pair, postal="5"),
    ]
    spec = CommonValues(field="phone", per=None, max_expected=1, require_any=["email", "street"])
    on = [
        r.model_copy(update={"common": spec}) if r.name == "phone_last_name" else r
        for r in RULES.rules
    ]
    for rules, merged in ((RULES, True), (RULES.model_copy(update={"rules": on}), False)):
        records = prepare_records(pd.DataFrame(rows))
        pairs = [
            match_rule(records, r, rules.junk_max_records, rules.max_block_size)
            for r in rules.rules
        ]
        labels = cluster(len(records), pairs)
        assert bool(same(records, labels, "A", "B")) is merged
        assert same(records, labels, "D", "E") and not same(records, labels, "A", "C")


def test_common_needs_a_fuzzy_rule(tmp_path):
    path = tmp_path / "unify.yaml"
    text = (Path(__file__).parents[1] / "pipelines" / "unify.yaml").read_text()
    path.write_text(
        text.replace(
            "    exact: [email]\n",
            "    exact: [email]\n    common: {max_expected: 0.1, require_any: [phone]}\n",
        )
    )
    with pytest.raises(ValueError, match="rule email: common needs a fuzzy rule"):
        load_rules(path)


@pytest.mark.parametrize(
    "common",
    ["", "name", "name+phone", "name, counts changed"],
    ids=["rules", "common name", "and household phone", "counts changed since the state"],
)
def test_unifying_the_changes_equals_unifying_everything(common):
    """unify_changes (the clusters changes can reach) gives the map, profiles, ids,
    redirects, state and report a whole unify gives, also where an e-mail becomes junk
    or stops being junk, a fuzzy block falls under the size limit, records are removed,
    added, moved to another block and renamed, and clusters merge and split; with a
    `common` test, both decide with the frequencies the first build counted, or with kept
    frequencies that changed since the state was written (an erasure subtracts the erased
    records' share): records whose flag they flip count as changed."""
    rng = np.random.default_rng(5)
    firsts, lasts = ["Ann", "Anne", "Bob", "Rob", "Cy", "Dee"], ["Lee", "Leigh", "Ray", "Roy"]
    rules = RULES.model_copy(update={"max_block_size": 11})
    if common:  # most names common in their postal code: a name link needs a field too
        rules = with_common(rules, max_expected=0.05, require_any=("email", "phone"))
    if "phone" in common:  # a phone more than two others carry: the name needs an e-mail
        spec = CommonValues(field="phone", per=None, max_expected=2, require_any=["email"])
        on = [r.model_copy(update={"common": spec}) if r.name == "phone_last_name" else r
              for r in rules.rules]  # fmt: skip
        rules = rules.model_copy(update={"rules": on})
    today = pd.Timestamp("2026-12-01", tz="UTC")

    def person(i, **extra):
        row = rec(f"R{i}", first=rng.choice(firsts), last=rng.choice(lasts),
                  email=f"p{rng.integers(2500)}@x.com", phone=f"+1555{rng.integers(2000):07d}",
                  postal=str(rng.integers(400)), source=rng.choice(["d365", "dataverse"]),
                  created=f"20{rng.integers(10, 24)}-01-01")  # fmt: skip
        return {**row, **extra}

    rows = [person(i) for i in range(3000)]
    rows += [person(3000 + i, email="four@x.com") for i in range(4)]  # junk after one more
    rows += [person(3010 + i, email="five@x.com") for i in range(5)]  # not junk after one less
    rows += [  # a block over 11, and under it once R3020 goes: its namesakes then pair
        person(3020 + i, postal_code="99999", first_name="Ann", last_name="Lee", phone=None)
        for i in range(12)
    ]
    # A phone shared by 4 (two of them namesakes, linked by it) becomes junk with a fifth.
    shared = "+15559999999"
    rows += [
        person(3040 + i, phone=shared, first_name="Ann", last_name=last,
               email=f"own{i}@x.com", postal_code=f"5550{i}")
        for i, last in enumerate(["Lee", "Lee", "Ray", "Roy"])
    ]  # fmt: skip
    # A block over the size limit, two of whose records are unified again (their e-mail
    # partners elsewhere change): they must not be paired as if the block were small.
    rows += [person(3050 + i, postal_code="88888", first_name="Ann", last_name="Lee", phone=None)
             for i in range(14)]  # fmt: skip
    rows += [person(3070 + i, email=rows[-1 - i]["email"]) for i in range(2)]
    # A namesake without a phone (no veto), whom only the name links to a new record.
    rows += [person(3080, postal_code="77777", first_name="Anne", last_name="Lee", phone=None)]
    if common:  # a common name whose records share a phone: a link on a common name
        rows += [person(3090 + i, postal_code="4444", first_name="Bob", last_name="Ray",
                        phone="+15550000001") for i in range(2)]  # fmt: skip
        # and a rare name: the name and postal code link without another field
        rows += [person(3092 + i, postal_code="3333", first_name="Quill", last_name="Zorn",
                        phone=None) for i in range(2)]  # fmt: skip
    before = unify_all(_records_table(rows), rules, None, today)

    after = rows[60:]  # 60 removed
    after = [r for r in after if r["source_key"] not in ("R3010", "R3020")]
    after += [person(4000 + i) for i in range(30)] + [person(4100, email="four@x.com")]
    after += [person(4101, phone=shared, last_name="Kim", email="own4@x.com")]
    after += [person(4200, postal_code="77777", first_name="Ann", last_name="Lee", phone=None)]
    for i, row in enumerate(after):
        if row["source_key"] in ("R3070", "R3071"):
            after[i] = {**row, "first_name": "Zed"}
    picked = rng.choice(len(after) - 100, 60, replace=False)
    for i in picked[:20]:
        after[i] = {**after[i], "postal_code": str(rng.integers(400))}  # another block
    for i in picked[20:40]:
        after[i] = {**after[i], "first_name": rng.choice(firsts) + "e"}
    for i in picked[40:]:
        after[i] = {**after[i], "email": after[rng.integers(len(after))]["email"]}  # links
    table = _records_table(after)
    kept = before.frequencies
    assert (kept is not None) is bool(common)
    if "changed" in common:  # counts that halve every name's and postal code's chance
        total = pc.equal(kept["field"], RECORDS_TOTAL)
        kept = kept.set_column(2, "count", pc.if_else(total, pc.multiply(kept["count"], 2),
                                                      kept["count"]))  # fmt: skip
    expected = unify_all(table, rules, pa.Table.from_pandas(before.source_map), today, kept)

    con = duckdb.connect()
    con.register("before_", pa.Table.from_pandas(before.state))
    con.register("map_", pa.Table.from_pandas(before.source_map))
    changes = unify_changes(con, table, rules, today, kept)
    assert changes is not None and len(changes.source_map) < len(after) / 2

    def patched(old, new, key):
        gone = (
            old[key].isin(changes.retired["customer_id"].to_pylist())
            if key == "customer_id"
            else (old.source + "/" + old.source_key).isin(
                [f"{s}/{k}" for s, k in zip(*changes.keys.to_pydict().values(), strict=True)]
            )
        )
        return pd.concat([old[~gone], new]).sort_values(key if key == "customer_id"
            else ["source", "source_key"]).reset_index(drop=True)  # fmt: skip

    def ordered(frame, by):
        return frame.sort_values(by).reset_index(drop=True)

    keys = ["source", "source_key"]
    pd.testing.assert_frame_equal(
        patched(before.source_map, changes.source_map, "customer_id").sort_values(keys)
        .reset_index(drop=True), ordered(expected.source_map, keys))  # fmt: skip
    pd.testing.assert_frame_equal(
        patched(before.profiles, changes.profiles, "customer_id"),
        ordered(expected.profiles, "customer_id"),
    )
    pd.testing.assert_frame_equal(
        patched(before.state, changes.state, "source_key"), ordered(expected.state, keys)
    )
    pd.testing.assert_frame_equal(
        ordered(changes.redirects, "retired_id"), ordered(expected.redirects, "retired_id")
    )
    pd.testing.assert_frame_equal(changes.report, expected.report)
    # What the test is meant to reach: the junk values and oversized blocks changed, and
    # clusters merged (redirects).
    assert not before.report["note"].equals(expected.report["note"])
    assert len(expected.redirects) > 0
    ids = expected.source_map.set_index("source_key")["customer_id"]
    if common:  # both links and refusals on common names are in play
        for rule in (r for r in rules.rules if r.common is not None):
            flags = expected.state[f"is_common_{rule.name}"]
            assert flags.any() and not flags.all()
        report = expected.report
        bands = report[
            report.section.eq("rule by value frequency") & report.name.eq("name_postal_code")
        ]
        assert len(bands) == 2 and ((bands["count"] > 0).all() or "changed" in common)
    else:
        assert ids["R3080"] == ids["R4200"]
    if "changed" in common:  # unchanged records whose flag the new counts flip
        flag = ["source", "source_key", "record_hash", "is_common_name_postal_code"]
        both = before.state[flag].merge(expected.state[flag], on=flag[:3])
        assert (both[f"{flag[3]}_x"] != both[f"{flag[3]}_y"]).sum() > 0


@pytest.mark.slow
def test_an_incremental_build_decides_with_the_frequencies_it_started_from(tmp_path):
    """build_unify with a `common` test: the first build counts the value frequencies and
    keeps them; an incremental build reads them (the table is not rewritten) and its
    customers are those of a whole unify of the same records with those frequencies."""
    import shutil

    from c360ml.medallion.build import build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing
    from c360ml.medallion.unify import FREQUENCIES, STATE, kept_frequencies, state_digest
    from c360ml.storage.lake import Lake
    from c360ml.synth import generate_increment, generate_lake
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)  # the project's rules: the name rule has `common`
    assert any(r.common for r in PROJECT_RULES.rules)
    generate_lake(settings, customers=400, seed=3)
    for step in (ingest_landing, build_silver, build_unify):
        step(settings)
    lake = Lake(settings.lake)
    counted = lake.delta(*FREQUENCIES).version()
    generate_increment(settings)
    for step in (ingest_landing, build_silver):
        step(settings)
    summary = build_unify(settings)
    assert 0 < summary.unified < summary.records  # only the changes' clusters again
    assert lake.delta(*FREQUENCIES).version() == counted
    # past recount_frequencies_share more (or fewer) records, the kept ones are not used
    loaded = PROJECT_RULES
    digest = state_digest(loaded)
    total = lake.read_pandas(*FREQUENCIES).query("field == '_records'")["count"].item()
    assert kept_frequencies(lake, loaded, digest, total) is not None
    assert kept_frequencies(lake, loaded, digest, int(total * 1.19)) is not None
    assert kept_frequencies(lake, loaded, digest, int(total * 1.21) + 1) is None
    assert kept_frequencies(lake, loaded, digest, int(total * 0.79)) is None
    bands = summary.report[summary.report.section == "rule by value frequency"]
    assert set(bands.scope) == {"common value", "rare value"} and bands["count"].sum() > 0

    whole = settings.model_copy(update={"lake_root": tmp_path / "whole"})
    shutil.copytree(settings.lake, whole.lake)
    shutil.rmtree(whole.lake.joinpath(*STATE))
    build_unify(whole)  # no state: a whole unify, with the kept frequencies

    def customers(s):
        m = Lake(s.lake).read_pandas("gold", "customer_source_map")
        keys = m.source + "/" + m.source_key
        return {frozenset(g) for g in keys.groupby(m.customer_id).agg(set)}

    assert customers(whole) == customers(settings)
    assert Lake(whole.lake).delta(*FREQUENCIES).version() == counted


def test_turning_common_on_splits_namesakes_and_the_older_keeps_the_id():
    """The first unify with the common-name test splits a cluster of two namesakes the
    name rule had merged: the part holding the older record keeps the customer_id."""
    today = pd.Timestamp("2026-12-01", tz="UTC")
    table = _records_table(namesake_rows())
    before = unify_all(table, RULES, None, today)
    after = unify_all(table, with_common(RULES), pa.Table.from_pandas(before.source_map), today)
    old, new = (u.source_map.set_index("source_key")["customer_id"] for u in (before, after))
    assert old["A"] == old["B"] and new["A"] != new["B"]
    assert new["A"] == old["A"] and new["B"] not in set(old)
    assert new["C"] == new["D"] == old["C"]
    assert after.frequencies is not None and before.frequencies is None
