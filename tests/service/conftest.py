"""A real BentoML server over HTTP, serving a small model registered in a temporary
MLflow store and copied into a temporary BentoML home (the way `c360ml serve` does)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from c360ml.config import Settings

REPO = Path(__file__).resolve().parents[2]
TOKENS = ("token-one", "token-two")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {seconds}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def cli_server(home: Path, env: dict, token: str) -> Iterator[str]:
    """`c360ml serve` run as a user runs it (from the project folder `home`, with one API
    token), ready on 127.0.0.1; yields its URL, stops the whole process group after."""
    port = free_port()
    log = home / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "c360ml.cli", "serve", "--port", str(port)],
            cwd=home,
            env=env | {"C360ML_API_TOKENS": token},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, log, seconds=120)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def start_server(target: str, env: dict, log: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    handle = open(log, "w")  # noqa: SIM115 - closed with the process in stop()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    """A small model trained on the model tests' synthetic matrix, registered as champion."""
    from c360ml.model.train import TrainConfig, train_and_evaluate
    from tests.model.model_testdata import FEATURES, WINDOW_DAYS, make_matrix
    from tests.model.test_registry import _register

    store = tmp_path_factory.mktemp("service-mlflow")
    matrix, rfm = make_matrix(n_customers=300, n_cutoffs=8)
    config = TrainConfig(nthread=1, max_trees=40, early_stopping_rounds=10, bootstrap_resamples=30)
    result = train_and_evaluate(matrix, FEATURES, rfm, WINDOW_DAYS, config)
    _, decision = _register(store, "c360-retention", result, matrix, result.plan.test_cutoff)
    assert decision.promote, decision.reason
    settings = Settings(root=REPO, mlflow_dir=store, model_name="c360-retention")
    return settings, matrix


@pytest.fixture(scope="session")
def server_env(registered, tmp_path_factory):
    settings, _ = registered
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "C360ML_MLFLOW_DIR": str(settings.mlflow_dir),
        "C360ML_API_TOKENS": ",".join(TOKENS),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    env.pop("C360ML_DEV_NO_AUTH", None)
    code = (
        "from c360ml.config import load_settings; from c360ml.model.packaging import "
        "import_champion; print(import_champion(load_settings()).tag)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return env


@pytest.fixture(scope="session")
def server(server_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    url, proc = start_server("service.service:RetentionService", server_env, log)
    yield url, log
    stop(proc)
