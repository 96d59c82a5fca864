"""Benchmark the data stage: ingest → validate → clean/PII → dedupe → snapshot on N synthetic chat examples
with planted exact duplicates, near duplicates and PII (plus hard negatives), next to (`--naive`) the plain
library chain a user would otherwise write (json.loads per line, Great Expectations validation, regex PII
redaction, datasketch MinHashLSH dedupe in memory: `naive`), in the same run, rounds interleaved.

    .venv/bin/python bench/data_pipeline.py [--sizes 200000,1000000] [--naive] [--against REF] [--rounds 3] [--quick]

`--against REF` also runs the chain as it was at an earlier commit (a worktree of REF, its own bench's `--one`
worker, this venv) on the same input, interleaved: `before_<n>` and `ours_over_before_<n>` (per CPU-second).

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
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from earlier import checkout  # bench/ is on sys.path: this file runs as a script

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


NAIVE_PII = [  # the regexes a user would paste: e-mail, phone, SSN, card, IPv4, AWS key
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("PHONE", re.compile(r"\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b")),
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){13,16}\b")),
    ("IP", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
    ("SECRET", re.compile(r"\bAKIA[A-Z0-9]{16}\b")),
]
_WORD = re.compile(r"\w+")


def naive(folder: Path, out: Path) -> dict:
    """What a user would otherwise write with the same libraries, everything in memory: json.loads per line,
    the batch validated with Great Expectations (the suite's three row-level expectations, failing rows
    dropped), PII redacted by regexes, exact duplicates by md5 of the normalised text, near duplicates by
    datasketch MinHash(num_perm=128) + MinHashLSH(threshold=0.8) over word 3-shingles (query, then insert),
    then a hash split written as train/val JSONL."""
    import great_expectations as gx
    import pandas as pd
    from datasketch import MinHash, MinHashLSH

    t0, c0 = time.perf_counter(), time.process_time()
    rows, ids = [], []
    for path in sorted(folder.glob("part-*.jsonl")):
        for j, line in enumerate(path.read_text().splitlines(), start=1):
            rec = json.loads(line)
            rows.append(rec["messages"])
            ids.append(_global(path.name, j))
    df = pd.DataFrame(
        {
            "roles": [",".join(m["role"] for m in msgs) for msgs in rows],
            "min_turn_chars": [min(len(m["content"]) for m in msgs) for msgs in rows],
            "n_tokens": [sum(len(m["content"].split()) for m in msgs) for msgs in rows],
        }
    )
    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_pandas("naive").add_dataframe_asset("b").add_batch_definition_whole_dataframe("w")
    suite = ctx.suites.add(gx.ExpectationSuite(name="naive"))
    for e in (
        gx.expectations.ExpectColumnValuesToMatchRegex(
            column="roles", regex="^(?:system,)?(?:user,assistant,)*user,assistant$"
        ),
        gx.expectations.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=4096),
    ):
        suite.add_expectation(e)
    res = batch.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format="COMPLETE")
    bad = {i for r in res.results for i in r.result.get("unexpected_index_list") or []}
    lsh, seen, dup, pii, kept = MinHashLSH(threshold=0.8, num_perm=128), set(), {}, set(), []
    for k, (i, msgs) in enumerate(zip(ids, rows, strict=True)):
        if k in bad:
            continue
        for m in msgs:
            for kind, rx in NAIVE_PII:
                m["content"], n = rx.subn(f"[{kind}]", m["content"])
                if n:
                    pii.add(i)
        text = "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in msgs)
        fp = hashlib.md5(text.encode()).hexdigest()
        if fp in seen:
            dup[i] = "duplicate_exact"
            continue
        seen.add(fp)
        words = _WORD.findall(text)
        mh = MinHash(num_perm=128)
        mh.update_batch([" ".join(words[w : w + 3]).encode() for w in range(max(len(words) - 2, 1))])
        if lsh.query(mh):
            dup[i] = "duplicate_near"
            continue
        lsh.insert(str(i), mh)
        kept.append(msgs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as train, open(out / "val.jsonl", "w") as val:
        for msgs in kept:
            line = json.dumps({"messages": msgs})
            (val if hashlib.sha256(line.encode()).digest()[0] < 26 else train).write(line + "\n")
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "kept": len(kept),
        "dup": dup,
        "pii": pii,
    }


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
    """Runs in its own process: the pipeline alone (input already on disk), then its peak RSS. The libraries
    both chains use are imported before the clock starts, so neither pays an import the other does not."""
    import datasketch  # noqa: F401
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401

    result = ours(folder, out) if which == "ours" else naive(folder, out)
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if which == "naive":
        result |= {"dup": {str(k): v for k, v in result["dup"].items()}, "pii": sorted(result["pii"])}
    return result | {"peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200000,1000000", help="comma-separated example counts")
    ap.add_argument("--naive", action="store_true", help="also run the baseline library chain (same input)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (median)")
    ap.add_argument("--against", metavar="REF", help="also run the chain of an earlier commit (before/after)")
    ap.add_argument("--quick", action="store_true", help="20k examples, baseline on, 3 rounds, no near-dup bands")
    ap.add_argument("--generate", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("DIR", "WHICH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(int(args.generate[0]), Path(args.generate[1]))
        return
    if args.one:
        print(json.dumps(one_size(Path(args.one[0]), args.one[1], Path(args.one[2]))))
        return
    if args.quick:
        args.sizes, args.naive = "20000", True
    sizes = [int(x) for x in args.sizes.split(",")]
    figures: dict = {"cpus": os.cpu_count(), "rounds": args.rounds}
    contenders = ["ours"] + ["naive"] * args.naive + ["before"] * bool(args.against)
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ftops-bench-"))
        commands = {w: ([sys.executable, __file__], None) for w in ("ours", "naive")}
        if args.against:
            tree, env = stack.enter_context(checkout(args.against))
            commands["before"] = ([sys.executable, str(tree / "bench" / "data_pipeline.py")], env)
            figures["against"] = args.against
        for n in sizes:
            folder = Path(tmp) / f"in{n}"
            subprocess.run([sys.executable, __file__, "--generate", str(n), str(folder)], check=True)
            labels = json.loads((Path(tmp) / f"in{n}.labels.json").read_text())
            runs: dict[str, list[dict]] = {w: [] for w in contenders}
            for r in range(args.rounds):
                # interleaved, rotating which goes first: all see the same load on a shared machine
                for which in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
                    out = Path(tmp) / f"out{n}-{which}-{r}"
                    cmd, env = commands[which]
                    done = subprocess.run(
                        [*cmd, "--one", str(folder), "naive" if which == "naive" else "ours", str(out)],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if done.returncode:
                        raise SystemExit(f"{which} n={n} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    if which != "naive":
                        result |= ours_flags(out, result["version"])
                    else:
                        result |= {"dup": {int(k): v for k, v in result["dup"].items()}, "pii": set(result["pii"])}
                    runs[which].append(score(result, labels) | {"peak_rss_mb": result["peak_rss_mb"]})
                    print(f"round {r} {which} n={n}: {runs[which][-1]}", file=sys.stderr)
                    shutil.rmtree(out, ignore_errors=True)
            for which, rs in runs.items():
                if rs:  # decisions are the same every round; times and memory are the medians
                    med = {k: statistics.median(x[k] for x in rs) for k in ("seconds", "peak_rss_mb")}
                    figures[f"{which}_{n}"] = rs[-1] | {
                        "seconds": round(med["seconds"], 2),
                        "examples_per_s": round(n / med["seconds"]),
                        "examples_per_cpu_s": round(statistics.median(x["examples_per_cpu_s"] for x in rs)),
                        "peak_rss_mb": med["peak_rss_mb"],
                        "seconds_each": [x["seconds"] for x in rs],
                    }
            if args.naive:
                figures[f"speedup_vs_naive_{n}"] = round(
                    figures[f"naive_{n}"]["seconds"] / figures[f"ours_{n}"]["seconds"], 2
                )
            if args.against:
                figures[f"ours_over_before_{n}"] = round(
                    figures[f"ours_{n}"]["examples_per_cpu_s"] / figures[f"before_{n}"]["examples_per_cpu_s"], 3
                )
            shutil.rmtree(folder)
    from near_dup import evaluate as near_dup_bands  # bench/ is on sys.path: this file runs as a script

    if not args.quick:
        figures |= near_dup_bands()  # planted Jaccard bands + hard negatives, ours and datasketch in one run
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
