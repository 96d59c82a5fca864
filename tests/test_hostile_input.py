"""Hostile input: no record or file can crash a run, brick a customer or leave raw PII at rest.

Each category of issue 11 goes through the real chain (`ftops.data.tasks.prepare`, or the parser it uses) and
checks what a user would see: the run goes on, the record is quarantined with a reason code, the version
written reads back, nothing outside the inbox is read.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftops.config import DataPolicy
from ftops.data import snapshot as snap
from ftops.data.ingest import InboxCounter, Limits, inbox_files, parse_file
from ftops.data.records import Batch, Example, Quarantined, SourceFile, dump_line, has_surrogate, read_jsonl
from ftops.data.tasks import prepare
from ftops.data.validate import ValidationFailed
from ftops.storage import Store

GOOD = {"messages": [{"role": "user", "content": "Where is my invoice?"}, {"role": "assistant", "content": "Billing."}]}


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def jl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def run_prepare(tmp_path, files: dict[str, bytes], policy: DataPolicy | None = None, limits: Limits | None = None):
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(data)
    store = Store(str(tmp_path / "root"))
    out = prepare(
        store,
        "acme",
        inbox_files(str(inbox)),
        policy or DataPolicy(max_quarantine_share=1.0),
        spill_root=tmp_path / "spill",
        limits=limits,
        chunk_size=7,  # several chunks even for small inputs: the streaming path is the one tested
    )
    return store, out


def version_files(store: Store, out: dict) -> dict[str, list[dict]]:
    base = f"acme/datasets/{out['dataset_version']}"
    return {n: read_jsonl(store.get(f"{base}/{n}.jsonl")) for n in ("train", "val", "quarantine")}


def quarantined(raw: bytes) -> list[str]:
    batch = Batch()
    parse_file("x.jsonl", jl(GOOD, raw, chat("Still here?", "Yes.")), batch)
    assert len(batch.examples) == 2, "the records around a hostile one are kept"
    return [q.reason for q in batch.quarantine]


# --- per-record isolation -------------------------------------------------------------------------------


def test_deep_nesting_is_quarantined_not_a_recursion_crash():
    assert quarantined(b"[" * 200_000 + b"]" * 200_000) == ["too_deep"]
    nested: dict = {"x": 1}
    for _ in range(40):
        nested = {"x": nested}
    assert quarantined(json.dumps(GOOD | {"meta": nested}).encode()) == ["too_deep"]


def test_huge_numbers_are_quarantined():
    assert quarantined(b'{"messages": [], "n": ' + b"9" * 5000 + b"}") == ["number_too_large"]
    assert quarantined(b'{"n": 1.' + b"5" * 5000 + b"}") == ["number_too_large"]


WRONG_TYPES = [
    # OpenAI messages
    {"messages": "hello"},
    {"messages": [["user", "hi"]]},
    {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": {"r": 1}, "content": "hi"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": 3, "content": "hi"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": True}]},
    # ShareGPT
    {"conversations": "hi"},
    {"conversations": [["human", "hi"]]},
    {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": {"x": 1}, "value": "hi"}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": {"v": 1}}]},
    # Alpaca
    {"instruction": ["Define"], "output": "x"},
    {"instruction": "Define", "input": {"a": 1}, "output": "x"},
    {"instruction": "Define", "input": ["a"], "output": "x"},
    {"instruction": "Define", "output": 7},
    {"instruction": None, "output": None},
    # preference pairs
    {"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"},
    {"prompt": 5, "chosen": "a", "rejected": "b"},
    {"prompt": ["hi"], "chosen": "a", "rejected": "b"},
    {"prompt": [{"role": ["user"], "content": "hi"}], "chosen": "a", "rejected": "b"},
    {"prompt": [{"role": "user", "content": 1}], "chosen": "a", "rejected": "b"},
    {"prompt": "hi", "chosen": ["a", "b"], "rejected": "b"},
    {"prompt": "hi", "chosen": {"content": "a"}, "rejected": "b"},
    {"prompt": "hi", "chosen": [{"content": ["a"]}], "rejected": "b"},
    {"prompt": "hi", "chosen": "a", "rejected": 3},
    {"prompt": "hi", "chosen": "a", "rejected": [{"role": "assistant"}]},
    {"prompt": [], "chosen": "a", "rejected": "b"},
    # not an object
    [1, 2, 3],
    "just a string",
    None,
    42,
]


@pytest.mark.parametrize("record", WRONG_TYPES, ids=range(len(WRONG_TYPES)))
def test_wrong_types_at_every_level_are_quarantined(record):
    [reason] = quarantined(json.dumps(record).encode())
    assert reason in {"unknown_schema", "empty_content", "no_assistant_turn"}


def test_lone_surrogates_are_quarantined_and_never_reach_dedupe(tmp_path):
    bad = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}, {"role": "assistant", "content": "a"}]}'
    bad_pref = b'{"prompt": "q", "chosen": "fine", "rejected": "x\\udfff"}'
    store, out = run_prepare(tmp_path, {"s.jsonl": jl(GOOD, bad, bad_pref)})
    assert out["dropped"] == {"unencodable_text": 2} and out["kept"] == 1
    assert len(version_files(store, out)["quarantine"]) == 2


SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x1f", "\x0b", "\x0c", "\r", "\r\n"]


def test_line_separators_inside_content_are_kept_as_line_breaks_and_read_back(tmp_path):
    records = [chat(f"First line{sep}second line {i}?", f"Answer{sep}two {i}.") for i, sep in enumerate(SEPARATORS)]
    store, out = run_prepare(tmp_path, {"sep.jsonl": jl(*records)})
    assert out["kept"] == len(SEPARATORS) and out["dropped"] == {}
    rows = [r for name in ("train", "val") for r in version_files(store, out)[name]]
    assert len(rows) == len(SEPARATORS)
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(
        f"First line\nsecond line {i}?" for i in range(len(SEPARATORS))
    )
    for name in ("train", "val"):  # every line of the written file is one row, for any JSON Lines reader
        raw = store.get(f"acme/datasets/{out['dataset_version']}/{name}.jsonl").decode()
        assert len(raw.splitlines()) == len(version_files(store, out)[name])


def test_bom_cr_only_and_crlf_files_are_read_record_by_record(tmp_path):
    recs = [chat(f"Question {i} about the lease?", f"Answer {i}.") for i in range(9)]
    body = [json.dumps(r).encode() for r in recs]
    files = {
        "bom.jsonl": b"\xef\xbb\xbf" + b"\n".join(body[:3]) + b"\n",
        "mac.jsonl": b"\r".join(body[3:6]) + b"\r",
        "win.jsonl": b"\r\n".join(body[6:]) + b"\r\n",
    }
    _, out = run_prepare(tmp_path, files)
    assert out["read"] == 9 and out["kept"] == 9 and out["dropped"] == {}


def test_nul_bytes_never_crash(tmp_path):
    raw_nul = b'{"messages": [{"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "c"}]}'
    escaped_nul = json.dumps(chat("tab\u0000ular?", "Yes\u0000.")).encode()
    utf16 = json.dumps(chat("wide?", "yes")).encode("utf-16")
    store, out = run_prepare(
        tmp_path, {"n.jsonl": jl(GOOD, raw_nul, escaped_nul), "u16.jsonl": utf16 + b"\n", "z.jsonl": b"\x00" * 64}
    )
    assert out["kept"] == 2 and set(out["dropped"]) <= {"malformed_json", "invalid_utf8", "truncated_line"}
    rows = [r for name in ("train", "val") for r in version_files(store, out)[name]]
    assert {r["messages"][0]["content"] for r in rows} == {"Where is my invoice?", "tabular?"}


def test_symlinks_in_the_inbox_are_never_followed(tmp_path):
    secret = tmp_path / "outside" / "secrets.jsonl"
    secret.parent.mkdir()
    secret.write_bytes(jl(chat("root password?", "hunter2-OUTSIDE-THE-INBOX")))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "ok.jsonl").write_bytes(jl(GOOD))
    os.symlink(secret, inbox / "link.jsonl")
    os.symlink(secret.parent, inbox / "linkdir")
    store, out = run_prepare(tmp_path, {})
    assert out["kept"] == 1 and out["dropped"] == {"symlink": 2}
    assert "OUTSIDE" not in json.dumps(version_files(store, out))
    counter = InboxCounter(str(tmp_path / "root"), "acme")
    os.makedirs(tmp_path / "root" / "acme", exist_ok=True)
    os.symlink(inbox, tmp_path / "root" / "acme" / "inbox")
    (inbox / "ok.jsonl").unlink()
    assert counter.pending()[0] == 0  # the trigger does not count what ingest refuses


def test_file_names_with_path_or_pii_characters_never_reach_lineage_raw(tmp_path):
    names = ["jane.doe@example.com.jsonl", "..\n\u202eevil <script>.jsonl", "sub dir/../\t415-555-0134.jsonl"]
    store, out = run_prepare(
        tmp_path, {n: jl(chat(f"Question about {i}?", f"Answer {i}.")) for i, n in enumerate(names)}
    )
    assert out["kept"] == 3
    manifest = json.loads(store.get(f"acme/datasets/{out['dataset_version']}/manifest.json"))
    rows = [r for name in ("train", "val") for r in version_files(store, out)[name]]
    recorded = [s["name"] for s in manifest["sources"]] + [r["source"] for r in rows]
    for name in recorded:
        assert "jane.doe" not in name and "555-0134" not in name and ".." not in name.split("/")
        assert all(c.isalnum() or c in "._/-~" for c in name), name


# --- bounded work per file ------------------------------------------------------------------------------


def test_a_gzip_bomb_is_quarantined_as_too_large_with_counts(tmp_path):
    bomb = gzip.compress(b" " * (20 << 20))  # ~20 KB expanding to 20 MB
    assert len(bomb) < 100_000
    store, out = run_prepare(tmp_path, {"bomb.jsonl.gz": bomb, "ok.jsonl": jl(GOOD)})
    assert out["kept"] == 1 and out["dropped"] == {"too_large": 1}
    [q] = version_files(store, out)["quarantine"]
    assert q["source"] == "bomb.jsonl.gz" and "compression ratio" in q["detail"] and "bytes" in q["detail"]


def test_a_file_of_blank_lines_stops_at_the_line_limit():
    from ftops.data.ingest import InboxFile, chunks

    blank = InboxFile("blank.jsonl", "blank.jsonl", lambda: io.BytesIO(b"\n" * 3_000_000))
    [batch] = list(chunks([blank], set(), Limits(max_records_per_file=1_000_000)))
    assert [(q.reason, q.detail.split(" (")[0]) for q in batch.quarantine] == [("too_large", "more than 1000000 lines")]


@pytest.mark.parametrize(
    "content",
    ["1 " * 400_000, "x" * 900_000, "a@" * 400_000, "4111 " * 200_000, "key=" * 200_000, "-----BEGIN " * 80_000],
    ids=["digits", "one-word", "ats", "card-groups", "keys", "pem"],
)
def test_pathological_content_is_cleaned_in_bounded_time(content):
    import time

    from ftops.data.clean import redact

    t0 = time.process_time()
    redact(content)
    assert time.process_time() - t0 < 10, "a hostile record must not stall the run"


def test_records_and_bytes_per_file_obey_the_limits(tmp_path, monkeypatch):
    many = jl(*[chat(f"q{i}?", f"a{i}.") for i in range(30)])
    store, out = run_prepare(
        tmp_path, {"many.jsonl": many, "ok.jsonl": jl(GOOD)}, limits=Limits(max_records_per_file=20)
    )
    assert out["kept"] == 1 and out["dropped"] == {"too_large": 1}
    assert "more than 20 lines (read 20 records" in version_files(store, out)["quarantine"][0]["detail"]
    monkeypatch.setenv("FTOPS_DATA_MAX_FILE_BYTES", "1000")
    assert Limits.from_env().max_file_bytes == 1000
    root = tmp_path / "r2"
    Store(str(root)).put("acme/inbox/many.jsonl", many)
    Store(str(root)).put("acme/inbox/small.jsonl", jl(GOOD))
    assert InboxCounter(str(root), "acme").pending()[0] == 1  # the trigger obeys the same limit
    monkeypatch.setenv("FTOPS_DATA_MAX_FILE_BYTES", "lots")
    with pytest.raises(ValueError, match="FTOPS_DATA_MAX_FILE_BYTES"):
        Limits.from_env()


def test_a_corrupt_gzip_is_one_unreadable_file_entry(tmp_path):
    good = gzip.compress(jl(GOOD, chat("b?", "c.")))
    _, out = run_prepare(tmp_path, {"cut.jsonl.gz": good[: len(good) // 2], "junk.jsonl.gz": b"not gzip at all"})
    assert out["dropped"] == {"unreadable_file": 2} and out["kept"] == 0 and out["dataset_version"]


# --- no raw PII at rest ---------------------------------------------------------------------------------


def test_quarantine_is_stored_redacted_with_reason_and_location(tmp_path):
    bad = {"text": "card 4111 1111 1111 1111, mail jane@example.com", "key": "AKIAIOSFODNN7EXAMPLE"}
    store, out = run_prepare(tmp_path, {"q.jsonl": jl(GOOD, bad, b"not json jane@example.com 4111111111111111")})
    q = version_files(store, out)["quarantine"]
    assert [(r["reason"], r["line"], r["source"]) for r in q] == [
        ("unknown_schema", 2, "q.jsonl"),
        ("malformed_json", 3, "q.jsonl"),
    ]
    text = store.get(f"acme/datasets/{out['dataset_version']}/quarantine.jsonl").decode()
    assert "4111" not in text and "jane@" not in text and "AKIA" not in text and "[EMAIL]" in text


def test_pii_drop_counts_against_the_quarantine_limit(tmp_path):
    pii = [chat(f"Mail me at user{i}@example.com", f"Sure {i}.") for i in range(10)]
    with pytest.raises(ValidationFailed, match="status"):
        run_prepare(tmp_path, {"p.jsonl": jl(*pii)}, DataPolicy(pii="drop", max_quarantine_share=0.5))
    assert Store(str(tmp_path / "root")).list("acme/datasets") == []
    assert not any((tmp_path / "spill").iterdir())  # the spill is gone after a failed run too


def test_pii_policy_applies_to_chosen_and_rejected(tmp_path):
    pairs = [
        {"prompt": "Refund?", "chosen": "Call 415-555-0134.", "rejected": "No."},
        {"prompt": "Export?", "chosen": "Use File.", "rejected": "Mail bob@example.com"},
        {"prompt": "Hours?", "chosen": "Nine to five.", "rejected": "Never."},
    ]
    store, out = run_prepare(tmp_path, {"d.jsonl": jl(*pairs)}, DataPolicy(pii="drop", max_quarantine_share=0.9))
    assert out["kept"] == 1 and out["dropped"] == {"pii": 2} and out["pii"] == {"EMAIL": 1, "PHONE": 1}
    store, out = run_prepare(tmp_path / "r", {"d.jsonl": jl(*pairs)})
    rows = [r for n in ("train", "val") for r in version_files(store, out)[n]]
    assert {r["messages"][-1]["content"] for r in rows} >= {"Call [PHONE]."}
    assert {r["rejected"] for r in rows} >= {"Mail [EMAIL]"}


# --- the whole chain ------------------------------------------------------------------------------------


def test_every_hostile_file_at_once_through_the_command_line(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "ok.jsonl").write_bytes(jl(*[chat(f"Question {i} on my plan?", f"Answer {i}.") for i in range(60)]))
    (inbox / "deep.jsonl").write_bytes(b"[" * 100_000 + b"\n")
    (inbox / "num.jsonl").write_bytes(b'{"n": ' + b"1" * 5000 + b"}\n")
    (inbox / "types.jsonl").write_bytes(jl(*WRONG_TYPES))
    (inbox / "sur.jsonl").write_bytes(b'{"prompt": "q", "chosen": "\\ud800", "rejected": "r"}\n')
    (inbox / "sep.jsonl").write_bytes(jl(chat("a\u2028b?", "c\u2029d.")))
    (inbox / "bomb.jsonl.gz").write_bytes(gzip.compress(b" " * (20 << 20)))
    os.symlink("/etc/passwd", inbox / "passwd.jsonl")
    cmd = [sys.executable, "-m", "ftops.cli", "data", "prepare", "--customer", "acme", "--input", str(inbox)]
    cmd += ["--out", str(tmp_path / "out"), "--json"]
    env = dict(os.environ, FTOPS_HOME=str(tmp_path / "home"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    out = json.loads(done.stdout)
    assert out["read"] == out["kept"] + sum(out["dropped"].values()) and out["kept"] == 61
    assert {"too_deep", "number_too_large", "unknown_schema", "unencodable_text", "too_large", "symlink"} <= set(
        out["dropped"]
    )


# --- written data is always readable --------------------------------------------------------------------


def test_a_version_written_with_raw_line_separators_still_trains(tmp_path):
    """Versions are write-once: one written by the old writer (raw U+2028 in content) must still be read."""
    store = Store(str(tmp_path))
    old = {
        "id": "f" * 64,
        "messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "c\u2029"}],
    }
    raw = json.dumps(old, ensure_ascii=False).encode() + b"\n"
    assert len(raw.decode().splitlines()) == 3  # what bricked the customer: str.splitlines breaks the row
    v = "20250101T000000000000Z-deadbeef"
    store.put(f"acme/datasets/{v}/train.jsonl", raw)
    store.put(f"acme/datasets/{v}/val.jsonl", b"")
    rows, val, _ = snap.training_mix(store, "acme", [v], [], 0.2, 0)
    assert rows == [old] and val == []


TEXT = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TEXT, min_size=1, max_size=4))
def test_any_unicode_text_reads_back_identically(texts):
    rows = [
        {"id": str(i), "messages": [{"role": "user", "content": t}], "rejected": t[::-1]} for i, t in enumerate(texts)
    ]
    data = b"".join(dump_line(r) for r in rows)
    data.decode("utf-8")  # valid UTF-8 whatever the text (lone surrogates included)
    assert read_jsonl(data) == rows
    assert len(data.split(b"\n")) == len(rows) + 1 and len(data.decode().splitlines()) == len(rows)


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXT, min_size=1, max_size=4))
def test_any_text_in_a_chunk_handed_between_data_steps_reads_back_identically(texts):
    """The data steps hand chunks on as MessagePack; text MessagePack cannot hold (lone surrogates) goes as JSON."""
    batch = Batch(
        examples=[Example([{"role": "user", "content": t}], f"f{i}.jsonl", i, t[::-1]) for i, t in enumerate(texts)],
        quarantine=[Quarantined("f.jsonl", 1, "invalid_record", texts[0], texts[-1])],
        sources=[SourceFile(texts[0], "0" * 64, len(texts), "")],
        read=len(texts),
        pii={"EMAIL": 1},
    )
    data = batch.to_bytes()
    assert Batch.from_bytes(data) == batch
    assert (data[:1] == b"[") == any(has_surrogate(t) for t in texts)  # JSON only when MessagePack cannot


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.lists(TEXT.filter(lambda t: t.strip()), min_size=1, max_size=5, unique=True))
def test_any_unicode_text_kept_by_the_chain_reaches_the_training_mix_intact(tmp_path_factory, texts):
    from ftops.data.clean import normalise, redact

    tmp = tmp_path_factory.mktemp("prop")
    # a plain first record is always kept (first seen, valid): the property is checked on every example
    anchor = chat("Where is the parcel I ordered last week?", "It left the depot this morning.")
    records = [anchor] + [chat(f"Question {i}: {t}", f"Answer {i}: {t}") for i, t in enumerate(texts, start=1)]
    store, out = run_prepare(tmp, {"p.jsonl": jl(*records)})
    assert out["kept"] >= 1
    rows, val, _ = snap.training_mix(store, "acme", [out["dataset_version"]], [], 0.0, 0)
    got = sorted(r["messages"][0]["content"] for r in rows + val)
    kept_sources = {r["line"] for r in rows + val}
    want = sorted(redact(normalise(records[i - 1]["messages"][0]["content"]))[0] for i in kept_sources)
    assert got == want and anchor["messages"][0]["content"] in got


# --- detection that holds up ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value,kind",
    [
        ("ref 99 4111 1111 1111 1111 paid", "4111 1111 1111 1111", "CARD"),  # a longer run failing Luhn
        ("IBAN GB82WEST12345698765432 99 attached", "GB82WEST12345698765432", "IBAN"),
        ("mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ now", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "EMAIL"),
        ("DATABASE_URL=postgresql://admin:S3cretPassw0rd@db.internal:5432/prod", "S3cretPassw0rd", "SECRET"),
        (
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0EXAMPLE\n-----END PGP PRIVATE KEY BLOCK-----",
            "lQOYBF0",
            "SECRET",
        ),
    ],
)
def test_overlapping_and_international_candidates_are_found(text, value, kind):
    from ftops.data.clean import redact

    out, counts = redact(text)
    assert value not in out and counts.get(kind) == 1, (out, counts)


def test_order_numbers_are_not_cards_even_when_a_slice_passes_luhn():
    from ftops.data.clean import redact

    text = "Your order #112-3456789-1234567 has shipped."
    assert redact(text) == (text, {})


@pytest.mark.parametrize("split", ["compliance", "blind"])
def test_compliance_cases_and_the_blind_set_are_detected(split):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from pii_eval import load, score

    from ftops.data.clean import find_pii

    data = Path(__file__).parent / "data" / ("pii_blind.jsonl" if split == "blind" else "pii_labelled.jsonl")
    result = score(load(data, split), find_pii)["overall"]
    assert result["labelled"] >= 24 and result["recall"] >= 0.95 and result["precision"] >= 0.95, result
