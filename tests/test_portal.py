"""The customer API (`ftops api`, started by scripts/services.sh) driven by the official `openai` client, as a
customer would: uploads validated by the ingest chain with the exact report, isolation between customers,
scopes, bad input (wrong purpose, empty, 2 GB, gzip bomb, a failed file, too many uploads, a hyper-parameter the
operator did not allow), erasure through `files.delete`, the page in headless Chromium; and fine-tuning jobs
against a real Airflow (standalone on PostgreSQL, the real DAG on the tiny model, a real MLflow): a job created
from an upload reaches `succeeded` with its `fine_tuned_model`, a gate failure surfaces as `failed` with the
reason, and a running job is cancelled."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from conftest import TEST_CUSTOMERS, _service, free_port
from ftops.release import keys

A, B, HASTY, TUNED, STRICT = "brightdesk", "sterling-law", "hasty-co", "acme-portal", "strict-gate"
UPLOAD_LIMIT = 64 << 20  # the service's FTOPS_DATA_MAX_FILE_BYTES here (production default: 1 GiB)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = [
    chat(f"How do I reset my password, case {i}?", f"Open settings, choose security, reset ({i}).") for i in range(8)
]
# Line numbers below are 1-based lines of this file, blank lines included.
MIXED = [
    json.dumps(GOOD[0]),
    json.dumps(chat("My email is jane.doe@example.com, please update it", "Done, the address is updated.")),
    '{"messages": [{"role": "user", "content": "cut off"',  # 3: malformed
    "",  # 4: blank, not a record
    json.dumps({"instruction": "Call me back at 415-555-0132 today", "output": "We will call you back today."}),
    "not json at all",  # 6: malformed
    json.dumps({"prompt": "only a prompt"}),  # 7: unknown schema
    *[json.dumps(g) for g in GOOD[1:]],  # 8-14
]
MIXED_REPORT = {
    "read": 13,
    "kept": 10,
    "dropped": {"malformed_json": 2, "unknown_schema": 1},
    "pii": {"EMAIL": 1, "PHONE": 1},
    "errors": [
        {"line": 3, "reason": "malformed_json"},
        {"line": 6, "reason": "malformed_json"},
        {"line": 7, "reason": "unknown_schema"},
    ],
    "errors_truncated": False,
    "rejected": None,
}


@pytest.fixture(scope="module")
def customers_file(tmp_path_factory, home):
    doc = yaml.safe_load(TEST_CUSTOMERS.read_text())
    # Runs start only from the API here: no data-volume trigger, and a weekly slot two days back (a newly
    # enabled DAG whose slot passed less than a tenth of a week ago runs at once: CronTriggerTimetable's rule)
    off = {"trigger_min_examples": None, "schedule_weekday": (datetime.now(UTC).weekday() - 2) % 7}
    doc["customers"] = [
        {"id": A, "name": "BrightDesk", **off, "api": {"allowed_hyperparameters": ["n_epochs"]}},
        {"id": B, "name": "Sterling & Vale LLP", **off},  # a short "Sterling" is in the tiny model's vocabulary
        {"id": HASTY, "name": "Hasty", **off, "api": {"uploads_per_minute": 3}},
        {"id": TUNED, "name": "Acme Portal", **off},
        {"id": STRICT, "name": "Strict Gate", **off, "gate": {"max_val_loss": 0.0001}},
    ]
    path = tmp_path_factory.mktemp("portal") / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    old = os.environ["FTOPS_CUSTOMERS"]
    os.environ["FTOPS_CUSTOMERS"] = str(path)
    yield path
    os.environ["FTOPS_CUSTOMERS"] = old


@pytest.fixture(scope="module")
def airflow_port():
    return free_port()


@pytest.fixture(scope="module")
def tokens(home):
    """Every key the tests use, made before the service starts (a key made within 0.25 s of a request the
    service refused is only seen at its next store check: the verifier rate-limits re-reads on a miss)."""
    combos = {(c, s) for c in (A, B, HASTY, TUNED, STRICT) for s in (("files", "jobs"), ("files",), ("inference",))}
    return {combo: keys.create(combo[0], scopes=combo[1])[1] for combo in combos}


# Airflow's users in this module, as docker-compose.yaml has them: the customer API reaches Airflow as its own
# service account with role `user` (trigger, cancel, read), never as an admin.
AIRFLOW_USERS = {"admin": ("admin", secrets.token_urlsafe(16)), "ftops-api": ("user", secrets.token_urlsafe(16))}


@pytest.fixture(scope="module")
def api(customers_file, mlflow_server, airflow_port, tokens):
    extra = {
        "FTOPS_AIRFLOW_URL": f"http://127.0.0.1:{airflow_port}",
        "FTOPS_AIRFLOW_USERNAME": "ftops-api",
        "FTOPS_AIRFLOW_PASSWORD": AIRFLOW_USERS["ftops-api"][1],
        "FTOPS_DATA_MAX_FILE_BYTES": str(UPLOAD_LIMIT),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    }
    yield from _service("api", extra, "API_PORT")


_TOKENS: dict = {}


@pytest.fixture(autouse=True)
def _tokens(tokens):
    _TOKENS.update(tokens)


def key(customer: str, *scopes: str) -> str:
    return _TOKENS[(customer, scopes or ("files", "jobs"))]


def client(api, k: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=k, max_retries=0, timeout=300)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def api_pid(api) -> int:
    return int((Path(os.environ["FTOPS_HOME"]) / "run" / f"api-{api.url.rsplit(':', 1)[1]}.pid").read_text())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- files --------------------------------------------------------------------------------------------------


def test_an_upload_is_validated_at_once_with_the_exact_report_and_lands_in_the_inbox(api, tmp_path, home):
    from ftops.data.ingest import InboxCounter

    c = client(api, key(A))
    waiting = InboxCounter(str(home / "storage"), A).pending()[0]  # what other tests of the session left
    f = c.files.create(file=write(tmp_path / "mixed.jsonl", MIXED).open("rb"), purpose="fine-tune")
    assert f.status == "processed" and f.purpose == "fine-tune" and f.filename == "mixed.jsonl"
    assert f.validation == MIXED_REPORT
    assert "jane.doe" not in json.dumps(f.model_dump())  # PII is counted, never returned
    assert [x.id for x in c.files.list()] == [f.id] and c.files.retrieve(f.id).validation == MIXED_REPORT
    # In the inbox under the file's id: the data-volume trigger counts its records, the next run ingests it
    assert (home / "storage" / A / "inbox" / f"{f.id}.jsonl").read_bytes() == (tmp_path / "mixed.jsonl").read_bytes()
    assert InboxCounter(str(home / "storage"), A).pending()[0] == waiting + 13
    again = c.files.create(file=("renamed.jsonl", (tmp_path / "mixed.jsonl").read_bytes()), purpose="fine-tune")
    assert again.id == f.id and again.model_extra["duplicate"] is True  # the same content is the same file
    assert len(c.files.list().data) == 1


def test_a_customer_sees_and_touches_only_its_own_files(api, tmp_path):
    own = client(api, key(A)).files.create(
        file=write(tmp_path / "a.jsonl", [json.dumps(g) for g in GOOD[:3]]).open("rb"), purpose="fine-tune"
    )
    other = client(api, key(B))
    assert other.files.list().data == []
    for call in (other.files.retrieve, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(own.id)
    assert client(api, key(A)).files.retrieve(own.id).status == "processed"  # untouched
    with pytest.raises(openai.AuthenticationError):
        client(api, "ftk_0000000000000000_" + "x" * 43).files.list()
    with pytest.raises(openai.PermissionDeniedError, match="files"):
        client(api, key(A, "inference")).files.list()  # an inference key (the default) opens vLLM only
    with pytest.raises(openai.PermissionDeniedError, match="jobs"):
        client(api, key(A, "files")).fine_tuning.jobs.list()
    assert httpx.get(f"{api.url}/v1/files").status_code == 401
    # A crafted job id cannot walk into another customer's DAG through Airflow's URL path
    from ftops.portal.jobs import job_id

    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job_id(f"../../finetune_{A}/dagRuns/x"))


def test_an_old_key_store_entry_means_inference_only(home):
    """Keys stored before scopes existed carry no `scopes`: vLLM's verifier still takes them, the API does not."""
    _, k = keys.create(A)
    path = keys.store_path()
    doc = json.loads(path.read_text())
    doc["keys"][k.split("_")[1]].pop("scopes")
    path.write_text(json.dumps(doc))
    assert keys.Verifier(recheck_s=0).customer(k, time.monotonic()) == A
    assert keys.Verifier(recheck_s=0, scope=None).lookup(k, time.monotonic()) == (A, ("inference",))
    _, files_only = keys.create(A, scopes=["files"])
    assert keys.Verifier(recheck_s=0).customer(files_only, time.monotonic() + 10) is None  # vLLM refuses it


def test_bad_uploads_get_a_clear_error_and_change_nothing(api, tmp_path, home):
    c = client(api, key(TUNED))
    good = write(tmp_path / "good.jsonl", [json.dumps(g) for g in GOOD])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=good.open("rb"), purpose="assistants")
    for empty in (b"", b"\n\n  \n"):
        with pytest.raises(openai.BadRequestError, match="empty"):
            c.files.create(file=("empty.jsonl", empty), purpose="fine-tune")
    # A gzip bomb: 1 GiB of spaces in 1 MB; ingest's compression-ratio limit stops it as it streams
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as z:
        for _ in range(1024):
            z.write(b" " * (1 << 20))
    f = c.files.create(file=bomb.open("rb"), purpose="fine-tune")
    assert f.status == "error" and f.status_details.startswith("too_large: compression ratio above 100:1")
    # 2 GB (a sparse file, read by the client as it sends): refused from its declared size, nothing kept,
    # and the service's memory does not move
    big = tmp_path / "big.jsonl"
    with big.open("wb") as fh:
        fh.truncate(2 << 30)
    before = rss_mb(api_pid(api))
    with pytest.raises(openai.APIStatusError) as err:
        c.files.create(file=big.open("rb"), purpose="fine-tune")
    assert err.value.status_code == 413 and "too large" in err.value.message
    assert rss_mb(api_pid(api)) - before < 50
    # A job from the file that failed validation is refused before any run starts
    with pytest.raises(openai.BadRequestError, match="failed validation"):
        c.fine_tuning.jobs.create(training_file=f.id, model="tiny")
    inbox = home / "storage" / TUNED / "inbox"
    assert not inbox.exists() or list(inbox.iterdir()) == []  # nothing landed
    assert not list((home / "work" / "portal").glob("*.part"))  # nor stayed in the spool
    # Only the hyper-parameters the operator allowed (none for this customer)
    ok = c.files.create(file=good.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        c.fine_tuning.jobs.create(training_file=ok.id, model="tiny", hyperparameters={"n_epochs": 2})
    with pytest.raises(openai.BadRequestError, match="not available"):
        c.fine_tuning.jobs.create(training_file=ok.id, model="gpt-4o")


def test_too_many_uploads_per_minute_are_refused_with_429(api, tmp_path):
    c = client(api, key(HASTY))
    for i in range(3):
        c.files.create(file=(f"{i}.jsonl", json.dumps(GOOD[i]).encode() + b"\n"), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as err:
        c.files.create(file=("3.jsonl", json.dumps(GOOD[3]).encode() + b"\n"), purpose="fine-tune")
    assert int(err.value.response.headers["retry-after"]) > 0
    assert len(c.files.list().data) == 3
    client(api, key(B)).files.create(
        file=("b.jsonl", json.dumps(GOOD[4]).encode()), purpose="fine-tune"
    )  # per customer


def test_deleting_a_file_erases_its_examples_and_reports_the_versions(api, tmp_path, home):
    """After a run stored the upload's examples in a dataset version, `files.delete` leaves a tombstone for
    each of them (never trained on or replayed again) and the upload leaves the inbox."""
    from ftops.config import load_platform
    from ftops.data import snapshot as snap
    from ftops.data.ingest import inbox_files
    from ftops.data.records import read_jsonl
    from ftops.data.tasks import prepare
    from ftops.storage import Store

    c = client(api, key(B))
    lines = [json.dumps(chat(f"Which clause covers notice, matter {i}?", f"Clause {i} covers it.")) for i in range(6)]
    f = c.files.create(file=write(tmp_path / "law.jsonl", lines).open("rb"), purpose="fine-tune")
    store = Store(str(home / "storage"))
    summary = prepare(store, B, inbox_files(f"{home / 'storage'}/{B}/inbox"), load_platform().customer(B).data)
    version = summary["dataset_version"]
    deleted = c.files.delete(f.id)
    report = deleted.model_extra["erasure"]
    assert deleted.deleted and report["examples"] == 6 and report["dataset_versions"] == {version: 6}
    assert report["adapter_versions"] == {"trained_on": [], "may_carry": []}  # no adapter trained on them yet
    rows = [
        r
        for split in ("train", "val")
        for r in read_jsonl(store.get(f"{B}/datasets/{version}/{split}.jsonl"))
        if r["source"] == f"{f.id}.jsonl"
    ]
    assert len(rows) == 6 and {r["id"] for r in rows} <= snap.tombstones(store, B)  # never trained on again
    assert not (home / "storage" / B / "inbox" / f"{f.id}.jsonl").exists()
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.APIStatusError) as err:
        c.files.create(file=(tmp_path / "law.jsonl").open("rb"), purpose="fine-tune")
    assert err.value.status_code == 409


def test_the_page_uploads_a_file_and_shows_its_report(api, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    page_file = write(tmp_path / "page-upload.jsonl", [*MIXED[:3], json.dumps(chat("page test", "page answer"))])
    try:
        driver.get(api.url + "/")
        driver.find_element(By.ID, "key").send_keys(key(STRICT))
        driver.find_element(By.ID, "file").send_keys(str(page_file))
        driver.find_element(By.CSS_SELECTOR, "#upload button").click()
        status = WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "report-status").text.strip())
        assert status.endswith("processed") and status.startswith("file-")
        report = json.loads(driver.find_element(By.ID, "report").text)
        assert report["read"] == 4 and report["dropped"] == {"malformed_json": 1} and report["pii"] == {"EMAIL": 1}
        WebDriverWait(driver, 30).until(lambda d: "processed" in d.find_element(By.ID, "files").text)
        assert status.split(":")[0] in driver.find_element(By.ID, "files").text
        # no script error (a failed request, e.g. jobs while no scheduler runs, is shown in the page instead)
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    finally:
        driver.quit()


# --- jobs, against a real Airflow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow(api, home, tiny_model, postgres, airflow_port, customers_file):
    ah = home / "airflow-portal"
    ah.mkdir()
    (ah / "passwords.json").write_text(json.dumps({u: pw for u, (_, pw) in AIRFLOW_USERS.items()}))
    extra = {
        "AIRFLOW_HOME": str(ah),
        **postgres,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{role}" for u, (role, _) in AIRFLOW_USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(ah / "passwords.json"),
    }
    for svc in _service("airflow", extra, "AIRFLOW_PORT", airflow_port):
        r = httpx.post(
            f"{svc.url}/auth/token", json={"username": "admin", "password": AIRFLOW_USERS["admin"][1]}, timeout=60
        )
        assert r.status_code in (200, 201), r.text
        http = httpx.Client(
            base_url=f"{svc.url}/api/v2", timeout=60, headers={"Authorization": f"Bearer {r.json()['access_token']}"}
        )
        deadline = time.time() + 180
        while any(http.get(f"/dags/finetune_{c}").status_code != 200 for c in (TUNED, STRICT)):
            assert time.time() < deadline, "the DAGs never appeared"
            time.sleep(2)
        yield http


def wait_job(c: openai.OpenAI, job_id: str, timeout: float, until=("succeeded", "failed", "cancelled")):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        try:
            job = c.fine_tuning.jobs.retrieve(job_id)
        except openai.APIStatusError as exc:  # 503: Airflow's API slow under load; the service says so, we wait
            assert exc.status_code == 503, exc
            time.sleep(3)
            continue
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in until:
            return job, seen
        time.sleep(3)
    raise AssertionError(f"{job_id} still {seen} after {timeout} s")


JOB_TIMEOUT = 1500  # a whole run on the tiny model: minutes alone, much longer on a loaded 2-core machine


@pytest.fixture(scope="module")
def strict_job(api, airflow, tokens, tmp_path_factory):
    """A job for the customer whose gate no candidate passes, started early so that it runs beside the others."""
    from ftops.data.demo import write_batch

    c = client(api, tokens[(STRICT, ("files", "jobs"))])
    path = write_batch(B, tmp_path_factory.mktemp("strict"), n=60, batch=8, dirty=False)
    f = c.files.create(file=path.open("rb"), purpose="fine-tune")
    return c, c.fine_tuning.jobs.create(training_file=f.id, model="tiny").id


def test_a_job_from_an_upload_runs_the_real_dag_and_reports_its_model(api, airflow, strict_job, tmp_path, vllm_server):
    from ftops.data.demo import write_batch

    # The customer's own kind of data: the gate's safety check refuses answers naming another customer
    c = client(api, key(A))
    data = write_batch(A, tmp_path, n=60, batch=7, dirty=False)
    f = c.files.create(file=data.open("rb"), purpose="fine-tune")
    assert f.status == "processed"
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny", hyperparameters={"n_epochs": 1})
    assert job.status in ("queued", "validating_files", "running") and job.training_file == f.id
    job, seen = wait_job(c, job.id, JOB_TIMEOUT)
    assert job.status == "succeeded", (seen, job.error)
    assert job.fine_tuned_model == A and job.trained_tokens and job.trained_tokens > 0
    assert [j.id for j in c.fine_tuning.jobs.list()] == [job.id]
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id)]
    assert "train success" in messages and any(m.startswith("Gate passed") for m in messages)
    assert any(m.startswith("Promoted") for m in messages)
    (ckpt,) = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.fine_tuned_model_checkpoint.startswith(f"{A}@") and ckpt.metrics.model_extra["gate"] == "passed"
    # Another customer cannot see the job
    with pytest.raises(openai.NotFoundError):
        client(api, key(B)).fine_tuning.jobs.retrieve(job.id)

    # The model the job names is what the customer then calls. The promotion's asset event starts the sync DAG,
    # which loads it on the replica (this module's Airflow knows the test vLLM); the reconciler run here again
    # (only for this customer: the replica is shared with other modules) finds it served or loads it.
    from ftops.config import load_platform, settings
    from ftops.release.registry import Registry
    from ftops.release.serving import Plan, Replica, reconcile
    from ftops.release.tasks import plan_serving
    from ftops.storage import Store

    env = settings()
    plan = plan_serving(load_platform(env.customers_file), Registry(env.mlflow_uri))
    desired = [d for d in plan.serve if d.customer == A]
    assert [f"{A}@{d.registry_version}" for d in desired] == [ckpt.fine_tuned_model_checkpoint]
    plan = Plan(serve=desired, customers={A}, removal_blocked="this test serves one customer")
    report = reconcile(plan, [vllm_server.url], env.vllm_adapter_dir, Store(env.storage_root))
    assert not [e for e in report.errors if f"{A}:" in e or f" {A} " in e], report
    assert Replica(vllm_server.url).adapters()[A].endswith(desired[0].adapter_version)
    inference = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=key(A, "inference"), max_retries=0)
    answer = inference.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "How do I reset my password?"}], max_tokens=8
    )
    assert answer.model == A and answer.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError):  # and only that customer: B's key cannot call A's model
        openai.OpenAI(
            base_url=f"{vllm_server.url}/v1", api_key=key(B, "inference"), max_retries=0
        ).chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )


def test_a_gate_failure_surfaces_as_failed_with_the_reason(strict_job):
    c, job_id = strict_job
    job, seen = wait_job(c, job_id, JOB_TIMEOUT)
    assert job.status == "failed", seen
    assert job.error.code == "gate_failed", job.error
    assert "val_loss" in job.error.message and "ceiling" in job.error.message, job.error
    assert job.fine_tuned_model is None


def test_a_running_job_is_cancelled(api, airflow, tmp_path):
    from ftops.data.demo import write_batch

    c = client(api, key(TUNED))
    f = c.files.create(file=write_batch(A, tmp_path, n=40, batch=9, dirty=False).open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny")
    wait_job(c, job.id, JOB_TIMEOUT, until=("validating_files", "running", "succeeded", "failed"))
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert airflow.get(f"/dags/finetune_{TUNED}/dagRuns/{cancelled.metadata['run_id']}").json()["state"] in (
        "failed",
        "success",  # Airflow ends a run marked failed as success when all it had left was skipped
    )
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)
