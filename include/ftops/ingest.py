"""Ingest: read a customer's inbox (local folder or `s3://` prefix) into canonical chat examples.

Accepted per record, detected record by record: OpenAI `messages`, ShareGPT `conversations`, Alpaca
(`instruction`/`input`/`output`), and preference pairs (`prompt`/`chosen`/`rejected`, TRL's format) for
the optional DPO stage; JSON Lines, optionally gzip. Every non-blank line ends in exactly one
place: an `Example`, or a `Quarantined` record with a reason code, its source file, line and raw text.
Files are identified by content hash, so a file already ingested (under any name) is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, field

from ftops.storage import Store

MAX_LINE_BYTES = 1 << 20
RAW_KEEP_CHARS = 20_000
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bing": "assistant",
    "chatgpt": "assistant",
}


@dataclass
class Example:
    messages: list[dict]
    source: str
    line: int
    rejected: str | None = None  # preference pairs: `messages` ends with the chosen answer

    def text(self) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


@dataclass
class Quarantined:
    source: str
    line: int
    reason: str
    detail: str
    raw: str


@dataclass
class SourceFile:
    name: str
    sha256: str
    records: int
    skipped: str = ""  # why the file was not read ("already_ingested", "empty")


@dataclass
class Batch:
    """What a stage hands the next: kept examples, quarantine, and the files they came from."""

    examples: list[Example] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)
    sources: list[SourceFile] = field(default_factory=list)
    read: int = 0
    pii: dict[str, int] = field(default_factory=dict)

    def drop(self, example: Example, reason: str, detail: str) -> None:
        self.quarantine.append(
            Quarantined(
                example.source,
                example.line,
                reason,
                detail,
                json.dumps({"messages": example.messages})[:RAW_KEEP_CHARS],
            )
        )

    def dropped(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.quarantine:
            counts[q.reason] = counts.get(q.reason, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Batch:
        d = json.loads(data)
        return cls(
            examples=[Example(**e) for e in d["examples"]],
            quarantine=[Quarantined(**q) for q in d["quarantine"]],
            sources=[SourceFile(**s) for s in d["sources"]],
            read=d["read"],
            pii=d["pii"],
        )


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _content(value, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("unknown_schema", f"{where}: content is not a string")
    if not value.strip():
        raise RecordError("empty_content", f"{where}: empty")
    return value


def to_messages(record) -> list[dict]:
    """One JSON record in any accepted format to [{'role', 'content'}, ...]; RecordError if unusable."""
    if not isinstance(record, dict):
        raise RecordError("unknown_schema", "record is not a JSON object")
    if isinstance(record.get("messages"), list):
        turns = record["messages"]
        messages = []
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RecordError("unknown_schema", f"messages[{i}]: role must be system, user or assistant")
            messages.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")})
    elif isinstance(record.get("conversations"), list):
        messages = []
        for i, m in enumerate(record["conversations"]):
            role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
            if role is None:
                raise RecordError("unknown_schema", f"conversations[{i}]: unknown speaker")
            messages.append({"role": role, "content": _content(m.get("value"), f"conversations[{i}]")})
    elif "instruction" in record and "output" in record:
        prompt = _content(record["instruction"], "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError("unknown_schema", "input is not a string")
        messages = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
            {"role": "assistant", "content": _content(record["output"], "output")},
        ]
    else:
        raise RecordError(
            "unknown_schema", f"no messages, conversations or instruction/output (keys: {sorted(record)[:8]})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", "no assistant turn to learn from")
    return messages


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": _content(value, "prompt")}]
    if not isinstance(value, list):
        raise RecordError("unknown_schema", "prompt: neither a string nor a list of messages")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RecordError("unknown_schema", f"prompt[{i}]: role must be system, user or assistant")
        turns.append({"role": m["role"], "content": _content(m.get("content"), f"prompt[{i}]")})
    return turns


def _answer(value, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    return _content(value, where)


def _preference(record: dict) -> tuple[list[dict], str]:
    """TRL's preference format: `prompt` (text or messages), `chosen` and `rejected` (text or one message)."""
    prompt = _prompt(record["prompt"])
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("unknown_schema", "prompt must end with a user turn")
    return prompt + [{"role": "assistant", "content": _answer(record["chosen"], "chosen")}], _answer(
        record["rejected"], "rejected"
    )


def to_example(record, source: str, line: int) -> Example:
    if isinstance(record, dict) and {"prompt", "chosen", "rejected"} <= set(record):
        messages, rejected = _preference(record)
        return Example(messages, source, line, rejected)
    return Example(to_messages(record), source, line)


def read_lines(name: str, data: bytes):
    """Yield (line number, bytes, is_last_without_newline) for each non-blank line."""
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    lines = data.split(b"\n")
    truncated_tail = not data.endswith(b"\n")
    for i, raw in enumerate(lines, start=1):
        if raw.strip():
            yield i, raw, truncated_tail and i == len(lines)


def parse_file(name: str, data: bytes, batch: Batch) -> int:
    """Parse one file's bytes into `batch`; returns how many records it held."""
    n = 0
    try:
        lines = list(read_lines(name, data))
    except (OSError, EOFError) as exc:
        batch.read += 1
        batch.quarantine.append(Quarantined(name, 0, "unreadable_file", str(exc), ""))
        return 1
    for lineno, raw, last_unterminated in lines:
        n += 1
        batch.read += 1
        if len(raw) > MAX_LINE_BYTES:
            batch.quarantine.append(
                Quarantined(
                    name,
                    lineno,
                    "oversized_line",
                    f"{len(raw)} bytes > {MAX_LINE_BYTES}",
                    raw[:RAW_KEEP_CHARS].decode("utf-8", "replace"),
                )
            )
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            batch.quarantine.append(
                Quarantined(name, lineno, "invalid_utf8", str(exc), raw[:RAW_KEEP_CHARS].decode("utf-8", "replace"))
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = "truncated_line" if last_unterminated else "malformed_json"
            batch.quarantine.append(Quarantined(name, lineno, reason, str(exc), text[:RAW_KEEP_CHARS]))
            continue
        try:
            batch.examples.append(to_example(record, name, lineno))
        except RecordError as exc:
            batch.quarantine.append(Quarantined(name, lineno, exc.reason, str(exc), text[:RAW_KEEP_CHARS]))
    return n


def ingest(inbox_uri: str, already_ingested: set[str], progress=None) -> Batch:
    """Read every new file of an inbox. `already_ingested`: content hashes of files in earlier versions."""
    store = Store(inbox_uri)
    batch = Batch()
    seen: set[str] = set(already_ingested)
    for key in store.list(""):
        if not key.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
            continue
        data = store.get(key)
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            batch.sources.append(SourceFile(key, digest, 0, skipped="already_ingested"))
            continue
        seen.add(digest)
        n = parse_file(key, data, batch)
        batch.sources.append(SourceFile(key, digest, n, skipped="" if n else "empty"))
        if progress:
            progress(key, n)
    return batch


class InboxCounter:
    """Counts records in an inbox's files not yet ingested (what the data-volume trigger watches).

    It polls every customer every minute or so, 500 customers at once in one triggerer, so a poll reads
    only what changed: the inbox is listed with change tokens and a file is read again only when its
    token moves; dataset manifests are write-once, so each is read once.
    """

    def __init__(self, storage_root: str, customer: str):
        self.customer = customer
        self.store, self.inbox = Store(storage_root), Store(f"{storage_root}/{customer}/inbox")
        self.signalled: set[str] = set()  # file hashes already reported
        self._seen: dict[str, tuple[str, str, int]] = {}  # key -> (change token, sha256, records)
        self._ingested: dict[str, set[str]] = {}  # complete dataset version -> hashes of files it ingested

    def ingested(self) -> set[str]:
        from ftops.snapshot import ingested_files

        for version in self.store.children(f"{self.customer}/datasets"):
            if version not in self._ingested:
                try:
                    manifest = json.loads(self.store.get(f"{self.customer}/datasets/{version}/manifest.json"))
                except (FileNotFoundError, NotADirectoryError):
                    continue  # still being written (its manifest comes last), or not a version
                self._ingested[version] = ingested_files(self.store, self.customer, [manifest])
        return set().union(*self._ingested.values())

    def pending(self) -> tuple[int, set[str]]:
        done = self.ingested() | self.signalled
        count, files = 0, set()
        for key, token in self.inbox.list_info("").items():
            if not key.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
                continue
            cached = self._seen.get(key)
            if cached is None or cached[0] != token:
                data = self.inbox.get(key)
                try:
                    records = sum(1 for _ in read_lines(key, data))
                except (OSError, EOFError):
                    records = 0
                self._seen[key] = cached = (token, hashlib.sha256(data).hexdigest(), records)
            _, digest, records = cached
            if digest not in done and digest not in files:
                count += records
                files.add(digest)
        return count, files
