"""Small generated lakes shared by the synth tests (generation takes about a second)."""

from __future__ import annotations

from pathlib import Path

import pytest

from c360ml.config import Settings
from c360ml.synth import generate_lake


def make_settings(root: Path) -> Settings:
    return Settings(root=root, lake_root=root / "lake", truth_root=root / "truth")


@pytest.fixture(scope="session")
def small_lake(tmp_path_factory) -> Settings:
    """1500 persons, CSV, seed 5, one increment applied."""
    from c360ml.synth import generate_increment

    settings = make_settings(tmp_path_factory.mktemp("small_lake"))
    generate_lake(settings, customers=1500, seed=5, start="2023-01-01", end="2025-12-31")
    generate_increment(settings)
    return settings


@pytest.fixture(scope="session")
def oracle_lake(tmp_path_factory) -> Settings:
    """3000 persons for the oracle calibration tests."""
    settings = make_settings(tmp_path_factory.mktemp("oracle_lake"))
    generate_lake(settings, customers=3000, seed=21, start="2023-01-01", end="2025-12-31")
    return settings
