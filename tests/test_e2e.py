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
from ftops.demo_data import write_batch
from ftops.registry import Registry
from ftops.serving import Replica

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
    assert tree_hashes(stack["home"] / "storage" / first.adapter_prefix) == first_files
    assert reg.get(CUSTOMER, BASE, "1").source == first.source


def test_a_run_with_no_new_data_skips_training_and_registers_nothing(stack):
    log = dag_test(f"finetune_{CUSTOMER}")
    assert run_state(log) == "success"
    assert "no new examples" in log
    assert len(stack["registry"].versions(CUSTOMER, BASE)) == 2
