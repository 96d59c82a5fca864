"""Benchmark multi-LoRA serving on the local vLLM (CPU build, tiny model): throughput and p50/p95 latency
with requests spread over 1, 10 and 50 adapters, next to the base model alone (the baseline) in the same
run, and the share of failed requests while 10 adapters are swapped (`load_inplace`) under load.

    .venv/bin/python bench/serving.py [--requests 160] [--concurrency 8]

Starts its own vLLM through scripts/services.sh (free port, temporary FTOPS_HOME) and stops it. The
adapters carry random LoRA weights (serving cost does not depend on what they learned). Prints one JSON
line last.
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


def make_adapters(base: Path, out: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # PEFT initialises B to zero, which would make every adapter the base
        model.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


async def load(url: str, models: list[str], total: int, concurrency: int) -> dict:
    latencies, failures, tokens = [], 0, 0
    queue = list(range(total))

    async def worker(http: httpx.AsyncClient):
        nonlocal failures, tokens
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            r = await http.post(
                f"{url}/v1/completions",
                json={
                    "model": models[i % len(models)],
                    "prompt": f"Ticket {i}: how do I fix a failed export?",
                    "max_tokens": 16,
                    "temperature": 0,
                },
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    from ftops.models import build_tiny

    home = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base = build_tiny(home / "models" / "tiny")
    adapters = make_adapters(base, home / "adapters", 60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        FTOPS_HOME=str(home),
        VLLM_PORT=str(port),
        VLLM_MODEL=str(base),
        VLLM_MAX_LORAS="8",
        VLLM_MAX_CPU_LORAS="64",
        VLLM_MAX_LORA_RANK="8",
    )
    services = [str(ROOT / "scripts" / "services.sh")]
    subprocess.run(services + ["start", "vllm"], env=env, check=True)
    url = f"http://127.0.0.1:{port}"
    try:
        http = httpx.Client(base_url=url, timeout=120)
        base_name = http.get("/v1/models").json()["data"][0]["id"]
        for i, path in enumerate(adapters[:50]):
            http.post("/v1/load_lora_adapter", json={"lora_name": f"c{i}", "lora_path": str(path)}).raise_for_status()
        asyncio.run(load(url, [base_name], 16, 4))  # warm-up
        figures: dict = {"concurrency": a.concurrency, "max_tokens": 16}
        scenarios = {
            "base_only": [base_name],
            "adapters_1": ["c0"],
            "adapters_10": [f"c{i}" for i in range(10)],
            "adapters_50": [f"c{i}" for i in range(50)],
        }
        for name, models in scenarios.items():
            figures[name] = asyncio.run(load(url, models, a.requests, a.concurrency))
            print(name, figures[name], file=sys.stderr)
        names = [f"c{i}" for i in range(10)]
        alt = {n: [adapters[50 + i], adapters[i]] for i, n in enumerate(names)}
        figures["swap_10_under_load"] = asyncio.run(swap_under_load(url, names, alt, a.requests, a.concurrency))
        print("swap", figures["swap_10_under_load"], file=sys.stderr)
        for k in ("adapters_1", "adapters_10", "adapters_50"):
            figures[f"{k}_throughput_vs_base"] = round(figures[k]["req_per_s"] / figures["base_only"]["req_per_s"], 3)
    finally:
        subprocess.run(services + ["stop", "vllm"], env=env)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
