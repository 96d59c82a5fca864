"""The ftops plugin in a real Airflow api-server (standalone on PostgreSQL, with the simple auth manager's
users, not all-admins) on a demo-like state: one customer trained by a real DAG run through the REST API
(dirty upload, gate, promotion by the run), another with two passed versions and one the gate refused,
promoted outside Airflow, and a real vLLM replica serving their production adapters.

The API tests read the fleet and a customer as an operator would, and check what they say against the
registry, Airflow and vLLM read directly; auth (401 without a session, 403 for a viewer's promote) and bad
input (404/409/400) behave like Airflow's own API. The browser test drives Debian's headless Chromium
through the Airflow UI: the nav entry, the customer's tab on its DAG page, the chart, a rollback with its
confirmation, and vLLM serving the rolled-back version; it saves screenshots under the test's tmp dir
(and under $FTOPS_SCREENSHOTS when set, which is how docs/fleet.png was made)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from conftest import _service, wait_run
from ftops.data.demo import registered_style_version, write_batch
from ftops.operate.fleet import parse_metrics, traffic
from ftops.release.keys import auth_headers
from ftops.release.registry import Registry, model_name

pytestmark = pytest.mark.e2e
HERE, SERVED = "brightdesk", "sterling-law"  # run by the DAG / versions registered outside Airflow
USERS = {"alice": ("admin", "alice-pw"), "victor": ("viewer", "victor-pw")}


def token(url: str, user: str) -> str:
    r = httpx.post(f"{url}/auth/token", json={"username": user, "password": USERS[user][1]}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()["access_token"]


@pytest.fixture(scope="module")
def plugin_mlflow(home, mlflow_server):
    """This module's own registry and storage: the fleet is compared with exactly what this module made, not with
    what earlier modules left in the session's (e2e's poisoned brightdesk history, for one)."""
    own = home / "plugin-mlflow"
    extra = {"MLFLOW_BACKEND": f"sqlite:///{own}/mlflow.db", "MLFLOW_ARTIFACTS": str(own / "artifacts")}
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "FTOPS_STORAGE_ROOT")}
    own.mkdir()
    for svc in _service("mlflow", extra, "MLFLOW_PORT"):
        os.environ.update(MLFLOW_TRACKING_URI=svc.url, FTOPS_STORAGE_ROOT=str(home / "plugin-storage"))
        try:
            yield svc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def airflow(home, tiny_model, plugin_mlflow, vllm_server, postgres):
    ah = home / "airflow-plugin"
    ah.mkdir()
    passwords = ah / "passwords.json"
    passwords.write_text(json.dumps({u: pw for u, (_, pw) in USERS.items()}))
    extra = {
        "AIRFLOW_HOME": str(ah),
        **postgres,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{role}" for u, (role, _) in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    for svc in _service("airflow", extra, "AIRFLOW_PORT"):
        admin = httpx.Client(
            base_url=svc.url, timeout=120, headers={"Authorization": f"Bearer {token(svc.url, 'alice')}"}
        )
        deadline = time.time() + 120
        while admin.get(f"/api/v2/dags/finetune_{HERE}").status_code != 200:
            assert time.time() < deadline, "the DAG never appeared"
            time.sleep(1)
        yield svc, admin


@pytest.fixture(scope="module")
def state(airflow, home, tiny_model, plugin_mlflow):
    """The demo-like state; returns what the tests compare the plugin's answers with."""
    from mlflow import MlflowClient

    from ftops.release.tasks import sync_serving

    svc, admin = airflow
    uri = plugin_mlflow.url
    # A real run of brightdesk's DAG on a dirty upload (duplicates, PII, a malformed line).
    write_batch(HERE, home / "plugin-storage" / HERE / "inbox", n=60, batch=0, dirty=True)
    r = admin.post(f"/api/v2/dags/finetune_{HERE}/dagRuns", json={"logical_date": None, "conf": {}})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    # Meanwhile, sterling-law: two passed versions trained here, and one the gate refused.
    work = home / "plugin-work"
    reg = Registry(uri)
    versions = [
        registered_style_version(SERVED, SERVED, b, tiny_model, "tiny", work, f"plugin-v{b}", uri, n=40, max_steps=10)
        for b in (1, 2)
    ]
    for v, (loss, chrf, checks) in zip(versions, [(2.5, 31.0, 0.5), (1.9, 44.0, 0.75)], strict=True):
        reg.set_tags(SERVED, "tiny", v, _metric_tags(loss, chrf, checks))
    v2 = reg.get(SERVED, "tiny", versions[1])
    client = MlflowClient(uri)
    v2_run = client.get_model_version(model_name(SERVED, "tiny"), versions[1]).run_id
    failed_run = client.create_run(client.get_run(v2_run).info.experiment_id)
    # A candidate the gate refused (its adapter is never served, so its files need not exist).
    failed_source = v2.source.replace(v2_run, failed_run.info.run_id)
    failed = reg.register(
        SERVED,
        "tiny",
        failed_source,
        failed_run.info.run_id,
        {"gate.decision": "failed", "adapter.version": "plugin-v3", **_metric_tags(2.9, 20.0, 0.25)},
        # Registry text reaches the page: markup in it must stay text.
        description='val_loss regressed 52% vs production (max 10%) <img src=x onerror="document.body.dataset.xss=1">',
    ).version
    for v in versions:  # as two DAG runs would have: v1, then v2 (v1 becomes `previous`)
        reg.promote(SERVED, "tiny", v)
    write_batch(SERVED, home / "plugin-storage" / SERVED / "inbox", n=25, batch=7, dirty=False)  # waiting, not yet run
    assert wait_run(admin, f"/api/v2/dags/finetune_{HERE}/dagRuns/{run_id}", timeout=600) == "success"
    sync_serving()
    return {"run_id": run_id, "versions": versions, "failed": failed, "registry": reg, "done_at": time.time()}


def _metric_tags(loss: float, chrf: float, checks: float) -> dict[str, str]:
    return {
        "metrics.candidate_val_loss": str(loss),
        "metrics.candidate_golden_chrf": str(chrf),
        "metrics.candidate_checks_pass_rate": str(checks),
    }


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def fleet_rows(admin: httpx.Client, since: float | None = None) -> dict[str, dict]:
    """The fleet's rows; with `since`, from a registry snapshot read after that moment. The page serves a
    snapshot up to a minute old and refreshes it in the background (its age is in the answer), so a change
    made outside the page shows on a following load."""
    deadline = time.time() + 90
    while True:
        r = admin.get("/ftops/api/customers")
        assert r.status_code == 200, r.text
        if since is None or r.json()["registry_age_s"] < time.time() - since:
            return {row["customer"]: row for row in r.json()["customers"]}
        assert time.time() < deadline, f"the registry snapshot is still {r.json()['registry_age_s']} s old"
        time.sleep(1)


def served_root(vllm_url: str, customer: str) -> str | None:
    models = httpx.get(f"{vllm_url}/v1/models", timeout=30, headers=auth_headers()).json()["data"]
    return next((m["root"] for m in models if m["id"] == customer), None)


# --- API ----------------------------------------------------------------------------------------------------


def test_the_plugin_adds_a_nav_entry_and_a_dag_tab(airflow):
    _, admin = airflow
    plugins = admin.get("/api/v2/plugins").json()["plugins"]
    ftops = next(p for p in plugins if p["name"] == "ftops")
    views = {v["destination"]: v for v in ftops["external_views"]}
    assert views["nav"]["href"] == "ftops/" and "{DAG_ID}" in views["dag"]["href"]
    assert ftops["fastapi_apps"][0]["url_prefix"] == "/ftops"


def test_the_registry_snapshot_is_read_when_the_api_server_starts(airflow, home):
    """The api-server reads the registry as it starts, before any page asks (at 500 customers that read takes
    seconds), and the first page load is served that snapshot instead of reading again."""
    svc, admin = airflow
    log = home / "run" / f"airflow-{svc.url.rsplit(':', 1)[1]}.log"
    deadline = time.time() + 120
    while "registry snapshot read at start-up" not in log.read_text(errors="replace"):
        assert time.time() < deadline, "the api-server did not read the registry at start-up"
        time.sleep(0.5)
    time.sleep(1.5)  # a snapshot read on demand now would be 0 s old
    assert admin.get("/ftops/api/customers").json()["registry_age_s"] >= 1.0


def test_fleet_rows_say_what_registry_airflow_vllm_and_storage_say(airflow, state, vllm_server, home):
    _, admin = airflow
    rows = fleet_rows(admin, since=state["done_at"])
    reg = state["registry"]
    here, served = rows[HERE], rows[SERVED]
    # Production as the registry has it, and who moved it there.
    prod = reg.by_alias(HERE, "tiny", "production")
    assert here["production"]["version"] == prod.version
    assert here["production"]["promoted_by"] == f"run {state['run_id']}" and here["production"]["promoted_at"]
    assert served["production"]["version"] == state["versions"][1] and served["previous"] == state["versions"][0]
    # Served: vLLM really serves both production adapters.
    for row in (here, served):
        assert row["served"]["state"] == "in sync"
        assert served_root(vllm_server.url, row["customer"]).endswith(row["production"]["adapter_version"])
    # The last run as Airflow recorded it, with the gate's verdict on what it registered.
    assert here["last_run"]["run_id"] == state["run_id"]
    assert here["last_run"]["state"] == "success" and here["last_run"]["gate"] == "passed"
    assert served["last_run"] is None  # its versions were made outside Airflow
    dag = admin.get(f"/api/v2/dags/finetune_{HERE}").json()
    assert here["next_run"] and _t(here["next_run"]) == _t(dag["next_dagrun_run_after"])  # its weekly slot
    # Data: 25 examples wait in sterling-law's inbox; brightdesk's last batch lost its planted bad lines.
    assert served["inbox"] == 25 and here["inbox"] == 0
    versions = sorted((home / "plugin-storage" / HERE / "datasets").iterdir())
    manifest = json.loads((versions[-1] / "manifest.json").read_text())
    assert here["quarantine_share"] == round(
        sum(manifest["counts"]["dropped"].values()) / manifest["counts"]["read"], 4
    )
    assert here["quarantine_share"] > 0


def test_fleet_shows_each_customers_traffic_from_the_live_replica(airflow, state, vllm_server):
    """Requests made now with a customer's own key, and one it may not make, reach the fleet row through the
    replica's per-customer metrics (the tenant middleware's counters at `<replica>/metrics`)."""
    from ftops.release.keys import create

    _, admin = airflow
    before = fleet_rows(admin)[SERVED]["traffic"] or {"requests": 0, "errors": 0}
    _, key = create(SERVED)
    with httpx.Client(base_url=vllm_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for _ in range(3):
            r = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert http.post("/v1/completions", json={"model": HERE, "prompt": "Hi"}).status_code == 403
    after = fleet_rows(admin)[SERVED]["traffic"]
    assert after["requests"] - before["requests"] == 4 and after["errors"] - before["errors"] == 1, (before, after)
    assert after["p95_ms"] is not None and after["p95_ms"] > 0


def test_traffic_is_read_from_per_customer_prometheus_metrics():
    text = """# HELP ftops_requests_total requests
ftops_requests_total{customer="acme",status="200"} 90
ftops_requests_total{customer="acme",status="500"} 10
ftops_requests_total{customer="zed",status="200"} 5
ftops_request_duration_seconds_bucket{customer="acme",le="0.1"} 50
ftops_request_duration_seconds_bucket{customer="acme",le="0.5"} 94
ftops_request_duration_seconds_bucket{customer="acme",le="1.0"} 99
ftops_request_duration_seconds_bucket{customer="acme",le="+Inf"} 100
vllm:num_requests_running 3
"""
    t = traffic(parse_metrics(text))
    assert t["acme"] == {"requests": 100, "errors": 10, "p95_ms": 1000.0}  # 95th of 100 falls in (0.5, 1.0]
    assert t["zed"] == {"requests": 5, "errors": 0, "p95_ms": None}
    assert "other" not in t
    # What ftops.release.serving_auth exports: errors counted by the exporter itself, not again from the status codes.
    middleware = """ftops_tenant_requests_total{customer="acme",route="/v1/completions",code="200"} 40
ftops_tenant_requests_total{customer="acme",route="/v1/completions",code="403"} 2
ftops_tenant_errors_total{customer="acme",reason="forbidden"} 2
ftops_tenant_request_seconds_bucket{customer="acme",le="0.25"} 41
ftops_tenant_request_seconds_bucket{customer="acme",le="+Inf"} 42
"""
    assert traffic(parse_metrics(middleware))["acme"] == {"requests": 42, "errors": 2, "p95_ms": 250.0}


def test_an_unreachable_registry_or_replica_is_reported_not_shown_as_empty(monkeypatch):
    from conftest import free_port
    from ftops.release import registry, serving

    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # as the plugin sets it in the api-server
    t0 = time.time()
    with pytest.raises(registry.RegistryUnavailable, match="cannot be read"):
        registry.read_registry(nowhere)
    assert time.time() - t0 < 30
    replicas = serving.replica_adapters([nowhere])
    assert replicas == {nowhere: None}
    assert serving.served_state("acme", None, replicas)["state"] == "down"


def test_customer_history_with_metrics_lineage_and_links(airflow, state):
    _, admin = airflow
    d = admin.get(f"/ftops/api/customers/{SERVED}").json()
    assert [v["version"] for v in d["versions"]] == [state["failed"], *reversed(state["versions"])]
    by = {v["version"]: v for v in d["versions"]}
    assert by[state["versions"][1]]["metrics"]["golden_chrf"] == 44.0
    assert by[state["failed"]]["gate"] == "failed" and not by[state["failed"]]["can_promote"]
    assert by[state["versions"][0]]["can_promote"]  # passed, not in production
    assert by[state["versions"][1]]["aliases"] == ["production"] and not by[state["versions"][1]]["can_promote"]
    assert by[state["versions"][0]]["aliases"] == ["previous"]
    assert d["stuck"] is None  # one failed gate is not stuck (gate.stuck_after: 2)
    h = admin.get(f"/ftops/api/customers/{HERE}").json()
    v = h["versions"][0]
    assert v["links"]["airflow_run"] == f"dags/finetune_{HERE}/runs/{state['run_id']}"
    assert v["links"]["mlflow_run"] and v["dataset"]["version"] and v["metrics"]["val_loss"] is not None
    report = admin.get(f"/ftops/{v['links']['gate_report']}")
    assert report.status_code == 200 and "<html" in report.text.lower() and "passed" in report.text.lower()
    a = admin.get(f"/ftops/api/customers/{HERE}/answers").json()
    assert a["served"] and a["base"] and a["adapter"].endswith(v["adapter_version"])


def test_auth_is_the_api_servers(airflow, state):
    svc, admin = airflow
    assert httpx.get(f"{svc.url}/ftops/api/customers", timeout=30).status_code == 401
    viewer = httpx.Client(base_url=svc.url, timeout=60, headers={"Authorization": f"Bearer {token(svc.url, 'victor')}"})
    rows = viewer.get("/ftops/api/customers").json()["customers"]
    assert rows and not any(r["can_act"] for r in rows)  # may read, may not trigger
    r = viewer.post(f"/ftops/api/customers/{SERVED}/rollback", json={"confirm": True})
    assert r.status_code == 403
    assert state["registry"].by_alias(SERVED, "tiny", "production").version == state["versions"][1]


def test_bad_input_is_a_clear_4xx_and_changes_nothing(airflow, state):
    _, admin = airflow
    assert admin.get("/ftops/api/customers/nobody").status_code == 404
    r = admin.post("/ftops/api/customers/nobody/promote", json={"version": "1", "confirm": True})
    assert r.status_code == 404 and "unknown customer" in r.text
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": "999", "confirm": True})
    assert r.status_code == 404 and "999" in r.text
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": "1 or 1=1", "confirm": True})
    assert r.status_code == 404
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": state["failed"], "confirm": True})
    assert r.status_code == 409 and "did not pass the gate" in r.text
    r = admin.post(f"/ftops/api/customers/{SERVED}/rollback", json={"version": state["failed"], "confirm": True})
    assert r.status_code == 409
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": state["versions"][0]})
    assert r.status_code == 400 and "confirm" in r.text
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": state["versions"][1], "confirm": True})
    assert r.status_code == 200 and r.json()["unchanged"]  # already in production: nothing moved, nothing tagged
    assert "promoted.by" not in state["registry"].get(SERVED, "tiny", state["versions"][1]).tags
    assert state["registry"].by_alias(SERVED, "tiny", "production").version == state["versions"][1]


def test_openapi_documents_the_api(airflow):
    _, admin = airflow
    paths = admin.get("/ftops/openapi.json").json()["paths"]
    assert {"/api/customers", "/api/customers/{customer}", "/api/customers/{customer}/promote"} <= set(paths)
    assert "409" in paths["/api/customers/{customer}/promote"]["post"]["responses"]
    docs = admin.get("/ftops/docs")  # FastAPI's own documentation page, pointing at this OpenAPI document
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/ftops/openapi.json" in docs.text


def test_a_replica_serving_another_adapter_is_drift(airflow, state, vllm_server):
    """A replica that serves something other than production under a customer's name (loaded by hand here:
    another customer's adapter) shows `drift`; the next sync puts it back in sync."""
    from ftops.release.serving import Replica
    from ftops.release.tasks import sync_serving

    _, admin = airflow
    wrong = served_root(vllm_server.url, HERE)
    Replica(vllm_server.url).load(SERVED, wrong, inplace=True)
    try:
        row = fleet_rows(admin)[SERVED]
        assert row["served"]["state"] == "drift", row["served"]
        assert row["served"]["replicas"][vllm_server.url]["serves"] == Path(wrong).name
    finally:
        sync_serving()
    assert fleet_rows(admin)[SERVED]["served"]["state"] == "in sync"


# --- browser --------------------------------------------------------------------------------------------------


def _browser(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        why = "Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them as root)"
        if os.environ.get("CI"):  # CI installs them: missing there is a broken set-up, not an optional extra
            pytest.fail(why)
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1500,950",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--disable-gpu",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _shot(driver, tmp: Path, name: str) -> None:
    driver.save_screenshot(str(tmp / name))
    if os.environ.get("FTOPS_SCREENSHOTS"):
        Path(os.environ["FTOPS_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / name, Path(os.environ["FTOPS_SCREENSHOTS"]) / name)


def test_browser_fleet_page_customer_tab_and_rollback(airflow, state, vllm_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    svc, admin = airflow
    driver = _browser(tmp_path)
    wait = WebDriverWait(driver, 90)
    try:
        driver.get(f"{svc.url}/api/v2/version")  # a page on the origin, to set the session cookie on
        driver.add_cookie({"name": "_token", "value": token(svc.url, "alice"), "path": "/"})
        # The nav entry: Airflow's UI with the fleet page in its frame.
        driver.get(f"{svc.url}/plugin/ftops-fleet")
        wait.until(ec.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
        table = driver.find_element(By.ID, "fleet").text
        prod = state["registry"].by_alias(HERE, "tiny", "production").version
        assert SERVED in table and HERE in table and f"v{state['versions'][1]}" in table and f"v{prod}" in table
        assert "in sync" in table
        api_rows = fleet_rows(admin)
        for customer, row in api_rows.items():  # traffic as the API gives it, or n/a without samples
            cell = driver.find_element(By.CSS_SELECTOR, f"tr[data-customer='{customer}'] td:last-child").text
            t = row["traffic"]
            assert (f"{t['requests']} req" in cell) if t else cell == "n/a", (customer, cell, t)
        driver.find_element(By.ID, "filter").send_keys("sterl")
        rows = driver.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
        assert [r.get_attribute("data-customer") for r in rows] == [SERVED]
        driver.find_element(By.ID, "filter").clear()
        driver.find_element(By.ID, "filter").send_keys(" ")  # back to every customer
        # the served-state filter shows exactly the rows in that state (both customers here are in sync)
        for state_name in ("in sync", "drift", "down", "-"):
            Select(driver.find_element(By.ID, "served-filter")).select_by_visible_text(state_name)
            rows = driver.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
            want = sorted(c for c, r in api_rows.items() if r["served"]["state"] == state_name)
            assert sorted(r.get_attribute("data-customer") for r in rows) == want, state_name
            assert state_name != "in sync" or {HERE, SERVED} <= set(want)
        Select(driver.find_element(By.ID, "served-filter")).select_by_visible_text("any served state")
        driver.switch_to.default_content()
        _shot(driver, tmp_path, "fleet.png")

        # The customer's tab on its DAG page: history, chart, actions.
        driver.get(f"{svc.url}/dags/finetune_{SERVED}/plugin/ftops-adapters")
        wait.until(ec.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
        assert driver.find_element(By.ID, "production").text == f"v{state['versions'][1]}"
        chart = driver.find_element(By.CSS_SELECTOR, "svg[data-metric=golden_chrf]")
        assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) == 3  # one per version
        assert driver.find_elements(By.CSS_SELECTOR, "svg[data-metric=retention]")  # no history compared yet
        wait.until(lambda d: d.find_element(By.ID, "served-answer").text.strip() != "")
        reasons = driver.find_element(By.CSS_SELECTOR, f"tr[data-version='{state['failed']}'] .reasons").text
        assert "val_loss regressed" in reasons and "<img" in reasons  # shown as text, not run
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-xss") is None
        driver.switch_to.default_content()
        _shot(driver, tmp_path, "customer.png")

        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        driver.find_element(By.ID, "rollback").click()
        dialog = wait.until(ec.visibility_of_element_located((By.ID, "confirm")))
        assert f"v{state['versions'][0]}" in dialog.text
        driver.find_element(By.ID, "confirm-yes").click()
        wait.until(lambda d: d.find_elements(By.ID, "moved"))
        assert driver.find_element(By.ID, "production").text == f"v{state['versions'][0]}"
        v1 = state["registry"].get(SERVED, "tiny", state["versions"][0])
        assert state["registry"].by_alias(SERVED, "tiny", "production").version == v1.version
        assert v1.tags["promoted.by"] == "alice" and v1.tags["promoted.action"] == "rollback"
        # The rollback's asset event runs the serving sync: vLLM serves v1 again, without our help.
        deadline = time.time() + 240
        while not (served_root(vllm_server.url, SERVED) or "").endswith(v1.adapter_version):
            assert time.time() < deadline, "vLLM did not pick up the rollback"
            time.sleep(3)
        row = fleet_rows(admin)[SERVED]
        assert row["served"]["state"] == "in sync" and row["production"]["promoted_by"] == "rollback by alice"
        driver.refresh()
        driver.switch_to.default_content()
        wait.until(ec.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
        driver.switch_to.default_content()
        _shot(driver, tmp_path, "customer-after-rollback.png")
    finally:
        driver.quit()


def test_promote_a_passed_version_from_the_api(airflow, state, vllm_server):
    """The page's *Promote*: a passed version not in production moves there, tagged with who did it, and the
    asset event it emits has vLLM serve it without anyone running the sync."""
    _, admin = airflow
    reg = state["registry"]
    current = reg.by_alias(SERVED, "tiny", "production").version
    target = next(v for v in state["versions"] if v != current)  # the other passed version
    r = admin.post(f"/ftops/api/customers/{SERVED}/promote", json={"version": target, "confirm": True})
    assert r.status_code == 200 and not r.json().get("unchanged"), r.text
    moved = reg.get(SERVED, "tiny", target)
    assert reg.by_alias(SERVED, "tiny", "production").version == target
    assert moved.tags["promoted.by"] == "alice" and moved.tags["promoted.action"] == "promote"
    assert reg.by_alias(SERVED, "tiny", "previous").version == current
    deadline = time.time() + 240
    while not (served_root(vllm_server.url, SERVED) or "").endswith(moved.adapter_version):
        assert time.time() < deadline, "vLLM did not pick up the promotion"
        time.sleep(3)
