"""Who is calling: a customer key from the one key store (`ftops.release.keys`) and the scope a route needs.

401 without a valid key, 403 with a key lacking the route's scope or whose customer is no longer in the
customers file (as the vLLM middleware refuses it). The admin key opens nothing here: this door is the
customers'. Errors are OpenAI-shaped (`{"error": {"message", "type", "code"}}`), so the official client raises
its usual exceptions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import HTTPException, Request

from ftops.release import keys


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers=None):
        super().__init__(status, message, headers=headers)
        self.code, self.param = code, param


@dataclass(frozen=True)
class Caller:
    customer: str
    scopes: tuple[str, ...]


class Auth:
    def __init__(self):
        self.verifier = keys.Verifier(scope=None)

    def caller(self, request: Request, scope: str) -> Caller:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        found = self.verifier.lookup(token, time.monotonic()) if token else None
        if found is None:
            raise ApiError(
                401, "Incorrect or missing API key.", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        customer, scopes = found
        platform = request.app.state.platform()
        if customer not in platform.customers:
            raise ApiError(403, "This key's customer is not enabled.", "customer_not_enabled")
        if scope not in scopes:
            raise ApiError(403, f"This key does not have the `{scope}` scope.", "insufficient_scope")
        return Caller(customer, scopes)
