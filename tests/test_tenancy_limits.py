"""Tenants cannot hurt each other on a shared replica: per-customer limits (429 with OpenAI's rate-limit headers,
honoured by the official `openai` client's retry), fair priorities, prefix-cache salts set server-side (checked
with vLLM's own prefix-cache metrics) and a `/v1/models` without the replica's paths. Against a real vLLM (CPU
build, tiny model) started by scripts/services.sh with the project's middleware and its own customers file."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import openai
import pytest

from conftest import _service
from ftops.config import ServingSettings, load_platform
from ftops.release import keys
from ftops.release.serving_limits import Limiter

RPM, CONC, TOK, SALT_A, SALT_B = "lim-rpm", "lim-conc", "lim-tok", "salt-a", "salt-b"
LIMITS = {
    RPM: {"requests_per_minute": 3},
    CONC: {"max_concurrency": 1},
    TOK: {"tokens_per_minute": 60},
}


def customers_file(path):
    doc = {
        "base_models": {"tiny": {"path": "tiny-llama"}},
        "defaults": {"base_model": "tiny", "allow_base_model": True},  # they call the base model: no adapter
        "customers": [
            {"id": c, "name": c, **({"serving": LIMITS[c]} if c in LIMITS else {})}
            for c in (RPM, CONC, TOK, SALT_A, SALT_B)
        ],
    }
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def server(home, tiny_model, tmp_path_factory):
    path = customers_file(tmp_path_factory.mktemp("limits") / "customers.yaml")
    assert set(load_platform(path).customers) == {RPM, CONC, TOK, SALT_A, SALT_B}  # the typed config accepts it
    for svc in _service("vllm", {"VLLM_MODEL": str(tiny_model), "FTOPS_CUSTOMERS": str(path)}, "VLLM_PORT"):
        admin = {"Authorization": f"Bearer {keys.admin_key()}"}
        base = httpx.get(f"{svc.url}/v1/models", headers=admin, timeout=30).json()["data"][0]["id"]
        yield {"url": svc.url, "base": base, **{c: keys.create(c)[1] for c in (RPM, CONC, TOK, SALT_A, SALT_B)}}


def client(server, customer: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server[customer], max_retries=retries, timeout=120)


def metrics(url: str, name: str, **labels) -> float:
    """Sum of a metric's samples in vLLM's /metrics (admin key) whose labels include `labels`."""
    text = httpx.get(f"{url}/metrics", headers=keys.auth_headers(), timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()):
            total += float(m[2])
    return total


@pytest.mark.e2e
def test_models_list_shows_names_not_paths(server, tiny_model):
    r = httpx.get(f"{server['url']}/v1/models", headers={"Authorization": f"Bearer {server[SALT_A]}"}, timeout=30)
    assert r.status_code == 200
    cards = r.json()["data"]
    assert [m["id"] for m in cards] == [server["base"]] and all("root" not in m and "parent" not in m for m in cards)
    # the model *name* here is the --model path (this replica's choice); nothing beyond it is shown
    assert r.text.count(str(tiny_model)) == 1
    admin = httpx.get(f"{server['url']}/v1/models", headers=keys.auth_headers(), timeout=30).json()["data"]
    assert "root" in admin[0]  # the reconciler (admin key) still reads what is loaded from where


@pytest.mark.e2e
def test_requests_per_minute_429_with_openai_headers(server):
    c = client(server, RPM)
    remaining = []
    for _ in range(3):
        raw = c.completions.with_raw_response.create(model=server["base"], prompt="Hi", max_tokens=2)
        assert raw.parse().choices
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|\d+m\d+s", raw.headers["x-ratelimit-reset-requests"])
        assert int(raw.headers["x-ratelimit-limit-tokens"]) == ServingSettings().tokens_per_minute
    assert remaining == [2, 1, 0]
    before = metrics(server["url"], "ftops_tenant_requests_total", customer=RPM, code="429")
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=server["base"], messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    h = err.value.response.headers
    assert 1 <= int(h["retry-after"]) <= 60 and h["x-ratelimit-remaining-requests"] == "0"
    assert err.value.status_code == 429 and "requests_per_minute" in err.value.message
    assert metrics(server["url"], "ftops_tenant_requests_total", customer=RPM, code="429") == before + 1
    assert metrics(server["url"], "ftops_tenant_errors_total", customer=RPM, reason="rate_limit_requests") >= 1
    # the limit is this customer's: another one is served meanwhile
    assert client(server, SALT_B).completions.create(model=server["base"], prompt="Hi", max_tokens=2).choices


def refusals(server) -> float:
    return metrics(server["url"], "ftops_tenant_errors_total", customer=CONC, reason="rate_limit_concurrency")


def while_long_answer(server, second: openai.OpenAI):
    """A short request from `second` while a long answer holds CONC's only slot: its answer, or its 429.
    The second request follows the long one at once: this CPU build of vLLM reads no new request at all while it
    decodes (measured: a 401 that never reaches vLLM waited 2-3 s, to the end of a 1000-token answer), so a
    request sent later would only be read, and admitted, once the long answer has ended. None when the short one
    still got there first (the long one was refused)."""
    second.models.list()  # a warm connection (the server drops idle ones after 5 s): the request goes out at once
    body = json.dumps({"model": server["base"], "prompt": "Tell me", "max_tokens": 1000, "ignore_eos": True}).encode()
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as long:
        long.sendall(  # a raw request: in the server's socket before the short one
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server[CONC]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            out = second.completions.create(model=server["base"], prompt="Hi", max_tokens=2)
        except openai.RateLimitError as exc:
            out = exc
        answer = b"".join(iter(lambda: long.recv(65536), b""))
        return out if answer.startswith(b"HTTP/1.1 200") else None


@pytest.mark.e2e
def test_concurrency_limit_and_the_openai_clients_retry_honours_it(server):
    # A long answer holds the customer's only slot; a second request meanwhile is refused (a few tries: the
    # short request can still reach the server first).
    for _ in range(5):
        before = refusals(server)
        if isinstance(err := while_long_answer(server, client(server, CONC)), openai.RateLimitError):
            break
    assert isinstance(err, openai.RateLimitError) and refusals(server) == before + 1
    assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
    assert "max_concurrency" in err.message
    # with retries on, the official client waits `retry-after` and gets through once the slot is free
    for _ in range(5):
        before, t0 = refusals(server), time.monotonic()
        answer = while_long_answer(server, client(server, CONC, retries=8))
        if answer is not None and refusals(server) > before:
            break
    assert refusals(server) > before, "the long answer never held the slot"
    assert answer.choices
    assert time.monotonic() - t0 >= 0.9  # it did wait at least one retry-after


@pytest.mark.e2e
def test_tokens_per_minute_counted_from_streamed_usage(server):
    c = client(server, TOK)
    stream = c.chat.completions.create(
        model=server["base"],
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream)  # no usage asked: none delivered
    with pytest.raises(openai.RateLimitError) as err:  # yet the 64+ tokens it was served count
        c.completions.create(model=server["base"], prompt="Hi", max_tokens=2)
    h = err.value.response.headers
    assert h["x-ratelimit-remaining-tokens"] == "0" and h["x-ratelimit-limit-tokens"] == "60"
    assert 1 <= int(h["retry-after"]) <= 60 and "tokens_per_minute" in err.value.message


@pytest.mark.e2e
def test_prefix_cache_salted_per_customer(server):
    """Same customer repeating a long prefix hits vLLM's prefix cache; another customer with the same prefix,
    even sending the same caller-chosen salt, misses (vLLM's own counters)."""
    url, base = server["url"], server["base"]
    prefix = " ".join(f"Clause {i}: the tenant shall keep the premises in good repair." for i in range(12))
    n = len(
        httpx.post(f"{url}/tokenize", json={"model": base, "prompt": prefix}, headers=keys.auth_headers()).json()[
            "tokens"
        ]
    )
    assert 256 <= n <= 900, n  # at least two KV blocks of 128 (the CPU build's block size)

    def send(customer: str, salt: str | None = None) -> float:
        before = metrics(url, "vllm:prefix_cache_hits_total")
        extra = {"cache_salt": salt} if salt else {}
        client(server, customer).completions.create(model=base, prompt=prefix, max_tokens=1, extra_body=extra)
        return metrics(url, "vllm:prefix_cache_hits_total") - before

    assert send(SALT_A) == 0  # first time: nothing cached
    assert send(SALT_A) >= 128  # the same customer again: whole blocks hit
    assert send(SALT_B) == 0  # another customer, same prefix: a miss (no timing side channel)
    assert send(SALT_B, salt="chosen") >= 128  # a caller's salt is replaced by the customer's own
    prefix = " ".join(f"Article {i}: the supplier shall deliver the goods on time." for i in range(12))
    assert send(SALT_A, salt="shared") == 0
    assert send(SALT_B, salt="shared") == 0  # the same caller salt does not let B share A's cache


def test_fair_priority_puts_the_customer_over_its_share_behind():
    """The priority rule itself (no engine): a customer holding most slots lately is served after one under
    its share; a customer alone is never pushed back; weights scale the share."""
    lim, limits, now = Limiter(), ServingSettings(max_concurrency=100), 1000.0
    for _ in range(16):
        assert lim.admit("a", limits, now).admitted
    assert lim.priority("a", {}, now + 5) == 0  # alone: its share is everything
    lim.admit("b", limits, now)
    lim.admit("b", limits, now)
    assert lim.priority("a", {}, now + 5) > 0 and lim.priority("b", {}, now + 5) == 0
    assert lim.priority("a", {"a": 16}, now + 5) == 0  # a weight of 16: its share covers it
    decision = lim.admit("a", limits, now + 5, fair=True)
    assert decision.admitted and decision.priority > 0
