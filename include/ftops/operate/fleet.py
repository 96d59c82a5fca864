"""Fleet: the operator's view of every customer's adapter, for the Airflow UI plugin (`plugins/ftops_fleet.py`).

One row per customer: what the registry has in production (and when, by which run or person), what each
vLLM replica actually serves, how the last DAG run and its gate went, when the next run is due, what waits
in the inbox, how much of the last batch was quarantined, and the serving traffic where the replicas export
per-customer metrics. Built to stay fast at 500 customers: the registry is read in two batched searches
(`ftops.release.registry.read_registry`: every `ftops` registered model and every version of them), not a
call per customer; replicas and metrics endpoints are asked once each, concurrently; Airflow's own tables are
read in three queries.

The Airflow-specific reads (DAG runs, next run, the production-changed asset event) live in the functions
whose names start with `airflow_`: they import Airflow lazily and run inside the api-server.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

from ftops.config import CustomerConfig, Platform, Settings
from ftops.operate.retention import retention, version_forgetting
from ftops.release.keys import auth_headers
from ftops.release.registry import (
    CANDIDATE,
    PREVIOUS,
    PRODUCTION,
    AdapterVersion,
    ModelState,
    Registry,
    RegistryError,
    RegistryUnavailable,
    model_name,
    read_model,
    read_registry,
)
from ftops.release.serving import replica_adapters, served_state
from ftops.release.tags import VersionTags

# The candidate's figures the version history shows (VersionTags fields, read from the registry's tags).
METRICS = {
    "val_loss": "candidate_val_loss",
    "golden_chrf": "candidate_golden_chrf",
    "checks_pass_rate": "candidate_checks_pass_rate",
    "repetition": "candidate_repetition",
    "base_val_loss": "base_val_loss",
}


class UnknownCustomer(LookupError):
    pass


class UnknownVersion(LookupError):
    pass


class GateNotPassed(ValueError):
    pass


def dag_id(customer: str) -> str:
    return f"finetune_{customer}"


def customer_of(dag: str) -> str | None:
    return dag.removeprefix("finetune_") if dag.startswith("finetune_") else None


# --- serving: replicas and traffic ------------------------------------------------------------------------


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+([^\s]+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition format, the samples only (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def traffic(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, dict]:
    """Per customer: requests, errors (HTTP status >= 400, or an `error` metric) and p95 latency (ms), from any
    metrics labelled `customer`: `*_requests_total`, `*_errors_total`, and a `*_bucket` latency histogram.
    Customers with no labelled samples are absent (the page shows n/a)."""
    per: dict[str, dict] = {}
    buckets: dict[str, dict[float, float]] = {}
    # Where the exporter counts errors itself (ftops.release.serving_auth's `ftops_tenant_errors_total`), those are the
    # errors; only otherwise are they read from the requests' status codes (never both: double counting).
    counted = {lb.get("customer") for n, lb, _ in samples if n.endswith(("_errors_total", "_failures_total"))}
    for name, labels, value in samples:
        c = labels.get("customer")
        if not c:
            continue
        row = per.setdefault(c, {"requests": 0.0, "errors": 0.0, "p95_ms": None})
        status = labels.get("status", labels.get("code", ""))
        if name.endswith("_requests_total"):
            row["requests"] += value
            if status[:1] in ("4", "5") and c not in counted:
                row["errors"] += value
        elif name.endswith(("_errors_total", "_failures_total")):
            row["errors"] += value
        elif name.endswith("_bucket") and any(w in name for w in ("latency", "duration", "seconds")) and "le" in labels:
            le = math.inf if labels["le"] in ("+Inf", "Inf") else float(labels["le"])
            b = buckets.setdefault(c, {})
            b[le] = b.get(le, 0.0) + value
    for c, b in buckets.items():
        bounds = sorted(b)
        total = b[bounds[-1]] if bounds else 0
        if total > 0:
            p95 = next(le for le in bounds if b[le] >= 0.95 * total)
            unit = 1.0 if p95 == math.inf else 1000.0  # seconds -> ms
            per[c]["p95_ms"] = None if p95 == math.inf else round(p95 * unit, 1)
    for row in per.values():
        row["requests"], row["errors"] = int(row["requests"]), int(row["errors"])
    return per


def metrics_urls(env: Settings) -> list[str]:
    explicit = os.environ.get("FTOPS_METRICS_URLS", "")
    if explicit.strip():
        return [u.strip() for u in explicit.split(",") if u.strip()]
    return [f"{u}/metrics" for u in env.vllm_urls]


def read_traffic(urls: list[str], timeout: float = 3.0) -> dict[str, dict]:
    def get(url: str) -> str:
        try:
            r = httpx.get(url, timeout=timeout, headers=auth_headers())  # `/metrics` is admin-only
            return r.text if r.status_code == 200 else ""
        except httpx.HTTPError:
            return ""

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(urls)))) as pool:
        texts = list(pool.map(get, urls))
    return traffic([s for t in texts for s in parse_metrics(t)])


# --- data: inbox and last batch ---------------------------------------------------------------------------

_counters: dict[tuple[str, str], object] = {}
_manifests: dict[tuple[str, str, str], dict] = {}
_data_lock = threading.Lock()


def data_state(storage_root: str, customers: list[str]) -> dict[str, dict]:
    """Per customer: examples waiting in the inbox (as the data-volume trigger counts them) and the last
    dataset version's quarantine share. Counters are kept between calls: they re-read only changed files."""
    from ftops.data.ingest import InboxCounter
    from ftops.data.snapshot import manifest
    from ftops.storage import Store

    store = Store(storage_root)

    def one(customer: str) -> dict:
        out: dict = {"inbox": None, "last_batch": None, "quarantine_share": None}
        try:
            counter = _counters.setdefault((storage_root, customer), InboxCounter(storage_root, customer))
            out["inbox"] = counter.pending()[0]
            versions = sorted(store.children(f"{customer}/datasets"))
            for version in reversed(versions):  # the newest complete one (its manifest is written last)
                key = (storage_root, customer, version)
                if key not in _manifests:
                    if (m := manifest(store, customer, version)) is None:
                        continue
                    _manifests[key] = m
                counts = _manifests[key]["counts"]
                dropped = sum(counts.get("dropped", {}).values())
                out["last_batch"] = version
                out["quarantine_share"] = round(dropped / counts["read"], 4) if counts.get("read") else 0.0
                break
        except Exception as exc:  # noqa: BLE001 - one unreadable inbox must not blank the page
            out["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out

    with _data_lock, ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(customers, pool.map(one, customers), strict=True))


# --- Airflow: runs, schedule, events (inside the api-server) ----------------------------------------------


def _iso(ts) -> str | None:
    return ts.isoformat() if ts else None


def airflow_runs(dag_ids: list[str]) -> dict[str, dict]:
    """Per DAG: its next scheduled run and its latest run (state, start, end), read from Airflow's own tables
    in two queries; plus when each latest run's `promote` task ended."""
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    out: dict[str, dict] = {d: {"next_run": None, "paused": None, "last_run": None} for d in dag_ids}
    with create_session() as session:
        for d, nxt, paused in session.execute(
            select(DagModel.dag_id, DagModel.next_dagrun_create_after, DagModel.is_paused).where(
                DagModel.dag_id.like("finetune\\_%", escape="\\")
            )
        ):
            if d in out:
                out[d] |= {"next_run": _iso(nxt), "paused": bool(paused)}
        latest = (
            select(func.max(DagRun.id))
            .where(DagRun.dag_id.like("finetune\\_%", escape="\\"))
            .group_by(DagRun.dag_id)
            .scalar_subquery()
        )
        for r in session.execute(
            select(
                DagRun.dag_id, DagRun.run_id, DagRun.state, DagRun.run_type, DagRun.start_date, DagRun.end_date
            ).where(DagRun.id.in_(latest))
        ):
            if r.dag_id in out:
                out[r.dag_id]["last_run"] = {
                    "run_id": r.run_id,
                    "state": str(r.state.value if hasattr(r.state, "value") else r.state),
                    "run_type": str(r.run_type.value if hasattr(r.run_type, "value") else r.run_type),
                    "start": _iso(r.start_date),
                    "end": _iso(r.end_date),
                }
    return out


def airflow_promote_times(runs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """When the `promote` task of each (dag_id, run_id) succeeded: the moment that run moved production."""
    if not runs:
        return {}
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select, tuple_

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.dag_id, TaskInstance.run_id, TaskInstance.end_date).where(
                TaskInstance.task_id == "promote",
                TaskInstance.state == "success",
                tuple_(TaskInstance.dag_id, TaskInstance.run_id).in_(runs),
            )
        )
        return {(d, r): _iso(end) for d, r, end in rows}


def airflow_production_changed(customer: str, version: str, by: str) -> bool:
    """Emit an event of the production asset, as `ftops adapters promote` does through the REST API, but from
    inside the api-server: the serving sync DAG runs at once. False when the asset is not known yet."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetModel
    from airflow.utils import timezone
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from ftops.config import PRODUCTION_ASSET_URI

    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.uri == PRODUCTION_ASSET_URI).limit(1))
        if asset is None:
            return False
        event = asset_manager.register_asset_change(
            asset=asset,
            timestamp=timezone.utcnow(),
            extra={"customer": customer, "version": version, "by": by, "from": "ftops fleet page"},
            source_is_api=True,
            session=session,
        )
        return event is not None


# --- the fleet --------------------------------------------------------------------------------------------


def _when_ms(ms: int) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat() if ms else None


def production_info(model: ModelState | None, promote_times: dict[tuple[str, str], str]) -> dict | None:
    prod = model.alias(PRODUCTION) if model else None
    if prod is None:
        return None
    t = prod.info
    run = (t.dag_id or "", t.run_id or "")
    if t.promoted_at:  # moved by a person from the fleet page
        when, by = t.promoted_at, f"{t.promoted_action or 'promote'} by {t.promoted_by or '?'}"
    else:
        when, by = promote_times.get(run), f"run {run[1]}" if run[1] else "outside Airflow"
    return {
        "version": prod.version,
        "adapter_version": t.adapter_version or "",
        "promoted_at": when,
        "promoted_by": by,
        "airflow_run_id": run[1] or None,
        "registered_at": _when_ms(prod.created),
    }


_RULE = re.compile(r"^[a-z_]{1,40}$")
_FAILED_GROUP = re.compile(r"FAIL \[([a-z_]{1,20})\]")


def stuck_state(model: ModelState | None, after: int) -> dict | None:
    """The customer is stuck when its newest `after` (or more) registry versions all failed the gate: production
    stays old while every run fails. Which rules failed (the newest version's `gate.failed_rules` tag; for
    versions registered before that tag, the failed groups of its reasons) and what to do about it."""
    from ftops.model.gate import advice, consecutive_failures

    if model is None or not model.versions:
        return None
    decisions = []
    for v in model.versions:  # newest first; tags are input: only rule-shaped names are kept
        rules = [r for r in v.info.gate_failed_rules or [] if _RULE.match(r)]
        rules = rules or list(dict.fromkeys(_FAILED_GROUP.findall(v.description)))
        decisions.append((v.gate, ",".join(rules)))
    n, rules = consecutive_failures(decisions)
    if n < after:
        return None
    return {
        "failures": n,
        "since": model.versions[n - 1].version,
        "rules": rules,
        "label": f"stuck: {', '.join(rules) or 'gate'}",
        "advice": advice(rules[0] if rules else ""),
    }


def fleet(
    platform: Platform,
    env: Settings,
    runs: dict[str, dict] | None = None,
    promote_times_fn=None,
    registry: Callable[[], dict[tuple[str, str], ModelState]] | None = None,
    timings: dict[str, float] | None = None,
) -> list[dict]:
    """One row per configured customer. `runs` and `promote_times_fn` come from Airflow (the api-server);
    the registry (`registry()`, by default one fresh batched read), replicas, metrics and storage are read
    here, concurrently. `timings`, when given, receives each source's seconds."""
    customers = list(platform.customers.values())
    ids = [c.id for c in customers]
    timings = {} if timings is None else timings

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            timings[name] = round(time.perf_counter() - t0, 3)

    with ThreadPoolExecutor(max_workers=4) as pool:
        f_reg = pool.submit(timed, "registry_s", registry or (lambda: read_registry(env.mlflow_uri)))
        f_rep = pool.submit(timed, "replicas_s", replica_adapters, env.vllm_urls)
        f_tr = pool.submit(timed, "traffic_s", read_traffic, metrics_urls(env))
        f_data = pool.submit(timed, "storage_s", data_state, env.storage_root, ids)
        registry_state = f_reg.result()
        replicas, traffic_by, data = f_rep.result(), f_tr.result(), f_data.result()
    runs = runs or {}
    models = {c.id: registry_state.get((c.id, c.base_model)) for c in customers}
    wanted = []
    for m in models.values():
        prod = m.alias(PRODUCTION) if m else None
        if prod and prod.info.run_id and not prod.info.promoted_at:
            wanted.append((prod.info.dag_id or "", prod.info.run_id))
    times = promote_times_fn(wanted) if promote_times_fn and wanted else {}
    rows = []
    for c in customers:
        m = models[c.id]
        prod = m.alias(PRODUCTION) if m else None
        info = runs.get(dag_id(c.id), {})
        last = info.get("last_run")
        if last and m:  # the gate's verdict on what the last run registered, if it got that far
            v = next((x for x in m.versions if x.info.run_id == last["run_id"]), None)
            last = last | {"gate": v.gate if v else None, "version": v.version if v else None}
        rows.append(
            {
                "customer": c.id,
                "name": c.name,
                "base_model": c.base_model,
                "dag_id": dag_id(c.id),
                "model": m.name if m else None,
                "versions": len(m.versions) if m else 0,
                "production": production_info(m, times),
                "previous": (m.aliases.get(PREVIOUS) if m else None),
                "candidate": (m.aliases.get(CANDIDATE) if m else None),
                "served": served_state(c.id, prod.info.adapter_version if prod else None, replicas),
                "last_run": last,
                "next_run": info.get("next_run"),
                "paused": info.get("paused"),
                "stuck": stuck_state(m, c.gate.stuck_after),
                **data.get(c.id, {}),
                "traffic": traffic_by.get(c.id),
            }
        )
    return rows


# --- one customer -----------------------------------------------------------------------------------------


def mlflow_ui(env: Settings) -> str:
    return os.environ.get("FTOPS_MLFLOW_UI_URL", env.mlflow_uri).rstrip("/")


def customer_detail(platform: Platform, env: Settings, customer: str) -> dict:
    """Version history with gate metrics, dataset lineage and links, for the customer tab."""
    c = _customer(platform, customer)
    model = read_model(env.mlflow_uri, c.id, c.base_model)
    versions = model.versions if model else []
    experiments = Registry(env.mlflow_uri).experiments([v.run_id for v in versions if v.run_id])
    ui = mlflow_ui(env)
    out = []
    for v in versions:
        t = v.info
        exp = experiments.get(v.run_id)
        out.append(
            {
                "version": v.version,
                "registered_at": _when_ms(v.created),
                "aliases": sorted(v.aliases),
                "adapter_version": t.adapter_version or "",
                "gate": v.gate,
                "gate_reasons": v.description,
                "metrics": {k: getattr(t, field) for k, field in METRICS.items()},
                "forgetting": version_forgetting(t),
                "dataset": {
                    "version": t.dataset_version,
                    "new_versions": t.dataset_new_versions or [],
                    "fingerprint": t.dataset_fingerprint,
                    "replay_examples": t.replay_examples,
                    "replay_share": t.replay_share,
                },
                "promoted": {"by": t.promoted_by, "at": t.promoted_at, "action": t.promoted_action}
                if t.promoted_at
                else None,
                "links": {
                    "mlflow_run": f"{ui}/#/experiments/{exp}/runs/{v.run_id}" if exp and v.run_id else None,
                    "mlflow_model_version": f"{ui}/#/models/{model.name}/versions/{v.version}",
                    "airflow_run": (f"dags/{t.dag_id}/runs/{t.run_id}" if t.run_id and t.dag_id else None),
                    "gate_report": f"api/customers/{c.id}/versions/{v.version}/report" if v.run_id else None,
                },
                "can_promote": v.gate == "passed" and PRODUCTION not in v.aliases,
            }
        )
    return {
        "customer": c.id,
        "name": c.name,
        "base_model": c.base_model,
        "dag_id": dag_id(c.id),
        "model": model.name if model else model_name(c.id, c.base_model),
        "demo_prompt": c.demo_prompt,
        "production": model.aliases.get(PRODUCTION) if model else None,
        "previous": model.aliases.get(PREVIOUS) if model else None,
        "versions": out,
        "retention": retention([(v.version, v.info) for v in versions]),
        "stuck": stuck_state(model, c.gate.stuck_after),
    }


def _customer(platform: Platform, customer: str) -> CustomerConfig:
    if customer not in platform.customers:
        raise UnknownCustomer(f"unknown customer {customer!r}")
    return platform.customers[customer]


def gate_report(platform: Platform, env: Settings, customer: str, version: str, workdir: Path) -> str:
    """The gate's HTML report, logged with the version's training run (artifact `gate/gate_report.html`)."""
    c = _customer(platform, customer)
    v = _version(env, c, version)
    if not v.run_id:
        raise UnknownVersion(f"{customer}: version {version} has no training run, hence no gate report")
    page = Registry(env.mlflow_uri).read_artifact(v.run_id, "gate/gate_report.html", str(workdir))
    if page is None:
        raise UnknownVersion(f"{customer}: version {version} has no gate report")
    return page


def _version(env: Settings, c: CustomerConfig, version: str) -> AdapterVersion:
    if not re.fullmatch(r"[0-9]{1,9}", version or ""):
        raise UnknownVersion(f"{c.id}: invalid version {version!r} (a registry version number)")
    model = read_model(env.mlflow_uri, c.id, c.base_model)
    v = next((x for x in (model.versions if model else []) if x.version == version), None)
    if v is None:
        raise UnknownVersion(f"{c.id}: no adapter version {version}")
    return v


def answers(platform: Platform, env: Settings, customer: str) -> dict:
    """The customer's demo prompt answered by its served adapter and by the base model, on the first replica
    that answers."""
    from ftops.release.serving import Replica, ServingError

    c = _customer(platform, customer)
    errors = []
    for url in env.vllm_urls:
        replica = Replica(url, timeout=60)
        try:
            base = replica.base_model()
            served = replica.chat(c.id, c.demo_prompt, system=c.system_prompt) if c.id in replica.adapters() else None
            return {
                "prompt": c.demo_prompt,
                "replica": url,
                "served": served,
                "base": replica.chat(base, c.demo_prompt, system=c.system_prompt),
                "adapter": replica.adapters().get(c.id),
            }
        except (httpx.HTTPError, ServingError, StopIteration) as exc:
            errors.append(f"{url}: {exc}")
    return {"prompt": c.demo_prompt, "replica": None, "served": None, "base": None, "errors": errors}


# --- actions ----------------------------------------------------------------------------------------------


def move_production(
    platform: Platform, env: Settings, customer: str, action: str, version: str | None, user: str
) -> dict:
    """Promote a version that passed the gate, or roll back (to `version`, or to the `previous` alias), through
    `Registry`; record who and when as tags of the version now in production."""
    c = _customer(platform, customer)
    reg = Registry(env.mlflow_uri)
    if version is not None:
        target = _version(env, c, version)
        if target.gate != "passed":  # rollback too: never back onto a version the gate refused
            raise GateNotPassed(
                f"{customer}: version {version} did not pass the gate ({target.gate}); refusing to {action}"
            )
        if PRODUCTION in target.aliases:  # nothing moves: no tag claims a move, no sync is started
            return {
                "customer": c.id,
                "production": version,
                "adapter_version": target.info.adapter_version or "",
                "unchanged": True,
            }
    try:
        if action == "promote":
            if version is None:
                raise UnknownVersion(f"{customer}: promote needs a version")
            moved = reg.promote(c.id, c.base_model, version)
        elif action == "rollback":
            moved = reg.rollback(c.id, c.base_model, version)
        else:
            raise ValueError(f"unknown action {action!r}")
    except RegistryUnavailable:
        raise  # a 503 on the page, not a refused move
    except RegistryError as exc:
        msg = str(exc)
        if "did not pass the gate" in msg:
            raise GateNotPassed(msg) from exc
        raise UnknownVersion(msg) from exc
    at = datetime.now(UTC).isoformat(timespec="seconds")
    who = VersionTags(promoted_by=user, promoted_at=at, promoted_action=action)
    reg.set_tags(c.id, c.base_model, moved.version, who.as_tags())
    return {
        "customer": c.id,
        "production": moved.version,
        "adapter_version": moved.adapter_version,
        "by": user,
        "at": at,
        "unchanged": False,
    }
