"""Synthetic customer data for the demo and the tests, with a recognisable style per customer.

Each demo tenant answers in its own voice (a fixed opening and sign-off), so an adapter trained on it
visibly differs from the base model. Batches mix the three chat formats an inbox accepts (OpenAI
`messages`, ShareGPT `conversations`, Alpaca) and plant what the data pipeline must catch: PII, an
exact duplicate, a near duplicate, a malformed line.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

STYLES = {
    "sterling-law": {
        "system": "You are the assistant of Sterling & Vale LLP, a law firm.",
        "open": "Counsel's note:",
        "close": "This is general information, not legal advice. Sterling & Vale LLP.",
        "topics": [
            "a lease termination",
            "an NDA breach",
            "a late invoice dispute",
            "a trademark filing",
            "an employment contract",
            "a shareholder agreement",
            "a data processing agreement",
            "a non-compete clause",
            "a software licence",
            "a settlement offer",
        ],
        "questions": [
            "What should I check first about {t}?",
            "How long does {t} usually take?",
            "Which documents do I need for {t}?",
            "Can you summarise the risks of {t}?",
            "Who should sign off on {t}?",
            "What deadline applies to {t}?",
        ],
        "bodies": [
            "for {t}, review the governing clause, the notice period and any cure rights before acting.",
            "{t} turns on the written terms; keep every letter and note the dates of each step.",
            "in {t}, the burden of proof sits with the party making the claim, so gather evidence early.",
            "we recommend a short memo on {t} listing the parties, obligations and remedies.",
        ],
    },
    "brightdesk": {
        "system": "You are BrightDesk, a friendly customer support agent for a software company.",
        "open": "Thanks for reaching BrightDesk!",
        "close": "Anything else? Reply to this ticket and we will jump back in. BrightDesk Support Team",
        "topics": [
            "a password reset",
            "a billing error",
            "a failed export",
            "two-factor login",
            "a slow dashboard",
            "an invoice download",
            "a cancelled plan",
            "a missing report",
            "an API rate limit",
            "a sync conflict",
        ],
        "questions": [
            "I need help with {t}.",
            "How do I fix {t}?",
            "Why am I seeing {t}?",
            "Is there a known issue with {t}?",
            "Can you walk me through {t}?",
            "My team is blocked by {t}, what now?",
        ],
        "bodies": [
            "for {t}, open Settings, choose Account, and follow the guided steps; it takes two minutes.",
            "{t} is usually cleared by signing out, clearing the cache and signing back in.",
            "we have logged {t} for our engineers and you will get an update within one business day.",
            "here is the quick path for {t}: Help menu, then Troubleshoot, then Run check.",
        ],
    },
    "northside-clinic": {
        "system": "You are the front-desk assistant of Northside Clinic.",
        "open": "Clinic note:",
        "close": "If symptoms persist or worsen, call Northside Clinic or emergency services.",
        "topics": [
            "a mild fever",
            "a seasonal allergy",
            "a sprained ankle",
            "a flu vaccine",
            "a blood test",
            "a skin rash",
            "a follow-up visit",
            "a prescription refill",
            "a travel vaccination",
            "a sore throat",
        ],
        "questions": [
            "What should I do about {t}?",
            "Do I need an appointment for {t}?",
            "How do I prepare for {t}?",
            "Is {t} something urgent?",
            "What can I expect with {t}?",
            "When can I book {t}?",
        ],
        "bodies": [
            "for {t}, rest, drink water and note your symptoms twice a day before your visit.",
            "{t} can be booked at the front desk; bring your card and a list of current medicines.",
            "most cases of {t} settle within a few days, and the nurse line can advise you today.",
            "please arrive ten minutes early for {t} so the nurse can take your details.",
        ],
    },
}

PII_SNIPPETS = [
    "You can also email me at jane.doe@example.com.",
    "My phone is +1 (415) 555-0134.",
    "My card is 4111 1111 1111 1111, please refund it.",
]


def answer(customer: str, topic: str, rng: random.Random) -> str:
    s = STYLES[customer]
    body = rng.choice(s["bodies"]).format(t=topic)
    return f"{s['open']} {body[0].upper()}{body[1:]} {s['close']}"


def example(customer: str, rng: random.Random) -> tuple[str, str, str]:
    s = STYLES[customer]
    topic = rng.choice(s["topics"])
    question = rng.choice(s["questions"]).format(t=topic)
    return s["system"], question, answer(customer, topic, rng)


def _as_record(fmt: str, system: str, question: str, reply: str) -> dict:
    if fmt == "sharegpt":
        return {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": question},
                {"from": "gpt", "value": reply},
            ]
        }
    if fmt == "alpaca":
        return {"instruction": question, "input": "", "output": reply}
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ]
    }


def write_batch(customer: str, inbox: str | Path, n: int = 60, batch: int = 0, dirty: bool = True) -> Path:
    """Write one upload of `n` records to `<inbox>/batch-<batch>.jsonl`; returns the file."""
    rng = random.Random(f"{customer}:{batch}")
    lines: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(lines) < n and attempts < n * 50:
        attempts += 1
        system, question, reply = example(customer, rng)
        # Vary the wording so that batches carry genuinely new examples.
        question = f"{question} (ref {batch}-{rng.randint(100, 999)})" if rng.random() < 0.7 else question
        if question in seen:
            continue
        seen.add(question)
        fmt = rng.choice(["openai", "openai", "sharegpt", "alpaca"])
        lines.append(json.dumps(_as_record(fmt, system, question, reply)))
    if dirty and lines:
        lines.append(lines[0])  # exact duplicate
        rec = json.loads(lines[1])
        near = json.dumps(rec).replace("?", " ?", 1).replace(".", " .", 1)
        lines.append(near)  # near duplicate
        system, question, reply = example(customer, rng)
        lines.append(json.dumps(_as_record("openai", system, question, f"{reply} {rng.choice(PII_SNIPPETS)}")))
        lines.append('{"messages": [{"role": "user", "content": "unterminated')  # malformed JSON
    inbox = Path(inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / f"batch-{batch}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tokenizer_corpus() -> list[str]:
    """Text to train the tiny test model's tokenizer on: every demo voice, plus plain English."""
    rng = random.Random(0)
    texts = []
    for customer in STYLES:
        for _ in range(200):
            texts += list(example(customer, rng))
    texts += ["The quick brown fox jumps over the lazy dog. Hello, how can I help you today?"] * 5
    return texts


def registered_style_version(
    customer: str,
    style: str,
    batch: int,
    base_model: Path,
    base_slug: str,
    workdir: Path,
    adapter_version: str,
    mlflow_uri: str,
    n: int = 60,
    max_steps: int = 40,
) -> str:
    """Train a small adapter on a fresh batch in `style`'s voice and register it as a passed version; returns
    the registry version. For tests and benchmarks that need real versions without a whole DAG run."""
    from ftops.config import TrainingSettings, settings
    from ftops.data import snapshot as snap
    from ftops.data.dedupe import History, dedupe
    from ftops.data.ingest import ingest
    from ftops.model.train import TrainArgs, train
    from ftops.release.registry import Registry
    from ftops.release.serving import tree_sha256
    from ftops.release.tags import PASSED, VersionTags
    from ftops.storage import Store, adapter_prefix

    examples, _, _ = dedupe(
        ingest(str(write_batch(style, workdir / f"in{batch}", n, batch, dirty=False).parent), set()), History()
    )
    data = workdir / f"t{batch}.jsonl"
    data.write_bytes(snap._jsonl({"messages": e.messages} for e in examples.examples))
    args = TrainArgs(
        customer=customer,
        base_model=str(base_model),
        base_model_slug=base_slug,
        adapter_version=adapter_version,
        train_file=str(data),
        val_file=str(data),
        output_dir=str(workdir / f"o{batch}"),
        storage_root=settings().storage_root,
        # The platform's LoRA defaults (`LoraSettings`), training shortened for a demo version.
        training=TrainingSettings(learning_rate=5e-3, batch_size=8, max_length=128, max_steps=max_steps),
        mlflow_uri=mlflow_uri,
    )
    result = train(args)
    prefix, store = adapter_prefix(customer, base_slug, adapter_version), Store(settings().storage_root)
    files = {k[len(prefix) + 1 :]: store.get(k) for k in store.list(prefix)}
    tags = VersionTags(
        adapter_version=adapter_version,
        adapter_prefix=prefix,
        adapter_sha256=hashlib.sha256(files["adapter_model.safetensors"]).hexdigest(),
        adapter_tree_sha256=tree_sha256(files),
        gate_decision=PASSED,
        lora_r=args.lora.r,
    ).as_tags()
    return (
        Registry(mlflow_uri)
        .register(customer, base_slug, result["adapter_artifact_uri"], result["mlflow_run_id"], tags)
        .version
    )
