"""Benchmark the customer API's upload: `client.files.create` (the official `openai` client) of a large JSONL file
through `ftops api` (started by scripts/services.sh), streamed to disk and validated at once by the ingest
chain (read, parse, Great Expectations row checks, PII), next to the baseline a user would otherwise run on the
same file: `ftops data prepare` (the whole data chain, outside Airflow), rounds interleaved, median of rounds.

Memory: the service's RSS is sampled every 20 ms while it receives and validates; `rss_peak_delta_mb` is the
peak above its RSS before the upload, for a small and a large file: flat means the two are about the same.

    .venv/bin/python bench/portal_upload.py [--mb 100] [--rounds 3] [--quick]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUSTOMER = "brightdesk"
WORDS = "account invoice export dashboard report ticket plan policy refund login billing renewal deadline".split()


def generate(path: Path, mb: float, seed: int) -> int:
    """About `mb` MB of chat records: 1 % malformed, 1 % with an email address."""
    rng, n, target = random.Random(seed), 0, int(mb * 1e6)
    with path.open("w") as f:
        while f.tell() < target:
            n += 1
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            if n % 100 == 0:
                f.write('{"messages": [{"role": "user", "content": "cut\n')
                continue
            if n % 100 == 50:
                q += f" mail me at user{n}@example.com"
            rec = {"messages": [{"role": "user", "content": f"{q} ({n})"}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(rec) + "\n")
    return n


def variant(src: Path, dst: Path, tag: str) -> Path:
    """The same records plus one line: a new content hash, so the service validates it again (an identical
    upload would be recognised and answered at once)."""
    shutil.copyfile(src, dst)
    with dst.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": tag}, {"role": "assistant", "content": tag}]}))
        f.write("\n")
    return dst


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def upload(client, path: Path, pid: int) -> tuple[float, float, dict]:
    before, peak, done = rss_mb(pid), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    start = time.perf_counter()
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    wall = time.perf_counter() - start
    done.set()
    t.join()
    return wall, max(0.0, peak[0] - before), f.validation


def prepare(path: Path, out: Path, env: dict) -> tuple[float, float]:
    start = time.perf_counter()
    p = subprocess.Popen(
        [str(ROOT / ".venv/bin/ftops"), "data", "prepare", "--customer", CUSTOMER, "--input", str(path), "--out",
         str(out), "--json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"ftops data prepare failed: {p.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--small-mb", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20 MB and 4 MB, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.small_mb, args.rounds = 20, 4, 2
    import openai

    work = Path(tempfile.mkdtemp(prefix="ftops-bench-portal-"))
    port = 20000 + os.getpid() % 10000
    env = dict(
        os.environ,
        FTOPS_HOME=str(work / "home"),
        FTOPS_CUSTOMERS=str(ROOT / "tests/data/customers.yaml"),
        FTOPS_STORAGE_ROOT=str(work / "home/storage"),
        API_PORT=str(port),
        PYTHONPATH=str(ROOT / "include") + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    )
    os.environ.update({k: env[k] for k in ("FTOPS_HOME", "FTOPS_CUSTOMERS", "FTOPS_STORAGE_ROOT")})
    sys.path.insert(0, str(ROOT / "include"))
    from ftops.release import keys

    key = keys.create(CUSTOMER, scopes=["files"])[1]
    big, small = work / "big.jsonl", work / "small.jsonl"
    records = generate(big, args.mb, 1)
    generate(small, args.small_mb, 2)
    size_mb = big.stat().st_size / 1e6
    services = [str(ROOT / "scripts/services.sh")]
    subprocess.run([*services, "start", "api"], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        pid = int((work / "home/run" / f"api-{port}.pid").read_text())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=3600)
        upload(client, variant(small, work / "warm.jsonl", "warm-up"), pid)  # imports (GX, pandas) out of the timing
        api_s, prep_s, prep_rss, deltas, small_deltas, report = [], [], [], [], [], None
        for r in range(args.rounds):
            f = variant(big, work / f"round{r}.jsonl", f"round {r}")
            wall, delta, report = upload(client, f, pid)
            api_s.append(wall)
            deltas.append(delta)
            _, sdelta, _ = upload(client, variant(small, work / f"small{r}.jsonl", f"small {r}"), pid)
            small_deltas.append(sdelta)
            wall, rss = prepare(f, work / f"prepared{r}", env)
            prep_s.append(wall)
            prep_rss.append(rss)
            for p in (f, work / f"small{r}.jsonl"):
                p.unlink()
            shutil.rmtree(work / f"prepared{r}", ignore_errors=True)
            print(
                f"round {r}: api {api_s[-1]:.1f} s (+{delta:.0f} MB), prepare {wall:.1f} s ({rss:.0f} MB)",
                file=sys.stderr,
            )
    finally:
        subprocess.run([*services, "stop", "api"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    api_med, prep_med = statistics.median(api_s), statistics.median(prep_s)
    out = {
        "bench": "portal_upload",
        "file_mb": round(size_mb, 1),
        "records": records + 1,
        "rounds": args.rounds,
        "api_upload_validate_s": round(api_med, 2),
        "api_mb_per_s": round(size_mb / api_med, 1),
        "api_rss_peak_delta_mb": round(statistics.median(deltas), 1),
        "api_rss_peak_delta_mb_small": round(statistics.median(small_deltas), 1),
        "small_file_mb": args.small_mb,
        "baseline_prepare_s": round(prep_med, 2),
        "baseline_prepare_mb_per_s": round(size_mb / prep_med, 1),
        "baseline_prepare_peak_rss_mb": round(statistics.median(prep_rss), 1),
        "api_vs_prepare_time": round(api_med / prep_med, 2),
        "validation": {k: report[k] for k in ("read", "kept", "dropped", "pii")} if report else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
