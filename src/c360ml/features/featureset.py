"""The feature set that travels with a model, and feature selection on a computed matrix.

Why a plain JSON-able object: the registered model must carry everything scoring needs
(names, dtypes, the Featuretools definitions) and the service must read names and dtypes
without importing Featuretools. `definitions_json` is exactly `ft.save_features` output;
only `c360ml.features.dfs` ever parses it with Featuretools.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NEAR_DUPLICATE_CORR = 0.99
CORR_SAMPLE_ROWS = 100_000  # correlation on a row sample: stable and bounded in time
TARGET_DATAFRAME = "customers"


@dataclass(frozen=True)
class FeatureSet:
    """Ordered feature names, their matrix dtypes, and the Featuretools definitions."""

    names: list[str]
    dtypes: dict[str, str]
    definitions_json: str  # ft.save_features output (feature_list = `names`)
    meta: dict = field(default_factory=dict)  # provenance: spec file, counts, ft version

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature names must be unique")
        missing = [n for n in self.names if n not in self.dtypes]
        if missing:
            raise ValueError(f"no dtype for feature(s) {missing[:5]}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "names": self.names,
                "dtypes": self.dtypes,
                "meta": self.meta,
                "definitions": json.loads(self.definitions_json),
            }
        )

    @classmethod
    def from_json(cls, s: str) -> FeatureSet:
        data = json.loads(s)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"feature set format {data.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        return cls(
            names=list(data["names"]),
            dtypes=dict(data["dtypes"]),
            definitions_json=json.dumps(data["definitions"]),
            meta=dict(data.get("meta", {})),
        )

    def subset(self, names: Iterable[str]) -> FeatureSet:
        """Only these features (kept in this set's order); definitions trimmed to match.

        Dependencies of kept features stay in the definitions, so the subset loads alone.
        """
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise ValueError(f"not in the feature set: {sorted(unknown)[:5]}")
        kept = [n for n in self.names if n in wanted]
        sql = {d["name"] for d in self.meta.get("sql_features", [])}  # c360ml.features.custom
        lifetime = self.meta.get("btyd") or {}  # c360ml.features.btyd: no Featuretools definition
        computed = sql | set(lifetime.get("names", []))
        definitions = json.loads(self.definitions_json)
        definitions["feature_list"] = [
            f"{TARGET_DATAFRAME}: {n}" for n in kept if n not in computed
        ]
        meta = dict(self.meta)
        if sql:
            meta["sql_features"] = [d for d in meta["sql_features"] if d["name"] in wanted]
        if lifetime:
            names = [n for n in lifetime["names"] if n in wanted]
            meta.pop("btyd")
            if names:
                meta["btyd"] = {**lifetime, "names": names}
        return FeatureSet(
            names=kept,
            dtypes={n: self.dtypes[n] for n in kept},
            definitions_json=json.dumps(definitions),
            meta=meta,
        )


def _corr_sample(matrix: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    data = matrix[names]
    if len(data) > CORR_SAMPLE_ROWS:
        data = data.sample(CORR_SAMPLE_ROWS, random_state=0)
    return data.astype(np.float64).corr().abs()


def select_features(matrix: pd.DataFrame, fs: FeatureSet) -> tuple[FeatureSet, list[dict]]:
    """Drop all-missing, constant and near-duplicate (|corr| > 0.99) features.

    Constant means one value in every row (a column that is missing in some rows is kept:
    missingness is signal). Of a near-duplicate pair the later feature in `fs.names` goes,
    so the order of the spec decides which name survives. Correlation is pairwise on a
    sample of at most CORR_SAMPLE_ROWS rows.
    """
    absent = [n for n in fs.names if n not in matrix.columns]
    if absent:
        raise ValueError(f"matrix lacks feature column(s) {absent[:5]}")
    dropped: list[dict] = []
    kept: list[str] = []
    for name in fs.names:
        col = matrix[name]
        if col.isna().all():
            dropped.append({"feature": name, "reason": "all missing"})
        elif col.nunique(dropna=False) <= 1:
            dropped.append({"feature": name, "reason": f"constant ({col.iloc[0]!r})"})
        else:
            kept.append(name)
    corr = _corr_sample(matrix, kept) if kept else pd.DataFrame()
    survivors: list[str] = []
    for name in kept:
        twin = next(
            (s for s in survivors if corr.at[name, s] > NEAR_DUPLICATE_CORR),
            None,
        )
        if twin is None:
            survivors.append(name)
        else:
            reason = f"near-duplicate of {twin} (|corr|={corr.at[name, twin]:.4f})"
            dropped.append({"feature": name, "reason": reason})
    log.info("select_features: kept %d of %d", len(survivors), len(fs.names))
    return fs.subset(survivors), dropped
