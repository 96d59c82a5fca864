"""Noisy neighbour on one shared replica: does a customer's flood hurt another customer's latency?

Real vLLM (CPU build) started by scripts/services.sh with the project's middleware (ftops.release.serving_auth),
every request with its customer's own key (`ftops.release.keys`). Customer B (the victim) sends its normal load
(closed loop, `--victim-concurrency` requests at a time, short answers) alone, then again while customer A floods
(`--flood-factor` x B's concurrency, long answers; after a 429 it waits the `retry-after`, as the `openai`
client does). vLLM runs with `--max-num-seqs 16` by default: a replica the flood alone fills (with vLLM's CPU
default of 256 nothing ever queues and scheduling order cannot matter).
Three settings, switched by rewriting the customers file the middleware re-reads (no restart; vLLM runs with
`--scheduling-policy priority` throughout, which with every priority 0 orders by arrival, i.e. FCFS):

- none:   no limits (every limit huge), fair priorities off: what a shared vLLM does by itself;
- limits: the shipped per-customer limits (ftops.config.ServingSettings defaults), fair priorities off;
- fair:   the shipped limits and fair priorities (ftops.release.serving_limits): the project's default.

Rounds interleave the settings (the order rotates); within a round a setting runs `--segments` pairs of
(B alone, B under the flood) and its `victim_p95_ratio` is the flooded p95 over the solo p95 of those pairs.
Rounds repeat until the default setting's median ratio moves by less than 10 % between two consecutive rounds
(at least --min-rounds, at most --max-rounds); every figure is the median over rounds.
Then `salt_cost`: what per-customer prefix-cache salts cost when customers share a long system prompt
(each customer's first request recomputes it instead of hitting another customer's cache).

    .venv/bin/python bench/noisy_neighbour.py [--quick] [--min-rounds 3] [--max-rounds 9]

The tiny test model (ftops.model.base_models.build_tiny): the CPU build is what is measured, not a model.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VICTIM, FLOODER = "victim-co", "flooder-co"
SALT_CUSTOMERS = [f"share-{i}" for i in range(4)]
DEFAULT = "fair"
HUGE = {"max_concurrency": 100_000, "requests_per_minute": 10**9, "tokens_per_minute": 10**12}


def write_customers(path: Path, setting: str) -> None:
    serving = HUGE if setting == "none" else {}
    doc = {
        "base_models": {"tiny": {"path": "tiny"}},
        "defaults": {"base_model": "tiny", "allow_base_model": True, "serving": serving},
        "serving": {"fair_scheduling": setting == "fair"},
        "customers": [{"id": c, "name": c} for c in (VICTIM, FLOODER, *SALT_CUSTOMERS)],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))  # JSON is YAML
    os.replace(tmp, path)


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[18] if len(xs) > 1 else (xs[0] if xs else float("nan"))


async def victim_load(http: httpx.AsyncClient, model: str, key: str, total: int, concurrency: int, tokens: int):
    latencies, failed = [], 0
    todo = list(range(total))

    async def worker():
        nonlocal failed
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": f"Ticket {i}: my export failed, what now?",
                        "max_tokens": tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failed


async def flood(http: httpx.AsyncClient, model: str, key: str, concurrency: int, tokens: int, stop: asyncio.Event):
    stats = {"served_tokens": 0, "429": 0, "other_errors": 0}

    async def worker(w: int):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await http.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": f"Batch item {w}-{i}: write a long report.",
                        "max_tokens": tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
            except httpx.HTTPError:
                stats["other_errors"] += 1
                continue
            if r.status_code == 200:
                stats["served_tokens"] += r.json()["usage"]["completion_tokens"]
            elif r.status_code == 429:
                stats["429"] += 1
                # as the official `openai` client does (its batch jobs): wait the retry-after it is given
                await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 60))
            else:
                stats["other_errors"] += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await stop.wait()
    for t in tasks:
        t.cancel()  # in-flight answers are abandoned: the client disconnects and vLLM aborts them
    await asyncio.gather(*tasks, return_exceptions=True)
    return stats


async def one_setting(url: str, model: str, keys_: dict, a) -> dict:
    """`--segments` pairs of (victim alone, victim under the flood), so both halves see the machine's load of
    the moment; the p95s are over the pooled latencies of each half."""
    solo, flooded, failed, fl_total = [], [], 0, {"served_tokens": 0, "429": 0, "other_errors": 0}
    per = max(a.victim_requests // a.segments, a.victim_concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _ in range(a.segments):
            lat, f = await victim_load(http, model, keys_[VICTIM], per, a.victim_concurrency, a.victim_tokens)
            solo += lat
            failed += f
            stop = asyncio.Event()
            flooding = asyncio.create_task(
                flood(http, model, keys_[FLOODER], a.victim_concurrency * a.flood_factor, a.flood_tokens, stop)
            )
            await asyncio.sleep(a.ramp_s)  # the flood is in full swing before the victim starts
            lat, f = await victim_load(http, model, keys_[VICTIM], per, a.victim_concurrency, a.victim_tokens)
            flooded += lat
            failed += f
            stop.set()
            for k, v in (await flooding).items():
                fl_total[k] += v
            await asyncio.sleep(1.5)  # abandoned flood answers drain from the engine
    return {
        "victim_p95_solo_s": round(p95(solo), 3),
        "victim_p95_flooded_s": round(p95(flooded), 3),
        "victim_p95_ratio": round(p95(flooded) / p95(solo), 3),
        "victim_failed": failed,
        "flooder_429": fl_total["429"],
        "flooder_served_tokens": fl_total["served_tokens"],
        "flooder_other_errors": fl_total["other_errors"],
    }


def prefix_hits(url: str, admin: dict) -> float:
    text = httpx.get(f"{url}/metrics", headers=admin, timeout=30).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("vllm:prefix_cache_hits_total"))


def salt_cost(url: str, model: str, keys_: dict, admin: dict, rounds: int) -> dict:
    """Customers sharing one long system prompt: prefix-cache hits and first-request latency with per-customer
    salts (their own keys) and without (the admin key: not salted), a new system prompt for each pass."""
    system = " ".join(f"Rule {i}: answer politely, cite the policy and never promise refunds." for i in range(10))
    out = {"salted": {"hit_tokens": [], "mean_s": []}, "shared": {"hit_tokens": [], "mean_s": []}}
    with httpx.Client(base_url=url, timeout=120) as http:
        n = len(http.post("/tokenize", json={"model": model, "prompt": system}, headers=admin).json()["tokens"])
        for r in range(rounds):
            for mode in ("salted", "shared") if r % 2 else ("shared", "salted"):
                before, times = prefix_hits(url, admin), []
                prompt = f"Policy {r}-{mode}. {system}"  # a prompt never sent before: nothing cached yet
                for i, c in enumerate(SALT_CUSTOMERS):
                    auth = {"Authorization": f"Bearer {keys_[c]}"} if mode == "salted" else admin
                    t0 = time.perf_counter()
                    http.post(
                        "/v1/completions",
                        headers=auth,
                        json={
                            "model": model,
                            "prompt": f"{prompt}\nQuestion {r}-{i}: where is my order?",
                            "max_tokens": 1,
                        },
                    ).raise_for_status()
                    times.append(time.perf_counter() - t0)
                out[mode]["hit_tokens"].append(prefix_hits(url, admin) - before)
                out[mode]["mean_s"].append(statistics.mean(times[1:]))  # the customers after the first
    figures = {"system_prompt_tokens": n, "customers": len(SALT_CUSTOMERS), "rounds": rounds}
    for mode, v in out.items():
        figures[f"{mode}_hit_tokens"] = statistics.median(v["hit_tokens"])
        figures[f"{mode}_later_customers_first_request_s"] = round(statistics.median(v["mean_s"]), 4)
    figures["salted_latency_ratio"] = round(
        figures["salted_later_customers_first_request_s"] / figures["shared_later_customers_first_request_s"], 3
    )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer, shorter requests and rounds")
    ap.add_argument("--victim-concurrency", type=int, default=2)
    ap.add_argument("--flood-factor", type=int, default=8, help="flooder concurrency = this x the victim's")
    ap.add_argument("--victim-requests", type=int, default=24)
    ap.add_argument("--victim-tokens", type=int, default=32)
    ap.add_argument("--flood-tokens", type=int, default=256)
    ap.add_argument("--ramp-s", type=float, default=2.0)
    ap.add_argument("--segments", type=int, default=3, help="alone/flooded pairs per setting and round")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=9)
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=16,
        help="vLLM's --max-num-seqs (0: vLLM's default, 256 here): 16 makes a replica the flood alone fills",
    )
    a = ap.parse_args()
    if a.quick:
        a.victim_requests, a.flood_tokens, a.min_rounds, a.max_rounds = 24, 192, 3, 6
    from ftops.model.base_models import build_tiny

    home = Path(tempfile.mkdtemp(prefix="bench-noisy-"))
    base = build_tiny(home / "models" / "tiny")
    customers = home / "customers.yaml"
    write_customers(customers, DEFAULT)
    env = dict(
        os.environ,
        FTOPS_HOME=str(home),
        FTOPS_CUSTOMERS=str(customers),
        VLLM_MODEL=str(base),
        VLLM_SCHEDULING_POLICY="priority",
    )
    if a.max_num_seqs:
        env["VLLM_MAX_NUM_SEQS"] = str(a.max_num_seqs)
    env.pop("FTOPS_SERVING_ADMIN_KEY", None)
    os.environ.update(FTOPS_HOME=str(home), FTOPS_CUSTOMERS=str(customers))
    from ftops.release import keys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["VLLM_PORT"] = str(s.getsockname()[1])
    url = f"http://127.0.0.1:{env['VLLM_PORT']}"
    services = [str(ROOT / "scripts" / "services.sh")]
    subprocess.run([*services, "start", "vllm"], env=env, check=True)
    try:
        admin = keys.auth_headers()
        model = httpx.get(f"{url}/v1/models", headers=admin, timeout=30).json()["data"][0]["id"]
        keys_ = {c: keys.create(c)[1] for c in (VICTIM, FLOODER, *SALT_CUSTOMERS)}
        settings = ["none", "limits", "fair"]
        with httpx.Client(base_url=url, timeout=300) as http:  # warm-up (the first requests are slow)
            for _ in range(6):
                http.post("/v1/completions", headers=admin, json={"model": model, "prompt": "Hi", "max_tokens": 32})
        rounds: dict[str, list[dict]] = {s: [] for s in settings}
        medians: list[float] = []
        for r in range(a.max_rounds):
            order = settings[r % 3 :] + settings[: r % 3]
            for setting in order:
                write_customers(customers, setting)
                time.sleep(6)  # the middleware re-reads the customers file within 5 s
                result = asyncio.run(one_setting(url, model, keys_, a))
                rounds[setting].append(result)
                print(r, setting, result, file=sys.stderr)
            medians.append(statistics.median(x["victim_p95_ratio"] for x in rounds[DEFAULT]))
            if r + 1 >= max(a.min_rounds, 2) and abs(medians[-1] - medians[-2]) <= 0.1 * medians[-2]:
                break
        figures: dict = {"default": DEFAULT, "rounds": len(medians), "default_ratio_median_by_round": medians}
        figures["settings"] = {
            s: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            | {"victim_p95_ratio_rounds": [x["victim_p95_ratio"] for x in rs]}
            for s, rs in rounds.items()
        }
        write_customers(customers, DEFAULT)
        time.sleep(6)
        figures["salt_cost"] = salt_cost(url, model, keys_, admin, 3 if a.quick else 6)
        print("salt", figures["salt_cost"], file=sys.stderr)
        figures["setup"] = {
            "victim_concurrency": a.victim_concurrency,
            "flooder_concurrency": a.victim_concurrency * a.flood_factor,
            "victim_tokens": a.victim_tokens,
            "flood_tokens": a.flood_tokens,
            "victim_requests": a.victim_requests,
            "segments": a.segments,
            "max_num_seqs": a.max_num_seqs or "vllm default",
        }
    finally:
        subprocess.run([*services, "stop", "vllm"], env=env)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
