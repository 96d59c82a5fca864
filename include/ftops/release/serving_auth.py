"""Tenant isolation inside vLLM: an ASGI middleware loaded with `--middleware ftops.release.serving_auth.TenantAuth`.

vLLM's own `--api-key` maps no key to a model and leaves `/invocations` open, so this replaces it:

- every request but health (`/health`, `/ping`, `/version`) needs `Authorization: Bearer <key>`: 401 without
  a valid one. Keys come from `ftops.release.keys` (hashes only, reloaded within seconds of a change);
- a customer key may call the model routes (`MODEL_ROUTES`: completions, chat, responses, embeddings,
  tokenize, `/invocations`, ...) only with `model` equal to its customer id, or the base model when the
  customer's `allow_base_model` says so; anything else is 403. `/v1/models` lists only what it may call;
- everything else (runtime LoRA load/unload, sleep, cache resets, profiling, RPC, `/metrics`, the docs, any
  route added by a later vLLM) is admin-only: default deny, so a new route is never open by accident;
- headers that would override that check or the scheduler (SageMaker's `X-Amzn-SageMaker-Adapter-Identifier`,
  which replaces the body's `model` on `/invocations`, its session headers, `X-Vllm-Priority`) are admin-only;
- a `model` that is not the base model and not a plain name (path separators, `..`) is refused for every
  caller (404) before vLLM's filesystem resolver could join it into a path;
- the body vLLM reads is the one that was checked (re-serialised), so a duplicated `model` key cannot make
  this check and vLLM's parser disagree;
- per-customer limits from the customers file (`serving.max_concurrency`, `requests_per_minute`,
  `tokens_per_minute`, ftops.config.ServingSettings; per replica): over one, 429 with `retry-after` and OpenAI's
  `x-ratelimit-*` headers (sent on every customer answer), counted in `ftops_tenant_errors{reason="rate_limit_*"}`;
  tokens from the usage vLLM reports, streams included (ftops.release.serving_limits);
- fair scheduling: under `--scheduling-policy priority` each customer request's `priority` is set from its
  customer's recent usage against its fair share (a caller's own `priority` is never passed on);
- prefix-cache isolation: `cache_salt` on every customer request of a route that takes it, an HMAC of the
  customer id under a key derived from the admin secret, replacing any salt the caller sent;
- `/v1/models` shows a customer its model names only (no `root`/`parent`: the replica's paths);
- per-customer Prometheus metrics (`ftops_tenant_*`) in the default registry, so vLLM's own `/metrics`
  serves them next to its engine metrics. Streamed answers are counted too: the middleware asks vLLM for
  the usage chunk and removes it from the stream when the client did not ask for it.

Keys and bodies are never logged. Imports only what the vLLM venv has
(starlette, prometheus_client, yaml, pydantic for ftops.config).
Settings (environment): FTOPS_HOME / FTOPS_KEYS_FILE (key store), FTOPS_SERVING_ADMIN_KEY or
$FTOPS_HOME/secrets/serving_admin_key (required: without it vLLM does not start), FTOPS_SERVING_BASE_MODEL
(vLLM's base model name, i.e. its `--model`), FTOPS_CUSTOMERS (who may call the base model, the limits; a key
of a customer no longer in the file is refused; re-read within 5 s of a change).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from pathlib import Path

from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers

from ftops.release import keys
from ftops.release.serving_limits import Limiter

log = logging.getLogger("ftops.release.serving_auth")

OPEN = {"/health", "/ping", "/version"}
# POST routes whose JSON body names the model: a customer key may call them for its own model.
MODEL_ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/batch",
    "/v1/systemone",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
}
LIST_ROUTE = "/v1/models"
ADMIN_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics"}  # labelled by name in metrics
USAGE_STREAMS = {"/v1/completions", "/v1/chat/completions"}  # streams where `stream_options.include_usage` exists
# Routes whose request accepts `cache_salt` (mixed into the first KV block's hash): set for every customer.
SALT_ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/batch",
    "/v1/responses",
    "/v1/messages",
    "/invocations",
}
# Routes whose request has vLLM's `priority` (a customer's own value is replaced, never passed on).
PRIORITY_ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/batch",
    "/v1/responses",
    "/invocations",
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
}
# What a customer sees of a model card: no `root`/`parent` (the replica's file paths), no permission objects.
MODEL_CARD_FIELDS = ("id", "object", "created", "owned_by", "max_model_len")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_BODY = int(os.environ.get("FTOPS_SERVING_MAX_BODY_BYTES", 64 * 1024 * 1024))
ANONYMOUS = "_anonymous"
# Headers vLLM acts on that a customer key may not send: SageMaker's adapter header replaces the body's `model`
# after this check (`/invocations`), its session headers and the scheduling priority are the admin's.
ADMIN_HEADERS = (b"x-amzn-sagemaker-", b"x-vllm-priority", b"x-data-parallel-rank")

REQUESTS = Counter(
    "ftops_tenant_requests", "Requests per customer, route and HTTP status", ["customer", "route", "code"]
)
PROMPT_TOKENS = Counter("ftops_tenant_prompt_tokens", "Prompt tokens served per customer", ["customer"])
COMPLETION_TOKENS = Counter("ftops_tenant_completion_tokens", "Completion tokens served per customer", ["customer"])
RATE_LIMIT_TEXT = {
    "concurrency": "serving.max_concurrency requests in flight",
    "requests": "serving.requests_per_minute",
    "tokens": "serving.tokens_per_minute",
}
ERRORS = Counter("ftops_tenant_errors", "Refused or failed requests per customer and reason", ["customer", "reason"])
LATENCY = Histogram(
    "ftops_tenant_request_seconds",
    "Time to the last byte of the answer per customer and route",
    ["customer", "route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class CustomerPolicy:
    """Who is a customer and who may call the base model, from the customers file (re-read when it changes)."""

    def __init__(self, path: Path | None, recheck_s: float = 5.0):
        self.path, self.recheck_s = path, recheck_s
        self._stamp, self._checked = None, 0.0
        self.known: set[str] = set()
        self.base_allowed: set[str] = set()
        self.limits: dict = {}  # customer -> ftops.config.ServingSettings
        self.weights: dict[str, float] = {}
        from ftops.config import PlatformServing

        self.platform = PlatformServing()

    def refresh(self, now: float) -> None:
        if self.path is None or now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            import yaml

            doc = yaml.safe_load(self.path.read_text()) or {}
            default = bool((doc.get("defaults") or {}).get("allow_base_model", False))
            entries = [c for c in doc.get("customers") or [] if isinstance(c, dict) and isinstance(c.get("id"), str)]
        except (OSError, ValueError, AttributeError) as exc:
            # Fail closed: an unreadable file admits no customer key (the admin key still works).
            log.error("customers file %s unreadable (%s): customer keys refused until it is fixed", self.path, exc)
            self.known, self.base_allowed, self._stamp = set(), set(), None
            return
        except Exception as exc:  # yaml.YAMLError, without importing yaml at module level
            log.error("customers file %s invalid (%s): customer keys refused until it is fixed", self.path, exc)
            self.known, self.base_allowed, self._stamp = set(), set(), None
            return
        self.known = {c["id"] for c in entries}
        self.base_allowed = {c["id"] for c in entries if bool(c.get("allow_base_model", default))}
        self._read_serving(doc, entries)
        self._stamp = stamp

    def _read_serving(self, doc: dict, entries: list[dict]) -> None:
        """Each customer's `serving` limits (defaults merged), validated by the same model as everywhere else.
        An invalid section keeps what was in force for that customer (or the defaults): never no limit."""
        from pydantic import ValidationError

        from ftops.config import PlatformServing, ServingSettings

        defaults = (doc.get("defaults") or {}).get("serving") or {}
        limits = {}
        for c in entries:
            own = c.get("serving") or {}
            try:
                limits[c["id"]] = ServingSettings.model_validate(
                    {**defaults, **own} if isinstance(defaults, dict) and isinstance(own, dict) else own
                )
            except ValidationError as exc:
                log.error("customer %s: invalid serving limits (%s): previous limits kept", c["id"], exc)
                limits[c["id"]] = self.limits.get(c["id"], ServingSettings())
        self.limits = limits
        self.weights = {k: v.weight for k, v in limits.items()}
        try:
            self.platform = PlatformServing.model_validate(doc.get("serving") or {})
        except ValidationError as exc:
            log.error("customers file: invalid top-level serving (%s): previous settings kept", exc)

    def limits_of(self, customer: str):
        from ftops.config import ServingSettings

        return self.limits.get(customer) or ServingSettings()


def _json_response(status: int, message: str, extra_headers: list | None = None) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": "ftops_auth", "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


def _usage(obj) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI-style `usage` (chat/completions) or a Responses API one."""
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict) and isinstance(obj.get("response"), dict):  # responses stream: response.completed
        u = obj["response"].get("usage")
    if not isinstance(u, dict):
        return None
    p = u.get("prompt_tokens", u.get("input_tokens"))
    c = u.get("completion_tokens", u.get("output_tokens"))
    return (int(p or 0), int(c or 0)) if p is not None or c is not None else None


class TenantAuth:
    """The ASGI middleware (vLLM adds it with `app.add_middleware(TenantAuth)`, no arguments)."""

    def __init__(self, app):
        self.app = app
        admin = keys.admin_key()
        if not admin:
            raise RuntimeError(
                "no serving admin key: set FTOPS_SERVING_ADMIN_KEY or create $FTOPS_HOME/secrets/serving_admin_key "
                "(scripts/services.sh does); refusing to serve without one"
            )
        self.admin_digest = keys.digest(admin)
        self.verifier = keys.Verifier()
        self.base_model = os.environ.get("FTOPS_SERVING_BASE_MODEL", "")
        customers = os.environ.get("FTOPS_CUSTOMERS")
        self.policy = CustomerPolicy(Path(customers) if customers else None)
        self.limiter = Limiter()
        # Prefix-cache salts: HMAC of the customer id under a key derived from the replica's admin secret, so
        # every API-server process of the replica (and a restart) gives a customer the same salt, and no
        # caller can compute or choose another customer's.
        self._salt_key = hmac.digest(admin.encode(), b"ftops-cache-salt", "sha256")
        self._salts: dict[str, str] = {}
        self._priority_policy: bool | None = None
        log.info("tenant isolation on: key store %s, base model %r", self.verifier.path, self.base_model)

    # -- who is calling --------------------------------------------------------------------------------------
    def caller(self, headers: Headers, now: float) -> str | None:
        """keys.ADMIN, a customer id, or None (no valid key)."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if hmac.compare_digest(keys.digest(token), self.admin_digest):
            return keys.ADMIN
        customer = self.verifier.customer(token, now)
        if customer is None:
            return None
        self.policy.refresh(now)
        if self.policy.path is not None and customer not in self.policy.known:
            return None  # a removed customer's keys stop working with it
        return customer

    def allowed_models(self, customer: str) -> set[str]:
        allowed = {customer}
        if self.base_model and customer in self.policy.base_allowed:
            allowed.add(self.base_model)
        return allowed

    def salt(self, customer: str) -> str:
        salt = self._salts.get(customer)
        if salt is None:
            salt = self._salts[customer] = hmac.new(self._salt_key, customer.encode(), "sha256").hexdigest()
        return salt

    def _fair(self, scope) -> bool:
        """Fair priorities on: the customers file says so and vLLM schedules by priority (under FCFS any
        priority but 0 is an error, so the engine's own setting decides, read once from the app's state)."""
        if self._priority_policy is None:
            config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            if config is None:
                return False
            self._priority_policy = str(getattr(config.scheduler_config, "policy", "")).endswith("priority")
            log.info("vLLM scheduling policy priority: %s", self._priority_policy)
        return self._priority_policy and self.policy.platform.fair_scheduling

    # -- ASGI ------------------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if self.caller(Headers(scope=scope), time.monotonic()) != keys.ADMIN:
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope["method"]
        headers = Headers(scope=scope)
        if path in OPEN and method in ("GET", "HEAD", "POST"):
            return await self.app(scope, receive, send)
        if method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
            return await self.app(scope, receive, send)  # CORS preflight: answered by vLLM's CORS middleware
        started = time.monotonic()
        route = path if (path in MODEL_ROUTES or path in ADMIN_ROUTES or path == LIST_ROUTE) else "other"
        who = self.caller(headers, started)

        async def refuse(status: int, reason: str, message: str, customer: str | None = who, headers=None) -> None:
            label = customer or ANONYMOUS
            ERRORS.labels(label, reason).inc()
            REQUESTS.labels(label, route, str(status)).inc()
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else headers
            for message_ in _json_response(status, message, extra):
                await send(message_)

        if who is None:
            return await refuse(401, "unauthorized", "a valid API key is required (Authorization: Bearer ...)")
        if who != keys.ADMIN and any(k.lower().startswith(ADMIN_HEADERS) for k, _ in scope["headers"]):
            return await refuse(
                403, "admin_header", "X-Amzn-SageMaker-*, X-Vllm-Priority and X-data-parallel-rank need the admin key"
            )

        if path == LIST_ROUTE and method == "GET":
            return await self._models(scope, receive, send, who, started)
        if path in MODEL_ROUTES and method == "POST":
            body = await self._read_body(receive)
            if body is None:
                return await refuse(413, "too_large", "request body too large")
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                return await refuse(400, "bad_request", "the body must be a JSON object")
            model = doc.get("model") or self.base_model  # vLLM answers a request without `model` with the base
            if not isinstance(model, str) or (model != self.base_model and (not NAME.match(model) or ".." in model)):
                return await refuse(404, "invalid_model", "no such model")
            if who != keys.ADMIN:
                if model not in self.allowed_models(who):
                    return await refuse(403, "forbidden_model", f"this key may call only the model {who!r}")
                if doc.get("previous_response_id"):
                    # vLLM's response store is shared by every tenant: never chain onto a stored response.
                    return await refuse(403, "forbidden", "previous_response_id is not available to customer keys")
            limited = None
            if who != keys.ADMIN:
                limited = self.limiter.admit(
                    who, self.policy.limits_of(who), started, self.policy.weights, fair=self._fair(scope)
                )
                if not limited.admitted:
                    return await refuse(
                        429,
                        f"rate_limit_{limited.reason}",
                        f"rate limit reached ({RATE_LIMIT_TEXT[limited.reason]}); retry after "
                        f"{limited.retry_after_s:.1f} s",
                        headers=limited.headers,
                    )
                doc.pop("priority", None)  # the scheduler's order is the platform's, not the caller's
                if path in PRIORITY_ROUTES and self._fair(scope):
                    doc["priority"] = limited.priority
                if path in SALT_ROUTES:
                    doc["cache_salt"] = self.salt(who)  # replaces any caller salt: no choosing another's
            strip_usage = False
            if doc.get("stream") is True and path in USAGE_STREAMS:
                opts = doc.get("stream_options") if isinstance(doc.get("stream_options"), dict) else {}
                if not opts.get("include_usage"):
                    doc["stream_options"] = {**opts, "include_usage": True}
                    strip_usage = True
            forwarded = json.dumps(doc).encode()
            return await self._forward(scope, forwarded, receive, send, who, route, started, strip_usage, limited)
        if who != keys.ADMIN:
            return await refuse(403, "admin_only", "this route needs the serving admin key")
        return await self._passthrough(scope, receive, send, who, route, started)

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _passthrough(self, scope, receive, send, who, route, started):
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self._record(who, route, status, started)

    async def _models(self, scope, receive, send, who, started):
        """`/v1/models`, filtered to what a customer key may call (the whole list for the admin)."""
        if who == keys.ADMIN:
            return await self._passthrough(scope, receive, send, who, LIST_ROUTE, started)
        start, chunks = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        status = start["status"] if start else 500
        body = b"".join(chunks)
        if status == 200:
            doc = json.loads(body)
            allowed = self.allowed_models(who)
            doc["data"] = [
                {k: m[k] for k in MODEL_CARD_FIELDS if k in m} for m in doc.get("data", []) if m.get("id") in allowed
            ]
            body = json.dumps(doc).encode()
        headers = [(k, v) for k, v in (start["headers"] if start else []) if k.lower() != b"content-length"]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self._record(who, LIST_ROUTE, status, started)

    async def _forward(self, scope, body, receive, send, who, route, started, strip_usage, limited=None):
        """Call vLLM with the checked body; count status, tokens and latency from its answer as it streams.
        `limited`: the limiter's admission (customers): its headers go on the answer, its slot is freed at the end
        and the reported tokens charged to the customer's window."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, which vLLM watches to abort

        status, sse, buf, kept, usage = 500, False, b"", [], None

        def take_usage(raw: bytes) -> None:
            nonlocal usage
            try:
                found = _usage(json.loads(raw))
            except ValueError:
                return
            if found is not None:
                usage = found

        async def watching_send(message):
            nonlocal status, sse, buf
            if message["type"] == "http.response.start":
                status = message["status"]
                ctype = Headers(raw=message.get("headers", [])).get("content-type", "")
                sse = ctype.startswith("text/event-stream")
                if limited is not None:
                    message = dict(message, headers=[*message.get("headers", []), *limited.headers])
                return await send(message)
            if message["type"] != "http.response.body":
                return await send(message)
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if not sse:
                kept.append(chunk)
                return await send(message)
            # Server-sent events: forward whole events; read usage from them and drop the usage-only chunk
            # that was asked for on the client's behalf (a client iterating `chunk.choices[0]` would break).
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            if not more and buf:
                events, buf = [*events, buf], b""
            out = []
            for event in events:
                if event.startswith(b"data: {") and b'"usage"' in event:
                    data = event[6:]
                    take_usage(data)
                    if strip_usage and b'"choices":[]' in data.replace(b" ", b""):
                        continue
                out.append(event + b"\n\n")
            if out or not more:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

        try:
            await self.app(scope, replay, watching_send)
        finally:
            if not sse and kept and status == 200:
                take_usage(b"".join(kept))
            if usage:
                PROMPT_TOKENS.labels(who).inc(usage[0])
                COMPLETION_TOKENS.labels(who).inc(usage[1])
            if limited is not None:
                self.limiter.done(who, sum(usage) if usage else 0, time.monotonic())
            self._record(who, route, status, started)

    def _record(self, who: str, route: str, status: int, started: float) -> None:
        REQUESTS.labels(who, route, str(status)).inc()
        LATENCY.labels(who, route).observe(time.monotonic() - started)
        if status >= 400:
            ERRORS.labels(who, "upstream_5xx" if status >= 500 else "upstream_4xx").inc()
