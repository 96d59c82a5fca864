"""The ftops plugin: the adapter fleet in the Airflow UI.

A FastAPI app mounted in the api-server at `/ftops` (pages and a JSON API, documented at `/ftops/docs`), a
navigation entry ("Adapter fleet") and a tab on each DAG page ("Adapters"; `finetune_<customer>` DAGs show
that customer). Authentication is the api-server's own: a request carries the UI's session cookie or a
bearer token, the auth manager says which customers' DAGs the user may read, and promote/rollback need
the right to trigger that customer's DAG. This file only wires: the logic is in `ftops.operate.fleet`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

UI = Path(__file__).parent / "ftops_ui"
# A registry that does not answer must make the page say so in seconds, not after MLflow's default
# seven retries with backoff (minutes). Only this process (the api-server) reads MLflow through these.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
API_TAGS = [{"name": "fleet", "description": "Every customer's adapter: registry, serving, runs, data."}]

_registry_cache = []


def registry_cache():
    """The fleet's registry snapshot (stale-while-revalidate, `ftops.release.registry.RegistryCache`), one per
    api-server; made on first use so that task processes, which load plugins too, never import mlflow for it."""
    if not _registry_cache:
        from ftops.release.registry import RegistryCache

        _registry_cache.append(RegistryCache())
    return _registry_cache[0]


def _warm() -> None:
    """What the first page load would otherwise wait for: the imports (mlflow, the api-server's security
    module) and the fleet's registry snapshot (seconds at 500 customers)."""
    import logging

    from airflow.api_fastapi.core_api.security import get_user  # noqa: F401

    from ftops.release.registry import RegistryUnavailable

    log, t0 = logging.getLogger(__name__), time.perf_counter()
    try:
        registry_cache().get(_ctx()[1].mlflow_uri)
    except RegistryUnavailable as exc:  # the page will say so; nothing to warm
        log.warning("ftops fleet: registry not read at start: %s", exc)
        return
    log.info("ftops fleet: registry snapshot read at start-up in %.1f s", time.perf_counter() - t0)


class WarmOnStartup:
    """A root ASGI middleware whose only job is the api-server's lifespan startup: a mounted app gets no
    lifespan events of its own. On startup it warms the fleet in a background thread (startup is not
    delayed); every other message passes through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            import threading

            threading.Thread(target=_warm, daemon=True, name="ftops-warm").start()
        await self.app(scope, receive, send)


app = FastAPI(
    title="ftops fleet",
    description="The operator's view of the per-customer LoRA adapters: what is in production, what is served, "
    "how the last run and gate went; promote and roll back. Authenticated by the Airflow api-server.",
    version="1",
    openapi_tags=API_TAGS,
)


async def current_user(
    request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
):
    """The api-server's own authentication (`get_user`): the bearer header, else the UI's session cookie;
    401/403 otherwise. Imported at request time: every Airflow task process loads plugins, and importing
    the api-server's security module costs seconds."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, bearer)


User = Annotated[object, Depends(current_user)]


def _ctx():
    from ftops.config import load_platform, settings

    env = settings()
    return load_platform(env.customers_file), env


def _auth():
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _readable(user, customers: list[str]) -> set[str]:
    from ftops.operate.fleet import dag_id

    allowed = _auth().filter_authorized_dag_ids(dag_ids={dag_id(c) for c in customers}, user=user, method="GET")
    return {c for c in customers if dag_id(c) in allowed}


def _can_trigger(user, customer: str) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.configuration import conf
    from airflow.models.dag import DagModel

    from ftops.operate.fleet import dag_id

    d = dag_id(customer)
    # Teams only exist in multi-team mode: skip a database query per row otherwise (500 rows).
    team = DagModel.get_team_name(d) if conf.getboolean("core", "multi_team", fallback=False) else None
    details = DagDetails(id=d, team_name=team)
    return _auth().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN, details=details, user=user)


def _known(platform, customer: str) -> None:
    if customer not in platform.customers:
        raise HTTPException(404, f"unknown customer {customer!r}")


def _may_read(user, customer: str) -> None:
    if not _readable(user, [customer]):
        raise HTTPException(403, f"you may not read finetune_{customer}")


# --- pages ------------------------------------------------------------------------------------------------


@app.get("/", include_in_schema=False)
def fleet_page():
    return FileResponse(UI / "fleet.html")


@app.get("/customers/{customer}", include_in_schema=False)
def customer_page(customer: str):
    return FileResponse(UI / "customer.html")


@app.get("/dag/{dag_id}", include_in_schema=False)
def dag_tab(dag_id: str):
    """The tab on every DAG page: a customer's DAG opens its customer page, other DAGs say so."""
    from ftops.config import CUSTOMER_ID_RE
    from ftops.operate.fleet import customer_of

    customer = customer_of(dag_id)
    if customer is None or not CUSTOMER_ID_RE.fullmatch(customer):
        return HTMLResponse(
            "<p style='font-family:sans-serif'>Not a customer DAG: adapters belong to <code>finetune_*</code> DAGs. "
            "<a href='../'>Adapter fleet</a></p>"
        )
    return RedirectResponse(f"../customers/{customer}", status_code=307)


@app.get("/static/{name}", include_in_schema=False)
def static(name: Literal["ftops.css", "ftops.js"]):
    return FileResponse(UI / name)


# --- JSON API ---------------------------------------------------------------------------------------------


@app.get("/api/customers", tags=["fleet"], summary="One row per customer the user may read")
def list_customers(user: User) -> dict:
    from ftops.operate import fleet
    from ftops.release.registry import RegistryUnavailable

    t0 = time.perf_counter()
    platform, env = _ctx()
    readable = _readable(user, list(platform.customers))
    t1 = time.perf_counter()
    runs = fleet.airflow_runs([fleet.dag_id(c) for c in readable])
    timings = {"config_and_auth_s": round(t1 - t0, 3), "airflow_s": round(time.perf_counter() - t1, 3)}
    age = {}

    def registry():
        age["s"] = registry_cache().get(env.mlflow_uri)
        return age["s"][0]

    try:
        rows = fleet.fleet(platform, env, runs, fleet.airflow_promote_times, registry, timings)
    except RegistryUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc
    rows = [r | {"can_act": _can_trigger(user, r["customer"])} for r in rows if r["customer"] in readable]
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    return {
        "customers": rows,
        "total": len(rows),
        "replicas": list(env.vllm_urls),
        "registry_age_s": round(age["s"][1], 1),
        "timings": timings,
    }


@app.get("/api/customers/{customer}", tags=["fleet"], summary="Version history, gate metrics, lineage, links")
def get_customer(customer: str, user: User) -> dict:
    from ftops.operate import fleet
    from ftops.release.registry import RegistryUnavailable

    platform, env = _ctx()
    _known(platform, customer)
    _may_read(user, customer)
    try:
        return fleet.customer_detail(platform, env, customer) | {"can_act": _can_trigger(user, customer)}
    except RegistryUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc


@app.get(
    "/api/customers/{customer}/versions/{version}/report",
    tags=["fleet"],
    summary="The gate report of a version (HTML)",
    response_class=HTMLResponse,
)
def get_report(customer: str, version: str, user: User):
    from ftops.operate import fleet

    platform, env = _ctx()
    _known(platform, customer)
    _may_read(user, customer)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return HTMLResponse(fleet.gate_report(platform, env, customer, version, Path(tmp)))
        except fleet.UnknownVersion as exc:
            raise HTTPException(404, str(exc)) from exc


@app.get("/api/customers/{customer}/answers", tags=["fleet"], summary="Served answer vs base model, demo prompt")
def get_answers(customer: str, user: User) -> dict:
    from ftops.operate import fleet

    platform, env = _ctx()
    _known(platform, customer)
    _may_read(user, customer)
    return fleet.answers(platform, env, customer)


class Move(BaseModel):
    version: str | None = Field(
        None, description="registry version; for a rollback, omit to go back to the `previous` alias"
    )
    confirm: bool = Field(False, description="must be true: the UI asks the person to confirm first")


def _move(customer: str, action: str, body: Move, user) -> dict:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    from ftops.operate import fleet
    from ftops.release.registry import RegistryUnavailable

    platform, env = _ctx()
    _known(platform, customer)
    # The same check Airflow makes before triggering a run of this DAG (403 otherwise).
    requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=fleet.dag_id(customer))(None, user)
    if not body.confirm:
        raise HTTPException(400, f"{action} of {customer} not confirmed (send confirm: true)")
    try:
        moved = fleet.move_production(platform, env, customer, action, body.version, user.get_name())
    except fleet.UnknownVersion as exc:
        raise HTTPException(404, str(exc)) from exc
    except fleet.GateNotPassed as exc:
        raise HTTPException(409, str(exc)) from exc
    except RegistryUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc
    if moved["unchanged"]:
        return moved | {"sync_triggered": False}
    registry_cache().invalidate(env.mlflow_uri)
    moved["sync_triggered"] = fleet.airflow_production_changed(customer, moved["production"], user.get_name())
    return moved


@app.post(
    "/api/customers/{customer}/promote",
    tags=["fleet"],
    summary="Move production to a version that passed the gate",
    responses={403: {}, 404: {}, 409: {"description": "the version did not pass the gate"}},
)
def promote(customer: str, body: Move, user: User) -> dict:
    if body.version is None:
        raise HTTPException(400, "promote needs a version")
    return _move(customer, "promote", body, user)


@app.post(
    "/api/customers/{customer}/rollback",
    tags=["fleet"],
    summary="Move production back to the previous version (or to a given one that passed the gate)",
    responses={403: {}, 404: {}, 409: {"description": "the version did not pass the gate"}},
)
def rollback(customer: str, body: Move, user: User) -> dict:
    return _move(customer, "rollback", body, user)


class FtopsPlugin(AirflowPlugin):
    name = "ftops"
    fastapi_apps = [{"app": app, "url_prefix": "/ftops", "name": "ftops fleet"}]
    fastapi_root_middlewares = [{"middleware": WarmOnStartup, "name": "ftops fleet warm-up"}]
    external_views = [
        {"name": "Adapter fleet", "href": "ftops/", "destination": "nav", "url_route": "ftops-fleet"},
        {"name": "Adapters", "href": "ftops/dag/{DAG_ID}", "destination": "dag", "url_route": "ftops-adapters"},
    ]
