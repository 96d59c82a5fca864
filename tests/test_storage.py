"""One storage interface for local disk and S3 (a real SeaweedFS server): write-once versions, atomic
downloads, and the data stage reading an `s3://` inbox and writing its dataset version to S3."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest

from ftops.storage import AlreadyExists, Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    request.getfixturevalue("s3_server")
    return Store(f"s3://ftops/test-{uuid.uuid4().hex[:8]}")


def test_write_once_list_get(store):
    store.put("acme/datasets/v1/train.jsonl", b"one")
    with pytest.raises(AlreadyExists):
        store.put("acme/datasets/v1/train.jsonl", b"two")
    assert store.get("acme/datasets/v1/train.jsonl") == b"one"
    store.put("acme/runs/r1/scratch.json", b"a")
    store.put("acme/runs/r1/scratch.json", b"b", overwrite=True)  # scratch is explicitly rewritable
    assert store.get("acme/runs/r1/scratch.json") == b"b"
    assert store.list("acme/datasets") == ["acme/datasets/v1/train.jsonl"]
    assert store.exists("acme/datasets/v1/train.jsonl") and not store.exists("acme/datasets/v2/train.jsonl")
    with pytest.raises(FileNotFoundError):
        store.get("acme/nothing")


def test_listing_tells_what_changed_without_reading(store):
    """What the inbox trigger polls with: one level of names, and a token per object that moves on change."""
    store.put("acme/inbox/a.jsonl", b"one")
    store.put("acme/inbox/deep/b.jsonl", b"two")
    store.put("acme/datasets/v1/manifest.json", b"{}")
    store.put("acme/datasets/v2/train.jsonl", b"")
    assert store.children("acme/datasets") == ["v1", "v2"] and store.children("acme/none") == []
    before = store.list_info("acme/inbox")
    assert sorted(before) == ["acme/inbox/a.jsonl", "acme/inbox/deep/b.jsonl"]
    store.put("acme/inbox/a.jsonl", b"one, longer", overwrite=True)  # a customer re-uploads a file
    after = store.list_info("acme/inbox")
    assert after["acme/inbox/a.jsonl"] != before["acme/inbox/a.jsonl"]
    assert after["acme/inbox/deep/b.jsonl"] == before["acme/inbox/deep/b.jsonl"]


def test_upload_dir_is_write_once_and_download_is_atomic(store, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    store.upload_dir(src, "acme/adapters/tiny/v1")
    store.upload_dir(src, "acme/adapters/tiny/v1")  # a retry re-uploading the same bytes changes nothing
    (src / "sub" / "w.bin").write_bytes(b"\x09")
    with pytest.raises(AlreadyExists):
        store.upload_dir(src, "acme/adapters/tiny/v1")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    out = store.download_dir("acme/adapters/tiny/v1", tmp_path / "copy" / "v1")
    assert (out / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert not [p for p in (tmp_path / "copy").iterdir() if p.name.startswith(".partial-")]
    with pytest.raises(FileNotFoundError):
        store.download_dir("acme/adapters/tiny/missing", tmp_path / "copy" / "missing")
    assert not (tmp_path / "copy" / "missing").exists()


def test_data_stage_on_s3_inbox_and_versions(s3_server, monkeypatch):
    from ftops.data import tasks as data
    from ftops.data.demo import write_batch
    from ftops.run import Run

    root = f"s3://ftops/e2e-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", root)
    store = Store(root)
    with tempfile.TemporaryDirectory() as d:
        path = write_batch("brightdesk", Path(d), n=40)
        store.put("brightdesk/inbox/upload-1.jsonl", path.read_bytes())
    run = Run("brightdesk", "s3-test-run")
    ingested = data.ingest(run)
    assert ingested["new_files"] == ["upload-1.jsonl"]
    data.validate(run, ingested["scratch_key"])
    data.clean(run, ingested["scratch_key"])
    data.dedupe(run)
    snap = data.snapshot(run)
    assert snap["dataset_uri"].startswith(root) and snap["kept"] > 30
    assert store.exists(f"brightdesk/datasets/{snap['dataset_version']}/manifest.json")
    # A retried snapshot task returns the version it wrote instead of writing another.
    assert data.snapshot(run) == snap
    # Customer isolation: nothing was written outside the customer's prefix.
    assert all(k.startswith("brightdesk/") for k in store.list(""))


def test_mlflow_with_its_artifacts_on_s3_registers_and_serves_an_adapter(s3_server, tmp_path):
    """MLflow's artifact store on the S3 server: an adapter logged by a run, registered, read back intact."""
    from mlflow import MlflowClient

    from conftest import _service

    extra = {
        "MLFLOW_ARTIFACTS": "s3://mlflow/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.url,
        "MLFLOW_BACKEND": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for svc in _service("mlflow", extra, "MLFLOW_PORT"):
        client = MlflowClient(svc.url, svc.url)
        run = client.create_run(client.create_experiment("s3-artifacts"))
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"\x01\x02" * 1000)
        client.log_artifacts(run.info.run_id, str(adapter), "adapter")
        client.create_registered_model("ftops-acme-tiny")
        mv = client.create_model_version("ftops-acme-tiny", f"{run.info.artifact_uri}/adapter", run.info.run_id)
        assert mv.version == "1"
        keys = Store("s3://mlflow/artifacts").list("")
        assert any(k.endswith("adapter/adapter_model.safetensors") for k in keys)  # it really lives on S3
        out = client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "back"))
        assert (Path(out) / "adapter_model.safetensors").read_bytes() == b"\x01\x02" * 1000
