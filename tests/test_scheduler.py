"""Triggers under a real scheduler, not `dag.test()`: Airflow standalone (scheduler, dag-processor,
triggerer, api-server; LocalExecutor on PostgreSQL) on a temporary home runs a customer's DAG by itself
when enough new examples land in its inbox (event-driven: AssetWatcher + our trigger), takes a manual
trigger with params through the REST API, refuses a bad param with HTTP 400, waits for a person's
approval before promoting, and retires a customer's DAG and inbox trigger when the customer is removed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime

import httpx
import pytest
import yaml

from conftest import ROOT, TEST_CUSTOMERS, _service, wait_run
from ftops.config import PRODUCTION_ASSET_URI
from ftops.data.demo import write_batch
from ftops.release.registry import Registry

pytestmark = pytest.mark.e2e
CUSTOMER = "acme-volume"
DAG = f"finetune_{CUSTOMER}"
MANUAL = "careful-manual"


@pytest.fixture(scope="module")
def customers_file(tmp_path_factory):
    doc = yaml.safe_load(TEST_CUSTOMERS.read_text())
    doc["customers"] = [
        {"id": CUSTOMER, "name": "Acme Corp", "trigger_min_examples": 50, "trigger_poll_seconds": 2},
        {"id": MANUAL, "name": "Careful Co", "promote": "manual", "trigger_min_examples": None},
    ]
    path = tmp_path_factory.mktemp("scheduler") / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def airflow(home, tiny_model, mlflow_server, customers_file, postgres):
    old = os.environ["FTOPS_CUSTOMERS"]
    os.environ["FTOPS_CUSTOMERS"] = str(customers_file)
    extra = {
        "AIRFLOW_HOME": str(home / "airflow-standalone"),
        **postgres,
        # Test-only: re-parse and retire removed DAGs within seconds (defaults 30, 50, 60 s).
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "10",
        "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "10",
        "FTOPS_TRAIN_SLOTS": "2",
    }
    try:
        for svc in _service("airflow", extra, "AIRFLOW_PORT"):
            http = httpx.Client(base_url=f"{svc.url}/api/v2", timeout=60)
            deadline = time.time() + 120
            while http.get(f"/dags/{DAG}").status_code != 200:  # parsed and serialised by the dag-processor
                assert time.time() < deadline, "the DAG never appeared"
                time.sleep(1)
            yield http
    finally:
        os.environ["FTOPS_CUSTOMERS"] = old


def runs(http: httpx.Client) -> list[dict]:
    return http.get(f"/dags/{DAG}/dagRuns").json()["dag_runs"]


def inbox_asset(http: httpx.Client) -> dict:
    uri = f"ftops://inbox/{CUSTOMER}"
    return next(a for a in http.get("/assets", params={"uri_pattern": uri}).json()["assets"] if a["uri"] == uri)


def queued_events(http: httpx.Client) -> list[dict]:
    r = http.get(f"/dags/{DAG}/assets/queuedEvents")
    return [] if r.status_code == 404 else r.json()["queued_events"]


def test_no_run_starts_when_a_customer_is_enabled(airflow):
    """Checked once the scheduler has planned the DAG (its next run time set): a catch-up would plan a past
    slot and create that run in the same scheduler loop; the next run must be the weekly slot, in the future,
    on the customer's weekday (schedule_weekday 0: Monday) between 01:00 and 07:00 UTC."""
    deadline = time.time() + 120
    while not (dag := airflow.get(f"/dags/{DAG}").json())["next_dagrun_run_after"]:
        assert time.time() < deadline, "the scheduler never planned the DAG"
        time.sleep(1)
    assert dag["is_paused"] is False  # enabled: only the schedule keeps it from running
    planned = datetime.fromisoformat(dag["next_dagrun_run_after"].replace("Z", "+00:00"))
    assert planned.timestamp() > time.time()
    assert planned.weekday() == 0 and 1 <= planned.hour < 7, planned
    heartbeats_after(airflow, time.time(), 3)  # the scheduler has looked at the planned DAG three times since
    assert [r["run_type"] for r in runs(airflow)] == []
    assert airflow.get(f"/dags/{DAG}").json()["next_dagrun_run_after"] == dag["next_dagrun_run_after"]


def heartbeats_after(http: httpx.Client, since: float, n: int, timeout: float = 120) -> None:
    """Wait for `n` distinct scheduler heartbeats after `since`: only then is "nothing happened" the scheduler's
    decision rather than a race against it."""
    deadline, beats = time.time() + timeout, set()
    while len(beats) < n:
        beat = http.get("/monitor/health").json()["scheduler"]["latest_scheduler_heartbeat"]
        if beat and datetime.fromisoformat(beat).timestamp() > since:
            beats.add(beat)
        assert time.time() < deadline, "the scheduler stopped heartbeating"
        time.sleep(1)


def test_training_slots_are_the_gpu_pool(airflow):
    # FTOPS_TRAIN_SLOTS sizes the `gpu` pool every train task takes a slot of (scripts/airflow.sh sets it)
    pool = airflow.get("/pools/gpu").json()
    assert pool["slots"] == 2 and pool["description"] == "concurrent trainings"


def trigger(http: httpx.Client, dag: str, conf: dict) -> httpx.Response:
    return http.post(f"/dags/{dag}/dagRuns", json={"logical_date": None, "conf": conf})


def test_bad_param_is_refused_with_400(airflow):
    r = trigger(airflow, DAG, {"max_steps": -5})
    assert r.status_code == 400 and "max_steps" in r.text
    assert trigger(airflow, DAG, {"promote": "sometimes"}).status_code == 400
    assert trigger(airflow, DAG, {"epochs": 0}).status_code == 400


def test_enough_new_examples_start_one_run_by_themselves(airflow, home):
    inbox = home / "storage" / CUSTOMER / "inbox"
    for i in range(3):  # a burst of three uploads, 30-ish records each: one run, not three
        write_batch("brightdesk", inbox / f"upload-{i}", n=25, batch=i, dirty=False)
    deadline = time.time() + 120
    while not (started := [r for r in runs(airflow) if r["run_type"] == "asset_triggered"]):
        assert time.time() < deadline, "the data-volume trigger did not start a run"
        time.sleep(2)
    run_id = started[0]["dag_run_id"]
    assert wait_run(airflow, f"/dags/{DAG}/dagRuns/{run_id}", timeout=420) == "success"
    # Every event the watcher fired was consumed by this one run, and none waits for a second one.
    inbox = inbox_asset(airflow)
    events = airflow.get("/assets/events", params={"asset_id": inbox["id"]}).json()["asset_events"]
    consumed = airflow.get(f"/dags/{DAG}/dagRuns/{run_id}/upstreamAssetEvents").json()["asset_events"]
    assert len(events) >= 1 and {e["id"] for e in events} == {e["id"] for e in consumed}
    assert queued_events(airflow) == []
    assert len([r for r in runs(airflow) if r["run_type"] == "asset_triggered"]) == 1
    prod = Registry(os.environ["MLFLOW_TRACKING_URI"]).by_alias(CUSTOMER, "tiny", "production")
    assert prod is not None and prod.tags["airflow.run_id"] == started[0]["dag_run_id"]


def test_manual_trigger_with_params_through_the_rest_api(airflow):
    r = trigger(airflow, DAG, {"dry_run": True, "force": True})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert wait_run(airflow, f"/dags/{DAG}/dagRuns/{run_id}", timeout=420) == "success"
    tis = {
        t["task_id"]: t["state"]
        for t in airflow.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    }
    assert tis["snapshot"] == "success" and tis["train"] == "skipped" and tis["promote"] == "skipped"


def test_erase_with_retrain_triggers_a_forced_run(airflow, home, postgres):
    """`ftops data erase --retrain` triggers the customer's DAG with `force` (through Airflow's own CLI, on the
    same metadata database)."""
    import io

    from ftops.config import DataPolicy
    from ftops.data.ingest import InboxFile
    from ftops.data.tasks import prepare
    from ftops.storage import Store

    # a dataset version holding the text to erase (made here, so the test does not depend on the others)
    turns = [("user", "Zebulon Quaxley asks about a failed export"), ("assistant", "Retry it, Zebulon Quaxley.")]
    line = json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"
    upload = InboxFile("erase.jsonl", "erase.jsonl", lambda: io.BytesIO(line.encode()))
    prepare(Store(os.environ["FTOPS_STORAGE_ROOT"]), CUSTOMER, [upload], DataPolicy())
    env = dict(os.environ, AIRFLOW_HOME=str(home / "airflow-standalone"), **postgres)
    before = {r["dag_run_id"] for r in runs(airflow)}
    erase = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "ftops"),
            "data",
            "erase",
            "--customer",
            CUSTOMER,
            "--match",
            "Zebulon Quaxley",
            "--retrain",
        ]
        + ["--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(erase.stdout)
    assert erase.returncode == 0 and result["retrain"] == "triggered", erase.stdout + erase.stderr[-2000:]
    [new] = [r for r in runs(airflow) if r["dag_run_id"] not in before]
    assert new["run_type"] == "manual" and new["conf"] == {"force": True}
    # Seen; not run to the end (a training here would only slow the next tests): ended as an operator would.
    r = airflow.patch(f"/dags/{DAG}/dagRuns/{new['dag_run_id']}", json={"state": "failed"})
    assert r.status_code == 200, r.text


def test_manual_approval_customer_waits_then_promotes_on_approval(airflow, home):
    dag = f"finetune_{MANUAL}"
    write_batch("sterling-law", home / "storage" / MANUAL / "inbox", n=60, dirty=False)
    r = trigger(airflow, dag, {})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    ti = f"/dags/{dag}/dagRuns/{run_id}/taskInstances/approve"
    deadline, waiting_since = time.time() + 600, None
    # Answer in human time, not within the second the request appears: Airflow 3.3 takes an answer that
    # lands before the scheduler has seen the worker exit for a killed task, retries it and asks again
    # (seen in CI). Ten seconds of an unchanged request is well past that window.
    while waiting_since is None or time.time() - waiting_since < 10:
        if airflow.get(ti).json().get("state") in ("awaiting_input", "deferred"):  # no worker slot held
            waiting_since = waiting_since or time.time()
        else:
            waiting_since = None
            state = airflow.get(f"/dags/{dag}/dagRuns/{run_id}").json()["state"]
            assert time.time() < deadline and state in ("queued", "running"), state
        time.sleep(1)
    reg = Registry(os.environ["MLFLOW_TRACKING_URI"])
    assert reg.by_alias(MANUAL, "tiny", "production") is None
    assert reg.versions(MANUAL, "tiny")[-1].tags["gate.decision"] == "passed"
    r = airflow.patch(f"{ti}/-1/hitlDetails", json={"chosen_options": ["Approve"]})
    assert r.status_code == 200, r.text
    assert wait_run(airflow, f"/dags/{dag}/dagRuns/{run_id}", timeout=600) == "success"
    assert reg.by_alias(MANUAL, "tiny", "production").tags["airflow.run_id"] == run_id


def test_a_promotion_from_the_cli_starts_the_serving_sync(airflow):
    """`ftops adapters promote` (as rollback) tells Airflow through the production asset: a `sync_vllm_adapters`
    run consumes that event at once instead of waiting for its 5-minute slot. (No vLLM here: the run's outcome
    is the reconciler's business, tested in test_serving.py; this checks the wiring.)"""
    version = Registry(os.environ["MLFLOW_TRACKING_URI"]).by_alias(MANUAL, "tiny", "production").version
    url = str(airflow.base_url).rstrip("/").removesuffix("/api/v2")
    cli = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ftops"), "adapters", "promote", MANUAL, version],
        env=dict(os.environ, FTOPS_AIRFLOW_URL=url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "Airflow notified" in cli.stdout, cli.stdout + cli.stderr[-2000:]
    asset = next(a for a in airflow.get("/assets").json()["assets"] if a["uri"] == PRODUCTION_ASSET_URI)
    events = airflow.get("/assets/events", params={"asset_id": asset["id"], "limit": 100}).json()["asset_events"]
    mine = [e for e in events if e["extra"].get("customer") == MANUAL and e["source_dag_id"] is None]
    assert [e["extra"]["version"] for e in mine] == [version]  # the CLI's event (the DAG's own has a source)
    deadline = time.time() + 120
    while True:
        consumed = {
            e["id"]
            for r in airflow.get("/dags/sync_vllm_adapters/dagRuns").json()["dag_runs"]
            if r["run_type"] == "asset_triggered"
            for e in airflow.get(f"/dags/sync_vllm_adapters/dagRuns/{r['dag_run_id']}/upstreamAssetEvents").json()[
                "asset_events"
            ]
        }
        if mine[0]["id"] in consumed:
            break
        assert time.time() < deadline, "no sync_vllm_adapters run consumed the CLI's event"
        time.sleep(2)


def test_removing_a_customer_retires_its_dag_and_its_inbox_trigger(airflow, home, customers_file):
    doc = yaml.safe_load(customers_file.read_text())
    doc["customers"] = [c for c in doc["customers"] if c["id"] != CUSTOMER]
    customers_file.write_text(yaml.safe_dump(doc))
    deadline = time.time() + 180
    while not airflow.get(f"/dags/{DAG}").json()["is_stale"]:  # the dag-processor no longer finds it
        assert time.time() < deadline, f"{DAG} is still active after its customer was removed"
        time.sleep(2)
    assert not airflow.get(f"/dags/finetune_{MANUAL}").json()["is_stale"]  # the others carry on
    before = len(runs(airflow))
    asset_id = inbox_asset(airflow)["id"]

    def events() -> int:
        return airflow.get("/assets/events", params={"asset_id": asset_id}).json()["total_entries"]

    seen = events()
    write_batch("brightdesk", home / "storage" / CUSTOMER / "inbox" / "after-removal", n=60, batch=9, dirty=False)
    # Airflow keeps a stale DAG's asset watcher: the upload still makes an asset event (queued for the stale
    # DAG). Wait for that event (the data was seen), then for scheduler loops after it (heartbeats): only
    # then is "no run" the scheduler's decision rather than a race against it.
    deadline = time.time() + 120
    while inbox_asset(airflow)["watchers"] and events() == seen:
        assert time.time() < deadline, "the upload was never seen (no asset event)"
        time.sleep(1)
    heartbeats_after(airflow, time.time(), 3)  # three distinct heartbeats after the event: the scheduler has looked
    assert len(runs(airflow)) == before, "a removed customer's inbox still starts runs"
