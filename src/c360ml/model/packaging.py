"""Move the registered champion from MLflow into BentoML's model store.

Why a copy: the service loads its model from the BentoML store, so a built Bento
carries the model and serves with no access to the MLflow tracking store. `c360ml
serve` refreshes the copy from `models:/<name>@champion` before it starts the server,
so a local server always serves the current champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import bentoml
import mlflow
from mlflow import MlflowClient

from c360ml.config import Settings
from c360ml.model.registry import CHAMPION, load_bundle

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"  # folder of the bundle inside the BentoML model


@dataclass(frozen=True)
class PackagedModel:
    tag: str  # BentoML model tag
    version: str  # MLflow registered model version
    fresh: bool  # False when the store already held this version


def import_champion(settings: Settings, alias: str = CHAMPION) -> PackagedModel:
    """Copy the registered model behind `alias` into the BentoML store (once per version)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(settings.model_name, alias)
    except mlflow.MlflowException as exc:
        raise FileNotFoundError(
            f"no '{alias}' version of {settings.model_name} in {settings.tracking_uri}: "
            "run `c360ml train` first"
        ) from exc
    try:
        existing_models = bentoml.models.list(settings.model_name)
    except bentoml.exceptions.NotFound:
        existing_models = []
    for existing in existing_models:
        if existing.info.labels.get("mlflow_version") == str(mv.version):
            return PackagedModel(str(existing.tag), str(mv.version), fresh=False)
    bundle = load_bundle(f"models:/{settings.model_name}@{alias}")
    labels = {"mlflow_version": str(mv.version), "alias": alias}
    metadata = {
        "model_name": settings.model_name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "source": f"models:/{settings.model_name}/{mv.version}",
    }
    with bentoml.models.create(settings.model_name, labels=labels, metadata=metadata) as model:
        bundle.save(model.path_of(BUNDLE_DIR))
    log.info(
        "imported %s version %s into BentoML as %s", settings.model_name, mv.version, model.tag
    )
    return PackagedModel(str(model.tag), str(mv.version), fresh=True)
