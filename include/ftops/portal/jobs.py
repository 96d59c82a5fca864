"""Fine-tuning jobs: a customer's Airflow runs of `finetune_<customer>`, seen as OpenAI fine-tuning jobs.

Airflow is reached through its REST API (v2) as a service account: `FTOPS_AIRFLOW_URL` (default
http://127.0.0.1:8080), with `FTOPS_AIRFLOW_TOKEN` (a bearer token) or `FTOPS_AIRFLOW_USERNAME` /
`FTOPS_AIRFLOW_PASSWORD` (exchanged at `/auth/token`); neither: no header (the local standalone's all-admins mode).
The registry (MLflow) says what a run produced: the version whose `airflow.run_id` tag is the run's, its gate
decision and reasons, and whether it was promoted.

Job id: `ftjob-` + the run id in URL-safe base64, looked up only under the caller's own DAG, so another
customer's id is not found. Status: queued; validating_files while the data tasks run; running; succeeded;
failed; cancelled (a run the customer cancelled: failed with the note this module writes).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from datetime import datetime

import httpx

from ftops.portal.auth import ApiError
from ftops.release.tags import FAILED

RUN_ID = re.compile(r"[A-Za-z0-9_.:+-]{1,250}")
DATA_TASKS = {"ingest", "validate", "clean", "dedupe", "snapshot"}
CANCEL_NOTE = "cancelled by the customer through the API"
# OpenAI's hyper-parameter names -> the DAG's run params (`dags/customer_finetune.py`)
HYPERPARAMETERS = {"n_epochs": "epochs", "max_steps": "max_steps", "learning_rate_multiplier": "learning_rate"}


def job_id(run_id: str) -> str:
    return "ftjob-" + base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=")


def run_id(jid: str) -> str:
    if not jid.startswith("ftjob-") or len(jid) > 400:
        raise ApiError(404, f"No such fine-tuning job: {jid[:64]!r}.", "job_not_found", "fine_tuning_job_id")
    body = jid[6:]
    try:
        rid = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        rid = ""
    # A run id goes into Airflow's URL path: only the characters Airflow's own run ids use, never `/` or `..`
    # (a crafted id must not reach another customer's DAG through path normalisation)
    if not RUN_ID.fullmatch(rid) or ".." in rid:
        raise ApiError(404, f"No such fine-tuning job: {jid[:64]!r}.", "job_not_found", "fine_tuning_job_id")
    return rid


def _ts(value: str | None) -> int | None:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()) if value else None


class Airflow:
    """A small REST v2 client with the service account's token (refreshed when Airflow answers 401)."""

    def __init__(self, url: str | None = None):
        self.url = (url or os.environ.get("FTOPS_AIRFLOW_URL", "http://127.0.0.1:8080")).rstrip("/")
        self.http = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30)
        self._token = os.environ.get("FTOPS_AIRFLOW_TOKEN") or None
        self._lock = threading.Lock()

    def _login(self) -> None:
        user, password = os.environ.get("FTOPS_AIRFLOW_USERNAME"), os.environ.get("FTOPS_AIRFLOW_PASSWORD")
        if not user or os.environ.get("FTOPS_AIRFLOW_TOKEN"):
            return
        r = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": password}, timeout=30)
        r.raise_for_status()
        self._token = r.json()["access_token"]

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        with self._lock:
            if self._token is None:
                self._login()
            token = self._token
        try:
            r = self.http.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {}, **kw)
            if r.status_code == 401 and os.environ.get("FTOPS_AIRFLOW_USERNAME"):
                with self._lock:
                    self._login()
                r = self.http.request(method, path, headers={"Authorization": f"Bearer {self._token}"}, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(503, "The scheduler is not reachable; try again shortly.", "scheduler_unavailable") from exc
        if r.status_code >= 500 or r.status_code in (401, 403):
            # Our service account's problem, not the customer's: never echo Airflow's answer
            raise ApiError(503, "The scheduler did not answer; try again shortly.", "scheduler_unavailable")
        return r


class Jobs:
    def __init__(self, airflow: Airflow, registry_uri: str):
        self.airflow = airflow
        self.registry_uri = registry_uri

    # --- reading ------------------------------------------------------------------------------------------

    def _runs(self, customer: str, limit: int) -> list[dict]:
        r = self.airflow.request(
            "GET", f"/dags/finetune_{customer}/dagRuns", params={"order_by": "-run_after", "limit": limit}
        )
        return [] if r.status_code == 404 else r.json()["dag_runs"]

    def _run(self, customer: str, jid: str) -> dict:
        rid = run_id(jid)
        r = self.airflow.request("GET", f"/dags/finetune_{customer}/dagRuns/{rid}")
        if r.status_code != 200:
            raise ApiError(404, f"No such fine-tuning job: {jid[:64]!r}.", "job_not_found", "fine_tuning_job_id")
        return r.json()

    def _tasks(self, customer: str, rid: str) -> list[dict]:
        r = self.airflow.request("GET", f"/dags/finetune_{customer}/dagRuns/{rid}/taskInstances")
        return r.json().get("task_instances", []) if r.status_code == 200 else []

    def _versions(self, customer: str, base: str) -> list:
        from ftops.release.registry import Registry, RegistryError

        try:
            reg = Registry(self.registry_uri)
            versions = reg.versions(customer, base)
            # A version search leaves versions' aliases empty: the model's alias map is the truth.
            for alias in ("production", "previous"):
                if (held := reg.by_alias(customer, base, alias)) is not None:
                    for v in versions:
                        if v.version == held.version and alias not in v.aliases:
                            v.aliases.append(alias)
            return versions
        except RegistryError:
            return []
        except Exception:  # noqa: BLE001 - no registered model yet for this customer reads as none
            return []

    def _version_of(self, versions: list, rid: str):
        return next((v for v in versions if v.info.run_id == rid), None)

    def job(self, customer: str, run: dict, versions: list, tasks: list[dict] | None = None, detail=False) -> dict:
        rid, state = run["dag_run_id"], run["state"]
        conf = run.get("conf") or {}
        v = self._version_of(versions, rid)
        if state == "queued":
            status = "queued"
        elif state == "running":
            tasks = tasks if tasks is not None else self._tasks(customer, rid)
            started = {t["task_id"] for t in tasks if t.get("start_date")}
            status = "running" if started - DATA_TASKS - {"cleanup"} else "validating_files"
        elif (run.get("note") or "").startswith(CANCEL_NOTE):
            # Airflow may end a run marked failed as `success` (its not-yet-run tasks skipped, the teardown done)
            status = "cancelled"
        elif state == "success":
            status = "succeeded"
        else:
            status = "failed"
        error = None
        if status == "failed":
            error = self._error(customer, run, v, tasks if tasks is not None else self._tasks(customer, rid))
        promoted = bool(v and v.info.passed and ("production" in v.aliases or "previous" in v.aliases))
        out = {
            "id": job_id(rid),
            "object": "fine_tuning.job",
            "created_at": _ts(run.get("queued_at") or run.get("run_after")),
            "finished_at": _ts(run.get("end_date")) if status in ("succeeded", "failed", "cancelled") else None,
            "model": conf.get("ftops_model") or customer,
            "fine_tuned_model": customer if promoted else None,
            "organization_id": customer,
            "status": status,
            "training_file": conf.get("ftops_training_file"),
            "validation_file": None,
            "hyperparameters": {k: conf[p] for k, p in HYPERPARAMETERS.items() if conf.get(p) is not None},
            "result_files": [],
            "trained_tokens": self._tokens(v) if detail and v else None,
            "error": error,
            "seed": None,
            "metadata": {"run_id": rid, "registry_version": v.version if v else None},
        }
        return out

    def _error(self, customer: str, run: dict, v, tasks: list[dict]) -> dict:
        if v is not None and v.info.gate_decision == FAILED:
            return {
                "code": "gate_failed",
                "message": f"The evaluation gate refused the candidate: {' | '.join(v.info.gate_reasons or [])}",
                "param": None,
            }
        failed = sorted({t["task_id"] for t in tasks if t.get("state") in ("failed", "upstream_failed")} & DATA_TASKS)
        if failed:
            return {
                "code": "batch_rejected",
                "message": "The data batch was rejected before training" + self._rejection(customer, run["dag_run_id"]),
                "param": "training_file",
            }
        return {
            "code": "run_failed",
            "message": "The fine-tuning run failed; the operators have been notified.",
            "param": None,
        }

    def _rejection(self, customer: str, rid: str) -> str:
        """The validate stage's message (which batch-level expectation failed) from the ingest task's log."""
        for try_number in (3, 2, 1):
            r = self.airflow.request(
                "GET",
                f"/dags/finetune_{customer}/dagRuns/{rid}/taskInstances/ingest/logs/{try_number}",
                headers={"Accept": "application/json"},
            )
            if r.status_code != 200:
                continue
            text = str(r.json().get("content", ""))
            marker = "batch rejected before training:"
            if marker in text:
                return ": " + text.split(marker, 1)[1].split("\\n")[0].split('"')[0].strip()[:500]
        return "."

    def _tokens(self, v) -> int | None:
        from ftops.release.registry import Registry

        try:
            tokens = Registry(self.registry_uri).run_metrics(v.run_id).get("tokens_seen")
            return int(tokens) if tokens is not None else None
        except Exception:  # noqa: BLE001 - a figure, not a verdict
            return None

    def list(self, customer: str, base: str, limit: int) -> list[dict]:
        versions = self._versions(customer, base)
        return [self.job(customer, run, versions) for run in self._runs(customer, limit)]

    def retrieve(self, customer: str, base: str, jid: str) -> dict:
        run = self._run(customer, jid)
        return self.job(customer, run, self._versions(customer, base), detail=True)

    def events(self, customer: str, base: str, jid: str) -> list[dict]:
        run = self._run(customer, jid)
        rid = run["dag_run_id"]
        out: list[dict] = [self._event(run.get("queued_at") or run.get("run_after"), "info", "Job created", {})]
        for t in self._tasks(customer, rid):
            if t.get("start_date"):
                out.append(self._event(t["start_date"], "info", f"{t['task_id']} started", {"task": t["task_id"]}))
            if t.get("end_date") and t.get("state"):
                level = "error" if t["state"] in ("failed", "upstream_failed") else "info"
                out.append(
                    self._event(
                        t["end_date"],
                        level,
                        f"{t['task_id']} {t['state']}",
                        {"task": t["task_id"], "state": t["state"]},
                    )
                )
        v = self._version_of(self._versions(customer, base), rid)
        if v is not None:
            when = datetime.fromtimestamp(v.created / 1000).astimezone().isoformat()
            ok = v.info.passed
            out.append(
                self._event(
                    when,
                    "info" if ok else "warn",
                    f"Gate {v.info.gate}: {' | '.join(v.info.gate_reasons or []) or 'no regression'}",
                    {"registry_version": v.version, "gate": v.info.gate},
                )
            )
            if "production" in v.aliases:
                out.append(
                    self._event(
                        when, "info", f"Promoted: version {v.version} serves as model {customer!r}", {"model": customer}
                    )
                )
        out.sort(key=lambda e: e["created_at"] or 0, reverse=True)
        for i, e in enumerate(out):
            e["id"] = f"ftevent-{job_id(rid)[6:]}-{len(out) - i}"
        return out

    def _event(self, when, level: str, message: str, data: dict) -> dict:
        created = _ts(when) if isinstance(when, str) else None
        return {
            "object": "fine_tuning.job.event",
            "created_at": created,
            "level": level,
            "message": message,
            "type": "message",
            "data": data,
        }

    def checkpoints(self, customer: str, base: str, jid: str) -> list[dict]:
        """The registry version(s) this job's run produced, with the gate's metrics."""
        run = self._run(customer, jid)
        rid = run["dag_run_id"]
        out = []
        for v in self._versions(customer, base):
            if v.info.run_id != rid:
                continue
            metrics = {
                k.removeprefix("metrics."): _num(x) for k, x in v.tags.items() if k.startswith("metrics.") and x != ""
            }
            out.append(
                {
                    "id": f"ftckpt-{customer}-{v.version}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": int(v.created / 1000),
                    "fine_tuned_model_checkpoint": f"{customer}@{v.version}",
                    "fine_tuning_job_id": jid,
                    "step_number": 0,
                    "metrics": metrics | {"gate": v.info.gate, "aliases": v.aliases},
                }
            )
        return out

    # --- writing ------------------------------------------------------------------------------------------

    def create(self, customer: str, customer_config, file_obj: dict, model: str, hyperparameters: dict) -> dict:
        allowed = set(customer_config.api.allowed_hyperparameters)
        given = {k: v for k, v in (hyperparameters or {}).items() if v is not None and v != "auto"}
        refused = sorted(set(given) - allowed)
        if refused:
            raise ApiError(
                400,
                f"Hyper-parameter(s) not allowed for your account: {', '.join(refused)}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}.",
                "hyperparameter_not_allowed",
                "hyperparameters",
            )
        conf: dict = {"force": True, "ftops_training_file": file_obj["id"], "ftops_model": model}
        for k, value in given.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ApiError(
                    400, f"Hyper-parameter {k} must be a positive number.", "invalid_hyperparameter", "hyperparameters"
                )
            if k == "learning_rate_multiplier":
                conf["learning_rate"] = customer_config.training.learning_rate * value
            elif k == "max_steps":
                if int(value) != value:
                    raise ApiError(400, "max_steps must be an integer.", "invalid_hyperparameter", "hyperparameters")
                conf["max_steps"] = int(value)
            else:
                conf[HYPERPARAMETERS[k]] = value
        r = self.airflow.request(
            "POST", f"/dags/finetune_{customer}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        if r.status_code == 404:
            raise ApiError(400, "Fine-tuning is not enabled for your account.", "dag_not_found")
        if r.status_code == 400:
            raise ApiError(
                400,
                "The scheduler refused the job's parameters (out of range).",
                "invalid_hyperparameter",
                "hyperparameters",
            )
        if r.status_code not in (200, 201):
            raise ApiError(503, "The scheduler did not accept the job; try again shortly.", "scheduler_unavailable")
        return self.job(customer, r.json(), [], tasks=[])

    def cancel(self, customer: str, base: str, jid: str) -> dict:
        run = self._run(customer, jid)
        if run["state"] not in ("queued", "running"):
            raise ApiError(
                400, f"The job is already {self.job(customer, run, [], tasks=[])['status']}.", "job_not_running"
            )
        r = self.airflow.request(
            "PATCH",
            f"/dags/finetune_{customer}/dagRuns/{run['dag_run_id']}",
            params={"update_mask": ["state", "note"]},
            json={"state": "failed", "note": CANCEL_NOTE},
        )
        if r.status_code != 200:
            raise ApiError(503, "The scheduler did not cancel the job; try again shortly.", "scheduler_unavailable")
        # The PATCH answer can carry the run as it was (Airflow 3.3 sets the state with a bulk update): read it back
        deadline, run = time.time() + 30, r.json()
        while run["state"] in ("queued", "running") and time.time() < deadline:
            time.sleep(0.5)
            run = self._run(customer, jid)
        return self.job(customer, run, self._versions(customer, base), tasks=[])


def _num(x: str):
    try:
        return float(x)
    except ValueError:
        return x
