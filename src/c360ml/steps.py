"""What the jobs that score (refresh, segments, training) share: the record of a step,
the gold tables they write, how they write one as_of of such a table, and the default
as_of (the latest event in gold).

A job's output is partitioned by as_of and stamped with the versions of the gold tables
it read (`gold_inputs`): the same as_of from the same inputs is written once, so a
refresh run twice adds no rows and no versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from c360ml.storage.inputs import last_record, stamp, versions
from c360ml.storage.lake import Lake

DRIFT = "score_drift"  # gold table: PSI per feature and of the score, per as_of


@dataclass
class StepResult:
    """One step of a job as the CLI prints it (rows written, a note, time taken)."""

    step: str
    rows: int = 0
    note: str = ""
    seconds: float = 0.0
    detail: dict | None = None  # drift: what crossed the alarm (`drift.latest_alarms`)

    def row(self) -> dict:
        """The printed step: the detail is for the report and the webhook, not the table."""
        return {
            "step": self.step,
            "rows": self.rows,
            "note": self.note,
            "seconds": round(self.seconds, 2),
        }


REFRESH_OUTPUTS = (
    "customer_measures",
    "customer_features",
    "churn_scores",
    "segment_membership",
    "score_outcomes",
    DRIFT,
)


def gold_inputs(lake: Lake) -> dict[str, int]:
    """Versions of the gold tables the refresh reads: "same inputs" means these."""
    return versions(lake, "gold", exclude=REFRESH_OUTPUTS)


def replace_as_of(
    lake: Lake, frame: pd.DataFrame, table: str, column: str, as_of: pd.Timestamp, inputs: dict
) -> bool:
    """Replace one as_of's rows in one commit; skip when the same inputs made them."""
    if same_inputs(lake, table, as_of, inputs):
        return False
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    meta = stamp({**inputs, "as_of": str(as_of)})
    # The first write creates the table; a later one replaces this as_of's rows only.
    predicate = f"{column} = '{as_of.isoformat()}'" if lake.exists("gold", table) else None
    lake.write(arrow, "gold", table, mode="overwrite", metadata=meta, predicate=predicate)
    return True


def same_inputs(lake: Lake, table: str, as_of: pd.Timestamp, inputs: dict) -> bool:
    """Whether `table`'s rows of `as_of` were last written from `inputs`."""
    record = last_record(lake, ("gold", table), lambda r: r.get("as_of") == str(as_of))
    return record is not None and {k: v for k, v in record[0].items() if k != "as_of"} == inputs


def latest_event_time(lake: Lake) -> pd.Timestamp:
    """The default as_of: the latest event time in gold (orders and cases); reads only
    the two timestamp columns."""
    times = [
        pc.max(lake.read("gold", table, columns=[column])[column]).as_py()
        for table, column in (("orders", "order_ts"), ("support_cases", "created_ts"))
        if lake.exists("gold", table)
    ]
    times = [t for t in times if t is not None]
    if not times:
        raise ValueError(f"no orders or support cases in {lake.uri('gold')}: nothing to refresh")
    return pd.Timestamp(max(times)).tz_convert("UTC")
