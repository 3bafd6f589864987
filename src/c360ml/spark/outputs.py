"""The Spark refresh's steps after scoring, on Spark: what reaches the driver is aggregates.

`c360ml.spark.features.measures_and_scores` writes this as_of's churn_scores by Spark and
hands the refresh a Spark DataFrame of them (read from the lake), not pandas rows; the
steps that follow it in `c360ml.refresh.run_refresh` dispatch here on the Spark engine:

- the summary's counts per ScoreStatus and RiskLevel: one grouped count (`score_counts`);
- the CI-D export's ChurnScores entity: written by Spark as Parquet into the snapshot
  folder (`write_export`), and the contact map as well (`contact_map`); the manifest
  matches any `.parquet` file in that folder (CI-D's partition pattern), so Spark's
  several part files are the same entity. The glossary (the model's features) and the
  manifest stay the driver's;
- drift: each column's counts over the bins stored with the model (`drift_counts`), one
  row per table back, from which `c360ml.model.drift` computes the PSI as it does from
  values; the label-free ROC AUC estimate as grouped sums and a running sum
  (`estimated_roc_auc`), one number back;
- outcomes: the (ScoredAsOf, ModelVersion) pairs of the stored scores (`scored_pairs`),
  a few rows back, so a refresh whose windows have not closed reads no score row;
  a closed window's rows are read by their as_of only.

The figures equal the DuckDB engine's: the same counts give the same PSI, and the
estimate's sums differ at most in their last bits (tests/spark/test_features.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from c360ml.features.asof import SPARK
from c360ml.spark.features import SparkFeatureError, _session, _spark_step
from c360ml.spark.gold import _first_line, _spark_errors, read_delta
from c360ml.storage.lake import Lake

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

    from c360ml.config import Settings

SCORED = "scored"  # c360ml.refresh.SCORED (not imported: refresh imports this module lazily)


def _rows(frame: DataFrame, what: str) -> pd.DataFrame:
    """A small Spark result (aggregates) in pandas; SparkFeatureError naming `what`."""
    try:
        return frame.toPandas()
    except _spark_errors() as exc:
        raise SparkFeatureError(f"Spark failed the {what}: {_first_line(exc)}") from exc


def scores_at(settings: Settings, as_of: pd.Timestamp) -> DataFrame:
    """This as_of's rows of gold/churn_scores as a Spark DataFrame (read from the lake)."""
    spark = _session(settings)
    scores = read_delta(spark, Lake(settings.lake), "gold", "churn_scores")
    return scores.where(f"ScoredAsOf = {SPARK.timestamp(as_of)}")


def score_counts(scores: DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(profiles per RiskLevel of the scored ones, profiles per ScoreStatus), as the
    refresh summary gives them."""
    counts = _rows(scores.groupBy("ScoreStatus", "RiskLevel").count(), "counts of the scores")
    status = counts.groupby("ScoreStatus")["count"].sum()
    scored = counts[(counts["ScoreStatus"] == SCORED) & counts["RiskLevel"].notna()]
    risk = scored.groupby("RiskLevel")["count"].sum()
    by_size = lambda s: {str(k): int(v) for k, v in s.sort_values(ascending=False).items()}  # noqa: E731
    return by_size(risk), by_size(status)


def write_export(frame: DataFrame, folder: str) -> pa.Schema:
    """`frame` written by Spark as Parquet files into the new folder `folder` (the export's
    snapshot folder, by its `Lake.uri`: a local folder or a container's prefix); its Arrow
    schema as the files hold it (the entity's CDM attributes are made from it). Timestamps
    as microseconds (Spark's INT96 default would read as nanoseconds without a zone),
    Snappy as pyarrow writes the other entities."""
    from pyspark.sql.pandas.types import to_arrow_schema

    spark = frame.sparkSession
    _micros(spark)
    # overwrite of a new folder (the stamp is new): Sail has no "errorifexists"
    writer = frame.write.mode("overwrite").option("compression", "snappy")
    _spark_step(lambda: writer.parquet(folder), "CI-D export")
    return to_arrow_schema(frame.schema, timezone="UTC")


def contact_map(spark: SparkSession, lake: Lake) -> DataFrame:
    """The export's ContactBackstamp rows (ContactId, CustomerId: the Dataverse contacts'
    customer ids) from gold/customer_source_map, on Spark."""
    source_map = read_delta(spark, lake, "gold", "customer_source_map")
    contacts = source_map.where("source = 'dataverse'")
    return contacts.selectExpr("source_key AS ContactId", "customer_id AS CustomerId")


def _micros(spark: SparkSession) -> None:
    """Parquet timestamps written as TIMESTAMP_MICROS (Apache Spark's default is INT96;
    Sail writes microseconds already and may not know the setting)."""
    try:
        spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    except _spark_errors():
        pass


def _double(value: float) -> str:
    """A float64 as a Spark SQL literal that parses back to the same bits."""
    return f"CAST('{float(value)!r}' AS DOUBLE)"


def drift_counts(frame: DataFrame, refs: dict[str, dict]) -> dict[str, dict]:
    """Per column of `frame` named in `refs`: its counts over the reference's bins, in
    `c360ml.model.drift.shares`' order ((-inf, c1], ..., (ck, inf), then missing), the
    number of values outside the reference's range, and the rows; plus `None`: the rows
    with any column outside its range. One Spark aggregation, one row back.

    Missing is NULL or NaN (numpy's NaN for either); NaN is tested first, as Spark orders
    NaN above every number."""
    aggregates, layout = [], {}
    any_outside = []
    for name, ref in refs.items():
        c = f"CAST({SPARK.quote(name)} AS DOUBLE)"
        missing = f"({c} IS NULL OR isnan({c}))"
        bins, previous = [], None
        for cut in ref["cuts"]:
            low = f" AND {c} > {previous}" if previous is not None else ""
            bins.append(f"NOT {missing} AND {c} <= {_double(cut)}{low}")
            previous = _double(cut)
        bins.append(f"NOT {missing}" + (f" AND {c} > {previous}" if previous else ""))
        bins.append(missing)
        if ref["low"] is None:
            out = f"NOT {missing}"
        else:
            out = f"NOT {missing} AND ({c} < {_double(ref['low'])} OR {c} > {_double(ref['high'])})"
        any_outside.append(f"({out})")
        first = len(aggregates)
        aggregates += [f"COUNT_IF({b})" for b in bins] + [f"COUNT_IF({out})"]
        layout[name] = (first, len(bins))
    aggregates.append(f"COUNT_IF({' OR '.join(any_outside) or 'false'})")
    aggregates.append("COUNT(*)")
    named = [f"{a} AS a{i}" for i, a in enumerate(aggregates)]
    row = _rows(frame.selectExpr(*named), "drift counts").iloc[0].to_numpy(dtype=np.int64)
    rows = int(row[-1])
    out: dict = {
        name: {
            "counts": row[first : first + n].tolist(),
            "outside": int(row[first + n]),
            "rows": rows,
        }
        for name, (first, n) in layout.items()
    }
    out[None] = {"outside": int(row[-2]), "rows": rows}
    return out


def estimated_roc_auc(scores: DataFrame, column: str = "ChurnScore") -> float:
    """`c360ml.model.watch.estimated_roc_auc` of a column on Spark: the expected pairs'
    sums per distinct score and a running sum of the retained weight below each, one
    row back."""
    spark = scores.sparkSession
    view = "c360ml_estimate_scores"
    scores.select(scores[column].alias("p")).createOrReplaceTempView(view)
    sql = f"""
    WITH g AS (
      SELECT p, SUM(p) AS pos, SUM(1 - p) AS neg, SUM(p * (1 - p)) AS self
      FROM {view} WHERE p IS NOT NULL AND NOT isnan(p) GROUP BY p
    ), c AS (
      SELECT pos, neg, self,
        COALESCE(SUM(neg) OVER (ORDER BY p ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
          AS below
      FROM g
    )
    SELECT SUM(pos * below) AS above, SUM(0.5 * (pos * neg - self)) AS ties,
      SUM(pos) AS pos, SUM(neg) AS neg, SUM(self) AS self,
      (SELECT COUNT(*) FROM {view} WHERE p IS NOT NULL AND NOT isnan(p)) AS n
    FROM c
    """
    r = _rows(spark.sql(sql), "ROC AUC estimate").iloc[0]
    if int(r["n"]) < 2:
        return float("nan")
    pairs = float(r["pos"]) * float(r["neg"]) - float(r["self"])
    return float((float(r["above"]) + float(r["ties"])) / pairs) if pairs > 0 else float("nan")


def scored_pairs(settings: Settings) -> pd.DataFrame:
    """The distinct (ScoredAsOf, ModelVersion) of gold/churn_scores' scored rows."""
    spark = _session(settings)
    scores = read_delta(spark, Lake(settings.lake), "gold", "churn_scores")
    pairs = scores.where(f"ScoreStatus = '{SCORED}'").select("ScoredAsOf", "ModelVersion")
    out = _rows(pairs.distinct(), "scored pairs")
    out["ScoredAsOf"] = pd.to_datetime(out["ScoredAsOf"], utc=True).dt.as_unit("us")
    out["ModelVersion"] = out["ModelVersion"].astype(str)
    return out
