"""Record types shared by the data stages, and the one JSON Lines writer/reader pair they all use.

Kept in their own module so ingest, validate, clean, dedupe and snapshot import it and not each other.

JSON Lines here means: one JSON document per line, lines end with `\\n`. The writer escapes every code point
that some reader takes for a line break (U+2028, U+2029, NEL and the C0 separators), so a line written is a
line read; the reader splits on `\\n` only, so versions written before the writer escaped them (raw
U+2028 inside content) still read back whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import msgspec

RAW_KEEP_CHARS = 2_000  # quarantine keeps this much of a rejected record (redacted) to show what it was

# json.dumps(ensure_ascii=False) escapes C0 controls but leaves these raw; str.splitlines and JavaScript split on them
_BREAKS = re.compile("[\u0085\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def dump_line(obj) -> bytes:
    """One JSON line, readable back identically by `iter_jsonl`/`read_jsonl` and by any JSON Lines reader.

    Lone surrogates (only reachable through `\\ud800` escapes in the input) are written escaped, so the
    bytes are valid UTF-8 whatever the text."""
    text = json.dumps(obj, ensure_ascii=False)
    text = _BREAKS.sub(_escape, text)
    if _SURROGATE.search(text):
        text = _SURROGATE.sub(_escape, text)
    return text.encode("utf-8") + b"\n"


def dumps_jsonl(rows: Iterable) -> bytes:
    return b"".join(dump_line(r) for r in rows)


def _lines(data: bytes) -> Iterator[bytes]:
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.strip():
            yield line


def read_jsonl(data: bytes) -> list[dict]:
    """Every row of a JSON Lines file written by the project (or earlier versions of it)."""
    return [json.loads(line) for line in _lines(data)]


def iter_jsonl(stream: IO[bytes]) -> Iterator[dict]:
    """Rows of a JSON Lines file, one at a time (constant memory): splits on `\\n` only."""
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield json.loads(line)


def has_surrogate(text: str) -> bool:
    return bool(_SURROGATE.search(text))


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
    """A record that did not make it, with where it came from and why. Built by `ftops.data.clean.quarantined`
    (or `quarantine` for an example), which redacts `raw` and `detail` first: quarantine is kept at rest with
    the dataset version, raw PII must not be."""

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
    skipped: str = ""  # why the file was not read ("already_ingested", "empty", "too_large", ...)


@dataclass
class Batch:
    """What a stage hands the next: kept examples, quarantine, and the files they came from. In the
    streaming chain (`ftops.data.tasks.prepare`) a Batch is one bounded chunk."""

    examples: list[Example] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)
    sources: list[SourceFile] = field(default_factory=list)
    read: int = 0
    pii: dict[str, int] = field(default_factory=dict)

    def dropped(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.quarantine:
            counts[q.reason] = counts.get(q.reason, 0) + 1
        return dict(sorted(counts.items()))

    def to_bytes(self) -> bytes:
        """One stage's output chunk as the next stage reads it (`from_bytes`): the data stages hand chunks to
        each other through the run's scratch in object storage. MessagePack (msgspec), rows as lists: the
        hand-off costs a fraction of JSON's. Text that is not valid Unicode (a lone surrogate: ingest quarantines
        records holding one, but a chunk round-trips any text) cannot be MessagePack's UTF-8: such a chunk is
        written as JSON with `surrogatepass`, which starts with `[` (MessagePack's 5-item array starts with 0x95)."""
        doc = [
            [[e.messages, e.source, e.line, e.rejected] for e in self.examples],
            [[q.source, q.line, q.reason, q.detail, q.raw] for q in self.quarantine],
            [[s.name, s.sha256, s.records, s.skipped] for s in self.sources],
            self.read,
            self.pii,
        ]
        try:
            return msgspec.msgpack.encode(doc)
        except UnicodeEncodeError:
            return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")

    @classmethod
    def from_bytes(cls, data: bytes) -> Batch:
        if data[:1] == b"[":
            examples, quarantine, sources, read, pii = json.loads(data.decode("utf-8", "surrogatepass"))
        else:
            examples, quarantine, sources, read, pii = msgspec.msgpack.decode(data)
        return cls(
            examples=[Example(*e) for e in examples],
            quarantine=[Quarantined(*q) for q in quarantine],
            sources=[SourceFile(*s) for s in sources],
            read=read,
            pii=pii,
        )


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
