"""Snapshot: immutable dataset versions at `<root>/<customer>/datasets/<version>/`, and their history.

A version holds `train.jsonl`, `val.jsonl`, `quarantine.jsonl` (redacted), the validation result and page, the
Great Expectations Data Docs site (`data_docs/`, without its fonts and images), the dedupe index
(`index/keys.txt`, `index/minhash.npy`) and `manifest.json`, written last: a version without a
manifest is incomplete and ignored. Every file is write-once. The train/validation split is decided by
the example's content hash, so an example once in validation never lands in a later train split.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import ftops
from ftops.config import REPO_ROOT
from ftops.data.dedupe import NUM_PERM, History
from ftops.data.records import Batch, dump_line, dumps_jsonl, read_jsonl
from ftops.storage import Store

__all__ = ["read_jsonl", "Writer", "write", "training_mix", "versions", "load_history", "tombstones"]


def in_validation(key: str, val_fraction: float) -> bool:
    return int(key[:8], 16) % 10_000 < val_fraction * 10_000


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"ftops {ftops.__version__}" + (f" ({sha})" if sha else "")


def _jsonl(rows) -> bytes:
    return dumps_jsonl(rows)


def manifest(store: Store, customer: str, version: str) -> dict | None:
    """A dataset version's manifest; None while the version is incomplete (its manifest is written last)."""
    try:
        return json.loads(store.get(f"{customer}/datasets/{version}/manifest.json"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def versions(store: Store, customer: str) -> list[dict]:
    """Manifests of the customer's complete dataset versions, oldest first."""
    found = (manifest(store, customer, v) for v in store.children(f"{customer}/datasets"))
    return sorted((m for m in found if m is not None), key=lambda m: m["version"])


def ingested_files(store: Store, customer: str, manifests: list[dict] | None = None) -> set[str]:
    """Content hashes of every inbox file that a complete version ingested or refused (too large,
    unreadable): recorded once with its quarantine entry, not retried by every run."""
    manifests = versions(store, customer) if manifests is None else manifests
    return {s["sha256"] for m in manifests for s in m["sources"] if s["skipped"] != "already_ingested" and s["sha256"]}


def load_history(store: Store, customer: str) -> tuple[History, set[str], list[dict]]:
    """Dedupe index (disk-backed), ingested file hashes and manifests of every complete version."""
    manifests = versions(store, customer)
    history = History()
    for m in manifests:
        base = f"{customer}/datasets/{m['version']}/index"
        keys = store.get(f"{base}/keys.txt").decode().split()
        history.extend(keys, store.read_npy(f"{base}/minhash.npy"))
        del keys
    return history, ingested_files(store, customer, manifests), manifests


NPY_HEADER = 128  # a version-1 .npy header for a 2-D uint64 array of up to 10^30 rows pads to 128 bytes


@dataclass
class Snapshot:
    version: str
    uri: str
    manifest: dict


class Writer:
    """A new dataset version, streamed: rows go to local spill files as chunks arrive (memory stays flat),
    `publish` copies them to the version path, manifest last. The spill folder holds only cleaned rows and
    redacted quarantine, and is removed by `publish`/`discard` (and, if the process dies, by `expire_spill`)."""

    def __init__(self, store: Store, customer: str, val_fraction: float, spill_root: Path | str | None = None):
        self.store, self.customer, self.val_fraction = store, customer, val_fraction
        if spill_root is not None:
            Path(spill_root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="ftops-prepare-", dir=spill_root))
        self.files = {
            n: open(self.dir / n, "wb")
            for n in ("train.jsonl", "val.jsonl", "quarantine.jsonl", "keys.txt", "minhash.npy")
        }  # noqa: SIM115
        self.files["minhash.npy"].write(b"\0" * NPY_HEADER)
        self.train_hash, self.val_hash = hashlib.sha256(), hashlib.sha256()
        self.read, self.kept, self.train, self.val = 0, 0, 0, 0
        self.dropped: dict[str, int] = {}
        self.pii: dict[str, int] = {}
        self.sources: list[dict] = []

    def add(self, batch: Batch, keys: list[str], sigs: np.ndarray) -> None:
        f = self.files
        for ex, key in zip(batch.examples, keys, strict=True):
            row = {"id": key, "messages": ex.messages, "source": ex.source, "line": ex.line}
            if ex.rejected is not None:
                row["rejected"] = ex.rejected
            if in_validation(key, self.val_fraction):
                f["val.jsonl"].write(dump_line(row))
                self.val_hash.update(key.encode())
                self.val += 1
            else:
                f["train.jsonl"].write(dump_line(row))
                self.train_hash.update(key.encode())
                self.train += 1
            f["keys.txt"].write(key.encode() + b"\n")
        f["minhash.npy"].write(np.ascontiguousarray(sigs, dtype=np.uint64).tobytes())
        for q in batch.quarantine:
            f["quarantine.jsonl"].write(dump_line(asdict(q)))
            self.dropped[q.reason] = self.dropped.get(q.reason, 0) + 1
        for k, v in batch.pii.items():
            self.pii[k] = self.pii.get(k, 0) + v
        self.sources += [asdict(s) for s in batch.sources]
        self.read += batch.read
        self.kept += len(keys)

    def counts(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "pii": self.pii,
            "train": self.train,
            "val": self.val,
        }

    def publish(
        self,
        validation: dict,
        validation_html: str,
        parent: str | None,
        run: dict | None = None,
        docs: Path | None = None,
        version: str | None = None,
        stages: dict | None = None,
    ) -> Snapshot:
        """Write the version `version` (a run's own name, see `ftops.run.Run.dataset_version`; else the clock
        and the content). Never touches a complete version (FileExistsError when its manifest exists); files
        without a manifest under the same name are a crashed try's of the same run, removed first."""
        try:
            for fh in self.files.values():
                fh.close()
            keys = (self.dir / "keys.txt").read_text().split()
            fingerprint = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
            del keys
            version = version or f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{fingerprint[:8]}"
            prefix = f"{self.customer}/datasets/{version}"
            if self.store.exists(f"{prefix}/manifest.json"):
                raise FileExistsError(self.store.uri(prefix))
            self.store.delete_prefix(prefix + "/")
            npy = self.dir / "minhash.npy"
            with open(npy, "r+b") as out:  # the rows were written after a reserved header: fill it in now
                header = {"descr": "<u8", "fortran_order": False, "shape": (self.kept, NUM_PERM)}
                np.lib.format.write_array_header_1_0(out, header)
                if out.tell() != NPY_HEADER:
                    raise RuntimeError(f"npy header is {out.tell()} bytes, not {NPY_HEADER}")
            for name in ("train.jsonl", "val.jsonl", "quarantine.jsonl"):
                self.store.put_file(f"{prefix}/{name}", self.dir / name)
            self.store.put(f"{prefix}/validation.json", json.dumps(validation).encode())
            self.store.put(f"{prefix}/validation.html", validation_html.encode())
            if docs is not None and docs.is_dir():
                for path in sorted(p for p in docs.rglob("*") if p.is_file()):
                    rel = path.relative_to(docs).as_posix()
                    if not rel.startswith(("static/fonts/", "static/images/")):  # ~4 MB a version; pages read fine
                        self.store.put_file(f"{prefix}/data_docs/{rel}", path)
            self.store.put_file(f"{prefix}/index/keys.txt", self.dir / "keys.txt")
            self.store.put_file(f"{prefix}/index/minhash.npy", npy)
            manifest = {
                "customer": self.customer,
                "version": version,
                "parent": parent,
                "created_at": datetime.now(UTC).isoformat(),
                "code_version": code_version(),
                "run": run or {},
                "counts": self.counts(),
                "fingerprint": fingerprint,
                "train_fingerprint": self.train_hash.hexdigest(),
                "val_fingerprint": self.val_hash.hexdigest(),
                "val_fraction": self.val_fraction,
                "sources": self.sources,
                "validation_success": validation.get("success"),
                "stages": stages or {},
            }
            self.store.put(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
            return Snapshot(version, self.store.uri(prefix), manifest)
        finally:
            self.discard()

    def discard(self) -> None:
        for fh in self.files.values():
            fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def expire_spill(spill_root: Path | str, max_age_s: float) -> int:
    """Remove spill folders left by a process that died mid-run (older than `max_age_s`)."""
    root, n = Path(spill_root), 0
    if not root.is_dir():
        return 0
    for d in root.glob("ftops-prepare-*"):
        try:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        except FileNotFoundError:
            continue
    return n


def write(
    store: Store,
    customer: str,
    batch: Batch,
    keys: list[str],
    sigs: np.ndarray,
    validation: dict,
    validation_html: str,
    parent: str | None,
    val_fraction: float,
    run: dict | None = None,
) -> Snapshot:
    """Write a new version from one in-memory batch (small data, tests); `Writer` streams."""
    w = Writer(store, customer, val_fraction)
    try:
        w.add(batch, keys, sigs)
    except BaseException:
        w.discard()
        raise
    return w.publish(validation, validation_html, parent, run)


# --- right to erasure -----------------------------------------------------------------------------------


def tombstones(store: Store, customer: str) -> set[str]:
    """Ids (content keys) of examples erased on request: never trained on or replayed again."""
    ids: set[str] = set()
    for key in store.list(f"{customer}/erasure"):
        if key.endswith(".json"):
            ids |= set(json.loads(store.get(key))["ids"])
    return ids


def find_examples(
    store: Store, customer: str, match: str | None = None, example: str | None = None, source: str | None = None
) -> dict[str, list]:
    """Ids of the stored examples an erasure request names, per dataset version that holds them: `example` is
    an id (content key); `source` the inbox file they came from (its lineage name); `match` a text, looked for
    as the pipeline stored it (normalised, case-folded) in every turn and the rejected answer. Streams each
    version's files."""
    from ftops.data.clean import normalise, redact
    from ftops.data.records import iter_jsonl

    needle = " ".join(redact(normalise(match))[0].casefold().split()) if match else None
    found: dict[str, list] = {}
    for m in versions(store, customer):
        for split in ("train", "val"):
            with store.open(f"{customer}/datasets/{m['version']}/{split}.jsonl") as f:
                for row in iter_jsonl(f):
                    if example is not None:
                        hit = row["id"] == example
                    elif source is not None:
                        hit = row.get("source") == source
                    else:
                        texts = [t["content"] for t in row["messages"]] + [row.get("rejected") or ""]
                        hit = any(needle in " ".join(t.casefold().split()) for t in texts)
                    if hit:
                        found.setdefault(m["version"], []).append(row["id"])
    return found


def erase(store: Store, customer: str, ids: set[str], request: str) -> str:
    """Record a tombstone (write-once, like everything under a customer): the ids, and a hash of the request,
    never its text (it may be the very PII being erased). Returns its key."""
    now = datetime.now(UTC)
    body = {
        "ids": sorted(ids),
        "created_at": now.isoformat(),
        "request_sha256": hashlib.sha256(request.encode()).hexdigest(),
    }
    key = f"{customer}/erasure/{now:%Y%m%dT%H%M%S%fZ}-{body['request_sha256'][:8]}.json"
    store.put(key, json.dumps(body, indent=2).encode())
    return key


def adapters_containing(adapter_versions, dataset_versions: set[str]) -> dict[str, list[str]]:
    """Registry versions whose training saw the erased examples: `trained_on` (a version holding them was among
    its new data), `may_carry` (trained later: replay samples older versions, and `init: production` starts
    from the weights of the adapter before). Reads the `dataset.version`/`dataset.new_versions` tags."""
    out: dict[str, list[str]] = {"trained_on": [], "may_carry": []}
    if not dataset_versions:
        return out
    first = min(dataset_versions)
    for v in adapter_versions:
        new = set(v.info.dataset_new_versions or [])
        upto = v.info.dataset_version or ""
        if new & dataset_versions:
            out["trained_on"].append(v.version)
        elif upto and upto >= first:
            out["may_carry"].append(v.version)
    return out


def _rows(store: Store, key: str, erased: set[str]) -> list[dict]:
    return [r for r in read_jsonl(store.get(key)) if r.get("id") not in erased]


def training_mix(
    store: Store, customer: str, new_versions: list[str], old_versions: list[str], replay_fraction: float, seed: int
) -> tuple[list[dict], list[dict], list[str]]:
    """Train rows = new versions' train splits + a replay sample of older versions' train rows.

    The replay sample is `replay_fraction` of the mix, drawn deterministically (by seed) and spread
    evenly across the older versions. Validation = every version's val split (never trained on); rows
    of older versions carry `history: true`, so a candidate can be compared with production on data
    production has also never trained on. Examples erased on request (`tombstones`) are left out everywhere.
    Returns (train, val, replayed ids). Only this customer's prefix is ever read.
    """
    erased = tombstones(store, customer)
    new = [r for v in new_versions for r in _rows(store, f"{customer}/datasets/{v}/train.jsonl", erased)]
    old_by_version = [_rows(store, f"{customer}/datasets/{v}/train.jsonl", erased) for v in old_versions]
    old_total = sum(len(rows) for rows in old_by_version)
    want = (
        min(old_total, round(len(new) * replay_fraction / (1 - replay_fraction))) if replay_fraction < 1 else old_total
    )
    rng = random.Random(seed)
    replay: list[dict] = []
    for rows in old_by_version:
        share = round(want * len(rows) / old_total) if old_total else 0
        replay += rng.sample(rows, min(share, len(rows)))
    val = [
        r | {"history": v in old_versions}
        for v in new_versions + old_versions
        for r in _rows(store, f"{customer}/datasets/{v}/val.jsonl", erased)
    ]
    return new + replay, val, [r["id"] for r in replay]
