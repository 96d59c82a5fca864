"""Airflow as in production, beyond one machine: CeleryExecutor with a real Redis broker, PostgreSQL, and real
Celery workers started by `scripts/services.sh start celery` (a `default` worker and a `gpu` worker, each with its
own FTOPS_HOME: they share object storage and nothing else). A customer's run sends training to the `gpu` queue
and everything else to `default`; the gpu worker is SIGKILLed mid-training with its whole process tree (a lost
machine); the scheduler notices the missing heartbeats and retries the task on a *different* gpu worker, which
resumes from the last checkpoint in object storage; the default worker is lost mid-ingest and the retry writes the
run's one dataset version; the scheduler itself is killed and restarted mid-run; the run ends with one dataset
version, one adapter and one registry version. The lost ingest's own process is kept alive as an orphan (its
supervisor and worker gone): once the retry claims the task's fence, the orphan's next write is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import TEST_CUSTOMERS, Service, free_port
from ftops.data.demo import write_batch
from ftops.release.registry import Registry

pytestmark = pytest.mark.e2e
CUSTOMER = "kiln-works"
DAG = f"finetune_{CUSTOMER}"


@pytest.fixture(scope="module")
def customers_file(tmp_path_factory):
    doc = yaml.safe_load(TEST_CUSTOMERS.read_text())
    # Long enough to be killed mid-way, checkpointing often enough that a checkpoint exists by then.
    doc["customers"] = [
        {
            "id": CUSTOMER,
            "name": "Kiln Works",
            "trigger_min_examples": None,
            "training": {"max_steps": 30, "save_steps": 5},
        }
    ]
    path = tmp_path_factory.mktemp("celery") / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def stack(home, tiny_model, mlflow_server, customers_file):
    port = free_port()
    env = dict(
        os.environ,
        FTOPS_CUSTOMERS=str(customers_file),
        AIRFLOW_PORT=str(port),
        PG_PORT=str(free_port()),
        REDIS_PORT=str(free_port()),
        AIRFLOW_HOME=str(home / "airflow-celery"),
        # Test-only: a lost worker is declared after 20 s without heartbeats (default 300 s).
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
        # A restarted scheduler adopts the dead one's task instances (and so watches their heartbeats) once the
        # old one is 10 s silent, checked every 15 s (defaults 30 s and 300 s: up to 5 minutes in production).
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="10",
        AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="15",
        DEFAULT_WORKER_CONCURRENCY="2",
    )
    svc = Service("celery", env, f"http://127.0.0.1:{port}")
    try:
        svc.run("start")
        http = httpx.Client(base_url=f"{svc.url}/api/v2", timeout=60)
        deadline = time.time() + 120
        while http.get(f"/dags/{DAG}").status_code != 200:
            assert time.time() < deadline, "the DAG never appeared"
            time.sleep(1)
        # The serving reconciler (every 5 minutes) has no vLLM here: paused, it does not take worker slots.
        assert http.patch("/dags/sync_vllm_adapters", json={"is_paused": True}).status_code == 200
        yield svc, http
    finally:
        svc.run("stop")


def pid(home: Path, svc: Service, component: str) -> int:
    return int((home / "run" / f"celery-{svc.url.rsplit(':', 1)[1]}-{component}.pid").read_text())


def lose(home: Path, svc: Service, component: str, worker_home: Path | None = None, spare: int = 0) -> None:
    """SIGKILL a component's whole process group, as when its machine disappears; and, for a worker, any
    process still running with its FTOPS_HOME (a task that left the group would survive a lost machine here).
    `spare`: one process left alive, an orphan, frozen (SIGSTOP) as soon as its parent is gone: stopped before,
    it would get the SIGHUP the kernel sends a stopped process whose group is orphaned, and die."""
    leader = pid(home, svc, component)
    tree = descendants(leader) - {spare}  # Airflow runs each task in a process group of its own: killpg misses it
    parent = ppid(spare) if spare else 0
    os.killpg(leader, signal.SIGKILL)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while spare and ppid(spare) == parent:
        assert time.time() < deadline, "the orphan's parent survived SIGKILL"
    if spare:
        os.kill(spare, signal.SIGSTOP)
    deadline = time.time() + 30
    while running(leader):  # gone, so that `start celery` sees it down
        assert time.time() < deadline, f"{component} survived SIGKILL"
        time.sleep(0.2)
    if worker_home is None:
        return
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"FTOPS_HOME={worker_home}\0".encode() in (proc / "environ").read_bytes():
                if int(proc.name) != spare:
                    os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def task_process(home: Path, svc: Service, component: str, ti_id: str) -> int:
    """A task instance's process under a worker (the task SDK names it `airflow worker -- <ti id>`)."""
    found = [p for p in descendants(pid(home, svc, component)) if cmdline(p) == f"airflow worker -- {ti_id}"]
    assert len(found) == 1, [cmdline(p) for p in descendants(pid(home, svc, component))]
    return found[0]


def ppid(p: int) -> int:
    try:
        return int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(p: int) -> str:
    try:
        return Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def fence(scratch: Path, task: str) -> int | None:
    """The try that holds a task's fence in the run's scratch."""
    try:
        return json.loads((scratch / "tries" / task).read_text())["try"]
    except (OSError, ValueError):
        return None


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def running(p: int) -> bool:
    try:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def tis(http: httpx.Client, run_id: str) -> dict[str, dict]:
    return {t["task_id"]: t for t in http.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]}


def attempts(worker_home: Path, run_id: str) -> dict[str, list[str]]:
    """The task logs this worker wrote for the run: task id -> attempt files."""
    out: dict[str, list[str]] = {}
    for f in sorted(worker_home.glob(f"logs/dag_id={DAG}/run_id={run_id}/task_id=*/attempt=*.log")):
        out.setdefault(f.parent.name.removeprefix("task_id="), []).append(f.name)
    return out


def test_lost_workers_retry_elsewhere_and_training_resumes_from_its_checkpoint(stack, home):
    svc, http = stack
    storage = Path(os.environ["FTOPS_STORAGE_ROOT"])
    upload = write_batch("brightdesk", storage / CUSTOMER / "inbox", n=80, dirty=False)
    # The same records again, 1200 times (two chunks): dedupe keeps none of them, but ingest takes seconds (time
    # to kill it).
    (upload.parent / "resent.jsonl").write_text(upload.read_text() * 1200)
    started = time.time()
    r = http.post(f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": {}})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    scratch = storage / CUSTOMER / "runs" / hashlib.sha256(run_id.encode()).hexdigest()[:12]

    # Lose the default worker's machine mid-ingest (ingest has begun, its summary is not written yet).
    deadline = time.time() + 180
    while not (scratch / "started").exists():
        assert time.time() < deadline, f"ingest never began: { {k: v['state'] for k, v in tis(http, run_id).items()} }"
        time.sleep(0.05)
    time.sleep(0.3)
    assert not (scratch / "data" / "ingest.json").exists(), "ingest finished before it could be interrupted"
    # All of it but the ingest task's own process: its supervisor and worker die, it lives on as an orphan, frozen
    # (a machine cut off from the scheduler). Thawed once the retry has claimed ingest's fence, its next write is
    # refused.
    orphan = task_process(home, svc, "worker-default", tis(http, run_id)["ingest"]["id"])
    try:
        lose(home, svc, "worker-default", home / "workers" / "default", spare=orphan)
        svc.run("start")  # the default worker's machine comes back (empty work folder: scratch is in storage)
        deadline = time.time() + 180
        while fence(scratch, "ingest") != 2:
            assert time.time() < deadline, (
                f"no retry of ingest: { {k: v['state'] for k, v in tis(http, run_id).items()} }"
            )
            time.sleep(0.1)
        os.kill(orphan, signal.SIGCONT)
        deadline = time.time() + 120
        while running(orphan):
            assert time.time() < deadline, "the orphaned ingest is still running"
            time.sleep(0.1)
    finally:
        if running(orphan):
            os.kill(orphan, signal.SIGKILL)
    refusal = (scratch / "tries" / "ingest.refused-1").read_text()
    assert "try 1 is stale (the fence names try 2)" in refusal, refusal
    print(f"the orphaned ingest (pid {orphan}) was refused: {refusal}")

    # Wait for a complete checkpoint in object storage, then lose the gpu worker's machine.
    deadline = time.time() + 420
    while not (marks := sorted(scratch.glob("checkpoints/checkpoint-*/COMPLETE"))):
        assert time.time() < deadline, f"no checkpoint: { {k: v['state'] for k, v in tis(http, run_id).items()} }"
        assert not (scratch / "train-result.json").exists(), "training finished before it could be interrupted"
        time.sleep(0.2)
    lose(home, svc, "worker-gpu1", home / "workers" / "gpu1")
    killed_at = int(marks[-1].parent.name.split("-")[1])
    assert not (scratch / "train-result.json").exists()

    # A replacement gpu worker on "another machine": its own FTOPS_HOME, nothing of gpu1's disk.
    after = Service("celery", dict(svc.env, GPU_WORKER_NAMES="gpu2"), svc.url)
    after.run("start")
    # The scheduler, killed mid-run and restarted, picks the run up where it was.
    lose(home, svc, "scheduler")
    after.run("start")

    deadline = time.time() + 480
    while (state := http.get(f"/dags/{DAG}/dagRuns/{run_id}").json()["state"]) not in ("success", "failed"):
        assert time.time() < deadline, f"run not finished: { {k: v['state'] for k, v in tis(http, run_id).items()} }"
        time.sleep(2)
    print(f"run finished ({state}) in {time.time() - started:.0f} s; killed after checkpoint {killed_at}")
    ti = tis(http, run_id)
    assert state == "success", {k: v["state"] for k, v in ti.items()}

    # Routing, from the Airflow REST API and from where each task's log was written.
    assert ti["train"]["queue"] == "gpu"
    assert {t["queue"] for k, t in ti.items() if k != "train"} == {"default"}
    assert ti["train"]["try_number"] == 2 and ti["ingest"]["try_number"] == 2  # the lost tries, then the retries
    gpu1, gpu2, default = (attempts(home / "workers" / w, run_id) for w in ("gpu1", "gpu2", "default"))
    assert gpu1 == {"train": ["attempt=1.log"]} and gpu2 == {"train": ["attempt=2.log"]}
    assert "train" not in default and {"ingest", "snapshot", "evaluate", "register"} <= set(default)
    assert "attempt=2.log" in default["ingest"]

    # The retry resumed from the lost try's last checkpoint in object storage, on a worker that never saw it
    # (the train task's result, from Airflow: the run's scratch is gone, removed by its cleanup teardown).
    assert not (scratch / "train-result.json").exists()
    xcom = http.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train/xcomEntries/return_value").json()["value"]
    result = json.loads(xcom) if isinstance(xcom, str) else xcom
    assert result["resumed_from_step"] >= killed_at > 0 and result["steps"] == 30
    print(f"resumed from step {result['resumed_from_step']} (last complete checkpoint seen: {killed_at})")

    # Exactly one of everything; the dataset version is named by the run (its start, its key), not by a try.
    datasets = [p.name for p in (storage / CUSTOMER / "datasets").iterdir() if p.is_dir()]
    run_start = http.get(f"/dags/{DAG}/dagRuns/{run_id}").json()["start_date"]
    assert len(datasets) == 1 and datasets[0].endswith(f"-{scratch.name}"), datasets
    assert datasets[0][:15] == run_start[:19].replace("-", "").replace(":", ""), (datasets, run_start)
    adapter = result["adapter_uri"].split("/")[-1]
    assert [p.name for p in (storage / CUSTOMER / "adapters" / "tiny").iterdir()] == [adapter]
    versions = Registry(os.environ["MLFLOW_TRACKING_URI"]).versions(CUSTOMER, "tiny")
    assert len(versions) == 1 and versions[0].tags["airflow.run_id"] == run_id
    assert versions[0].tags["adapter.version"] == adapter
    # Each worker worked in its own scratch: the retry's workdir is gpu2's, and the default worker trained nothing.
    assert (home / "workers" / "gpu2" / "work" / CUSTOMER).is_dir()
    assert not (home / "workers" / "default" / "work" / CUSTOMER / scratch.name / "train").exists()
