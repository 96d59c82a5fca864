"""Files: a customer's uploads, validated the moment they arrive with the ingest chain's own code, and kept.

An upload is read by `ftops.data.ingest` (same reader, limits and record parsing as a DAG run), checked by the
Great Expectations suite's row-level expectations (`ftops.data.validate.Validator`) and cleaned by
`ftops.data.clean` (PII per type, counted, never returned), exactly as `ftops.data.tasks.prepare` chains them;
the report is `validation`: read, kept, dropped per reason, PII per type, and the first errors with their line.

Where things are (one `ftops.storage.Store` under the storage root, write-once):
- `<customer>/inbox/<file id>.jsonl[.gz]`: the upload, unless validation rejected it outright; the data-volume
  trigger counts it and the next run ingests it (its examples' lineage `source` is that name);
- `<customer>/portal/files/<file id>.json`: the file object with its validation;
- `<customer>/portal/files/<file id>.deleted.json`: the erasure report once the customer deleted it.
A file id is a hash of the customer and the content: the same bytes uploaded again are the same file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ftops.config import DataPolicy
from ftops.portal.auth import ApiError
from ftops.storage import AlreadyExists, Store

MAX_ERRORS = 100  # line-level errors returned; the counts cover every record
GZIP_MAGIC = b"\x1f\x8b"


def file_id(customer: str, sha256: str) -> str:
    return "file-" + hashlib.sha256(f"{customer}:{sha256}".encode()).hexdigest()[:24]


def validate_file(path: Path, name: str, policy: DataPolicy, limits) -> dict:
    """The ingest chain's verdict on one file, without writing anything: `rejected` says why it cannot be used
    at all (a file-level problem, no example kept, or the batch-level expectation a run would fail on)."""
    from ftops.data.clean import clean
    from ftops.data.ingest import InboxFile, chunks
    from ftops.data.validate import Validator

    def opener():
        return open(path, "rb")

    report: dict = {"read": 0, "kept": 0, "dropped": {}, "pii": {}, "errors": [], "errors_truncated": False}
    problems: list[str] = []
    validator = Validator(policy)
    # 10k-example chunks (prepare: 50k): one upload holds one small chunk at a time, several customers upload at once
    for batch in chunks([InboxFile(name, name, opener)], set(), limits, size=10_000):
        batch = validator.rows(batch)
        batch = clean(batch, policy.pii)
        report["read"] += batch.read
        report["kept"] += len(batch.examples)
        for reason, n in batch.dropped().items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + n
        for kind, n in batch.pii.items():
            report["pii"][kind] = report["pii"].get(kind, 0) + n
        for q in batch.quarantine:
            if len(report["errors"]) < MAX_ERRORS:
                report["errors"].append({"line": q.line, "reason": q.reason})
            else:
                report["errors_truncated"] = True
        problems += [f"{q.reason}: {q.detail}" for q in batch.quarantine if q.line == 0]  # file-level
    report["dropped"] = dict(sorted(report["dropped"].items()))
    report["pii"] = dict(sorted(report["pii"].items()))
    report["errors"].sort(key=lambda e: e["line"])
    rejected = ""
    if report["read"] == 0:
        rejected = "empty"
    elif problems:
        rejected = problems[0]
    elif report["kept"] == 0:
        rejected = "no usable example in the file"
    else:
        verdict = validator.finish(report["read"], report["dropped"])
        if not verdict.success:
            rejected = "the batch would be rejected before training: " + "; ".join(verdict.failures)
    report["rejected"] = rejected or None
    return report


class Files:
    """A customer's files in object storage (see the module docstring for the layout)."""

    def __init__(self, storage_root: str):
        self.store = Store(storage_root)

    def _meta(self, customer: str, fid: str) -> str:
        return f"{customer}/portal/files/{fid}.json"

    def _deleted(self, customer: str, fid: str) -> str:
        return f"{customer}/portal/files/{fid}.deleted.json"

    def get(self, customer: str, fid: str) -> dict:
        """The customer's own file, or 404 (another customer's id is simply not found under this customer)."""
        if not fid.startswith("file-") or not fid[5:].isalnum() or len(fid) > 64:
            raise ApiError(404, f"No such file: {fid[:64]!r}.", "file_not_found", "file_id")
        try:
            obj = json.loads(self.store.get(self._meta(customer, fid)))
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, f"No such file: {fid!r}.", "file_not_found", "file_id") from None
        if self.store.exists(self._deleted(customer, fid)):
            raise ApiError(404, f"No such file: {fid!r} (deleted).", "file_not_found", "file_id")
        return obj

    def list(self, customer: str) -> list[dict]:
        keys = self.store.list(f"{customer}/portal/files")
        deleted = {k.removesuffix(".deleted.json") for k in keys if k.endswith(".deleted.json")}
        out = [
            json.loads(self.store.get(k))
            for k in keys
            if k.endswith(".json") and not k.endswith(".deleted.json") and k.removesuffix(".json") not in deleted
        ]
        return sorted(out, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def add(self, customer: str, upload, policy: DataPolicy, limits) -> dict:
        """Validate a received upload and keep it; the same content again returns the stored file object."""
        fid = file_id(customer, upload.sha256)
        if self.store.exists(self._deleted(customer, fid)):
            raise ApiError(
                409,
                "This file was deleted at your request and its examples erased; it cannot be uploaded again.",
                "file_erased",
                "file",
            )
        try:
            return self.get(customer, fid) | {"duplicate": True}
        except ApiError:
            pass
        with open(upload.path, "rb") as f:
            gz = f.read(2) == GZIP_MAGIC
        name = f"{fid}.jsonl.gz" if gz else f"{fid}.jsonl"
        report = validate_file(upload.path, name, policy, limits)
        if report["rejected"] == "empty":
            raise ApiError(400, "The file is empty: no JSON Lines record in it.", "empty_file", "file")
        inbox_key = None
        if not report["rejected"]:
            inbox_key = f"{customer}/inbox/{name}"
            try:
                self.store.put_file(inbox_key, upload.path)
            except AlreadyExists:
                pass  # the same bytes, landed by a concurrent identical upload
        obj = {
            "id": fid,
            "object": "file",
            "bytes": upload.size,
            "created_at": int(time.time()),
            "filename": upload.filename or name,
            "purpose": "fine-tune",
            "status": "error" if report["rejected"] else "processed",
            "status_details": report["rejected"],
            "expires_at": None,
            "sha256": upload.sha256,
            "inbox": name if inbox_key else None,
            "validation": report,
        }
        try:
            self.store.put(self._meta(customer, fid), json.dumps(obj).encode())
        except AlreadyExists:
            return self.get(customer, fid) | {"duplicate": True}
        return obj

    def delete(self, customer: str, fid: str, platform) -> dict:
        """Right to erasure for one file: the upload leaves the inbox (never ingested later), and every example
        a run already stored from it gets a tombstone (`ftops.data.erasure`), with the dataset and adapter
        versions that held them."""
        from ftops.data.erasure import erase

        obj = self.get(customer, fid)
        if obj.get("inbox"):
            self._remove(f"{customer}/inbox/{obj['inbox']}")
        report = (
            erase(customer, source=obj["inbox"], store=self.store, platform=platform)
            if obj.get("inbox")
            else {
                "customer": customer,
                "examples": 0,
                "dataset_versions": {},
                "tombstone": None,
                "adapter_versions": None,
            }
        )
        try:
            self.store.put(self._deleted(customer, fid), json.dumps(report).encode())
        except AlreadyExists:
            pass
        return {"id": fid, "object": "file", "deleted": True, "erasure": report}

    def _remove(self, key: str) -> None:
        self.store.delete_prefix(key)  # the object of that key (nothing else lies under an upload's name)
