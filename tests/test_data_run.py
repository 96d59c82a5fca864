"""The DAG's data tasks (`pipeline.ingest` … `pipeline.snapshot`) run the one chain and leave no raw data in scratch;
scratch goes when a run ends and expires when a killed run leaves it."""

from __future__ import annotations

import json
import time

import pytest

from ftops import pipeline
from ftops import snapshot as snap
from ftops.demo_data import write_batch
from ftops.storage import Store
from ftops.validate import ValidationFailed


def test_data_tasks_share_one_chain_and_keep_no_raw_data_in_scratch(home):
    run = pipeline.Run("brightdesk", "manual__data-1", "finetune_brightdesk")
    inbox = home / "storage" / "brightdesk" / "inbox"
    write_batch("brightdesk", inbox, n=40, batch=0)  # dirty: duplicates, junk lines, PII
    ingested = pipeline.ingest(run)
    validated = pipeline.validate(run)
    cleaned = pipeline.clean(run)
    deduped = pipeline.dedupe(run)
    out = pipeline.snapshot(run)
    assert ingested["read"] == out["read"] == out["kept"] + sum(out["dropped"].values())
    assert ingested["examples"] >= validated["examples"] >= cleaned["examples"] >= deduped["examples"] == out["kept"]
    assert out["dataset_version"] and out["train"] + out["val"] == out["kept"]
    assert pipeline.snapshot(run) == out  # a retried task returns the same version
    assert [m["version"] for m in snap.versions(run.store, "brightdesk")] == [out["dataset_version"]]
    scratch = run.store.list(run.scratch)
    assert sorted(k.rsplit("/", 1)[1] for k in scratch) == ["prepare.json", "started"]
    assert "@" not in run.store.get(f"{run.scratch}/prepare.json").decode()
    assert not list((home / "work" / "spill").glob("ftops-prepare-*"))
    assert pipeline.cleanup(run)["removed_objects"] == 2 and run.store.list(run.scratch) == []
    assert pipeline.snapshot(run) == out  # a task retried after cleanup finds the version by its run


def test_a_rejected_batch_fails_the_validate_task_and_writes_nothing(home):
    run = pipeline.Run("sterling-law", "manual__junk", "finetune_sterling-law")
    Store(run.env.storage_root).put("sterling-law/inbox/junk.jsonl", b"not json\n" * 9 + b'{"x": 1}\n')
    assert pipeline.ingest(run)["read"] == 10
    with pytest.raises(ValidationFailed, match="status"):
        pipeline.validate(run)
    assert snap.versions(run.store, "sterling-law") == []


def test_scratch_left_by_a_killed_run_expires(home, monkeypatch):
    store = Store(str(home / "storage"))
    store.put("brightdesk/runs/old1/started", str(time.time() - 3 * 86400).encode())
    store.put("brightdesk/runs/old1/train.json", json.dumps({"x": 1}).encode())
    (home / "work" / "brightdesk" / "old1").mkdir(parents=True)
    store.put("brightdesk/runs/new1/started", str(time.time()).encode())
    store.put("brightdesk/runs/legacy/eval.json", b"{}")
    monkeypatch.setenv("FTOPS_SCRATCH_RETENTION_HOURS", "48")
    assert pipeline.expire_scratch(store, "brightdesk", home) == ["old1"]
    assert store.list("brightdesk/runs/old1") == [] and not (home / "work" / "brightdesk" / "old1").exists()
    assert store.exists("brightdesk/runs/new1/started")
    assert store.exists("brightdesk/runs/legacy/started")  # first seen now: expires one retention later
    assert pipeline.expire_scratch(store, "brightdesk", home, max_age_s=0) == ["legacy", "new1"]


def test_on_s3_files_stream_limits_hold_and_cleanup_removes_scratch(s3_server, monkeypatch):
    import gzip
    import uuid

    from ftops.ingest import InboxCounter

    root = f"s3://ftops/hostile-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", root)
    monkeypatch.setenv("FTOPS_DATA_MAX_RECORDS_PER_FILE", "50")
    store = Store(root)
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
        for i in range(60)
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    store.put("brightdesk/inbox/ok.jsonl.gz", gzip.compress(data[: data.index(b"\n", 2000) + 1]))
    store.put("brightdesk/inbox/big.jsonl", data)  # 60 records > 50
    assert 0 < InboxCounter(root, "brightdesk").pending()[0] < 50  # the too-large file counts nothing
    run = pipeline.Run("brightdesk", "s3-hostile", "finetune_brightdesk")
    pipeline.ingest(run)
    out = pipeline.snapshot(run)
    assert out["dropped"] == {"too_large": 1} and out["kept"] > 0
    assert pipeline.cleanup(run)["removed_objects"] == 2 and store.list(run.scratch) == []
