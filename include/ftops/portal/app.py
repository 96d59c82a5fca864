"""The customer API's wiring: routes, errors in OpenAI's shape, the per-customer upload rate limit.

Run with `ftops api` (uvicorn, port 8090). Settings: FTOPS_HOME, FTOPS_CUSTOMERS, FTOPS_STORAGE_ROOT,
MLFLOW_TRACKING_URI, FTOPS_AIRFLOW_URL (+ service account, see `ftops.portal.jobs`), FTOPS_KEYS_FILE, and the
ingest limits (FTOPS_DATA_MAX_FILE_BYTES, ..._MAX_RECORDS_PER_FILE, ..._MAX_COMPRESSION_RATIO).
"""

from __future__ import annotations

import collections
import os
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftops.config import load_platform, settings
from ftops.portal import upload as uploads
from ftops.portal.auth import ApiError, Auth
from ftops.portal.files import Files
from ftops.portal.jobs import Airflow, Jobs
from ftops.portal.page import PAGE


class RateLimit:
    """At most `n` uploads per customer in any 60 s (one process; behind several replicas, per replica)."""

    def __init__(self):
        self.hits: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def check(self, customer: str, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            q = self.hits[customer]
            while q and now - q[0] > 60:
                q.popleft()
            if len(q) >= n:
                wait = int(60 - (now - q[0])) + 1
                raise ApiError(
                    429,
                    f"Too many uploads: {n} per minute; retry in {wait} s.",
                    "rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
            q.append(now)


class PlatformCache:
    """The customers file, re-read when it changes (an operator adding a customer needs no restart)."""

    def __init__(self):
        self.path = settings().customers_file
        self.stamp, self.platform = None, None

    def __call__(self):
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.stamp:
            self.platform, self.stamp = load_platform(self.path), stamp
        return self.platform


def _error(status: int, message: str, code: str, param=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "api_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app() -> FastAPI:
    from ftops.data.ingest import Limits

    env = settings()
    app = FastAPI(title="ftops customer API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.platform = PlatformCache()
    auth, files, limiter = Auth(), Files(env.storage_root), RateLimit()
    jobs = Jobs(Airflow(), env.mlflow_uri)
    limits = Limits.from_env()
    spool = env.home / "work" / "portal"
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return _error(exc.status_code, exc.detail, exc.code, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc):
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"Invalid request: {where}: {first.get('msg', '')}", "invalid_request", where or None)

    def customer_config(customer: str):
        return app.state.platform().customers[customer]

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    @app.get("/health")
    def health():
        return {"status": "ok"}

    # --- files ---------------------------------------------------------------------------------------------

    @app.post("/v1/files")
    async def create_file(request: Request):
        caller = auth.caller(request, "files")
        cfg = customer_config(caller.customer)
        limiter.check(caller.customer, cfg.api.uploads_per_minute)
        path = spool / f"{caller.customer}-{uuid.uuid4().hex}.part"
        try:
            up = await uploads.receive(request, path, limits.max_file_bytes, "fine-tune")
            if up.size == 0:
                raise ApiError(400, "The file is empty.", "empty_file", "file")
            return await run_in_threadpool(files.add, caller.customer, up, cfg.data, limits)
        finally:
            path.unlink(missing_ok=True)

    @app.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None):
        caller = auth.caller(request, "files")
        data = [f for f in files.list(caller.customer) if purpose in (None, f["purpose"])]
        if after:
            ids = [f["id"] for f in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        page_, more = data[: max(1, min(limit, 10000))], len(data) > limit
        return {"object": "list", "data": page_, "has_more": more}

    @app.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str):
        return files.get(auth.caller(request, "files").customer, file_id)

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str):
        caller = auth.caller(request, "files")
        return files.delete(caller.customer, file_id, app.state.platform())

    # --- jobs ----------------------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        caller = auth.caller(request, "jobs")
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "The body must be JSON.", "invalid_request") from None
        if not isinstance(body, dict) or not isinstance(body.get("training_file"), str):
            raise ApiError(400, "`training_file` (a file id) is required.", "invalid_request", "training_file")
        cfg = customer_config(caller.customer)
        model = body.get("model")
        if model not in (cfg.base_model, caller.customer):
            raise ApiError(
                400,
                f"Model {str(model)[:80]!r} is not available: use {cfg.base_model!r} (or {caller.customer!r}).",
                "model_not_available",
                "model",
            )
        if body.get("validation_file"):
            raise ApiError(
                400,
                "validation_file is not supported: a held-out share of your data is used.",
                "invalid_request",
                "validation_file",
            )
        f = files.get(caller.customer, body["training_file"])
        if f["status"] != "processed":
            raise ApiError(
                400,
                f"File {f['id']} failed validation ({f['status_details']}): fix it and upload again.",
                "invalid_training_file",
                "training_file",
            )
        method = body.get("method") or {}
        hyper = body.get("hyperparameters") or ((method.get("supervised") or {}).get("hyperparameters") or {})
        if not isinstance(hyper, dict):
            raise ApiError(400, "hyperparameters must be an object.", "invalid_request", "hyperparameters")
        return await run_in_threadpool(jobs.create, caller.customer, cfg, f, model, hyper)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, limit: int = 20, after: str | None = None):
        caller = auth.caller(request, "jobs")
        data = jobs.list(caller.customer, customer_config(caller.customer).base_model, max(1, min(limit, 100)))
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/fine_tuning/jobs/{job}")
    def get_job(request: Request, job: str):
        caller = auth.caller(request, "jobs")
        return jobs.retrieve(caller.customer, customer_config(caller.customer).base_model, job)

    @app.get("/v1/fine_tuning/jobs/{job}/events")
    def job_events(request: Request, job: str, limit: int = 100):
        caller = auth.caller(request, "jobs")
        data = jobs.events(caller.customer, customer_config(caller.customer).base_model, job)
        return {"object": "list", "data": data[: max(1, limit)], "has_more": len(data) > limit}

    @app.get("/v1/fine_tuning/jobs/{job}/checkpoints")
    def job_checkpoints(request: Request, job: str):
        caller = auth.caller(request, "jobs")
        data = jobs.checkpoints(caller.customer, customer_config(caller.customer).base_model, job)
        return {"object": "list", "data": data, "has_more": False}

    @app.post("/v1/fine_tuning/jobs/{job}/cancel")
    def cancel_job(request: Request, job: str):
        caller = auth.caller(request, "jobs")
        return jobs.cancel(caller.customer, customer_config(caller.customer).base_model, job)

    return app


def serve(host: str, port: int) -> None:
    import uvicorn

    # No access log: paths are harmless but the log is where a key would leak if one ever landed in a URL
    uvicorn.run(create_app(), host=host, port=port, access_log=bool(os.environ.get("FTOPS_API_ACCESS_LOG")))
