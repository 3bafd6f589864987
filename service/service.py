"""The c360ml retention scoring service (BentoML): what the CDP calls as a custom model.

Thin by design: this module holds what is BentoML's (the model store, adaptive batching,
routes, worker threads, one patch of BentoML itself); what is done to a request and an
answer is `c360ml.serving`, and every score comes from `c360ml.model.scoring.score` (the
same function as the batch refresh). Settings and the model are read when the server
starts, never at import. Endpoints:

- POST /predict      {"rows": [...], "explain": ...} -> model info + predictions
- POST /score-table  CSV or parquet file of feature rows -> CSV, streamed in chunks
- GET  /metadata     model name, version, features, thresholds, metrics, grade, drift alarms
- BentoML's /livez, /readyz, /metrics stay open; everything else needs a bearer token.

/predict and /metadata are raw routes of a FastAPI app mounted on the service, not
`@bentoml.api` methods: BentoML's pydantic IO parses, dumps and re-validates every value
of a request, which costs more than parsing and scoring them (benchmarks/results/serve.md);
`serving.RequestParser` decodes a body once instead. BentoML's middleware (auth, metrics,
timeouts, concurrency limit) still wraps both routes. Small requests go to the inner
`Scorer`, where BentoML's adaptive batching scores many concurrent calls together; a
request of LOCAL_ROWS rows or more is a batch already and is scored here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import anyio
import bentoml
import msgspec
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from c360ml import serving
from c360ml.config import load_settings
from c360ml.model import scoring

log = logging.getLogger("c360ml.service")

# The BentoML release `_TimeoutMiddleware` below was written against: it replaces a class
# of BentoML's private traffic module, which any release may change. Pinned to it in
# pyproject.toml, constraints.txt and service/requirements.txt (tests/service check all).
PATCHED_BENTOML = "1.4.39"


def check_bentoml_version(installed: str) -> None:
    """Refuse to patch a BentoML release the patch was not written for: a private class
    replaced blindly could break every request, or silently undo the fix."""
    if installed != PATCHED_BENTOML:
        raise RuntimeError(
            f"service/service.py replaces BentoML {PATCHED_BENTOML}'s private "
            f"bentoml._internal.server.http.traffic.TimeoutMiddleware, but BentoML {installed} "
            f"is installed: check the patch against BentoML {installed} (drop it if that "
            "release cancels its timer), then set PATCHED_BENTOML and the pins to it"
        )


check_bentoml_version(bentoml.__version__)
from bentoml._internal.server.http import traffic  # noqa: E402 - only past the version check

SMALL_BATCH_ROWS = 64  # the inner scorer uses one XGBoost thread below this many rows
INNER_RETRIES = 3  # calls to the inner scorer on a dropped keep-alive connection
# A /predict request of this many rows is scored in the API process, on a worker thread:
# it is a batch already (score()'s fixed cost is small per row here), so the hop to the
# scorer and back (a second HTTP request, the replies pickled) would only add to it, and
# would hold the scorer's one-batch-at-a-time dispatcher while small calls wait.
LOCAL_ROWS = 256
INLINE_BODY_BYTES = 64 << 10  # larger /predict bodies are parsed in a worker thread
PICKLE = ContentType("application/vnd.bentoml+pickle")  # BentoML's service-to-service serde
# OpenTelemetry: BentoML wraps every request in its tracing middleware even at its default
# sample rate of 0 (nothing recorded), a noticeable share of each process's CPU on
# single-row /predict calls; `tracing.excluded_urls` skips it for the scoring routes. To
# trace them, drop those entries and set a sample rate (BentoML's tracing config).
UNTRACED = {"excluded_urls": ["/predict", "/score_rows"]}


class _TimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's time-to-first-byte limit (`traffic.timeout`), with its timer cancelled
    when the response starts. BentoML 1.4.39 leaves the timer scheduled, so every request
    kept a few objects alive for the whole timeout: millions under load, and the
    collector's full passes over them paused each process, the single-row p99.
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


class ConfiguredModel(bentoml.models.BentoModel):
    """The BentoML model `<settings.model_name>:latest`, named when BentoML first uses it.

    BentoML finds a service's models on the class (`bentoml build` packs them into the
    Bento), but reads the reference only when it builds a Bento or starts a server: the
    model name (c360ml.yaml, C360ML_MODEL_NAME) is read then, not when this module is
    imported."""

    def __init__(self) -> None:  # no tag yet (BentoModel's own __init__ wants one)
        pass

    @property
    def tag(self) -> bentoml.Tag:  # type: ignore[override]
        if "_tag" not in self.__dict__:  # BentoModel is frozen: the cache bypasses setattr
            name = load_settings().model_name
            self.__dict__["_tag"] = bentoml.models.BentoModel(f"{name}:latest").tag
        return self.__dict__["_tag"]


def _load_bundle(stored: Any, nthread: int = 2) -> scoring.ModelBundle:
    return scoring.ModelBundle.load(Path(stored.path_of("bundle")), nthread=nthread)


def _freeze_heap() -> None:
    """Move everything loaded so far out of the garbage collector's reach: its full passes
    over the objects of the imports (BentoML, pandas, pyarrow, XGBoost) paused the process
    for long enough to set the single-row p99 under concurrency (`_TimeoutMiddleware`
    keeps it so as the process ages; figures in benchmarks/results/serve.md)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _as_invalid_argument() -> Iterator[None]:
    """A request the model cannot score is BentoML's InvalidArgument: a 400 naming it."""
    try:
        yield
    except scoring.RequestError as exc:
        raise InvalidArgument(str(exc)) from None


async def predict_route(request: Request) -> Response:
    status, answer = await bentoml.get_current_service().predict(await request.body())
    return Response(
        msgspec.json.encode(answer), status, serving.CONTRACT, media_type="application/json"
    )


async def metadata_route(request: Request) -> Response:
    answer = bentoml.get_current_service().metadata()
    return Response(
        msgspec.json.encode(answer), headers=serving.CONTRACT, media_type="application/json"
    )


# Mounted at the root: raw handlers (no body parsing or response validation by FastAPI),
# with their OpenAPI documents given here, which BentoML merges into /docs.json.
routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
routes.add_api_route(
    "/predict",
    predict_route,
    methods=["POST"],
    summary="Score rows of features",
    openapi_extra=serving.PREDICT_DOC,
    responses={"200": serving.PREDICT_OK, **serving.ERRORS},
    response_class=Response,
)
routes.add_api_route(
    "/metadata",
    metadata_route,
    methods=["GET"],
    summary="The model behind the answers",
    responses={"200": serving.METADATA_OK, "401": serving.ERRORS["401"]},
    response_class=Response,
)


# runner_connection: BentoML 1.4.39 replaces the caller's client session to this service
# every `max_requests` calls (default 100) or `max_age` s (300) and closes the old one under
# the calls still in flight on it ("Connector is closed", "Cannot write to closing
# transport"): under concurrency a share of /predict calls failed, each retried by
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

    model_ref = ConfiguredModel()

    def __init__(self) -> None:
        self.bundle = _load_bundle(self.model_ref)
        # The same model on one thread for small batches: waking a second OpenMP thread
        # for a few rows costs more than it saves, and much more when the cores are busy.
        self.small = _load_bundle(self.model_ref, nthread=1)
        _freeze_heap()

    # max_latency_ms is where the dispatcher starts shedding load (503), not the batch
    # window: the window adapts to traffic, so it is set well above a large batch's time.
    # async: the dispatcher runs one batch at a time anyway, and a batch of small requests
    # takes less time than the hand-off to a worker thread and back costs under load.
    # The reply's media type is declared (the caller's client speaks pickle): otherwise
    # BentoML derives it per call from the list's JSON schema, a visible share of the CPU.
    @bentoml.api(batchable=True, max_batch_size=20_000, max_latency_ms=10_000)
    async def score_rows(self, items: list[Any]) -> Annotated[list[Any], PICKLE]:
        return serving.score_items(items, self.bundle, self.small, SMALL_BATCH_ROWS)


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="c360-retention",
    traffic={"timeout": 600, "concurrency": 256},
    workers=1,
    tracing=UNTRACED,
)
class RetentionService:
    model_ref = ConfiguredModel()
    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        serving.check_access(os.environ)
        self.settings = load_settings()
        stored = self.model_ref
        self.bundle = _load_bundle(stored)
        # /predict requests scored here run on one XGBoost thread each: concurrent ones
        # then share the cores through worker threads instead of oversubscribing them.
        self.local = _load_bundle(stored, nthread=1)
        self.parser = serving.RequestParser(self.bundle)
        self.in_flight = 0  # /predict calls this process is answering now
        self.info = serving.model_info(
            self.bundle, stored.info.metadata, str(stored.tag.version), self.settings.model_name
        )
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
        would hold it for the window it learned under load (measured after a burst of
        concurrent calls), not knowing that no other call is coming."""
        started = time.perf_counter()
        self.in_flight += 1
        try:
            if len(body) <= INLINE_BODY_BYTES:
                ids, x, explain = self.parser(body)
            else:
                ids, x, explain = await anyio.to_thread.run_sync(self.parser, body)
            if len(ids) >= LOCAL_ROWS or self.in_flight == 1:
                predictions = await anyio.to_thread.run_sync(
                    serving.score_block, self.local, ids, x, explain
                )
            else:
                predictions = await self._score_batched(ids, x, explain)
        except scoring.RequestError as exc:
            return 400, {"error": str(exc)}
        except BentoMLException as exc:  # e.g. the scorer shedding load: 503
            log.warning("scorer failed: %s", exc)
            return exc.error_code.value, {"error": f"scorer failed: {exc}"}
        finally:
            self.in_flight -= 1
        serving.log_event(
            "predict",
            model_version=self.info["version"],
            rows=len(ids),
            explain=explain,
            latency_ms=round(1000 * (time.perf_counter() - started), 2),
        )
        return 200, serving.predict_answer(self.info, explain, predictions)

    async def _score_batched(
        self, ids: list[str], x: np.ndarray, explain: str
    ) -> list[dict[str, Any]]:
        """Through the batching scorer; a connection the scorer's server closed while idle
        (keep-alive expiry races a reuse) is retried, which is safe: scoring is pure."""
        items = serving.pack_rows(ids, x, explain)
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
        # (This docstring is the route's OpenAPI description.) The first chunk and the ids
        # are checked before the answer starts: a bad table is a 400, not a broken stream.
        ctx.response.headers.update(serving.CONTRACT)
        chunks = serving.table_chunks(Path(table))
        with _as_invalid_argument():
            first = next(chunks, None)
            if first is None:
                raise scoring.RequestError(f"{serving.UPLOAD}: empty table")
            scoring.validate_request(self.bundle, first.head(1000))
            serving.check_unique_ids(Path(table))
        started, rows = time.perf_counter(), 0

        def stream() -> Generator[str, None, None]:
            nonlocal rows
            with _as_invalid_argument():
                for scored_rows, text in serving.score_csv(
                    self.bundle, (c for group in ([first], chunks) for c in group), explain
                ):
                    rows += scored_rows
                    yield text
            serving.log_event(
                "score-table",
                model_version=self.info["version"],
                rows=rows,
                explain=explain,
                latency_ms=round(1000 * (time.perf_counter() - started), 2),
            )

        return stream()

    def metadata(self) -> dict[str, Any]:
        drift = serving.read_drift(self.settings, self.info.get("version"))
        return serving.metadata_answer(self.bundle, self.info, drift)


RetentionService.add_asgi_middleware(serving.BearerAuth)
