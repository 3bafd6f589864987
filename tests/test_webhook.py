"""The watch webhook against a real HTTP server on 127.0.0.1: delivered as JSON, and a
receiver that fails or is gone costs one warning, never an exception."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from c360ml import webhook


class Receiver:
    """A local HTTP server recording each POSTed JSON body; /fail answers 500."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(500 if self.path == "/fail" else 204)
                self.end_headers()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_an_event_is_posted_as_json(receiver):
    alarms = {"ScoredAsOf": "2026-03-25T23:00:00+00:00", "ModelVersion": "3", "score_psi": 0.31}
    event = webhook.drift_event("c360-retention", alarms | {"alarms": []}, 0.25)
    assert webhook.post_event(receiver.url + "/hook", event) is True
    [(path, kind, body)] = receiver.received
    assert path == "/hook" and kind == "application/json"
    head = {"event": "drift_alarm", "model_name": "c360-retention", "psi_alarm": 0.25}
    assert body == head | alarms | {"alarms": []}


def test_a_failing_or_missing_receiver_is_one_warning(receiver, caplog):
    event = {"event": "gate_decision", "ModelVersion": "2"}
    with caplog.at_level(logging.WARNING, logger="c360ml.webhook"):
        assert webhook.post_event(receiver.url + "/fail", event) is False
    assert len(caplog.records) == 1 and "gate_decision" in caplog.records[0].getMessage()
    url = receiver.url
    receiver.close()  # nobody listens on that port any more
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c360ml.webhook"):
        assert webhook.post_event(url, event) is False
    assert len(caplog.records) == 1 and "not delivered" in caplog.records[0].getMessage()
    assert webhook.post_event("", event) is False  # no URL set: nothing sent, nothing said
