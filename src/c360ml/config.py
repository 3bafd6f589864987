"""Typed settings for every stage, read once from `c360ml.yaml` and the environment.

Why one tree: every path the package touches (lake root, truth, MLflow, specs, SQL) is
named here and nowhere else, so moving the lake or the tracking store is a one-line
change. The defaults work with no file at all.

Precedence (last wins): field defaults < `c360ml.yaml` (or the file named by
`C360ML_CONFIG`) < environment variables `C360ML_<FIELD>` (nested fields joined with
`__`, e.g. `C360ML_DEMO__CUSTOMERS=500`; lists as JSON, e.g. `C360ML_SOURCES='["generic"]'`).
`MLFLOW_TRACKING_URI` also overrides the tracking URI, as MLflow users expect.

`load_settings` layers the file and the environment with pydantic-settings (its
environment source, with the prefix and nested delimiter above). `Settings` itself is a
plain model: built directly (tests, benchmarks, `c360ml.open(Settings(...))`) it holds what
it is given and reads no environment, so a variable left in a shell cannot redirect it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

CONFIG_FILE_NAME = "c360ml.yaml"
ENV_PREFIX = "C360ML_"
NESTED_DELIMITER = "__"  # C360ML_GATE__REQUIRE_APPROVAL=true sets gate.require_approval
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
    # The lowest CI-D grade a challenger may have. "C" (the default) accepts any: the grade is
    # CI-D's parity scorecard (recall at 0.5 against a recency rule), which follows the
    # season's churn rate, so it is reported beside the decision rather than gating it.
    min_grade: Literal["A", "B", "C"] = "C"
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
    # Retrain when a closed window's realized churn rate and the mean ChurnScore of the same
    # customers differ by more than this (calibration in the large). A shift of everyone's
    # risk moves the level, not the ranking, and shows here first; the bound sits above the
    # seasonal swing of a year with no shock (benchmarks/results/lifecycle_findings.md).
    calibration_gap: float = 0.05
    webhook_url: str = ""  # drift alarms and gate decisions POSTed here as JSON; "" = none


class Settings(_Frozen):
    """Every path and setting a stage needs. Relative paths resolve against `root`."""

    root: Path = Field(default_factory=Path.cwd)  # project root: folder of c360ml.yaml or cwd
    # The Delta lake (landing/, bronze/, silver/, gold/, ...): a folder, az://container/path
    # or abfss://container@account.dfs.core.windows.net/path (c360ml.storage.location).
    lake_root: Path | str = Path("data/lake")
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
    engine: Literal["duckdb", "spark"] = "duckdb"  # what builds the lake's layers: DuckDB or Spark
    spark_remote: str = ""  # Spark Connect URL (sc://host:port); empty = the active SparkSession
    call_center_channels: tuple[int, ...] = (
        5637145326,
    )  # RetailChannelTable recids of call centers
    person_party_type: int = 13271  # DirPartyTable.InstanceRelationType of a person (B2C profile)
    endpoint: str = ""  # scoring service URL used by the segment workflow; empty = skip
    # profiles whose gold rows a refresh reads and featurises at once (bounds its memory)
    refresh_chunk_customers: int = Field(200_000, ge=1)
    refresh_workers: int = Field(2, ge=1)  # processes featurising chunks at once (one each)
    # DuckDB's memory in each of those processes; beyond it, it spills to the temp folder
    refresh_worker_memory_mb: int = Field(1024, ge=256)
    # how long a build, refresh or generate waits for another one at work on the same lake
    lease_wait_seconds: float = Field(600.0, ge=0)
    # how long a lake's lease on object storage outlives its holder's last renewal (renewed
    # every third of it): the wait after a crashed job before the next one may take over
    lease_ttl_seconds: float = Field(60.0, gt=0)
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
    def lake(self) -> Path | str:
        """The lake's folder, or its URI when it is on object storage."""
        return self.lake_root if isinstance(self.lake_root, str) else self.path(self.lake_root)

    @field_validator("lake_root", mode="before")
    @classmethod
    def _lake_uri(cls, value: Any) -> Path | str:
        """A URI stays a string: as a Path, "az://c/p" would collapse to the folder "az:/c/p"."""
        text = str(value)
        return text if "://" in text else Path(value)

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


class SettingsSourceError(ValueError):
    """A settings file or variable that cannot be read; the message names it."""


class _Environment(EnvSettingsSource):
    """`C360ML_<FIELD>` variables of one mapping (the process environment unless a caller
    gives another), nested fields joined by `__`, complex values (lists, models) as JSON.

    Two rules pydantic-settings does not have: `MLFLOW_TRACKING_URI` wins over
    `C360ML_MLFLOW_TRACKING_URI` (MLflow users expect it to), and a `C360ML_` variable that
    names no setting is refused, not ignored (a typo must not leave a default in force)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ
        self.env_vars = {name.lower(): value for name, value in environ.items()}

    def prepare_field_value(self, field_name: str, field: Any, value: Any, complex_: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, complex_)
        except json.JSONDecodeError as exc:
            name = f"{self.env_prefix}{field_name}".upper()
            raise SettingsSourceError(
                f"environment variable {name} is not valid JSON: {exc}"
            ) from None

    def __call__(self) -> dict[str, Any]:
        try:
            data = super().__call__()
        except SettingsError as exc:  # pydantic-settings' wrapper hides the variable's name
            if isinstance(exc.__cause__, SettingsSourceError):
                raise exc.__cause__ from None
            raise SettingsSourceError(str(exc)) from exc
        prefix = self.env_prefix.lower()
        for name, value in self.env_vars.items():
            key = name[len(prefix) :]
            head = key.split(self.env_nested_delimiter)[0]
            if (
                name.startswith(prefix)
                and head not in self.settings_cls.model_fields
                and key.upper() not in NOT_SETTINGS
            ):
                data.setdefault(head, value)  # validation refuses it, naming it
        if self.environ.get("MLFLOW_TRACKING_URI"):
            data["mlflow_tracking_uri"] = self.environ["MLFLOW_TRACKING_URI"]
        return data


class _YamlFile(PydanticBaseSettingsSource):
    """The settings file: a mapping at the top; `root` defaults to the file's folder, so
    that relative paths in it mean the same from any working directory."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the file is read whole, in __call__

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            values = yaml.safe_load(self.path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsSourceError(f"cannot read settings file {self.path}: {exc}") from exc
        if not isinstance(values, dict):
            raise SettingsSourceError(f"settings file {self.path} must hold a mapping at the top")
        return {"root": str(self.path.resolve().parent), **values}


class _Layered(BaseSettings, Settings):
    """Settings read from sources; `load_settings` subclasses it per call with that call's
    file and environment (pydantic-settings asks a classmethod for the sources)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, frozen=True, extra="forbid"
    )


def _settings_file(config_file: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The file named by the caller, else by C360ML_CONFIG, else c360ml.yaml here, if any."""
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is None and (Path.cwd() / CONFIG_FILE_NAME).exists():
        config_file = Path.cwd() / CONFIG_FILE_NAME
    return config_file


def load_settings(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings tree; a malformed file or unknown field names the file and key.

    `environ` stands in for the process environment (tests, and `c360ml.open`, which drops
    MLFLOW_TRACKING_URI). Precedence as in the module docstring."""
    environ = dict(os.environ) if environ is None else environ
    config_file = _settings_file(config_file, environ)

    class Loaded(_Layered):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], **_: PydanticBaseSettingsSource
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # first wins: the environment over the file over the field defaults
            return (_Environment(settings_cls, environ), _YamlFile(settings_cls, config_file))

    try:
        loaded = Loaded()
    except ValidationError as exc:
        where = config_file or "environment"
        raise ValueError(f"invalid settings in {where}: {one_line(exc)}") from exc
    return Settings(**dict(loaded))
