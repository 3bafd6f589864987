"""Typed churn definition and Deep Feature Synthesis spec, read from `features/retention.yaml`.

Why typed: the churn window, lookback and cutoff grid decide what a label means; a typo in
the YAML must fail loudly at load time, not silently train a different model. The same
`ChurnConfig` travels with the model so scoring uses the definition it was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from c360ml.timestamps import utc


@dataclass(frozen=True)
class ChurnConfig:
    """The churn definition: churned at t = no purchase in (t, t + w]."""

    prediction_window_days: int = 90  # label window (t, t + w]
    active_lookback_days: int = 365  # population at t: >= 1 purchase in (t - L, t]
    cutoff_count: int = 12  # number of training cutoffs
    cutoff_spacing_days: int = 30  # days between consecutive training cutoffs

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"churn.{name} must be a positive integer, got {value!r}")

    @property
    def window(self) -> pd.Timedelta:
        return pd.Timedelta(days=self.prediction_window_days)

    @property
    def lookback(self) -> pd.Timedelta:
        return pd.Timedelta(days=self.active_lookback_days)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopValues(_Spec):
    """Interesting values discovered from the data: the `top` most frequent ones."""

    top: int = Field(ge=1, le=20)  # how many of the most frequent values become where-clauses


PrimitiveEntry = str | dict[str, dict[str, Any]]


class DfsSpec(_Spec):
    """What Deep Feature Synthesis may build (the `dfs:` section of the spec)."""

    max_depth: int = Field(2, ge=1, le=3)  # stacking depth of DFS
    windows_days: list[int] = [30, 90, 365]  # per-feature lookbacks (t - w, t]; all history too
    # Primitives are featuretools names, or {name: {constructor args}} e.g. {trend: {}}
    agg_primitives: list[PrimitiveEntry]  # aggregation primitives
    windowed_primitives: list[str]  # of those, the ones that also get the windowed copies
    trans_primitives: list[PrimitiveEntry] = []  # transform primitives (dates etc.)
    where_primitives: list[PrimitiveEntry] = []  # aggregations that also get where-clause copies
    # dataframe -> column -> explicit values or {top: n}; become where-clauses
    interesting_values: dict[str, dict[str, list[Any] | TopValues]] = {}
    allowed_paths: list[list[str]] | None = None  # dataframe paths DFS may follow; None = all
    ignore_columns: dict[str, list[str]] = {}  # dataframe -> columns DFS must not use
    # primitive -> featuretools primitive_options (restrict which dataframes/columns it sees)
    primitive_options: dict[str, dict[str, Any]] = {}
    drop_features: list[str] = []  # exact names removed after synthesis (known redundancies)
    max_features: int = Field(150, ge=1)  # guard: synthesis beyond this is a spec error

    @field_validator("windows_days")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v) or len(set(v)) != len(v):
            raise ValueError("windows_days must be distinct positive integers")
        return sorted(v)


class BtydSpec(_Spec):
    """Buy-till-you-die candidate features (the `btyd:` section of the spec): BG/NBD and
    Pareto/NBD fitted at each cutoff on the population's purchase days up to it
    (`c360ml.features.btyd`), their per-customer quantities for the churn window beside DFS."""

    enabled: bool = False  # off: no BTYD candidates (the fits cost seconds per cutoff)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read feature spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"feature spec {path} must hold a mapping at the top")
    return data


def load_churn_config(path: Path) -> ChurnConfig:
    """The `churn:` section of the spec; missing keys take the defaults."""
    section = _read_yaml(path).get("churn") or {}
    unknown = set(section) - set(ChurnConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown churn setting(s) in {path}: {sorted(unknown)}")
    return ChurnConfig(**section)


def load_dfs_spec(path: Path) -> DfsSpec:
    """The `dfs:` section of the spec."""
    section = _read_yaml(path).get("dfs")
    if not section:
        raise ValueError(f"feature spec {path} has no 'dfs:' section")
    try:
        return DfsSpec(**section)
    except Exception as exc:
        raise ValueError(f"invalid dfs spec in {path}: {exc}") from exc


def load_btyd_spec(path: Path) -> BtydSpec:
    """The `btyd:` section of the spec; absent = off."""
    section = _read_yaml(path).get("btyd") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: btyd must be a mapping such as {{enabled: true}}")
    try:
        return BtydSpec(**section)
    except ValidationError as exc:
        where = "; ".join(f"btyd.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid btyd spec in {path}: {where}") from None


def training_cutoffs(cfg: ChurnConfig, as_of: pd.Timestamp) -> list[pd.Timestamp]:
    """Ascending UTC cutoffs whose label windows all end at or before `as_of`.

    The last cutoff is `as_of - window`, so training for as_of never needs a label from
    after as_of; earlier ones step back by the spacing.
    """
    last = utc(as_of) - cfg.window
    step = pd.Timedelta(days=cfg.cutoff_spacing_days)
    return [last - step * k for k in range(cfg.cutoff_count - 1, -1, -1)]
