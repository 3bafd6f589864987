"""The refresh job (up to four times a day): new landing data in, every profile re-scored.

Steps: ingest -> silver -> unify -> gold (incremental, from the medallion stages) ->
measures and the feature snapshot at `as_of` -> batch scores with the champion through
`c360ml.model.scoring` -> the CI-D hand-back (latest snapshot + CDM manifest) ->
segments (when an endpoint is configured) -> report. Each table write is one Delta
commit; a refresh for an as_of whose inputs and model have not changed writes nothing,
so running it twice gives the same rows, not duplicates.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.exceptions import DeltaError

from c360ml import progress
from c360ml.config import Settings
from c360ml.medallion import erasure
from c360ml.medallion.erasure import ErasureResult
from c360ml.medallion.unify import follow_redirects, read_redirects
from c360ml.model import scoring
from c360ml.schemas import ChurnScores, CustomerMeasures
from c360ml.steps import (
    DRIFT,
    StepResult,
    gold_inputs,
    latest_event_time,
    replace_as_of,
    same_inputs,
)
from c360ml.storage.inputs import last_record
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake
from c360ml.summary import Summary

if TYPE_CHECKING:
    from c360ml.features import FeatureSet
    from c360ml.features.btyd import BtydFit

log = logging.getLogger(__name__)

AS_OF = "as_of"
SCORED, INACTIVE, INSUFFICIENT = "scored", "inactive", "insufficient_history"
MANIFEST = "c360ml.manifest.cdm.json"  # the CI-D export's CDM manifest
CDM_FORMATS = {
    "string": "String",
    "double": "Double",
    "bool": "Boolean",
    "float": "Double",
    "int64": "Int64",
    "timestamp[us, tz=UTC]": "DateTimeOffset",
}


@dataclass(kw_only=True)
class RefreshSummary(Summary[StepResult]):
    as_of: pd.Timestamp | None = None
    risk_counts: dict[str, int] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- pure stages


def score_statuses(profiles: pd.Series, active: pd.Series, buyers: pd.Series) -> pd.Series:
    """Per profile: scored (active at as_of), inactive (bought before, not in the
    lookback), or insufficient_history (no purchase at or before as_of)."""
    status = pd.Series(INSUFFICIENT, index=profiles.to_numpy(), dtype=object)
    status[status.index.isin(buyers)] = INACTIVE
    status[status.index.isin(active)] = SCORED
    return status


def churn_score_rows(
    profiles: pd.Series,
    status: pd.Series,
    scored: pd.DataFrame,
    explain: str,
    model_version: str,
    as_of: pd.Timestamp,
    scored_at: pd.Timestamp,
) -> pd.DataFrame:
    """One gold/churn_scores row per profile; unscored profiles get an empty score."""
    out = pd.DataFrame({"CustomerId": profiles.to_numpy()})
    out = out.merge(scored, on="CustomerId", how="left")
    out["InfluentialFactors"] = [  # JSON text, as score(factors_as="json") gives it
        json.dumps(f) if isinstance(f, list) else f if isinstance(f, str) else None
        for f in out["InfluentialFactors"]
    ]
    out["IsChurn"] = out["IsChurn"].astype("boolean")
    out["ExplainMethod"] = explain
    out["ModelVersion"] = model_version
    out["ScoredAsOf"] = as_of
    out["ScoredAt"] = scored_at
    out["ScoreStatus"] = status.reindex(out["CustomerId"]).to_numpy()
    return out[list(ChurnScores.to_schema().columns)]


# ---------------------------------------------------------------- lake edges


@dataclass
class Snapshot:
    """What a pass over every profile at one as_of produced (frames None when not asked)."""

    measures: pd.DataFrame | None
    features: pd.DataFrame | None  # customer_id, as_of, the model's features (active only)
    profiles: pd.Series  # every profile's customer_id
    buyers: pd.Series  # profiles with a purchase at or before as_of
    note: str  # chunks, processes and the seconds the workers spent per part
    btyd: BtydFit | None = None  # the BTYD models fitted at as_of (the model has BTYD features)


def customer_chunks(lake: Lake, size: int, workers: int = 1) -> list[pd.Index]:
    """Every profile's customer_id, sorted, in chunks of at most `size`: as few as that
    allows, their number a multiple of `workers` (so no process idles through a last
    round), of equal sizes."""
    ids = lake.read("gold", "customer_profile", columns=["customer_id"])["customer_id"]
    ids = np.sort(ids.to_numpy(zero_copy_only=False).astype(str))
    if not len(ids):
        return [pd.Index([])]
    n = -(-len(ids) // size)  # ceil
    if n > 1:
        n = -(-n // workers) * workers
    return [pd.Index(part) for part in np.array_split(ids, n) if len(part)] or [pd.Index([])]


def _snapshot_chunk(
    settings: Settings,
    as_of: pd.Timestamp,
    measures: bool,
    fs: FeatureSet | None,
    chunk: pd.Index | None,
    threads: int | None = None,
    memory_mb: int | None = None,
) -> dict[str, Any]:
    """Measures and/or features of one chunk of profiles (None: every profile), computed
    by DuckDB from the lake's gold tables through the as-of SQL (may run in a worker
    process; `threads`: DuckDB's while it builds the view; `memory_mb`: the worker
    process's DuckDB memory limit, beyond which it spills to disk). The model's BTYD
    features are not computed here: the chunk's active customers' purchase summary is
    returned (`btyd_summary`) for the one fit over every chunk (`_with_btyd`)."""
    from c360ml.features import btyd as lifetime
    from c360ml.features import (
        calculate_snapshot,
        lake_gold,
        load_churn_config,
        load_measures,
        measures_frame,
    )
    from c360ml.features.asof import AsOfSql
    from c360ml.features.dfs import purchase_summary
    from c360ml.medallion.sql import duckdb_connection

    if memory_mb is not None:
        duckdb_connection().execute(f"SET memory_limit = '{int(memory_mb)}MB'")
    out: dict[str, Any] = {"measures": None, "features": None, "btyd_summary": None}
    later = lifetime.feature_names(fs.meta) if fs is not None else []
    if later:
        fs = fs.subset([n for n in fs.names if n not in later])
    seconds = out["seconds"] = {"view": 0.0, "features": 0.0}
    started = time.perf_counter()
    cfg = load_churn_config(settings.path(settings.feature_spec))
    wanted = load_measures(settings.path(settings.measures)) if measures else None
    gold = lake_gold(Lake(settings.lake))
    with AsOfSql(gold, customers=chunk, threads=threads, store_gold=False) as sql:
        sql.build_view(as_of)
        out["profiles"] = pd.Series(sql.profile_ids().to_numpy(), name="customer_id")
        buyers, active = sql.buyers_and_active(as_of, cfg)
        out["buyers"] = pd.Series(buyers, name="customer_id")
        seconds["view"] = time.perf_counter() - started
        started = time.perf_counter()
        matrix, features = calculate_snapshot(sql, as_of, wanted, fs, pd.Index(active))
        if later:
            summary = purchase_summary(sql, as_of)
            # customer_id as a column: the parent concatenates the chunks' frames anew
            out["btyd_summary"] = summary[summary.index.isin(active)].reset_index()
    if wanted:
        out["measures"] = measures_frame(matrix, wanted, as_of)
    if features is not None:
        out["features"] = features.rename(columns={"cutoff_time": AS_OF})
    seconds["features"] = time.perf_counter() - started
    return out


def _on_engine(embedded: Callable) -> Callable:
    """`embedded` (DuckDB in this process) or, when the settings name the Spark engine,
    the function of the same name in `c360ml.spark.features` (same arguments, same
    results, computed by Spark)."""

    @wraps(embedded)
    def run(settings: Settings, *args: Any, **kwargs: Any) -> Any:
        if settings.engine != "spark":
            return embedded(settings, *args, **kwargs)
        from c360ml.spark import features

        return getattr(features, embedded.__name__)(settings, *args, **kwargs)

    return run


@_on_engine
def snapshot_profiles(
    settings: Settings, as_of: pd.Timestamp, measures: bool, fs: FeatureSet | None
) -> Snapshot:
    """Measures and/or the feature snapshot of every profile at as_of, a chunk of
    customers at a time, `refresh_workers` chunks at once in worker processes.

    The as-of view, the populations and the aggregates are SQL that DuckDB runs over the
    lake's gold tables (`c360ml.features.asof`); only each chunk's results reach pandas.
    Why chunks: a chunk's view and aggregates are a process's work (they run on one thread,
    see `c360ml.features.asof.AsOfSql`), so chunks use every core, and DuckDB's memory
    follows the chunk, not the lake (and is capped in each worker process,
    `refresh_worker_memory_mb`: the parent and the workers together stay within the
    machine's budget). Every measure and feature is an aggregation over one customer's
    rows, read in the order gold's files hold them, so chunking changes no value but, at
    most, a sum's last bit (a test checks). With one chunk, the customers are not listed
    to DuckDB at all, and the statuses and populations use every core.
    """
    size, workers = settings.refresh_chunk_customers, settings.refresh_workers
    chunks = customer_chunks(Lake(settings.lake), size, workers)
    workers = min(workers, len(chunks))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    memory = settings.refresh_worker_memory_mb if workers > 1 else None
    job = partial(_snapshot_chunk, settings, as_of, measures, fs, threads=threads, memory_mb=memory)
    with progress.track("profiles, chunks", len(chunks)) as advance:
        if len(chunks) == 1:
            results = [_advanced(job(None), advance)]
        elif workers > 1:
            _release_freed_memory()
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = [_advanced(r, advance) for r in pool.map(job, chunks)]
        else:
            results = [_advanced(job(c), advance) for c in chunks]

    def joined(name: str) -> pd.DataFrame | None:
        parts = [r[name] for r in results if r[name] is not None]
        return pd.concat(parts, ignore_index=True) if parts else None

    spent = {k: sum(r["seconds"][k] for r in results) for k in results[0]["seconds"]}
    features, fit = joined("features"), None
    if fs is not None and features is not None:
        features, fit = _with_btyd(features, joined("btyd_summary"), fs)
    return Snapshot(
        measures=joined("measures"),
        features=features,
        profiles=joined("profiles"),
        buyers=joined("buyers"),
        note=f"{len(chunks)} chunks of <= {settings.refresh_chunk_customers:,} profiles, "
        f"{workers} process(es); worker seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in spent.items()),
        btyd=fit,
    )


def _with_btyd(
    features: pd.DataFrame, summary: pd.DataFrame | None, fs: FeatureSet
) -> tuple[pd.DataFrame, BtydFit | None]:
    """The snapshot with fs's BTYD features, in fs's column order: BG/NBD and Pareto/NBD
    fitted once on every chunk's active customers' purchase summaries (the population at
    as_of, as training fits on its population at each cutoff), then each customer's values;
    the fit (None when fs has no BTYD features or no customer bought)."""
    from c360ml.features import btyd as lifetime

    names = lifetime.feature_names(fs.meta)
    if not names:
        return features, None
    columns = ["customer_id", lifetime.FREQUENCY, lifetime.RECENCY, lifetime.AGE]
    if summary is None:  # no chunk had an active customer
        summary = pd.DataFrame(columns=columns)
    summary = summary[columns].set_index("customer_id")
    ids = pd.Index(features["customer_id"])
    window = fs.meta[lifetime.META_KEY]["window_days"]
    values, fit = lifetime.population_features(summary, ids, names, window)
    out = pd.concat([features, values.reset_index(drop=True)], axis=1)
    return out[["customer_id", AS_OF, *fs.names]], fit


def _release_freed_memory() -> None:
    """Give what this process has freed back to the system before the workers start:
    Arrow's allocator and the C heap keep freed blocks for reuse, which would count against
    the refresh's memory while the workers need it."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _advanced(result: dict, advance: Callable[[], None]) -> dict:
    advance()
    return result


def build_measures_table(settings: Settings, as_of: pd.Timestamp | None = None) -> StepResult:
    started = time.perf_counter()
    lake = Lake(settings.lake)
    as_of = as_of or latest_event_time(lake)
    inputs = gold_inputs(lake)
    note = f"as_of {as_of:%Y-%m-%d %H:%M}"
    if same_inputs(lake, "customer_measures", as_of, inputs):
        rows = lake.dataset("gold", "customer_measures").count_rows()
        return StepResult("measures", rows, note + " (unchanged)", time.perf_counter() - started)
    measures = snapshot_profiles(settings, as_of, measures=True, fs=None).measures
    write_measures(lake, measures, as_of, inputs)
    return StepResult("measures", len(measures), note, time.perf_counter() - started)


def write_measures(lake: Lake, measures: pd.DataFrame, as_of: pd.Timestamp, inputs: dict) -> None:
    CustomerMeasures.validate(measures[["customer_id", AS_OF]])
    replace_as_of(lake, measures, "customer_measures", AS_OF, as_of, inputs)


def load_champion(settings: Settings) -> tuple[scoring.ModelBundle, str]:
    """The champion's bundle and version, through MLflow (the refresh runs in process)."""
    import mlflow

    from c360ml.model.registry import CHAMPION, load_bundle

    mlflow.set_tracking_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(settings.model_name, CHAMPION).version
    except mlflow.MlflowException as exc:
        raise FileNotFoundError(
            f"no champion of {settings.model_name}: run `c360ml train`"
        ) from exc
    return load_bundle(f"models:/{settings.model_name}@{CHAMPION}"), str(version)


@dataclass(frozen=True)
class ScoringPlan:
    """What a refresh at one as_of must compute: what these inputs (and this model)
    already produced is kept, not recomputed."""

    inputs: dict  # gold's: what customer_measures and customer_features were made from
    score_inputs: dict  # gold's and the model's: what churn_scores were made from
    measures: bool  # customer_measures to compute
    fs: FeatureSet | None  # the champion's features to compute and score; None: kept


KEPT = "unchanged inputs: kept"


def scoring_plan(
    lake: Lake, as_of: pd.Timestamp, bundle: scoring.ModelBundle, model_version: str, explain: str
) -> ScoringPlan:
    """The ScoringPlan of both engines' `measures_and_scores`."""
    from c360ml.features import FeatureSet

    inputs = gold_inputs(lake)
    score_inputs = inputs | {"model_version": model_version, "explain": explain}
    need_scores = not same_inputs(lake, "churn_scores", as_of, score_inputs)
    if need_scores and bundle.feature_set_json is None:
        raise ValueError("the champion carries no feature definitions; retrain it")
    return ScoringPlan(
        inputs,
        score_inputs,
        not same_inputs(lake, "customer_measures", as_of, inputs),
        FeatureSet.from_json(bundle.feature_set_json) if need_scores else None,
    )


@_on_engine
def measures_and_scores(
    settings: Settings,
    as_of: pd.Timestamp,
    bundle: scoring.ModelBundle,
    model_version: str,
    explain: str,
) -> tuple[list[StepResult], pd.DataFrame]:
    """Measures, the feature snapshot of the active profiles and one score row per
    profile at as_of, in one pass over the profiles; what these inputs (and this model)
    already produced is kept, not recomputed."""
    lake = Lake(settings.lake)
    plan = scoring_plan(lake, as_of, bundle, model_version, explain)
    inputs, score_inputs, need_measures, fs = (
        plan.inputs, plan.score_inputs, plan.measures, plan.fs
    )  # fmt: skip
    if not (need_measures or fs):
        scores = _scores_at(lake, as_of)
        return [StepResult("measures + features + scores", len(scores), KEPT)], scores
    started = time.perf_counter()
    snap = snapshot_profiles(settings, as_of, need_measures, fs)
    steps = [StepResult("snapshot", len(snap.profiles), snap.note, time.perf_counter() - started)]
    if snap.btyd is not None:
        steps.append(btyd_step(snap.btyd))
    started = time.perf_counter()
    if need_measures:
        write_measures(lake, snap.measures, as_of, inputs)
        steps.append(StepResult("measures", len(snap.measures), "", time.perf_counter() - started))
    else:
        steps.append(StepResult("measures", 0, KEPT))
    if fs is None:
        scores = _scores_at(lake, as_of)
        steps.append(StepResult("features + scores", len(scores), KEPT))
        return steps, scores
    started = time.perf_counter()
    snapshot = snap.features
    replace_as_of(lake, snapshot, "customer_features", AS_OF, as_of, inputs)
    steps.append(
        StepResult(
            "feature snapshot",
            len(snapshot),
            f"{len(fs.names)} features",
            time.perf_counter() - started,
        )
    )
    started = time.perf_counter()
    request = snapshot.drop(columns=[AS_OF]).rename(columns={"customer_id": "CustomerId"})
    scored = (
        scoring.score(bundle, request, explain, factors_as="json")
        if len(request)
        else pd.DataFrame(columns=list(scoring.ChurnScoreOutput.to_schema().columns))
    )
    status = score_statuses(snap.profiles, snapshot["customer_id"], snap.buyers)
    step, scores = write_scores(
        lake, snap.profiles, status, scored, (explain, model_version), as_of, score_inputs, started
    )
    return [*steps, step], scores


def btyd_step(fit: BtydFit) -> StepResult:
    """The BTYD fit's own line in the refresh summary: customers fitted on, parameters
    (in days) and the fitting time."""
    bg, pn = fit.bgnbd, fit.pareto_nbd
    note = (
        f"BG/NBD r {bg.r:.3g} alpha {bg.alpha:.3g} a {bg.a:.3g} b {bg.b:.3g}; Pareto/NBD "
        f"r {pn.r:.3g} alpha {pn.alpha:.3g} s {pn.s:.3g} beta {pn.beta:.3g} (days)"
    )
    return StepResult("BTYD fit", fit.customers, note, fit.seconds)


def write_scores(
    lake: Lake,
    profiles: pd.Series,
    status: pd.Series,
    scored: pd.DataFrame,
    model: tuple[str, str],
    as_of: pd.Timestamp,
    inputs: dict,
    started: float,
    how: str = "",
) -> tuple[StepResult, pd.DataFrame]:
    """gold/churn_scores at as_of from the scored rows (`churn_score_rows`), validated and
    written; the "batch scores" step since `started`. `model`: (explain, version)."""
    explain, version = model
    now = pd.Timestamp.now(tz="UTC").floor("us")
    scores = churn_score_rows(profiles, status, scored, explain, version, as_of, now)
    ChurnScores.validate(scores)
    replace_as_of(lake, scores, "churn_scores", "ScoredAsOf", as_of, inputs)
    note = f"model v{version}, explain={explain}" + (f", {how}" if how else "")
    return StepResult("batch scores", len(scores), note, time.perf_counter() - started), scores


def _scores_at(lake: Lake, as_of: pd.Timestamp) -> pd.DataFrame:
    scores = lake.read_pandas("gold", "churn_scores")
    return scores[scores["ScoredAsOf"] == as_of].reset_index(drop=True)


def score_counts(settings: Settings, scores: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(profiles per RiskLevel of the scored ones, profiles per ScoreStatus) of this
    as_of's scores: pandas rows, or on Spark a grouped count (`c360ml.spark.outputs`)."""
    if settings.engine == "spark":
        from c360ml.spark import outputs

        return outputs.score_counts(scores)
    scored = scores[scores["ScoreStatus"] == SCORED]
    return (
        scored["RiskLevel"].value_counts().to_dict(),
        scores["ScoreStatus"].value_counts().to_dict(),
    )


def export_cid_snapshot(settings: Settings, scores: Any, bundle: scoring.ModelBundle) -> str:
    """The latest snapshot for CI-D: plain parquet + a CDM manifest naming only its files.

    Beside the scores, a feature glossary (the model's features with their readable labels,
    units and descriptions) lets CI-D users read InfluentialFactors; every entity carries
    the hand-back contract version.

    A new snapshot folder is written first, then the manifest is swapped atomically to
    point at it, then older snapshot folders are removed: a reader following the
    manifest never sees the history table or a half-written snapshot. The files go
    through the lake's store: a local folder, or the container CI-D attaches as a CDM
    folder. Returns the manifest's path (local) or URI.

    `scores`: this as_of's churn_scores rows (ScoredAt is not exported), pandas or, on
    the Spark engine, a Spark DataFrame that Spark writes as the snapshot folder's
    Parquet files itself (`c360ml.spark.outputs.write_export`; the manifest's pattern
    takes every `.parquet` file of the folder), as it writes the contact map.
    """
    lake = Lake(settings.lake)
    if isinstance(scores, pd.DataFrame):
        scores = scores.drop(columns=["ScoredAt"], errors="ignore")
    else:
        scores = scores.drop("ScoredAt")
    root = ("export", "ci-d")
    stamp = pd.Timestamp.now(tz="UTC").strftime("%Y%m%dT%H%M%S%fZ")
    if isinstance(scores, pd.DataFrame):
        contacts = lake.read_pandas("gold", "customer_source_map")
        contacts = contacts[contacts["source"] == "dataverse"].rename(
            columns={"source_key": "ContactId", "customer_id": "CustomerId"}
        )[["ContactId", "CustomerId"]]
    else:  # the contacts too are Spark's to write
        from c360ml.spark import outputs

        contacts = outputs.contact_map(scores.sparkSession, lake)
    glossary = pd.DataFrame(
        [
            {"Feature": n, "Label": d["label"], "Unit": d["unit"], "Description": d["description"]}
            for n, d in bundle.feature_labels.items()
        ]
    )
    entities = {
        "ChurnScores": ("churn_scores", scores),
        "ContactBackstamp": ("contact_map", contacts),
        "FeatureGlossary": ("feature_glossary", glossary),
    }
    declared = []
    for entity, (folder, frame) in entities.items():
        if isinstance(frame, pd.DataFrame):
            frame = frame.assign(ContractVersion=scoring.CONTRACT_VERSION)
            table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
            part = lake.key(*root, folder, f"snapshot={stamp}", "part-00000.parquet")
            with lake.store.open_output(part) as out:
                pq.write_table(table, out)
            schema = table.schema
        else:  # a Spark DataFrame, written by Spark to the folder's URI (either store)
            from pyspark.sql.functions import lit

            from c360ml.spark import outputs

            frame = frame.withColumn("ContractVersion", lit(scoring.CONTRACT_VERSION))
            schema = outputs.write_export(frame, lake.uri(*root, folder, f"snapshot={stamp}"))
        lake.store.write_text(
            lake.key(*root, f"{entity}.cdm.json"),
            json.dumps(_entity_doc(entity, schema), indent=1),
        )
        declared.append(
            {
                "type": "LocalEntity",
                "entityName": entity,
                "entityPath": f"{entity}.cdm.json/{entity}",
                "dataPartitionPatterns": [
                    {
                        "name": entity,
                        "rootLocation": f"{folder}/snapshot={stamp}/",
                        "regularExpression": ".+\\.parquet$",
                        "exhibitsTraits": [{"traitReference": "is.partition.format.parquet"}],
                    }
                ],
            }
        )
    manifest = {
        "jsonSchemaSemanticVersion": "1.0.0",
        "imports": [{"corpusPath": "cdm:/foundations.cdm.json"}],
        "manifestName": "c360ml",
        "explanation": "Latest churn scores, contact backstamp and feature glossary from "
        f"c360ml (hand-back contract {scoring.CONTRACT_VERSION})",
        "entities": declared,
    }
    # One atomic replace on either store (a local file staged and renamed; one put).
    lake.store.write_text(lake.key(*root, MANIFEST), json.dumps(manifest, indent=1))
    for folder, _ in entities.values():
        for old in lake.store.folders(lake.key(*root, folder)):
            name = old.rsplit("/", 1)[-1]
            if name.startswith("snapshot=") and name != f"snapshot={stamp}":
                lake.delete_folder(*old.split("/"))
    return lake.uri(*root, MANIFEST)


def _entity_doc(entity: str, schema: pa.Schema) -> dict:
    return {
        "jsonSchemaSemanticVersion": "1.0.0",
        "imports": [{"corpusPath": "cdm:/foundations.cdm.json"}],
        "definitions": [
            {
                "entityName": entity,
                "hasAttributes": [
                    {"name": f.name, "dataFormat": CDM_FORMATS.get(str(f.type), "String")}
                    for f in schema
                ],
            }
        ],
    }


def record_drift(
    settings: Settings,
    as_of: pd.Timestamp,
    bundle: scoring.ModelBundle,
    version: str,
    scores: Any,
) -> StepResult:
    """PSI of the score and of every feature of this as_of's snapshot against the model's
    test-cutoff reference (`c360ml.model.drift`), and the share of profiles with a value
    outside the tested range: to gold/score_drift (this as_of's rows replaced when the
    inputs or the model changed). `scores`: this as_of's rows of churn_scores (pandas, or
    on the Spark engine a Spark DataFrame: the bins are counted there, `_drift_on_spark`)."""
    from c360ml import webhook
    from c360ml.model import drift

    started = time.perf_counter()
    refs = bundle.metadata.get("drift_reference")
    if not refs:
        return StepResult("drift", 0, f"model v{version} carries no drift reference")
    lake = Lake(settings.lake)
    if settings.engine == "spark":
        measured, profiles_outside, estimate = _drift_on_spark(settings, as_of, bundle, scores)
    else:
        measured, profiles_outside, estimate = _drift_in_pandas(lake, as_of, bundle, scores)
    alarm = settings.watch.psi_alarm
    rows = []
    for name, (value, share_outside) in measured.items():
        label = bundle.feature_labels.get(name, {}).get("label", name)
        rows.append(
            {
                "ScoredAsOf": as_of,
                "ModelVersion": version,
                "column": name,
                "label": label,
                "psi": value,
                "share_outside_range": share_outside,
                "alarm": drift.alarming(name, value, alarm),
            }
        )
    frame = pd.DataFrame(rows)
    inputs = gold_inputs(lake) | {"model_version": version}
    replace_as_of(lake, frame, DRIFT, "ScoredAsOf", as_of, inputs)
    flagged = frame[frame["alarm"]]
    score_psi = frame.loc[frame["column"] == drift.SCORE, "psi"].iloc[0]
    note = (
        f"estimated ROC AUC {estimate:.3f} (label-free); "
        f"score PSI {score_psi:.3f}; {int((flagged['column'] != drift.SCORE).sum())} of "
        f"{len(bundle.feature_names)} features at PSI >= {alarm}; "
        f"{profiles_outside:.1%} of profiles outside the tested range"
    )
    alarms = drift.latest_alarms(frame)
    if len(flagged):
        named = [f"{a['label']} {a['psi']:.2f}" for a in alarms["alarms"]]
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        note = f"ALARM (PSI >= {alarm}): {', '.join(named[:5])}{more}; " + note
        log.warning("drift at %s: %s", as_of, ", ".join(flagged["label"].head(5)))
        hook = webhook.drift_event(settings.model_name, alarms, alarm)
        webhook.post_event(settings.watch.webhook_url, hook)
    seconds = time.perf_counter() - started
    return StepResult("drift", len(flagged), note, seconds, detail=alarms)


Drift = tuple[dict[str, tuple[float, float]], float, float]  # see _drift_in_pandas


def _drift_in_pandas(
    lake: Lake, as_of: pd.Timestamp, bundle: scoring.ModelBundle, scores: pd.DataFrame
) -> Drift:
    """Per column (the model's features, then the score): (PSI, share outside the tested
    range); the share of profiles with any feature outside it; the label-free ROC AUC
    estimate. From the snapshot's and the scores' values in pandas."""
    import pyarrow.dataset as ds

    from c360ml.model import drift, watch

    refs = bundle.metadata["drift_reference"]
    scored = scores[scores["ScoreStatus"] == SCORED]
    features = lake.read_pandas("gold", "customer_features", filter=ds.field(AS_OF) == as_of)
    columns = {**{n: features[n] for n in bundle.feature_names}, drift.SCORE: scored["ChurnScore"]}
    measured, outside = {}, np.zeros(len(features), dtype=bool)
    for name, values in columns.items():
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)
        beyond = drift.outside(refs[name], values)
        if name != drift.SCORE:
            outside |= beyond
        share = float(beyond.mean()) if len(beyond) else 0.0
        measured[name] = (drift.psi(refs[name], values), share)
    estimate = watch.estimated_roc_auc(scored["ChurnScore"].to_numpy(dtype=np.float64))
    return measured, float(outside.mean()) if len(outside) else 0.0, estimate


def _drift_on_spark(
    settings: Settings, as_of: pd.Timestamp, bundle: scoring.ModelBundle, scores: Any
) -> Drift:
    """`_drift_in_pandas` with the values left on Spark: each column's counts over its
    reference bins and outside its range come back (`c360ml.spark.outputs.drift_counts`),
    and the PSI is computed from them (`c360ml.model.drift.psi_of_counts`)."""
    from c360ml.features.asof import SPARK
    from c360ml.model import drift
    from c360ml.spark import outputs
    from c360ml.spark.features import _session
    from c360ml.spark.gold import read_delta

    refs = bundle.metadata["drift_reference"]
    spark = _session(settings)
    features = read_delta(spark, Lake(settings.lake), "gold", "customer_features")
    features = features.where(f"{AS_OF} = {SPARK.timestamp(as_of)}")
    scored = scores.where(f"ScoreStatus = '{SCORED}'")
    counted = outputs.drift_counts(features, {n: refs[n] for n in bundle.feature_names})
    score = outputs.drift_counts(scored, {drift.SCORE: refs[drift.SCORE]})
    counted[drift.SCORE] = score[drift.SCORE]
    measured = {}
    for name in [*bundle.feature_names, drift.SCORE]:
        c = counted[name]
        share = c["outside"] / c["rows"] if c["rows"] else 0.0
        measured[name] = (drift.psi_of_counts(refs[name], c["counts"]), share)
    everyone = counted[None]
    profiles_outside = everyone["outside"] / everyone["rows"] if everyone["rows"] else 0.0
    return measured, profiles_outside, outputs.estimated_roc_auc(scored)


def record_outcomes(settings: Settings) -> StepResult:
    """Realized performance of every stored ScoredAsOf whose window has closed and that has
    no outcome yet (`c360ml.model.watch`): to gold/score_outcomes and to the model
    version's MLflow run (metric `realized_roc_auc`, step = days since 1970 of the as_of)."""
    import pyarrow.dataset as ds

    from c360ml import features as ft
    from c360ml.model import watch

    started = time.perf_counter()
    lake = Lake(settings.lake)
    cfg = ft.load_churn_config(settings.path(settings.feature_spec))
    window = cfg.prediction_window_days
    columns = ["CustomerId", "ChurnScore", "ModelVersion", "ScoredAsOf", "ScoreStatus"]
    done = (
        lake.read_pandas("gold", watch.OUTCOMES, columns=watch.KEY)
        if lake.exists("gold", watch.OUTCOMES)
        else pd.DataFrame(columns=watch.KEY)
    )
    if settings.engine == "spark":  # the scored pairs from Spark; rows only of closed windows
        from c360ml.spark import outputs

        pairs = watch.due(outputs.scored_pairs(settings), done, latest_event_time(lake), window)
        if len(pairs):
            when = ds.field("ScoredAsOf").isin(pa.array(pairs["ScoredAsOf"].drop_duplicates()))
            scores = lake.read_pandas("gold", "churn_scores", columns=columns, filter=when)
            scores = scores[scores["ScoreStatus"] == SCORED]
    else:
        scores = lake.read_pandas("gold", "churn_scores", columns=columns)
        scores = scores[scores["ScoreStatus"] == SCORED]
        pairs = watch.due(scores, done, latest_event_time(lake), window)
    if pairs.empty:
        note = f"no new score window has closed ({len(done)} outcome(s) recorded)"
        return StepResult("outcomes", 0, note, time.perf_counter() - started)
    cutoffs = sorted(pairs["ScoredAsOf"].unique())
    gold = ft.read_gold(lake)
    labels = ft.compute_labels(gold, cutoffs, cfg)
    recency = ft.compute_rfm(gold, cutoffs)[["customer_id", "cutoff_time", "recency_days"]]
    redirects = read_redirects(lake)
    controls = pd.DataFrame(columns=["customer_id", "as_of"])
    if lake.exists("gold", "segment_membership"):
        members = lake.read_pandas("gold", "segment_membership")
        if "control" in members:
            held = members[members["control"].fillna(False).astype(bool)]
            controls = held.assign(customer_id=follow_redirects(held["customer_id"], redirects))[
                ["customer_id", "as_of"]
            ]
    matured = []
    for as_of, version in pairs.itertuples(index=False):
        mine = scores[(scores["ScoredAsOf"] == as_of) & (scores["ModelVersion"] == version)]
        frame = pd.DataFrame(
            {
                "customer_id": follow_redirects(mine["CustomerId"], redirects).to_numpy(),
                "ChurnScore": mine["ChurnScore"].to_numpy(),
            }
        ).drop_duplicates("customer_id")
        at = labels[labels["cutoff_time"] == as_of]
        frame = frame.merge(at[["customer_id", "label"]], on="customer_id").merge(
            recency[recency["cutoff_time"] == as_of].drop(columns="cutoff_time"),
            on="customer_id",
            how="left",
        )
        matured.append(watch.Matured(pd.Timestamp(as_of), str(version), frame))
        held_out = controls.loc[controls["as_of"] == as_of, "customer_id"]
        if len(held_out):
            control = frame[frame["customer_id"].isin(set(held_out))]
            matured.append(watch.Matured(pd.Timestamp(as_of), str(version), control, "control"))
    outcomes = watch.realized_outcomes(matured, window)
    # add_columns: a lake recorded before a figure was kept gets it from now on
    lake.write(outcomes, "gold", watch.OUTCOMES, mode="append", add_columns=True)
    _log_outcomes(settings, outcomes)
    note = ", ".join(
        f"{r.ScoredAsOf:%Y-%m-%d} v{r.ModelVersion} {r.population}: ROC AUC {r.roc_auc:.3f}"
        for r in outcomes.itertuples()
    )
    return StepResult("outcomes", len(outcomes), note, time.perf_counter() - started)


def _log_outcomes(settings: Settings, outcomes: pd.DataFrame) -> None:
    """Realized ROC AUC against each model version's training run (best effort: the lake
    table is the record; a tracking store that is down is a warning, not a failed refresh)."""
    try:
        import mlflow

        client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
        for r in outcomes[outcomes["population"] == "all"].dropna(subset=["roc_auc"]).itertuples():
            run_id = client.get_model_version(settings.model_name, r.ModelVersion).run_id
            step = int(pd.Timestamp(r.ScoredAsOf).timestamp() // 86_400)
            client.log_metric(run_id, "realized_roc_auc", float(r.roc_auc), step=step)
    except Exception as exc:  # see the docstring: a warning, not a failed refresh
        log.warning("realized outcomes not logged to MLflow: %s", exc)


def erase(
    lake: Lake, previous_map: pd.DataFrame | None, resumed: ErasureResult | None = None
) -> StepResult:
    """Purge persons erased at the source since the previous refresh (c360ml.medallion.erasure);
    `resumed` is the erasure a stopped run left, finished as this refresh started (its
    records are found again: the source map it was found from may be the same)."""

    started = time.perf_counter()
    results = [] if resumed is None else [resumed]
    if previous_map is not None:
        erased = erasure.erased_records(lake, previous_map)
        if resumed is not None:
            done = set(resumed.source_keys)
            keys = erased.itertuples(index=False, name=None)
            erased = erased.loc[np.array([k not in done for k in keys], dtype=bool)]
        current = lake.read_pandas("gold", "customer_source_map")
        ids = erasure.erased_customers(previous_map, current, read_redirects(lake), erased)
        if len(erased) or ids:
            results.append(erasure.run(lake, erasure.plan(lake, erased, ids)))
    note = (
        f"{sum(len(r.source_keys) for r in results)} source records, "
        f"{sum(len(r.customer_ids) for r in results)} customers erased"
    )
    if results:
        note += (
            f"; {sum(r.files_removed for r in results)} older files holding them removed, "
            f"{sum(r.histories_forgotten for r in results)} table histories cut"
            + ("; an erasure a stopped run left was finished first" if resumed else "")
        )
    rows = sum(sum(r.rows_deleted.values()) for r in results)
    return StepResult("erasure", rows, note, time.perf_counter() - started)


def vacuum(lake: Lake, retention_hours: int) -> StepResult:
    """The normal retention: files no version of the last `retention_hours` needs go,
    except those of the source map this refresh scored with (the next refresh finds the
    persons erased since from it, however long it waits)."""
    started = time.perf_counter()
    keep = {("gold", "customer_source_map"): lake.version("gold", "customer_source_map")}
    removed = lake.vacuum(retention_hours, keep={k: v for k, v in keep.items() if v is not None})
    return StepResult(
        "vacuum",
        removed,
        f"files older than {retention_hours} h that no version needs",
        time.perf_counter() - started,
    )


def last_scored_map(lake: Lake) -> pd.DataFrame | None:
    """The source map the last refresh scored with: the baseline an erasure is found from.

    Not the map as this refresh starts: a `c360ml build` since the last refresh would
    already have dropped the erased records from it, and their persons would then never
    be purged. The version is the one recorded in the last churn_scores commit; the
    refresh's vacuum keeps its files, and an erasure cuts only the history before it
    (a pending one is finished from its own record). Without a recorded one (no refresh
    yet, or an older lake), the current map.
    """
    map_key = "gold/customer_source_map"
    if not lake.exists("gold", "customer_source_map"):
        return None
    record = last_record(lake, ("gold", "churn_scores"), lambda r: map_key in r)
    if record is not None:
        version = record[0][map_key]
        try:
            return lake.read_pandas("gold", "customer_source_map", version=int(version))
        except (OSError, DeltaError) as exc:  # its files removed by hand
            log.warning("source map v%s of the last refresh unreadable: %s", version, exc)
    return lake.read_pandas("gold", "customer_source_map")


@writes_lake("refresh")
def run_refresh(
    settings: Settings,
    as_of: pd.Timestamp | None = None,
    endpoint: str | None = None,
    explain: str = scoring.DEFAULT_EXPLAIN,
    segments: Callable | None = None,
    report: Callable | None = None,
) -> RefreshSummary:
    """The whole refresh; `segments`/`report` are injected so this module stays small."""
    from c360ml.medallion.build import build_gold, build_silver, build_unify
    from c360ml.medallion.ingest import ingest_landing

    summary = RefreshSummary()

    def timed(name: str, fn: Callable[[], Any], rows: Callable[[Any], int]) -> Any:
        started = time.perf_counter()
        result = fn()
        summary.items.append(StepResult(name, rows(result), "", time.perf_counter() - started))
        return result

    lake = Lake(settings.lake)
    previous_map = last_scored_map(lake)
    resumed = erasure.finish_pending(settings)
    timed("ingest", lambda: ingest_landing(settings), lambda r: r.total_rows)
    timed("silver", lambda: build_silver(settings), lambda r: sum(t.silver_rows for t in r.items))
    timed("unify", lambda: build_unify(settings), lambda r: r.customers)
    timed("gold", lambda: build_gold(settings), lambda r: sum(t.rows for t in r.items))
    summary.items.append(erase(lake, previous_map, resumed))
    as_of = as_of or latest_event_time(lake)
    summary.as_of = as_of
    bundle, version = load_champion(settings)
    # scores: pandas rows on DuckDB; on Spark a Spark DataFrame (c360ml.spark.outputs)
    steps, scores = measures_and_scores(settings, as_of, bundle, version, explain)
    summary.items.extend(steps)
    summary.risk_counts, summary.status_counts = score_counts(settings, scores)
    started = time.perf_counter()
    manifest = export_cid_snapshot(settings, scores, bundle)
    rows = sum(summary.status_counts.values())
    summary.items.append(StepResult("CI-D export", rows, MANIFEST, time.perf_counter() - started))
    summary.outputs["scores"] = lake.uri("gold", "churn_scores")
    summary.outputs["ci-d manifest"] = manifest
    summary.items.append(record_outcomes(settings))
    summary.items.append(record_drift(settings, as_of, bundle, version, scores))
    summary.items.append(vacuum(lake, settings.retention_hours))
    endpoint = endpoint or settings.endpoint
    if segments is not None and endpoint:
        summary.items.append(segments(settings, endpoint, as_of))
    else:
        summary.items.append(
            StepResult(
                "segments",
                0,
                "skipped: no scoring endpoint configured (--endpoint or settings.endpoint)",
            )
        )
    if report is not None:
        started = time.perf_counter()
        path = report(settings)
        summary.outputs["report"] = str(path)
        summary.items.append(StepResult("report", 0, str(path), time.perf_counter() - started))
    return summary
