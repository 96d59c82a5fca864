"""Shared fixtures: an isolated FTOPS_HOME, the tiny test model, and real services started by the
project's own scripts (scripts/services.sh), stopped at the end of the session even when tests fail."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_CUSTOMERS = ROOT / "tests" / "data" / "customers.yaml"


def wait_run(http, run: str, timeout: float) -> str:
    """Poll an Airflow DAG run (`run`: its REST path, from `http`'s base URL) until it ends; its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = http.get(run).json()["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    raise AssertionError(f"{run} did not finish in {timeout} s")


def trained_hand_off(adapter_version: str, adapter_prefix: str, adapter_uri: str, artifact_uri: str = "") -> dict:
    """The train task's hand-off (`ftops.handoffs.Trained`) for an adapter already in storage, with no training
    figures: what evaluate and register read, for tests that start from an existing adapter."""
    from ftops.config import LoraSettings
    from ftops.handoffs import Trained

    return Trained(
        adapter_version=adapter_version,
        adapter_prefix=adapter_prefix,
        adapter_uri=adapter_uri,
        adapter_artifact_uri=artifact_uri,
        mlflow_run_id="",
        dataset_version="",
        new_versions=[],
        replayed=0,
        train_examples=0,
        lora=LoraSettings(),
    ).model_dump()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _mlflow_uri_unchanged():
    """A test that trains in-process calls `mlflow.set_tracking_uri`, which also sets MLFLOW_TRACKING_URI in
    os.environ (for subprocesses): left so, every later `ftops` command and DAG run of the session would write
    to that test's store instead of the session's MLflow server."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") == before:
        return
    import sys

    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:  # its own global too (it answers before the environment)
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """An FTOPS_HOME for the session; the environment points every ftops component at it."""
    home = tmp_path_factory.mktemp("ftops-home")
    os.environ.update(
        {
            "FTOPS_HOME": str(home),
            "FTOPS_CUSTOMERS": str(TEST_CUSTOMERS),
            "FTOPS_MODELS_DIR": str(home / "models"),
            "FTOPS_STORAGE_ROOT": str(home / "storage"),
        }
    )
    return home


@pytest.fixture(scope="session")
def tiny_model(home) -> Path:
    from ftops.model.base_models import build_tiny

    return build_tiny(home / "models" / "tiny-llama")


class Service:
    def __init__(self, name: str, env: dict[str, str], url: str):
        self.name, self.env, self.url = name, env, url

    def run(self, action: str) -> None:
        subprocess.run(
            [str(ROOT / "scripts" / "services.sh"), action, self.name], env=self.env, check=True, timeout=400
        )


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _service(name: str, extra: dict[str, str], port_var: str, port: int | None = None):
    port = port or free_port()
    env = dict(os.environ, **extra, **{port_var: str(port)})
    svc = Service(name, env, f"http://127.0.0.1:{port}")
    try:
        svc.run("start")
        yield svc
    finally:
        svc.run("stop")


@pytest.fixture(scope="module")
def postgres(home):
    """Airflow's metadata database, PostgreSQL as in production (one per module): SQLite stalls under the
    standalone's concurrent writers (a 30 s API stall failed a run of this suite). Yields Airflow's settings."""
    for svc in _service("postgres", {"PG_DATABASES": "airflow"}, "PG_PORT"):
        where = f"postgres@127.0.0.1:{svc.url.rsplit(':', 1)[1]}/airflow"
        yield {  # psycopg 3 for both engines (Airflow would pick asyncpg for the async one)
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg://{where}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+psycopg_async://{where}",
        }


@pytest.fixture(scope="session")
def s3_server(home):
    """A real S3-compatible server (SeaweedFS); its components use S3_PORT..S3_PORT+5 (+10000 for gRPC)."""
    port = next(p for p in range(21000, 30000, 10) if all(_free(p + i) and _free(p + i + 10000) for i in range(6)))
    creds = {"AWS_ACCESS_KEY_ID": "ftops", "AWS_SECRET_ACCESS_KEY": "ftops-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for svc in _service("s3", creds | {"S3_BUCKETS": "ftops,mlflow"}, "S3_PORT", port):
        os.environ.update(creds | {"AWS_ENDPOINT_URL": svc.url})
        yield svc


@pytest.fixture(scope="session")
def mlflow_server(home):
    for svc in _service("mlflow", {}, "MLFLOW_PORT"):
        os.environ["MLFLOW_TRACKING_URI"] = svc.url
        yield svc


@pytest.fixture(scope="session")
def vllm_server(home, tiny_model):
    for svc in _service("vllm", {"VLLM_MODEL": str(tiny_model)}, "VLLM_PORT"):
        os.environ["FTOPS_VLLM_URLS"] = svc.url
        yield svc
