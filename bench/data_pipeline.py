"""Benchmark the data stage: ingest → validate → clean/PII → dedupe → snapshot on N synthetic chat examples
with planted exact duplicates, near duplicates and PII (plus hard negatives), next to the naive baseline of
the source document (md5 of each record's JSON + three regexes) in the same run.

    .venv/bin/python bench/data_pipeline.py [--sizes 200000,1000000] [--naive]

For each size the input inbox (part files of 100k records) is generated first, in its own process; then the
pipeline runs alone in a fresh process (`ftops.data.tasks.prepare`, the chain the DAG and the CLI run), which
reports its time and peak RSS; the decisions are scored afterwards from the version it wrote. Prints one JSON
line last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "account invoice lease contract clause notice refund export dashboard report ticket plan policy "
    "schedule appointment vaccine allergy fever payment login password billing renewal deadline court "
    "filing claim evidence memo update team manager customer support clinic doctor nurse"
).split()
PII = [
    ("EMAIL", "reach me at {a}.{b}@example.com"),
    ("PHONE", "call me on +1 (415) 555-{n4}"),
    ("SSN", "my SSN is 123-45-{n4}"),
    ("CARD", "card 4111 1111 1111 1111"),
    ("IP", "from 10.0.{n1}.{n2}"),
    ("IBAN", "IBAN GB82 WEST 1234 5698 7654 32"),
    ("SECRET", "key AKIA{k16}"),
]
PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|SSN|CARD|IBAN|IP|SECRET)\]")
NEGATIVES = [
    "order ORD-{n4}-{n5} shipped",
    "hearing on 2024-0{n1d}-1{n1d}",
    "case 2:21-cv-0{n4}",
    "invoice INV-{n5}{n1d} total 1,250.00",
    "version 3.{n1}.{n2}",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def fill(t: str, rng: random.Random) -> str:
    return t.format(
        a=rng.choice(WORDS),
        b=rng.choice(WORDS),
        n4=rng.randint(1000, 9999),
        n5=rng.randint(10000, 99999),
        n1=rng.randint(1, 250),
        n2=rng.randint(1, 250),
        n1d=rng.randint(1, 9),
        k16="".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
    )


def synth(n: int, seed: int = 0):
    """Returns (jsonl bytes, labels per line): label = ('unique'|'exact'|'near', has_pii)."""
    rng = random.Random(seed)
    lines, labels, originals = [], [], []
    for i in range(n):
        kind = rng.random()
        if kind < 0.05 and originals:
            rec = dict(rng.choice(originals))
            lines.append(json.dumps(rec))
            labels.append(("exact", rec["_pii"]))
            continue
        if kind < 0.10 and originals:
            rec = json.loads(json.dumps(rng.choice(originals)))
            turns = rec["messages"]
            words = turns[1]["content"].split()
            j = rng.randrange(len(words))
            words[j] = words[j].upper() + ","  # a small edit: case and punctuation
            turns[1]["content"] = " ".join(words) + " ."
            lines.append(json.dumps(rec))
            labels.append(("near", rec["_pii"]))
            continue
        q = f"{sentence(rng, 8)} {i}?"
        a = sentence(rng, 40)
        pii = rng.random() < 0.05
        if pii:
            a += " " + fill(rng.choice(PII)[1], rng)
        elif rng.random() < 0.05:
            a += " " + fill(rng.choice(NEGATIVES), rng)
        rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "_pii": pii}
        originals.append(rec)
        lines.append(json.dumps(rec))
        labels.append(("unique", pii))
    return ("\n".join(lines) + "\n").encode(), labels


PART = 100_000  # records per generated inbox file


def generate(n: int, folder: Path) -> None:
    """The inbox for one size, written before the measured process starts: part files of PART records, and
    the labels (kind, has_pii) per global line."""
    data, labels = synth(n)
    folder.mkdir(parents=True, exist_ok=True)
    lines = data.split(b"\n")[:-1]
    for k in range(0, n, PART):
        (folder / f"part-{k // PART:04d}.jsonl").write_bytes(b"\n".join(lines[k : k + PART]) + b"\n")
    (folder.parent / f"{folder.name}.labels.json").write_text(json.dumps(labels))


def _global(source: str, line: int) -> int:
    return int(source.split("-")[1].split(".")[0]) * PART + line


def ours(folder: Path, out: Path) -> dict:
    """The package's data chain (`ftops.data.tasks.prepare`) on the inbox folder; counts only in memory."""
    from ftops.config import DataPolicy
    from ftops.data.ingest import inbox_files
    from ftops.data.tasks import prepare
    from ftops.storage import Store

    t0, c0 = time.perf_counter(), time.process_time()
    result = prepare(Store(str(out)), "bench", inbox_files(str(folder)), DataPolicy(val_fraction=0.1), spill_root=out)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "version": result["dataset_version"],
        "kept": result["kept"],
    }


def ours_flags(out: Path, version: str) -> dict:
    """What the chain decided, read back from the version it wrote: duplicates and PII placeholders per line."""
    from ftops.data.records import iter_jsonl

    base = out / "bench" / "datasets" / version
    dup, pii = {}, set()
    with open(base / "quarantine.jsonl", "rb") as f:
        for q in iter_jsonl(f):
            i = _global(q["source"], q["line"])
            if q["reason"].startswith("duplicate"):
                dup[i] = q["reason"]
            if PLACEHOLDER.search(q["raw"]):
                pii.add(i)
    for split in ("train", "val"):
        with open(base / f"{split}.jsonl", "rb") as f:
            for r in iter_jsonl(f):
                if PLACEHOLDER.search(r["messages"][-1]["content"]):
                    pii.add(_global(r["source"], r["line"]))
    return {"dup": dup, "pii": pii}


def naive(folder: Path) -> dict:
    """The source document's pipeline: md5 of the JSON per record, three PII regexes."""
    patterns = [r"\b\d{3}-\d{2}-\d{4}\b", r"\b\d{16}\b", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}\b"]
    t0, c0 = time.perf_counter(), time.process_time()
    seen, dup, pii = set(), {}, set()
    for path in sorted(folder.glob("part-*.jsonl")):
        for j, line in enumerate(path.read_text().splitlines(), start=1):
            i = _global(path.name, j)
            rec = json.loads(line)
            rec.pop("_pii", None)
            fp = hashlib.md5(json.dumps(rec, sort_keys=True).encode()).hexdigest()
            if fp in seen:
                dup[i] = "duplicate_exact"
                continue
            seen.add(fp)
            if any(re.search(p, json.dumps(rec["messages"])) for p in patterns):
                pii.add(i)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "dup": dup, "pii": pii}


def score(result: dict, labels) -> dict:
    n = len(labels)
    near = {i + 1 for i, (k, _) in enumerate(labels) if k == "near"}
    dups = {i + 1 for i, (k, _) in enumerate(labels) if k != "unique"}
    pii = {i + 1 for i, (_, p) in enumerate(labels) if p}
    flagged_near = {i for i, r in result["dup"].items() if r == "duplicate_near"}
    caught_near = {i for i in near if i in result["dup"]}
    flagged_any = set(result["dup"])
    return {
        "examples_per_s": round(n / result["seconds"]),
        "seconds": round(result["seconds"], 2),
        # the machine's CPUs are shared: examples per CPU-second of this process is the steadier figure
        "examples_per_cpu_s": round(n / result["cpu_seconds"]),
        "near_dup_recall": round(len(caught_near) / max(len(near), 1), 4),
        "near_dup_precision": round(len(flagged_near & dups) / max(len(flagged_near), 1), 4),
        "dup_precision": round(len(flagged_any & dups) / max(len(flagged_any), 1), 4),
        "pii_recall": round(len(result["pii"] & pii) / max(len(pii), 1), 4),
        "pii_precision": round(len(result["pii"] & pii) / max(len(result["pii"]), 1), 4),
    }


def one_size(folder: Path, which: str, out: Path) -> dict:
    """Runs in its own process: the pipeline alone (input already on disk), then its peak RSS."""
    result = ours(folder, out) if which == "ours" else naive(folder)
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if which == "naive":
        result |= {"dup": {str(k): v for k, v in result["dup"].items()}, "pii": sorted(result["pii"])}
    return result | {"peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200000,1000000", help="comma-separated example counts")
    ap.add_argument("--naive", action="store_true", help="also run the naive baseline (same input)")
    ap.add_argument("--generate", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("DIR", "WHICH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(int(args.generate[0]), Path(args.generate[1]))
        return
    if args.one:
        print(json.dumps(one_size(Path(args.one[0]), args.one[1], Path(args.one[2]))))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    figures: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="ftops-bench-") as tmp:
        for n in sizes:
            folder, out = Path(tmp) / f"in{n}", Path(tmp) / f"out{n}"
            subprocess.run([sys.executable, __file__, "--generate", str(n), str(folder)], check=True)
            labels = json.loads((Path(tmp) / f"in{n}.labels.json").read_text())
            for which in ("naive", "ours") if args.naive else ("ours",):
                done = subprocess.run(
                    [sys.executable, __file__, "--one", str(folder), which, str(out)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if which == "ours":
                    result |= ours_flags(out, result["version"])
                else:
                    result |= {"dup": {int(k): v for k, v in result["dup"].items()}, "pii": set(result["pii"])}
                figures[f"{which}_{n}"] = score(result, labels) | {"peak_rss_mb": result["peak_rss_mb"]}
                print(f"{which} n={n}: {figures[f'{which}_{n}']}", file=sys.stderr)
            shutil.rmtree(folder)
            shutil.rmtree(out, ignore_errors=True)
    from near_dup import evaluate as near_dup_bands  # bench/ is on sys.path: this file runs as a script

    figures |= near_dup_bands()  # planted Jaccard bands + hard negatives, ours and datasketch in one run
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
