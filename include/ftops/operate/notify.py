"""Notifications: for the operators on call, a failed task (a gate that said no, a batch rejected before
training, a trainer that crashed) is logged and, when `FTOPS_WEBHOOK_URL` is set, posted there as JSON
(Slack- and Teams-style incoming webhooks accept it: the `text` field carries the message). For Airflow,
a promotion or rollback made outside a DAG run (`ftops adapters ...`) is announced as an event of the
`ftops://registry/production` asset through the REST API, so the serving sync runs at once."""

from __future__ import annotations

import logging
import os

import httpx

log = logging.getLogger("ftops.operate.notify")


class _HideWebhook(logging.Filter):
    """httpx logs every request's full URL at INFO ("HTTP Request: POST <url> ..."); the webhook's is a
    credential (Slack's carries its token in the path), so its records are rewritten without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        url = os.environ.get("FTOPS_WEBHOOK_URL")
        if url:
            message = record.getMessage()
            for form in {url, str(httpx.URL(url))}:  # as set, and as httpx normalises it
                message = message.replace(form, "<FTOPS_WEBHOOK_URL>")
            record.msg, record.args = message, None
        return True


logging.getLogger("httpx").addFilter(_HideWebhook())


def _redacted(url: str) -> str:
    """scheme://host:port only: user info, path and query can carry credentials."""
    u = httpx.URL(url)
    return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")


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
        # Never the URL, nor the exception text (httpx puts the URL in it): a webhook URL is a credential.
        status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        log.error("webhook (FTOPS_WEBHOOK_URL) failed: %s%s", type(exc).__name__, f" {status}" if status else "")
        return False


def gate_failure(customer: str, version: str, rules: list[str], failures: int | None, stuck_after: int) -> dict:
    """What the operator on call needs about a failed gate: the rules that failed, what to do, and whether
    the customer is now stuck (this many failed gates in a row: production stays old while every run fails).
    `failures` None: the registry could not be read to count them."""
    from ftops.model.gate import advice

    stuck = failures is not None and failures >= stuck_after
    todo = "; ".join(advice(r) for r in rules) or advice("")
    text = (
        f"{customer}: version {version} failed the gate on {', '.join(rules) or 'its rules'}. What to do: {todo}."
        + (f" STUCK: {failures} failed gates in a row; production is unchanged since." if stuck else "")
    )
    return {"text": text, "rules": rules, "advice": todo, "failures": failures, "stuck": stuck}


def task_failed(context) -> None:
    """Airflow `on_failure_callback`: called once a task has failed for good (retries exhausted). A failed gate
    (the exception, or its cause, carries `gate`: `gate_failure`'s figures) adds its rules, advice and stuck flag."""
    ti = context["ti"]
    exc = context.get("exception")
    gate = getattr(exc, "gate", None) or getattr(getattr(exc, "__cause__", None), "gate", None)
    fields = {k: gate[k] for k in ("rules", "advice", "failures", "stuck")} if isinstance(gate, dict) else {}
    notify(
        "task_failed",
        f"{ti.dag_id}.{ti.task_id} failed: {exc}",
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        run_id=ti.run_id,
        error=str(exc)[:2000],
        **fields,
    )


def production_changed(customer: str, version: str, airflow_url: str | None = None) -> bool:
    """Emit an event of the production asset through Airflow's REST API; the 5-minute schedule is the fallback."""
    from ftops.config import PRODUCTION_ASSET_URI

    url = (airflow_url or os.environ.get("FTOPS_AIRFLOW_URL", "http://127.0.0.1:8080")).rstrip("/")
    try:
        with httpx.Client(base_url=f"{url}/api/v2", timeout=10) as http:
            assets = http.get("/assets", params={"uri_pattern": PRODUCTION_ASSET_URI}).raise_for_status().json()
            ids = [a["id"] for a in assets["assets"] if a["uri"] == PRODUCTION_ASSET_URI]
            if not ids:
                return False
            http.post(
                "/assets/events", json={"asset_id": ids[0], "extra": {"customer": customer, "version": version}}
            ).raise_for_status()
            return True
    except httpx.HTTPError as exc:
        log.warning(
            "could not tell Airflow at %s that production changed (%s); the 5-minute sync will pick it up",
            _redacted(url),
            type(exc).__name__,
        )
        return False
