"""The one scoring function: a model bundle + a feature frame -> CI-D's churn columns.

The MLflow pyfunc, the batch refresh and the BentoML service all call `score`, so a
customer gets the same ChurnScore, RiskLevel and InfluentialFactors whichever way it is
asked. The service imports this module (through `c360ml.serving`) and `c360ml.config`, so
nothing here imports mlflow, featuretools or scikit-learn: a bundle is a plain folder
(booster JSON + small JSON files) and the calibrator is stored as numbers, not a pickle.
The one exception is a version trained with a user's own estimator (`c360ml.open(...)
.evaluate`): its bundle holds the pickled estimator, which imports its own package when
loaded, and scores without InfluentialFactors (it has no per-customer contributions).

Explanations (InfluentialFactors) are signed SHAP contributions in log-odds units of the
uncalibrated booster; with the bias term they sum to the booster's margin. "exact" is
TreeSHAP (xgboost pred_contribs), "approx" is Saabas (approx_contribs=True), "none" skips
them. The default is "approx": Saabas explains rows many times faster than TreeSHAP, and a
refresh of a million customers must fit its time budget together with ingest and features
(benchmarks/bench_train.py measures it).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
import xgboost as xgb
from pandera.typing import Series

from c360ml import glossary

log = logging.getLogger(__name__)

Explain = Literal["exact", "approx", "none"]
DEFAULT_EXPLAIN: Explain = "approx"
TOP_FACTORS = 5  # InfluentialFactors per customer
RAISES, LOWERS = "raises risk", "lowers risk"  # a factor's direction
# The hand-back contract: the columns of the CI-D export and of the service's answers.
# A change to them bumps it; the README lists each version.
CONTRACT_VERSION = "2"
CONTRACT_HEADER = "X-C360ML-Contract-Version"
F32_MAX = float(np.finfo(np.float32).max)
SCORE_CHUNK_ROWS = 100_000  # bounds the contribution matrix (rows x features float32)

BOOSTER_FILE = "booster.json"
# A user's scikit-learn-compatible estimator (c360ml.open(...).evaluate): pickled, as MLflow's
# sklearn flavour stores it; only a bundle that carries one imports the estimator's package.
ESTIMATOR_FILE = "estimator.pkl"
FEATURES_FILE = "features.json"  # names + dtypes: all that scoring and the request schema need
FEATURE_SET_FILE = "feature_set.json"  # FeatureSet.to_json(): definitions to recompute them
METADATA_FILE = "bundle.json"  # thresholds, churn config, trained_as_of, versions, metrics


class ChurnScoreOutput(pa.DataFrameModel):
    """What `score` returns: CI-D's names (the CDP reads these)."""

    CustomerId: Series[str]
    ChurnScore: Series[float] = pa.Field(ge=0.0, le=1.0)
    IsChurn: Series[bool]
    RiskLevel: Series[str] = pa.Field(isin=["Low", "Medium", "High"])
    # list of {"feature", "label", "value", "display_value", "impact", "direction"}
    InfluentialFactors: Series[object]

    class Config:
        strict = True


CUSTOMER_ID = str(ChurnScoreOutput.CustomerId)


class RequestError(ValueError):
    """A scoring request that does not match the model's features; says which column/row."""


@dataclass(frozen=True)
class Thresholds:
    """CI-D contract: IsChurn at ChurnScore >= 0.5; Low < 0.33 <= Medium < 0.66 <= High."""

    is_churn: float = 0.5
    medium: float = 0.33
    high: float = 0.66


@dataclass(frozen=True)
class Calibrator:
    """A monotone map raw probability -> calibrated probability, stored as numbers.

    kind "isotonic": piecewise-linear through (x, y), clipped at the ends (what
    sklearn's IsotonicRegression(out_of_bounds="clip").predict does). kind "platt":
    sigmoid(a * logit(p) + b).
    """

    kind: Literal["isotonic", "platt"]
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 1.0
    b: float = 0.0

    def apply(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.kind == "isotonic":
            return np.interp(p, np.asarray(self.x), np.asarray(self.y))
        logit = np.log(np.clip(p, 1e-12, 1 - 1e-12)) - np.log(np.clip(1 - p, 1e-12, 1))
        return 1.0 / (1.0 + np.exp(-(self.a * logit + self.b)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y), "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        return cls(d["kind"], tuple(d.get("x", ())), tuple(d.get("y", ())), d["a"], d["b"])


@dataclass
class ModelBundle:
    """Everything scoring needs, loadable from a local folder without mlflow.

    The model is the built-in XGBoost `booster` or, for a version trained with a user's own
    estimator, `estimator` (anything with `predict_proba`) and no booster. Both score
    through `score`; only a booster has per-customer contributions (`explains`), so an
    estimator's InfluentialFactors are always empty.
    """

    booster: xgb.Booster | None
    feature_names: tuple[str, ...]
    feature_dtypes: dict[str, str]
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibrator: Calibrator | None = None
    feature_set_json: str | None = None  # definitions, for recomputing the features
    metadata: dict[str, Any] = field(default_factory=dict)  # trained_as_of, churn config, ...
    nthread: int | None = None  # XGBoost threads (load's argument); None: all cores
    # name -> label, unit, description (`c360ml.glossary`), fixed when the model was trained
    feature_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    estimator: Any = None  # a user's fitted estimator (predict_proba) instead of a booster

    def __post_init__(self) -> None:
        if (self.booster is None) == (self.estimator is None):
            raise ValueError("a model bundle holds either a booster or an estimator")
        missing = [n for n in self.feature_names if n not in self.feature_labels]
        if missing:  # bundles saved before labels were carried
            self.feature_labels = {**self.feature_labels, **glossary.describe_all(missing)}

    @property
    def explains(self) -> bool:
        """Whether the model has per-customer contributions (InfluentialFactors)."""
        return self.booster is not None

    @property
    def model_kind(self) -> str:
        """ "xgboost" for the built-in booster, else the estimator's class name."""
        return "xgboost" if self.booster is not None else type(self.estimator).__name__

    @property
    def trained_as_of(self) -> pd.Timestamp | None:
        value = self.metadata.get("trained_as_of")
        return pd.Timestamp(value) if value else None

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.booster is not None:
            self.booster.save_model(str(folder / BOOSTER_FILE))
        else:
            (folder / ESTIMATOR_FILE).write_bytes(pickle.dumps(self.estimator))
        features = {
            "names": list(self.feature_names),
            "dtypes": self.feature_dtypes,
            "labels": self.feature_labels,
        }
        (folder / FEATURES_FILE).write_text(json.dumps(features, indent=1))
        if self.feature_set_json is not None:
            (folder / FEATURE_SET_FILE).write_text(self.feature_set_json)
        meta = dict(self.metadata)
        meta["thresholds"] = vars(self.thresholds)
        meta["calibrator"] = self.calibrator.to_dict() if self.calibrator else None
        (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, folder: Path, nthread: int | None = None) -> ModelBundle:
        folder = Path(folder)
        booster, estimator = None, None
        if (folder / BOOSTER_FILE).exists():
            booster = xgb.Booster()
            booster.load_model(str(folder / BOOSTER_FILE))
            if nthread:
                booster.set_param({"nthread": nthread})
        elif (folder / ESTIMATOR_FILE).exists():
            # Only bundles the project itself registered are loaded (MLflow or BentoML store).
            estimator = pickle.loads((folder / ESTIMATOR_FILE).read_bytes())  # noqa: S301
        else:
            raise FileNotFoundError(
                f"no model bundle in {folder} (missing {BOOSTER_FILE} or {ESTIMATOR_FILE})"
            )
        features = json.loads((folder / FEATURES_FILE).read_text())
        meta = json.loads((folder / METADATA_FILE).read_text())
        fs_path = folder / FEATURE_SET_FILE
        calibrator = meta.pop("calibrator", None)
        return cls(
            booster=booster,
            feature_names=tuple(features["names"]),
            feature_dtypes=dict(features["dtypes"]),
            thresholds=Thresholds(**meta.pop("thresholds", {})),
            calibrator=Calibrator.from_dict(calibrator) if calibrator else None,
            feature_set_json=fs_path.read_text() if fs_path.exists() else None,
            metadata=meta,
            nthread=nthread,
            feature_labels=features.get("labels", {}),
            estimator=estimator,
        )


def feature_schema(bundle: ModelBundle) -> pa.DataFrameSchema:
    """The request schema, built from the names and dtypes the model carries.

    Strict (an unknown column is an error: it usually means a renamed feature), features
    nullable (missing values are allowed, XGBoost routes them), values coerced to the
    logged dtype so JSON numbers (float64, int) are accepted but strings are not.
    """
    columns = {CUSTOMER_ID: pa.Column(str, nullable=False, unique=True, coerce=True)}
    for name in bundle.feature_names:
        dtype = bundle.feature_dtypes.get(name, "float32")
        columns[name] = pa.Column(dtype, nullable=True, coerce=True)
    return pa.DataFrameSchema(
        columns,
        strict=True,
        checks=[pa.Check(lambda df: len(df) > 0, name="non_empty_batch")],
        name="churn_scoring_request",
    )


def _rows(index_values: pd.Series, limit: int = 10) -> str:
    rows = [int(i) if isinstance(i, int | np.integer) else i for i in index_values.dropna()]
    rows = sorted(set(rows), key=str)
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"{rows[:limit]}{more}"


def _describe_failures(failures: pd.DataFrame) -> str:
    """Turn pandera's failure table into one line per problem, naming columns and rows."""
    lines: list[str] = []
    for (column, check), group in failures.groupby(["column", "check"], dropna=False, sort=False):
        cases = [str(c) for c in group["failure_case"].head(3)]
        if check == "column_in_dataframe":
            lines.append(f"missing feature column(s): {', '.join(map(str, group.failure_case))}")
        elif check == "column_in_schema":
            lines.append(f"unknown column(s): {', '.join(map(str, group.failure_case))}")
        elif check == "non_empty_batch":
            lines.append("empty batch: the request has no rows")
        elif check == "field_uniqueness":
            lines.append(
                f"duplicate {column} at rows {_rows(group['index'])} (values {sorted(set(cases))})"
            )
        elif str(check).startswith(("coerce_dtype", "dtype")):
            lines.append(
                f"column {column!r} has values of the wrong type at rows "
                f"{_rows(group['index'])} (expected {str(check).split('(', 1)[-1].rstrip(')')}, "
                f"got e.g. {cases})"
            )
        elif check == "not_nullable":
            lines.append(f"column {column!r} is null at rows {_rows(group['index'])}")
        else:
            lines.append(f"column {column!r} fails {check} at rows {_rows(group['index'])}")
    return "; ".join(dict.fromkeys(lines))  # coerce and dtype failures repeat each other


def _bounded(bundle: ModelBundle, frame: pd.DataFrame) -> pd.DataFrame:
    """Infinity is refused by name; a finite value beyond float32 is clipped to the largest
    float32 (the trees only compare it with split thresholds, so it scores as the very
    large number it is). XGBoost's explanations fail on infinite inputs."""
    problems, clipped = [], {}
    for name in bundle.feature_names:
        if name not in frame or not pd.api.types.is_numeric_dtype(frame[name]):
            continue  # absent or not numbers: the schema names the problem
        values = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
        infinite = np.isinf(values)
        if infinite.any():
            problems.append(
                f"column {name!r} is not a finite number at rows "
                f"{_rows(pd.Series(frame.index[infinite]))}"
            )
        elif (np.abs(values) > F32_MAX).any():
            clipped[name] = np.clip(values, -F32_MAX, F32_MAX)
    if problems:
        raise RequestError("invalid scoring request: " + "; ".join(problems))
    return frame.assign(**clipped) if clipped else frame


def validate_request(bundle: ModelBundle, frame: pd.DataFrame) -> pd.DataFrame:
    """Validate and coerce a request; raises RequestError naming every bad column/row."""
    frame = _bounded(bundle, frame)
    try:
        return feature_schema(bundle).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        message = _describe_failures(exc.failure_cases)
        raise RequestError(f"invalid scoring request: {message}") from None
    except pa.errors.SchemaError as exc:  # pragma: no cover - lazy mode collects them all
        raise RequestError(f"invalid scoring request: {exc}") from exc


def feature_matrix(bundle: ModelBundle, frame: pd.DataFrame) -> np.ndarray:
    """The booster's input: the bundle's features, in its order, as float32."""
    return frame.loc[:, list(bundle.feature_names)].to_numpy(dtype=np.float32, na_value=np.nan)


def margins(bundle: ModelBundle, x: np.ndarray) -> np.ndarray:
    """Raw log-odds of the booster (what the contributions add up to)."""
    if bundle.booster is None:
        raise ValueError(f"a {bundle.model_kind} model has no booster margins")
    return bundle.booster.inplace_predict(x, predict_type="margin").astype(np.float64)


def probabilities(bundle: ModelBundle, x: np.ndarray) -> np.ndarray:
    """ChurnScore: sigmoid of the margin (or the estimator's probability of class 1), then
    the calibrator if the model carries one."""
    if bundle.booster is None:
        p = positive_proba(bundle.estimator, x)
    else:
        p = 1.0 / (1.0 + np.exp(-margins(bundle, x)))
    return bundle.calibrator.apply(p) if bundle.calibrator else p


def positive_proba(estimator: Any, x: np.ndarray) -> np.ndarray:
    """P(churned) from a scikit-learn-style classifier: the predict_proba column of class 1."""
    classes = list(getattr(estimator, "classes_", [0, 1]))
    if 1 not in classes:
        raise ValueError(f"the estimator was not fitted on label 1 (classes {classes})")
    return np.asarray(estimator.predict_proba(x), dtype=np.float64)[:, classes.index(1)]


def contributions(bundle: ModelBundle, x: np.ndarray, method: Explain) -> np.ndarray:
    """Signed per-feature contributions + bias (last column); rows sum to the margin."""
    if method == "none":
        raise ValueError("contributions need explain='exact' or 'approx'")
    if bundle.booster is None:
        raise ValueError(f"a {bundle.model_kind} model has no per-customer contributions")
    # The DMatrix gets the booster's thread count: with the default (all cores) its
    # OpenMP region waits for a busy core, which multiplied a small call's time under load
    # (benchmarks/results/serve.md).
    dm = xgb.DMatrix(x, missing=np.nan, nthread=bundle.nthread)
    return bundle.booster.predict(dm, pred_contribs=True, approx_contribs=method == "approx")


def risk_levels(scores: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    return np.select(
        [scores >= thresholds.high, scores >= thresholds.medium], ["High", "Medium"], "Low"
    )


def _top(x: np.ndarray, contrib: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the top-k features by |impact|, largest first: their columns, values and
    signed impacts (log-odds)."""
    impact = contrib[:, :-1]
    k = min(TOP_FACTORS, impact.shape[1])
    top = np.argpartition(-np.abs(impact), k - 1, axis=1)[:, :k]
    order = np.argsort(-np.abs(np.take_along_axis(impact, top, axis=1)), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    values = np.take_along_axis(x, top, axis=1).astype(np.float64)
    impacts = np.take_along_axis(impact, top, axis=1).astype(np.float64)
    return top, values, impacts


def _top_factors(bundle: ModelBundle, x: np.ndarray, contrib: np.ndarray) -> list[list]:
    """Top-k features by |impact| per row, largest first: the feature's name and label, its
    value (None for NaN) and that value as read in its unit, the signed impact (log-odds)
    and which way it pushes the risk."""
    names = bundle.feature_names
    labels = [bundle.feature_labels[n] for n in names]
    top, values, impacts = _top(x, contrib)
    values_obj = np.where(np.isnan(values), None, values).tolist()
    return [
        [
            {
                "feature": names[j],
                "label": labels[j]["label"],
                "value": v,
                "display_value": glossary.format_value(v, labels[j]["unit"]),
                "impact": round(i, 6),
                "direction": RAISES if i > 0 else LOWERS,
            }
            for j, v, i in zip(cols, vals, imps, strict=True)
        ]
        for cols, vals, imps in zip(top.tolist(), values_obj, impacts.tolist(), strict=True)
    ]


def _top_factors_json(bundle: ModelBundle, x: np.ndarray, contrib: np.ndarray) -> np.ndarray:
    """`_top_factors` as the JSON text `json.dumps` gives each row, built from the arrays
    of the top features: a batch of a million customers has five million factors, which
    as dicts take gigabytes and much of a refresh's scoring time. Each distinct number is
    formatted once."""
    names = bundle.feature_names
    labels = [bundle.feature_labels[n] for n in names]
    heads = np.array(
        [f'{{"feature": {json.dumps(n)}, "label": {json.dumps(lab["label"])}, "value": '
         for n, lab in zip(names, labels, strict=True)],
        dtype=object,
    )  # fmt: skip
    units = np.array([lab["unit"] for lab in labels], dtype=object)
    top, values, impacts = _top(x, contrib)
    if not top.shape[1]:
        return np.full(len(x), "[]", dtype=object)
    number = _each_once(values, lambda v: "null" if np.isnan(v) else repr(float(v)))
    shown = np.empty(values.shape, dtype=object)
    for unit in set(units[top].ravel()):
        at = units[top] == unit
        shown[at] = _each_once(
            # format_value writes digits, separators and words only: no JSON escapes
            values[at],
            lambda v, u=unit: f'"{glossary.format_value(_none(v), u)}"',
        )
    impact = _each_once(impacts, lambda v: repr(round(float(v), 6)))
    direction = np.where(impacts > 0, json.dumps(RAISES), json.dumps(LOWERS))
    objects = [
        f'{h}{n}, "display_value": {s}, "impact": {i}, "direction": {d}}}'
        for h, n, s, i, d in zip(
            heads[top].ravel(), number.ravel(), shown.ravel(), impact.ravel(),
            direction.ravel().tolist(), strict=True,
        )
    ]  # fmt: skip
    k = top.shape[1]
    return np.array(
        ["[" + ", ".join(objects[r : r + k]) + "]" for r in range(0, len(objects), k)],
        dtype=object,
    )


def _none(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _each_once(values: np.ndarray, text) -> np.ndarray:
    """text(v) for every element (an object array of values' shape), called once per
    distinct value."""
    distinct, where = np.unique(values, return_inverse=True)
    return np.array([text(v) for v in distinct], dtype=object)[where].reshape(values.shape)


def score(
    bundle: ModelBundle,
    frame: pd.DataFrame,
    explain: Explain = DEFAULT_EXPLAIN,
    validate: bool = True,
    factors_as: Literal["records", "json"] = "records",
) -> pd.DataFrame:
    """Score a frame of CustomerId + feature columns; one output row per input row.

    Never samples: every row in is a row out, in the same order. A model without
    contributions (`bundle.explains` False) returns empty InfluentialFactors whatever
    `explain` asks. `factors_as` "json": each row's InfluentialFactors as the JSON text
    of its records (what gold/churn_scores stores), built without the records.
    """
    if explain not in ("exact", "approx", "none"):
        raise ValueError(f"explain must be 'exact', 'approx' or 'none', not {explain!r}")
    if validate:
        frame = validate_request(bundle, frame)
    x = feature_matrix(bundle, frame)
    scores = probabilities(bundle, x)
    as_json = factors_as == "json"
    if explain == "none" or not bundle.explains:
        factors: list = ["[]" if as_json else [] for _ in range(len(x))]
    else:
        factors = []
        top_factors = _top_factors_json if as_json else _top_factors
        for start in range(0, len(x), SCORE_CHUNK_ROWS):
            chunk = x[start : start + SCORE_CHUNK_ROWS]
            contrib = contributions(bundle, chunk, explain)
            factors.extend(top_factors(bundle, chunk, contrib))
    out = pd.DataFrame(
        {
            ChurnScoreOutput.CustomerId: frame[CUSTOMER_ID].astype(str).to_numpy(),
            ChurnScoreOutput.ChurnScore: scores,
            ChurnScoreOutput.IsChurn: scores >= bundle.thresholds.is_churn,
            ChurnScoreOutput.RiskLevel: risk_levels(scores, bundle.thresholds),
            ChurnScoreOutput.InfluentialFactors: pd.Series(factors, dtype=object).to_numpy(),
        }
    )
    return out
