"""Benchmark one poll of the data-volume trigger (`ftops.data.ingest.InboxCounter`), the work the triggerer
repeats for every customer every `trigger_poll_seconds`.

A customer gets `--versions` complete dataset versions (manifests only) and `--files` inbox uploads of
`--records` chat records each; the first half of the files were ingested by those versions. Then, for ours
and for the baseline (the first version of the counter: read every inbox file and every manifest on every
poll), in the same run: the first poll, a steady poll with nothing new, and a poll after one new upload,
each with the objects read, the bytes read and the wall time. `--s3` runs it against a real S3 server
(SeaweedFS, started by scripts/services.sh on free ports), where each read is a request.

    .venv/bin/python bench/inbox_poll.py [--versions 50] [--files 200] [--records 200] [--s3]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUSTOMER = "acme"


def record(i: int, j: int) -> bytes:
    msg = [{"role": "user", "content": f"Upload {i}, question {j}: how do I reset my password?"}]
    msg.append({"role": "assistant", "content": f"Open Settings, then Security (ticket {i}-{j})."})
    return json.dumps({"messages": msg}).encode() + b"\n"


def populate(root: str, versions: int, files: int, records: int) -> None:
    from ftops.storage import Store

    store = Store(root)
    digests = []
    for i in range(files):
        data = b"".join(record(i, j) for j in range(records))
        store.put(f"{CUSTOMER}/inbox/upload-{i:04d}.jsonl", data)
        digests.append(hashlib.sha256(data).hexdigest())
    ingested = digests[: files // 2]
    for v in range(versions):  # the ingested files spread over the versions, as weekly runs would
        sources = [
            {"path": f"upload-{k}", "sha256": d, "records": records, "skipped": ""}
            for k, d in enumerate(ingested)
            if k % versions == v
        ]
        manifest = {"version": f"2026{v:04d}", "sources": sources, "counts": {"kept": records}}
        store.put(f"{CUSTOMER}/datasets/2026{v:04d}/manifest.json", json.dumps(manifest).encode())
        for name in ("train.jsonl", "val.jsonl", "quarantine.jsonl", "index/keys.txt", "index/minhash.npy"):
            store.put(f"{CUSTOMER}/datasets/2026{v:04d}/{name}", b"x")  # listed, never read by a poll


class Naive:
    """The first version of the counter: every poll reads every inbox file and every manifest."""

    def __init__(self, root: str):
        from ftops.storage import Store

        self.store, self.inbox = Store(root), Store(f"{root}/{CUSTOMER}/inbox")

    def pending(self) -> tuple[int, set[str]]:
        import gzip
        import io

        from ftops.data.ingest import split_lines
        from ftops.data.snapshot import ingested_files

        done = ingested_files(self.store, CUSTOMER)
        count, files = 0, set()
        for key in self.inbox.list(""):
            data = self.inbox.get(key)
            digest = hashlib.sha256(data).hexdigest()
            if digest not in done and digest not in files:
                raw = gzip.decompress(data) if key.endswith(".gz") else data
                count += sum(1 for _, line, _, _ in split_lines(io.BytesIO(raw)) if line.strip())
                files.add(digest)
        return count, files


@contextmanager
def counting():
    """Count `Store.get` calls and bytes for the duration (both counters use it for every read)."""
    from ftops.storage import Store

    seen = {"objects_read": 0, "bytes_read": 0}
    real = Store.get

    def get(self, key):
        data = real(self, key)
        seen["objects_read"] += 1
        seen["bytes_read"] += len(data)
        return data

    Store.get = get
    try:
        yield seen
    finally:
        Store.get = real


def poll(counter) -> dict:
    with counting() as seen:
        t0 = time.perf_counter()
        pending, files = counter.pending()
        seen["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return {"pending": pending, "files": len(files), **seen}


def measure(root: str, new_upload: int, records: int) -> dict:
    import ftops.data.snapshot  # noqa: F401  (imported before the clock: both counters use it)
    from ftops.data.ingest import InboxCounter
    from ftops.storage import Store

    ours, naive = InboxCounter(root, CUSTOMER), Naive(root)
    out = {name: {"first": poll(c), "steady": poll(c)} for name, c in (("ours", ours), ("naive", naive))}
    data = b"".join(record(new_upload, j) for j in range(records))
    Store(root).put(f"{CUSTOMER}/inbox/upload-{new_upload:04d}.jsonl", data)
    for name, c in (("ours", ours), ("naive", naive)):
        out[name]["after_one_upload"] = poll(c)
    for phase in ("first", "steady", "after_one_upload"):  # both must agree on what is pending
        assert out["ours"][phase]["pending"] == out["naive"][phase]["pending"], (phase, out)
    return out


def free_s3_port() -> int:
    """SeaweedFS takes S3_PORT..S3_PORT+5 and the same +10000 for gRPC."""
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    return next(p for p in range(23000, 30000, 10) if all(free(p + i) and free(p + i + 10000) for i in range(6)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=50)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--s3", action="store_true", help="against SeaweedFS instead of a local folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="inbox-poll-") as tmp:
        root, services = f"{tmp}/storage", str(ROOT / "scripts" / "services.sh")
        port = free_s3_port() if args.s3 else 0
        env = {**os.environ, "FTOPS_HOME": tmp, "S3_PORT": str(port), "S3_BUCKETS": "ftops"}
        env |= {
            "AWS_ACCESS_KEY_ID": "ftops",
            "AWS_SECRET_ACCESS_KEY": "ftops-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if args.s3:
            subprocess.run([services, "start", "s3"], env=env, check=True, capture_output=True)
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
            root = f"s3://ftops/bench-{os.getpid()}"
        try:
            populate(root, args.versions, args.files, args.records)
            result = measure(root, args.files, args.records)
        finally:
            if args.s3:
                subprocess.run([services, "stop", "s3"], env=env, check=False, capture_output=True)
    steady = {k: result[k]["steady"] for k in ("ours", "naive")}
    print(
        json.dumps(
            {
                "bench": "inbox_poll",
                "storage": "s3 (SeaweedFS)" if args.s3 else "local folder",
                "versions": args.versions,
                "inbox_files": args.files,
                "records_per_file": args.records,
                **result,
                "steady_speedup": round(steady["naive"]["ms"] / max(steady["ours"]["ms"], 0.1), 1),
                "steady_objects_read": {k: v["objects_read"] for k, v in steady.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
