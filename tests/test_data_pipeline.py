"""Ingest, validate, clean/PII, dedupe and snapshot: every record accounted for, nothing overwritten."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys

import pytest

from ftops.config import DataPolicy
from ftops.data import snapshot as snap
from ftops.data.clean import clean, redact
from ftops.data.dedupe import History, dedupe
from ftops.data.ingest import Batch, ingest, parse_file
from ftops.data.validate import validate
from ftops.storage import AlreadyExists, Store


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def test_three_formats_become_one_canonical_example():
    batch = Batch()
    parse_file(
        "in.jsonl",
        lines(
            chat("What is an NDA?", "A confidentiality agreement."),
            {"conversations": [{"from": "human", "value": "What is an NDA?"}, {"from": "gpt", "value": "A contract."}]},
            {"instruction": "Define NDA.", "input": "Short please.", "output": "A contract."},
        ),
        batch,
    )
    assert [len(e.messages) for e in batch.examples] == [2, 2, 2]
    assert batch.examples[2].messages[0] == {"role": "user", "content": "Define NDA.\n\nShort please."}
    assert all(e.messages[-1]["role"] == "assistant" for e in batch.examples)


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b'{"messages": [', "malformed_json"),
        (b'{"text": "hello"}', "unknown_schema"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "no_assistant_turn"),
        (json.dumps(chat("hi", "   ")).encode(), "empty_content"),
        (b'{"messages": "\xff\xfe"}', "invalid_utf8"),
        (json.dumps(chat("hi", "x" * (1 << 20))).encode(), "oversized_line"),
    ],
)
def test_each_reason_code_quarantines_with_source_line_and_raw(raw, reason):
    batch = Batch()
    parse_file("up.jsonl", lines(chat("ok?", "ok."), raw), batch)
    assert batch.read == 2 and len(batch.examples) == 1
    [q] = batch.quarantine
    assert (q.reason, q.source, q.line) == (reason, "up.jsonl", 2)
    assert q.raw


def test_truncated_last_line_and_empty_file_never_crash(tmp_path):
    batch = Batch()
    parse_file("t.jsonl", lines(chat("a?", "b.")) + b'{"messages": [{"role"', batch)
    assert [q.reason for q in batch.quarantine] == ["truncated_line"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "empty.jsonl").write_bytes(b"")
    out = ingest(str(inbox), set())
    assert out.read == 0 and out.sources[0].skipped == "empty"


def test_gzip_and_already_ingested_file_under_another_name(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = lines(chat("q1?", "a1."), chat("q2?", "a2."))
    (inbox / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (inbox / "b.jsonl").write_bytes(data)
    (inbox / "c-renamed.jsonl").write_bytes(data)
    batch = ingest(str(inbox), set())
    assert batch.read == 4  # a.gz and b; c is b under another name
    assert [s.skipped for s in batch.sources] == ["", "", "already_ingested"]
    again = ingest(str(inbox), {s.sha256 for s in batch.sources})
    assert again.read == 0


@pytest.mark.parametrize(
    "text,kind",
    [
        ("write to jane.doe@example.co.uk", "EMAIL"),
        ("call +1 (415) 555-0134", "PHONE"),
        ("call 020 7946 0958", "PHONE"),
        ("SSN 123-45-6789", "SSN"),
        ("card 4111 1111 1111 1111", "CARD"),
        ("card 5500-0000-0000-0004", "CARD"),
        ("card 4012888888881881", "CARD"),
        ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN"),
        ("IBAN DE89370400440532013000", "IBAN"),
        ("from 192.168.10.4", "IP"),
        ("from 2001:db8:85a3::8a2e:370:7334", "IP"),
        ("key AKIAIOSFODNN7EXAMPLE", "SECRET"),
        ("token ghp_" + "a1B2" * 9, "SECRET"),
        ("api_key=sk-proj-abcdefghijklmnopqrstuv", "SECRET"),
    ],
)
def test_each_pii_type_is_redacted_with_a_typed_placeholder(text, kind):
    out, counts = redact(text)
    assert counts == {kind: 1}, (text, out)
    assert f"[{kind}]" in out


@pytest.mark.parametrize(
    "text",
    [
        "order 4111111111111112 shipped",
        "hearing on 2024-01-15",
        "case 2:21-cv-01234",
        "ticket ORD-2024-55812",
        "version 1.2.3",
        "invoice INV-884213 for 1,250.00 USD",
        "room 12-34",
        "ISBN 978-3-16-148410-0",
    ],
)
def test_hard_negatives_are_left_alone(text):
    assert redact(text) == (text, {})


def test_pii_policy_drop_quarantines_and_counts():
    batch = Batch()
    parse_file("p.jsonl", lines(chat("mail me", "at bob@example.com"), chat("hi", "hello &amp; welcome")), batch)
    out = clean(batch, "drop")
    assert [q.reason for q in out.quarantine] == ["pii"] and out.pii == {"EMAIL": 1}
    assert out.examples[0].messages[1]["content"] == "hello & welcome"


def test_dedupe_exact_and_near_within_batch_and_against_history():
    history = History()
    first = Batch()
    parse_file(
        "w1.jsonl",
        lines(
            chat(
                "How do I reset my password for the billing portal?",
                "Open Settings, choose Account and follow the steps.",
            ),
            chat(
                "How do I reset my password for the billing portal?",
                "Open Settings, choose Account and follow the steps.",
            ),
            chat(
                "How do I reset my password for the billing portal ?",
                "Open Settings , choose Account and follow the steps .",
            ),
        ),
        first,
    )
    first, keys, sigs = dedupe(first, history)
    assert len(keys) == 1 and sorted(q.reason for q in first.quarantine) == ["duplicate_exact", "duplicate_near"]
    later = Batch()
    parse_file(
        "w2.jsonl",
        lines(
            chat(
                "how do I reset my  password for the billing portal?",
                "Open Settings, choose Account and follow the steps.",
            ),
            chat("Where can I download my invoice?", "Under Billing, then Invoices."),
        ),
        later,
    )
    later, keys2, _ = dedupe(later, History(keys, sigs))
    assert [q.reason for q in later.quarantine] == ["duplicate_exact"] and len(keys2) == 1


def prepared(store: Store, customer: str, data: bytes, name: str):
    """One upload through the package's one data chain (`ftops.data.tasks.prepare`), as the DAG and the CLI run it."""
    from ftops.data.ingest import InboxFile
    from ftops.data.tasks import prepare

    out = prepare(store, customer, [InboxFile(name, name, lambda: io.BytesIO(data))], DataPolicy(val_fraction=0.3))
    version = out["dataset_version"]
    manifest = json.loads(store.get(f"{customer}/datasets/{version}/manifest.json"))
    return snap.Snapshot(version, out["dataset_uri"], manifest)


def test_snapshot_is_immutable_and_split_is_stable(tmp_path):
    store = Store(str(tmp_path))
    records = [chat(f"Question number {i} about leases?", f"Answer {i}: check clause {i}.") for i in range(40)]
    v1 = prepared(store, "acme", lines(*records[:25]), "a.jsonl")
    v2 = prepared(store, "acme", lines(*records), "b.jsonl")
    assert v2.manifest["parent"] == v1.version
    assert v2.manifest["counts"]["kept"] == 15 and v2.manifest["counts"]["dropped"] == {"duplicate_exact": 25}
    val_ids = {r["id"] for v in (v1, v2) for r in snap.read_jsonl(store.get(f"acme/datasets/{v.version}/val.jsonl"))}
    train_ids = {
        r["id"] for v in (v1, v2) for r in snap.read_jsonl(store.get(f"acme/datasets/{v.version}/train.jsonl"))
    }
    assert val_ids and train_ids and not (val_ids & train_ids)
    assert all(snap.in_validation(i, 0.3) for i in val_ids)
    with pytest.raises(AlreadyExists):
        store.put(f"acme/datasets/{v1.version}/train.jsonl", b"overwrite attempt")
    assert [m["version"] for m in snap.versions(store, "acme")] == [v1.version, v2.version]


def test_accounting_invariant_read_equals_kept_plus_dropped(tmp_path):
    from ftops.data.demo import write_batch

    inbox = tmp_path / "inbox"
    write_batch("brightdesk", inbox, n=50, batch=0)
    (inbox / "junk.jsonl").write_bytes(lines(b"not json", {"x": 1}, chat("a", " ")))
    batch = ingest(str(inbox), set())
    read = batch.read
    batch, _ = validate(batch, DataPolicy())
    batch = clean(batch)
    batch, keys, _ = dedupe(batch, History())
    assert batch.read == read and batch.read == len(keys) + sum(batch.dropped().values())
    assert {"malformed_json", "unknown_schema", "empty_content", "duplicate_exact"} <= set(batch.dropped())
    assert batch.dropped()["malformed_json"] >= 1 and batch.dropped()["unknown_schema"] >= 1


def test_validation_fails_a_batch_that_is_mostly_broken():
    batch = Batch()
    parse_file("bad.jsonl", lines(chat("a?", "b."), b"x", b"y", b"z"), batch)
    _, result = validate(batch, DataPolicy(max_quarantine_share=0.5))
    assert not result.success and "status" in result.failures[0]
    assert "FAILED" in result.html


def test_validation_quarantines_bad_roles_and_too_long():
    batch = Batch()
    parse_file(
        "r.jsonl",
        lines(
            {
                "messages": [
                    {"role": "assistant", "content": "Hi"},
                    {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Yes"},
                ]
            },
            chat("long " * 50, "answer"),
            chat("fine?", "fine."),
        ),
        batch,
    )
    out, result = validate(batch, DataPolicy(max_tokens=40, max_quarantine_share=0.9))
    assert result.success and sorted(q.reason for q in out.quarantine) == ["bad_roles", "too_long"]


def test_data_prepare_command_prints_the_contract(tmp_path):
    from ftops.data.demo import write_batch

    path = write_batch("northside-clinic", tmp_path / "in", n=30)
    cmd = [
        sys.executable,
        "-m",
        "ftops.cli",
        "data",
        "prepare",
        "--customer",
        "northside-clinic",
        "--input",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert {"read", "kept", "dropped", "pii", "train", "val", "dataset_version"} <= set(out)
    assert out["read"] == out["kept"] + sum(out["dropped"].values()) and out["dataset_version"]
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert again["read"] == 0 and again["dataset_version"] is None
    bad = subprocess.run(cmd[:6] + ["Bad_Id"] + cmd[7:], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid customer id" in bad.stderr


def test_preference_pairs_flow_into_the_snapshot_for_dpo(tmp_path):
    store = Store(str(tmp_path))
    pair = {"prompt": "How do I export? Email me at a@b.co", "chosen": "Use File, then Export.", "rejected": "No."}
    pair2 = {
        "prompt": [{"role": "user", "content": "Refund?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "Never, call 415-555-0134."}],
    }
    v = prepared(store, "acme", lines(pair, pair2, {"prompt": "x", "chosen": "y", "rejected": ""}), "p.jsonl")
    rows = [
        r for split in ("train", "val") for r in snap.read_jsonl(store.get(f"acme/datasets/{v.version}/{split}.jsonl"))
    ]
    assert sorted(r["rejected"] for r in rows) == ["Never, call [PHONE].", "No."]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert v.manifest["counts"]["dropped"] == {"empty_content": 1} and v.manifest["counts"]["pii"]["EMAIL"] == 1


def test_inbox_counter_counts_records_of_files_not_yet_ingested(tmp_path, monkeypatch):
    from ftops.data import ingest as ingest_mod
    from ftops.data.ingest import InboxCounter

    store = Store(str(tmp_path))
    store.put("acme/inbox/a.jsonl", lines(*[chat(f"q{i}?", f"a{i}.") for i in range(30)]))
    store.put("acme/inbox/b.jsonl.gz", gzip.compress(lines(*[chat(f"r{i}?", f"b{i}.") for i in range(20)])))
    store.put("acme/inbox/notes.txt", b"not data")
    counter = InboxCounter(str(tmp_path), "acme")
    count, files = counter.pending()
    assert count == 50 and len(files) == 2  # records, not files
    counter.signalled |= files  # already reported: a burst makes one event
    assert counter.pending() == (0, set())
    fresh = InboxCounter(str(tmp_path), "acme")
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "a.jsonl").write_bytes(store.get("acme/inbox/a.jsonl"))
    batch, keys, sigs = dedupe(ingest(str(upload), set()), History())
    snap.write(store, "acme", batch, keys, sigs, {}, "", None, 0.2)  # a run ingested a.jsonl
    assert fresh.pending()[0] == 20
    reads = []
    monkeypatch.setattr(
        ingest_mod, "scan", lambda f, limits, scan=ingest_mod.scan: reads.append(f.key) or scan(f, limits)
    )
    fresh.store.get = lambda key, get=fresh.store.get: reads.append(key) or get(key)
    assert fresh.pending()[0] == 20 and reads == []  # nothing changed: the next poll reads no object
    store.put("acme/inbox/c.jsonl", lines(chat("New question?", "New answer.")))
    assert fresh.pending()[0] == 21 and reads == ["c.jsonl"]  # only the new file


def test_great_expectations_data_docs_are_kept_with_the_version(tmp_path):
    store = Store(str(tmp_path))
    v = prepared(store, "acme", lines(chat("Where is my order?", "In transit."), b"not json"), "d.jsonl")
    keys = store.list(f"acme/datasets/{v.version}/data_docs")
    assert f"acme/datasets/{v.version}/data_docs/index.html" in keys
    assert any("/data_docs/validations/chat_batch/" in k for k in keys)
    page = store.get(f"acme/datasets/{v.version}/validation.html").decode()
    assert "Data documentation compiled by Great Expectations" in page and "chat_batch" in page
    assert not any("/static/fonts/" in k for k in keys)  # 4 MB of fonts per version: left out


def test_an_expectation_that_could_not_run_is_not_read_as_a_rejected_batch():
    """Great Expectations marks an expectation whose metric raised as failed with 0 % unexpected (seen when a
    lost worker's orphaned task kept running with its log pipe gone): ftops must fail the task, not reject data."""
    import great_expectations as gx
    import pandas as pd

    from ftops.data.validate import raised

    ctx = gx.get_context(mode="ephemeral")
    asset = ctx.data_sources.add_pandas("t").add_dataframe_asset("a")
    batch = asset.add_batch_definition_whole_dataframe("b").get_batch(
        batch_parameters={"dataframe": pd.DataFrame({"x": [1, 2]})}
    )
    broken = batch.validate(gx.expectations.ExpectColumnValuesToMatchRegex(column="missing", regex="^a"))
    verdict = batch.validate(gx.expectations.ExpectColumnValuesToBeBetween(column="x", min_value=5))
    assert not broken.success and raised(broken.exception_info)
    assert not verdict.success and not raised(verdict.exception_info)  # a real rejection stays one
