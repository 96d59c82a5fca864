"""Forgetting per version and the stuck marker, end to end from the gate's hand-off to what an operator reads:
evaluation's figures (`Metrics.history_groups`) -> gate decision -> registry tags written by registration's own
code -> the fleet page's row and the customer's tab (`ftops.operate.fleet`) and `ftops adapters show`, on a real
MLflow server. Versions are registered without training (their adapters are never served here)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from ftops.config import Settings, load_platform
from ftops.handoffs import Metrics
from ftops.model.gate import decide
from ftops.release.registry import Registry
from ftops.release.tags import VersionTags
from ftops.release.tasks import forgetting

ROOT = Path(__file__).resolve().parents[1]
CUSTOMER, BASE = "retention-co", "tiny"
D1, D2, D3 = "20261102T030000000000Z-aaaa", "20261109T030000000000Z-bbbb", "20261116T030000000000Z-cccc"


def group(first: str, cand: float, prod: float, sd: float = 0.02, items: int = 16) -> dict:
    return {
        "first": first,
        "last": first,
        "versions": 1,
        "items": items,
        "candidate": cand,
        "production": prod,
        "base": 3.0,
        "increase": cand - prod,
        "diff_sd": sd,
    }


def hand_off(groups: list[dict]) -> Metrics:
    scores = {
        "val_loss": 0.5,
        "golden_chrf": 60.0,
        "checks_pass_rate": 1.0,
        "canary_leaks": 0,
        "cross_tenant_leaks": 0,
        "pii_answers": 0,
        "repetition": 0.0,
    }
    return Metrics.model_validate(
        {
            "base": {"val_loss": 3.0, "repetition": 0.0},
            "candidate": scores,
            "production": scores if groups else None,
            "history_groups": groups,
        }
    )


@pytest.fixture(scope="module")
def registry(home, mlflow_server, tmp_path_factory):
    """One customer of its own on the session's MLflow server, its versions as a season of weekly runs went:
    v1 (no production yet), v2 kept what v1 knew, v3 and v4 forgot the first week's data and failed."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("retention")
    customers = folder / "customers.yaml"
    customers.write_text(
        "base_models: {tiny: {path: tiny-llama}}\n"
        f"customers:\n  - {{id: {CUSTOMER}, name: Retention Co, base_model: tiny, gate: {{stuck_after: 2}}}}\n"
    )
    client, reg = MlflowClient(mlflow_server.url), Registry(mlflow_server.url)
    exp = client.create_experiment(f"ftops-{CUSTOMER}-{os.getpid()}")
    policy = load_platform(customers).customer(CUSTOMER).gate
    seasons = [
        [],
        [group(D1, 0.081, 0.077)],  # the evidence: noise at a low loss, nothing forgotten
        [group(D1, 1.06, 0.081, sd=0.3), group(D2, 0.5, 0.49)],
        [group(D1, 1.10, 0.081, sd=0.3), group(D2, 0.9, 0.49, sd=0.2), group(D3, 0.3, 0.31)],
    ]
    decisions = []
    for i, groups in enumerate(seasons, start=1):
        m = hand_off(groups)
        d = decide(m, policy)
        decisions.append(d)
        run = client.create_run(exp)
        tags = {"adapter.version": f"week{i}", "dataset.version": [D1, D2, D3, D3][i - 1]} | d.as_tags()
        v = reg.register(
            CUSTOMER,
            BASE,
            f"{run.info.artifact_uri}/adapter",
            run.info.run_id,
            tags | VersionTags(**forgetting(m)).as_tags(),
        )
        if d.passed:
            reg.promote(CUSTOMER, BASE, v.version)
    env = Settings(
        folder, customers, str(folder / "storage"), folder, mlflow_server.url, ("http://127.0.0.1:9",), folder
    )
    return {"env": env, "platform": load_platform(customers), "decisions": decisions, "customers": customers}


def test_the_gate_passes_noise_and_blocks_forgetting_on_the_season(registry):
    assert [d.passed for d in registry["decisions"]] == [True, True, False, False]
    assert registry["decisions"][2].failed_rules == ["max_forgetting"]


def test_two_failed_gates_in_a_row_mark_the_customer_stuck_with_the_rule_and_what_to_do(registry):
    from ftops.operate.fleet import customer_detail, fleet
    from ftops.release.registry import read_registry

    env = registry["env"]
    rows = fleet(registry["platform"], env, registry=lambda: read_registry(env.mlflow_uri))
    stuck = next(r for r in rows if r["customer"] == CUSTOMER)["stuck"]
    assert stuck["label"] == "stuck: max_forgetting" and stuck["failures"] == 2 and stuck["since"] == "3"
    assert "strategy: full" in stuck["advice"]
    assert customer_detail(registry["platform"], env, CUSTOMER)["stuck"] == stuck
    # One failure is not stuck yet: the same history without the newest version.
    from ftops.operate.fleet import stuck_state

    model = read_registry(env.mlflow_uri)[(CUSTOMER, BASE)]
    model.versions = model.versions[1:]
    assert stuck_state(model, 2) is None


def test_the_customer_tab_carries_retention_across_versions(registry):
    from ftops.operate.fleet import customer_detail

    d = customer_detail(registry["platform"], registry["env"], CUSTOMER)
    ret = d["retention"]
    assert ret["versions"] == ["2", "3", "4"]  # v1 had no production to compare with
    first = ret["series"][0]
    assert first["first"] == D1 and first["label"] == "2026-11-02"
    assert [p["loss"] for p in first["points"]] == [0.081, 1.06, 1.1]
    v3 = next(v for v in d["versions"] if v["version"] == "3")
    assert v3["forgetting"]["max"] == pytest.approx(1.06 - 0.081, abs=1e-3)
    assert len(v3["forgetting"]["groups"]) == 2


def test_adapters_show_prints_forgetting_and_retention(registry):
    env = dict(
        os.environ,
        FTOPS_CUSTOMERS=str(registry["customers"]),
        MLFLOW_TRACKING_URI=registry["env"].mlflow_uri,
        COLUMNS="160",
    )
    ftops = str(ROOT / ".venv" / "bin" / "ftops")
    shown = subprocess.run([ftops, "adapters", "show", CUSTOMER, "3"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["tags"]["forgetting.max"] and out["retention"]["versions"] == ["2", "3"]
    table = subprocess.run(
        [ftops, "adapters", "show", CUSTOMER, "4", "--table"], capture_output=True, text=True, env=env
    )
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "Retention across versions" in text and "2026-11-02" in text and "2026-11-16" in text, text
    assert "1.1000" in text and "1.0600" in text and "0.0810" in text, text  # week 1's loss at v4, v3, v2
    assert "forgetting.max +1.0190" in text, text


def test_evaluation_scores_each_group_of_earlier_versions_on_the_customers_own_held_out_items(tiny_model, tmp_path):
    """The evaluate task's grouping (real storage, an erasure tombstone) and the evaluation command's figures
    (real PEFT adapters on the tiny model): per group, each model's mean per-example loss and the paired
    difference the gate tests."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftops.data import snapshot as snap
    from ftops.data.demo import STYLES, answer
    from ftops.model.evaluate import EvalArgs, evaluate
    from ftops.model.tasks import history_groups
    from ftops.storage import Store

    store = Store(str(tmp_path / "storage"))
    rows = {}
    for i, v in enumerate([D1, D2, D3]):
        rng = random.Random(i)
        rows[v] = [
            {
                "id": f"{v[-4:]}-{j}",
                "messages": [
                    {"role": "user", "content": f"Question {i}-{j}?"},
                    {"role": "assistant", "content": answer("brightdesk", STYLES["brightdesk"]["topics"][j], rng)},
                ],
            }
            for j in range(4)
        ]
        store.put(f"{CUSTOMER}/datasets/{v}/val.jsonl", snap._jsonl(rows[v]))
        store.put(f"{CUSTOMER}/datasets/{v}/manifest.json", json.dumps({"version": v, "counts": {"kept": 4}}).encode())
    snap.erase(store, CUSTOMER, {rows[D1][0]["id"]}, "erase request")
    # The val file the train task wrote: every version's rows (the erased one already out), D3 new to production.
    val = [r | {"history": v != D3} for v in (D1, D2, D3) for r in rows[v] if r["id"] != rows[D1][0]["id"]]
    groups = history_groups(
        SimpleNamespace(store=store, id=CUSTOMER),
        SimpleNamespace(info=VersionTags(dataset_version=D2)),
        val,
        max_groups=1,
    )
    assert groups == [{"first": D1, "last": D2, "versions": 2}]  # more versions than groups: consecutive ones merge
    assert [r.get("group") for r in val] == [0] * 7 + [None] * 4
    groups = history_groups(
        SimpleNamespace(store=store, id=CUSTOMER), SimpleNamespace(info=VersionTags(dataset_version=D2)), val
    )
    assert [g["first"] for g in groups] == [D1, D2] and [r.get("group") for r in val] == [0] * 3 + [1] * 4 + [None] * 4

    def adapter(name: str, seed: int) -> str:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    (tmp_path / "val.jsonl").write_bytes(snap._jsonl(val))
    out = evaluate(
        EvalArgs(
            base_model=str(tiny_model),
            candidate_dir=adapter("cand", 1),
            production_dir=adapter("prod", 2),
            val_file=str(tmp_path / "val.jsonl"),
            output_file=str(tmp_path / "eval.json"),
            groups=groups,
            generate=False,
            max_length=128,
        )
    )
    got = out["history_groups"]
    assert [g["items"] for g in got] == [3, 4]
    for g in got:
        assert g["increase"] == pytest.approx(g["candidate"] - g["production"]) and g["diff_sd"] > 0
        assert g["candidate"] != g["production"] and g["base"] > 0
    Metrics.model_validate({k: out[k] for k in ("base", "candidate", "production", "history_groups")})


def test_forgetting_per_group_is_logged_to_the_candidates_mlflow_run(registry):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from ftops.model.tasks import _log_evaluation

    uri = registry["env"].mlflow_uri
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(f"ftops-log-{os.getpid()}"))
    m = hand_off([group(D1, 1.06, 0.081, sd=0.3), group(D2, 0.5, 0.49)])
    fenced = []  # the evaluate task's try checks its fence before writing to MLflow
    stand_in = SimpleNamespace(registry=lambda: Registry(uri), check_fence=fenced.append)
    _log_evaluation(stand_in, run.info.run_id, m)
    assert fenced == ["evaluation metrics"]
    got = client.get_run(run.info.run_id).data.metrics
    assert got["forgetting.max"] == pytest.approx(0.979)
    assert got[f"history_loss.{D1[:15]}.candidate"] == 1.06 and got[f"history_loss.{D2[:15]}.production"] == 0.49
    assert got[f"forgetting.{D2[:15]}"] == pytest.approx(0.01) and got["repetition.candidate"] == 0.0
