"""Benchmark training throughput against what a TRL user gets, on the same length-skewed chat data, in one
run, on the tiny test model and on SmolLM2-135M (short run). Setups, all with the same hyper-parameters and
assistant-only loss:
- `trl_default`: `SFTConfig` as it comes (no packing: TRL's collator pads each batch to its longest row);
- `trl_packing`: `SFTConfig(packing=True)` with TRL's own default strategy;
- `ours`: `ftops.model.train.sft_config` (packing, best-fit decreasing, padding-free, block-diagonal attention).
TRL 1.16's default packing strategy is BFD, which is what we use: `ours` and `trl_packing` are the same
configuration, so their ratio measures the noise of this machine, and the gain is the packing itself.
On a CUDA machine the same script reports the GPU figures (bf16).

    .venv/bin/python bench/train_efficiency.py [--examples 256] [--smollm-examples 48]

Each (model, setup) trains in its own subprocess, so peak memory (max RSS, and CUDA peak when present)
is its own. Tokens/s counts real (non-padding) tokens; the padding share is measured from what the
model's forward actually received. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("trl_default", "trl_packing", "ours")
WORDS = (
    "the contract notice clause refund account invoice export ticket appointment vaccine lease "
    "please check review settings dashboard billing support clinic counsel note team"
).split()


def chat_data(n: int, seed: int = 0) -> list[dict]:
    """Length-skewed like real chat logs: most answers short, a long tail (log-normal word counts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(min(400, max(3, int(rng.lognormvariate(3.3, 0.9))))))
        rows.append({"messages": [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a}]})
    return rows


def run_one(model_dir: str, setup: str, n: int, max_length: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from ftops.model.train import TrainArgs, sft_config

    assert setup in SETUPS, setup

    cuda = torch.cuda.is_available()
    rows = chat_data(n)
    with tempfile.TemporaryDirectory() as out:
        args = TrainArgs(
            customer="bench",
            base_model=model_dir,
            base_model_slug="bench",
            adapter_version="b",
            train_file="",
            val_file="",
            output_dir=out,
            storage_root=out,
            epochs=1,
            batch_size=batch,
            max_length=max_length,
            learning_rate=1e-4,
            padding_free=setup == "ours",
        )
        config = sft_config(args, False, cuda)
        if setup == "trl_packing":  # TRL's packing as a user turns it on: its own default strategy
            from trl import SFTConfig

            config.packing, config.packing_strategy = True, SFTConfig.packing_strategy
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        from peft import LoraConfig

        trainer = SFTTrainer(
            model=model_dir,
            args=config,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=args.target_modules, task_type="CAUSAL_LM"),
        )
        seen = {"positions": 0, "real": 0}

        def count(_module, _args, kwargs):
            ids = kwargs["input_ids"]
            seen["positions"] += ids.numel()
            mask = kwargs.get("attention_mask")
            seen["real"] += int(mask.sum()) if mask is not None else ids.numel()

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": round(seen["real"] / seconds, 1),
        "non_padding_share": round(seen["real"] / seen["positions"], 4),
        "real_tokens": seen["real"],
        "positions": seen["positions"],
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "device": "cuda" if cuda else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--smollm-examples", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        model_dir, setup, n, max_length, batch = a.one
        print(json.dumps(run_one(model_dir, setup, int(n), int(max_length), int(batch))))
        return
    from ftops.model.base_models import build_tiny, convert_smollm2

    home = Path(tempfile.mkdtemp(prefix="bench-train-"))
    models = {"tiny": (str(build_tiny(home / "tiny")), a.examples, 8)}
    smollm = ROOT / ".ftops" / "models" / "smollm2-135m-instruct"
    models["smollm2-135m"] = (str(convert_smollm2(smollm)), a.smollm_examples, 4)
    figures: dict = {"max_length": a.max_length, "cores": os.cpu_count()}
    for name, (path, n, batch) in models.items():
        for setup in SETUPS:
            cmd = [sys.executable, __file__, "--one", path, setup, str(n), str(a.max_length), str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            figures[f"{name}_{setup}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, setup, figures[f"{name}_{setup}"], file=sys.stderr)
        for baseline in ("trl_default", "trl_packing"):
            figures[f"{name}_speedup_vs_{baseline}"] = round(
                figures[f"{name}_ours"]["tokens_per_s"] / figures[f"{name}_{baseline}"]["tokens_per_s"], 2
            )
    # The headline keys: SmolLM2, real (non-padding) tokens per second.
    figures["speedup_vs_trl_default"] = figures["smollm2-135m_speedup_vs_trl_default"]
    figures["speedup_vs_trl_packing"] = figures["smollm2-135m_speedup_vs_trl_packing"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
