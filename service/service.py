"""The c360ml retention scoring service (BentoML): what the CDP calls as a custom model.

Thin by design: the model is loaded in `__init__` from the BentoML model store (where
`c360ml serve` / `make bento` put the MLflow champion), every answer comes from
`c360ml.model.scoring.score` (the same function as the batch refresh), and the request
schema is the one the model carries. Endpoints:

- POST /predict      {"rows": [...], "explain": ...} -> model info + predictions
- POST /score-table  CSV or parquet file of feature rows -> CSV, streamed in chunks
- GET  /metadata     model name, version, features, thresholds, metrics, grade, drift alarms
- BentoML's /livez, /readyz, /metrics stay open; everything else needs a bearer token.

/predict and /metadata are raw routes of a FastAPI app mounted on the service, not
`@bentoml.api` methods: BentoML's pydantic IO parses, dumps and re-validates every value
of a request (~25 ms per 1,000 rows of 120 features, benchmarks/results/serve.md), more
than parsing and scoring them. A /predict body is decoded once, by msgspec into rows typed
from the model's features (names and float-or-null checked while parsing, in C); a body
that does not fit goes through pandera, which names every problem. BentoML's middleware
(auth below, metrics, timeouts, concurrency limit) still wraps both routes. Small requests
go to the inner `Scorer`, where BentoML's adaptive batching scores many concurrent calls
together; a request of LOCAL_ROWS rows or more is a batch already and is scored here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import anyio
import bentoml
import msgspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from bentoml._internal.server.http import traffic
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from c360ml.config import load_settings
from c360ml.model import scoring

log = logging.getLogger("c360ml.service")

SETTINGS = load_settings()
TOKENS_ENV = "C360ML_API_TOKENS"  # comma-separated bearer tokens (several, for rotation)
DEV_ENV = "C360ML_DEV_NO_AUTH"  # "1": serve without tokens (development only, loud)
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
EXPLAINS = ("exact", "approx", "none")
MAX_PREDICT_ROWS = 10_000  # larger inputs belong on /score-table
# Per-path request size limits. /predict takes MAX_PREDICT_ROWS rows of a few hundred
# features written out in full (~6 KB a row at 300 features): larger inputs are tables.
MAX_BODY_BYTES = {"/score-table": 4 << 30, "/predict": 64 << 20}
DEFAULT_MAX_BODY = 1 << 20
UPLOAD = "the uploaded table"  # errors never name the server's temporary file
TABLE_CHUNK_ROWS = 50_000  # rows scored and streamed per chunk by /score-table
INNER_RETRIES = 3  # calls to the inner scorer on a dropped keep-alive connection
SMALL_BATCH_ROWS = 64  # the inner scorer uses one XGBoost thread below this many rows
# A /predict request of this many rows is scored in the API process, on a worker thread:
# it is a batch already (score()'s ~1 ms fixed cost is < 4 us a row here), so the hop to
# the scorer and back (a second HTTP request, the replies pickled) would only add to it,
# and would hold the scorer's one-batch-at-a-time dispatcher while small calls wait.
LOCAL_ROWS = 256
INLINE_BODY_BYTES = 64 << 10  # larger /predict bodies are parsed in a worker thread
F32_MAX = scoring.F32_MAX  # a larger JSON number is not a float32 feature
PICKLE = ContentType("application/vnd.bentoml+pickle")  # BentoML's service-to-service serde


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
        return await self._limited(scope, receive, send, limit)

    async def _limited(self, scope: dict, receive: Any, send: Any, limit: int) -> None:
        """The app with the size limit held while the body is read (a chunked body has no
        Content-Length to check up front): past the limit the app is told the client left,
        whatever it answers is dropped, and the client gets a 413."""
        received, over, started = 0, False, False

        async def limited_receive() -> dict:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        held: list[dict] = []  # a 4xx JSON answer, held until whole to fix its shape

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over:
                return
            started = True
            if message["type"] == "http.response.start" and _is_json_error(message):
                held.append(message)
                return
            if held and message["type"] == "http.response.body":
                held.append(message)
                if not message.get("more_body"):
                    for part in _one_error_shape(held):
                        await send(part)
                    held.clear()
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _reply(send, 413, f"request body is over {limit} bytes")

    def _allowed(self, header: bytes) -> bool:
        text = header.decode("latin-1")
        token = text[7:].strip() if text.startswith("Bearer ") else ""
        return bool(token) and token in self.tokens


def _is_json_error(start: dict) -> bool:
    headers = dict(start.get("headers") or [])
    return 400 <= start["status"] < 500 and headers.get(b"content-type", b"").startswith(
        b"application/json"
    )


def _one_error_shape(messages: list[dict]) -> list[dict]:
    """Every error of this service is `{"error": ...}`: BentoML answers a 4xx raised in an
    API as `[{"error": ...}]`, and an invalid upload with pydantic's list under "detail"."""
    start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], dict):
        doc = doc[0]
    if isinstance(doc, dict) and isinstance(doc.get("detail"), list):  # pydantic's errors
        problems = "; ".join(
            f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}"
            for d in doc["detail"]
            if isinstance(d, dict)
        )
        doc = {"error": f"{doc.get('error', 'invalid request')}: {problems}"}
    if isinstance(doc, dict):
        body = json.dumps(doc).encode()
    headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return [{**start, "headers": headers}, {"type": "http.response.body", "body": body}]


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


class _TimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's time-to-first-byte limit (`traffic.timeout`), with its timer cancelled
    when the response starts. BentoML 1.4.39 leaves the timer scheduled, so every request
    kept ~6 objects alive for the whole timeout (600 s here): millions under load, and the
    collector's full passes over them paused each process for 0.1-1 s, the single-row p99.
    Installed in place of BentoML's class below, which the app factory imports when it
    builds each service's app (after this module is loaded)."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def first_send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
                timer.cancel()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, first_send))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                error = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(error, status_code=504)(scope, receive, send)
        else:
            await task


traffic.TimeoutMiddleware = _TimeoutMiddleware  # type: ignore[misc]


def _load_bundle(stored: Any, nthread: int = 2) -> scoring.ModelBundle:
    return scoring.ModelBundle.load(Path(stored.path_of("bundle")), nthread=nthread)


def _freeze_heap() -> None:
    """Move everything loaded so far out of the garbage collector's reach: its full passes
    scanned the ~200,000 objects of the imports (BentoML, pandas, pyarrow, XGBoost) in
    100-200 ms on these cores. Single-row /predict at concurrency 16 on a fresh server:
    p99 146-241 ms without, 35-52 ms with (`_TimeoutMiddleware` keeps it so as it ages)."""
    gc.collect()
    gc.freeze()


def _frame(bundle: scoring.ModelBundle, ids: list[str], x: np.ndarray) -> pd.DataFrame:
    """The frame `scoring.score` reads, from checked ids and the float32 feature block."""
    frame = pd.DataFrame(x, columns=list(bundle.feature_names), copy=False)
    frame.insert(0, scoring.CUSTOMER_ID, ids)
    return frame


def request_decoder(features: tuple[str, ...]) -> msgspec.json.Decoder:
    """A decoder of /predict bodies whose rows have exactly CustomerId (a string) and the
    model's features (numbers or null), nothing else: what pandera could only accept
    unchanged but for the float cast scoring makes anyway. Anything else (a string number,
    a bool, a missing or extra column, NaN) fails to decode and goes through pandera."""
    fields = [f"f{i}" for i in range(len(features))]  # feature names need not be identifiers
    row = msgspec.defstruct(
        "Row",
        [(scoring.CUSTOMER_ID, str), *((f, float | None) for f in fields)],
        rename=dict(zip(fields, features, strict=True)),
        forbid_unknown_fields=True,
        gc=False,  # strings and floats only: no cycles, and decoding is ~15% faster
    )
    body = msgspec.defstruct(
        "Body", [("rows", list[row]), ("explain", Literal[EXPLAINS], scoring.DEFAULT_EXPLAIN)]
    )
    return msgspec.json.Decoder(body)


def plain_matrix(rows: list[Any]) -> tuple[list[str], np.ndarray] | None:
    """(CustomerIds, float32 feature block) of decoded rows, or None when an id repeats or
    a value is beyond float32 (pandera then names the problem or takes the value)."""
    values = list(map(msgspec.structs.astuple, rows))
    ids = [v[0] for v in values]
    if len(set(ids)) != len(ids):
        return None
    x = np.array([v[1:] for v in values], dtype=np.float64)  # null -> NaN
    if (np.abs(x) > F32_MAX).any():
        return None
    return ids, x.astype(np.float32)


async def predict_route(request: Request) -> Response:
    status, answer = await bentoml.get_current_service().predict(await request.body())
    return Response(msgspec.json.encode(answer), status, CONTRACT, media_type="application/json")


async def metadata_route(request: Request) -> Response:
    answer = bentoml.get_current_service().metadata()
    return Response(msgspec.json.encode(answer), headers=CONTRACT, media_type="application/json")


CONTRACT = {scoring.CONTRACT_HEADER: scoring.CONTRACT_VERSION}


ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
ERRORS = {
    str(code): {
        "description": what,
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
    for code, what in (
        (400, "a request the model cannot score; the error names the field, column or rows"),
        (401, "missing or invalid bearer token"),
        (413, "request body over the size limit"),
        (503, "the scorer is shedding load"),
        (504, "not answered within the timeout"),
    )
}
FACTOR_SCHEMA = {
    "type": "object",
    "properties": {
        "feature": {"type": "string"},
        "label": {"type": "string"},
        "value": {"type": "number", "nullable": True},
        "display_value": {"type": "string"},
        "impact": {"type": "number"},
        "direction": {"type": "string", "enum": [scoring.RAISES, scoring.LOWERS]},
    },
}
PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["rows"],
                    "properties": {
                        "rows": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_PREDICT_ROWS,
                            "items": {
                                "type": "object",
                                "required": [scoring.CUSTOMER_ID],
                                "properties": {scoring.CUSTOMER_ID: {"type": "string"}},
                                # the model's features (GET /metadata): numbers or null
                                "additionalProperties": {"type": "number", "nullable": True},
                            },
                        },
                        "explain": {"type": "string", "enum": list(EXPLAINS)},
                    },
                }
            }
        },
    }
}
PREDICT_OK = {
    "description": "ChurnScore, IsChurn, RiskLevel and InfluentialFactors per row, in order",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["model", "predictions"],
                "properties": {
                    "model": {"type": "object"},
                    "predictions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "CustomerId": {"type": "string"},
                                "ChurnScore": {"type": "number", "minimum": 0, "maximum": 1},
                                "IsChurn": {"type": "boolean"},
                                "RiskLevel": {"type": "string", "enum": ["Low", "Medium", "High"]},
                                "InfluentialFactors": {"type": "array", "items": FACTOR_SCHEMA},
                            },
                        },
                    },
                },
            }
        }
    },
}
METADATA_OK = {
    "description": "the model's name, version, contract version, features and thresholds",
    "content": {"application/json": {"schema": {"type": "object"}}},
}

# Mounted at the root: raw handlers (no body parsing or response validation by FastAPI),
# with their OpenAPI documents given here, which BentoML merges into /docs.json.
routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
routes.add_api_route(
    "/predict",
    predict_route,
    methods=["POST"],
    summary="Score rows of features",
    openapi_extra=PREDICT_DOC,
    responses={"200": PREDICT_OK, **ERRORS},
    response_class=Response,
)
routes.add_api_route(
    "/metadata",
    metadata_route,
    methods=["GET"],
    summary="The model behind the answers",
    responses={"200": METADATA_OK, "401": ERRORS["401"]},
    response_class=Response,
)


# OpenTelemetry: BentoML wraps every request in its tracing middleware even at its default
# sample rate of 0 (nothing recorded), ~10% of each process's CPU on single-row /predict
# calls; `tracing.excluded_urls` skips it for the scoring routes. To trace them, drop
# those entries and set a sample rate (BentoML's tracing config).
UNTRACED = {"excluded_urls": ["/predict", "/score_rows"]}


# runner_connection: BentoML 1.4.39 replaces the caller's client session to this service
# every `max_requests` calls (default 100) or `max_age` s (300) and closes the old one under
# the calls still in flight on it ("Connector is closed", "Cannot write to closing
# transport"): at concurrency 16-64 that was 1-5% of /predict calls, each retried by
# `_score_batched` or, after INNER_RETRIES, a 500. The address is local: keep the session.
# No access log: its one caller is RetentionService, whose own logs cover every call.
@bentoml.service(
    name="c360-scorer",
    traffic={"timeout": 600},
    workers=1,
    runner_connection={"max_requests": 2**62, "max_age": 1e12},
    logging={"access": {"enabled": False}},
    tracing=UNTRACED,
)
class Scorer:
    """The inner, batchable scorer: rows of many concurrent small /predict calls, scored in
    one `scoring.score` call per explain method. Reached only by RetentionService (BentoML
    runs it as its own process on an internal address), so it has no public route or token.
    An item is one checked row: (CustomerId, explain, its float32 feature values as bytes)."""

    model_ref = bentoml.models.BentoModel(f"{SETTINGS.model_name}:latest")

    def __init__(self) -> None:
        self.bundle = _load_bundle(self.model_ref)
        # The same model on one thread for small batches: waking a second OpenMP thread
        # for a few rows costs more than it saves, and much more when the cores are busy.
        self.small = _load_bundle(self.model_ref, nthread=1)
        _freeze_heap()

    # max_latency_ms is where the dispatcher starts shedding load (503), not the batch
    # window: the window adapts to traffic, so it is set well above a large batch's time.
    # async: the dispatcher runs one batch at a time anyway, and a batch of small requests
    # takes 1-2 ms, less than the hand-off to a worker thread and back costs under load.
    # The reply's media type is declared (the caller's client speaks pickle): otherwise
    # BentoML derives it per call from the list's JSON schema, ~8% of this process's CPU.
    @bentoml.api(batchable=True, max_batch_size=20_000, max_latency_ms=10_000)
    async def score_rows(self, items: list[Any]) -> Annotated[list[Any], PICKLE]:
        groups: dict[str, list[int]] = {}
        for pos, (_, explain, _) in enumerate(items):
            groups.setdefault(explain, []).append(pos)
        out: list[Any] = [None] * len(items)
        for method, positions in groups.items():
            ids = [items[pos][0] for pos in positions]
            x = np.frombuffer(b"".join(items[pos][2] for pos in positions), np.float32)
            x = x.reshape(len(ids), len(self.bundle.feature_names))
            bundle = self.small if len(ids) < SMALL_BATCH_ROWS else self.bundle
            scored = scoring.score(bundle, _frame(bundle, ids, x), method, validate=False)
            for pos, record in zip(positions, _records(scored), strict=True):
                out[pos] = record
        return out


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="c360-retention",
    traffic={"timeout": 600, "concurrency": 256},
    workers=1,
    tracing=UNTRACED,
)
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
        # /predict requests scored here run on one XGBoost thread each: concurrent ones
        # then share the cores through worker threads instead of oversubscribing them.
        self.local = _load_bundle(stored, nthread=1)
        float_model = all(
            self.bundle.feature_dtypes.get(n, "float32") in ("float32", "float64")
            for n in self.bundle.feature_names
        )
        self.decoder = request_decoder(self.bundle.feature_names) if float_model else None
        self.in_flight = 0  # /predict calls this process is answering now
        self.info = {
            "name": stored.info.metadata.get("model_name", SETTINGS.model_name),
            "version": stored.info.metadata.get("version", str(stored.tag.version)),
            "trained_as_of": str(self.bundle.trained_as_of) if self.bundle.trained_as_of else None,
        }
        _freeze_heap()
        log.info(
            "loaded %s version %s (%d features)",
            self.info["name"],
            self.info["version"],
            len(self.bundle.feature_names),
        )

    async def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /predict: the status and JSON answer for a raw request body.

        Concurrent small calls go to the inner scorer, which batches them. A large call
        (LOCAL_ROWS rows or more) and a lone call are scored here: the first is a batch
        already, the second has nothing to be batched with, and BentoML's dispatcher
        would hold it for the window it learned under load (25-40 ms per lone call after
        a burst at concurrency 64, measured), not knowing that no other call is coming."""
        started = time.perf_counter()
        self.in_flight += 1
        try:
            if len(body) <= INLINE_BODY_BYTES:
                ids, x, explain = self.parse(body)
            else:
                ids, x, explain = await anyio.to_thread.run_sync(self.parse, body)
            if len(ids) >= LOCAL_ROWS or self.in_flight == 1:
                predictions = await anyio.to_thread.run_sync(self.score_local, ids, x, explain)
            else:
                predictions = await self._score_batched(ids, x, explain)
        except scoring.RequestError as exc:
            return 400, {"error": str(exc)}
        except BentoMLException as exc:  # e.g. the scorer shedding load: 503
            log.warning("scorer failed: %s", exc)
            return exc.error_code.value, {"error": f"scorer failed: {exc}"}
        finally:
            self.in_flight -= 1
        log.info(
            json.dumps(
                {
                    "event": "predict",
                    "model_version": self.info["version"],
                    "rows": len(ids),
                    "explain": explain,
                    "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                }
            )
        )
        return 200, {"model": {**self.info, "explain": explain}, "predictions": predictions}

    def parse(self, body: bytes) -> tuple[list[str], np.ndarray, str]:
        """A /predict body -> (CustomerIds, float32 feature block, explain), or a
        RequestError naming the offending field, columns or rows."""
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:  # the message says where, never the bytes
            raise scoring.RequestError(
                f"request body is not UTF-8 JSON (bad byte at position {exc.start})"
            ) from None
        if self.decoder is not None:
            try:
                doc = self.decoder.decode(body)
            except msgspec.DecodeError:
                pass  # not certainly valid: the checks below name the problem
            else:
                plain = plain_matrix(doc.rows) if 0 < len(doc.rows) <= MAX_PREDICT_ROWS else None
                if plain is not None:
                    return (*plain, doc.explain)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise scoring.RequestError(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise scoring.RequestError(
                "request body is not valid JSON: nested too deeply"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise scoring.RequestError('the body must be {"rows": [...], "explain": ...}')
        rows, explain = doc["rows"], doc.get("explain", scoring.DEFAULT_EXPLAIN)
        if explain not in EXPLAINS:
            raise scoring.RequestError(f"explain must be one of {EXPLAINS}, not {explain!r}")
        if not rows:
            raise scoring.RequestError("empty batch: 'rows' has no rows")
        if len(rows) > MAX_PREDICT_ROWS:
            raise scoring.RequestError(
                f"{len(rows)} rows is over {MAX_PREDICT_ROWS}; use /score-table"
            )
        if not all(isinstance(row, dict) for row in rows):
            raise scoring.RequestError("every row must be a JSON object")
        frame = scoring.validate_request(self.bundle, pd.DataFrame(rows))  # names problems
        ids = frame[scoring.CUSTOMER_ID].tolist()
        return ids, scoring.feature_matrix(self.bundle, frame), explain

    def score_local(self, ids: list[str], x: np.ndarray, explain: Any) -> list[dict[str, Any]]:
        scored = scoring.score(self.local, _frame(self.local, ids, x), explain, validate=False)
        return _records(scored)

    async def _score_batched(
        self, ids: list[str], x: np.ndarray, explain: str
    ) -> list[dict[str, Any]]:
        """Through the batching scorer; a connection the scorer's server closed while idle
        (keep-alive expiry races a reuse) is retried, which is safe: scoring is pure."""
        items = [(i, explain, row.tobytes()) for i, row in zip(ids, x, strict=True)]
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
        self,
        table: Path,
        ctx: bentoml.Context,
        explain: Literal["exact", "approx", "none"] = "none",
    ) -> Generator[str, None, None]:
        """CI-D's custom-model path: a CSV or parquet table in, one CSV out, streamed."""
        ctx.response.headers.update(CONTRACT)
        chunks = _table_chunks(Path(table))
        first = next(chunks, None)
        if first is None:
            raise InvalidArgument(f"{UPLOAD}: empty table")
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
            "contract_version": scoring.CONTRACT_VERSION,
            "churn_definition": meta.get("churn_config"),
            "features": [
                {
                    "name": n,
                    "dtype": self.bundle.feature_dtypes.get(n, "float32"),
                    **self.bundle.feature_labels[n],
                }
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
            "explain_methods": list(EXPLAINS),
            "default_explain": scoring.DEFAULT_EXPLAIN,
            "test_metrics": meta.get("test_metrics"),
            "grade": meta.get("grade"),
            "drift": _drift(self.info.get("version")),
        }


def _drift(version: str | None) -> dict[str, Any] | None:
    """What the latest refresh flagged for the served version (`drift.latest_alarms`):
    None when nothing was measured or the service cannot see the lake. Read per request
    (the refresh rewrites it up to four times a day; it is one small table)."""
    from c360ml.model.drift import read_latest_alarms

    try:
        return read_latest_alarms(SETTINGS, version)
    except Exception as exc:  # a lake the service cannot read must not fail /metadata
        log.warning("drift not read for /metadata: %s", exc)
        return None


def _records(scored: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready dicts in CI-D's column names (floats, bools, strings, factor lists)."""
    names = list(scored.columns)
    columns = [scored[name].tolist() for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


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
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"{UPLOAD} is not a readable CSV or parquet table ({_kind(exc)})"
        ) from None


def _kind(exc: Exception) -> str:
    """What went wrong, without the quoted content (raw bytes) readers append to it."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text at byte {exc.start}"
    return str(exc).split(":", 1)[0][:80] or type(exc).__name__


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
    except (pa.ArrowInvalid, KeyError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{UPLOAD} has no CustomerId column ({_kind(exc)})") from None


RetentionService.add_asgi_middleware(BearerAuth)
