"""The data stage's Airflow tasks (ingest → validate → clean → dedupe → snapshot, and the run's cleanup), and
`prepare`, the same chain in one call for `ftops data prepare`, the benches and the tests."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ftops.data import snapshot as snap
from ftops.run import Run
from ftops.storage import Store


def _retention_s() -> float:
    hours = float(os.environ.get("FTOPS_SCRATCH_RETENTION_HOURS", "48"))
    if hours <= 0:
        raise ValueError("FTOPS_SCRATCH_RETENTION_HOURS must be positive")
    return hours * 3600


def prepare(
    store: Store,
    customer: str,
    files: list,
    policy,
    *,
    run: dict | None = None,
    spill_root: Path | str | None = None,
    chunk_size: int = 50_000,  # each chunk costs one Great Expectations run; 50k rows stay a few hundred MB
    limits=None,
    progress=None,
    version: str | None = None,
) -> dict:
    """The data chain, once: ingest → validate → clean → dedupe → snapshot, streamed in chunks of
    `chunk_size` examples (memory stays flat at any size; the dedupe history is on disk).

    `files`: `ingest.inbox_files(uri)` or `ingest.local_files(paths)`. Returns the counts of every stage
    (`stages`) and of the version written (`dataset_version` None when no new file arrived). Raises
    `ValidationFailed` (nothing written) when the batch breaks a batch-level expectation; PII drops under
    `pii: drop` count against `max_quarantine_share` like any other quarantined record. `version` names the
    version to write (a run's, so that a retry writes the same one); default: the clock and the content."""
    from ftops.data.clean import clean as scrub
    from ftops.data.dedupe import dedupe as drop_duplicates
    from ftops.data.ingest import chunks
    from ftops.data.validate import ValidationFailed, Validator

    if spill_root is not None:
        snap.expire_spill(spill_root, _retention_s())
    history, ingested, manifests = snap.load_history(store, customer)
    writer = snap.Writer(store, customer, policy.val_fraction, spill_root)
    stages: dict[str, dict] = {k: {"examples": 0, "dropped": {}} for k in ("ingest", "validate", "clean", "dedupe")}

    def count(stage: str, batch) -> None:
        st = stages[stage]
        st["examples"] += len(batch.examples)
        for reason, n in batch.dropped().items():
            st["dropped"][reason] = st["dropped"].get(reason, 0) + n

    try:
        validator = Validator(policy)
        for batch in chunks(files, ingested, limits, chunk_size, progress):
            count("ingest", batch)
            batch = validator.rows(batch)
            count("validate", batch)
            batch = scrub(batch, policy.pii)
            count("clean", batch)
            batch, keys, sigs = drop_duplicates(batch, history)
            count("dedupe", batch)
            writer.add(batch, keys, sigs)
        for st in stages.values():
            st["dropped"] = dict(sorted(st["dropped"].items()))
        sources = writer.sources
        stages["ingest"] |= {
            "new_files": [s["name"] for s in sources if not s["skipped"]],
            "skipped_files": {s["name"]: s["skipped"] for s in sources if s["skipped"]},
        }
        validation = validator.finish(writer.read, writer.dropped, docs_dir=writer.dir / "data_docs")
        out = writer.counts() | {"dataset_version": None, "stages": stages, "validation_success": validation.success}
        if not validation.success:
            err = ValidationFailed(f"{customer}: batch rejected before training: {'; '.join(validation.failures)}")
            err.summary = out
            raise err
        if any(s["skipped"] != "already_ingested" for s in sources):
            parent = manifests[-1]["version"] if manifests else None
            s = writer.publish(
                validation.result, validation.html, parent, run, docs=validation.docs, version=version, stages=stages
            )
            out |= {"dataset_version": s.version, "dataset_uri": s.uri, "fingerprint": s.manifest["fingerprint"]}
        return out
    finally:
        writer.discard()
        history.close()


def _prepared(run: Run) -> dict:
    return json.loads(run.load("prepare.json"))


def ingest(run: Run) -> dict:
    """Run the whole data chain (`prepare`) in this task, streaming, and keep only its counts in scratch:
    no bulk data, so nothing raw (no PII) waits in the run's scratch between tasks. The later data tasks
    report their stage's counts and fail where their stage failed. A retry reuses the counts once written."""
    from ftops.data.ingest import inbox_files
    from ftops.data.validate import ValidationFailed

    run.store.put(f"{run.scratch}/started", str(time.time()).encode(), overwrite=True)
    expire_scratch(run.store, run.id, run.env.home, keep=run.key)
    if not run.store.exists(f"{run.scratch}/prepare.json"):
        if published := _published(run):  # an earlier try wrote the version, then was lost before this
            out = _from_manifest(run, published)
        else:
            try:
                out = prepare(
                    run.store,
                    run.id,
                    inbox_files(run.inbox),
                    run.customer.data,
                    run=run.lineage(),
                    spill_root=run.env.home / "work" / "spill",
                    version=run.dataset_version(),
                )
            except ValidationFailed as exc:
                out = getattr(exc, "summary", {}) | {"failed": str(exc)}
        run.save("prepare.json", json.dumps(out).encode())
    out = _prepared(run)
    st = out.get("stages", {}).get("ingest", {})
    dropped = st.get("dropped", {})
    return {
        "read": out.get("read", 0),
        "examples": st.get("examples", 0),
        "quarantined": sum(dropped.values()),
        "new_files": st.get("new_files", []),
        "skipped_files": st.get("skipped_files", {}),
    }


def validate(run: Run) -> dict:
    from ftops.data.validate import ValidationFailed

    out = _prepared(run)
    if "failed" in out:
        raise ValidationFailed(out["failed"])
    st = out["stages"]["validate"]
    return {"success": True, "examples": st["examples"], "dropped": st["dropped"]}


def clean(run: Run) -> dict:
    out = _prepared(run)
    st = out["stages"]["clean"]
    return {"examples": st["examples"], "pii": out["pii"], "dropped": st["dropped"]}


def dedupe(run: Run) -> dict:
    st = _prepared(run)["stages"]["dedupe"]
    return {"examples": st["examples"], "dropped": st["dropped"]}


def snapshot(run: Run) -> dict:
    """The dataset version the chain wrote (once per run: a retry returns the same, also after `cleanup`
    removed the scratch: the version's manifest names its run)."""
    keys = ("read", "kept", "dropped", "pii", "dataset_version", "dataset_uri", "train", "val", "fingerprint")
    try:
        out = _prepared(run)
    except FileNotFoundError:
        if not (published := _published(run)):
            raise
        out = _from_manifest(run, published)
    return {k: out[k] for k in keys if k in out}


def _published(run: Run) -> dict | None:
    """The manifest of the dataset version this run wrote, if a try of it got that far."""
    mine = [m for m in snap.versions(run.store, run.id) if m["run"].get("airflow.run_id") == run.run_id]
    return mine[-1] if mine else None


def _from_manifest(run: Run, m: dict) -> dict:
    """`prepare`'s summary of a published version, rebuilt from its manifest."""
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
