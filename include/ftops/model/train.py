"""Train: one LoRA adapter with TRL's SFTTrainer + PEFT, as a command (`ftops train --config RUN.json`).

Airflow runs it in a subprocess (the worker gets its memory back); a GPU worker or a container on a
cluster runs the same command unchanged: CUDA with bf16 when present, else the CPU settings that work.
It trains on assistant tokens only, padding-free (sequences of a batch are concatenated, with a
block-diagonal attention mask, so no compute goes to padding; examples are packed best-fit), and:
- checkpoints every `save_steps` to object storage; a killed run started again with the same run file
  resumes from the last complete checkpoint and continues the same MLflow run;
- can continue from an existing adapter (the customer's production one) instead of starting fresh;
- when the data holds preference pairs (`prompt`/`chosen`/`rejected`), runs DPO (TRL) after SFT on
  the same adapter;
- logs parameters, per-step loss, periodic validation loss and tokens seen to MLflow, with the dataset
  as the run's input;
- refuses an adapter vLLM could not serve (anything but LoRA matrices), then uploads it write-once to
  `<root>/<customer>/adapters/<base>/<version>/` and writes `result.json` beside the run file.
"""

from __future__ import annotations

import json
import re
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
    warmup_ratio: float = 0.0  # linear warm-up share of the steps; each version re-warms and re-decays (cosine)
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    seed: int = 42
    padding_free: bool = True
    init_adapter: str = ""  # continue from this adapter folder instead of a fresh LoRA
    dpo_max_steps: int = -1  # preference stage: -1 one epoch over the pairs, 0 off
    dpo_beta: float = 0.1
    dpo_learning_rate: float = 5e-5
    save_steps: int = 50
    eval_steps: int = 0  # 0: evaluate once per epoch
    checkpoint_prefix: str = ""  # storage prefix for resumable checkpoints; empty: no checkpoints
    result_key: str = ""  # storage key the result is written to once the adapter is uploaded (retries read it)
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


class Checkpoints:
    """Checkpoints of one training run in object storage; a checkpoint counts once its marker is written."""

    MARKER = "COMPLETE"

    def __init__(self, store, prefix: str, local: Path):
        self.store, self.prefix, self.local = store, prefix, local

    def latest(self) -> Path | None:
        steps = [
            int(m.group(1))
            for k in self.store.list(self.prefix)
            if (m := re.search(rf"/checkpoint-(\d+)/{self.MARKER}$", k))
        ]
        if not steps:
            return None
        name = f"checkpoint-{max(steps)}"
        return self.store.download_dir(f"{self.prefix}/{name}", self.local / f"restored-{name}")

    def save(self, folder: Path) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.store.put(
                    f"{self.prefix}/{folder.name}/{path.relative_to(folder)}", path.read_bytes(), overwrite=True
                )
        self.store.put(f"{self.prefix}/{folder.name}/{self.MARKER}", b"", overwrite=True)

    def mlflow_run_id(self) -> str | None:
        key = f"{self.prefix}/mlflow_run_id"
        return self.store.get(key).decode() if self.store.exists(key) else None

    def remember_run(self, run_id: str) -> None:
        self.store.put(f"{self.prefix}/mlflow_run_id", run_id.encode(), overwrite=True)


def _callbacks(log_metrics, checkpoints: Checkpoints | None):
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and k != "epoch"}
            metrics["tokens_seen"] = state.num_input_tokens_seen
            log_metrics(metrics, step=state.global_step)

        def on_save(self, args, state, control, **kwargs):
            if checkpoints:
                checkpoints.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return [Track()]


def _log_dataset(mlflow, args: TrainArgs, rows: list[dict]) -> None:
    """Lineage: the training mix as the run's input, and the snapshot's manifest and validation report."""
    import pandas as pd

    if args.dataset_name:
        frame = pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]})
        dataset = mlflow.data.from_pandas(frame, source=args.dataset_uri or None, name=args.dataset_name)
        mlflow.log_input(dataset, context="training")
    if args.dataset_dir:
        mlflow.log_artifacts(args.dataset_dir, artifact_path="dataset")


def sft_config(args: TrainArgs, has_val: bool, cuda: bool):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        # Every training (each weekly version) re-warms to the peak LR and re-decays to 0: the recipe of Ibrahim
        # et al. 2024 for continual training; bench/continual.py measures the warm-up share.
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a share of the steps in transformers 5
        max_length=args.max_length,
        assistant_only_loss=True,
        # Best-fit-decreasing packing: whole examples share a row up to max_length, padding-free, with a
        # block-diagonal attention mask (no attention across examples). On length-skewed chat data it
        # removes almost all padding (see bench/train_efficiency.py).
        packing=args.padding_free,
        packing_strategy="bfd",
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        eval_strategy=("steps" if args.eval_steps else "epoch") if has_val else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.checkpoint_prefix else "no",
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to="none",
        seed=args.seed,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32},
    )


def dpo(args: TrainArgs, model, tokenizer, pairs: list[dict], cuda: bool, callbacks) -> dict:
    """Preference stage on the same adapter, after SFT. The reference is the base model (adapter disabled)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(Path(args.output_dir) / "dpo"),
        num_train_epochs=1,
        max_steps=args.dpo_max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.dpo_learning_rate,
        beta=args.dpo_beta,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
    )
    data = Dataset.from_list(
        [
            {
                "prompt": r["messages"][:-1],
                "chosen": [r["messages"][-1]],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in pairs
        ]
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    stats = trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {
        "dpo_loss": stats.training_loss,
        "dpo_steps": trainer.state.global_step,
        "dpo_pairs": len(pairs),
        "dpo_reward_margin_first": margins[0] if margins else None,
        "dpo_reward_margin_last": margins[-1] if margins else None,
    }


def _dpo_callbacks(log_metrics, offset: int):
    """DPO's own step counter restarts at 0: log under `dpo/` and after the SFT steps."""
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {f"dpo/{k}": v for k, v in (logs or {}).items() if isinstance(v, int | float) and k != "epoch"}
            log_metrics(metrics, step=offset + state.global_step)

    return [Track()]


def _model(args: TrainArgs, cuda: bool):
    """The base model's folder (TRL wraps it in a fresh LoRA), or the base with the adapter to continue from."""
    if not args.init_adapter:
        return args.base_model
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.bfloat16 if cuda else torch.float32)
    return PeftModel.from_pretrained(base, args.init_adapter, is_trainable=True)


def train(args: TrainArgs) -> dict:
    import mlflow
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from ftops.data.snapshot import read_jsonl
    from ftops.storage import Store

    out = Path(args.output_dir)
    cuda = torch.cuda.is_available()
    store = Store(args.storage_root)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    raw = read_jsonl(Path(args.train_file).read_bytes())
    rows = [{"messages": r["messages"]} for r in raw]
    pairs = [r for r in raw if r.get("rejected")]
    val = [{"messages": r["messages"]} for r in read_jsonl(Path(args.val_file).read_bytes())]
    checkpoints = Checkpoints(store, args.checkpoint_prefix, out) if args.checkpoint_prefix else None
    resume = checkpoints.latest() if checkpoints else None
    model = _model(args, cuda)
    peft_config = (
        None
        if args.init_adapter
        else LoraConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=args.target_modules,
            task_type="CAUSAL_LM",
        )
    )
    mlflow.set_tracking_uri(args.mlflow_uri)
    mlflow.set_experiment(args.mlflow_experiment)
    previous_run = checkpoints.mlflow_run_id() if checkpoints and resume else None
    with mlflow.start_run(
        run_id=previous_run,
        run_name=None if previous_run else (args.run_name or f"{args.customer}-{args.adapter_version}"),
        tags=args.tags,
    ) as run:
        if checkpoints:
            checkpoints.remember_run(run.info.run_id)
        if not previous_run:
            mlflow.log_params({k: v for k, v in asdict(args).items() if k not in ("tags", "params")} | args.params)
            _log_dataset(mlflow, args, rows)
        trainer = SFTTrainer(
            model=model,
            args=sft_config(args, bool(val), cuda),
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(val) if val else None,
            peft_config=peft_config,
            callbacks=_callbacks(mlflow.log_metrics, checkpoints),
        )
        started = time.time()
        stats = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        preference = {}
        if pairs and args.dpo_max_steps != 0:
            preference = dpo(
                args,
                trainer.model,
                tokenizer,
                pairs,
                cuda,
                _dpo_callbacks(mlflow.log_metrics, trainer.state.global_step),
            )
        seconds = time.time() - started
        adapter_dir = out / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        n_tensors = check_servable(adapter_dir)
        eval_loss = trainer.evaluate()["eval_loss"] if val else None
        result = {
            "train_loss": stats.training_loss,
            "eval_loss": eval_loss,
            "steps": trainer.state.global_step,
            "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else 0,
            "continued_from": args.init_adapter or None,
            "seconds": seconds,
            "examples": len(rows),
            "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
            "lora_tensors": n_tensors,
            "mlflow_run_id": run.info.run_id,
            "device": "cuda" if cuda else "cpu",
        } | preference
        mlflow.log_metrics(
            {"final_train_loss": stats.training_loss, "train_seconds": seconds}
            | ({"final_eval_loss": eval_loss} if eval_loss is not None else {})
        )
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        prefix = f"{args.customer}/adapters/{args.base_model_slug}/{args.adapter_version}"
        result["adapter_uri"] = store.upload_dir(adapter_dir, prefix)
        result["adapter_artifact_uri"] = f"{run.info.artifact_uri}/adapter"
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if args.result_key:  # the adapter is complete in storage: a retry on any worker finds this and stops
        store.put(args.result_key, json.dumps(result, indent=2).encode(), overwrite=True)
    return result
