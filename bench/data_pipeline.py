"""Benchmark the data stage: ingest → validate → clean/PII → dedupe → snapshot on N synthetic chat examples
with planted exact duplicates, near duplicates and PII (plus hard negatives), next to the naive baseline of
the source document (md5 of each record's JSON + three regexes) in the same run.

    .venv/bin/python bench/data_pipeline.py --n 200000

Each size runs in its own subprocess so peak memory (max RSS) is per size. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

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


def ours(data: bytes, labels) -> dict:
    from ftops import snapshot as snap
    from ftops.clean import clean
    from ftops.config import DataPolicy
    from ftops.dedupe import History, dedupe
    from ftops.ingest import Batch, parse_file
    from ftops.storage import Store
    from ftops.validate import validate

    t0 = time.perf_counter()
    batch = Batch()
    parse_file("bench.jsonl", data, batch)
    batch, validation = validate(batch, DataPolicy())
    batch = clean(batch, "redact")
    flagged_pii = {ex.line for ex in batch.examples if PLACEHOLDER.search(ex.messages[-1]["content"])}
    batch, keys, sigs = dedupe(batch, History())
    with tempfile.TemporaryDirectory() as root:
        snap.write(Store(root), "bench", batch, keys, sigs, validation.result, validation.html, None, 0.1)
    seconds = time.perf_counter() - t0
    dup = {q.line: q.reason for q in batch.quarantine if q.reason.startswith("duplicate")}
    return {"seconds": seconds, "dup": dup, "pii": flagged_pii, "kept": len(keys)}


def naive(data: bytes, labels) -> dict:
    """The source document's pipeline: md5 of the JSON per record, three PII regexes."""
    patterns = [r"\b\d{3}-\d{2}-\d{4}\b", r"\b\d{16}\b", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}\b"]
    t0 = time.perf_counter()
    seen, dup, pii = set(), {}, set()
    for i, line in enumerate(data.decode().splitlines(), start=1):
        rec = json.loads(line)
        rec.pop("_pii", None)
        fp = hashlib.md5(json.dumps(rec, sort_keys=True).encode()).hexdigest()
        if fp in seen:
            dup[i] = "duplicate_exact"
            continue
        seen.add(fp)
        if any(re.search(p, json.dumps(rec["messages"])) for p in patterns):
            pii.add(i)
    return {"seconds": time.perf_counter() - t0, "dup": dup, "pii": pii}


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
        "near_dup_recall": round(len(caught_near) / max(len(near), 1), 4),
        "near_dup_precision": round(len(flagged_near & dups) / max(len(flagged_near), 1), 4),
        "dup_precision": round(len(flagged_any & dups) / max(len(flagged_any), 1), 4),
        "pii_recall": round(len(result["pii"] & pii) / max(len(pii), 1), 4),
        "pii_precision": round(len(result["pii"] & pii) / max(len(result["pii"]), 1), 4),
    }


def one_size(n: int, which: str) -> dict:
    data, labels = synth(n)
    result = (ours if which == "ours" else naive)(data, labels)
    out = score(result, labels) | {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--one", nargs=2, metavar=("N", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(int(args.one[0]), args.one[1])))
        return
    figures: dict = {"n": args.n}
    for n in (args.n // 4, args.n):
        for which in ("naive", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), which], capture_output=True, text=True, check=True
            )
            figures[f"{which}_{n}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{which} n={n}: {figures[f'{which}_{n}']}", file=sys.stderr)
    small, big = figures[f"ours_{args.n // 4}"], figures[f"ours_{args.n}"]
    figures["memory_growth_per_example_kb"] = round(
        (big["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / (args.n - args.n // 4), 3
    )
    figures["speed_ratio_ours_vs_naive"] = round(
        big["examples_per_s"] / figures[f"naive_{args.n}"]["examples_per_s"], 3
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
