"""Train: one LoRA adapter with TRL's SFTTrainer + PEFT, as a command (`ftops train --config RUN.json`).

Airflow runs it in a subprocess (the worker gets its memory back); a GPU worker or a container on a
cluster runs the same command unchanged: CUDA with bf16 when present, else the CPU settings that work.
The LoRA and training settings are the customers file's own models (`ftops.config.LoraSettings`,
`TrainingSettings`): no second set of defaults. It trains on assistant tokens only, and picks the batching
that is fastest on the device without changing what a step learns (`choose_batching`), and:
- checkpoints every `save_steps` to object storage; a killed run started again with the same run file
  resumes from the last complete checkpoint and continues the same MLflow run;
- can continue from an existing adapter (the customer's production one) instead of starting fresh;
- when the data holds preference pairs (`prompt`/`chosen`/`rejected`), runs DPO (TRL) after SFT on
  the same adapter;
- logs parameters (the batching chosen among them), per-step loss, periodic validation loss and tokens
  seen to MLflow, with the dataset as the run's input;
- refuses an adapter vLLM could not serve (anything but LoRA matrices), then uploads it write-once to
  `<root>/<customer>/adapters/<base>/<version>/` and writes `result.json` beside the run file.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from ftops.config import LoraSettings, TrainingSettings


class TrainArgs(BaseModel):
    """One training run, as the pipeline writes it to the run file. `lora` and `training` are the customer's
    settings from the customers file, as they are; a LoRA or training setting may also be given by its own name
    (`TrainArgs(..., max_steps=4)`): it lands in those models and is validated there."""

    model_config = ConfigDict(extra="forbid")

    customer: str
    base_model: str  # local folder
    base_model_slug: str
    adapter_version: str
    train_file: str
    val_file: str
    output_dir: str
    storage_root: str
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    # "auto": the fastest batching measured for the device (`choose_batching`); logged as the `batching` param.
    batching: Literal["auto", "length_grouped", "varlen_packed"] = "auto"
    init_adapter: str = ""  # continue from this adapter folder instead of a fresh LoRA
    eval_steps: int = 0  # 0: evaluate once per epoch
    checkpoint_prefix: str = ""  # storage prefix for resumable checkpoints; empty: no checkpoints
    result_key: str = ""  # storage key the result is written to once the adapter is uploaded (retries read it)
    # The task try's fence (`ftops.storage.Fence`): every write to storage and MLflow checks it first, so a lost
    # try that is still running cannot write over its retry's checkpoints, adapter or metrics.
    fence_key: str = ""
    fence_try: int = 0
    fence_label: str = ""
    mlflow_uri: str = ""
    mlflow_experiment: str = "ftops"
    run_name: str = ""
    tags: dict = {}
    params: dict = {}  # extra lineage to log (dataset version, replay share...)
    dataset_name: str = ""  # `<customer>@<dataset version>`, logged as the run's input
    dataset_uri: str = ""
    dataset_dir: str = ""  # manifest and validation report of the snapshot, logged as artifacts

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, model in (("lora", LoraSettings), ("training", TrainingSettings)):
            flat = {k: data.pop(k) for k in list(data) if k in model.model_fields}
            if flat:
                given = data.get(key, {})
                given = given.model_dump() if isinstance(given, BaseModel) else dict(given)
                data[key] = given | flat
        return data

    @classmethod
    def load(cls, path: str | Path) -> TrainArgs:
        return cls.model_validate_json(Path(path).read_text())

    def dump(self) -> str:
        return self.model_dump_json(indent=2)


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


def fenced(log_metrics, fence):
    """`log_metrics` that first checks the try's fence (a lost try logs nothing into its retry's MLflow run)."""
    if fence is None:
        return log_metrics

    def log(metrics, step=None):
        fence.check("MLflow metrics")
        log_metrics(metrics, step=step)

    return log


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


def run_params(args: TrainArgs, batching: str) -> dict:
    """MLflow params of a run: the customer's LoRA and training settings by their customers-file names, the
    batching chosen for the device, and the run's own fields."""
    own = args.model_dump(exclude={"lora", "training", "tags", "params"}) | {"batching": batching}
    lora = {f"lora.{k}": v for k, v in args.lora.model_dump().items()}
    return own | lora | {f"training.{k}": v for k, v in args.training.model_dump().items()}


def _log_dataset(mlflow, args: TrainArgs, rows: list[dict]) -> None:
    """Lineage: the training mix as the run's input, and the snapshot's manifest and validation report."""
    import pandas as pd

    if args.dataset_name:
        frame = pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]})
        dataset = mlflow.data.from_pandas(frame, source=args.dataset_uri or None, name=args.dataset_name)
        mlflow.log_input(dataset, context="training")
    if args.dataset_dir:
        mlflow.log_artifacts(args.dataset_dir, artifact_path="dataset")


def choose_batching(args: TrainArgs, cuda: bool) -> str:
    """The batching for this device; both keep every example whole and its loss its own (tests/test_batching.py).

    - `length_grouped` (CPU): each step takes `batch_size` examples, as TRL's default does, but of near-equal
      length (`LengthBucketSampler`), padded to the longest; the LM head scores only assistant positions. On this
      CPU, cost is linear in positions and attention is short: padding is what wastes time, and packing rows to
      `max_length` costs more in block-diagonal attention over long rows than it saves (bench/train_efficiency.py).
    - `varlen_packed` (CUDA with flash-attention installed): TRL's best-fit packing to `max_length`, padding-free,
      flash-attention's variable-length kernel keeps examples apart at no cost. A step then holds `batch_size`
      rows of up to `max_length` tokens, so more examples than `batch_size`. Untested here: no GPU machine.
    """
    if args.batching != "auto":
        return args.batching
    if cuda:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "varlen_packed"
    return "length_grouped"


def sft_config(args: TrainArgs, has_val: bool, cuda: bool, batching: str = "length_grouped"):
    import torch
    from trl import SFTConfig

    t = args.training
    packed = batching == "varlen_packed"
    return SFTConfig(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        # Every training (each weekly version) re-warms to the peak LR and re-decays to 0: the recipe of Ibrahim
        # et al. 2024 for continual training; bench/continual.py measures the warm-up share.
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of the steps in transformers 5
        max_length=t.max_length,
        assistant_only_loss=True,
        packing=packed,
        packing_strategy="bfd",
        # Our sampler replaces this strategy's (see LengthBucketSampler); the name says what the run does.
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random",
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        eval_strategy=("steps" if args.eval_steps else "epoch") if has_val else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.checkpoint_prefix else "no",
        save_steps=t.save_steps,
        save_total_limit=2,
        report_to="none",
        seed=t.seed,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32}
        | ({"attn_implementation": "flash_attention_2"} if packed else {}),
    )


class LengthBucketSampler:
    """Training order in which each run of `batch_size` indices holds examples of near-equal length.

    transformers' `get_length_grouped_indices` (random mega-batches of 50 batches, sorted by length inside) but
    with the mega-batch never shrunk for a small dataset (transformers' sampler shrinks it to a quarter of the
    data, leaving ~20 % padding on 48 examples), and the batches' order shuffled so that an epoch does not run
    from long to short. The last, partial batch stays last: the dataloader cuts the stream every `batch_size`.
    Uses torch's global generator, which the Trainer seeds: the order is reproducible and differs per epoch."""

    MEGA_BATCHES = 50

    def __init__(self, lengths: list[int], batch_size: int):
        self.lengths, self.batch_size = lengths, batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=self.MEGA_BATCHES)
        n_full = len(order) // self.batch_size
        # Mega-batches are whole batches but the last: the partial batch is the stream's tail, and stays there.
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_full)]
        shuffled = [i for b in torch.randperm(n_full).tolist() for i in batches[b]]
        return iter(shuffled + order[n_full * self.batch_size :])


def sft_trainer(args: TrainArgs, cuda: bool, batching: str, **kw):
    """TRL's SFTTrainer with this batching: on `length_grouped`, our length-bucketed order, and the LM head run only
    on assistant positions (TRL already does that on GPUs; on CPU it scores every position, prompt and padding
    included, then masks them: the 49k-wide projection of positions whose loss is thrown away)."""
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if batching != "length_grouped" or "input_ids" not in getattr(dataset, "column_names", ()):
                return super()._get_train_sampler(train_dataset)
            step = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthBucketSampler([len(x) for x in dataset["input_ids"]], step)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if batching != "length_grouped":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with _compact_lm_head():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return Trainer(args=sft_config(args, kw.get("eval_dataset") is not None, cuda, batching), **kw)


class _compact_lm_head:
    """While active, TRL's fused LM head gathers the labelled positions before projecting (its GPU path, plain torch
    on the chunked path it runs on CPU). Per-token results are the same; the saved work is the masked positions."""

    def __enter__(self):
        import trl.trainer.utils as trl_utils

        self._utils, self._saved = trl_utils, trl_utils._use_triton
        trl_utils._use_triton = lambda device: True
        return self

    def __exit__(self, *exc):
        self._utils._use_triton = self._saved


def dpo(args: TrainArgs, model, tokenizer, pairs: list[dict], cuda: bool, callbacks) -> dict:
    """Preference stage on the same adapter, after SFT. The reference is the base model (adapter disabled)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(Path(args.output_dir) / "dpo"),
        num_train_epochs=1,
        max_steps=args.training.dpo_max_steps,
        per_device_train_batch_size=args.training.batch_size,
        learning_rate=args.training.dpo_learning_rate,
        beta=args.training.dpo_beta,
        max_length=args.training.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.training.seed,
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


def _model(args: TrainArgs, cuda: bool, batching: str):
    """The base model's folder (TRL wraps it in a fresh LoRA), or the base with the adapter to continue from."""
    if not args.init_adapter:
        return args.base_model
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        args.base_model,
        dtype=torch.bfloat16 if cuda else torch.float32,
        **({"attn_implementation": "flash_attention_2"} if batching == "varlen_packed" else {}),
    )
    return PeftModel.from_pretrained(base, args.init_adapter, is_trainable=True)


def train(args: TrainArgs) -> dict:
    import mlflow
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from ftops.data.snapshot import read_jsonl
    from ftops.storage import Fence, Fenced, Store, adapter_prefix

    out = Path(args.output_dir)
    cuda = torch.cuda.is_available()
    batching = choose_batching(args, cuda)
    store = Store(args.storage_root)
    fence = Fence(store, args.fence_key, args.fence_try, args.fence_label) if args.fence_key else None
    if fence:
        fence.check("the start of training")  # nothing of a try already taken over starts (MLflow included)
        store = Fenced(store, fence)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    raw = read_jsonl(Path(args.train_file).read_bytes())
    rows = [{"messages": r["messages"]} for r in raw]
    pairs = [r for r in raw if r.get("rejected")]
    val = [{"messages": r["messages"]} for r in read_jsonl(Path(args.val_file).read_bytes())]
    checkpoints = Checkpoints(store, args.checkpoint_prefix, out) if args.checkpoint_prefix else None
    resume = checkpoints.latest() if checkpoints else None
    model = _model(args, cuda, batching)
    peft_config = (
        None
        if args.init_adapter
        else LoraConfig(
            r=args.lora.r,
            lora_alpha=args.lora.alpha,
            lora_dropout=args.lora.dropout,
            target_modules=list(args.lora.target_modules),
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
            mlflow.log_params(run_params(args, batching) | args.params)
            _log_dataset(mlflow, args, rows)
        trainer = sft_trainer(
            args,
            cuda,
            batching,
            model=model,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(val) if val else None,
            peft_config=peft_config,
            callbacks=_callbacks(fenced(mlflow.log_metrics, fence), checkpoints),
        )
        started = time.time()
        stats = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        preference = {}
        if pairs and args.training.dpo_max_steps != 0:
            preference = dpo(
                args,
                trainer.model,
                tokenizer,
                pairs,
                cuda,
                _dpo_callbacks(fenced(mlflow.log_metrics, fence), trainer.state.global_step),
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
            "batching": batching,
        } | preference
        if fence:
            fence.check("the MLflow run's final metrics and adapter")
        mlflow.log_metrics(
            {"final_train_loss": stats.training_loss, "train_seconds": seconds}
            | ({"final_eval_loss": eval_loss} if eval_loss is not None else {})
        )
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        prefix = adapter_prefix(args.customer, args.base_model_slug, args.adapter_version)
        result["adapter_uri"] = store.upload_dir(adapter_dir, prefix)
        result["adapter_artifact_uri"] = f"{run.info.artifact_uri}/adapter"
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if args.result_key:  # the adapter is complete in storage: a retry on any worker finds this and stops
        store.put(args.result_key, json.dumps(result, indent=2).encode(), overwrite=True)
    return result
