"""Person names drawn from weighted tables: skewed like a population, fixed by the seed."""

from __future__ import annotations

import numpy as np

from c360ml.synth import vocab as v


def test_names_are_drawn_by_frequency_and_fixed_by_the_seed():
    n = 200_000
    last = v.draw_last_names(np.random.default_rng(3), n).to_numpy(zero_copy_only=False)
    again = v.draw_last_names(np.random.default_rng(3), n).to_numpy(zero_copy_only=False)
    assert (last == again).all()
    names, counts = np.unique(last, return_counts=True)
    share = dict(zip(names, counts / n, strict=True))
    # Smith is carried by about 0.9% of people, a top-1000 surname like Cooke by ~0.01%.
    assert 0.007 < share["Smith"] < 0.011 and share.get("Cooke", 0) < 0.001
    census = set(v.name_tables()["last"].names)
    in_top = np.isin(last, list(census)).mean()
    assert abs(in_top - v.TOP_SURNAME_SHARE) < 0.01
    # heavy tail: many surnames carried by one person only even in 200k people
    assert (counts == 1).sum() > 10_000


def test_first_names_follow_their_sex():
    female, idx = v.draw_first_names(np.random.default_rng(5), 50_000)
    n_female = len(v.name_tables()["female"].names)
    assert (idx[female] < n_female).all() and (idx[~female] >= n_female).all()
    assert 0.48 < female.mean() < 0.52
    first = np.array(v.first_names())[idx]
    michael = (first[~female] == "Michael").mean()
    assert 0.03 < michael < 0.06  # the most common male name, far above 1/322


def test_tail_surnames_are_distinct_and_not_census_names():
    tail = v.tail_surnames()
    assert len(set(tail)) == len(tail) == v.TAIL_RANKS - 1000
    assert not set(tail) & set(v.name_tables()["last"].names)
