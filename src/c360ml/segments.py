"""Segment workflow: the scoring service called over HTTP as a custom model, then rules.

As the CDP's segment workflow does, it reads the feature snapshot of an as_of, asks the
service for churn outputs (`POST /predict` in batches, with retries and timeouts),
joins them with measures and profile attributes, and evaluates each segment's SQL
predicate in DuckDB. It refuses to run when the served model is not the one that
produced that as_of's `gold/churn_scores`, or when the served version changes mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from c360ml.config import Settings, load_yaml_model
from c360ml.medallion.unify import follow_redirects, read_redirects
from c360ml.model.splits import customer_bucket
from c360ml.schemas import SegmentMembership
from c360ml.steps import StepResult, gold_inputs, replace_as_of
from c360ml.storage.lake import Lake

log = logging.getLogger(__name__)

TOKEN_ENV = "C360ML_API_TOKEN"  # bearer token the workflow sends to the service
BATCH_ROWS = 1000
RETRIES = 3
TIMEOUT_S = 60.0


class Segment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # snake_case; also the export file name
    description: str = ""  # what the segment is for
    rule: str  # DuckDB SQL predicate over scores, measures and profile attributes
    # share of members held out of the journey at random, stable per customer and as_of:
    # what the campaign changed is measured against them
    control_share: float = Field(0.0, ge=0.0, lt=1.0)


class SegmentSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    segments: list[Segment]


def load_segments(path: Path) -> SegmentSpec:
    return load_yaml_model(path, SegmentSpec, "segments")


# ---------------------------------------------------------------- pure stages


def evaluate_rules(rows: pd.DataFrame, spec: SegmentSpec) -> pd.DataFrame:
    """(segment, customer_id) for every rule; a bad rule names the segment."""
    con = duckdb.connect()
    con.register("profiles", rows)
    parts = []
    for seg in spec.segments:
        try:
            ids = con.sql(f"SELECT customer_id FROM profiles WHERE {seg.rule}").df()
        except duckdb.Error as exc:
            raise ValueError(f"segment {seg.name!r}: rule {seg.rule!r} fails: {exc}") from exc
        parts.append(ids.assign(segment=seg.name))
    if not parts:
        return pd.DataFrame(columns=["segment", "customer_id"])
    return pd.concat(parts, ignore_index=True)[["segment", "customer_id"]]


def control_members(members: pd.DataFrame, spec: SegmentSpec) -> pd.Series:
    """Which (segment, customer_id, as_of) rows are in their segment's control group: a hash
    of the three below the segment's control share, so a rerun holds out the same people
    and a new as_of draws again."""
    share = members["segment"].map({s.name: s.control_share for s in spec.segments})
    keys = (
        members["segment"].astype(str)
        + "|"
        + members["customer_id"].astype(str)
        + "|"
        + pd.to_datetime(members["as_of"], utc=True).astype(str)
    )
    return pd.Series(customer_bucket(keys) < share.fillna(0.0).to_numpy(), index=members.index)


def movements(
    current: pd.DataFrame, previous: pd.DataFrame, redirects: pd.DataFrame
) -> pd.DataFrame:
    """Entered / left per segment since the previous as_of; a merged id is not an exit."""
    prev = previous.assign(customer_id=follow_redirects(previous["customer_id"], redirects))
    rows = []
    for seg in sorted(set(current["segment"]) | set(prev["segment"])):
        now = set(current.loc[current["segment"] == seg, "customer_id"])
        before = set(prev.loc[prev["segment"] == seg, "customer_id"])
        rows.append(
            {
                "segment": seg,
                "size": len(now),
                "entered": len(now - before),
                "left": len(before - now),
            }
        )
    return pd.DataFrame(rows, columns=["segment", "size", "entered", "left"])


def journey_export(members: pd.DataFrame, contacts: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """CustomerId, ContactId, Email for a journey; consented contacts only.

    `contacts`: customer_id, contactid, emailaddress1, donotemail, donotbulkemail. Returns
    the export and how many contacts were left out for consent.
    """
    linked = members.merge(contacts, on="customer_id", how="inner")
    blocked = linked["donotemail"].fillna(False).astype(bool) | linked["donotbulkemail"].fillna(
        False
    ).astype(bool)
    out = linked.loc[~blocked & linked["emailaddress1"].notna()]
    out = out.rename(
        columns={"customer_id": "CustomerId", "contactid": "ContactId", "emailaddress1": "Email"}
    )[["CustomerId", "ContactId", "Email"]]
    return out.reset_index(drop=True), int(blocked.sum())


# ---------------------------------------------------------------- the HTTP client


@dataclass
class ScoringClient:
    """A small client of the service: bearer token, timeouts, retries with backoff."""

    endpoint: str
    token: str | None = None
    timeout: float = TIMEOUT_S
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(
            base_url=self.endpoint.rstrip("/"), headers=headers, timeout=self.timeout
        )

    def _call(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(1, RETRIES + 1):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ValueError(
                            f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}"
                        )
                    return response.json()
                error = f"HTTP {response.status_code}"
            log.warning(
                "%s %s failed (%s), attempt %d of %d", method, path, error, attempt, RETRIES
            )
            time.sleep(0.5 * 2 ** (attempt - 1))
        raise ConnectionError(f"{method} {self.endpoint}{path} failed {RETRIES} times: {error}")

    def metadata(self) -> dict:
        return self._call("GET", "/metadata")

    def predict(self, rows: list[dict], explain: str = "none") -> dict:
        return self._call("POST", "/predict", json={"rows": rows, "explain": explain})


def score_over_http(
    client: ScoringClient, snapshot: pd.DataFrame, expected_version: str
) -> pd.DataFrame:
    """Churn outputs for every snapshot row, in batches; the served version must not move."""
    answers = []
    for start in range(0, len(snapshot), BATCH_ROWS):
        batch = snapshot.iloc[start : start + BATCH_ROWS]
        rows = json.loads(batch.to_json(orient="records"))
        reply = client.predict(rows)
        if str(reply["model"]["version"]) != expected_version:
            raise RuntimeError(
                f"served model changed during the run: version "
                f"{reply['model']['version']}, expected {expected_version}"
            )
        answers.extend(reply["predictions"])
    return pd.DataFrame(answers)


# ---------------------------------------------------------------- lake edges


@dataclass
class SegmentsResult:
    as_of: pd.Timestamp
    moves: pd.DataFrame
    exports: dict[str, str]
    consent_excluded: dict[str, int]


def run_segments(
    settings: Settings, endpoint: str, as_of: pd.Timestamp | None = None, token: str | None = None
) -> SegmentsResult:
    lake = Lake(settings.lake)
    spec = load_segments(settings.path(settings.segments))
    snapshot = lake.read_pandas("gold", "customer_features")
    as_of = as_of or snapshot["as_of"].max()
    snapshot = snapshot[snapshot["as_of"] == as_of].drop(columns=["as_of"])
    scores = lake.read_pandas("gold", "churn_scores")
    versions = set(scores.loc[scores["ScoredAsOf"] == as_of, "ModelVersion"])
    if len(versions) != 1:
        raise ValueError(f"gold/churn_scores has no single model version for {as_of}: {versions}")
    expected = versions.pop()
    client = ScoringClient(endpoint, token or os.environ.get(TOKEN_ENV))
    served = str(client.metadata()["version"])
    if served != expected:
        raise RuntimeError(
            f"the service at {endpoint} serves version {served}, but the scores of "
            f"{as_of} came from version {expected}: refusing to mix them"
        )
    answers = score_over_http(
        client, snapshot.rename(columns={"customer_id": "CustomerId"}), expected
    )
    rows = _profile_rows(lake, answers, as_of)
    members = evaluate_rules(rows, spec).assign(as_of=as_of)
    members["control"] = control_members(members, spec)
    SegmentMembership.validate(members)
    redirects = read_redirects(lake)
    previous = _previous_members(lake, as_of)
    replace_as_of(
        lake,
        members,
        "segment_membership",
        "as_of",
        as_of,
        gold_inputs(lake) | {"model_version": expected, "segments": spec.model_dump_json()},
    )
    contacts = _contacts(lake)
    exports, excluded = {}, {}
    for seg in spec.segments:
        targeted = (members["segment"] == seg.name) & ~members["control"]
        export, excluded[seg.name] = journey_export(
            members.loc[targeted, ["customer_id"]], contacts
        )
        # through the lake's store: a local folder, or the container CI-Journeys reads
        where = ("export", "journeys", f"{seg.name}.csv")
        lake.store.write_text(lake.key(*where), export.to_csv(index=False))
        exports[seg.name] = lake.uri(*where)
    return SegmentsResult(as_of, movements(members, previous, redirects), exports, excluded)


def _profile_rows(lake: Lake, answers: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    rows = answers.rename(columns={"CustomerId": "customer_id"}).drop(
        columns=["InfluentialFactors"], errors="ignore"
    )
    if lake.exists("gold", "customer_measures"):
        measures = lake.read_pandas("gold", "customer_measures")
        measures = measures[measures["as_of"] == as_of].drop(columns=["as_of"])
        rows = rows.merge(measures, on="customer_id", how="left")
    profile = lake.read_pandas("gold", "customer_profile")[
        ["customer_id", "country", "customer_group", "created_ts"]
    ]
    return rows.merge(profile, on="customer_id", how="left")


def _previous_members(lake: Lake, as_of: pd.Timestamp) -> pd.DataFrame:
    if not lake.exists("gold", "segment_membership"):
        return pd.DataFrame(columns=["segment", "customer_id"])
    members = lake.read_pandas("gold", "segment_membership")
    earlier = members[members["as_of"] < as_of]
    return earlier[earlier["as_of"] == earlier["as_of"].max()] if len(earlier) else earlier


def _contacts(lake: Lake) -> pd.DataFrame:
    source_map = lake.read_pandas("gold", "customer_source_map")
    linked = source_map[source_map["source"] == "dataverse"].rename(
        columns={"source_key": "contactid"}
    )[["customer_id", "contactid"]]
    contact = lake.read_pandas("silver", "contact")[
        ["contactid", "emailaddress1", "donotemail", "donotbulkemail"]
    ]
    return linked.merge(contact, on="contactid", how="inner")


def segments_step(settings: Settings, endpoint: str, as_of: pd.Timestamp) -> StepResult:
    """run_segments as a step of the refresh summary."""
    started = time.perf_counter()
    result = run_segments(settings, endpoint, as_of)
    note = "; ".join(
        f"{r.segment}: {r.size} (+{r.entered}/-{r.left})" for r in result.moves.itertuples()
    )
    return StepResult(
        "segments", int(result.moves["size"].sum()), note, time.perf_counter() - started
    )
