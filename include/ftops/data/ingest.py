"""Ingest: read a customer's inbox (local folder or `s3://` prefix) into canonical chat examples.

Accepted per record, detected record by record: OpenAI `messages`, ShareGPT `conversations`, Alpaca
(`instruction`/`input`/`output`), and preference pairs (`prompt`/`chosen`/`rejected`, TRL's format) for
the optional DPO stage; JSON Lines (`\\n`, `\\r\\n` or `\\r` line ends, an optional UTF-8 BOM), optionally
gzip. Every non-blank line ends in exactly one place: an `Example`, or a `Quarantined` record with a
reason code, its source file and line (text redacted). Nothing one record or one file holds can stop the
run: a file that cannot be read, is too large, or is a symlink is one quarantine entry with its reason.

Files are streamed (constant memory whatever their size) in two passes: the first hashes the bytes (a
file already ingested, under any name, is skipped) and checks the per-file limits before any record of
it is accepted; the second parses. Source names are sanitised before they reach lineage.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ftops.data.clean import quarantined
from ftops.data.records import Batch, Example, Quarantined, RecordError, SourceFile, has_surrogate
from ftops.storage import Entry, Store, no_follow

__all__ = [  # the record types used to live here; their importers keep working
    "Batch",
    "Example",
    "Quarantined",
    "RecordError",
    "SourceFile",
    "Limits",
    "ingest",
    "parse_file",
    "chunks",
    "InboxCounter",
]

MAX_LINE_BYTES = 1 << 20
READ_CHUNK = 1 << 20
HEAD_BYTES = 2_000  # what quarantine keeps of an over-long line
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bing": "assistant",
    "chatgpt": "assistant",
}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        out = int(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: not an integer") from exc
    if out < 1:
        raise ValueError(f"{name}={value!r}: must be at least 1")
    return out


@dataclass(frozen=True)
class Limits:
    """Work allowed per inbox file and per record. Defaults are generous for real uploads (hundreds of MB of
    chat data compress 4-10x) and stop what is not data: a gzip bomb, a file of a billion tiny lines."""

    max_file_bytes: int = 1 << 30  # decompressed bytes per file
    max_records_per_file: int = 2_000_000
    max_compression_ratio: int = 100  # decompressed / compressed, checked once past 16 MiB decompressed
    max_line_bytes: int = MAX_LINE_BYTES
    max_depth: int = 32  # JSON nesting; accepted formats need 4
    max_number_chars: int = 100  # a number literal longer than this is not chat data (int() stops at 4300)

    @classmethod
    def from_env(cls) -> Limits:
        """`FTOPS_DATA_MAX_FILE_BYTES`, `FTOPS_DATA_MAX_RECORDS_PER_FILE`, `FTOPS_DATA_MAX_COMPRESSION_RATIO`."""
        d = cls()
        return cls(
            max_file_bytes=_env_int("FTOPS_DATA_MAX_FILE_BYTES", d.max_file_bytes),
            max_records_per_file=_env_int("FTOPS_DATA_MAX_RECORDS_PER_FILE", d.max_records_per_file),
            max_compression_ratio=_env_int("FTOPS_DATA_MAX_COMPRESSION_RATIO", d.max_compression_ratio),
        )


RATIO_CHECK_AFTER = 16 << 20

# --- names ----------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


def safe_name(name: str) -> str:
    """A file name fit for lineage (manifests, quarantine, example `source`): PII redacted, only
    `[A-Za-z0-9._/-]`, no `..` or empty segments, bounded; a short hash of the original name is appended
    when anything was changed, so two names never collide."""
    from ftops.data.clean import redact

    out = redact(name)[0] if len(name) < 4096 else name[:200]
    out = _UNSAFE.sub("_", out)
    out = "/".join(seg for seg in out.split("/") if seg not in ("", ".", ".."))[:200] or "_"
    if out != name:
        out += "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return out


# --- records --------------------------------------------------------------------------------------------


def _content(value, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("unknown_schema", f"{where}: content is not a string")
    if not value.strip():
        raise RecordError("empty_content", f"{where}: empty")
    return value


def _role(m, where: str) -> str:
    role = m.get("role") if isinstance(m, dict) else None
    if not isinstance(role, str) or role not in ("system", "user", "assistant"):
        raise RecordError("unknown_schema", f"{where}: role must be system, user or assistant")
    return role


def to_messages(record) -> list[dict]:
    """One JSON record in any accepted format to [{'role', 'content'}, ...]; RecordError if unusable."""
    if not isinstance(record, dict):
        raise RecordError("unknown_schema", "record is not a JSON object")
    if isinstance(record.get("messages"), list):
        messages = []
        for i, m in enumerate(record["messages"]):
            role = _role(m, f"messages[{i}]")
            messages.append({"role": role, "content": _content(m.get("content"), f"messages[{i}]")})
    elif isinstance(record.get("conversations"), list):
        messages = []
        for i, m in enumerate(record["conversations"]):
            speaker = m.get("from") if isinstance(m, dict) else None
            role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
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
        raise RecordError("unknown_schema", f"no messages, conversations or instruction/output ({len(record)} keys)")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", "no assistant turn to learn from")
    return messages


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": _content(value, "prompt")}]
    if not isinstance(value, list):
        raise RecordError("unknown_schema", "prompt: neither a string nor a list of messages")
    return [
        {"role": _role(m, f"prompt[{i}]"), "content": _content(m.get("content"), f"prompt[{i}]")}
        for i, m in enumerate(value)
    ]


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


def _decoder(limits: Limits) -> json.JSONDecoder:
    def number(kind):
        def parse(s: str):
            if len(s) > limits.max_number_chars:
                raise RecordError("number_too_large", f"a {len(s)}-character number (limit {limits.max_number_chars})")
            return kind(s)

        return parse

    return json.JSONDecoder(parse_int=number(int), parse_float=number(float))


def _depth_exceeds(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return False


def parse_record(
    raw: bytes, name: str, lineno: int, last_unterminated: bool, limits: Limits, decoder: json.JSONDecoder
) -> Example | Quarantined:
    """One line to an Example or a Quarantined record; never raises."""
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return quarantined(
                name, lineno, "invalid_utf8", f"byte {exc.start}: {exc.reason}", raw.decode("utf-8", "replace")
            )
        try:
            record = decoder.decode(text)
        except json.JSONDecodeError as exc:
            reason = "truncated_line" if last_unterminated else "malformed_json"
            return quarantined(name, lineno, reason, f"{exc.msg} at column {exc.colno}", text)
        except RecursionError:
            return quarantined(name, lineno, "too_deep", f"JSON nested deeper than {limits.max_depth}", text)
        # a bracket count is a cheap upper bound on the depth: walk only when it could exceed the limit
        if raw.count(b"[") + raw.count(b"{") > limits.max_depth and _depth_exceeds(record, limits.max_depth):
            return quarantined(name, lineno, "too_deep", f"JSON nested deeper than {limits.max_depth}", text)
        example = to_example(record, name, lineno)
        # A lone UTF-16 surrogate can only arrive as a `\\udXXX` escape (raw ones are invalid UTF-8): look for
        # one only when the line has such an escape. It is not text: it cannot be encoded or tokenised.
        if _SURROGATE_ESCAPE.search(raw) and any(
            has_surrogate(t) for t in [m["content"] for m in example.messages] + [example.rejected or ""]
        ):
            return quarantined(name, lineno, "unencodable_text", "lone surrogate code point", text)
        return example
    except RecordError as exc:
        return quarantined(name, lineno, exc.reason, str(exc), raw.decode("utf-8", "replace"))
    except Exception as exc:  # noqa: BLE001 - the last line of per-record isolation: quarantine, never crash
        return quarantined(name, lineno, "invalid_record", type(exc).__name__, raw.decode("utf-8", "replace"))


# --- files ----------------------------------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def split_lines(stream: IO[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes, int, bool]]:
    """(line number, bytes, size, terminated) for every line; a line longer than `max_line` comes as its
    first `HEAD_BYTES` only, with its full size (the caller quarantines it).

    Lines end at `\n`, `\r\n` or a lone `\r` (files saved by old Mac tools); raw CR and LF cannot occur
    inside valid JSON, so this never splits a record. Memory is bounded by `max_line` plus one chunk."""
    lineno, tail = 0, b""
    head, skipped = b"", -1  # skipped >= 0: bytes of an over-long line consumed so far
    while True:
        chunk = stream.read(READ_CHUNK)
        eof = not chunk
        data = tail + chunk
        tail = b""
        if not eof and data.endswith(b"\r"):  # maybe half of a CRLF: decide with the next chunk
            data, tail = data[:-1], b"\r"
        pieces = _EOL.split(data)
        rest = pieces.pop()
        for p in pieces:
            lineno += 1
            if skipped >= 0:
                yield lineno, head, skipped + len(p), True
                skipped = -1
            else:
                yield lineno, p if len(p) <= max_line else p[:HEAD_BYTES], len(p), True
        if eof:
            if skipped >= 0:
                yield lineno + 1, head, skipped + len(rest), False
            elif rest:
                yield lineno + 1, rest if len(rest) <= max_line else rest[:HEAD_BYTES], len(rest), False
            return
        if skipped >= 0:
            skipped += len(rest)
        elif len(rest) > max_line:
            head, skipped = rest[:HEAD_BYTES], len(rest)
        else:
            tail = rest + tail


class TooLarge(Exception):
    pass


class _Counted(io.RawIOBase):
    """A read-only stream that counts the bytes read through it and stops past a limit."""

    def __init__(self, inner: IO[bytes], limit: int | None = None, compressed: _Counted | None = None, ratio=0):
        self.inner, self.limit, self.n = inner, limit, 0
        self.compressed, self.ratio = compressed, ratio

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        self.n += len(data)
        if self.limit is not None and self.n > self.limit:
            raise TooLarge(f"more than {self.limit} bytes decompressed")
        if self.compressed is not None and self.n > RATIO_CHECK_AFTER and self.n > self.ratio * self.compressed.n:
            raise TooLarge(f"compression ratio above {self.ratio}:1 ({self.n} bytes from {self.compressed.n})")
        b[: len(data)] = data
        return len(data)


def _decompressed(name: str, raw: IO[bytes], limits: Limits) -> _Counted:
    if name.endswith(".gz"):
        compressed = _Counted(raw)
        return _Counted(
            gzip.GzipFile(fileobj=io.BufferedReader(compressed)),
            limits.max_file_bytes,
            compressed,
            limits.max_compression_ratio,
        )
    return _Counted(raw, limits.max_file_bytes)


_READ_ERRORS = (OSError, EOFError, zlib.error)


@dataclass
class InboxFile:
    key: str  # as listed (relative to the inbox)
    name: str  # sanitised, for lineage
    open: Callable[[], IO[bytes]]
    refused: str = ""  # reason code when the entry is never opened (a symlink)


@dataclass
class Scan:
    sha256: str
    records: int
    problem: str = ""  # reason code: too_large, unreadable_file
    detail: str = ""


def scan(f: InboxFile, limits: Limits) -> Scan:
    """First pass over a file: content hash, records (non-blank lines), and whether it may be parsed."""
    digest, records = hashlib.sha256(), 0
    try:
        with f.open() as raw:
            hashing = _Hashing(raw, digest)
            stream = _decompressed(f.key, hashing, limits)
            lines = 0
            for _, line, _size, _ in split_lines(io.BufferedReader(stream, READ_CHUNK)):
                lines += 1  # blank lines count toward the limit too: they cost work, not records
                if lines > limits.max_records_per_file:
                    raise TooLarge(f"more than {limits.max_records_per_file} lines")
                if line.strip():
                    records += 1
            while hashing.read(READ_CHUNK):  # hash what a gzip trailer-less reader left unread
                pass
    except TooLarge as exc:
        return Scan(digest.hexdigest(), records, "too_large", f"{exc} (read {records} records before stopping)")
    except _READ_ERRORS as exc:
        return Scan(digest.hexdigest(), records, "unreadable_file", type(exc).__name__ + ": " + str(exc)[:200])
    return Scan(digest.hexdigest(), records)


class _Hashing(io.RawIOBase):
    def __init__(self, inner: IO[bytes], digest):
        self.inner, self.digest = inner, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        self.digest.update(data)
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.digest.update(data)
        return data


def records(f: InboxFile, limits: Limits) -> Iterator[Example | Quarantined]:
    """Second pass: every non-blank line of a file as an Example or a Quarantined record.
    A read error part-way ends the file with one `unreadable_file` entry (the records before it stand)."""
    decoder = _decoder(limits)
    first = True
    try:
        with f.open() as raw:
            stream = io.BufferedReader(_decompressed(f.key, raw, limits), READ_CHUNK)
            for lineno, line, size, terminated in split_lines(stream, limits.max_line_bytes):
                if size > limits.max_line_bytes:
                    yield quarantined(
                        f.name,
                        lineno,
                        "oversized_line",
                        f"{size} bytes > {limits.max_line_bytes}",
                        line.decode("utf-8", "replace"),
                    )
                    continue
                if first:
                    first = False
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not content
                if not line.strip():
                    continue
                yield parse_record(line, f.name, lineno, not terminated, limits, decoder)
    except (TooLarge, *_READ_ERRORS) as exc:
        yield quarantined(f.name, 0, "unreadable_file", type(exc).__name__ + ": " + str(exc)[:200], "")


def _files(store: Store, label: str = "") -> list[InboxFile]:
    """The data files under a storage root, as ingest reads them (symlinks listed refused, never followed)."""
    return [_file(e, label) for e in store.entries("") if e.folder or e.key.endswith(DATA_SUFFIXES)]


def _file(e: Entry, label: str = "") -> InboxFile:
    return InboxFile(e.key, safe_name(f"{label}{e.key}"), e.open, e.refused)


def inbox_files(inbox_uri: str) -> list[InboxFile]:
    return _files(Store(inbox_uri))


def local_files(paths: list[Path]) -> list[InboxFile]:
    """Files given on a command line: a file as named; a folder like an inbox (symlinks inside refused)."""
    out: list[InboxFile] = []
    for p in paths:
        if p.is_dir():
            out += _files(Store(str(p)), f"{p.name}/")
        else:
            out.append(
                InboxFile(
                    p.name, safe_name(p.name), no_follow(p) if not p.is_symlink() else (lambda p=p: open(p, "rb"))
                )
            )
    return out


def chunks(
    files: list[InboxFile],
    already_ingested: set[str],
    limits: Limits | None = None,
    size: int = 10_000,
    progress=None,
) -> Iterator[Batch]:
    """Batches of at most `size` examples (plus their quarantine) over every new file, in order; each
    file's SourceFile rides on the batch that finishes it. Constant memory whatever the inbox holds."""
    limits = limits or Limits.from_env()
    seen: set[str] = set(already_ingested)
    batch = Batch()
    for f in files:
        if f.refused:
            batch.read += 1
            batch.quarantine.append(quarantined(f.name, 0, f.refused, "not followed: only regular files are read", ""))
            batch.sources.append(SourceFile(f.name, "", 1, skipped=f.refused))
            continue
        s = scan(f, limits)
        if s.problem:
            batch.read += 1
            batch.quarantine.append(quarantined(f.name, 0, s.problem, s.detail, ""))
            batch.sources.append(SourceFile(f.name, s.sha256, 1, skipped=s.problem))
            continue
        if s.sha256 in seen:
            batch.sources.append(SourceFile(f.name, s.sha256, 0, skipped="already_ingested"))
            continue
        seen.add(s.sha256)
        n = 0
        for item in records(f, limits):
            n += 1
            batch.read += 1
            if isinstance(item, Example):
                batch.examples.append(item)
            else:
                batch.quarantine.append(item)
            if len(batch.examples) >= size or len(batch.quarantine) >= size:
                yield batch
                batch = Batch()
        batch.sources.append(SourceFile(f.name, s.sha256, n, skipped="" if n else "empty"))
        if progress:
            progress(f.name, n)
    yield batch


def merge(batches) -> Batch:
    out = Batch()
    for b in batches:
        out.examples += b.examples
        out.quarantine += b.quarantine
        out.sources += b.sources
        out.read += b.read
    return out


def parse_file(name: str, data: bytes, batch: Batch, limits: Limits | None = None) -> int:
    """Parse one file's bytes into `batch`; returns how many records it held."""
    f = InboxFile(name, name, lambda: io.BytesIO(data))
    before = batch.read
    for b in chunks([f], set(), limits, size=1 << 62):
        batch.examples += b.examples
        batch.quarantine += b.quarantine
        batch.read += b.read
    return batch.read - before


def ingest(inbox_uri: str, already_ingested: set[str], progress=None, limits: Limits | None = None) -> Batch:
    """Read every new file of an inbox into one Batch (small inboxes and tests; `chunks` streams)."""
    return merge(chunks(inbox_files(inbox_uri), already_ingested, limits, size=1 << 62, progress=progress))


class InboxCounter:
    """Counts records in an inbox's files not yet ingested (what the data-volume trigger watches).

    It polls every customer every minute or so, 500 customers at once in one triggerer, so a poll reads
    only what changed: the inbox is listed with change tokens and a file is read again only when its
    token moves; dataset manifests are write-once, so each is read once. It reads files as ingest does
    (same limits, no symlinks): a file ingest would refuse counts nothing, so junk never starts a run.
    """

    def __init__(self, storage_root: str, customer: str, limits: Limits | None = None):
        self.customer = customer
        self.store, self.inbox = Store(storage_root), Store(f"{storage_root}/{customer}/inbox")
        self.limits = limits or Limits.from_env()
        self.signalled: set[str] = set()  # file hashes already reported
        self._seen: dict[str, tuple[str, str, int]] = {}  # key -> (change token, sha256, records)
        self._ingested: dict[str, set[str]] = {}  # complete dataset version -> hashes of files it ingested

    def ingested(self) -> set[str]:
        from ftops.data.snapshot import ingested_files, manifest

        for version in self.store.children(f"{self.customer}/datasets"):
            if version not in self._ingested:
                if (m := manifest(self.store, self.customer, version)) is None:
                    continue  # still being written (its manifest comes last), or not a version
                self._ingested[version] = ingested_files(self.store, self.customer, [m])
        return set().union(*self._ingested.values())

    def pending(self) -> tuple[int, set[str]]:
        done = self.ingested() | self.signalled
        count, files = 0, set()
        for e in self.inbox.entries(""):  # one listing per poll, one client for the counter's life
            if e.refused or not e.key.endswith(DATA_SUFFIXES):
                continue
            key, token, f = e.key, e.token, _file(e)
            cached = self._seen.get(key)
            if cached is None or cached[0] != token:
                s = scan(f, self.limits)
                self._seen[key] = cached = (token, s.sha256, 0 if s.problem else s.records)
            _, digest, n = cached
            if n and digest not in done and digest not in files:
                count += n
                files.add(digest)
        return count, files
