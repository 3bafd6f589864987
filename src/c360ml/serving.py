"""What the scoring service does, apart from BentoML: its HTTP contract in plain functions.

`service/service.py` is the BentoML class (model store, adaptive batching, routes, worker
threads); everything it does to a request and an answer lives here, where it is imported
and tested without a server: decoding a /predict body into checked rows, the bearer-token
and size-limit middleware, the answers' shapes (CI-D's ChurnScore, IsChurn, RiskLevel,
InfluentialFactors), reading an uploaded table in chunks, and the OpenAPI documents of the
raw routes. Like `c360ml.model.scoring`, it imports no mlflow and no featuretools.

Why a typed decoder: a /predict body is decoded once, by msgspec into rows typed from the
model's features (names and float-or-null checked while parsing, in C), instead of through
BentoML's pydantic IO, which parses, dumps and re-validates every value (figures in
benchmarks/results/serve.md). A body that does not fit goes through pandera, which names
every problem.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from c360ml.config import Settings
from c360ml.model import scoring

log = logging.getLogger("c360ml.service")

TOKENS_ENV = "C360ML_API_TOKENS"  # comma-separated bearer tokens (several, for rotation)
DEV_ENV = "C360ML_DEV_NO_AUTH"  # "1": serve without tokens (development only, loud)
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
EXPLAINS = ("exact", "approx", "none")
MAX_PREDICT_ROWS = 10_000  # larger inputs belong on /score-table
# Per-path request size limits. /predict takes MAX_PREDICT_ROWS rows of a few hundred
# features written out in full: larger inputs are tables.
MAX_BODY_BYTES = {"/score-table": 4 << 30, "/predict": 64 << 20}
DEFAULT_MAX_BODY = 1 << 20
UPLOAD = "the uploaded table"  # errors never name the server's temporary file
TABLE_CHUNK_ROWS = 50_000  # rows scored and streamed per chunk by /score-table
F32_MAX = scoring.F32_MAX  # a larger JSON number is not a float32 feature
CONTRACT = {scoring.CONTRACT_HEADER: scoring.CONTRACT_VERSION}  # on every scoring answer


# --- access: bearer tokens and body size limits (ASGI middleware) -------------------------


def api_tokens(environ: Mapping[str, str]) -> set[str]:
    """The bearer tokens the service accepts (several at once, so a token can be rotated)."""
    return {t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()}


def check_access(environ: Mapping[str, str]) -> None:
    """Refuse to start without tokens unless development mode is asked for, and say so
    loudly when it is: an open scoring endpoint must never be an accident."""
    dev = environ.get(DEV_ENV) == "1"
    if not api_tokens(environ) and not dev:
        raise RuntimeError(f"no API tokens: set {TOKENS_ENV} (or {DEV_ENV}=1 for development)")
    if not api_tokens(environ):
        log.warning("!!! DEVELOPMENT MODE: serving WITHOUT authentication (%s=1) !!!", DEV_ENV)


class BearerAuth:
    """ASGI middleware: bearer tokens on every path but health, and request size limits.

    A refused request is logged with its path and client, never with the token it sent.
    Tokens are read when the server builds its app (at start), not at import.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.tokens = api_tokens(os.environ)
        self.dev = os.environ.get(DEV_ENV) == "1"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = int(headers.get(b"content-length", b"0") or 0)
        limit = MAX_BODY_BYTES.get(scope["path"], DEFAULT_MAX_BODY)
        if size > limit:
            return await reply(send, 413, f"request body of {size} bytes is over {limit} bytes")
        if not self.dev and not self._allowed(headers.get(b"authorization", b"")):
            client = (scope.get("client") or ("?",))[0]
            log.warning(
                json.dumps({"event": "unauthorized", "path": scope["path"], "client": client})
            )
            return await reply(send, 401, "missing or invalid bearer token")
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
                    for part in one_error_shape(held):
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
            await reply(send, 413, f"request body is over {limit} bytes")

    def _allowed(self, header: bytes) -> bool:
        text = header.decode("latin-1")
        token = text[7:].strip() if text.startswith("Bearer ") else ""
        return bool(token) and token in self.tokens


def _is_json_error(start: dict) -> bool:
    headers = dict(start.get("headers") or [])
    return 400 <= start["status"] < 500 and headers.get(b"content-type", b"").startswith(
        b"application/json"
    )


def one_error_shape(messages: list[dict]) -> list[dict]:
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


async def reply(send: Any, status: int, message: str) -> None:
    """A JSON error answer sent straight on the ASGI channel."""
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


# --- /predict: decoding a body into checked rows --------------------------------------------


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
        gc=False,  # strings and floats only: no cycles for the collector to track
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


class RequestParser:
    """/predict bodies for one model -> (CustomerIds, float32 feature block, explain).

    The typed decoder takes the common case (every value a number or null) in one pass;
    anything it refuses is parsed again as plain JSON and checked by the model's pandera
    schema, so the client is told which field, column or rows are wrong. A model with a
    feature that is not a float has no typed decoder."""

    def __init__(self, bundle: scoring.ModelBundle) -> None:
        self.bundle = bundle
        float_model = all(
            bundle.feature_dtypes.get(n, "float32") in ("float32", "float64")
            for n in bundle.feature_names
        )
        self.decoder = request_decoder(bundle.feature_names) if float_model else None

    def __call__(self, body: bytes) -> tuple[list[str], np.ndarray, str]:
        """Raises RequestError naming the offending field, columns or rows."""
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
        rows, explain = _checked_rows(body)
        frame = scoring.validate_request(self.bundle, pd.DataFrame(rows))  # names problems
        ids = frame[scoring.CUSTOMER_ID].tolist()
        return ids, scoring.feature_matrix(self.bundle, frame), explain


def _checked_rows(body: bytes) -> tuple[list[dict], str]:
    """The rows and explain method of a body the typed decoder refused, or the reason the
    body is not a scoring request at all."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise scoring.RequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise scoring.RequestError("request body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise scoring.RequestError('the body must be {"rows": [...], "explain": ...}')
    rows, explain = doc["rows"], doc.get("explain", scoring.DEFAULT_EXPLAIN)
    if explain not in EXPLAINS:
        raise scoring.RequestError(f"explain must be one of {EXPLAINS}, not {explain!r}")
    if not rows:
        raise scoring.RequestError("empty batch: 'rows' has no rows")
    if len(rows) > MAX_PREDICT_ROWS:
        raise scoring.RequestError(f"{len(rows)} rows is over {MAX_PREDICT_ROWS}; use /score-table")
    if not all(isinstance(row, dict) for row in rows):
        raise scoring.RequestError("every row must be a JSON object")
    return rows, explain


# --- scoring checked rows and shaping the answers ------------------------------------------


def feature_frame(bundle: scoring.ModelBundle, ids: list[str], x: np.ndarray) -> pd.DataFrame:
    """The frame `scoring.score` reads, from checked ids and the float32 feature block."""
    frame = pd.DataFrame(x, columns=list(bundle.feature_names), copy=False)
    frame.insert(0, scoring.CUSTOMER_ID, ids)
    return frame


def records(scored: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready dicts in CI-D's column names (floats, bools, strings, factor lists)."""
    names = list(scored.columns)
    columns = [scored[name].tolist() for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def score_block(
    bundle: scoring.ModelBundle, ids: list[str], x: np.ndarray, explain: Any
) -> list[dict[str, Any]]:
    """Checked rows scored (no second validation): one answer record per row, in order."""
    scored = scoring.score(bundle, feature_frame(bundle, ids, x), explain, validate=False)
    return records(scored)


def pack_rows(ids: list[str], x: np.ndarray, explain: str) -> list[tuple[str, str, bytes]]:
    """Checked rows as items of the batching scorer: (CustomerId, explain, float32 bytes).
    Bytes, not lists of floats: they cross a process boundary pickled, cheaply."""
    return [(i, explain, row.tobytes()) for i, row in zip(ids, x, strict=True)]


def score_items(
    items: list[Any], bundle: scoring.ModelBundle, small: scoring.ModelBundle, small_rows: int
) -> list[Any]:
    """The batching scorer's work: items of many calls, one `scoring.score` call per explain
    method, answers in the items' order. Fewer than `small_rows` rows go to `small`, the
    same model on one thread (waking more threads for a few rows costs more than it saves)."""
    groups: dict[str, list[int]] = {}
    for pos, (_, explain, _) in enumerate(items):
        groups.setdefault(explain, []).append(pos)
    out: list[Any] = [None] * len(items)
    for method, positions in groups.items():
        ids = [items[pos][0] for pos in positions]
        x = np.frombuffer(b"".join(items[pos][2] for pos in positions), np.float32)
        x = x.reshape(len(ids), len(bundle.feature_names))
        model = small if len(ids) < small_rows else bundle
        for pos, record in zip(positions, score_block(model, ids, x, method), strict=True):
            out[pos] = record
    return out


def model_info(
    bundle: scoring.ModelBundle, stored_metadata: Mapping[str, Any], tag_version: str, name: str
) -> dict[str, Any]:
    """Which model answers: name and registered version (from the BentoML model's metadata,
    written by `c360ml.model.packaging`), and the as_of it was trained for."""
    return {
        "name": stored_metadata.get("model_name", name),
        "version": stored_metadata.get("version", tag_version),
        "trained_as_of": str(bundle.trained_as_of) if bundle.trained_as_of else None,
    }


def predict_answer(
    info: Mapping[str, Any], explain: str, predictions: list[dict[str, Any]]
) -> dict[str, Any]:
    """The /predict answer: the model behind it, then one prediction per row, in order."""
    return {"model": {**info, "explain": explain}, "predictions": predictions}


def metadata_answer(
    bundle: scoring.ModelBundle, info: Mapping[str, Any], drift: dict[str, Any] | None
) -> dict[str, Any]:
    """GET /metadata: the model, its features with labels, thresholds, metrics, grade and
    the latest refresh's drift alarms for it."""
    meta = bundle.metadata
    return {
        **info,
        "contract_version": scoring.CONTRACT_VERSION,
        "churn_definition": meta.get("churn_config"),
        "features": [
            {
                "name": n,
                "dtype": bundle.feature_dtypes.get(n, "float32"),
                **bundle.feature_labels[n],
            }
            for n in bundle.feature_names
        ],
        "thresholds": {
            "IsChurn": bundle.thresholds.is_churn,
            "RiskLevel": {
                "Low": f"< {bundle.thresholds.medium}",
                "Medium": f"< {bundle.thresholds.high}",
                "High": f">= {bundle.thresholds.high}",
            },
        },
        "explain_methods": list(EXPLAINS),
        "default_explain": scoring.DEFAULT_EXPLAIN,
        "test_metrics": meta.get("test_metrics"),
        "grade": meta.get("grade"),
        "drift": drift,
    }


def read_drift(settings: Settings, version: str | None) -> dict[str, Any] | None:
    """What the latest refresh flagged for the served version (`drift.latest_alarms`):
    None when nothing was measured or the service cannot see the lake. Read per request
    (the refresh rewrites it up to four times a day; it is one small table)."""
    from c360ml.model.drift import read_latest_alarms

    try:
        return read_latest_alarms(settings, version)
    except Exception as exc:  # a lake the service cannot read must not fail /metadata
        log.warning("drift not read for /metadata: %s", exc)
        return None


def log_event(event: str, **fields: Any) -> None:
    """One JSON line per answered call, for the log pipeline (never a customer's data)."""
    log.info(json.dumps({"event": event, **fields}))


# --- OpenAPI documents of the raw routes (BentoML merges them into /docs.json) -------------

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


# --- /score-table: an uploaded CSV or parquet table in chunks ------------------------------


def table_chunks(path: Path) -> Generator[pd.DataFrame, None, None]:
    """The table in chunks of TABLE_CHUNK_ROWS, whatever its format; an unreadable one is a
    RequestError that names neither the server's file nor the bytes it holds."""
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
        raise scoring.RequestError(
            f"{UPLOAD} is not a readable CSV or parquet table ({_kind(exc)})"
        ) from None


def check_unique_ids(path: Path) -> None:
    """The whole table's CustomerIds are unique (chunks are checked one at a time)."""
    ids = _table_ids(path)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise scoring.RequestError(f"duplicate CustomerId in table: {sorted(set(dup))[:10]}")


def score_csv(
    bundle: scoring.ModelBundle, chunks: Iterable[pd.DataFrame], explain: Any
) -> Generator[tuple[int, str], None, None]:
    """(rows, CSV text) per chunk, validated and scored: one header, then rows only.
    InfluentialFactors is a JSON string per row, as CI-D reads a CSV cell."""
    header = True
    for chunk in chunks:
        scored = scoring.score(
            bundle, scoring.validate_request(bundle, chunk), explain, validate=False
        )
        factors = json.loads(scored["InfluentialFactors"].to_json(orient="values"))
        scored["InfluentialFactors"] = [json.dumps(f) for f in factors]
        yield len(scored), scored.to_csv(index=False, header=header)
        header = False


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


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
        raise scoring.RequestError(f"{UPLOAD} has no CustomerId column ({_kind(exc)})") from None
