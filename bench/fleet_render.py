"""Benchmark the fleet page at N customers (default 500): a real MLflow holding N registered models with
`--versions` versions each (production and previous aliases, gate and metric tags), a real Airflow
standalone with the plugin and N customer DAGs, and a vLLM URL that does not answer (every replica `down`:
the page must still come back fast). Measured in the same run:

  - `fleet_fn_s`: `ftops.operate.fleet.fleet` in-process with a fresh registry read (two batched searches);
  - `baseline_per_customer_s`: what a page reading the registry customer by customer would spend on the
    registry alone (`Registry.by_alias` production + `Registry.versions`, 2 calls per customer, as the CLI does);
  - `api_cold_s`: the first `GET /ftops/api/customers`, sent the moment the api-server answers its health
    check after a start (auth, Airflow's tables, the registry snapshot the plugin began reading at startup,
    storage, replicas); `api_s`: the following ones (registry snapshot reused, refreshed in the background),
    with the api-server's own per-source timings;
  - `page_s`: the fleet page in headless Chromium, from navigation to the 500 rows drawn (when Chromium is
    installed).

    .venv/bin/python bench/fleet_render.py [--customers 500] [--versions 3] [--rounds 3]

Starts its own services on free ports in a temporary FTOPS_HOME and stops them. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def customers_file(path: Path, n: int) -> list[str]:
    ids = [f"tenant-{i:04d}" for i in range(n)]
    doc = {
        "base_models": {"tiny": {"path": "tiny-llama"}},
        # No inbox triggers: 500 watchers polling would load the triggerer, not the page under test.
        "defaults": {"base_model": "tiny", "trigger_min_examples": None},
        "customers": [{"id": c, "name": f"Tenant {i}"} for i, c in enumerate(ids)],
    }
    path.write_text(yaml.safe_dump(doc))
    return ids


def populate(mlflow_uri: str, ids: list[str], versions: int) -> None:
    """N registered models as the pipeline leaves them: tagged versions, production on the last passed one."""
    from mlflow import MlflowClient

    from ftops.release.registry import model_name

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("bench-fleet")
    run = client.create_run(exp).info
    run_id, artifacts = run.run_id, run.artifact_uri  # a version's source must lie in its run's artifacts

    def one(c: str) -> None:
        name = model_name(c, "tiny")
        client.create_registered_model(name, tags={"customer": c, "base_model": "tiny"})
        for v in range(1, versions + 1):
            gate = "failed" if v == versions and versions > 2 else "passed"
            tags = {
                "gate.decision": gate,
                "adapter.version": f"2026010{v}-{c}",
                "adapter.prefix": f"{c}/adapters/tiny/2026010{v}-{c}",
                "airflow.dag_id": f"finetune_{c}",
                "airflow.run_id": f"manual__{c}-{v}",
                "dataset.version": f"2026010{v}T000000000000Z-abcdef0{v}",
                "metrics.candidate_val_loss": str(2.5 - 0.2 * v),
                "metrics.candidate_golden_chrf": str(30 + 5 * v),
                "metrics.candidate_checks_pass_rate": str(0.5 + 0.1 * v),
            }
            client.create_model_version(name, source=f"{artifacts}/{c}/v{v}", run_id=run_id, tags=tags)
        passed = versions - 1 if versions > 2 else versions
        if passed > 1:
            client.set_registered_model_alias(name, "previous", str(passed - 1))
        client.set_registered_model_alias(name, "production", str(passed))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, ids))


def baseline(mlflow_uri: str, ids: list[str]) -> float:
    from ftops.release.registry import Registry

    reg = Registry(mlflow_uri)
    t0 = time.perf_counter()
    for c in ids:
        reg.by_alias(c, "tiny", "production")
        reg.versions(c, "tiny")
    return time.perf_counter() - t0


def page_time(url: str, n: int, home: Path) -> float | None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={home / 'chrome'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(f"{url}/ftops/")  # warm: fonts, caches, first import of the plugin's modules
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        t0 = time.perf_counter()
        driver.get(f"{url}/ftops/")
        WebDriverWait(driver, 120).until(
            lambda d: (
                d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true"
                and len(d.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")) == n
            )
        )
        return time.perf_counter() - t0
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=500)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    ports = {"MLFLOW_PORT": free_port(), "AIRFLOW_PORT": free_port()}
    ids = customers_file(home / "customers.yaml", a.customers)
    os.environ.update(
        {k: str(v) for k, v in ports.items()}
        | {
            "FTOPS_HOME": str(home),
            "FTOPS_CUSTOMERS": str(home / "customers.yaml"),
            "FTOPS_MODELS_DIR": str(home / "models"),
            "FTOPS_STORAGE_ROOT": str(home / "storage"),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
            "FTOPS_VLLM_URLS": f"http://127.0.0.1:{free_port()}",  # nothing listens: replicas are down
        }
    )
    from ftops.config import load_platform, settings
    from ftops.operate import fleet

    services = str(ROOT / "scripts" / "services.sh")
    figures: dict = {}
    try:
        subprocess.run([services, "start", "mlflow"], check=True)
        t0 = time.perf_counter()
        populate(os.environ["MLFLOW_TRACKING_URI"], ids, a.versions)
        print(f"populated {a.customers} models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        subprocess.run([services, "start", "airflow"], check=True)  # returns once the api-server is healthy
        url = f"http://127.0.0.1:{ports['AIRFLOW_PORT']}"
        with httpx.Client(base_url=url, timeout=120) as http:  # the first page load right after a restart
            t0 = time.perf_counter()
            first = http.get("/ftops/api/customers").raise_for_status().json()
            api_cold, cold_timings = time.perf_counter() - t0, first["timings"]
        env, platform = settings(), load_platform()
        fn, base, api = [], [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            rows = fleet.fleet(platform, env)
            fn.append(time.perf_counter() - t0)
            assert len(rows) == a.customers and all(r["production"] for r in rows)
            base.append(baseline(env.mlflow_uri, ids))
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                r = http.get("/ftops/api/customers")
                api.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["total"] == a.customers, r.text[:300]
                warm_timings = r.json()["timings"]
        page = page_time(url, a.customers, home)
        figures = {
            "customers": a.customers,
            "versions": a.customers * a.versions,
            "fleet_fn_s": round(statistics.median(fn), 3),
            "api_s": round(statistics.median(api), 3),
            "api_cold_s": round(api_cold, 3),
            "page_s": round(page, 3) if page is not None else None,
            "baseline_per_customer_s": round(statistics.median(base), 3),
            "speedup_registry": round(statistics.median(base) / statistics.median(fn), 1),
            "target_s": 2.0,
            "api_cold_timings": cold_timings,
            "api_timings": warm_timings,
        }
    finally:
        subprocess.run([services, "stop", "airflow"])
        subprocess.run([services, "stop", "mlflow"])
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
