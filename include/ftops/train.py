"""Train: one LoRA adapter with TRL's SFTTrainer + PEFT, as a command (`ftops train --config RUN.json`).

Airflow runs it in a subprocess (the worker gets its memory back); a GPU worker or a container on a
cluster runs the same command unchanged. It reads the run file, trains on assistant tokens only, logs
parameters and per-step loss to MLflow, checks the adapter is servable (LoRA weights only), uploads it
write-once to `<root>/<customer>/adapters/<base>/<version>/` and writes `result.json` beside the run file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TrainArgs:
    customer: str
    base_model: str  # local folder
    base_model_slug: str
    adapter_version: str
    train_file: str
    val_file: str
    output_dir: str
    storage_root: str
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: float = 3
    max_steps: int = -1
    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    seed: int = 42
    mlflow_uri: str = ""
    mlflow_experiment: str = "ftops"
    run_name: str = ""
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # extra lineage to log (dataset version, replay share...)
    dataset_name: str = ""  # `<customer>@<dataset version>`, logged as the run's input
    dataset_uri: str = ""
    dataset_dir: str = ""  # manifest and validation report of the snapshot, logged as artifacts

    @classmethod
    def load(cls, path: str | Path) -> TrainArgs:
        return cls(**json.loads(Path(path).read_text()))


class UnservableAdapter(RuntimeError):
    """The adapter holds weights other than LoRA matrices (vLLM cannot load those)."""


def check_servable(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    extra = [k for k in keys if "lora_A" not in k and "lora_B" not in k]
    if extra:
        raise UnservableAdapter(f"adapter holds non-LoRA weights vLLM cannot serve: {extra[:5]}")
    return len(keys)


def _mlflow_callback(log_metrics):
    from transformers import TrainerCallback

    class MlflowLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and k != "epoch"}
            if metrics:
                log_metrics(metrics, step=state.global_step)

    return MlflowLoss()


def _log_dataset(mlflow, args: TrainArgs, rows: list[dict]) -> None:
    """Lineage: the training mix as the run's input, and the snapshot's manifest and validation report."""
    import pandas as pd

    if args.dataset_name:
        frame = pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]})
        dataset = mlflow.data.from_pandas(frame, source=args.dataset_uri or None, name=args.dataset_name)
        mlflow.log_input(dataset, context="training")
    if args.dataset_dir:
        mlflow.log_artifacts(args.dataset_dir, artifact_path="dataset")


def train(args: TrainArgs) -> dict:
    import mlflow
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftops.snapshot import read_jsonl
    from ftops.storage import Store

    out = Path(args.output_dir)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    rows = [{"messages": r["messages"]} for r in read_jsonl(Path(args.train_file).read_bytes())]
    val = [{"messages": r["messages"]} for r in read_jsonl(Path(args.val_file).read_bytes())]
    config = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_length=args.max_length,
        assistant_only_loss=True,
        logging_steps=1,
        eval_strategy="epoch" if val else "no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32},
    )
    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        task_type="CAUSAL_LM",
    )
    mlflow.set_tracking_uri(args.mlflow_uri)
    mlflow.set_experiment(args.mlflow_experiment)
    with mlflow.start_run(run_name=args.run_name or f"{args.customer}-{args.adapter_version}", tags=args.tags) as run:
        mlflow.log_params({k: v for k, v in asdict(args).items() if k not in ("tags", "params")} | args.params)
        _log_dataset(mlflow, args, rows)
        trainer = SFTTrainer(
            model=args.base_model,
            args=config,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(val) if val else None,
            peft_config=peft_config,
            callbacks=[_mlflow_callback(mlflow.log_metrics)],
        )
        started = time.time()
        stats = trainer.train()
        seconds = time.time() - started
        adapter_dir = out / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        n_tensors = check_servable(adapter_dir)
        eval_loss = trainer.evaluate()["eval_loss"] if val else None
        tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
        result = {
            "train_loss": stats.training_loss,
            "eval_loss": eval_loss,
            "steps": trainer.state.global_step,
            "seconds": seconds,
            "examples": len(rows),
            "tokens_seen": tokens,
            "lora_tensors": n_tensors,
            "mlflow_run_id": run.info.run_id,
            "device": "cuda" if cuda else "cpu",
        }
        mlflow.log_metrics(
            {"final_train_loss": stats.training_loss, "train_seconds": seconds}
            | ({"final_eval_loss": eval_loss} if eval_loss is not None else {})
        )
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        prefix = f"{args.customer}/adapters/{args.base_model_slug}/{args.adapter_version}"
        result["adapter_uri"] = Store(args.storage_root).upload_dir(adapter_dir, prefix)
        result["adapter_artifact_uri"] = f"{run.info.artifact_uri}/adapter"
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
