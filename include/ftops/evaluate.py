"""Evaluate: score a candidate adapter against production and the base model on the same held-out items.

Run as a command (`ftops evaluate --config EVAL.json`), like training, so torch lives in a subprocess.
Measures, per model (base, production if any, candidate): token-weighted loss on assistant tokens of
the customer's validation examples (never trained on) and its perplexity, plus a greedy answer to the
customer's demo prompt for the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvalArgs:
    base_model: str
    candidate_dir: str
    val_file: str
    output_file: str
    production_dir: str | None = None
    prompts: list[str] = field(default_factory=list)
    max_length: int = 512
    max_new_tokens: int = 48

    @classmethod
    def load(cls, path: str | Path) -> EvalArgs:
        return cls(**json.loads(Path(path).read_text()))


def _loss(model, tokenizer, rows: list[dict], max_length: int) -> float:
    import torch

    total, count = 0.0, 0
    for row in rows:
        enc = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([enc["input_ids"][:max_length]])
        mask = torch.tensor([enc["assistant_masks"][:max_length]])
        labels = ids.masked_fill(mask == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        total += float(out.loss) * n
        count += n
    return total / count if count else float("nan")


def _answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def evaluate(args: EvalArgs) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftops.snapshot import read_jsonl

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, args.candidate_dir, adapter_name="candidate").eval()
    names = ["candidate"]
    if args.production_dir:
        model.load_adapter(args.production_dir, adapter_name="production")
        names.append("production")
    rows = read_jsonl(Path(args.val_file).read_bytes())
    results: dict[str, dict] = {}

    def score() -> dict:
        loss = _loss(model, tokenizer, rows, args.max_length)
        return {
            "val_loss": loss,
            "perplexity": math.exp(loss) if loss == loss else None,
            "answers": [_answer(model, tokenizer, p, args.max_new_tokens) for p in args.prompts],
        }

    with model.disable_adapter():
        results["base"] = score()
    for name in names:
        model.set_adapter(name)
        results[name] = score()
    results["val_examples"] = len(rows)
    Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results
