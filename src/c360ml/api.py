"""The data scientist's API: open a project, read its lake, evaluate any estimator honestly.

Why: `c360ml train` runs one recipe. A data scientist in a notebook wants to try their own
estimator or feature and still get the protections of that command: out-of-time splits,
the RFM and recency baselines, bootstrap intervals, calibration, the CI-D grade, the model
card and the champion gate. The steps here are the ones `c360ml train` runs
(`c360ml.model.pipeline.prepare_training`, `fit_builtin`, `register_training`), so
`project.evaluate()` with the built-in recipe gives the figures `c360ml train` gives on the
same lake and as_of.

    import c360ml
    project = c360ml.open()                      # c360ml.yaml of the current folder, or defaults
    orders = project.table("gold/orders")
    data = project.training_data("2025-12-31")   # plan, matrices, labels, RFM inputs
    ev = project.evaluate(HistGradientBoostingClassifier(), data=data)
    ev.grade, ev.metrics["test_roc_auc"]; print(ev.model_card)
    project.register(ev)                         # MLflow run + version + champion gate
    project.score(["C1", "C2"])                  # scores by the champion

MLflow keeps its tracking and registry URIs per process, and `mlflow.set_tracking_uri`
writes them into `MLFLOW_TRACKING_URI`, which c360ml's settings honour. So a project opened
here takes its store from its own settings only (`mlflow_tracking_uri` in c360ml.yaml or
`C360ML_MLFLOW_TRACKING_URI`; else the sqlite file under `mlflow_dir`), never from
`MLFLOW_TRACKING_URI`, and every call that touches MLflow pins the project's URIs for its
duration and puts back the process's afterwards: two projects in one notebook never write
into each other's store.

A model trained with a user's estimator is registered, gated and served like the built-in
one (the MLflow pyfunc, the refresh and the scoring service all score it through
`c360ml.model.scoring.score`), with one difference said on the version, the model card and
`project.score`: it has no per-customer InfluentialFactors (only the XGBoost booster has
SHAP contributions); its scores carry an empty list.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from c360ml.config import Settings, load_settings
from c360ml.model.train import TrainConfig, TrainResult
from c360ml.timestamps import utc

log = logging.getLogger(__name__)

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


def open(  # noqa: A001 - c360ml.open(...) reads like the project handle it returns
    config: str | Path | Settings | None = None, tracking_uri: str | None = None
) -> Project:
    """Open a c360ml project: its settings, lake and MLflow store.

    `config`: a c360ml.yaml path, ready Settings, or None (C360ML_CONFIG, else c360ml.yaml
    in the current folder, else the defaults). `tracking_uri` overrides the project's store.
    `MLFLOW_TRACKING_URI` is ignored on purpose (see the module doc)."""
    if isinstance(config, Settings):
        settings = config
    else:
        environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        path = None if config is None else Path(config)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"settings file {path} not found")
        settings = load_settings(path, environ)
    if tracking_uri:
        settings = settings.model_copy(update={"mlflow_tracking_uri": tracking_uri})
    return Project(settings)


@contextlib.contextmanager
def mlflow_store(uri: str) -> Iterator[Any]:
    """Pin MLflow's process-wide tracking and registry URIs to `uri` for the block, and put
    the previous URIs, active experiment and MLFLOW_* variables back afterwards.

    Yields an MlflowClient bound to `uri` explicitly. MLflow's fluent API (start_run,
    log_model) has no client argument, hence the pinning; a notebook is one thread."""
    import mlflow
    from mlflow.tracking import fluent

    saved_env = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    saved_tracking = mlflow.get_tracking_uri()
    saved_registry = mlflow.get_registry_uri()
    saved_experiment = fluent._active_experiment_id  # mlflow pinned <3.18 (pyproject)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        mlflow.set_registry_uri(saved_registry)
        fluent._active_experiment_id = saved_experiment
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Evaluation:
    """An estimator measured as `c360ml train` measures its model, not yet registered.

    `result` holds every figure (`metrics` as MLflow logs them); `model_card` is the card
    the registered version would get (version and gate filled in on `register`)."""

    data: Any  # c360ml.model.pipeline.TrainingData it was fitted on
    result: TrainResult
    estimator: Any = None  # the user's estimator (None: the built-in recipe)
    tune: int = 0
    card_text: str = field(default="", repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        """Test-cutoff metrics, intervals, baselines and grade figures (MLflow's names)."""
        return self.result.metrics

    @property
    def grade(self) -> str:
        """The CI-D grade, A/B/C."""
        return self.result.grade.grade

    @property
    def model_kind(self) -> str:
        """ "xgboost" for the built-in recipe, else the estimator's class name."""
        return self.result.model_kind

    @property
    def model_card(self) -> str:
        """The model card (markdown) the registered version would get."""
        return self.card_text

    def summary(self) -> pd.DataFrame:
        """The headline figures with their 95% intervals, one row per metric."""
        from c360ml.model.report import metric_rows

        return pd.DataFrame(metric_rows(self.metrics)).set_index("metric")

    def plots(self, folder: str | Path | None = None) -> list[Path]:
        """The run's plots (ROC, PR, calibration, lift, SHAP if any, score distribution) as
        PNG files in `folder` (default: a new temporary folder)."""
        from c360ml.model.report import write_plots

        target = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="c360ml-plots-"))
        return write_plots(self.result, target, self.data.oracle)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"Evaluation({self.model_kind}: grade {self.grade}, test ROC AUC "
            f"{m['test_roc_auc']:.4f} [{m['test_roc_auc_ci_low']:.4f}, "
            f"{m['test_roc_auc_ci_high']:.4f}], RFM baseline {m['rfm_logistic_roc_auc']:.4f})"
        )


class Project:
    """A c360ml project: settings, lake and MLflow store. Made by `c360ml.open`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def tracking_uri(self) -> str:
        """The project's MLflow tracking and registry URI."""
        return self.settings.tracking_uri

    def __repr__(self) -> str:
        return f"Project(lake={self.settings.lake}, tracking={self.tracking_uri})"

    # ------------------------------------------------------------ data

    def table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A lake table as pandas, by its path under the lake root ("gold/orders",
        "silver/sales_table"); deletion vectors and erasures are honoured."""
        from c360ml.storage.lake import Lake

        parts = [p for p in name.strip("/").split("/") if p]
        lake = Lake(self.settings.lake)
        if len(parts) < 2 or not lake.exists(*parts):
            raise FileNotFoundError(f"no lake table {name!r} under {self.settings.lake}")
        return lake.read_pandas(*parts, columns=columns)

    def _with_spec(self, features: str | Path | None) -> Settings:
        """Settings whose feature spec is the project's merged with the user's file: the
        user's `dfs:` and `btyd:` (if any) replace the project's, `sql_features:` is added."""
        if features is None:
            return self.settings
        user_path = Path(features)
        try:
            user = yaml.safe_load(user_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read feature spec {user_path}: {exc}") from None
        base = yaml.safe_load(self.settings.path(self.settings.feature_spec).read_text()) or {}
        merged = base | {
            k: v for k, v in user.items() if k in ("churn", "dfs", "btyd", "sql_features")
        }
        folder = Path(tempfile.mkdtemp(prefix="c360ml-spec-"))
        spec = folder / user_path.name
        spec.write_text(yaml.safe_dump(merged, sort_keys=False))
        return self.settings.model_copy(update={"feature_spec": spec})

    def check_features(
        self,
        features: str | Path,
        cutoff: str | pd.Timestamp | None = None,
        max_customers: int = 200,
    ):
        """The leakage tests on a feature spec (yours merged over the project's): every
        feature is computed at `cutoff` (default: 90 days before the lake's last event) on
        the lake and on versions of it changed only after the cutoff; a feature that moves
        is named. Returns a `c360ml.features.leakage.LeakageReport`."""
        from c360ml.features import read_gold
        from c360ml.features.leakage import check_leakage
        from c360ml.steps import latest_event_time
        from c360ml.storage.lake import Lake

        settings = self._with_spec(features)
        lake = Lake(settings.lake)
        if cutoff is None:
            cutoff = latest_event_time(lake).floor("D") - pd.Timedelta(days=90)
        t = utc(cutoff)
        orders = lake.read_pandas("gold", "orders", columns=["customer_id", "order_ts"])
        before = orders[pd.to_datetime(orders["order_ts"], utc=True) <= t]["customer_id"]
        customers = pd.Index(before.drop_duplicates().sort_values().head(max_customers))
        gold = read_gold(lake, customers=customers)
        return check_leakage(gold, settings.path(settings.feature_spec), t, customers)

    def training_data(
        self,
        as_of: str | pd.Timestamp,
        sample_rate: float | None = None,
        config: TrainConfig | None = None,
        features: str | Path | None = None,
    ):
        """What `c360ml train` fits on for `as_of`: a `TrainingData` with the split plan
        (`plan.train_cutoffs`, `validation_cutoff`, `test_cutoff`), the labelled `matrix`
        (customer_id, cutoff_time, label, features), `features` (the selected FeatureSet),
        `rfm` (the baselines' recency/frequency/monetary) and `rows(split)`.

        `features`: your own spec file (SQL features and/or a `dfs:` section) merged over
        the project's; its SQL features must pass the leakage check first."""
        from c360ml.features.custom import load_sql_features
        from c360ml.model.pipeline import prepare_training

        settings = self._with_spec(features)
        if features is not None and load_sql_features(settings.path(settings.feature_spec)):
            report = self.check_features(features)
            report.raise_if_leaky()
        return prepare_training(settings, utc(as_of), sample_rate, config)

    # ------------------------------------------------------------ models

    def evaluate(
        self,
        estimator: Any = None,
        as_of: str | pd.Timestamp | None = None,
        data: Any = None,
        config: TrainConfig | None = None,
        tune: int = 0,
        sample_rate: float | None = None,
    ) -> Evaluation:
        """Fit and measure an estimator as `c360ml train` does: the same splits, baselines,
        intervals, calibrator choice, CI-D grade and model card.

        `estimator`: any scikit-learn-compatible classifier (fit, predict_proba), cloned
        before fitting; None = the built-in XGBoost recipe (`tune` Optuna trials). Give
        `data` from `training_data` or an `as_of` to prepare it."""
        from c360ml.model import pipeline, report
        from c360ml.model.train import check_estimator

        if estimator is not None:
            check_estimator(estimator)  # before minutes of feature work
        if data is None:
            if as_of is None:
                raise ValueError("evaluate needs as_of or data (from project.training_data)")
            data = self.training_data(as_of, sample_rate, config)
        if estimator is None:
            result = pipeline.fit_builtin(data, tune)
        else:
            result = pipeline.fit_estimator(data, estimator)
        card = pipeline.card_context(self.settings, data, _code_version())
        return Evaluation(data, result, estimator, tune, report.model_card(result, card))

    def register(self, evaluation: Evaluation, require_approval: bool | None = None):
        """Log the evaluation to the project's MLflow store, register a version and run the
        champion gate, as `c360ml train` does; returns its `TrainSummary` (version,
        decision, gate reason and the comparison with the champion)."""
        from c360ml.model.pipeline import register_training

        with mlflow_store(self.tracking_uri):
            return register_training(
                self.settings,
                evaluation.data,
                evaluation.result,
                evaluation.tune,
                require_approval,
            )

    def versions(self) -> pd.DataFrame:
        """Registered versions of the project's model: grade, kind, gate decision, alias."""
        from mlflow.exceptions import MlflowException

        with mlflow_store(self.tracking_uri) as client:
            try:
                found = client.search_model_versions(f"name='{self.settings.model_name}'")
            except MlflowException:
                found = []
            rows = [
                {
                    "version": int(mv.version),
                    "aliases": ",".join(mv.aliases),
                    "model_kind": mv.tags.get("model_kind", "xgboost"),
                    "grade": mv.tags.get("grade"),
                    "test_roc_auc": mv.tags.get("test_roc_auc"),
                    "gate_decision": mv.tags.get("gate_decision"),
                    "gate_reason": mv.tags.get("gate_reason"),
                }
                for mv in found
            ]
        columns = ["version", "aliases", "model_kind", "grade", "test_roc_auc", "gate_decision"]
        frame = pd.DataFrame(rows, columns=[*columns, "gate_reason"])
        return frame.sort_values("version").set_index("version")

    def model(self, version: str | int | None = None):
        """The registered model's bundle (`c360ml.model.scoring.ModelBundle`) and version:
        `version` or the champion."""
        from mlflow.exceptions import MlflowException

        from c360ml.model.registry import CHAMPION, load_bundle

        name = self.settings.model_name
        with mlflow_store(self.tracking_uri) as client:
            try:
                if version is None:
                    version = client.get_model_version_by_alias(name, CHAMPION).version
                else:
                    client.get_model_version(name, str(version))
            except MlflowException:
                what = "champion" if version is None else f"version {version}"
                raise FileNotFoundError(
                    f"no {what} of {name} in {self.tracking_uri}: train or register one first"
                ) from None
            return load_bundle(f"models:/{name}/{version}"), str(version)

    def score(
        self,
        customer_ids: list[str] | pd.Index | None = None,
        as_of: str | pd.Timestamp | None = None,
        version: str | int | None = None,
        explain: str = "approx",
    ) -> pd.DataFrame:
        """Scores at `as_of` (default: the day the lake's data ends) by the champion (or
        `version`): CustomerId, ChurnScore, IsChurn, RiskLevel, InfluentialFactors,
        ModelVersion, ScoredAsOf; `customer_ids` None = every customer active at as_of.

        Features are computed from the definitions the model carries, as the refresh does.
        A model without contributions (a user's estimator) gives InfluentialFactors None,
        and `frame.attrs["explanations"]` says why."""
        from c360ml import features as ft
        from c360ml.model import scoring
        from c360ml.steps import latest_event_time
        from c360ml.storage.lake import Lake

        bundle, used = self.model(version)
        if bundle.feature_set_json is None:
            raise ValueError(f"model version {used} carries no feature definitions")
        lake = Lake(self.settings.lake)
        t = utc(as_of) if as_of is not None else latest_event_time(lake).floor("D")
        wanted = None if customer_ids is None else pd.Index(customer_ids).astype(str)
        gold = ft.read_gold(lake, customers=wanted)
        if wanted is None:
            cfg = ft.ChurnConfig(**bundle.metadata.get("churn_config", {}))
            ids = ft.active_population(gold, [t], cfg)["customer_id"]
        else:
            unknown = wanted.difference(gold.customers["customer_id"].astype(str))
            if len(unknown):
                raise ValueError(f"unknown customer id(s): {sorted(unknown)[:5]}")
            ids = pd.Series(wanted)
        population = pd.DataFrame({"customer_id": ids.to_numpy(), "cutoff_time": t})
        fs = ft.FeatureSet.from_json(bundle.feature_set_json)
        matrix = ft.calculate_features(gold, population, fs)
        request = matrix.drop(columns=["cutoff_time"]).rename(
            columns={"customer_id": scoring.CUSTOMER_ID}
        )
        scores = scoring.score(bundle, request, explain if bundle.explains else "none")
        scores["ModelVersion"] = used
        scores["ScoredAsOf"] = t
        if bundle.explains:
            note = bundle.metadata.get("explanations", "signed SHAP contributions (top 5)")
        else:
            scores["InfluentialFactors"] = None
            note = f"none: {bundle.model_kind} has no per-customer contributions"
            log.warning("InfluentialFactors: %s", note)
        scores.attrs["explanations"] = note
        return scores


def _code_version() -> str:
    from c360ml.model.registry import code_version

    info = code_version()
    return info.get("git_sha", info["package_version"])


__all__ = ["Evaluation", "Project", "mlflow_store", "open"]
