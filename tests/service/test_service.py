"""The scoring service over real HTTP: every endpoint, every error, batching, the Bento."""

from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest

from c360ml.model import scoring
from c360ml.model.registry import load_bundle

from .conftest import REPO, TOKENS, start_server, stop

AUTH = {"Authorization": f"Bearer {TOKENS[1]}"}


@pytest.fixture(scope="module")
def bundle(registered):
    import mlflow

    settings, _ = registered
    mlflow.set_tracking_uri(settings.tracking_uri)
    return load_bundle("models:/c360-retention@champion")


@pytest.fixture(scope="module")
def request_rows(registered, bundle):
    _, matrix = registered
    last = matrix[matrix.cutoff_time == matrix.cutoff_time.max()].head(40)
    frame = last.rename(columns={"customer_id": "CustomerId"})[
        ["CustomerId", *bundle.feature_names]
    ].reset_index(drop=True)
    return frame


def post(url, path, body, headers=AUTH, **kwargs):
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def test_predict_equals_in_process_scoring(server, bundle, request_rows):
    url, _ = server
    rows = json.loads(request_rows.to_json(orient="records"))
    for explain in ("exact", "approx", "none"):
        reply = post(url, "/predict", {"rows": rows, "explain": explain})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"]["version"] == "1" and body["model"]["explain"] == explain
        got = pd.DataFrame(body["predictions"])
        want = scoring.score(bundle, request_rows, explain)
        assert list(got.CustomerId) == list(want.CustomerId)
        np.testing.assert_allclose(got.ChurnScore, want.ChurnScore, rtol=1e-6)
        assert list(got.RiskLevel) == list(want.RiskLevel)
        assert list(got.IsChurn) == list(want.IsChurn)
        assert reply.headers["x-c360ml-contract-version"] == scoring.CONTRACT_VERSION
        for g, w in zip(got.InfluentialFactors, want.InfluentialFactors, strict=True):
            assert [f["feature"] for f in g] == [f["feature"] for f in w]
            assert [(f["label"], f["direction"]) for f in g] == [
                (f["label"], f["direction"]) for f in w
            ]
            np.testing.assert_allclose(
                [f["impact"] for f in g], [f["impact"] for f in w], rtol=1e-5, atol=1e-6
            )


def _batched_rows(url: str) -> float:
    """Rows the inner scorer has scored so far (BentoML's adaptive batch size histogram)."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("bentoml_service_adaptive_batch_size_sum")
    )


def test_large_request_is_scored_in_the_api_process(server, registered, bundle):
    from service.service import LOCAL_ROWS

    url, _ = server
    _, matrix = registered
    last = matrix[matrix.cutoff_time == matrix.cutoff_time.max()]
    frame = last.rename(columns={"customer_id": "CustomerId"})[
        ["CustomerId", *bundle.feature_names]
    ].reset_index(drop=True)
    assert len(frame) >= LOCAL_ROWS
    rows = json.loads(frame.to_json(orient="records"))
    rows[0]["f_cases"] = None  # null: a missing value the model handles
    rows[1]["f_cases"] = 3  # a JSON integer for a float feature
    frame.loc[0, "f_cases"], frame.loc[1, "f_cases"] = np.nan, 3.0
    before = _batched_rows(url)
    reply = post(url, "/predict", {"rows": rows, "explain": "approx"})
    assert reply.status_code == 200, reply.text
    assert _batched_rows(url) == before  # not through the batching scorer
    got = pd.DataFrame(reply.json()["predictions"])
    want = scoring.score(bundle, frame, "approx")
    assert list(got.CustomerId) == list(want.CustomerId)
    np.testing.assert_allclose(got.ChurnScore, want.ChurnScore, rtol=1e-6)
    assert list(got.RiskLevel) == list(want.RiskLevel)
    assert [f[0]["feature"] for f in got.InfluentialFactors] == [
        f[0]["feature"] for f in want.InfluentialFactors
    ]


def test_a_lone_call_skips_the_batching_scorer(server, request_rows):
    url, _ = server
    rows = json.loads(request_rows.head(1).to_json(orient="records"))
    before = _batched_rows(url)
    assert post(url, "/predict", {"rows": rows, "explain": "none"}).status_code == 200
    assert _batched_rows(url) == before


def test_timeout_middleware_cancels_its_timer():
    """BentoML 1.4.39's TimeoutMiddleware left one timer per request scheduled for the
    whole traffic timeout; the service's replacement cancels it when the answer starts."""
    import asyncio

    from bentoml._internal.server.http import traffic

    from service import service

    assert traffic.TimeoutMiddleware is service._TimeoutMiddleware  # what BentoML builds

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def serve_three():
        sent = []

        async def send(message):
            sent.append(message)

        middleware = service._TimeoutMiddleware(app, timeout=600)
        for _ in range(3):
            await middleware({"type": "http"}, None, send)
        scheduled = asyncio.get_running_loop()._scheduled  # noqa: SLF001 - asyncio's timer heap
        return sent, [timer for timer in scheduled if not timer.cancelled()]

    sent, pending = asyncio.run(serve_three())
    assert len(sent) == 6
    assert pending == []


def test_rows_pandera_must_coerce_are_scored_alike(server, bundle, request_rows):
    url, _ = server
    rows = json.loads(request_rows.head(2).to_json(orient="records"))
    rows[0]["CustomerId"] = 12345  # a number where the schema wants a string: coerced
    reply = post(url, "/predict", {"rows": rows, "explain": "none"})
    assert reply.status_code == 200, reply.text
    got = reply.json()["predictions"]
    want = scoring.score(bundle, request_rows.head(2), "none")
    assert [p["CustomerId"] for p in got] == ["12345", want.CustomerId[1]]
    np.testing.assert_allclose([p["ChurnScore"] for p in got], want.ChurnScore, rtol=1e-6)


def test_concurrent_calls_are_batched(server, bundle, request_rows):
    url, _ = server
    rows = json.loads(request_rows.to_json(orient="records"))

    def one(row):
        return post(url, "/predict", {"rows": [row], "explain": "approx"})

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, rows * 4))
    assert all(r.status_code == 200 for r in replies)
    got = [r.json()["predictions"][0] for r in replies]
    want = scoring.score(bundle, request_rows, "approx")
    assert [p["CustomerId"] for p in got] == list(want.CustomerId) * 4
    np.testing.assert_allclose(
        [p["ChurnScore"] for p in got], np.tile(want.ChurnScore, 4), rtol=1e-6
    )
    assert [p["InfluentialFactors"][0]["feature"] for p in got] == [
        f[0]["feature"] for f in want.InfluentialFactors
    ] * 4
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    sizes = [
        line
        for line in metrics.splitlines()
        if line.startswith("bentoml_service_adaptive_batch_size_sum")
        or line.startswith("bentoml_service_adaptive_batch_size_count")
    ]
    total = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in sizes}
    mean_batch = (
        total["bentoml_service_adaptive_batch_size_sum"]
        / total["bentoml_service_adaptive_batch_size_count"]
    )
    assert mean_batch > 1.0, metrics  # several calls' rows went through one score() call
    assert any(  # BentoML's request metrics cover the mounted /predict route too
        line.startswith("bentoml_service_request_total") and 'endpoint="/predict"' in line
        for line in metrics.splitlines()
    )


@pytest.mark.parametrize(
    ("mutate", "status", "fragment"),
    [
        (
            lambda rows: [{k: v for k, v in r.items() if k != "f_cases"} for r in rows],
            400,
            "missing feature column(s): f_cases",
        ),
        (lambda rows: [{**r, "shoe_size": 42} for r in rows], 400, "unknown column(s): shoe_size"),
        (lambda rows: [{**rows[0], "f_noise": "high"}], 400, "wrong type"),
        (lambda rows: [], 400, "empty batch"),
        (lambda rows: [rows[0], rows[0]], 400, "duplicate CustomerId at rows [0, 1]"),
    ],
)
def test_bad_requests_name_the_problem(server, request_rows, mutate, status, fragment):
    url, _ = server
    rows = json.loads(request_rows.head(3).to_json(orient="records"))
    reply = post(url, "/predict", {"rows": mutate(rows)})
    assert reply.status_code == status
    assert fragment in reply.text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"rows": [', "not valid JSON"),
        (b'{"rows": {"CustomerId": "a"}}', '{"rows": [...], "explain": ...}'),
        (b'{"rows": [1, 2]}', "every row must be a JSON object"),
    ],
)
def test_malformed_bodies_are_refused(server, content, fragment):
    url, _ = server
    reply = httpx.post(
        f"{url}/predict",
        content=content,
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 400
    assert fragment in reply.json()["error"]


def test_unknown_explain_method_is_refused(server, request_rows):
    url, _ = server
    rows = json.loads(request_rows.head(1).to_json(orient="records"))
    reply = post(url, "/predict", {"rows": rows, "explain": "shap"})
    assert reply.status_code == 400 and "explain must be one of" in reply.text


def test_missing_values_are_accepted(server, request_rows):
    url, _ = server
    rows = json.loads(request_rows.head(2).to_json(orient="records"))
    rows[0]["f_cases"] = None
    assert post(url, "/predict", {"rows": rows}).status_code == 200


def test_auth_and_size_limits(server, request_rows):
    url, log = server
    rows = json.loads(request_rows.head(1).to_json(orient="records"))
    assert post(url, "/predict", {"rows": rows}, headers={}).status_code == 401
    bad = {"Authorization": "Bearer not-a-token-secret-xyz"}
    assert post(url, "/predict", {"rows": rows}, headers=bad).status_code == 401
    assert httpx.get(f"{url}/metadata", timeout=10).status_code == 401
    assert "not-a-token-secret-xyz" not in log.read_text()  # refused, logged without it
    assert "unauthorized" in log.read_text()
    for token in TOKENS:  # both tokens of a rotation are valid
        assert (
            post(
                url, "/predict", {"rows": rows}, headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # health stays open
    huge = httpx.post(
        f"{url}/predict",
        content=b"{" + b" " * (65 << 20) + b"}",
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert huge.status_code == 413


def test_metadata(server, bundle):
    url, _ = server
    answer = httpx.get(f"{url}/metadata", headers=AUTH, timeout=10)
    meta = answer.json()
    assert answer.headers["x-c360ml-contract-version"] == meta["contract_version"] == "2"
    assert meta["version"] == "1" and meta["name"] == "c360-retention"
    assert [f["name"] for f in meta["features"]] == list(bundle.feature_names)
    assert all(f["label"] and f["unit"] and f["description"] for f in meta["features"])
    assert meta["thresholds"]["IsChurn"] == 0.5
    assert meta["grade"] in ("A", "B", "C")
    assert meta["churn_definition"]["prediction_window_days"] == 90
    # the latest refresh's drift alarms for this version, or None where none was measured
    assert meta["drift"] is None or isinstance(meta["drift"]["alarms"], list)


def test_score_table_round_trip_over_several_chunks(server, bundle, request_rows, tmp_path):
    from c360ml.serving import TABLE_CHUNK_ROWS

    url, _ = server
    n = TABLE_CHUNK_ROWS + 1234
    rng = np.random.default_rng(1)
    table = pd.DataFrame(
        rng.normal(size=(n, len(bundle.feature_names))).astype("float32"),
        columns=list(bundle.feature_names),
    )
    table.insert(0, "CustomerId", [f"k{i}" for i in range(n)])
    for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
        path = tmp_path / f"table{suffix}"
        write(path, index=False)
        with open(path, "rb") as fh:
            reply = httpx.post(
                f"{url}/score-table",
                files={"table": (path.name, fh)},
                data={"explain": "approx"},
                headers=AUTH,
                timeout=300,
            )
        assert reply.status_code == 200, reply.text[:500]
        assert reply.headers["x-c360ml-contract-version"] == scoring.CONTRACT_VERSION
        out = pd.read_csv(io.StringIO(reply.text))
        assert list(out.columns) == [
            "CustomerId",
            "ChurnScore",
            "IsChurn",
            "RiskLevel",
            "InfluentialFactors",
        ]
        assert len(out) == n and out.CustomerId.is_unique
        want = scoring.score(bundle, table.iloc[[0, n - 1]], "approx")
        np.testing.assert_allclose(out.ChurnScore.iloc[[0, n - 1]], want.ChurnScore, rtol=1e-6)
        assert (
            json.loads(out.InfluentialFactors.iloc[-1])[0]["feature"]
            == (want.InfluentialFactors.iloc[1][0]["feature"])
        )
    dup = table.head(3).copy()
    dup.loc[2, "CustomerId"] = "k0"
    dup.to_parquet(tmp_path / "dup.parquet")
    with open(tmp_path / "dup.parquet", "rb") as fh:
        reply = httpx.post(
            f"{url}/score-table", files={"table": ("dup.parquet", fh)}, headers=AUTH, timeout=60
        )
    assert reply.status_code == 400 and "duplicate CustomerId" in reply.text


def test_built_bento_serves_without_the_mlflow_store(server_env, request_rows, bundle, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
        cwd=REPO,
    )
    wheel = REPO / "dist" / "c360ml-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir(exist_ok=True)
    wheel.write_bytes(next(dist.glob("*.whl")).read_bytes())
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=server_env,
        check=True,
        capture_output=True,
        text=True,
    )
    tag = built.stdout.strip().splitlines()[-1].replace("__tag__:", "")
    env = {
        **server_env,
        "C360ML_MLFLOW_DIR": str(tmp_path / "no-such-store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db",
    }
    url, proc = start_server(tag, env, tmp_path / "bento.log")
    try:
        rows = json.loads(request_rows.head(5).to_json(orient="records"))
        reply = post(url, "/predict", {"rows": rows, "explain": "none"})
        assert reply.status_code == 200, reply.text
        got = [p["ChurnScore"] for p in reply.json()["predictions"]]
        want = scoring.score(bundle, request_rows.head(5), "none").ChurnScore
        np.testing.assert_allclose(got, want, rtol=1e-6)
    finally:
        stop(proc)


def _raw_predict(url: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/predict",
        content=content,
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize("explain", ["approx", "exact"])
def test_hostile_numbers_are_refused_or_scored_never_a_500(server, request_rows, explain):
    """Infinity is refused by name; a finite number beyond float32 is scored as the largest
    float32 (the trees only compare it with split thresholds)."""
    url, _ = server
    row = json.loads(request_rows.head(1).to_json(orient="records"))[0]
    for text, status in (("Infinity", 400), ("-Infinity", 400), ("1e308", 200), ("1e39", 200)):
        body = json.dumps({"rows": [{**row, "f_noise": 0.0}], "explain": explain})
        reply = _raw_predict(url, body.replace('"f_noise": 0.0', f'"f_noise": {text}').encode())
        assert reply.status_code == status, (text, reply.text)
        if status == 400:
            assert "f_noise" in reply.json()["error"] and "finite" in reply.json()["error"]
        else:
            assert 0 <= reply.json()["predictions"][0]["ChurnScore"] <= 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b'{"rows": [{"CustomerId": "\xff\xfe"}]}', "UTF-8"),
    ],
)
def test_deep_or_undecodable_bodies_are_400(server, content, fragment):
    url, _ = server
    reply = _raw_predict(url, content)
    assert reply.status_code == 400, reply.text[:300]
    assert fragment in reply.json()["error"]


def test_score_table_refuses_what_is_not_a_table_in_one_error_shape(server, tmp_path):
    url, _ = server
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    with open(png, "rb") as fh:
        reply = httpx.post(
            f"{url}/score-table", files={"table": ("picture.png", fh)}, headers=AUTH, timeout=60
        )
    assert reply.status_code == 400, reply.text[:300]
    error = reply.json()
    assert isinstance(error, dict) and "not a readable CSV or parquet table" in error["error"]
    assert "/tmp" not in error["error"] and "\\x" not in error["error"]


def test_a_chunked_body_over_the_limit_is_413_without_being_read_whole(server):
    """A chunked body has no Content-Length to check up front: the limit holds while the
    body is read, and the server answers 413 and stops reading."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    chunk = b" " * (1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: {AUTH['Authorization']}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(300):  # 300 MB if the server read it all
            if select.select([conn], [], [], 0)[0]:
                break  # the server has answered
            try:
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while not answer.endswith(b"}"):
            part = conn.recv(65536)
            if not part:
                break
            answer += part
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert b"over" in answer and sent < 100 << 20


def test_published_openapi_has_the_scoring_routes_and_fuzzing_finds_no_5xx(server):
    """Schemathesis against the service's own /docs.json, with the bearer token: every
    documented operation, a bounded number of generated requests each, no 5xx and no
    answer outside its documented schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    CHECKS = [checks.not_a_server_error, checks.response_schema_conformance]  # noqa: N806

    url, _ = server
    spec = httpx.get(f"{url}/docs.json", headers=AUTH, timeout=30).json()
    assert {"/predict", "/metadata", "/score-table"} <= set(spec["paths"])
    rows = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert rows["schema"]["properties"]["rows"]["maxItems"] == 10_000
    schema = schemathesis.openapi.from_url(f"{url}/docs.json", headers=AUTH)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            # Not "schema-valid data is accepted": a schema cannot say "a CSV or parquet
            # file", so a generated PNG upload is schema-valid and rightly refused (400).
            case.call_and_validate(base_url=url, headers=AUTH, checks=CHECKS)

        fuzz()
        checked.append(operation.label)
    assert any("/predict" in label for label in checked), checked
