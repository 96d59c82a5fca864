"""Behaviour the README promises that the bigger end-to-end tests do not reach on their own: the rank limit
of the replicas is reported, an adapter with anything but LoRA matrices is refused before it is uploaded,
and training on S3 (a real SeaweedFS server) leaves its checkpoints and the adapter there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import trained_hand_off
from ftops.release.serving import Desired, Plan, reconcile
from ftops.storage import Store


def test_a_rank_above_the_replicas_limit_is_reported_and_not_loaded(tmp_path):
    d = Desired("acme", "3", "v3", "acme/adapters/tiny/v3", "0" * 64, rank=64)
    report = reconcile(Plan(serve=[d], customers={"acme"}), [], tmp_path, Store(str(tmp_path / "s")), max_rank=16)
    assert report.errors == ["acme: LoRA rank 64 exceeds the replicas' --max-lora-rank 16"]
    assert not (tmp_path / "acme").exists()  # nothing copied for it


def test_an_adapter_holding_more_than_lora_matrices_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ftops.model.train import UnservableAdapter, check_servable

    lora = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(8, 16)}
    save_file(lora, tmp_path / "adapter_model.safetensors")
    assert check_servable(tmp_path) == 1
    save_file(lora | {"base_model.model.lm_head.weight": torch.zeros(4, 16)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnservableAdapter, match="lm_head"):
        check_servable(tmp_path)


def test_training_on_s3_keeps_checkpoints_and_the_adapter_there(s3_server, tiny_model, mlflow_server, tmp_path):
    import random

    from ftops.data.demo import example
    from ftops.data.snapshot import _jsonl
    from ftops.model.train import TrainArgs, train

    rng = random.Random(0)
    rows = [example("brightdesk", rng)[1:] for _ in range(30)]
    data = tmp_path / "train.jsonl"
    data.write_bytes(
        _jsonl({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in rows)
    )
    root = "s3://ftops/promises"
    args = TrainArgs(
        customer="brightdesk",
        base_model=str(tiny_model),
        base_model_slug="tiny",
        adapter_version="s3-v1",
        train_file=str(data),
        val_file=str(data),
        output_dir=str(tmp_path / "out"),
        storage_root=root,
        max_steps=4,
        save_steps=2,
        batch_size=4,
        max_length=128,
        checkpoint_prefix="brightdesk/runs/promises/checkpoints",
        mlflow_uri=os.environ["MLFLOW_TRACKING_URI"],
    )
    result = train(args)
    s3 = Store(root)
    keys = s3.list("brightdesk")
    assert "brightdesk/adapters/tiny/s3-v1/adapter_model.safetensors" in keys
    assert result["adapter_uri"] == f"{root}/brightdesk/adapters/tiny/s3-v1"
    assert any(k.endswith("checkpoint-2/COMPLETE") for k in keys), keys[:20]
    assert not Path(root).exists()  # nothing went to a local folder named like the bucket


def test_evaluation_scores_only_the_stored_adapter_byte_for_byte(home):
    """A copy of the candidate that differs from the stored adapter (a worker's stale copy from an earlier try, a
    disk fault) is never scored: evaluation stops before loading anything."""
    from ftops.model import tasks as model
    from ftops.run import Run
    from ftops.storage import adapter_prefix

    run = Run("brightdesk", "manual__bytes", "finetune_brightdesk")
    prefix = adapter_prefix(run.id, run.base_slug, "20261130T000000-bytes")
    run.store.put(f"{prefix}/adapter_model.safetensors", b"the registered weights", overwrite=True)
    run.store.put(f"{prefix}/adapter_config.json", b"{}", overwrite=True)
    kept = run.env.vllm_adapter_dir / ".eval" / run.id / run.key / "candidate" / "20261130T000000-bytes"
    kept.mkdir(parents=True, exist_ok=True)
    (kept / "adapter_config.json").write_bytes(b"{}")
    (kept / "adapter_model.safetensors").write_bytes(b"the registered weights, then a flipped bit")
    trained = trained_hand_off("20261130T000000-bytes", prefix, run.store.uri(prefix))
    with pytest.raises(RuntimeError, match="candidate copy differs from"):
        model.evaluate(run, trained)
    assert not run.store.exists(f"{run.scratch}/eval.json")
