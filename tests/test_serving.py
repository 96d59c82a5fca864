"""The serving reconciler against real vLLM processes (CPU build, tiny model), two replicas: load, swap
under load with zero failed requests, rollback, unload of a removed customer, a restarted replica healed.

Fail-safe, with real faults: MLflow stopped (sync fails and changes nothing, training and evaluation fail
rather than go without production), S3 stopped mid-copy, a replica killed mid-reconcile, crafted registry
tags, an invalid customer entry, a sync running while an evaluation has its temporary adapter loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, TEST_CUSTOMERS, _service, trained_hand_off
from ftops.config import settings
from ftops.data.demo import write_batch
from ftops.release.keys import auth_headers
from ftops.release.registry import Registry, RegistryUnavailable, model_name
from ftops.release.serving import ReconcileIncomplete, Replica, ServingError, tree_sha256
from ftops.release.tasks import sync_serving
from ftops.storage import Store

pytestmark = pytest.mark.e2e
CUSTOMER, BASE = "brightdesk", "tiny"
PROMPT = "How do I fix a failed export?"


@pytest.fixture(scope="module")
def replica_customers(tmp_path_factory) -> Path:
    """The customers file the second replica's tenant middleware reads (a copy: a test removes a customer)."""
    path = tmp_path_factory.mktemp("replica") / "customers.yaml"
    shutil.copy(TEST_CUSTOMERS, path)
    return path


@pytest.fixture(scope="module")
def second_replica(home, tiny_model, vllm_server, replica_customers):
    extra = {"VLLM_MODEL": str(tiny_model), "FTOPS_CUSTOMERS": str(replica_customers)}
    for svc in _service("vllm", extra, "VLLM_PORT"):
        os.environ["FTOPS_VLLM_URLS"] = f"{vllm_server.url},{svc.url}"
        yield svc
    os.environ["FTOPS_VLLM_URLS"] = vllm_server.url


@pytest.fixture(scope="module")
def versions(home, tiny_model, mlflow_server, tmp_path_factory):
    """Two registered adapter versions of one customer, trained for real on different data."""
    from ftops.data.demo import registered_style_version

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
        # Every outcome is counted: a dropped connection, a timeout or anything else that would end this
        # thread is a failure, not a silence.
        with httpx.Client(timeout=60, headers=auth_headers()) as http:  # the admin key: any model
            while not done.is_set():
                for u in urls:
                    try:
                        r = http.post(
                            f"{u}/v1/chat/completions",
                            json={
                                "model": CUSTOMER,
                                "messages": [{"role": "user", "content": PROMPT}],
                                "max_tokens": 16,
                                "temperature": 0,
                            },
                        )
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                        (answers if ok else failures).append(r.status_code)
                    except Exception as exc:  # noqa: BLE001 (the point is to count every kind)
                        failures.append(repr(exc))

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


def test_replica_killed_mid_reconcile_is_reported_then_healed(versions, vllm_server, second_replica, monkeypatch):
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    reg.promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    reg.promote(CUSTOMER, BASE, versions[1])
    load, killed = Replica.load, []

    def kill_then_load(self, name, path, inplace):
        if self.url == second_replica.url and not killed:  # the first replica has swapped; this one dies now
            killed.append(True)
            pid = int(
                (
                    Path(os.environ["FTOPS_HOME"]) / "run" / f"vllm-{second_replica.url.rsplit(':', 1)[1]}.pid"
                ).read_text()
            )
            os.killpg(pid, signal.SIGKILL)
        return load(self, name, path, inplace)

    monkeypatch.setattr(Replica, "load", kill_then_load)
    with pytest.raises(ReconcileIncomplete, match=second_replica.url.replace(".", r"\.")):
        sync_serving()  # the DAG task fails (an operator sees it); the healthy replica was reconciled
    monkeypatch.undo()
    assert served(vllm_server.url)[CUSTOMER] == "serving-v2"
    second_replica.run("stop")  # clears the pid file of the killed process
    second_replica.run("start")  # restarted: runtime-loaded adapters are gone
    assert CUSTOMER not in served(second_replica.url)
    healed = sync_serving()
    assert any(second_replica.url in a and "loaded brightdesk" in a for a in healed["actions"])
    assert served(second_replica.url)[CUSTOMER] == "serving-v2"


@pytest.fixture
def registry_outage(mlflow_server, monkeypatch):
    """MLflow stopped for real (retries off, so the client gives up at once); restarted afterwards."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_server.run("stop")
    try:
        yield
    finally:
        mlflow_server.run("start")


def snapshot_of_serving(urls) -> tuple[dict, dict]:
    resolver = settings().vllm_adapter_dir / "resolver"
    links = {p.name: os.readlink(p) for p in resolver.iterdir() if p.is_symlink()}
    return {u: Replica(u).adapters() for u in urls}, links


def test_registry_outage_changes_nothing(versions, vllm_server, second_replica, request):
    urls = [vllm_server.url, second_replica.url]
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    before = snapshot_of_serving(urls)
    assert all(CUSTOMER in loaded for loaded in before[0].values())
    request.getfixturevalue("registry_outage")
    with pytest.raises(RegistryUnavailable, match="registry unavailable"):
        sync_serving()
    # The CLI with MLflow's default retries (minutes of backoff): it bounds them itself and answers in seconds.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    cmd = [str(ROOT / ".venv/bin/ftops"), "serving", "sync"]
    cli = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 1 and "Nothing was changed" in cli.stdout + cli.stderr, cli.stderr[-2000:]
    assert snapshot_of_serving(urls) == before  # every tenant still served, resolver links untouched


def test_after_the_outage_the_next_sync_is_a_no_op(versions, vllm_server, second_replica):
    """Runs after the outage test: MLflow restarted on the same store."""
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    assert sync_serving()["actions"] == []


def test_registry_outage_fails_training_and_evaluation_instead_of_going_without_production(
    versions, vllm_server, tmp_path, request
):
    """With MLflow down, train must not fall back to "no production" (no replay, fresh init), and evaluate
    must not drop the comparison with production: both raise before any work is done."""
    from ftops.data import tasks as data
    from ftops.model import tasks as model
    from ftops.run import Run

    other, store = "sterling-law", Store(settings().storage_root)
    write_batch(other, Path(store.root) / other / "inbox", n=40, batch=7)
    run = Run(other, "manual__outage", f"finetune_{other}")
    key = data.ingest(run)["scratch_key"]
    data.validate(run, key)
    data.clean(run, key)
    data.dedupe(run)
    assert data.snapshot(run)["dataset_version"]
    v1 = Registry(os.environ["MLFLOW_TRACKING_URI"]).get(CUSTOMER, BASE, versions[0])
    adapters = store.list(f"{other}/adapters")
    request.getfixturevalue("registry_outage")
    with pytest.raises(RegistryUnavailable):
        model.train(run, force=True)
    assert store.list(f"{other}/adapters") == adapters  # nothing trained
    trained = trained_hand_off(v1.adapter_version, v1.adapter_prefix, v1.source, v1.source)  # v1's adapter
    with pytest.raises(RegistryUnavailable):
        model.evaluate(Run(CUSTOMER, "manual__outage-eval", f"finetune_{CUSTOMER}"), trained)


def crafted_version(reg: Registry, base_of: str, **tags: str) -> str:
    """A registry version written by hand (as anyone with MLflow write access could), gate tag included."""
    name = model_name(CUSTOMER, BASE)
    src = reg.client.get_model_version(name, base_of)
    mv = reg.client.create_model_version(
        name, source=src.source, run_id=src.run_id, tags=src.tags | {"gate.decision": "passed"} | tags
    )
    return str(mv.version)


def test_crafted_registry_tags_are_refused_and_the_customer_keeps_its_adapter(
    versions, vllm_server, second_replica, tmp_path
):
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    reg.promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    urls = [vllm_server.url, second_replica.url]
    storage, adapter_dir = Path(settings().storage_root), settings().vllm_adapter_dir
    v2 = reg.get(CUSTOMER, BASE, versions[1])
    # Same files as v2 under a new, well-formed version name, but the sha256 of v1: a swapped artifact.
    Store(str(storage)).upload_dir(storage / v2.adapter_prefix, f"{CUSTOMER}/adapters/{BASE}/tampered")
    v1 = reg.get(CUSTOMER, BASE, versions[0])
    v1_sha = v1.tags["adapter.sha256"]
    # v1's weights untouched, its config changed (a 16x stronger LoRA scaling): only the tree hash sees it.
    config = json.loads((storage / v1.adapter_prefix / "adapter_config.json").read_text())
    config["lora_alpha"] *= 16
    tampered_cfg = tmp_path / "cfg"
    shutil.copytree(storage / v1.adapter_prefix, tampered_cfg)
    (tampered_cfg / "adapter_config.json").write_text(json.dumps(config))
    Store(str(storage)).upload_dir(tampered_cfg, f"{CUSTOMER}/adapters/{BASE}/cfgtamper")
    # Checks passed, load refused by vLLM: v1's files with a LoRA rank above the replicas' --max-lora-rank,
    # its hashes recorded as registration would record them.
    config["lora_alpha"], config["r"] = config["lora_alpha"] // 16, 512
    big = tmp_path / "bigrank"
    shutil.copytree(storage / v1.adapter_prefix, big)
    (big / "adapter_config.json").write_text(json.dumps(config))
    Store(str(storage)).upload_dir(big, f"{CUSTOMER}/adapters/{BASE}/bigrank")
    big_files = {p.relative_to(big).as_posix(): p.read_bytes() for p in big.rglob("*") if p.is_file()}
    (storage / "sterling-law" / "inbox").mkdir(parents=True, exist_ok=True)
    cases = {
        "bigrank.*failed": {
            "adapter.version": "bigrank",
            "adapter.prefix": f"{CUSTOMER}/adapters/{BASE}/bigrank",
            "adapter.sha256": v1_sha,  # the weights are v1's, unchanged
            "adapter.tree_sha256": tree_sha256(big_files),
        },
        "not a plain version name": {"adapter.version": "../../dags/pwn", "adapter.prefix": "sterling-law/inbox"},
        "is not": {"adapter.version": "serving-v9", "adapter.prefix": "sterling-law/inbox"},  # another tenant
        "sha256 missing": {
            "adapter.sha256": "",
            "adapter.version": "x1",
            "adapter.prefix": f"{CUSTOMER}/adapters/{BASE}/x1",
        },
        "do not match the tree sha256": {
            "adapter.version": "cfgtamper",
            "adapter.prefix": f"{CUSTOMER}/adapters/{BASE}/cfgtamper",
            "adapter.sha256": v1_sha,
            "adapter.tree_sha256": v1.tags["adapter.tree_sha256"],
        },
        "does not match the sha256": {
            "adapter.version": "tampered",
            "adapter.prefix": f"{CUSTOMER}/adapters/{BASE}/tampered",
            "adapter.sha256": v1_sha,
        },
    }
    from ftops.run import Run, production_copy

    run = Run(CUSTOMER, "manual__tampered", f"finetune_{CUSTOMER}")
    for why, tags in cases.items():
        reg.promote(CUSTOMER, BASE, crafted_version(reg, versions[1], **tags))
        with pytest.raises(ReconcileIncomplete, match=why):
            sync_serving()
        if "sha256" in why and "missing" not in why:
            # the copy training's `init: production` and evaluation's production comparison start from
            with pytest.raises(ServingError, match=why):
                production_copy(run, reg.by_alias(CUSTOMER, BASE, "production"), tmp_path / "init" / why[:6])
        assert all(served(u)[CUSTOMER] == "serving-v1" for u in urls), why
        assert os.readlink(adapter_dir / "resolver" / CUSTOMER).endswith("serving-v1"), why
    assert not (adapter_dir.parent / "dags").exists() and not (adapter_dir / "dags").exists()
    assert not (adapter_dir / CUSTOMER / "serving-v9").exists()  # nothing copied from another tenant's inbox


def test_sync_during_evaluation_leaves_its_temporary_adapter_alone(versions, vllm_server, monkeypatch):
    from ftops.release.serving import answers_from, eval_name

    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    reg.promote(CUSTOMER, BASE, versions[0])
    replica = Replica(vllm_server.url)
    name = eval_name(CUSTOMER, "abcd1234", "candidate")
    adapter = Path(settings().storage_root) / reg.get(CUSTOMER, BASE, versions[1]).adapter_prefix
    chat, seen = Replica.chat, []

    def sync_first(self, model, prompt, max_tokens=64, system=None):
        if not seen:  # the evaluation has loaded its candidate: a sync runs right now
            seen.append(sync_serving())
            assert self.adapters().get(name) == str(adapter)
        return chat(self, model, prompt, max_tokens, system)

    monkeypatch.setattr(Replica, "chat", sync_first)
    answers = answers_from(replica, name, adapter, [PROMPT, "Hello?"])
    assert len(answers) == 2 and all(answers)
    assert not any(name in a for a in seen[0]["actions"])  # the sync neither unloaded nor reloaded it
    assert name not in replica.adapters()  # evaluation cleaned up after itself

    # An error during evaluation is the error reported, even when the cleanup fails too.
    def broken(self, model, prompt, max_tokens=64, system=None):
        raise ServingError("completion failed: boom")

    def unreachable(self, n):
        raise httpx.ConnectError("replica gone")

    monkeypatch.setattr(Replica, "chat", broken)
    monkeypatch.setattr(Replica, "unload", unreachable)
    with pytest.raises(ServingError, match="boom"):
        answers_from(replica, name, adapter, [PROMPT])
    monkeypatch.undo()
    replica.unload(name)


def test_storage_stopped_mid_copy_leaves_every_replica_as_it_was(
    versions, vllm_server, second_replica, s3_server, tmp_path, monkeypatch
):
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    reg.promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    urls = [vllm_server.url, second_replica.url]
    before = {u: Replica(u).adapters() for u in urls}
    # The same adapters on S3 (every customer's production, and v2), and a fresh replica-side folder: what is
    # served must be copied from S3.
    v2 = reg.get(CUSTOMER, BASE, versions[1])
    s3 = Store("s3://ftops/failsafe")
    wanted = [v2] + [p for c in ("sterling-law",) if (p := reg.by_alias(c, BASE, "production"))]
    for v in wanted:
        if not s3.list(v.adapter_prefix):
            s3.upload_dir(Path(settings().storage_root) / v.adapter_prefix, v.adapter_prefix)
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", s3.root)
    monkeypatch.setenv("FTOPS_VLLM_ADAPTER_DIR", str(tmp_path / "adapters"))
    reg.promote(CUSTOMER, BASE, versions[1])
    # Every read of an S3 object opens it (`get` too): S3 goes away once the copy has begun.
    opened, calls = type(s3).open, []

    def stop_after_first(self, key):
        calls.append(key)
        if len(calls) == 2:
            s3_server.run("stop")  # S3 goes away in the middle of the copy
        return opened(self, key)

    monkeypatch.setattr(type(s3), "open", stop_after_first)
    try:
        with pytest.raises(ReconcileIncomplete, match="not served"):
            sync_serving()
    finally:
        s3_server.run("start")
    assert {u: Replica(u).adapters() for u in urls} == before  # no replica lost anything
    assert not [p for p in (tmp_path / "adapters" / CUSTOMER).iterdir() if p.name.startswith(".partial")]
    monkeypatch.setattr(type(s3), "open", opened)
    deadline = time.time() + 60
    while True:  # a restarted SeaweedFS answers 500 for a moment: wait until it serves the adapter again
        try:
            s3.get(f"{v2.adapter_prefix}/adapter_config.json")
            break
        except Exception:  # noqa: BLE001 - botocore's errors while the server comes up
            assert time.time() < deadline, "S3 did not come back"
            time.sleep(1)
    assert sum("swapped brightdesk" in a for a in sync_serving()["actions"]) == 2  # S3 back: it converges


def test_removed_customer_is_unloaded_and_its_keys_stop_working(
    versions, vllm_server, second_replica, replica_customers, tmp_path, monkeypatch
):
    from ftops.release.keys import create

    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    urls = (vllm_server.url, second_replica.url)
    _, key = create(CUSTOMER)
    ask = {"model": CUSTOMER, "prompt": PROMPT, "max_tokens": 2}
    with httpx.Client(base_url=second_replica.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        deadline = time.time() + 5
        while (r := http.post("/v1/completions", json=ask)).status_code != 200:  # a new key: within a second
            assert time.time() < deadline, r.text
            time.sleep(0.2)
        # The customer leaves the file the replica reads: its keys stop working, adapter loaded or not.
        gone = yaml.safe_load(replica_customers.read_text())
        gone["customers"] = [c for c in gone["customers"] if c["id"] != CUSTOMER]
        (tmp_path / "gone.yaml").write_text(yaml.safe_dump(gone))
        os.replace(tmp_path / "gone.yaml", replica_customers)
        t0 = time.time()
        while (r := http.post("/v1/completions", json=ask)).status_code != 401:
            assert time.time() - t0 < 8, f"a removed customer's key still works: {r.status_code}"  # re-read every 5 s
            time.sleep(0.2)
        assert http.get("/v1/models").status_code == 401 and CUSTOMER in served(second_replica.url)
    doc = yaml.safe_load(TEST_CUSTOMERS.read_text())
    # An invalid entry is unknown, not removed: its adapter stays and the sync reports it.
    broken = dict(doc, customers=[c | {"lora": {"r": "many"}} if c["id"] == CUSTOMER else c for c in doc["customers"]])
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    monkeypatch.setenv("FTOPS_CUSTOMERS", str(path))
    with pytest.raises(ReconcileIncomplete, match="invalid entry"):
        sync_serving()
    assert all(served(u)[CUSTOMER] == "serving-v1" for u in urls)
    doc["customers"] = [c for c in doc["customers"] if c["id"] != CUSTOMER]
    path = tmp_path / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("FTOPS_CUSTOMERS", str(path))
    result = sync_serving()
    assert sum("unloaded brightdesk" in a for a in result["actions"]) == 2
    assert all(CUSTOMER not in served(u) for u in urls)


def test_deleting_the_production_alias_unloads(versions, vllm_server, second_replica):
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    reg.promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    reg.client.delete_registered_model_alias(model_name(CUSTOMER, BASE), "production")
    result = sync_serving()
    assert result["removed"] == [CUSTOMER] and sum("unloaded brightdesk" in a for a in result["actions"]) == 2
    assert not (settings().vllm_adapter_dir / "resolver" / CUSTOMER).exists()


def test_resolver_folder_points_at_production(versions, vllm_server, second_replica):
    Registry(os.environ["MLFLOW_TRACKING_URI"]).promote(CUSTOMER, BASE, versions[0])
    sync_serving()
    link = settings().vllm_adapter_dir / "resolver" / CUSTOMER
    assert link.is_symlink() and link.resolve().name == "serving-v1"
    assert (link / "adapter_config.json").is_file()


def test_models_registered_under_the_old_names_are_renamed(mlflow_server):
    from ftops.release.registry import RegistryError

    reg = Registry(mlflow_server.url)
    reg.client.create_registered_model("ftops-acme-x-y", tags={"customer": "acme", "base_model": "x-y"})
    # Tags that do not give back the name it has: which pair it belongs to is unknown.
    reg.client.create_registered_model("ftops-acme-x-y-z", tags={"customer": "acme-x", "base_model": "y"})
    with pytest.raises(RegistryError, match="nothing renamed: ftops-acme-x-y-z"):
        reg.migrate_names()
    assert reg.client.get_registered_model("ftops-acme-x-y")  # all or nothing
    reg.client.delete_registered_model("ftops-acme-x-y-z")
    assert reg.migrate_names() == [("ftops-acme-x-y", "ftops.acme.x-y")]
    assert reg.client.get_registered_model("ftops.acme.x-y").tags["customer"] == "acme"
