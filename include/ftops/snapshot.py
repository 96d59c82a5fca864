"""Snapshot: immutable dataset versions at `<root>/<customer>/datasets/<version>/`, and their history.

A version holds `train.jsonl`, `val.jsonl`, `quarantine.jsonl`, the validation result, the dedupe index
(`index/keys.txt`, `index/minhash.npy`) and `manifest.json`, written last: a version without a
manifest is incomplete and ignored. Every file is write-once. The train/validation split is decided by
the example's content hash, so an example once in validation never lands in a later train split.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

import ftops
from ftops.config import REPO_ROOT
from ftops.dedupe import NUM_PERM, History
from ftops.ingest import Batch
from ftops.storage import Store


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
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def versions(store: Store, customer: str) -> list[dict]:
    """Manifests of the customer's complete dataset versions, oldest first."""
    manifests = [json.loads(store.get(k)) for k in store.list(f"{customer}/datasets") if k.endswith("/manifest.json")]
    return sorted(manifests, key=lambda m: m["version"])


def ingested_files(store: Store, customer: str, manifests: list[dict] | None = None) -> set[str]:
    """Content hashes of every inbox file that a complete version ingested."""
    manifests = versions(store, customer) if manifests is None else manifests
    return {s["sha256"] for m in manifests for s in m["sources"] if s["skipped"] != "already_ingested"}


def load_history(store: Store, customer: str) -> tuple[History, set[str], list[dict]]:
    """Dedupe index, ingested file hashes and manifests of every complete version."""
    manifests = versions(store, customer)
    keys: list[str] = []
    sigs: list[np.ndarray] = []
    for m in manifests:
        base = f"{customer}/datasets/{m['version']}/index"
        keys += store.get(f"{base}/keys.txt").decode().split()
        sigs.append(np.load(io.BytesIO(store.get(f"{base}/minhash.npy"))))
    all_sigs = np.concatenate(sigs) if sigs else np.zeros((0, NUM_PERM), dtype=np.uint64)
    return History(keys, all_sigs), ingested_files(store, customer, manifests), manifests


@dataclass
class Snapshot:
    version: str
    uri: str
    manifest: dict


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
    """Write a new version; never touches an existing one (AlreadyExists if the version path is taken)."""
    fingerprint = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{fingerprint[:8]}"
    train, val = [], []
    for ex, key in zip(batch.examples, keys, strict=True):
        row = {"id": key, "messages": ex.messages, "source": ex.source, "line": ex.line}
        if ex.rejected is not None:
            row["rejected"] = ex.rejected
        (val if in_validation(key, val_fraction) else train).append(row)
    prefix = f"{customer}/datasets/{version}"
    if store.list(prefix):
        raise FileExistsError(store.uri(prefix))
    buf = io.BytesIO()
    np.save(buf, sigs.astype(np.uint64))
    store.put(f"{prefix}/train.jsonl", _jsonl(train))
    store.put(f"{prefix}/val.jsonl", _jsonl(val))
    store.put(f"{prefix}/quarantine.jsonl", _jsonl(q.__dict__ for q in batch.quarantine))
    store.put(f"{prefix}/validation.json", json.dumps(validation).encode())
    store.put(f"{prefix}/validation.html", validation_html.encode())
    store.put(f"{prefix}/index/keys.txt", "\n".join(keys).encode())
    store.put(f"{prefix}/index/minhash.npy", buf.getvalue())
    manifest = {
        "customer": customer,
        "version": version,
        "parent": parent,
        "created_at": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
        "run": run or {},
        "counts": {
            "read": batch.read,
            "kept": len(keys),
            "dropped": batch.dropped(),
            "pii": batch.pii,
            "train": len(train),
            "val": len(val),
        },
        "fingerprint": fingerprint,
        "train_fingerprint": hashlib.sha256("".join(r["id"] for r in train).encode()).hexdigest(),
        "val_fingerprint": hashlib.sha256("".join(r["id"] for r in val).encode()).hexdigest(),
        "val_fraction": val_fraction,
        "sources": [s.__dict__ for s in batch.sources],
        "validation_success": validation.get("success"),
    }
    store.put(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
    return Snapshot(version, store.uri(prefix), manifest)


def training_mix(
    store: Store, customer: str, new_versions: list[str], old_versions: list[str], replay_fraction: float, seed: int
) -> tuple[list[dict], list[dict], list[str]]:
    """Train rows = new versions' train splits + a replay sample of older versions' train rows.

    The replay sample is `replay_fraction` of the mix, drawn deterministically (by seed) and spread
    evenly across the older versions. Validation = every version's val split (never trained on); rows
    of older versions carry `history: true`, so a candidate can be compared with production on data
    production has also never trained on. Returns (train, val, replayed ids). Only this customer's prefix is ever read.
    """
    new = [r for v in new_versions for r in read_jsonl(store.get(f"{customer}/datasets/{v}/train.jsonl"))]
    old_by_version = [read_jsonl(store.get(f"{customer}/datasets/{v}/train.jsonl")) for v in old_versions]
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
        for r in read_jsonl(store.get(f"{customer}/datasets/{v}/val.jsonl"))
    ]
    return new + replay, val, [r["id"] for r in replay]
