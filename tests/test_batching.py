"""Batching of training (tiny model, real TRL + PEFT): whatever the batching, each example's loss is the loss of
that example trained alone, and the attention masks that keep examples apart hold after a transformers or TRL
upgrade. One set of training settings: the run file carries the customers file's own LoRA and training models.

Tolerance: 1e-5 absolute on a per-example loss (mean negative log-likelihood in nats, ~7 here) and on log-probs,
fp32 on CPU; the same example alone and batched differs only in the order of floating-point sums (measured
~1e-6). A broken mask moves them by 1e-2 or more."""

from __future__ import annotations

import random

import pytest
import torch

from ftops.config import LoraSettings, TrainingSettings, load_platform
from ftops.model.train import LengthBucketSampler, TrainArgs, _compact_lm_head, choose_batching, run_params, sft_trainer

TOL = 1e-5
WORDS = "the contract notice refund account invoice ticket lease please check review billing clinic team".split()


def rows(n: int, seed: int = 0) -> list[dict]:
    """Chat examples with answers from 2 to ~150 words: batches mix very different lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        a = " ".join(rng.choice(WORDS) for _ in range(min(150, max(2, int(rng.lognormvariate(2.8, 1.0))))))
        out.append({"messages": [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a}]})
    return out


def args_for(tmp_path, tiny_model, **training) -> TrainArgs:
    return TrainArgs(
        customer="acme",
        base_model=str(tiny_model),
        base_model_slug="tiny",
        adapter_version="v",
        train_file="",
        val_file="",
        output_dir=str(tmp_path),
        storage_root=str(tmp_path),
        training=TrainingSettings(**({"batch_size": 4, "max_length": 512} | training)),
    )


def trainer_for(args: TrainArgs, tiny_model, data: list[dict], batching: str):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    lora = args.lora
    trainer = sft_trainer(
        args,
        False,
        batching,
        model=str(tiny_model),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
        train_dataset=Dataset.from_list(data),
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)),
    )
    # A trained-looking adapter (PEFT starts LoRA B at zero, which would hide an adapter that is not applied).
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.model.eval()  # no dropout: the same example must give the same numbers
    return trainer


def example_losses(model, batch: dict, compact: bool) -> tuple[list[float], list[int]]:
    """Per-example mean loss (nats per scored token) and scored-token count, rows of a padded batch."""
    with torch.no_grad(), _compact_lm_head() if compact else _Nothing():
        out = model(**batch, fused_lm_head=True)
    scored = batch["labels"][:, 1:] != -100
    return (
        [float(-out.log_probs[i].sum() / scored[i].sum()) for i in range(len(scored))],
        [int(s.sum()) for s in scored],
    )


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_chosen_batching_trains_each_example_as_if_alone(tmp_path, tiny_model):
    """On CPU the batching chosen is length-grouped; every batch of a whole epoch, as the trainer builds it (its
    sampler, its collator, its LM head), gives each example the loss and the assistant tokens it has alone."""
    args = args_for(tmp_path, tiny_model)
    batching = choose_batching(args, cuda=False)
    assert batching == "length_grouped"
    trainer = trainer_for(args, tiny_model, rows(24), batching)
    data, collate, bs = trainer.train_dataset, trainer.data_collator, args.training.batch_size
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(data)))  # every example once per epoch
    padded = 0
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        feats = [{k: data[i][k] for k in ("input_ids", "labels")} for i in idx]
        batch = collate(feats)
        lengths = [len(f["input_ids"]) for f in feats]
        padded += sum(max(lengths) - n for n in lengths)
        losses, counts = example_losses(trainer.model, batch, compact=True)
        for i, f, loss, count in zip(idx, feats, losses, counts, strict=True):
            (alone,), (alone_count,) = example_losses(trainer.model, collate([f]), compact=False)
            assert count == alone_count == sum(x != -100 for x in f["labels"][1:]), i
            assert abs(loss - alone) < TOL, (i, loss, alone)
        # The loss the trainer steps on: the batch's scored tokens, each weighing the same, as TRL's default does.
        with torch.no_grad():
            batch_loss = trainer.compute_loss(trainer.model, dict(batch))
        expected = sum(x * c for x, c in zip(losses, counts, strict=True)) / sum(counts)
        assert abs(batch_loss.item() - expected) < TOL
    assert padded > 0  # the batches did hold padding: the mask was exercised


def test_length_bucketed_batches_hold_less_padding_than_random_ones(tiny_model):
    lengths = [len(r["messages"][1]["content"].split()) + 12 for r in rows(200, seed=1)]
    torch.manual_seed(0)
    order = list(LengthBucketSampler(lengths, 8))
    assert sorted(order) == list(range(200))

    def padding_share(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches) / sum(
            max(lengths[j] for j in b) * len(b) for b in batches
        )

    shuffled = torch.randperm(200).tolist()
    assert padding_share(order) < 0.1 < padding_share(shuffled)
    # Batches come in random order (not long to short), and a second epoch draws other ones.
    firsts = [max(lengths[j] for j in order[i : i + 8]) for i in range(0, 200, 8)]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)
    assert list(LengthBucketSampler(lengths, 8)) != order


def test_packed_examples_do_not_see_each_other(tmp_path, tiny_model):
    """The varlen-packed batching (CUDA) and any padding-free step rely on transformers building a block-diagonal
    mask from position_ids (flash-attention reads the same boundaries). Example B packed after A must score as B
    alone, and no token may see a later one: an upgrade that breaks either fails here."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args = args_for(tmp_path, tiny_model)
    trainer = trainer_for(args, tiny_model, rows(6, seed=2), "length_grouped")
    model, data = trainer.model, trainer.train_dataset
    feats = [{k: data[i][k] for k in ("input_ids", "labels")} for i in range(3)]
    packer = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed = packer(feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        together = model(**packed, fused_lm_head=True).log_probs[0]
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(**packer([f]), fused_lm_head=True).log_probs[0]
            # Position start+n-1 predicts the next example's first token: it is masked, not compared.
            assert (together[start : start + n - 1] - alone[: n - 1]).abs().max() < TOL
            start += n
        # Causality: a prefix's logits are the full sequence's logits at those positions.
        ids = torch.tensor([feats[2]["input_ids"]])
        full, prefix = model(input_ids=ids).logits, model(input_ids=ids[:, :7]).logits
    assert (full[:, :7] - prefix).abs().max() < TOL


def test_run_file_carries_the_customers_settings(tmp_path, tiny_model):
    """TrainArgs holds the customers file's LoRA and training models as they are (no second set of defaults),
    round-trips through the run file, and logs them with the batching chosen."""
    customer = load_platform().customers["sterling-law"]
    args = TrainArgs(**args_for(tmp_path, tiny_model).model_dump(exclude={"lora", "training"}), lora=customer.lora)
    assert args.lora == customer.lora and args.training == TrainingSettings()
    assert TrainArgs(**args_for(tmp_path, tiny_model).model_dump(exclude={"lora", "training"})).lora == LoraSettings()
    path = tmp_path / "run.json"
    path.write_text(args.dump())
    assert TrainArgs.load(path) == args
    # A setting given by its own name lands in the customer's model and is validated there.
    flat = TrainArgs(**args.model_dump(exclude={"training"}), max_steps=4, learning_rate=1e-3)
    assert (flat.training.max_steps, flat.training.learning_rate, flat.lora) == (4, 1e-3, customer.lora)
    with pytest.raises(ValueError, match="batch_size"):
        TrainArgs(**args.model_dump(exclude={"training"}), batch_size=0)
    params = run_params(args, "length_grouped")
    assert params["batching"] == "length_grouped"
    assert params["lora.target_modules"] == customer.lora.target_modules
    assert params["training.max_length"] == args.training.max_length
