"""Benchmark promotion latency on the local stack: seconds from the `production` alias move to the first
completion served by the new version, through the asset-triggered `sync_vllm_adapters` DAG under a real
Airflow scheduler (standalone), MLflow and vLLM (CPU, tiny model). Side by side in the same run: a direct
reconcile (the floor: no Airflow in the path), and the baseline without the asset event: an alias moved in
MLflow's UI or API by hand reaches vLLM only through the sync DAG's */5 cron, measured over
`--cron-rounds` rounds. Each cron round draws a phase uniformly in [0, 300) s of the 5-minute schedule, sleeps
until that phase (up to five minutes) and moves the alias there, so the wait to the next tick is uniform over
the period (expected 150 s, plus the DAG run). Per round it records the schedule's real next fire time as
Airflow reports it (`next_dagrun_run_after` of the DAG, read right after the move) and splits the latency into
the wait for that tick and the pickup after it (`cron_pickup_s`: the DAG run, from the tick to the first
completion served). `cron_expected_s` = 150 s + the median pickup: what the median approaches with enough
rounds. A full run (`--cron-rounds 9`) takes about 45 minutes of cron rounds; `--quick` runs 2 + 2 rounds.

    .venv/bin/python bench/promotion_latency.py [--rounds 4] [--cron-rounds 9] [--quick] [--seed 0]

Starts its own services on free ports in a temporary FTOPS_HOME and stops them. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CUSTOMER, BASE = "brightdesk", "tiny"
PERIOD = 300.0  # the sync DAG's */5 cron (dags/sync_vllm_adapters.py), in seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_versions(home: Path, base: Path, mlflow_uri: str) -> list[str]:
    from ftops.data.demo import registered_style_version

    return [
        registered_style_version(CUSTOMER, style, i, base, BASE, home, f"v{i + 1}", mlflow_uri, n=40, max_steps=10)
        for i, style in enumerate(["brightdesk", "sterling-law"])
    ]


def served_by(vllm: str, adapter_version: str, deadline: float) -> float:
    """Poll until the replica serves that version and answers a completion through it; returns that moment."""
    from ftops.release.keys import auth_headers

    with httpx.Client(base_url=vllm, timeout=60, headers=auth_headers()) as http:
        while time.time() < deadline:
            roots = {m["id"]: m["root"] for m in http.get("/v1/models").json()["data"]}
            if roots.get(CUSTOMER, "").endswith(f"/{adapter_version}"):
                r = http.post("/v1/completions", json={"model": CUSTOMER, "prompt": "Hi", "max_tokens": 4})
                if r.status_code == 200:
                    return time.time()
            time.sleep(0.1)
    raise TimeoutError(f"{adapter_version} not served in time")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cron-rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0, help="seed of the cron rounds' phases")
    ap.add_argument("--quick", action="store_true", help="2 asset rounds, 2 cron rounds (~15 minutes)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.cron_rounds = 2, 2
    home = Path(tempfile.mkdtemp(prefix="bench-promotion-"))
    ports = {"MLFLOW_PORT": free_port(), "VLLM_PORT": free_port(), "AIRFLOW_PORT": free_port()}
    os.environ.update(
        {k: str(v) for k, v in ports.items()}
        | {
            "FTOPS_HOME": str(home),
            "FTOPS_CUSTOMERS": str(ROOT / "tests" / "data" / "customers.yaml"),
            "FTOPS_MODELS_DIR": str(home / "models"),
            "FTOPS_STORAGE_ROOT": str(home / "storage"),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
            "FTOPS_VLLM_URLS": f"http://127.0.0.1:{ports['VLLM_PORT']}",
            "FTOPS_AIRFLOW_URL": f"http://127.0.0.1:{ports['AIRFLOW_PORT']}",
        }
    )
    from ftops.model.base_models import build_tiny
    from ftops.operate.notify import production_changed
    from ftops.release.registry import Registry
    from ftops.release.tasks import sync_serving

    base = build_tiny(home / "models" / "tiny-llama")
    os.environ["VLLM_MODEL"] = str(base)
    services = str(ROOT / "scripts" / "services.sh")
    figures: dict = {}
    try:
        for name in ("mlflow", "vllm", "airflow"):
            subprocess.run([services, "start", name], check=True)
        v1, v2 = two_versions(home, base, os.environ["MLFLOW_TRACKING_URI"])
        reg, vllm = Registry(os.environ["MLFLOW_TRACKING_URI"]), os.environ["FTOPS_VLLM_URLS"]
        reg.promote(CUSTOMER, BASE, v1)
        sync_serving()
        api = httpx.Client(base_url=f"{os.environ['FTOPS_AIRFLOW_URL']}/api/v2", timeout=30)
        while api.get("/dags/sync_vllm_adapters").status_code != 200:
            time.sleep(1)
        asset_dag, direct = [], []
        for i in range(a.rounds):
            target = v2 if i % 2 == 0 else v1
            name = reg.get(CUSTOMER, BASE, target).adapter_version
            t0 = time.time()
            reg.promote(CUSTOMER, BASE, target, force=True)
            assert production_changed(CUSTOMER, target), "the asset event was not accepted"
            asset_dag.append(served_by(vllm, name, t0 + 180) - t0)
            print(f"round {i}: asset-triggered DAG {asset_dag[-1]:.1f} s", file=sys.stderr)
            back = v1 if target == v2 else v2  # the floor: alias move, then reconcile in-process, no Airflow
            t0 = time.time()
            reg.promote(CUSTOMER, BASE, back, force=True)
            sync_serving()
            direct.append(served_by(vllm, reg.get(CUSTOMER, BASE, back).adapter_version, t0 + 60) - t0)
            reg.promote(CUSTOMER, BASE, target, force=True)
            sync_serving()
        cron, waits, pickups, phases, rng, unreported = [], [], [], [], random.Random(a.seed), 0
        current = v2 if a.rounds % 2 else v1  # what production is now
        for i in range(a.cron_rounds):
            phase = rng.uniform(0, PERIOD)  # seconds after a */5 tick (ticks fall on multiples of 300 s of UTC)
            time.sleep((phase - time.time() % PERIOD) % PERIOD)
            target = v1 if current == v2 else v2
            t0 = time.time()
            reg.promote(CUSTOMER, BASE, target, force=True)  # no asset event: only the cron will notice
            after = api.get("/dags/sync_vllm_adapters").json().get("next_dagrun_run_after")
            if after:
                tick = datetime.fromisoformat(after.replace("Z", "+00:00")).timestamp()
            else:  # not reported (yet): the cron's own next tick, counted apart
                tick, unreported = t0 + (PERIOD - t0 % PERIOD), unreported + 1
            cron.append(served_by(vllm, reg.get(CUSTOMER, BASE, target).adapter_version, t0 + 2 * PERIOD + 60) - t0)
            phases.append(t0 % PERIOD)
            waits.append(tick - t0)
            pickups.append(cron[-1] - waits[-1])
            current = target
            print(
                f"cron round {i}: phase {phases[-1]:.1f} s, next tick in {waits[-1]:.1f} s, served after "
                f"{cron[-1]:.1f} s (pickup {pickups[-1]:.1f} s)",
                file=sys.stderr,
            )
        figures = {
            "cores": os.cpu_count(),
            "rounds": a.rounds,
            "asset_dag_s_median": round(statistics.median(asset_dag), 2),
            "asset_dag_s_max": round(max(asset_dag), 2),
            "direct_reconcile_s_median": round(statistics.median(direct), 2),
            "cron_only_s_median": round(statistics.median(cron), 2) if cron else None,
            "cron_only_s": [round(x, 2) for x in cron],
            "cron_rounds": len(cron),
            "cron_next_tick_not_reported": unreported,
            "cron_phase_s": [round(x, 1) for x in phases],
            "cron_wait_to_tick_s": [round(x, 2) for x in waits],
            "cron_pickup_s": [round(x, 2) for x in pickups],
            "cron_expected_s": round(PERIOD / 2 + statistics.median(pickups), 1) if cron else None,
            "speedup_vs_cron_only": round(statistics.median(cron) / statistics.median(asset_dag), 1) if cron else None,
            "target_s": 15,
            "asset_dag_s": [round(x, 2) for x in asset_dag],
        }
    finally:
        for name in ("airflow", "vllm", "mlflow"):
            subprocess.run([services, "stop", name])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
