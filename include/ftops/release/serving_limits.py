"""Per-customer limits and fair priority on one vLLM replica (used by ftops.release.serving_auth).

Owns, per customer and in this process only: requests in flight, the requests and tokens of the last 60 s
(sliding windows), the decision to admit or refuse (429) with the `x-ratelimit-*` headers OpenAI sends, and the
scheduling priority from recent usage against a fair share (vLLM's `--scheduling-policy priority`: lower first).

Limits are per replica: nothing is shared between replicas (README, tenant isolation: how they combine).
Recent usage is the customer's occupancy, requests in flight integrated over time with an exponential decay
(TAU seconds), i.e. how many of the replica's slots it held lately, plus the requests it holds right now. Its
fair share is the mean usage of the customers active lately, scaled by `serving.weight`. At or under its share
a request gets priority 0; over it, a priority growing with how far over, so it waits behind those under their
share whenever the engine has a queue, and runs at once when it has not (nothing is refused for fairness).
Standard library only: it runs inside vLLM's API server on every request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0
TAU_S = 10.0  # how far back "recent usage" looks (decay time constant)
MAX_PRIORITY = 100
ACTIVE = 0.05 * TAU_S  # occupancy under this (a twentieth of a slot lately) is not "active"


@dataclass
class Tenant:
    in_flight: int = 0
    starts: deque = field(default_factory=deque)  # monotonic start times in the window
    tokens: deque = field(default_factory=deque)  # (time, tokens) reported in the window
    token_sum: int = 0
    occupancy: float = 0.0  # decayed slot-seconds
    stamp: float = 0.0

    def decay(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0:
            f = math.exp(-dt / TAU_S)
            self.occupancy = self.occupancy * f + self.in_flight * TAU_S * (1 - f)
            self.stamp = now

    def trim(self, now: float) -> None:
        edge = now - WINDOW_S
        while self.starts and self.starts[0] <= edge:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.token_sum -= self.tokens.popleft()[1]


@dataclass(frozen=True)
class Decision:
    admitted: bool
    headers: list  # [(bytes, bytes)] for the answer, admitted or not
    reason: str = ""  # when refused: concurrency | requests | tokens
    retry_after_s: float = 0.0
    priority: int = 0


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s"


class Limiter:
    """One per middleware instance (one per API-server process)."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}

    def _tenant(self, customer: str, now: float) -> Tenant:
        t = self.tenants.get(customer)
        if t is None:
            t = self.tenants[customer] = Tenant(stamp=now)
        t.trim(now)
        t.decay(now)
        return t

    def admit(self, customer: str, limits, now: float, weights: dict | None = None, fair: bool = False) -> Decision:
        """Admit a request (counted in flight until `done`) or refuse it; `limits` is a ServingSettings."""
        t = self._tenant(customer, now)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        reason, retry = "", 0.0
        if t.in_flight >= limits.max_concurrency:
            reason, retry = "concurrency", 1.0  # a slot frees when one of its answers ends: unknown when
        elif len(t.starts) >= rpm:
            reason, retry = "requests", t.starts[len(t.starts) - rpm] + WINDOW_S - now
        elif t.token_sum >= tpm:
            reason, retry = "tokens", self._token_reset(t, tpm, now)
        else:
            t.in_flight += 1
            t.starts.append(now)
        headers = self._headers(t, limits, now)
        if reason:
            retry = max(retry, 0.001)
            headers += [
                (b"retry-after", str(math.ceil(retry)).encode()),
                (b"retry-after-ms", str(math.ceil(retry * 1000)).encode()),
            ]
            return Decision(False, headers, reason, retry)
        return Decision(True, headers, priority=self.priority(customer, weights or {}, now) if fair else 0)

    def done(self, customer: str, tokens: int, now: float) -> None:
        t = self._tenant(customer, now)
        t.in_flight = max(0, t.in_flight - 1)
        if tokens > 0:
            t.tokens.append((now, tokens))
            t.token_sum += tokens

    def priority(self, customer: str, weights: dict, now: float) -> int:
        """0 at or under the customer's fair share of recent occupancy; 1..MAX_PRIORITY over it."""
        own = self._tenant(customer, now)
        load, weight = 0.0, 0.0
        for name, t in self.tenants.items():
            if t is not own:
                t.decay(now)
            if t.in_flight or t.occupancy > ACTIVE:
                load += self._usage(t)
                weight += weights.get(name, 1.0)
        if load <= 0 or weight <= 0:
            return 0
        share = load / weight * weights.get(customer, 1.0)
        ratio = self._usage(own) / share
        return 0 if ratio <= 1 else min(MAX_PRIORITY, 1 + int(10 * (ratio - 1)))

    @staticmethod
    def _usage(t: Tenant) -> float:
        """Recent slot-seconds plus what it holds now (as if held for TAU): a burst counts from its first
        request, not only once it has lasted; a steady customer is not taken for the heavy one at a burst's start."""
        return t.occupancy + t.in_flight * TAU_S

    @staticmethod
    def _token_reset(t: Tenant, tpm: int, now: float) -> float:
        excess = t.token_sum - tpm
        for when, n in t.tokens:  # the window drops its oldest reports first
            excess -= n
            if excess < 0:
                return when + WINDOW_S - now
        return WINDOW_S

    def _headers(self, t: Tenant, limits, now: float) -> list:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        # OpenAI's reset: until the limit is back to its initial state (the window's newest entry expires)
        reset_requests = t.starts[-1] + WINDOW_S - now if t.starts else 0.0
        reset_tokens = t.tokens[-1][0] + WINDOW_S - now if t.tokens else 0.0
        values = {
            "limit-requests": rpm,
            "remaining-requests": max(0, rpm - len(t.starts)),
            "reset-requests": duration(reset_requests),
            "limit-tokens": tpm,
            "remaining-tokens": max(0, tpm - t.token_sum),
            "reset-tokens": duration(reset_tokens),
        }
        return [(b"x-ratelimit-" + k.encode(), str(v).encode()) for k, v in values.items()]
