"""SIGKILL of a real `c360ml refresh` at a few of its commits, drawn per run: the rerun
must leave gold, quarantine and state as a refresh that was not killed, and the silver
accounting (bronze rows = silver + quarantine) must hold. `make bench STAGE=crash`
kills at every commit (benchmarks/bench_crash.py); the helpers are in tests/crash.py.

The points are drawn with a seed printed here; C360ML_CRASH_SEED=<seed> replays them.
"""

from __future__ import annotations

import os
import random

import pytest

from tests import crash

pytestmark = pytest.mark.slow
CUSTOMERS, LAKE_SEED = 700, 11  # as tests/test_refresh.py: a champion is promoted
POINTS = 2  # commits killed at per run (a refresh of this lake makes ~180)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A prepared project (built, trained, refreshed, a sync landed) and the refresh of
    it that was not killed."""
    folder = tmp_path_factory.mktemp("crash")
    crash.prepare(folder / "base", CUSTOMERS, LAKE_SEED)
    return folder, crash.reference(folder / "base", folder / "reference")


def test_a_refresh_killed_at_a_commit_is_finished_by_the_next(lake):
    folder, ref = lake
    seed = int(os.environ.get("C360ML_CRASH_SEED") or random.SystemRandom().randrange(10**6))
    points = random.Random(seed).sample(ref.points[:-1], POINTS)
    print(f"crash points (C360ML_CRASH_SEED={seed}): {points}")
    assert len(ref.points) > 100 and any(p.startswith("quarantine/") for p in ref.points)
    for i, point in enumerate(points):
        out = crash.kill_and_rerun(folder / "base", folder / f"killed{i}", point, ref)
        where = f"killed after {point} (C360ML_CRASH_SEED={seed})"
        assert out["killed"]["exit"] in (-9, 0), (where, out)
        assert out["rerun"]["exit"] == 0, (where, out)
        assert out["differences"] == [], where
        assert out["accounting"] == [], where
