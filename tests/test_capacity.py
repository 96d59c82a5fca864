"""The capacity plan: the adapter size it assumes is the size PEFT actually writes, and its figures follow the
formulas it prints (checked here by hand-worked numbers, not by calling the planner twice)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftops.operate.capacity import PlanInputs, adapter_bytes, model_config, plan

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_adapter_size_matches_what_peft_saves(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=MODULES)).save_pretrained(tmp_path)
    saved = (tmp_path / "adapter_model.safetensors").stat().st_size
    predicted = adapter_bytes(model_config(tiny_model), 8, MODULES)
    assert predicted <= saved <= predicted + 64 * 1024  # the file adds a JSON header only


def test_plan_for_500_customers_by_hand():
    # 500 weekly -> ceil(500/7) = 72 trainings on the busiest day; 72 x 30 min = 2160 GPU-minutes;
    # a GPU day at 60 % = 864 minutes -> ceil(2.5) = 3 workers. 40 rps at 15 rps per replica -> 3 replicas.
    out = plan(PlanInputs(customers=500, train_minutes=30, peak_rps=40, replica_rps=15, adapter_mb=10))
    assert out["gpu_workers"] == 3 and out["vllm_replicas"] == 3
    assert out["adapter_memory_per_replica_mb"] == 5020.0  # (500 + 2) x 10 MB
    # 500 x 52 x 3024 B = 78.6 MB datasets + 52 x 10 MB adapters + 52 x 60 MB checkpoints = 3718.6 MB
    assert out["storage_per_customer_mb"] == pytest.approx(3718.6, abs=0.1)
    daily = plan(PlanInputs(customers=500, train_minutes=30, cadence="daily", adapter_mb=10))
    assert daily["gpu_workers"] == 18  # ceil(500 x 30 / 864) = ceil(17.4)


@pytest.mark.parametrize("bad", [{"customers": 0}, {"train_minutes": 0}, {"cadence": "hourly"}, {"utilization": 0}])
def test_plan_refuses_bad_inputs(bad):
    with pytest.raises(ValueError):
        plan(PlanInputs(**({"customers": 50, "train_minutes": 20} | bad)))


def test_cli_prints_the_plan_with_its_formulas(home, tiny_model):
    cmd = [sys.executable, "-m", "ftops.cli", "serving", "capacity", "--customers", "50"]
    out = json.loads(subprocess.run([*cmd, "--train-minutes", "20", "--json"], check=True, capture_output=True).stdout)
    assert out["gpu_workers"] == 1 and out["vllm_replicas"] == 2  # ceil(8 x 20 / 864) = 1
    assert any(f.startswith("GPU workers = ceil(8 x 20.0 min") for f in out["formulas"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "--train-minutes" in r.stderr
