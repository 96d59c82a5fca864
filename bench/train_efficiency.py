"""Benchmark training throughput against what a TRL user gets, and against this machine's own limit.

Same length-skewed chat data, same LoRA (`ftops.config.LoraSettings()`, the platform's defaults), same
hyper-parameters (batch size, learning rate, max_length, one epoch), assistant-only loss, in one run:
- `trl_default`: `SFTConfig` as it comes, with the CPU flags DESIGN.md lists (`use_cpu=True, bf16=False,
  gradient_checkpointing=False`): TRL's collator pads each batch of randomly drawn examples to its longest row;
- `ours`: `ftops.model.train.sft_trainer` with the batching `choose_batching` picks for the device (printed as
  `batching`): on CPU, batches of near-equal length and the LM head run on assistant positions only.
Rounds are interleaved (the order alternates), each setup in its own subprocess, so peak memory is its own;
the figures are medians over the rounds. Tokens/s counts real (non-padding) tokens, read from what the model's
forward received.

Against the limit: each round also times fp32 GEMMs at the model's shapes (`peak_gflops`: the best of them) and
`mfu` = model FLOPs per second / that peak, with model FLOPs per example of n tokens, n_a of them scored:
    4·P·n + 6·P_lora·n + 4·V·d·n_a + 6·L·n(n+1)·d_attn
- 4·P·n: the frozen decoder's linear layers (P weights): forward 2·P·n, backward 2·P·n for the activations'
  gradients only (no weight gradients for frozen weights);
- 6·P_lora·n: LoRA's matrices, forward, activation and weight gradients;
- 4·V·d·n_a: the LM head (V×d) on the n_a positions whose next token is scored (forward and activation grads);
- 6·L·n(n+1)·d_attn: causal attention, QKᵀ and AV over the lower triangle (forward 2·n(n+1)·d_attn per layer,
  backward twice that), with d_attn = heads × head_dim.
Padding and attention across examples are not model FLOPs: they are the overhead this measures.

    .venv/bin/python bench/train_efficiency.py [--rounds 3] [--smollm-examples 48] [--tiny]
    .venv/bin/python bench/train_efficiency.py --quick      # tiny model only, 1 round: a smoke test

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("trl_default", "ours")
WORDS = (
    "the contract notice clause refund account invoice export ticket appointment vaccine lease "
    "please check review settings dashboard billing support clinic counsel note team"
).split()
LEARNING_RATE = 1e-4


def chat_data(n: int, seed: int = 0) -> list[dict]:
    """Length-skewed like real chat logs: most answers short, a long tail (log-normal word counts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(min(400, max(3, int(rng.lognormvariate(3.3, 0.9))))))
        rows.append({"messages": [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a}]})
    return rows


def model_flops(config, lora, examples: list[tuple[int, int]]) -> float:
    """Model FLOPs of one training pass over `examples` ((tokens, scored tokens) each): the module docstring's
    formula."""
    d, layers = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    a, kv, i = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    shapes = {
        "q_proj": (d, a),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (a, d),
        "gate_proj": (d, i),
        "up_proj": (d, i),
        "down_proj": (i, d),
    }
    p = layers * sum(fi * fo for fi, fo in shapes.values())
    p_lora = layers * sum(lora.r * (fi + fo) for m, (fi, fo) in shapes.items() if m in lora.target_modules)
    v = config.vocab_size
    return float(sum(4 * p * n + 6 * p_lora * n + 4 * v * d * na + 6 * layers * n * (n + 1) * a for n, na in examples))


def gemm_peak(model_dir: str, seconds: float = 1.0) -> dict:
    """fp32 GEMM FLOP/s at the model's shapes (rows = a batch's positions), best of them."""
    import torch
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * hd
    rows = 512
    shapes = {"d_d": (d, d), "d_kv": (d, kv), "d_i": (d, i), "i_d": (i, d), "d_vocab": (d, min(c.vocab_size, 8192))}
    out = {}
    for name, (k, n) in shapes.items():
        x, w = torch.randn(rows, k), torch.randn(k, n)
        for _ in range(3):
            x @ w
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x @ w
            reps += 1
        out[name] = 2 * rows * k * n * reps / (time.perf_counter() - t0)
    return {"peak_flops": max(out.values()), "by_shape_gflops": {k: round(v / 1e9, 1) for k, v in out.items()}}


def run_one(model_dir: str, setup: str, n: int, max_length: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from ftops.config import LoraSettings, TrainingSettings
    from ftops.model.train import TrainArgs, choose_batching, sft_trainer

    assert setup in SETUPS, setup
    cuda = torch.cuda.is_available()
    rows = chat_data(n)
    lora = LoraSettings()
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        common = {
            "model": model_dir,
            "processing_class": tokenizer,
            "train_dataset": Dataset.from_list(rows),
            "peft_config": peft_config,
        }
        batching = None
        if setup == "ours":
            args = TrainArgs(
                customer="bench",
                base_model=model_dir,
                base_model_slug="bench",
                adapter_version="b",
                train_file="",
                val_file="",
                output_dir=out,
                storage_root=out,
                lora=lora,
                training=TrainingSettings(
                    epochs=1, batch_size=batch, max_length=max_length, learning_rate=LEARNING_RATE
                ),
            )
            batching = choose_batching(args, cuda)
            trainer = sft_trainer(args, cuda, batching, **common)
        else:
            from trl import SFTConfig, SFTTrainer

            config = SFTConfig(
                output_dir=out,
                num_train_epochs=1,
                per_device_train_batch_size=batch,
                learning_rate=LEARNING_RATE,
                max_length=max_length,
                assistant_only_loss=True,
                report_to="none",
                save_strategy="no",
                use_cpu=not cuda,
                bf16=cuda,
                gradient_checkpointing=False,
            )
            trainer = SFTTrainer(args=config, **common)
        seen = {"positions": 0, "real": 0}

        def count(_module, _args, kwargs):
            ids = kwargs["input_ids"]
            seen["positions"] += ids.numel()
            mask = kwargs.get("attention_mask")
            seen["real"] += int(mask.sum()) if mask is not None else ids.numel()

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        data = trainer.train_dataset
        # Scored: positions whose label (the next token, once shifted) is an assistant token.
        examples = [
            (len(ids), sum(x != -100 for x in lab[1:]))
            for ids, lab in zip(data["input_ids"], data["labels"], strict=True)
        ]
        flops = model_flops(trainer.model.get_base_model().config, lora, examples)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stats = trainer.train()
        seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": round(seen["real"] / seconds, 1),
        "model_flops_per_s": flops / seconds,
        "non_padding_share": round(seen["real"] / seen["positions"], 4),
        "real_tokens": seen["real"],
        "positions": seen["positions"],
        "model_flops": flops,
        "steps": trainer.state.global_step,
        "train_loss": round(stats.training_loss, 4),
        "seconds": round(seconds, 2),
        "batching": batching or "trl_default",
        "threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "device": "cuda" if cuda else "cpu",
    }


def _sub(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, path: str, n: int, batch: int, max_length: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
    peaks = []
    for r in range(rounds):
        peaks.append(_sub("--peak", path)["peak_flops"])
        print(name, f"round {r}", "peak GFLOP/s", round(peaks[-1] / 1e9, 1), file=sys.stderr)
        for setup in SETUPS if r % 2 == 0 else reversed(SETUPS):
            runs[setup].append(_sub("--one", path, setup, str(n), str(max_length), str(batch)))
            print(name, f"round {r}", setup, runs[setup][-1], file=sys.stderr)
    peak = statistics.median(peaks)
    fig: dict = {"peak_gflops": round(peak / 1e9, 1), "peak_gflops_rounds": [round(p / 1e9, 1) for p in peaks]}
    for setup, rs in runs.items():
        fig[setup] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "tokens_per_s_rounds": [x["tokens_per_s"] for x in rs],
            # Each round's achieved FLOP/s over that round's own peak (the machine is shared: load varies).
            "mfu": round(statistics.median(x["model_flops_per_s"] / p for x, p in zip(rs, peaks, strict=True)), 4),
        } | {k: rs[-1][k] for k in ("non_padding_share", "steps", "train_loss", "batching", "peak_rss_mb", "device")}
    fig["speedup_vs_trl_default"] = round(fig["ours"]["tokens_per_s"] / fig["trl_default"]["tokens_per_s"], 2)
    fig["speedup_rounds"] = [
        round(o["tokens_per_s"] / t["tokens_per_s"], 2) for o, t in zip(runs["ours"], runs["trl_default"], strict=True)
    ]
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smollm-examples", type=int, default=48)
    ap.add_argument("--tiny", action="store_true", help="also the tiny test model")
    ap.add_argument("--tiny-examples", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="tiny model only, one round")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--peak", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        model_dir, setup, n, max_length, batch = a.one
        print(json.dumps(run_one(model_dir, setup, int(n), int(max_length), int(batch))))
        return
    if a.peak:
        print(json.dumps(gemm_peak(a.peak)))
        return
    from ftops.model.base_models import build_tiny, convert_smollm2

    home = Path(tempfile.mkdtemp(prefix="bench-train-"))
    models = {}
    if a.tiny or a.quick:
        models["tiny"] = (str(build_tiny(home / "tiny")), 64 if a.quick else a.tiny_examples, 8)
    if not a.quick:
        smollm = ROOT / ".ftops" / "models" / "smollm2-135m-instruct"
        models["smollm2-135m"] = (str(convert_smollm2(smollm)), a.smollm_examples, 4)
    rounds = 1 if a.quick else a.rounds
    figures: dict = {"max_length": a.max_length, "rounds": rounds, "cores": os.cpu_count()}
    for name, (path, n, batch) in models.items():
        figures[name] = bench_model(name, path, n, batch, a.max_length, rounds)
    # The headline keys: SmolLM2 (the tiny model in --quick), real (non-padding) tokens per second.
    head = figures["tiny" if a.quick else "smollm2-135m"]
    figures["speedup_vs_trl_default"] = head["speedup_vs_trl_default"]
    figures["batching"] = head["ours"]["batching"]
    figures["mfu"] = {s: head[s]["mfu"] for s in SETUPS}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
