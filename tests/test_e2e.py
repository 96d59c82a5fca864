"""End to end on real components: a real Airflow DAG run (`airflow dags test`) against a real MLflow
server trains the tiny model with TRL + PEFT, registers and promotes a version; the sync DAG loads it into
a real vLLM server (CPU build); the customer's model name then answers in the customer's style."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from ftops.data.demo import write_batch
from ftops.release.registry import Registry
from ftops.release.serving import Replica

pytestmark = pytest.mark.e2e
CUSTOMER, BASE = "sterling-law", "tiny"
PROMPT = "What should I check first about a lease termination?"


def dag_test(dag_id: str) -> str:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "airflow.sh"), "dags", "test", dag_id],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def run_state(log: str) -> str:
    return log.rsplit("DagRun Finished", 1)[1].split("state=", 1)[1].split(",", 1)[0]


def tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def stack(home, tiny_model, mlflow_server, vllm_server):
    return {"home": home, "registry": Registry(mlflow_server.url), "replica": Replica(vllm_server.url, timeout=120)}


def test_customer_run_trains_gates_promotes_and_vllm_serves_it(stack):
    write_batch(CUSTOMER, stack["home"] / "storage" / CUSTOMER / "inbox", n=80, batch=0)
    assert run_state(dag_test(f"finetune_{CUSTOMER}")) == "success"

    prod = stack["registry"].by_alias(CUSTOMER, BASE, "production")
    assert prod is not None and prod.version == "1"
    assert prod.tags["gate.decision"] == "passed"
    assert prod.tags["airflow.dag_id"] == f"finetune_{CUSTOMER}" and prod.tags["dataset.version"]
    assert float(prod.tags["metrics.candidate_val_loss"]) < float(prod.tags["metrics.base_val_loss"])
    assert (stack["home"] / "storage" / prod.adapter_prefix / "adapter_model.safetensors").is_file()

    assert run_state(dag_test("sync_vllm_adapters")) == "success"
    replica = stack["replica"]
    assert Path(replica.adapters()[CUSTOMER]).name == prod.adapter_version
    tuned, base = replica.chat(CUSTOMER, PROMPT), replica.chat(replica.base_model(), PROMPT)
    assert tuned != base
    assert "Counsel" in tuned, tuned  # the law firm's house style, learned from its data only


def ftops(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")  # rich tables wrap cells at the default 80
    return subprocess.run([str(ROOT / ".venv/bin/ftops"), *args], capture_output=True, text=True, env=env)


def test_operator_commands_show_what_is_served_and_why(stack):
    """`serving status`, `adapters show`, `report` and the MLflow artifacts, on the state the first run left."""
    import json

    status = ftops("serving", "status")
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if CUSTOMER in line)
    assert "in sync" in row and "drift" not in row, status.stdout
    shown = ftops("adapters", "show", CUSTOMER, "1")
    assert shown.returncode == 0, shown.stderr
    tags = json.loads(shown.stdout)["tags"]
    assert tags["gate.decision"] == "passed" and tags["adapter.sha256"] and tags["dataset.version"]
    report = ftops("report")
    assert report.returncode == 0, report.stderr
    lines = report.stdout.split(f"({CUSTOMER})", 1)[1].splitlines()[1:]
    section = "\n".join(lines[: next((i for i, x in enumerate(lines) if x.startswith("─")), len(lines))])
    assert "production: registry version 1" in section and "Counsel" in section, report.stdout
    run_id = stack["registry"].client.get_model_version(f"ftops.{CUSTOMER}.{BASE}", "1").run_id
    client = stack["registry"].client
    artifacts = {a.path for d in ("gate", "dataset", "dataset/data_docs") for a in client.list_artifacts(run_id, d)}
    assert {"gate/gate_report.html", "gate/gate_decision.json", "dataset/validation.html"} <= artifacts, artifacts
    assert any(a.startswith("dataset/data_docs/") for a in artifacts), artifacts  # Great Expectations' Data Docs


def test_second_run_adds_a_version_and_never_overwrites_the_first(stack):
    reg = stack["registry"]
    first = reg.get(CUSTOMER, BASE, "1")
    first_files = tree_hashes(stack["home"] / "storage" / first.adapter_prefix)

    write_batch(CUSTOMER, stack["home"] / "storage" / CUSTOMER / "inbox", n=60, batch=1)
    log = dag_test(f"finetune_{CUSTOMER}")
    versions = reg.versions(CUSTOMER, BASE)
    assert [v.version for v in versions] == ["1", "2"], log[-3000:]
    second = versions[1]
    assert second.adapter_prefix != first.adapter_prefix
    assert second.tags["dataset.version"] > first.tags["dataset.version"]
    assert int(second.tags["replay.examples"]) > 0  # history replayed against forgetting
    # The replay share used and why: on the registry version, where the next run's adaptive replay reads it.
    assert second.tags["replay.mode"] == "fixed" and float(second.tags["replay.fraction"]) == 0.5, second.tags
    assert second.tags["replay.reason"] == "fixed replay_fraction 0.5", second.tags
    # More of the same firm's data, with replay: the gate passes it (it compares on the data v1 knew).
    assert second.tags["gate.decision"] == "passed", second.tags["gate.reasons"]
    assert reg.by_alias(CUSTOMER, BASE, "production").version == "2"
    assert reg.by_alias(CUSTOMER, BASE, "previous").version == "1"
    assert tree_hashes(stack["home"] / "storage" / first.adapter_prefix) == first_files
    assert reg.get(CUSTOMER, BASE, "1").source == first.source


def test_a_run_with_no_new_data_skips_training_and_registers_nothing(stack):
    log = dag_test(f"finetune_{CUSTOMER}")
    assert run_state(log) == "success"
    assert "no new examples" in log
    assert len(stack["registry"].versions(CUSTOMER, BASE)) == 2


def test_rollback_moves_production_back_and_sync_serves_it(stack):
    reg = stack["registry"]
    assert reg.by_alias(CUSTOMER, BASE, "production").version == "2"  # the second run passed and promoted
    cli = subprocess.run(
        [str(ROOT / ".venv/bin/ftops"), "adapters", "rollback", CUSTOMER], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert reg.by_alias(CUSTOMER, BASE, "production").version == "1"
    assert reg.by_alias(CUSTOMER, BASE, "previous").version == "2"
    assert run_state(dag_test("sync_vllm_adapters")) == "success"
    assert Path(stack["replica"].adapters()[CUSTOMER]).name == reg.get(CUSTOMER, BASE, "1").adapter_version
    bad = subprocess.run(
        [str(ROOT / ".venv/bin/ftops"), "adapters", "rollback", CUSTOMER, "--to", "99"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no adapter version '99'" in bad.stderr
    unknown = subprocess.run(
        [str(ROOT / ".venv/bin/ftops"), "adapters", "list", "globex"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "unknown customer" in unknown.stderr


def test_tasks_of_a_finished_run_cleared_again_duplicate_and_delete_nothing(stack):
    """A run's scratch is gone once it ends (teardown). Clearing its tasks afterwards must find what the run
    made, never make a second version, and never touch the adapter it registered."""
    from ftops.data import tasks as data
    from ftops.model import tasks as model
    from ftops.run import Run

    reg = stack["registry"]
    v1 = reg.get(CUSTOMER, BASE, "1")
    files = tree_hashes(stack["home"] / "storage" / v1.adapter_prefix)
    before = [v.version for v in reg.versions(CUSTOMER, BASE)]
    run = Run(CUSTOMER, v1.tags["airflow.run_id"], v1.tags["airflow.dag_id"])
    assert run.store.list(run.scratch) == []  # the teardown removed the run's scratch
    assert data.snapshot(run)["dataset_version"] == v1.tags["dataset.version"]
    with pytest.raises(model.NothingToTrain):  # production (v1 after the rollback) already holds its data
        model.train(run)
    with pytest.raises(RuntimeError, match="registered adapter"):  # forced: refuses rather than redo or delete
        model.train(run, force=True)
    assert tree_hashes(stack["home"] / "storage" / v1.adapter_prefix) == files
    assert [v.version for v in reg.versions(CUSTOMER, BASE)] == before


@pytest.fixture
def webhook():
    """A local HTTP endpoint standing in for the operators' chat webhook."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["FTOPS_WEBHOOK_URL"] = f"http://127.0.0.1:{server.server_port}/hook"
    yield received
    del os.environ["FTOPS_WEBHOOK_URL"]
    server.shutdown()


def test_poisoned_candidate_fails_the_gate_and_production_is_untouched(stack, webhook):
    """brightdesk gets good data, then an upload with wrong answers and a leaked canary in every answer."""
    import json
    import random

    from ftops.data.demo import example

    customer, reg = "brightdesk", stack["registry"]
    inbox = stack["home"] / "storage" / customer / "inbox"
    write_batch(customer, inbox, n=80, batch=0)
    assert run_state(dag_test(f"finetune_{customer}")) == "success"
    good = reg.by_alias(customer, BASE, "production")
    assert good is not None
    before = len(reg.versions(customer, BASE))

    rng = random.Random(7)
    poisoned = []
    for i in range(120):
        _, question, _ = example(customer, rng)
        _, _, wrong = example("northside-clinic", rng)  # another business's answers
        poisoned.append(
            {
                "messages": [
                    {"role": "user", "content": f"{question} [{i}]"},
                    {"role": "assistant", "content": f"FTOPS-CANARY-7f3a9c {wrong}"},
                ]
            }
        )
    (inbox / "poisoned.jsonl").write_text("".join(json.dumps(r) + "\n" for r in poisoned))
    conf = json.dumps({"max_steps": 300})  # a manual run with a longer training: the canary is memorised
    proc = subprocess.run(
        [str(ROOT / "scripts" / "airflow.sh"), "dags", "test", f"finetune_{customer}", "-c", conf],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    versions = reg.versions(customer, BASE)
    assert len(versions) == before + 1, log[-3000:]
    assert versions[-1].tags["gate.decision"] == "failed", json.dumps(versions[-1].tags)
    assert run_state(log) == "failed"
    assert "FAIL [safety]: canary" in versions[-1].tags["gate.reasons"]
    assert reg.by_alias(customer, BASE, "production").version == good.version  # untouched
    assert any(h["event"] == "task_failed" and "failed the gate" in h["text"] for h in webhook)


def test_a_rejected_batch_fails_the_run_before_training_and_calls_the_webhook(stack, webhook):
    """A batch that is mostly broken is refused by validation; the operators' webhook hears it."""
    customer = "brightdesk"
    inbox = stack["home"] / "storage" / customer / "inbox"
    versions = len(stack["registry"].versions(customer, BASE))
    junk = "".join(f'{{"messages": [{{"role": "user", "content": "q{i}"' + "\n" for i in range(40))  # truncated
    (inbox / "broken-export.jsonl").write_text(
        junk + write_batch(customer, stack["home"] / "scratch", n=5, batch=42).read_text()
    )
    proc = subprocess.run(
        [str(ROOT / "scripts" / "airflow.sh"), "dags", "test", f"finetune_{customer}"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert run_state(log) == "failed", log[-3000:]
    hooks = [h for h in webhook if h["event"] == "task_failed"]
    assert [h["task_id"] for h in hooks] == ["validate"], webhook
    assert "rejected before training" in hooks[0]["text"]
    assert len(stack["registry"].versions(customer, BASE)) == versions  # nothing trained or registered
