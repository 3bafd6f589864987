"""The c360ml retention scoring service (BentoML): what the CDP calls as a custom model.

Thin by design: the model is loaded in `__init__` from the BentoML model store (where
`c360ml serve` / `make bento` put the MLflow champion), every answer comes from
`c360ml.model.scoring.score` (the same function as the batch refresh), and the request
schema is the one the model carries. Endpoints:

- POST /predict      {"rows": [...], "explain": ...} -> model info + predictions
- POST /score-table  CSV or parquet file of feature rows -> CSV, streamed in chunks
- GET  /metadata     model name, version, features, thresholds, metrics, grade
- BentoML's /livez, /readyz, /metrics stay open; everything else needs a bearer token.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import bentoml
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from bentoml.exceptions import InvalidArgument
from fastapi import FastAPI

from c360ml.config import load_settings
from c360ml.model import scoring

log = logging.getLogger("c360ml.service")

SETTINGS = load_settings()
TOKENS_ENV = "C360ML_API_TOKENS"  # comma-separated bearer tokens (several, for rotation)
DEV_ENV = "C360ML_DEV_NO_AUTH"  # "1": serve without tokens (development only, loud)
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
MAX_PREDICT_ROWS = 10_000  # larger inputs belong on /score-table
MAX_BODY_BYTES = {"/score-table": 4 << 30}  # per-path request size limits
DEFAULT_MAX_BODY = 16 << 20
TABLE_CHUNK_ROWS = 50_000  # rows scored and streamed per chunk by /score-table
INNER_RETRIES = 3  # calls to the inner scorer on a dropped keep-alive connection
SMALL_BATCH_ROWS = 64  # the inner scorer uses one XGBoost thread below this many rows
F32_MAX = float(np.finfo(np.float32).max)  # a larger JSON number is not a float32 feature

metadata_app = FastAPI(title="c360ml metadata", docs_url=None, redoc_url=None)


class BearerAuth:
    """ASGI middleware: bearer tokens on every path but health, and request size limits.

    A refused request is logged with its path and client, never with the token it sent.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.tokens = {t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()}
        self.dev = os.environ.get(DEV_ENV) == "1"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = int(headers.get(b"content-length", b"0") or 0)
        limit = MAX_BODY_BYTES.get(scope["path"], DEFAULT_MAX_BODY)
        if size > limit:
            return await _reply(send, 413, f"request body of {size} bytes is over {limit} bytes")
        if not self.dev and not self._allowed(headers.get(b"authorization", b"")):
            client = (scope.get("client") or ("?",))[0]
            log.warning(
                json.dumps({"event": "unauthorized", "path": scope["path"], "client": client})
            )
            return await _reply(send, 401, "missing or invalid bearer token")
        if scope["path"] == "/metadata":  # the mounted app lives at /metadata/: no 307 hop
            scope = {**scope, "path": "/metadata/", "raw_path": b"/metadata/"}
        return await self.app(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        text = header.decode("latin-1")
        token = text[7:].strip() if text.startswith("Bearer ") else ""
        return bool(token) and token in self.tokens


async def _reply(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _load_bundle(stored: Any, nthread: int = 2) -> scoring.ModelBundle:
    return scoring.ModelBundle.load(Path(stored.path_of("bundle")), nthread=nthread)


# runner_connection: BentoML 1.4.39 replaces the caller's client session to this service
# every `max_requests` calls (default 100) or `max_age` s (300) and closes the old one under
# the calls still in flight on it ("Connector is closed", "Cannot write to closing
# transport"): at concurrency 16-64 that was 1-5% of /predict calls, each retried by
# `_score` or, after INNER_RETRIES, a 500. The address is local: keep the session.
@bentoml.service(
    name="c360-scorer",
    traffic={"timeout": 600},
    workers=1,
    runner_connection={"max_requests": 2**62, "max_age": 1e12},
)
class Scorer:
    """The inner, batchable scorer: rows of many concurrent /predict calls, scored in one
    `scoring.score` call. Reached only by RetentionService (BentoML runs it as its own
    process on an internal address), so it has no public route or token."""

    model_ref = bentoml.models.BentoModel(f"{SETTINGS.model_name}:latest")

    def __init__(self) -> None:
        self.bundle = _load_bundle(self.model_ref)
        # The same model on one thread for small batches: waking a second OpenMP thread
        # for a few rows costs more than it saves, and much more when the cores are busy.
        self.small = _load_bundle(self.model_ref, nthread=1)
        self.float_features = all(
            self.bundle.feature_dtypes.get(n, "float32") in ("float32", "float64")
            for n in self.bundle.feature_names
        )

    # max_latency_ms is where the dispatcher starts shedding load (503), not the batch
    # window: the window adapts to traffic, so it is set well above a large batch's time.
    @bentoml.api(batchable=True, max_batch_size=20_000, max_latency_ms=10_000)
    def score_rows(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[str, list[int]] = {}
        for pos, item in enumerate(items):
            groups.setdefault(item["_explain"], []).append(pos)
        out: list[dict[str, Any] | None] = [None] * len(items)
        for method, positions in groups.items():
            part = self._frame([items[pos] for pos in positions])
            bundle = self.small if len(part) < SMALL_BATCH_ROWS else self.bundle
            scored = scoring.score(bundle, part, method, validate=False)  # type: ignore[arg-type]
            for pos, record in zip(positions, _records(scored), strict=True):
                out[pos] = record
        return out  # type: ignore[return-value]

    def _frame(self, items: list[dict[str, Any]]) -> pd.DataFrame:
        """Validated rows as the frame `scoring.score` reads. Float features go straight
        into one float32 block (the values feature_matrix would make of them, null -> NaN)
        instead of through pandas' per-column inference over dicts."""
        if not self.float_features:
            return pd.DataFrame(items).drop(columns="_explain")
        names = self.bundle.feature_names
        x = np.array([[item[n] for n in names] for item in items], dtype=np.float32)
        frame = pd.DataFrame(x, columns=list(names))
        frame.insert(0, scoring.CUSTOMER_ID, [item[scoring.CUSTOMER_ID] for item in items])
        return frame


@bentoml.asgi_app(metadata_app, path="/metadata")
@bentoml.service(name="c360-retention", traffic={"timeout": 600, "concurrency": 256}, workers=1)
class RetentionService:
    model_ref = bentoml.models.BentoModel(f"{SETTINGS.model_name}:latest")
    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        tokens = [t for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()]
        if not tokens and os.environ.get(DEV_ENV) != "1":
            raise RuntimeError(f"no API tokens: set {TOKENS_ENV} (or {DEV_ENV}=1 for development)")
        if not tokens:
            log.warning("!!! DEVELOPMENT MODE: serving WITHOUT authentication (%s=1) !!!", DEV_ENV)
        stored = self.model_ref
        self.bundle = _load_bundle(stored)
        self.columns = frozenset((scoring.CUSTOMER_ID, *self.bundle.feature_names))
        self.fast_path = all(
            self.bundle.feature_dtypes.get(n, "float32") in ("float32", "float64")
            for n in self.bundle.feature_names
        )
        self.info = {
            "name": stored.info.metadata.get("model_name", SETTINGS.model_name),
            "version": stored.info.metadata.get("version", str(stored.tag.version)),
            "trained_as_of": str(self.bundle.trained_as_of) if self.bundle.trained_as_of else None,
        }
        log.info(
            "loaded %s version %s (%d features)",
            self.info["name"],
            self.info["version"],
            len(self.bundle.feature_names),
        )

    @bentoml.api(route="/predict")
    async def predict(
        self, rows: list[dict[str, Any]], explain: Literal["exact", "approx", "none"] = "approx"
    ) -> dict[str, Any]:
        """Score rows of CustomerId + features; concurrent calls are batched together."""
        started = time.perf_counter()
        if not rows:
            raise InvalidArgument("empty batch: 'rows' has no rows")
        if len(rows) > MAX_PREDICT_ROWS:
            raise InvalidArgument(f"{len(rows)} rows is over {MAX_PREDICT_ROWS}; use /score-table")
        if self._plain(rows):  # certainly valid: skip pandera and the DataFrame round trip
            items = rows
        else:  # pandera validates, coerces and names every problem
            frame = self._validated(pd.DataFrame(rows))
            items = json.loads(frame.to_json(orient="records"))  # coerced, JSON-safe values
        for item in items:
            item["_explain"] = explain
        predictions = await self._score(items)
        log.info(
            json.dumps(
                {
                    "event": "predict",
                    "model_version": self.info["version"],
                    "rows": len(rows),
                    "explain": explain,
                    "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                }
            )
        )
        return {"model": {**self.info, "explain": explain}, "predictions": predictions}

    async def _score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Through the batching scorer; a connection the scorer's server closed while idle
        (keep-alive expiry races a reuse) is retried, which is safe: scoring is pure."""
        for attempt in range(1, INNER_RETRIES + 1):
            try:
                return await self.scorer.to_async.score_rows(items)
            except aiohttp.ClientConnectionError as exc:
                if attempt == INNER_RETRIES:
                    raise
                log.warning("scorer connection failed (%s), retry %d", exc, attempt)
        raise AssertionError("unreachable")

    @bentoml.api(route="/score-table")
    def score_table(
        self, table: Path, explain: Literal["exact", "approx", "none"] = "none"
    ) -> Generator[str, None, None]:
        """CI-D's custom-model path: a CSV or parquet table in, one CSV out, streamed."""
        chunks = _table_chunks(Path(table))
        first = next(chunks, None)
        if first is None:
            raise InvalidArgument(f"{Path(table).name}: empty table")
        self._validated(first.head(1000))
        self._check_unique_ids(Path(table))
        started, rows = time.perf_counter(), 0

        def stream() -> Generator[str, None, None]:
            nonlocal rows
            header = True
            for chunk in (c for group in ([first], chunks) for c in group):
                scored = scoring.score(self.bundle, self._validated(chunk), explain, validate=False)
                scored["InfluentialFactors"] = [json.dumps(f) for f in _records_factors(scored)]
                rows += len(scored)
                yield scored.to_csv(index=False, header=header)
                header = False
            log.info(
                json.dumps(
                    {
                        "event": "score-table",
                        "model_version": self.info["version"],
                        "rows": rows,
                        "explain": explain,
                        "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                    }
                )
            )

        return stream()

    def _plain(self, rows: list[dict[str, Any]]) -> bool:
        return self.fast_path and plain_rows(rows, self.columns, self.bundle.feature_names)

    def _validated(self, frame: pd.DataFrame) -> pd.DataFrame:
        try:
            return scoring.validate_request(self.bundle, frame)
        except scoring.RequestError as exc:
            raise InvalidArgument(str(exc)) from None

    def _check_unique_ids(self, path: Path) -> None:
        ids = _table_ids(path)
        dup = ids[ids.duplicated()]
        if len(dup):
            raise InvalidArgument(f"duplicate CustomerId in table: {sorted(set(dup))[:10]}")

    def metadata(self) -> dict[str, Any]:
        meta = self.bundle.metadata
        return {
            **self.info,
            "churn_definition": meta.get("churn_config"),
            "features": [
                {"name": n, "dtype": self.bundle.feature_dtypes.get(n, "float32")}
                for n in self.bundle.feature_names
            ],
            "thresholds": {
                "IsChurn": self.bundle.thresholds.is_churn,
                "RiskLevel": {
                    "Low": f"< {self.bundle.thresholds.medium}",
                    "Medium": f"< {self.bundle.thresholds.high}",
                    "High": f">= {self.bundle.thresholds.high}",
                },
            },
            "explain_methods": ["exact", "approx", "none"],
            "default_explain": scoring.DEFAULT_EXPLAIN,
            "test_metrics": meta.get("test_metrics"),
            "grade": meta.get("grade"),
        }


@metadata_app.get("/")
def get_metadata() -> dict[str, Any]:
    return bentoml.get_current_service().metadata()


def plain_rows(rows: list[dict[str, Any]], columns: frozenset, features: tuple[str, ...]) -> bool:
    """True when pandera could only accept these rows unchanged but for the float cast
    scoring makes anyway: exactly the model's columns, unique string CustomerIds,
    features finite numbers within float32 range or null. Anything else (a string
    number, a bool, a missing or extra column, a duplicate) returns False and goes
    through pandera, so a bad request gets the same answer as before. Pure Python:
    pandera costs ~50-90 ms per call whatever the row count, this ~1 us per value."""
    seen = set()
    for row in rows:
        if type(row) is not dict or row.keys() != columns:
            return False
        key = row[scoring.CUSTOMER_ID]
        if type(key) is not str or key in seen:
            return False
        seen.add(key)
        for name in features:
            value = row[name]
            if value is None:
                continue
            kind = type(value)
            if (kind is not float and kind is not int) or not -F32_MAX <= value <= F32_MAX:
                return False  # NaN fails the range test too
    return True


def _records(scored: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe dicts in CI-D's column names."""
    return json.loads(scored.to_json(orient="records"))


def _records_factors(scored: pd.DataFrame) -> list[Any]:
    return json.loads(scored["InfluentialFactors"].to_json(orient="values"))


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def _table_chunks(path: Path) -> Generator[pd.DataFrame, None, None]:
    """The table in chunks of TABLE_CHUNK_ROWS, whatever its format."""
    try:
        if _is_parquet(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=TABLE_CHUNK_ROWS):
                yield batch.to_pandas()
            return
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=8 << 20),
            convert_options=pcsv.ConvertOptions(column_types={"CustomerId": pa.string()}),
        )
        buffer: list[pd.DataFrame] = []
        for batch in reader:
            buffer.append(batch.to_pandas())
            if sum(len(b) for b in buffer) >= TABLE_CHUNK_ROWS:
                yield pd.concat(buffer, ignore_index=True)
                buffer = []
        if buffer:
            yield pd.concat(buffer, ignore_index=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidArgument(f"{path.name}: not a readable CSV or parquet table: {exc}") from None


def _table_ids(path: Path) -> pd.Series:
    try:
        if _is_parquet(path):
            return pq.read_table(path, columns=["CustomerId"])["CustomerId"].to_pandas()
        return pcsv.read_csv(
            path,
            convert_options=pcsv.ConvertOptions(
                include_columns=["CustomerId"], column_types={"CustomerId": pa.string()}
            ),
        )["CustomerId"].to_pandas()
    except (pa.ArrowInvalid, KeyError) as exc:
        raise InvalidArgument(f"{path.name}: no CustomerId column ({exc})") from None


RetentionService.add_asgi_middleware(BearerAuth)
