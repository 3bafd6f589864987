"""Feature stage: as-of views of gold, labels, Featuretools features and measures.

Gold comes as frames (`GoldTables`, `read_gold`) or as a lake's tables read by SQL
(`LakeGold`, `lake_gold`): the as-of view, population and labels are SQL over the lake
(`c360ml.features.asof`), the pandas forms their reference.

Featuretools is imported only by `c360ml.features.dfs`, and that module is loaded lazily
(on first use of derive_feature_set, calculate_features, calculate_snapshot,
build_entityset), so code that
only needs `FeatureSet`, labels or configs (e.g. the service) never imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from c360ml.features.asof import LakeGold, lake_gold
from c360ml.features.featureset import FeatureSet, select_features
from c360ml.features.gold import GoldTables, read_gold, read_ordering_customers, view_as_of
from c360ml.features.labels import (
    active_population,
    buyers_and_active,
    compute_labels,
    compute_rfm,
)
from c360ml.features.measures import Measure, build_measures, load_measures, measures_frame
from c360ml.features.spec import ChurnConfig, load_churn_config, training_cutoffs

if TYPE_CHECKING:
    from c360ml.features.dfs import (
        build_entityset,
        calculate_features,
        calculate_snapshot,
        derive_feature_set,
    )

_LAZY = {"build_entityset", "calculate_features", "calculate_snapshot", "derive_feature_set"}

__all__ = [
    "ChurnConfig",
    "FeatureSet",
    "GoldTables",
    "LakeGold",
    "Measure",
    "active_population",
    "build_entityset",
    "build_measures",
    "buyers_and_active",
    "calculate_features",
    "calculate_snapshot",
    "compute_labels",
    "compute_rfm",
    "derive_feature_set",
    "lake_gold",
    "load_churn_config",
    "load_measures",
    "measures_frame",
    "read_gold",
    "read_ordering_customers",
    "select_features",
    "training_cutoffs",
    "view_as_of",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("c360ml.features.dfs"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
