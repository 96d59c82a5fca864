"""The DAG's data tasks (`data.ingest` … `data.snapshot`) each do their step and leave no readable raw text in scratch;
scratch goes when a run ends and expires when a killed run leaves it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from ftops.data import snapshot as snap
from ftops.data import tasks as data
from ftops.data.demo import write_batch
from ftops.data.validate import ValidationFailed
from ftops.run import Run
from ftops.storage import StaleTry, Store


def test_data_tasks_share_one_chain_and_keep_no_raw_data_in_scratch(home):
    run = Run("brightdesk", "manual__data-1", "finetune_brightdesk")
    inbox = home / "storage" / "brightdesk" / "inbox"
    upload = write_batch("brightdesk", inbox, n=40, batch=0)  # dirty: duplicates, junk lines, PII
    pii = {"messages": [{"role": "user", "content": "Mail?"}, {"role": "assistant", "content": "jane.doe@example.com"}]}
    upload.write_text(upload.read_text() + json.dumps(pii) + "\n")
    ingested = data.ingest(run)
    validated = data.validate(run, ingested["scratch_key"])
    cleaned = data.clean(run, ingested["scratch_key"])
    deduped = data.dedupe(run)
    out = data.snapshot(run)
    assert ingested["read"] == out["read"] == out["kept"] + sum(out["dropped"].values())
    assert ingested["examples"] >= validated["examples"] >= cleaned["examples"] >= deduped["examples"] == out["kept"]
    assert out["dataset_version"] and out["train"] + out["val"] == out["kept"]
    assert data.snapshot(run) == out  # a retried task returns the same version
    assert [m["version"] for m in snap.versions(run.store, "brightdesk")] == [out["dataset_version"]]
    # Each step left its own output in scratch; none of it readable raw text (ingest's and validate's chunks are
    # encrypted with a key that is only in their results; clean's and dedupe's are redacted).
    scratch = run.store.list(run.scratch)
    assert {k.split("/")[4] for k in scratch if k.count("/") > 4} == {"ingest", "validate", "clean", "dedupe"}
    assert "scratch_key" in ingested and "scratch_key" not in validated
    assert not [k for k in scratch if b"jane.doe@example.com" in run.store.get(k)]
    assert any(b"[EMAIL]" in run.store.get(k) for k in scratch if "/clean/" in k)
    assert not list((home / "work" / "spill").glob("ftops-prepare-*"))
    assert data.cleanup(run)["removed_objects"] == len(scratch) and run.store.list(run.scratch) == []
    assert data.snapshot(run) == out  # a task retried after cleanup finds the version by its run


def test_the_dataset_version_is_named_by_the_run_and_a_lost_try_leaves_no_second_version(home, tmp_path, monkeypatch):
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", str(tmp_path))  # a history of its own
    started = datetime(2026, 11, 2, 1, 7, 9, 120000, tzinfo=UTC)
    run = Run("brightdesk", "scheduled__w45", "finetune_brightdesk", started_at=started)
    write_batch("brightdesk", tmp_path / "brightdesk" / "inbox", n=30, batch=0)
    name = f"20261102T010709120000Z-{run.key}"
    # A first try died while publishing: some of the version's files, no manifest.
    run.store.put(f"brightdesk/datasets/{name}/train.jsonl", b'{"partial": true}\n')
    out = data.ingest(run)
    data.validate(run, out["scratch_key"])
    data.clean(run, out["scratch_key"])
    data.dedupe(run)
    assert data.snapshot(run)["dataset_version"] == name
    assert b"partial" not in run.store.get(f"brightdesk/datasets/{name}/train.jsonl")
    # The next try died after publishing, before it could record its counts: the retry adopts the version.
    run.store.delete_prefix(f"{run.scratch}/data/snapshot.json")
    assert data.snapshot(run)["dataset_version"] == name
    # A run cleared after its scratch was lost: every data task returns the version the run published.
    run.store.delete_prefix(f"{run.scratch}/data/")
    adopted = data.ingest(run)
    assert adopted["adopted"] == name and adopted["read"] == out["read"]
    assert data.validate(run, "")["success"]
    assert data.dedupe(run)["examples"] == data.snapshot(run)["kept"] > 0
    assert [m["version"] for m in snap.versions(run.store, "brightdesk")] == [name]
    # A later run back-dated before it (a manual run with an old start, a clock behind) still sorts after it.
    late = Run("brightdesk", "manual__old", "finetune_brightdesk", started_at=started - timedelta(days=9))
    write_batch("brightdesk", tmp_path / "brightdesk" / "inbox", n=30, batch=1)
    late_key = data.ingest(late)["scratch_key"]
    data.validate(late, late_key)
    data.clean(late, late_key)
    data.dedupe(late)
    published = data.snapshot(late)["dataset_version"]
    versions = [m["version"] for m in snap.versions(run.store, "brightdesk")]
    assert versions[0] == name and versions[1] == published
    assert versions[1].endswith(late.key) and versions[1] == late.dataset_version()


def test_a_rejected_batch_fails_the_validate_task_and_writes_nothing(home):
    run = Run("sterling-law", "manual__junk", "finetune_sterling-law")
    Store(run.env.storage_root).put("sterling-law/inbox/junk.jsonl", b"not json\n" * 9 + b'{"x": 1}\n')
    ingested = data.ingest(run)
    assert ingested["read"] == 10
    with pytest.raises(ValidationFailed, match="status"):
        data.validate(run, ingested["scratch_key"])
    assert snap.versions(run.store, "sterling-law") == []


def test_scratch_left_by_a_killed_run_expires(home, monkeypatch):
    store = Store(str(home / "storage"))
    store.put("brightdesk/runs/old1/started", str(time.time() - 3 * 86400).encode())
    store.put("brightdesk/runs/old1/train.json", json.dumps({"x": 1}).encode())
    (home / "work" / "brightdesk" / "old1").mkdir(parents=True)
    store.put("brightdesk/runs/new1/started", str(time.time()).encode())
    store.put("brightdesk/runs/legacy/eval.json", b"{}")
    monkeypatch.setenv("FTOPS_SCRATCH_RETENTION_HOURS", "48")
    assert data.expire_scratch(store, "brightdesk", home) == ["old1"]
    assert store.list("brightdesk/runs/old1") == [] and not (home / "work" / "brightdesk" / "old1").exists()
    assert store.exists("brightdesk/runs/new1/started")
    assert store.exists("brightdesk/runs/legacy/started")  # first seen now: expires one retention later
    assert data.expire_scratch(store, "brightdesk", home, max_age_s=0) == ["legacy", "new1"]


def test_on_s3_files_stream_limits_hold_and_cleanup_removes_scratch(s3_server, monkeypatch):
    import gzip
    import uuid

    from ftops.data.ingest import InboxCounter

    root = f"s3://ftops/hostile-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", root)
    monkeypatch.setenv("FTOPS_DATA_MAX_RECORDS_PER_FILE", "50")
    store = Store(root)
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
        for i in range(60)
    ]
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    store.put("brightdesk/inbox/ok.jsonl.gz", gzip.compress(payload[: payload.index(b"\n", 2000) + 1]))
    store.put("brightdesk/inbox/big.jsonl", payload)  # 60 records > 50
    assert 0 < InboxCounter(root, "brightdesk").pending()[0] < 50  # the too-large file counts nothing
    run = Run("brightdesk", "s3-hostile", "finetune_brightdesk")
    key = data.ingest(run)["scratch_key"]
    data.validate(run, key)
    data.clean(run, key)
    data.dedupe(run)
    out = data.snapshot(run)
    assert out["dropped"] == {"too_large": 1} and out["kept"] > 0
    assert data.cleanup(run)["removed_objects"] > 0 and store.list(run.scratch) == []


def test_a_stale_try_of_a_data_task_writes_nothing_and_its_refusal_is_recorded(home, tmp_path, monkeypatch):
    monkeypatch.setenv("FTOPS_STORAGE_ROOT", str(tmp_path))  # a history of its own
    write_batch("brightdesk", tmp_path / "brightdesk" / "inbox", n=30, batch=0, dirty=False)
    lost = Run("brightdesk", "manual__fence", "finetune_brightdesk", task_id="ingest", try_number=1).claim()
    retry = Run("brightdesk", "manual__fence", "finetune_brightdesk", task_id="ingest", try_number=2).claim()
    before = set(lost.store.list(lost.scratch))
    with pytest.raises(StaleTry, match="try 1 is stale"):
        data.ingest(lost)
    assert set(lost.store.list(lost.scratch)) == before | {f"{lost.scratch}/tries/ingest.refused-1"}
    with pytest.raises(StaleTry):  # nor can it take the fence back
        Run("brightdesk", "manual__fence", "finetune_brightdesk", task_id="ingest", try_number=1).claim()
    assert data.ingest(retry)["read"] == 30  # the retry's own work is untouched
    # Another task's fence is its own: validate's first try is not stale because ingest retried.
    validating = Run("brightdesk", "manual__fence", "finetune_brightdesk", task_id="validate", try_number=1).claim()
    validating.save("probe", b"ok")
    # A fence record that does not parse holds for nobody: refused (fail closed), until a try claims again.
    Store(str(tmp_path)).put(f"{retry.scratch}/tries/ingest", b"not json", overwrite=True)
    with pytest.raises(StaleTry):
        retry.save("probe", b"x")
    retry.claim().save("probe", b"x")
