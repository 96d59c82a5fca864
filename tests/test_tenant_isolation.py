"""Tenant isolation at serving, as a customer meets it: the official `openai` client against the real vLLM
(CPU build, tiny model) started by scripts/services.sh with the project's middleware (ftops.release.serving_auth).
Keys are made and revoked with the `ftops keys` command, as an operator would."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from conftest import ROOT
from ftops.release.keys import admin_key, admin_key_path, store_path
from ftops.release.serving import Replica

pytestmark = pytest.mark.e2e
OWN, OTHER = "brightdesk", "sterling-law"  # tests/data/customers.yaml: sterling-law has allow_base_model
MSG = [{"role": "user", "content": "How do I fix a failed export?"}]


def random_adapter(base: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA adapter with random weights in PEFT's layout (serving does not care what it learned)."""
    cfg = json.loads((base / "config.json").read_text())
    h = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for module, d_out in (("q_proj", h), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.2, (r, h)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.2, (d_out, r)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def ftops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "ftops"), *args], capture_output=True, text=True, timeout=60)


def new_key(customer: str) -> dict:
    r = ftops("keys", "create", customer, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def served(vllm_server, tiny_model, tmp_path_factory):
    """Both test customers' adapters loaded (through Replica: the admin key), and a key for each."""
    tmp = tmp_path_factory.mktemp("isolation")
    replica = Replica(vllm_server.url)
    for seed, customer in enumerate((OWN, OTHER)):
        replica.load(customer, str(random_adapter(tiny_model, tmp / customer, seed)), inplace=True)
    return {"url": vllm_server.url, "base": replica.base_model(), OWN: new_key(OWN), OTHER: new_key(OTHER)}


def client(served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=key, max_retries=0, timeout=60)


def metric(url: str, name: str, **labels) -> float:
    """One sample of vLLM's /metrics (admin key), 0 when absent."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key()}"}, timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m[1].split(","))) == want:
            return float(m[2])
    return 0.0


def test_own_adapter_plain_and_streaming_counted_per_customer(served):
    c = client(served, served[OWN]["key"])
    before = {
        k: metric(served["url"], f"ftops_tenant_{k}_tokens_total", customer=OWN) for k in ("prompt", "completion")
    }
    answer = c.chat.completions.create(model=OWN, messages=MSG, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model=OWN, messages=MSG, max_tokens=8, temperature=0, stream=True))
    # Every chunk a client iterates has a choice: the usage chunk the middleware asked for is not passed on.
    assert all(ch.choices for ch in chunks) and "".join(ch.choices[0].delta.content or "" for ch in chunks)
    asked = list(
        c.completions.create(
            model=OWN, prompt="Hello", max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert asked[-1].usage.completion_tokens == 5 and asked[-1].choices == []  # asked for: still delivered
    after = {k: metric(served["url"], f"ftops_tenant_{k}_tokens_total", customer=OWN) for k in ("prompt", "completion")}
    # streamed answers counted as well: 8 + 8 + 5 tokens generated, the prompts counted each time
    assert after["completion"] - before["completion"] == 8 + 8 + 5
    assert after["prompt"] - before["prompt"] == 2 * answer.usage.prompt_tokens + asked[-1].usage.prompt_tokens
    assert (
        metric(served["url"], "ftops_tenant_requests_total", customer=OWN, route="/v1/chat/completions", code=200) >= 2
    )
    assert metric(served["url"], "ftops_tenant_request_seconds_count", customer=OWN, route="/v1/completions") >= 1


def test_models_list_filtered_to_the_callers_model(served):
    assert [m.id for m in client(served, served[OWN]["key"]).models.list()] == [OWN]
    # allow_base_model: true for sterling-law in the test customers file
    assert sorted(m.id for m in client(served, served[OTHER]["key"]).models.list()) == sorted([OTHER, served["base"]])
    everything = {m["id"] for m in Replica(served["url"]).models()}
    assert {OWN, OTHER, served["base"]} <= everything  # the admin sees every model


# Every other route whose body names a model (README: Tenant isolation): a body any of them can read.
MORE_MODEL_ROUTES = [
    "/v1/chat/completions/batch",
    "/v1/messages/count_tokens",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/systemone",
]


def any_body(model: str) -> dict:
    return {
        "model": model,
        "prompt": "Hi",
        "input": "Hi",
        "messages": MSG,
        "max_tokens": 2,
        "text_1": "a",
        "text_2": "b",
        "query": "q",
        "documents": ["d"],
    }


def test_other_customers_and_base_model_refused(served):
    errors_before = metric(served["url"], "ftops_tenant_errors_total", customer=OWN, reason="forbidden_model")
    refused = 0  # requests that must each add one `forbidden_model` error to the customer's counter
    c = client(served, served[OWN]["key"])
    for model in (OTHER, served["base"]):
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model=model, messages=MSG, max_tokens=4)
        with pytest.raises(openai.PermissionDeniedError):
            c.completions.create(model=model, prompt="Hi", max_tokens=4, stream=True)
        with pytest.raises(openai.PermissionDeniedError):
            c.responses.create(model=model, input="Hi", max_output_tokens=4)
        refused += 3
    # allowed for a customer whose setting says so: a real completion of the base model
    base_answer = client(served, served[OTHER]["key"]).completions.create(
        model=served["base"], prompt="Hi", max_tokens=4
    )
    assert base_answer.model == served["base"] and base_answer.usage.completion_tokens >= 1
    key = {"Authorization": f"Bearer {served[OWN]['key']}"}
    with httpx.Client(base_url=served["url"], headers=key, timeout=60) as http:
        for path, body in [
            ("/tokenize", {"model": OTHER, "prompt": "Hi"}),
            ("/detokenize", {"model": OTHER, "tokens": [5, 6]}),
            ("/invocations", {"model": OTHER, "prompt": "Hi", "max_tokens": 4}),
            ("/v1/embeddings", {"model": OTHER, "input": "Hi"}),
            ("/v1/messages", {"model": OTHER, "max_tokens": 4, "messages": MSG}),
            ("/tokenize", {"prompt": "Hi"}),  # no model: vLLM would use the base model
            *((path, any_body(OTHER)) for path in MORE_MODEL_ROUTES),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 403 and r.json()["error"]["type"] == "ftops_auth", (path, r.text)
            refused += 1
        # the same routes with the caller's own model pass the middleware: whatever vLLM answers, not a refusal
        for path in MORE_MODEL_ROUTES:
            r = http.post(path, json=any_body(OWN))
            assert r.status_code not in (401, 403) and "ftops_auth" not in r.text, (path, r.status_code, r.text)
        # SageMaker's adapter header would replace the body's `model` after the check: refused to customers
        sagemaker = {"X-Amzn-SageMaker-Adapter-Identifier": OTHER}
        assert http.post("/invocations", json={"model": OWN, "prompt": "Hi"}, headers=sagemaker).status_code == 403
        # own model through the same routes works
        assert http.post("/tokenize", json={"model": OWN, "prompt": "Hi"}).status_code == 200
        assert http.post("/invocations", json={"model": OWN, "prompt": "Hi", "max_tokens": 4}).status_code == 200
        # a duplicated `model` key: vLLM receives the body that was checked, so the last one cannot slip through
        smuggled = b'{"model": "brightdesk", "prompt": "Hi", "max_tokens": 4, "model": "sterling-law"}'
        assert (
            http.post("/v1/completions", content=smuggled, headers={"content-type": "application/json"}).status_code
            == 403
        )
        refused += 1
    # per-customer error counters on the live server: each refusal above counted once, with its reason
    errors_after = metric(served["url"], "ftops_tenant_errors_total", customer=OWN, reason="forbidden_model")
    assert errors_after - errors_before == refused
    assert metric(served["url"], "ftops_tenant_errors_total", customer=OWN, reason="admin_header") >= 1


def test_missing_wrong_and_revoked_keys(served):
    with pytest.raises(openai.AuthenticationError):
        client(served, "ftk_0000000000000000_" + "x" * 43).chat.completions.create(
            model=OWN, messages=MSG, max_tokens=4
        )
    with pytest.raises(openai.AuthenticationError):
        client(served, served[OWN]["key"][:-1] + "A").models.list()
    with httpx.Client(base_url=served["url"], timeout=30) as http:
        assert http.get("/health").status_code == 200  # health stays open for load balancers
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/invocations"),
            ("GET", "/metrics"),
        ]:
            assert http.request(method, path, json={"model": OWN, "prompt": "Hi"}).status_code == 401, path
        assert http.get("/v1/models", headers={"Authorization": "Basic " + served[OWN]["key"]}).status_code == 401
    # A key made now works without a restart; revoked, it is refused within the store's re-check interval
    # (keys.Verifier: an unknown key re-reads the store at most 4 times a second, every key every 2 s). The README
    # says so; the 4 s allowed below leave room for a request on a loaded machine.
    # Made and revoked in-process, so the clock starts when the store is written (the `ftops keys` command
    # itself takes seconds to start, and is checked above and in tests/test_keys.py).
    from ftops.release import keys

    t0 = time.monotonic()
    info, secret = keys.create(OWN)
    fresh = {"key_id": info.key_id, "key": secret}
    auth = {"Authorization": f"Bearer {fresh['key']}"}
    with httpx.Client(base_url=served["url"], headers=auth, timeout=30) as http:
        while http.get("/v1/models").status_code != 200:
            assert time.monotonic() - t0 < 4, "a new key was not accepted within 4 s"
            time.sleep(0.05)
        accepted_s = time.monotonic() - t0
        t0 = time.monotonic()
        keys.revoke(fresh["key_id"])
        while http.get("/v1/models").status_code != 401:
            assert time.monotonic() - t0 < 4, "a revoked key still works after 4 s"
            time.sleep(0.05)
        refused_s = time.monotonic() - t0
    print(f"new key accepted after {accepted_s:.2f} s, revoked key refused after {refused_s:.2f} s")
    revoked = ftops("keys", "revoke", new_key(OWN)["key_id"], "--json")  # the operator's command does the same
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"]
    listed = json.loads(ftops("keys", "list", OWN, "--json").stdout)
    assert {k["key_id"]: bool(k["revoked"]) for k in listed}[fresh["key_id"]] is True
    assert served[OWN]["key_id"] in {k["key_id"] for k in listed} and all(k["customer"] == OWN for k in listed)


def test_admin_routes_refused_to_customer_keys(served):
    key = {"Authorization": f"Bearer {served[OWN]['key']}"}
    with httpx.Client(base_url=served["url"], headers=key, timeout=60) as http:
        for method, path, body in [
            ("POST", "/v1/load_lora_adapter", {"lora_name": OWN, "lora_path": "/tmp", "load_inplace": True}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": OTHER}),
            ("POST", "/adapters", {"lora_name": "x", "lora_path": "/tmp"}),
            ("DELETE", f"/adapters/{OTHER}", None),
            ("POST", "/reset_prefix_cache", None),
            ("POST", "/sleep", None),
            ("POST", "/collective_rpc", {"method": "x"}),
            ("POST", "/scale_elastic_ep", {}),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("GET", "/docs", None),
            ("GET", "/load", None),
            ("GET", "/v1/responses/resp_x", None),
            ("POST", "/v1/responses/resp_x/cancel", None),
        ]:
            assert http.request(method, path, json=body).status_code == 403, path
    assert {OWN, OTHER} <= set(Replica(served["url"]).adapters())  # nothing was unloaded


def test_crafted_model_names_never_reach_the_resolver(served, home):
    resolver = home / "vllm-adapters" / "resolver"
    (resolver / "x").mkdir(parents=True, exist_ok=True)
    for who, key in (("customer", served[OWN]["key"]), ("admin", admin_key())):
        c = client(served, key)
        for name in (f"../{OTHER}", f"{OWN}/../{OTHER}", "x/../../models/tiny-llama", f"..\\{OTHER}", "/etc", ".."):
            with pytest.raises(openai.NotFoundError) as err:
                c.completions.create(model=name, prompt="Hi", max_tokens=2)
            assert err.value.body.get("type") == "ftops_auth", (who, name)  # refused by the middleware, not vLLM


def test_admin_key_file_and_store_hold_no_secret_in_the_clear(served, vllm_server, home):
    assert admin_key_path() == home / "secrets" / "serving_admin_key"
    assert stat.S_IMODE(admin_key_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(store_path().stat().st_mode) == 0o600
    stored = store_path().read_text()
    assert served[OWN]["key"] not in stored and served[OWN]["key_id"] in stored
    log = (home / "run" / f"vllm-{vllm_server.url.rsplit(':', 1)[1]}.log").read_text()
    for secret in (served[OWN]["key"], served[OTHER]["key"], admin_key()):
        assert secret not in log
    assert "'middleware': ['ftops.release.serving_auth.TenantAuth']" in log  # the middleware was loaded


def test_vllm_refuses_to_start_without_an_admin_key(tiny_model, tmp_path):
    """Fail closed, on a real start: vLLM with the middleware and no admin key loads its engine, then exits
    with the middleware's error before it ever listens (vLLM 0.32 builds the middleware stack at start-up)."""
    from conftest import free_port

    home = tmp_path / "home"  # no secrets/ here
    env = dict(os.environ, FTOPS_HOME=str(home), PYTHONPATH=str(ROOT / "include"), VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("FTOPS_SERVING_ADMIN_KEY", None)
    port = free_port()
    log = tmp_path / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / ".venv-vllm" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
            + ["--model", str(tiny_model), "--dtype", "float32", "--max-model-len", "512", "--host", "127.0.0.1"]
            + ["--port", str(port), "--middleware", "ftops.release.serving_auth.TenantAuth"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    answered = []
    try:
        deadline = time.time() + 600
        while proc.poll() is None:
            assert time.time() < deadline, "vLLM neither exited nor served without an admin key"
            try:  # any answer at all, even an error page, means it started serving
                answered.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode != 0 and answered == [], (proc.returncode, answered)
    assert "no serving admin key" in log.read_text(errors="replace")
