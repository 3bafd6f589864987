"""Typed settings for every stage, read once from `c360ml.yaml` and the environment.

Why one tree: every path the package touches (lake root, truth, MLflow, specs, SQL) is
named here and nowhere else, so moving the lake or the tracking store is a one-line
change. The defaults work with no file at all.

Precedence (last wins): field defaults < `c360ml.yaml` (or the file named by
`C360ML_CONFIG`) < environment variables `C360ML_<FIELD>` (nested fields joined with
`__`, e.g. `C360ML_DEMO__CUSTOMERS=500`; lists as JSON, e.g. `C360ML_SOURCES='["generic"]'`).
`MLFLOW_TRACKING_URI` also overrides the
tracking URI, as MLflow users expect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_FILE_NAME = "c360ml.yaml"
ENV_PREFIX = "C360ML_"
# C360ML_* variables that are not settings: secrets and switches read where they are used.
NOT_SETTINGS = {"CONFIG", "API_TOKENS", "API_TOKEN", "DEV_NO_AUTH"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DemoSettings(_Frozen):
    """The embedded default lake that `make demo` builds and acceptance figures use."""

    customers: int = 20_000  # persons in the demo lake; changing it changes every quoted figure
    seed: int = 42  # generator seed of the demo lake
    start: str = "2023-01-01"  # first day of simulated history (UTC)
    end: str = "2025-12-31"  # last day of simulated history (UTC)


class GateSettings(_Frozen):
    """The champion gate's approval switch and the bounds of its sanity checks."""

    require_approval: bool = False  # a passing challenger waits for `c360ml model approve`
    max_population_change: float = 0.3  # relative change of active customers at the test cutoff
    max_label_rate_change: float = 0.1  # absolute change of the churn rate at the test cutoff
    max_purchase_change: float = 0.3  # relative change of purchases per active customer
    max_predicted_rate_change: float = 0.05  # absolute change of the mean ChurnScore, both
    # models scored on the current population (the challenger's test cutoff)


class WatchSettings(_Frozen):
    """When the model is flagged as drifting and when `c360ml retrain --if-needed` trains."""

    psi_alarm: float = 0.25  # PSI of the score or a feature at which a refresh flags drift
    max_model_age_days: int = 60  # retrain when the champion's trained_as_of is older
    realized_auc_drop: float = 0.05  # retrain when realized ROC AUC falls this far below test
    webhook_url: str = ""  # drift alarms and gate decisions POSTed here as JSON; "" = none


class Settings(_Frozen):
    """Every path and setting a stage needs. Relative paths resolve against `root`."""

    root: Path = Field(default_factory=Path.cwd)  # project root: folder of c360ml.yaml or cwd
    lake_root: Path = Path("data/lake")  # the Delta lake: landing/, bronze/, silver/, gold/, ...
    truth_root: Path = Path("data/truth")  # the generator's truth (never read by pipelines)
    reports_dir: Path = Path("data/reports")  # HTML reports
    log_dir: Path = Path("data/logs")  # the command line's log file (c360ml.log)
    mlflow_tracking_uri: str = ""  # empty = sqlite file under mlflow_dir
    mlflow_dir: Path = Path("data/mlflow")  # tracking DB and artifacts of the embedded default
    model_name: str = "c360-retention"  # registered model name
    feature_spec: Path = Path("features/retention.yaml")  # churn definition + DFS spec
    measures: Path = Path("features/measures.yaml")  # named business measures
    unify_rules: Path = Path("pipelines/unify.yaml")  # match and merge rules
    segments: Path = Path("pipelines/segments.yaml")  # segment definitions
    sql_dir: Path = Path("pipelines/sql")  # silver/gold SQL run by DuckDB (and Spark)
    generic_mapping: Path = Path("pipelines/generic.yaml")  # column mapping of generic sources
    sources: tuple[str, ...] = ("d365", "dataverse")  # landing sources ingested; add "generic"
    call_center_channels: tuple[int, ...] = (
        5637145326,
    )  # RetailChannelTable recids of call centers
    person_party_type: int = 13271  # DirPartyTable.InstanceRelationType of a person (B2C profile)
    endpoint: str = ""  # scoring service URL used by the segment workflow; empty = skip
    # profiles whose gold rows a refresh reads and featurises at once (bounds its memory)
    refresh_chunk_customers: int = Field(200_000, ge=1)
    refresh_workers: int = Field(2, ge=1)  # processes featurising chunks at once (one each)
    # how long a build, refresh or generate waits for another one at work on the same lake
    lease_wait_seconds: float = Field(600.0, ge=0)
    # files no table version of this many hours needs are removed by each refresh (Delta's
    # default week): readers of a shared lake keep older versions that long; an erasure
    # removes the files that held an erased person at once
    retention_hours: int = Field(168, ge=0)
    demo: DemoSettings = DemoSettings()  # the embedded default lake
    gate: GateSettings = GateSettings()  # when a new model version may become champion
    watch: WatchSettings = WatchSettings()  # drift alarms and the retraining triggers

    def path(self, p: Path) -> Path:
        """Resolve a configured path against the project root."""
        return p if p.is_absolute() else self.root / p

    @property
    def lake(self) -> Path:
        return self.path(self.lake_root)

    @property
    def truth(self) -> Path:
        return self.path(self.truth_root)

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.path(self.mlflow_dir) / 'mlflow.db'}"


ModelT = TypeVar("ModelT", bound=BaseModel)


def one_line(exc: Exception) -> str:
    """A validation error as one line naming each field: the command line prints one line."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
    return " ".join(str(exc).split())


def load_yaml_model(path: Path, model: type[ModelT], what: str) -> ModelT:
    """A typed spec from a YAML file; a missing file or bad field names the file."""
    try:
        return model(**(yaml.safe_load(path.read_text()) or {}))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} not found") from None
    except Exception as exc:
        raise ValueError(f"{path}: invalid {what}: {one_line(exc)}") from exc


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Turn C360ML_A__B=v into {"a": {"b": "v"}}; pydantic converts the strings."""
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX) :] in NOT_SETTINGS:
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = json.loads(value) if value[:1] in "[{" else value  # lists as JSON
        except json.JSONDecodeError as exc:
            raise ValueError(f"environment variable {key} is not valid JSON: {exc}") from None
    if environ.get("MLFLOW_TRACKING_URI"):
        out["mlflow_tracking_uri"] = environ["MLFLOW_TRACKING_URI"]
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_file: Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Build the settings tree; a malformed file or unknown field names the file and key."""
    environ = dict(os.environ) if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is None and (Path.cwd() / CONFIG_FILE_NAME).exists():
        config_file = Path.cwd() / CONFIG_FILE_NAME
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read settings file {config_file}: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"settings file {config_file} must hold a mapping at the top")
        values.setdefault("root", str(config_file.resolve().parent))
    values = _merge(values, _env_overrides(environ))
    try:
        return Settings(**values)
    except Exception as exc:
        where = config_file or "environment"
        raise ValueError(f"invalid settings in {where}: {one_line(exc)}") from exc
