"""Training on the tiny model with real TRL + PEFT: a killed training resumes from its last checkpoint in
object storage, continuing the same MLflow run; DPO after SFT. (Replay against forgetting, over drops and seeds:
tests/test_continual.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftops.data import snapshot as snap
from ftops.data.dedupe import dedupe
from ftops.data.demo import write_batch
from ftops.data.ingest import ingest
from ftops.model.train import TrainArgs, check_servable, train
from ftops.storage import StaleTry, Store


def dataset(store: Store, customer_style: str, tmp: Path, n: int, batch: int = 0) -> str:
    """Snapshot one upload of a demo customer's style as a dataset version of customer `acme`."""
    inbox = write_batch(customer_style, tmp / f"inbox-{customer_style}-{batch}", n=n, batch=batch, dirty=False).parent
    b = ingest(str(inbox), set())
    history, _, manifests = snap.load_history(store, "acme")
    b, keys, sigs = dedupe(b, history)
    parent = manifests[-1]["version"] if manifests else None
    return snap.write(store, "acme", b, keys, sigs, {}, "", parent, 0.2).version


def args_for(tmp: Path, tiny_model, store_root: str, rows, val, name: str, **kw) -> TrainArgs:
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_bytes(snap._jsonl(rows))
    (work / "val.jsonl").write_bytes(snap._jsonl(val))
    base = dict(
        customer="acme",
        base_model=str(tiny_model),
        base_model_slug="tiny",
        adapter_version=name,
        train_file=str(work / "train.jsonl"),
        val_file=str(work / "val.jsonl"),
        output_dir=str(work / "out"),
        storage_root=store_root,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        learning_rate=5e-3,
        batch_size=8,
        max_length=128,
        max_steps=40,
        dropout=0.0,
        mlflow_uri=os.environ["MLFLOW_TRACKING_URI"],
    )
    return TrainArgs(**(base | kw))


def test_killed_training_resumes_from_last_checkpoint(tmp_path, tiny_model, mlflow_server):
    store = Store(str(tmp_path / "root"))
    v = dataset(store, "brightdesk", tmp_path, 80)
    rows, val, _ = snap.training_mix(store, "acme", [v], [], 0.2, 0)
    args = args_for(
        tmp_path,
        tiny_model,
        store.root,
        rows,
        val,
        "resume",
        max_steps=400,
        save_steps=20,
        checkpoint_prefix="acme/runs/r1/checkpoints",
    )
    config = tmp_path / "run.json"
    config.write_text(args.dump())
    cmd = [sys.executable, "-m", "ftops.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not any(k.endswith("/COMPLETE") for k in store.list("acme/runs/r1/checkpoints")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker is lost mid-training
    proc.wait()
    assert not (Path(args.output_dir) / "result.json").exists()
    saved = max(
        int(k.split("checkpoint-")[1].split("/")[0])
        for k in store.list("acme/runs/r1/checkpoints")
        if k.endswith("/COMPLETE")
    )
    first_run = store.get("acme/runs/r1/checkpoints/mlflow_run_id").decode()

    subprocess.run(cmd, check=True, capture_output=True)  # the task's retry: same run file
    result = json.loads((Path(args.output_dir) / "result.json").read_text())
    assert result["resumed_from_step"] >= saved >= 20 and result["steps"] == 400
    assert result["mlflow_run_id"] == first_run  # the same MLflow run continues
    from mlflow import MlflowClient

    history = MlflowClient(mlflow_server.url).get_metric_history(first_run, "loss")
    assert min(m.step for m in history) == 1 and max(m.step for m in history) == 400
    assert check_servable(Path(args.output_dir) / "adapter") > 0
    assert store.exists("acme/adapters/tiny/resume/adapter_model.safetensors")


def test_preference_pairs_run_dpo_after_sft_and_widen_the_margin(tmp_path, tiny_model, mlflow_server):
    import random

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftops.data.demo import example
    from ftops.model.evaluate import _loss

    rng = random.Random(1)
    rude = ["No. Figure it out yourself.", "Not my problem, read the manual.", "We do not do that. Goodbye."]
    rows = []
    for i in range(60):
        _, question, reply = example("brightdesk", rng)
        rows.append(
            {
                "id": f"p{i}",
                "messages": [{"role": "user", "content": f"{question} #{i}"}, {"role": "assistant", "content": reply}],
                "rejected": rng.choice(rude),
            }
        )
    held_out = rows[50:]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def margin(adapter: Path) -> float:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter)
        ).eval()
        rejected = [
            {"messages": r["messages"][:-1] + [{"role": "assistant", "content": r["rejected"]}]} for r in held_out
        ]
        return _loss(model, tokenizer, rejected, 128) - _loss(model, tokenizer, held_out, 128)

    store = str(tmp_path / "root")
    sft_only = train(args_for(tmp_path, tiny_model, store, rows[:50], held_out, "sft", max_steps=20, dpo_max_steps=0))
    both = train(
        args_for(
            tmp_path,
            tiny_model,
            store,
            rows[:50],
            held_out,
            "dpo",
            max_steps=20,
            dpo_max_steps=30,
            dpo_learning_rate=5e-3,
        )
    )
    assert "dpo_steps" not in sft_only and both["dpo_steps"] == 30 and both["dpo_pairs"] == 50
    assert both["dpo_reward_margin_last"] > both["dpo_reward_margin_first"]
    assert margin(tmp_path / "dpo" / "out" / "adapter") > margin(tmp_path / "sft" / "out" / "adapter")


def test_a_lost_try_still_training_is_fenced_off_once_its_retry_claims(tmp_path, tiny_model, mlflow_server):
    """The orphan: a training whose task try was declared lost but whose process lives on. Once the retry claims
    the task's fence, the orphan's next write (checkpoint, MLflow metrics, adapter) is refused and it stops."""
    from ftops.storage import Fence

    store = Store(str(tmp_path / "root"))
    v = dataset(store, "brightdesk", tmp_path, 80)
    rows, val, _ = snap.training_mix(store, "acme", [v], [], 0.2, 0)
    fence_key = "acme/runs/r2/tries/train"
    Fence(store, fence_key, 1).claim()
    args = args_for(
        tmp_path, tiny_model, store.root, rows, val, "orphan", max_steps=400, save_steps=20,
        checkpoint_prefix="acme/runs/r2/checkpoints", result_key="acme/runs/r2/train-result.json",
        fence_key=fence_key, fence_try=1, fence_label="acme train",
    )  # fmt: skip
    config = tmp_path / "orphan.json"
    config.write_text(args.dump())
    cmd = [sys.executable, "-m", "ftops.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(k.endswith("/COMPLETE") for k in store.list("acme/runs/r2/checkpoints")):
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
        Fence(store, fence_key, 2).claim()  # the retry starts elsewhere
        claimed_at = max(steps(store, "acme/runs/r2/checkpoints"))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "StaleTry" in err.decode() and "try 1 is stale (the fence names try 2)" in err.decode()
    assert store.get(f"{fence_key}.refused-1").decode().startswith("acme train: try 1 is stale")
    # At most the one checkpoint that was being written when the retry claimed.
    assert max(steps(store, "acme/runs/r2/checkpoints")) <= claimed_at + 20 < 400
    assert not store.exists(args.result_key) and not store.list("acme/adapters/tiny/orphan")
    # A try that is already stale when it starts trains nothing, not even an MLflow run.
    with pytest.raises(StaleTry):
        train(args.model_copy(update={"output_dir": str(tmp_path / "late")}))
    assert not (tmp_path / "late").exists()


def steps(store: Store, prefix: str) -> list[int]:
    """The steps of the complete checkpoints under a prefix."""
    return [int(k.split("checkpoint-")[1].split("/")[0]) for k in store.list(prefix) if k.endswith("/COMPLETE")]
