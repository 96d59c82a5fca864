"""Benchmark multi-LoRA serving on the local vLLM (CPU build, tiny model): throughput and p50/p95 latency
with requests spread over 1, 10 and 50 adapters (shaped like customers': every projection, the default rank),
next to the base model alone (the baseline) in the same run, median of `--repeats` interleaved runs, and the
share of failed requests while 10 adapters are swapped (`load_inplace`) under load.
Tenant isolation's cost in the same run: a second vLLM with the key-checking middleware (ftops.release.serving_auth,
every request with its customer's own key) against the first one without it (VLLM_MIDDLEWARE=none), on the
same 10 adapters, in short paired rounds (alternating which goes first) so both see the same machine load,
the other server frozen (SIGSTOP) while one is measured; `keys_throughput_ratio` is the median over pairs of
requests/s with keys / without, `keys_api_cpu_ratio` the same for the CPU time of vLLM's API-server process per
request (where the middleware runs). `middleware_cost` is the middleware's own time per request, measured
in-process around a stand-in app (no engine, no noise from it).
`--explore` then restarts vLLM under other LoRA settings (--max-loras, --max-cpu-loras, client concurrency)
and measures 50 adapters against the base model on each, rounds interleaved.

    .venv/bin/python bench/serving.py [--requests 160] [--concurrency 8] [--key-rounds 12] [--explore]

Starts its vLLM servers through scripts/services.sh (free ports, temporary FTOPS_HOME) and stops them. The
adapters carry random LoRA weights (serving cost does not depend on what they learned). Prints one JSON
line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def make_adapters(base: Path, out: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftops.config import LoraSettings

    # Shaped like a customer's adapter by default: every projection, the default rank.
    lora = LoraSettings()
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # PEFT initialises B to zero, which would make every adapter the base
        model.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


async def load(url: str, models: list[str], total: int, concurrency: int, keys: dict[str, str] | None = None) -> dict:
    """`total` completions spread over `models`; with `keys`, each request carries its model's customer key."""
    latencies, failures, tokens = [], 0, 0
    queue = list(range(total))

    async def worker(http: httpx.AsyncClient):
        nonlocal failures, tokens
        while queue:
            i = queue.pop()
            model = models[i % len(models)]
            headers = {"Authorization": f"Bearer {keys[model]}"} if keys else None
            t0 = time.perf_counter()
            r = await http.post(
                f"{url}/v1/completions",
                json={
                    "model": model,
                    "prompt": f"Ticket {i}: how do I fix a failed export?",
                    "max_tokens": 16,
                    "temperature": 0,
                    # Exactly 16 tokens each: random adapters stop at different points, which would make
                    # requests/s compare answer lengths rather than serving cost.
                    "ignore_eos": True,
                },
                headers=headers,
            )
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failures += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [0] * 19
    return {
        "requests": total,
        "failed": failures,
        "req_per_s": round(len(latencies) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(q[18], 3),
    }


async def swap_under_load(url: str, names: list[str], alt: dict[str, list[Path]], total: int, concurrency: int) -> dict:
    swaps = 0

    async def swapper(stop: asyncio.Event):
        nonlocal swaps
        async with httpx.AsyncClient(timeout=120) as http:
            while not stop.is_set():
                for name in names:
                    path = alt[name][swaps % 2]
                    r = await http.post(
                        f"{url}/v1/load_lora_adapter",
                        json={"lora_name": name, "lora_path": str(path), "load_inplace": True},
                    )
                    r.raise_for_status()
                    swaps += 1

    stop = asyncio.Event()
    task = asyncio.create_task(swapper(stop))
    result = await load(url, names, total, concurrency)
    stop.set()
    await task
    return result | {"swaps": swaps, "failed_share": round(result["failed"] / total, 4)}


def customers_file(home: Path, names: list[str]) -> Path:
    """A customers file naming the bench's adapters, so the middleware admits their keys. Limits are on (the
    middleware counts every request) but set where they never bind: this bench measures the cost of checking,
    bench/noisy_neighbour.py what the limits do."""
    unbound = {"max_concurrency": 10_000, "requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000}
    doc = {
        "base_models": {"tiny": {"path": "tiny"}},
        "defaults": {"serving": unbound},
        "customers": [{"id": n, "name": n, "base_model": "tiny"} for n in names],
    }
    path = home / "customers.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


class Server:
    """One vLLM started with scripts/services.sh on a free port (stopped by `stop`)."""

    def __init__(self, env: dict, **extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.env = dict(env, VLLM_PORT=str(port), **extra)
        self.url = f"http://127.0.0.1:{port}"
        subprocess.run([str(ROOT / "scripts" / "services.sh"), "start", "vllm"], env=self.env, check=True)

    def stop(self) -> None:
        self.resume()
        subprocess.run([str(ROOT / "scripts" / "services.sh"), "stop", "vllm"], env=self.env)

    def _signal(self, sig: int) -> None:
        pid = Path(self.env["FTOPS_HOME"], "run", f"vllm-{self.env['VLLM_PORT']}.pid")
        if pid.exists():
            os.killpg(int(pid.read_text()), sig)  # started with setsid: the API server and its engine process

    def api_cpu_s(self) -> float:
        """CPU seconds used so far by the API server process (where the middleware runs; the engine core is
        a child process of its own)."""
        pid = Path(self.env["FTOPS_HOME"], "run", f"vllm-{self.env['VLLM_PORT']}.pid").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pause(self) -> None:
        """Freeze the whole server: an idle vLLM still takes CPU (its engine loop), which on 2 cores skews
        whichever server is being measured."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def setup(self, adapters: list[Path], admin: dict) -> str:
        http = httpx.Client(base_url=self.url, timeout=120, headers=admin)
        base_name = next(m["id"] for m in http.get("/v1/models").json()["data"] if not m.get("parent"))
        for i, path in enumerate(adapters):
            http.post("/v1/load_lora_adapter", json={"lora_name": f"c{i}", "lora_path": str(path)}).raise_for_status()
        asyncio.run(load(self.url, [base_name], 16, 4, {base_name: admin["Authorization"][7:]}))  # warm-up
        return base_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--key-rounds", type=int, default=12, help="paired rounds with and without keys")
    ap.add_argument("--repeats", type=int, default=3, help="runs per scenario; the median run is reported")
    ap.add_argument("--explore", action="store_true", help="50 adapters vs base under other vLLM LoRA settings")
    ap.add_argument("--middleware-cost", action="store_true", help=argparse.SUPPRESS)  # run by main() in the vLLM venv
    a = ap.parse_args()
    if a.middleware_cost:
        print(json.dumps(middleware_cost()))
        return
    from ftops.model.base_models import build_tiny

    home = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base = build_tiny(home / "models" / "tiny")
    adapters = make_adapters(base, home / "adapters", 60)
    env = dict(
        os.environ,
        FTOPS_HOME=str(home),
        FTOPS_CUSTOMERS=str(customers_file(home, [f"c{i}" for i in range(50)])),
        VLLM_MODEL=str(base),
        VLLM_MAX_LORAS="8",
        VLLM_MAX_CPU_LORAS="64",
        VLLM_MAX_LORA_RANK="8",
    )
    env.pop("FTOPS_SERVING_ADMIN_KEY", None)
    os.environ.update(FTOPS_HOME=str(home), FTOPS_CUSTOMERS=env["FTOPS_CUSTOMERS"])
    from ftops.release import keys

    servers = []
    try:
        plain = Server(env, VLLM_MIDDLEWARE="none")
        servers.append(plain)
        keyed = Server(env)
        servers.append(keyed)
        admin = keys.auth_headers()
        base_name = plain.setup(adapters[:50], admin)
        keyed.setup(adapters[:50], admin)
        url = plain.url
        figures: dict = {"concurrency": a.concurrency, "max_tokens": 16}
        # Tenant isolation first, while both servers have the same history: the same 10 adapters, each request
        # with its own customer's key, against the server without the middleware; rounds alternate which
        # server goes first.
        names = [f"c{i}" for i in range(10)]
        customer_keys = {n: keys.create(n)[1] for n in names}
        for server, ks in ((keyed, customer_keys), (plain, None)):
            asyncio.run(load(server.url, names, 32, a.concurrency, ks))  # the same warm-up on both
        with_keys, without = [], []
        for r in range(a.key_rounds):  # short paired rounds: a pair shares the machine's load of the moment
            order = [(keyed, customer_keys, with_keys), (plain, None, without)]
            for server, ks, out in order if r % 2 else order[::-1]:
                other = plain if server is keyed else keyed
                other.pause()  # only the measured server runs
                server.resume()
                time.sleep(0.5)
                cpu = server.api_cpu_s()
                result = asyncio.run(load(server.url, names, max(a.requests // 2, 16), a.concurrency, ks))
                assert result["failed"] == 0, result
                out.append(result | {"api_cpu_ms": 1000 * (server.api_cpu_s() - cpu) / result["requests"]})
        plain.resume()
        keyed.pause()  # the scenarios below run on the plain server alone
        figures["keys_enforced"] = {
            "with_keys_req_per_s": [x["req_per_s"] for x in with_keys],
            "without_req_per_s": [x["req_per_s"] for x in without],
            "with_keys_tokens_per_s": [x["tokens_per_s"] for x in with_keys],
            "without_tokens_per_s": [x["tokens_per_s"] for x in without],
            "with_keys_p95_s": statistics.median(x["p95_s"] for x in with_keys),
            "without_p95_s": statistics.median(x["p95_s"] for x in without),
            # CPU time of the API server process per request: where the middleware's work shows, whatever
            # the engine's throughput does from one round to the next.
            "with_keys_api_cpu_ms_per_request": round(statistics.median(x["api_cpu_ms"] for x in with_keys), 3),
            "without_api_cpu_ms_per_request": round(statistics.median(x["api_cpu_ms"] for x in without), 3),
        }
        figures["keys_api_cpu_ratio"] = round(
            figures["keys_enforced"]["with_keys_api_cpu_ms_per_request"]
            / figures["keys_enforced"]["without_api_cpu_ms_per_request"],
            3,
        )
        figures["keys_throughput_ratio"] = round(
            statistics.median(k["req_per_s"] / n["req_per_s"] for k, n in zip(with_keys, without, strict=True)), 3
        )
        print("keys", figures["keys_enforced"], figures["keys_throughput_ratio"], file=sys.stderr)
        scenarios = {
            "base_only": [base_name],
            "adapters_1": ["c0"],
            "adapters_10": [f"c{i}" for i in range(10)],
            "adapters_50": [f"c{i}" for i in range(50)],
        }
        runs: dict[str, list[dict]] = {name: [] for name in scenarios}
        for _ in range(a.repeats):  # interleaved, so each scenario sees the machine's drift alike
            for name, models in scenarios.items():
                runs[name].append(asyncio.run(load(url, models, a.requests, a.concurrency)))
                print(name, runs[name][-1], file=sys.stderr)
        for name, results in runs.items():  # the median run by requests/s, with every run's rate beside it
            ranked = sorted(results, key=lambda x: x["req_per_s"])
            figures[name] = ranked[len(ranked) // 2] | {"runs_req_per_s": [x["req_per_s"] for x in results]}
        names = [f"c{i}" for i in range(10)]
        alt = {n: [adapters[50 + i], adapters[i]] for i, n in enumerate(names)}
        figures["swap_10_under_load"] = asyncio.run(swap_under_load(url, names, alt, a.requests, a.concurrency))
        print("swap", figures["swap_10_under_load"], file=sys.stderr)
        for k in ("adapters_1", "adapters_10", "adapters_50"):
            figures[f"{k}_throughput_vs_base"] = round(figures[k]["req_per_s"] / figures["base_only"]["req_per_s"], 3)

        cost = subprocess.run(
            [str(ROOT / ".venv-vllm" / "bin" / "python"), __file__, "--middleware-cost"],
            env=dict(env, PYTHONPATH=str(ROOT / "include")),
            capture_output=True,
            text=True,
            check=True,
        )
        figures["middleware_cost"] = json.loads(cost.stdout.strip().splitlines()[-1])
        # The same added time as a share of what one request costs the server at the measured rate.
        per_request_s = 1 / statistics.median(x["req_per_s"] for x in without)
        figures["middleware_cost"]["share_of_request_time"] = round(
            figures["middleware_cost"]["json"]["added_us"] / 1e6 / per_request_s, 5
        )
        print("middleware", figures["middleware_cost"], file=sys.stderr)
        if a.explore:
            for server in servers:
                server.stop()
            servers.clear()
            figures["explore_50_adapters"] = explore(env, adapters[:50], a)
    finally:
        for server in servers:
            server.stop()
    print(json.dumps(figures))


def explore(env: dict, adapters: list[Path], a) -> list[dict]:
    """50 adapters vs the base model under other LoRA settings of vLLM (one server at a time, no keys). Per
    setting, rounds alternate base and 50 adapters on the same server, so the ratio is robust to the machine's
    load drifting; the ratio is of the medians."""
    from ftops.release import keys

    settings = [
        {"VLLM_MAX_LORAS": "8", "VLLM_MAX_CPU_LORAS": "64"},
        {"VLLM_MAX_LORAS": "16", "VLLM_MAX_CPU_LORAS": "64"},
        {"VLLM_MAX_LORAS": "50", "VLLM_MAX_CPU_LORAS": "64"},
        {"VLLM_MAX_LORAS": "8", "VLLM_MAX_CPU_LORAS": "16"},
        {"VLLM_MAX_LORAS": "8", "VLLM_MAX_CPU_LORAS": "64", "concurrency": "16"},
        {"VLLM_MAX_LORAS": "16", "VLLM_MAX_CPU_LORAS": "64", "concurrency": "16"},
        {"VLLM_MAX_LORAS": "50", "VLLM_MAX_CPU_LORAS": "64", "concurrency": "16"},
    ]
    out = []
    for setting in settings:
        conc = int(setting.get("concurrency", a.concurrency))
        flags = {k: v for k, v in setting.items() if k.startswith("VLLM_")}
        server = Server(env, VLLM_MIDDLEWARE="none", **flags)
        base_rps, many_rps = [], []
        try:
            base_name = server.setup(adapters, keys.auth_headers())
            many = [f"c{i}" for i in range(50)]
            asyncio.run(load(server.url, many, 64, conc))  # warm every adapter once
            for r in range(3):
                order = [([base_name], base_rps), (many, many_rps)]
                for models, rps in order if r % 2 else order[::-1]:
                    rps.append(asyncio.run(load(server.url, models, a.requests, conc))["req_per_s"])
        finally:
            server.stop()
        row = setting | {"base_req_per_s": base_rps, "adapters_50_req_per_s": many_rps}
        row["ratio"] = round(statistics.median(many_rps) / statistics.median(base_rps), 3)
        print("explore", row, file=sys.stderr)
        out.append(row)
    return out


def middleware_cost(n: int = 4000) -> dict:
    """What ftops.release.serving_auth adds per request, measured in-process around a stand-in app that answers like
    vLLM (a JSON completion, or 16 streamed chunks): no engine, so nothing but the middleware's own work.
    Runs in the vLLM venv (`--middleware-cost`), with a key store in FTOPS_HOME."""
    from ftops.release import keys
    from ftops.release.serving_auth import TenantAuth

    usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    answer = json.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": " word" * 16}], "usage": usage}).encode()
    chunks = [b'data: {"id":"c","choices":[{"index":0,"text":" word"}]}\n\n'] * 16
    chunks += [b'data: {"id":"c","choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n", b"data: [DONE]\n\n"]

    async def vllm_like(scope, receive, send):
        body = json.loads((await receive())["body"])
        ctype = b"text/event-stream" if body.get("stream") else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
        if body.get("stream"):
            for c in chunks:
                await send({"type": "http.response.body", "body": c, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": answer, "more_body": False})

    _, key = keys.create("c0")
    guarded = TenantAuth(vllm_like)
    result = {}
    for label, stream in (("json", False), ("stream", True)):
        body = json.dumps(
            {
                "model": "c0",
                "prompt": "Ticket 1: how do I fix a failed export?",
                "max_tokens": 16,
                "temperature": 0,
                "stream": stream,
            }
        ).encode()
        headers = [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": headers}

        async def timed(app, body: bytes = body, scope: dict = scope) -> float:
            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                pass

            t0 = time.perf_counter()
            for _ in range(n):
                await app(dict(scope), receive, send)
            return (time.perf_counter() - t0) / n

        bare, with_mw = asyncio.run(timed(vllm_like)), asyncio.run(timed(guarded))
        result[label] = {
            "app_alone_us": round(bare * 1e6, 1),
            "with_middleware_us": round(with_mw * 1e6, 1),
            "added_us": round((with_mw - bare) * 1e6, 1),
        }
    return result


if __name__ == "__main__":
    main()
