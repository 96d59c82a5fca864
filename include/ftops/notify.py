"""Notifications for the operators on call: a failed task (a gate that said no, a batch rejected before
training, a trainer that crashed) is logged and, when `FTOPS_WEBHOOK_URL` is set, posted there as JSON
(Slack- and Teams-style incoming webhooks accept it: the `text` field carries the message)."""

from __future__ import annotations

import logging
import os

import httpx

log = logging.getLogger("ftops.notify")


def notify(event: str, text: str, **fields) -> bool:
    """Log the event and post it to the webhook if one is configured; never raises."""
    log.error("%s: %s %s", event, text, fields)
    url = os.environ.get("FTOPS_WEBHOOK_URL")
    if not url:
        return False
    try:
        httpx.post(url, json={"event": event, "text": text, **fields}, timeout=10).raise_for_status()
        return True
    except httpx.HTTPError as exc:
        log.error("webhook %s failed: %s", url, exc)
        return False


def task_failed(context) -> None:
    """Airflow `on_failure_callback`: called once a task has failed for good (retries exhausted)."""
    ti = context["ti"]
    exc = context.get("exception")
    notify(
        "task_failed",
        f"{ti.dag_id}.{ti.task_id} failed: {exc}",
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        run_id=ti.run_id,
        error=str(exc)[:2000],
    )
