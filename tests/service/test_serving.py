"""c360ml.serving without a server: request decoding, answers, the access middleware, and
the guard of the one BentoML patch the service applies (against the pinned versions)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from c360ml import serving
from c360ml.model import scoring

from .conftest import REPO

FEATURES = ("f_a", "f_b", "f_c")


@pytest.fixture(scope="module")
def bundle() -> scoring.ModelBundle:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, len(FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    booster = xgb.train({"max_depth": 2, "nthread": 1}, xgb.DMatrix(x, y), 5)
    dtypes = dict.fromkeys(FEATURES, "float32")
    return scoring.ModelBundle(booster, FEATURES, dtypes, nthread=1)


def body(rows, **extra) -> bytes:
    return json.dumps({"rows": rows, **extra}).encode()


ROWS = [
    {"CustomerId": "c1", "f_a": 1.5, "f_b": None, "f_c": 2},
    {"CustomerId": "c2", "f_a": -1.0, "f_b": 0.25, "f_c": 1e39},
]


def test_a_plain_body_is_decoded_to_ids_and_a_float32_block(bundle):
    parse = serving.RequestParser(bundle)
    assert parse.decoder is not None
    ids, x, explain = parse(body(ROWS[:1], explain="none"))
    assert ids == ["c1"] and explain == "none" and x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1.5, np.nan, 2.0]])
    # beyond float32 (1e39) is not the typed path's: pandera clips it, as scoring does
    ids, x, explain = parse(body(ROWS))
    assert ids == ["c1", "c2"] and explain == scoring.DEFAULT_EXPLAIN
    assert x[1, 2] == np.finfo(np.float32).max
    # a number for the id is not plain, and is coerced by the schema, not refused
    ids, _, _ = parse(body([{**ROWS[0], "CustomerId": 12345}]))
    assert ids == ["12345"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"rows": [{"CustomerId": "\xff"}]}', "request body is not UTF-8 JSON (bad byte at"),
        (b'{"rows": [', "request body is not valid JSON: "),
        (b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"rows": {"CustomerId": "a"}}', 'the body must be {"rows": [...], "explain": ...}'),
        (body(ROWS, explain="shap"), "explain must be one of ('exact', 'approx', 'none'), not"),
        (body([]), "empty batch: 'rows' has no rows"),
        (body([1, 2]), "every row must be a JSON object"),
        (body([{"CustomerId": "c1", "f_a": 1.0}]), "missing feature column(s): f_b, f_c"),
        (body([{**ROWS[0], "shoe_size": 42}]), "unknown column(s): shoe_size"),
        (body([ROWS[0], ROWS[0]]), "duplicate CustomerId at rows [0, 1]"),
        (body([{**ROWS[0], "f_a": "high"}]), "column 'f_a' has values of the wrong type"),
    ],
)
def test_a_body_that_cannot_be_scored_names_the_problem(bundle, content, message):
    with pytest.raises(scoring.RequestError) as caught:
        serving.RequestParser(bundle)(content)
    assert message in str(caught.value)


def test_too_many_rows_point_to_the_table_route(bundle):
    rows = [{**ROWS[0], "CustomerId": f"c{i}"} for i in range(serving.MAX_PREDICT_ROWS + 1)]
    with pytest.raises(scoring.RequestError, match="10001 rows is over 10000; use /score-table"):
        serving.RequestParser(bundle)(body(rows))


def test_a_model_with_integer_features_has_no_typed_decoder_but_parses(bundle):
    ints = scoring.ModelBundle(
        bundle.booster, FEATURES, {**bundle.feature_dtypes, "f_c": "int64"}, nthread=1
    )
    parse = serving.RequestParser(ints)
    assert parse.decoder is None
    ids, x, _ = parse(body([{"CustomerId": "c1", "f_a": 1.0, "f_b": 2.0, "f_c": 3}]))
    assert ids == ["c1"] and x.tolist() == [[1.0, 2.0, 3.0]]


def test_batched_items_score_as_one_call_each_in_their_order(bundle):
    frame = pd.DataFrame(
        np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32), columns=list(FEATURES)
    )
    ids = [f"c{i}" for i in range(5)]
    x = frame.to_numpy()
    items = serving.pack_rows(ids[:3], x[:3], "none") + serving.pack_rows(ids[3:], x[3:], "exact")
    items = [items[4], items[0], items[3], items[1], items[2]]  # calls interleaved
    got = serving.score_items(items, bundle, bundle, small_rows=64)
    assert [g["CustomerId"] for g in got] == ["c4", "c0", "c3", "c1", "c2"]
    want = {r["CustomerId"]: r for r in serving.score_block(bundle, ids[:3], x[:3], "none")}
    want |= {r["CustomerId"]: r for r in serving.score_block(bundle, ids[3:], x[3:], "exact")}
    assert got == [want[g["CustomerId"]] for g in got]
    assert got[0]["InfluentialFactors"] and not got[1]["InfluentialFactors"]


def test_the_answers_keep_the_ci_d_contract(bundle):
    info = serving.model_info(bundle, {"model_name": "m", "version": "7"}, "tag", "default")
    assert info == {"name": "m", "version": "7", "trained_as_of": None}
    assert serving.model_info(bundle, {}, "tag", "default")["name"] == "default"
    ids, x, _ = serving.RequestParser(bundle)(body(ROWS[:1]))
    predictions = serving.score_block(bundle, ids, x, "approx")
    answer = serving.predict_answer(info, "approx", predictions)
    assert list(answer) == ["model", "predictions"]
    assert answer["model"] == {**info, "explain": "approx"}
    assert list(predictions[0]) == [
        "CustomerId",
        "ChurnScore",
        "IsChurn",
        "RiskLevel",
        "InfluentialFactors",
    ]
    meta = serving.metadata_answer(bundle, info, None)
    assert meta["contract_version"] == scoring.CONTRACT_VERSION and meta["drift"] is None
    assert [f["name"] for f in meta["features"]] == list(FEATURES)
    assert meta["thresholds"]["RiskLevel"] == {
        "Low": "< 0.33",
        "Medium": "< 0.66",
        "High": ">= 0.66",
    }


def test_a_table_is_scored_in_chunks_with_one_header(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "TABLE_CHUNK_ROWS", 4)
    table = pd.DataFrame(np.ones((10, 3), dtype=np.float32), columns=list(FEATURES))
    table.insert(0, "CustomerId", [f"k{i}" for i in range(10)])
    table.to_parquet(tmp_path / "t.parquet")
    chunks = list(serving.table_chunks(tmp_path / "t.parquet"))
    assert [len(c) for c in chunks] == [4, 4, 2]
    parts = list(serving.score_csv(bundle, chunks, "approx"))
    assert [rows for rows, _ in parts] == [4, 4, 2]
    assert sum(text.count("CustomerId,ChurnScore") for _, text in parts) == 1
    table.loc[9, "CustomerId"] = "k0"
    table.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(scoring.RequestError, match=r"duplicate CustomerId in table: \['k0'\]"):
        serving.check_unique_ids(tmp_path / "dup.csv")
    (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(scoring.RequestError, match="^the uploaded table is not a readable"):
        list(serving.table_chunks(tmp_path / "p.png"))


def run_asgi(app, path="/predict", headers=(), chunks=(b"{}",)):
    """One request through an ASGI app; returns (status, JSON body)."""
    sent = []

    async def go():
        queue = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        queue[-1]["more_body"] = False

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "headers": list(headers), "client": ("1.2.3.4", 1)}
        await app(scope, receive, send)

    asyncio.run(go())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def echo_app(scope, receive, send):
    """Reads the whole body, then answers as BentoML answers an InvalidArgument: a list."""
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'[{"error": "bad table"}]'})


def test_the_access_middleware_checks_tokens_and_sizes(monkeypatch, caplog):
    monkeypatch.setenv(serving.TOKENS_ENV, "one, two")
    monkeypatch.delenv(serving.DEV_ENV, raising=False)
    guard = serving.BearerAuth(echo_app)
    assert run_asgi(guard, "/readyz")[0] == 400  # health paths are open: the app answered
    status, answer = run_asgi(guard, headers=[(b"authorization", b"Bearer three")])
    assert (status, answer) == (401, {"error": "missing or invalid bearer token"})
    assert "three" not in caplog.text and "unauthorized" in caplog.text
    token = [(b"authorization", b"Bearer two")]
    assert run_asgi(guard, headers=token) == (400, {"error": "bad table"})  # one error shape
    length = [*token, (b"content-length", b"%d" % (65 << 20))]
    assert run_asgi(guard, headers=length)[0] == 413
    status, answer = run_asgi(guard, headers=token, chunks=[b" " * (1 << 20)] * 65)
    assert status == 413 and "over" in answer["error"]  # no Content-Length: counted as read


def test_the_service_refuses_to_start_without_tokens_unless_in_development(caplog):
    with pytest.raises(RuntimeError, match="no API tokens: set C360ML_API_TOKENS"):
        serving.check_access({})
    serving.check_access({serving.DEV_ENV: "1"})
    assert "DEVELOPMENT MODE" in caplog.text
    serving.check_access({serving.TOKENS_ENV: "a"})


def test_pydantic_errors_are_reshaped_into_one_error():
    start = {"type": "http.response.start", "status": 422, "headers": []}
    detail = {"error": "invalid", "detail": [{"loc": ["body", "table"], "msg": "required"}]}
    part = {"type": "http.response.body", "body": json.dumps(detail).encode()}
    _, reshaped = serving.one_error_shape([start, part])
    assert json.loads(reshaped["body"]) == {"error": "invalid: body.table: required"}


# --- the BentoML patch's version guard ------------------------------------------------------


def _pins() -> dict[str, str]:
    """Where the BentoML version is pinned, by file."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    (spec,) = [str(Requirement(r).specifier) for r in extras if Requirement(r).name == "bentoml"]
    pins = {"pyproject.toml": spec}
    for name in ("constraints.txt", "service/requirements.txt"):
        lines = (REPO / name).read_text().splitlines()
        (pins[name],) = [str(Requirement(x).specifier) for x in lines if x.startswith("bentoml==")]
    return pins


def test_the_patched_bentoml_is_the_installed_and_pinned_one():
    """Fails when BentoML moves (an upgrade, a loosened pin) without the patch in
    service/service.py being checked against the new release."""
    from service.service import PATCHED_BENTOML

    assert version("bentoml") == PATCHED_BENTOML
    assert _pins() == dict.fromkeys(_pins(), f"=={PATCHED_BENTOML}")
    assert SpecifierSet(f"=={PATCHED_BENTOML}").contains(version("bentoml"))


def test_another_bentoml_release_is_refused_by_name():
    from service.service import PATCHED_BENTOML, check_bentoml_version

    check_bentoml_version(PATCHED_BENTOML)
    with pytest.raises(RuntimeError) as caught:
        check_bentoml_version("1.4.40")
    assert "BentoML 1.4.40 is installed" in str(caught.value)
    assert f"BentoML {PATCHED_BENTOML}'s private" in str(caught.value)


def test_importing_the_service_reads_no_settings(monkeypatch):
    """Settings are read when the server starts: the import succeeds with settings that
    cannot load, and the model reference reads them (and fails) only when first used."""
    code = (
        "import service.service as s\n"
        "print('imported')\n"
        "ref = s.RetentionService.inner.model_ref\n"
        "try:\n"
        "    ref.tag\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "C360ML_REFRESH_WORKERS": "0", "BENTOML_DO_NOT_TRACK": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "imported"
    assert lines[-1].startswith("invalid settings in environment: refresh_workers:")


def test_the_model_reference_names_the_configured_model(monkeypatch):
    from service.service import ConfiguredModel

    monkeypatch.setenv("C360ML_MODEL_NAME", "another-model")
    ref = ConfiguredModel()
    assert str(ref) == "another-model:latest"
    monkeypatch.setenv("C360ML_MODEL_NAME", "changed-later")
    assert str(ref.tag) == "another-model:latest"  # read once, as the server starts
