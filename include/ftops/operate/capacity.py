"""Capacity plan beyond one machine: GPU workers, vLLM replicas and storage for N customers.

Every number comes from an input (measured training minutes, request rate per replica) or from the model's
own shape (adapter size), and the plan prints each formula with its values, so an operator can check it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RUNS_PER_DAY = {"weekly": 1 / 7, "daily": 1.0}
# Module -> (fan-in, fan-out) in hidden (h), intermediate (i), attention (a = heads x head_dim) and key/value
# (kv = kv heads x head_dim) widths: the Llama-family names `lora.target_modules` uses.
SHAPES = {
    "q_proj": ("h", "a"),
    "k_proj": ("h", "kv"),
    "v_proj": ("h", "kv"),
    "o_proj": ("a", "h"),
    "gate_proj": ("h", "i"),
    "up_proj": ("h", "i"),
    "down_proj": ("i", "h"),
}


def adapter_bytes(config: dict, r: int, target_modules: list[str], bytes_per_param: int = 4) -> int:
    """A LoRA adapter's weights file size: r x (fan-in + fan-out) per targeted module per layer, fp32 (PEFT keeps
    adapter weights in fp32 even on a bf16 base)."""
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    width = {
        "h": config["hidden_size"],
        "i": config["intermediate_size"],
        "a": config["num_attention_heads"] * hd,
        "kv": config.get("num_key_value_heads", config["num_attention_heads"]) * hd,
    }
    per_layer = sum(r * (width[SHAPES[m][0]] + width[SHAPES[m][1]]) for m in target_modules)
    return per_layer * config["num_hidden_layers"] * bytes_per_param


@dataclass
class PlanInputs:
    customers: int
    train_minutes: float  # measured: one customer's training, on the GPU the workers have
    cadence: str = "weekly"
    utilization: float = 0.6  # share of a GPU day planned for trainings (retries, reruns, evaluation headroom)
    adapter_mb: float = 10.0
    peak_rps: float = 0.0  # requests per second at peak, all customers together
    replica_rps: float = 0.0  # measured per replica (bench/serving.py); 0: not sized by load
    min_replicas: int = 2  # one may restart or be replaced while the other serves
    examples_per_week: int = 500  # new examples per customer
    bytes_per_example: int = 2000  # stored bytes per kept example (JSONL, train/val split)
    minhash_perm: int = 128  # dedupe's MinHash signature per example (uint64 each), kept with the dataset
    retention_weeks: int = 52
    checkpoints_per_run: int = 2  # max_steps // save_steps: every checkpoint is uploaded to the run's scratch


def plan(p: PlanInputs) -> dict:
    if p.cadence not in RUNS_PER_DAY:
        raise ValueError(f"cadence must be one of {sorted(RUNS_PER_DAY)}, got {p.cadence!r}")
    if p.customers < 1 or p.train_minutes <= 0 or not 0 < p.utilization <= 1:
        raise ValueError("customers >= 1, train minutes > 0 and 0 < utilization <= 1 are required")
    per_day = p.customers * RUNS_PER_DAY[p.cadence]
    # Weekly slots are spread over the weekdays (schedule_weekday + a staggered 6-hour window): the busiest day
    # holds ceil(N/7) trainings, which must finish before the next day's batch starts.
    busiest_day = math.ceil(per_day)
    gpu_minutes = busiest_day * p.train_minutes
    gpu_workers = math.ceil(gpu_minutes / (24 * 60 * p.utilization))
    by_load = math.ceil(p.peak_rps / p.replica_rps) if p.replica_rps > 0 else 0
    replicas = max(p.min_replicas, by_load)
    resident_mb = (p.customers + 2) * p.adapter_mb  # --max-cpu-loras: every production adapter + 2 eval slots
    runs_per_year = RUNS_PER_DAY[p.cadence] * 7 * p.retention_weeks
    example_bytes = p.bytes_per_example + 8 * p.minhash_perm
    dataset_mb = p.examples_per_week * p.retention_weeks * example_bytes / 1e6
    adapters_mb = runs_per_year * p.adapter_mb  # every candidate is registered and kept (write-once)
    # A training's checkpoints in the run's scratch, each the adapter + Adam's two moments (fp32); nothing
    # removes a finished run's scratch yet (an S3 lifecycle rule on `*/runs/` would).
    checkpoint_mb = p.checkpoints_per_run * 3 * p.adapter_mb
    per_customer_mb = dataset_mb + adapters_mb + checkpoint_mb * runs_per_year
    return {
        "inputs": p.__dict__,
        "gpu_workers": gpu_workers,
        "vllm_replicas": replicas,
        "adapter_memory_per_replica_mb": round(resident_mb, 1),
        "storage_per_customer_mb": round(per_customer_mb, 1),
        "storage_total_gb": round(per_customer_mb * p.customers / 1e3, 1),
        "formulas": [
            f"trainings on the busiest day = ceil({p.customers} x {RUNS_PER_DAY[p.cadence]:.3f}/day) = {busiest_day}",
            f"GPU workers = ceil({busiest_day} x {p.train_minutes} min / (24 h x 60 x {p.utilization}))"
            f" = ceil({gpu_minutes:.0f} / {24 * 60 * p.utilization:.0f}) = {gpu_workers}",
            f"vLLM replicas = max({p.min_replicas} for availability, ceil({p.peak_rps} rps / {p.replica_rps} rps"
            f" per replica) = {by_load}) = {replicas}",
            f"adapters resident per replica = ({p.customers} + 2) x {p.adapter_mb} MB = {resident_mb:.0f} MB"
            " of host memory (--max-cpu-loras); GPU slots: --max-loras, adapters mixed per batch",
            f"storage per customer per {p.retention_weeks} weeks = datasets {p.examples_per_week}/week x"
            f" {p.retention_weeks} x ({p.bytes_per_example} B + {8 * p.minhash_perm} B MinHash) = {dataset_mb:.0f} MB"
            f" + adapters {runs_per_year:.0f} runs x {p.adapter_mb} MB = {adapters_mb:.0f} MB + checkpoints"
            f" {runs_per_year:.0f} x {p.checkpoints_per_run} x 3 x {p.adapter_mb} MB"
            f" = {checkpoint_mb * runs_per_year:.0f} MB"
            f" = {per_customer_mb:.0f} MB",
        ],
    }


def model_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def plan_for(platform, env, **inputs) -> dict:
    """`plan` for the customers file: the adapter size from the first customer's base model shape and LoRA
    settings (the defaults every customer starts from), its checkpoints per run from its training settings."""
    first = next(iter(platform.customers.values()))
    cfg = model_config(env.base_model_path(platform, first.base_model))
    adapter_mb = adapter_bytes(cfg, first.lora.r, first.lora.target_modules) / 1e6
    t = first.training
    out = plan(
        PlanInputs(
            adapter_mb=round(adapter_mb, 2),
            checkpoints_per_run=t.max_steps // t.save_steps if t.max_steps > 0 else 2,
            **inputs,
        )
    )
    adapter = (
        f"adapter {adapter_mb:.1f} MB ({first.base_model}, r={first.lora.r}, {len(first.lora.target_modules)} modules)"
    )
    return out | {"adapter": adapter}
