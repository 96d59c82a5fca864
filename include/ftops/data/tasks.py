"""The data stage, one step per Airflow task: ingest → validate → clean → dedupe → snapshot, and the run's cleanup.

Each step reads the previous step's chunks from the run's scratch in object storage (`<scratch>/data/<step>/`),
does its own work chunk by chunk (memory stays flat at any size; the dedupe history is on disk), writes its own
chunks, and last its summary `<step>.json`: a retried step whose summary exists returns it, one without removes
its partial chunks and redoes only its own work, never the steps before it. `ingest` starts the chain over (a
cleared ingest invalidates what came after it).

Raw customer text waits between steps only until `clean` has redacted it: ingest's and validate's chunks are
encrypted (AES-256-GCM, the chunk's storage key as associated data) with a key `ingest` makes for the run and
hands on in its result (the DAG keeps it in an XCom of its own, never in a task log), never written to object
storage; clean's and dedupe's chunks hold redacted text. `prepare` is the same steps in the same order in one
call, for `ftops data prepare`, the benches and the tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftops.config import DataPolicy
from ftops.data import snapshot as snap
from ftops.data.records import Batch
from ftops.run import Run
from ftops.storage import Store

STEPS = ("ingest", "validate", "clean", "dedupe", "snapshot")


def _retention_s() -> float:
    hours = float(os.environ.get("FTOPS_SCRATCH_RETENTION_HOURS", "48"))
    if hours <= 0:
        raise ValueError("FTOPS_SCRATCH_RETENTION_HOURS must be positive")
    return hours * 3600


@dataclass
class Chain:
    """One pass of the data chain: what it reads, where its steps hand chunks to each other, what it publishes."""

    store: Store
    customer: str
    scratch: str  # prefix of the steps' chunks and summaries
    policy: DataPolicy
    files: Callable[[], list]  # the files to ingest, listed when ingest runs: `inbox_files` or `local_files`
    lineage: dict = field(default_factory=dict)
    spill_root: Path | str | None = None
    version: Callable[[], str | None] = lambda: None  # the version's name (a run's own); None: clock + content
    limits: object | None = None
    chunk_size: int = 50_000  # each chunk costs one Great Expectations run; 50k rows stay a few hundred MB
    progress: Callable | None = None

    def key(self, step: str, name: str) -> str:
        return f"{self.scratch}/{step}/{name}"

    def summary(self, step: str) -> dict | None:
        try:
            return json.loads(self.store.get(f"{self.scratch}/{step}.json"))
        except FileNotFoundError:
            return None

    def finish(self, step: str, summary: dict) -> dict:
        self.store.put(f"{self.scratch}/{step}.json", json.dumps(summary).encode(), overwrite=True)
        return summary

    def reset(self, step: str) -> None:
        self.store.delete_prefix(f"{self.scratch}/{step}/")

    def put_chunk(self, step: str, i: int, batch: Batch, secret: bytes | None = None) -> None:
        key = self.key(step, f"{i:06d}.chunk")
        self.store.put(key, _seal(batch.to_bytes(), secret, key), overwrite=True)

    def get_chunk(self, step: str, i: int, secret: bytes | None = None) -> Batch:
        key = self.key(step, f"{i:06d}.chunk")
        return Batch.from_bytes(_open(self.store.get(key), secret, key))


def _seal(data: bytes, secret: bytes | None, where: str) -> bytes:
    if secret is None:
        return data
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce + AESGCM(secret).encrypt(nonce, data, where.encode())


def _open(data: bytes, secret: bytes | None, where: str) -> bytes:
    if secret is None:
        return data
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(secret).decrypt(data[:12], data[12:], where.encode())


def _secret(scratch_key: str) -> bytes:
    return base64.b64decode(scratch_key)


def _counts(batches_dropped: dict[str, int], batch: Batch) -> None:
    for reason, n in batch.dropped().items():
        batches_dropped[reason] = batches_dropped.get(reason, 0) + n


# --- the steps ------------------------------------------------------------------------------------------


def ingest_step(chain: Chain) -> dict:
    """Read every new file into canonical records, in chunks; refused files and unreadable lines are quarantined
    with their reason. Files already ingested by an earlier version (by content hash) are skipped."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ftops.data.ingest import chunks

    chain.store.delete_prefix(f"{chain.scratch}/")  # the chain starts over: later steps' outputs are stale
    secret = AESGCM.generate_key(bit_length=256)
    read, examples, dropped, sources, n = 0, 0, {}, [], 0
    ingested = snap.ingested_files(chain.store, chain.customer)
    for n, batch in enumerate(chunks(chain.files(), ingested, chain.limits, chain.chunk_size, chain.progress)):  # noqa: B007
        chain.put_chunk("ingest", n, batch, secret)
        read += batch.read
        examples += len(batch.examples)
        _counts(dropped, batch)
        sources += batch.sources
    summary = {
        "read": read,
        "examples": examples,
        "quarantined": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "new_files": [s.name for s in sources if not s.skipped],
        "skipped_files": {s.name: s.skipped for s in sources if s.skipped},
        "published": any(s.skipped != "already_ingested" for s in sources),  # anything to make a version of
        "chunks": n + 1,
    }
    return chain.finish("ingest", summary) | {"scratch_key": base64.b64encode(secret).decode()}


def validate_step(chain: Chain, scratch_key: str) -> dict:
    """The Great Expectations suite: row-level expectations quarantine rows chunk by chunk, then the batch as a
    whole is checked (share of quarantined records); a rejected batch raises `ValidationFailed` and nothing
    goes further. The result and Great Expectations' Data Docs wait in scratch for the snapshot."""
    from ftops.data.validate import ValidationFailed, Validator

    if done := chain.summary("validate"):
        return done
    chain.reset("validate")
    secret, n = _secret(scratch_key), chain.summary("ingest")["chunks"]
    validator = Validator(chain.policy)
    read, examples, dropped = 0, 0, {}
    for i in range(n):
        batch = validator.rows(chain.get_chunk("ingest", i, secret))
        chain.put_chunk("validate", i, batch, secret)
        read += batch.read
        examples += len(batch.examples)
        _counts(dropped, batch)
    with tempfile.TemporaryDirectory(prefix="ftops-gx-", dir=_spill(chain)) as tmp:
        validation = validator.finish(read, dropped, docs_dir=Path(tmp) / "data_docs")
        if not validation.success:
            raise ValidationFailed(
                f"{chain.customer}: batch rejected before training: {'; '.join(validation.failures)}"
            )
        chain.store.put(chain.key("validate", "validation.json"), json.dumps(validation.result).encode(), True)
        chain.store.put(chain.key("validate", "validation.html"), validation.html.encode(), True)
        if validation.docs is not None and validation.docs.is_dir():
            chain.store.upload_dir(validation.docs, chain.key("validate", "data_docs"))
    summary = {"success": True, "examples": examples, "dropped": dict(sorted(dropped.items()))}
    return chain.finish("validate", summary)


def clean_step(chain: Chain, scratch_key: str) -> dict:
    """Normalise every turn and apply the customer's PII policy (redact with a typed placeholder, or drop)."""
    from ftops.data.clean import clean

    if done := chain.summary("clean"):
        return done
    chain.reset("clean")
    secret, n = _secret(scratch_key), chain.summary("ingest")["chunks"]
    examples, dropped, pii = 0, {}, {}
    for i in range(n):
        batch = clean(chain.get_chunk("validate", i, secret), chain.policy.pii)
        chain.put_chunk("clean", i, batch)  # redacted from here on: stored as it is
        examples += len(batch.examples)
        _counts(dropped, batch)
        for k, v in batch.pii.items():
            pii[k] = pii.get(k, 0) + v
    return chain.finish("clean", {"examples": examples, "pii": pii, "dropped": dict(sorted(dropped.items()))})


def dedupe_step(chain: Chain) -> dict:
    """Drop exact and near duplicates of the customer's whole history and of each other (MinHash LSH)."""
    from ftops.data.dedupe import dedupe

    if done := chain.summary("dedupe"):
        return done
    chain.reset("dedupe")
    history, _, _ = snap.load_history(chain.store, chain.customer)
    examples, dropped = 0, {}
    try:
        for i in range(chain.summary("ingest")["chunks"]):
            batch, keys, sigs = dedupe(chain.get_chunk("clean", i), history)
            chain.put_chunk("dedupe", i, batch)
            chain.store.put(chain.key("dedupe", f"{i:06d}.keys"), "\n".join(keys).encode(), True)
            chain.store.put(chain.key("dedupe", f"{i:06d}.sigs"), np.ascontiguousarray(sigs).tobytes(), True)
            examples += len(batch.examples)
            _counts(dropped, batch)
    finally:
        history.close()
    return chain.finish("dedupe", {"examples": examples, "dropped": dict(sorted(dropped.items()))})


def snapshot_step(chain: Chain) -> dict:
    """Publish the run's immutable dataset version (train/val split by content hash, quarantine, validation
    result and Data Docs, dedupe index, manifest last); no version when no new file arrived."""
    from ftops.data.dedupe import NUM_PERM

    if done := chain.summary("snapshot"):
        return done
    ingested = chain.summary("ingest")
    stages = {s: chain.summary(s) for s in ("ingest", "validate", "clean", "dedupe")}
    writer = snap.Writer(chain.store, chain.customer, chain.policy.val_fraction, _spill(chain))
    try:
        for i in range(ingested["chunks"]):
            keys = chain.store.get(chain.key("dedupe", f"{i:06d}.keys")).decode().split()
            sigs = np.frombuffer(chain.store.get(chain.key("dedupe", f"{i:06d}.sigs")), dtype=np.uint64)
            writer.add(chain.get_chunk("dedupe", i), keys, sigs.reshape(-1, NUM_PERM))
        out = writer.counts() | {"dataset_version": None, "stages": stages, "validation_success": True}
        if ingested["published"]:
            docs = writer.dir / "data_docs"
            if chain.store.list(chain.key("validate", "data_docs")):
                chain.store.download_dir(chain.key("validate", "data_docs"), docs)
            manifests = snap.versions(chain.store, chain.customer)
            s = writer.publish(
                json.loads(chain.store.get(chain.key("validate", "validation.json"))),
                chain.store.get(chain.key("validate", "validation.html")).decode(),
                manifests[-1]["version"] if manifests else None,
                chain.lineage,
                docs=docs,
                version=chain.version(),
                stages=stages,
            )
            out |= {"dataset_version": s.version, "dataset_uri": s.uri, "fingerprint": s.manifest["fingerprint"]}
    finally:
        writer.discard()
    return chain.finish("snapshot", out)


def _spill(chain: Chain) -> Path | None:
    if chain.spill_root is None:
        return None
    Path(chain.spill_root).mkdir(parents=True, exist_ok=True)
    return Path(chain.spill_root)


def prepare(
    store: Store,
    customer: str,
    files: list,
    policy: DataPolicy,
    *,
    run: dict | None = None,
    spill_root: Path | str | None = None,
    chunk_size: int = 50_000,
    limits=None,
    progress=None,
    version: str | None = None,
) -> dict:
    """The data chain in one call: the five steps the DAG's tasks run, in the same order, on a scratch of their
    own (removed after). `files`: `ingest.inbox_files(uri)` or `ingest.local_files(paths)`. Returns the counts
    of the version written (`dataset_version` None when no new file arrived) and of every step (`stages`).
    Raises `ValidationFailed` (nothing written) when the batch breaks a batch-level expectation; PII drops
    under `pii: drop` count against `max_quarantine_share` like any other quarantined record."""
    import uuid

    if spill_root is not None:
        snap.expire_spill(spill_root, _retention_s())
    chain = Chain(
        store,
        customer,
        f"{customer}/runs/prepare-{uuid.uuid4().hex[:12]}/data",
        policy,
        lambda: files,
        run or {},
        spill_root,
        lambda: version,
        limits,
        chunk_size,
        progress,
    )
    try:
        key = ingest_step(chain)["scratch_key"]
        validate_step(chain, key)
        clean_step(chain, key)
        dedupe_step(chain)
        return snapshot_step(chain)
    finally:
        store.delete_prefix(chain.scratch.removesuffix("/data") + "/")


# --- the DAG's tasks ------------------------------------------------------------------------------------


def chain(run: Run) -> Chain:
    """The data chain of a DAG run: the customer's inbox, the run's scratch, its dataset version's name."""
    from ftops.data.ingest import inbox_files

    return Chain(
        run.store,
        run.id,
        f"{run.scratch}/data",
        run.customer.data,
        lambda: inbox_files(run.inbox),
        run.lineage(),
        run.env.home / "work" / "spill",
        run.dataset_version,
    )


def _adopted(run: Run) -> dict | None:
    """What a lost try of this run already published: the steps return it instead of redoing the chain."""
    try:
        return json.loads(run.load("data/adopted.json"))
    except FileNotFoundError:
        return None


def ingest(run: Run) -> dict:
    """Read the customer's inbox into canonical records (the run's scratch, encrypted); the run's scratch is
    marked started (and other runs' expired scratch removed). A run whose version a lost try already
    published adopts it: every data step then returns that version."""
    run.store.put(f"{run.scratch}/started", str(time.time()).encode(), overwrite=True)
    expire_scratch(run.store, run.id, run.env.home, keep=run.key)
    if published := _published(run):
        out = _from_manifest(run, published)
        run.save("data/adopted.json", json.dumps(out).encode())
        st = out.get("stages", {}).get("ingest", {})
        return {k: st.get(k) for k in ("read", "examples", "quarantined", "new_files", "skipped_files")} | {
            "adopted": out["dataset_version"]
        }
    out = ingest_step(chain(run))
    return {k: v for k, v in out.items() if k not in ("published",)}


def validate(run: Run, scratch_key: str) -> dict:
    """`scratch_key`: ingest's `scratch_key`, the key to its chunks (and to this step's)."""
    if adopted := _adopted(run):
        return {"success": True} | adopted["stages"].get("validate", {})
    return validate_step(chain(run), scratch_key)


def clean(run: Run, scratch_key: str) -> dict:
    if adopted := _adopted(run):
        return {"pii": adopted.get("pii", {})} | adopted["stages"].get("clean", {})
    return clean_step(chain(run), scratch_key)


def dedupe(run: Run) -> dict:
    if adopted := _adopted(run):
        return adopted["stages"].get("dedupe", {})
    return dedupe_step(chain(run))


def snapshot(run: Run) -> dict:
    """The dataset version the run published (once per run: a retry returns the same, also after `cleanup`
    removed the scratch: the version's manifest names its run)."""
    keys = ("read", "kept", "dropped", "pii", "dataset_version", "dataset_uri", "train", "val", "fingerprint")
    try:
        out = _adopted(run) or (run.store.exists(f"{run.scratch}/data/ingest.json") and snapshot_step(chain(run)))
    except FileExistsError:  # a lost try published the version, then died before its summary: adopt it
        out = None
    if not out:
        if not (published := _published(run)):
            raise FileNotFoundError(f"{run.id}: run {run.run_id} has no data chain in scratch and no dataset version")
        out = _from_manifest(run, published)
    return {k: out[k] for k in keys if k in out}


def _published(run: Run) -> dict | None:
    """The manifest of the dataset version this run wrote, if a try of it got that far."""
    mine = [m for m in snap.versions(run.store, run.id) if m["run"].get("airflow.run_id") == run.run_id]
    return mine[-1] if mine else None


def _from_manifest(run: Run, m: dict) -> dict:
    """A published version's summary, rebuilt from its manifest."""
    return m["counts"] | {
        "stages": m.get("stages", {}),
        "validation_success": m.get("validation_success"),
        "dataset_version": m["version"],
        "dataset_uri": run.store.uri(f"{run.id}/datasets/{m['version']}"),
        "fingerprint": m["fingerprint"],
    }


def cleanup(run: Run) -> dict:
    """Remove the run's scratch (object storage) and work folder. Wire it as the DAG's last task with
    `trigger_rule="all_done"` so it runs after success and failure alike; `expire_scratch` catches what a
    killed run leaves."""
    removed = run.store.delete_prefix(run.scratch)
    shutil.rmtree(run.workdir, ignore_errors=True)
    return {"removed_objects": removed}


def expire_scratch(
    store: Store, customer: str, home: Path, keep: str = "", max_age_s: float | None = None
) -> list[str]:
    """Remove the scratch of this customer's runs started more than the retention ago
    (`FTOPS_SCRATCH_RETENTION_HOURS`, default 48: longer than any run), and their work folders."""
    max_age_s = _retention_s() if max_age_s is None else max_age_s
    expired = []
    for key in store.children(f"{customer}/runs"):
        if key == keep:
            continue
        marker = f"{customer}/runs/{key}/started"
        try:
            started = float(store.get(marker))
        except (FileNotFoundError, ValueError):
            # a run from before the marker (or not started through `ingest`): its age counts from now
            store.put(marker, str(time.time()).encode(), overwrite=True)
            continue
        if time.time() - started > max_age_s:
            store.delete_prefix(f"{customer}/runs/{key}")
            shutil.rmtree(home / "work" / customer / key, ignore_errors=True)
            expired.append(key)
    snap.expire_spill(home / "work" / "spill", max_age_s)
    return expired
