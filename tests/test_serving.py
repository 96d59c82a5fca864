"""The serving reconciler against real vLLM processes (CPU build, tiny model), two replicas: load, swap
under load with zero failed requests, rollback, unload of a removed customer, a restarted replica healed,
a replica down reported without stopping the others."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import TEST_CUSTOMERS, _service
from ftops.config import settings
from ftops.keys import auth_headers
from ftops.pipeline import sync_serving
from ftops.registry import Registry
from ftops.serving import Replica

pytestmark = pytest.mark.e2e
CUSTOMER, BASE = "brightdesk", "tiny"
PROMPT = "How do I fix a failed export?"


@pytest.fixture(scope="module")
def second_replica(home, tiny_model, vllm_server):
    for svc in _service("vllm", {"VLLM_MODEL": str(tiny_model)}, "VLLM_PORT"):
        os.environ["FTOPS_VLLM_URLS"] = f"{vllm_server.url},{svc.url}"
        yield svc
    os.environ["FTOPS_VLLM_URLS"] = vllm_server.url


@pytest.fixture(scope="module")
def versions(home, tiny_model, mlflow_server, tmp_path_factory):
    """Two registered adapter versions of one customer, trained for real on different data."""
    from ftops.demo_data import registered_style_version

    tmp = tmp_path_factory.mktemp("serving")
    return [  # v2 answers in another voice: visibly new
        registered_style_version(CUSTOMER, style, i, tiny_model, BASE, tmp, f"serving-v{i + 1}", mlflow_server.url)
        for i, style in enumerate(["brightdesk", "sterling-law"])
    ]


def served(url: str) -> dict[str, str]:
    return {k: Path(v).name for k, v in Replica(url).adapters().items()}


def test_load_swap_under_load_rollback(versions, vllm_server, second_replica):
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    v1, v2 = versions
    reg.promote(CUSTOMER, BASE, v1)
    first = sync_serving()
    assert any("loaded brightdesk" in a for a in first["actions"])
    urls = [vllm_server.url, second_replica.url]
    assert all(served(u)[CUSTOMER] == "serving-v1" for u in urls)
    assert sync_serving()["actions"] == []  # idempotent: nothing to do when they agree
    replica = Replica(urls[0])
    old_answer = replica.chat(CUSTOMER, PROMPT)
    assert old_answer != replica.chat(replica.base_model(), PROMPT)

    failures, done, answers = [], threading.Event(), []

    def traffic():
        with httpx.Client(timeout=60, headers=auth_headers()) as http:  # the admin key: any model
            while not done.is_set():
                for u in urls:
                    r = http.post(
                        f"{u}/v1/chat/completions",
                        json={
                            "model": CUSTOMER,
                            "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": 16,
                            "temperature": 0,
                        },
                    )
                    (answers if r.status_code == 200 else failures).append(r.status_code)

    def wait_for(n: int) -> None:
        deadline = time.time() + 120
        while len(answers) < n and time.time() < deadline and not failures:
            time.sleep(0.1)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(4)  # traffic flowing before the swap...
    reg.promote(CUSTOMER, BASE, v2)
    swap = sync_serving()
    during = len(answers)
    wait_for(during + 4)  # ...and after it
    done.set()
    for t in threads:
        t.join()
    assert any("swapped brightdesk" in a for a in swap["actions"]), swap
    assert failures == [] and len(answers) >= during + 4  # zero failed requests while swapping
    assert all(served(u)[CUSTOMER] == "serving-v2" for u in urls)
    assert replica.chat(CUSTOMER, PROMPT) != old_answer  # the new version answers, not a stale cache

    reg.rollback(CUSTOMER, BASE)
    sync_serving()
    assert all(served(u)[CUSTOMER] == "serving-v1" for u in urls)
    assert replica.chat(CUSTOMER, PROMPT) == old_answer


def test_restart_is_healed_and_a_down_replica_is_reported(versions, vllm_server, second_replica):
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    second_replica.run("stop")
    with pytest.raises(RuntimeError, match="unreachable"):
        sync_serving()  # the DAG task fails and retries; the healthy replica was still reconciled
    assert served(vllm_server.url)[CUSTOMER] == "serving-v1"
    second_replica.run("start")  # restarted: runtime-loaded adapters are gone
    assert CUSTOMER not in served(second_replica.url)
    healed = sync_serving()
    assert any(second_replica.url in a and "loaded brightdesk" in a for a in healed["actions"])
    assert served(second_replica.url)[CUSTOMER] == "serving-v1"


def test_removed_customer_is_unloaded(versions, vllm_server, second_replica, tmp_path, monkeypatch):
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    doc = yaml.safe_load(TEST_CUSTOMERS.read_text())
    doc["customers"] = [c for c in doc["customers"] if c["id"] != CUSTOMER]
    path = tmp_path / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("FTOPS_CUSTOMERS", str(path))
    result = sync_serving()
    assert sum("unloaded brightdesk" in a for a in result["actions"]) == 2
    assert all(CUSTOMER not in served(u) for u in (vllm_server.url, second_replica.url))


def test_resolver_folder_points_at_production(versions, vllm_server, second_replica):
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    link = settings().vllm_adapter_dir / "resolver" / CUSTOMER
    assert link.is_symlink() and link.resolve().name == "serving-v1"
    assert (link / "adapter_config.json").is_file()
