"""Notifications never put a secret in the logs: the webhook URL is a credential (Slack's carries its token
in the path), and an Airflow URL may carry a user and password."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ftops.operate.notify import notify, production_changed

SECRET = "T000-B000-XXXXsecretTOKEN"


@pytest.fixture
def failing_webhook():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/services/{SECRET}"
    server.shutdown()


def test_failed_webhook_is_logged_without_its_url(failing_webhook, monkeypatch, caplog):
    monkeypatch.setenv("FTOPS_WEBHOOK_URL", failing_webhook)
    with caplog.at_level(logging.DEBUG):
        assert notify("task_failed", "gate failed", dag_id="finetune_acme") is False
    assert "webhook" in caplog.text and "500" in caplog.text  # the operator still learns it failed, and how
    assert SECRET not in caplog.text


def test_unreachable_airflow_is_logged_without_credentials(caplog):
    with caplog.at_level(logging.DEBUG):
        assert production_changed("acme", "3", airflow_url=f"http://admin:{SECRET}@127.0.0.1:9/") is False
    assert "127.0.0.1" in caplog.text and SECRET not in caplog.text
