"""Session fixtures over the tiny hand-written gold of `tiny_gold`."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.features import GoldTables

from .tiny_gold import SPEC, T, make_gold


@pytest.fixture(scope="session")
def gold() -> GoldTables:
    return make_gold()


@pytest.fixture(scope="session")
def feature_set(gold):
    from c360ml.features import derive_feature_set

    return derive_feature_set(gold, SPEC)


@pytest.fixture(scope="session")
def population() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": ["C1", "C2", "C5"], "cutoff_time": T})
