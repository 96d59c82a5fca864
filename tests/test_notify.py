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


def test_a_failed_gate_notification_names_the_rule_what_to_do_and_when_the_customer_is_stuck(monkeypatch):
    """What `task_failed` posts when the promote task fails on the gate (Airflow wraps GateFailed in its own
    exception; the gate's figures travel as its cause)."""
    import json
    from types import SimpleNamespace

    from ftops.operate.notify import gate_failure, task_failed
    from ftops.release.tasks import GateFailed

    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            got.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FTOPS_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    try:
        once = gate_failure("acme", "7", ["max_forgetting"], failures=1, stuck_after=2)
        assert not once["stuck"] and "STUCK" not in once["text"]
        gate = gate_failure("acme", "8", ["max_forgetting"], failures=2, stuck_after=2)
        assert gate["stuck"] and "strategy: full" in gate["text"] and "max_forgetting" in gate["text"]
        try:
            try:
                raise GateFailed("acme: version 8 failed the gate. " + gate["text"], gate)
            except GateFailed as cause:
                raise RuntimeError(str(cause)) from cause  # as the DAG's promote task re-raises it
        except RuntimeError as exc:
            ti = SimpleNamespace(dag_id="finetune_acme", task_id="promote", run_id="r1")
            task_failed({"ti": ti, "exception": exc})
    finally:
        server.shutdown()
    (hook,) = got
    assert hook["rules"] == ["max_forgetting"] and hook["stuck"] is True and hook["failures"] == 2
    assert "STUCK: 2 failed gates in a row" in hook["text"] and "replay_fraction" in hook["advice"]
