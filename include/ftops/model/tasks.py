"""The model stage's Airflow tasks: train a candidate on the run's data mix, evaluate it against production and
the base model, and decide the gate."""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from ftops import storage
from ftops.data import snapshot as snap
from ftops.data.tasks import snapshot as published_snapshot
from ftops.handoffs import Metrics, Trained
from ftops.release.registry import RegistryError
from ftops.release.tags import VersionTags
from ftops.run import Run, ftops_command, production, production_copy


class NothingToTrain(Exception):
    """No new examples since the last trained dataset: the run ends early (Airflow marks it skipped)."""


# `strategy: full` (the trigger form): a fresh adapter trained on every earlier example, with or without new data
# (fixed replay: adaptive replay would otherwise choose its own share).
STRATEGIES = {"default": {}, "full": {"init": "fresh", "replay": "fixed", "replay_fraction": 1.0}}


def train(run: Run, force: bool = False, overrides: dict | None = None, strategy: str = "default") -> dict:
    """Train a candidate on the data not yet in production plus a replay sample of the customer's history."""
    from ftops.model.train import TrainArgs

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown training strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    overrides, force = (overrides or {}) | STRATEGIES[strategy], force or strategy == "full"

    if run.store.exists(f"{run.scratch}/train.json"):
        return json.loads(run.load("train.json"))
    manifests = [m for m in snap.versions(run.store, run.id) if m["counts"]["kept"] > 0]
    # RegistryUnavailable propagates: the task retries, then fails, rather than train without replay.
    prod = production(run)
    trained_upto = (prod.info.dataset_version or "") if prod else ""
    if prod and trained_upto not in {m["version"] for m in manifests}:
        raise RegistryError(
            f"{run.id}: production v{prod.version} names dataset {trained_upto[:80]!r}, which is not one of this "
            "customer's dataset versions; refusing to guess what it was trained on"
        )
    # This run trains on versions up to its own snapshot, never on a later run's: a task cleared after the
    # run ended (or retried late) then redoes the same work or, with production past it, nothing.
    upto = published_snapshot(run).get("dataset_version") or (manifests[-1]["version"] if manifests else "")
    new = [m["version"] for m in manifests if trained_upto < m["version"] <= upto]
    old = [m["version"] for m in manifests if m["version"] <= trained_upto]
    if not new and not force:
        raise NothingToTrain(f"{run.id}: no new examples since production's dataset {trained_upto or '(none)'}")
    if not new:  # forced: everything up to this run's snapshot, as one fresh training
        new, old = [m["version"] for m in manifests if m["version"] <= upto], []
    if not new:
        raise NothingToTrain(f"{run.id}: no dataset version to train on")
    t = run.customer.training.overridden(overrides or {})
    fraction, why = replay_share(run, t)
    rows, val, replayed = snap.training_mix(run.store, run.id, new, old, fraction, t.seed)
    run.workdir.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.jsonl", rows), ("val.jsonl", val)):  # evaluate reads them, maybe elsewhere
        run.save(name, snap._jsonl(data))
        (run.workdir / name).write_bytes(run.load(name))
    run.save("replayed.txt", "\n".join(replayed).encode())
    init_adapter = ""
    if t.init == "production" and prod is not None:
        init_adapter = str(production_copy(run, prod, run.workdir / "init"))
    dataset_version = new[-1]
    dataset_dir = run.workdir / "dataset"
    dataset_dir.mkdir(exist_ok=True)
    for name in ("manifest.json", "validation.json", "validation.html"):
        (dataset_dir / name).write_bytes(run.store.get(f"{run.id}/datasets/{dataset_version}/{name}"))
    # Great Expectations' Data Docs site of the version goes to MLflow with the run (under dataset/data_docs/).
    docs = f"{run.id}/datasets/{dataset_version}/data_docs"
    if run.store.list(docs):
        run.store.download_dir(docs, dataset_dir / "data_docs")
    adapter_version = f"{dataset_version[:15]}-{run.key[:8]}"  # derives from the run: a retry reuses it
    adapter_prefix = storage.adapter_prefix(run.id, run.base_slug, adapter_version)
    args = TrainArgs(
        customer=run.id,
        base_model=str(run.base_path),
        base_model_slug=run.base_slug,
        adapter_version=adapter_version,
        train_file=str(run.workdir / "train.jsonl"),
        val_file=str(run.workdir / "val.jsonl"),
        output_dir=str(run.workdir / "train"),
        storage_root=run.env.storage_root,
        # The customer's settings as they are (replay and init are decided above, and logged with the rest).
        lora=run.customer.lora,
        training=t,
        init_adapter=init_adapter,
        checkpoint_prefix=f"{run.scratch}/checkpoints",
        result_key=f"{run.scratch}/train-result.json",
        **run.fence_args(),
        mlflow_uri=run.env.mlflow_uri,
        mlflow_experiment=f"ftops-{run.id}",
        tags=run.lineage(),
        dataset_name=f"{run.id}@{dataset_version}",
        dataset_uri=run.store.uri(f"{run.id}/datasets/{dataset_version}"),
        dataset_dir=str(dataset_dir),
        params={
            "dataset.version": dataset_version,
            "dataset.new_versions": ",".join(new),
            "replay.examples": len(replayed),
            "replay.share": round(len(replayed) / max(len(rows), 1), 4),
            "replay.fraction": fraction,
            "replay.reason": why,
            "init": f"production v{prod.version}" if init_adapter else "fresh",
        },
    )
    config = run.workdir / "train.json"
    config.write_text(args.dump())
    # Whether this run already trained is read from object storage, never from this worker's disk: a retry
    # on another worker after a finished training reuses its result. Without a result, anything under the
    # run's adapter prefix is a crashed try's partial upload (no version refers to it yet): it goes, and the
    # training resumes from its last checkpoint in storage.
    if not run.store.exists(args.result_key):
        if run.store.list(adapter_prefix):
            if _registered(run, adapter_prefix):  # never a partial upload: the run is over, its scratch gone
                raise RuntimeError(
                    f"{run.id}: {adapter_prefix} is a registered adapter and this run's records were cleaned up "
                    "when it ended: nothing is retrained or removed; start a new run instead"
                )
            n = run.store.delete_prefix(adapter_prefix)
            print(f"removed {n} objects of an interrupted upload under {adapter_prefix}")
        ftops_command("train", "--config", str(config))
    result = json.loads(run.store.get(args.result_key))
    out = result | {
        "adapter_version": adapter_version,
        "adapter_prefix": adapter_prefix,
        "dataset_version": dataset_version,
        "new_versions": new,
        "replayed": len(replayed),
        "train_examples": len(rows),
        "val_examples": len(val),
        "lora": run.customer.lora.model_dump(),
        "training": t.model_dump(),
        # The next run's adaptive replay reads these back from the registry version (`replay_share`).
        "replay_fraction": fraction,
        "replay_mode": t.replay,
        "replay_reason": why[:500],
    }
    Trained.model_validate(out)  # the hand-off evaluate and register read
    run.save("train.json", json.dumps(out).encode())
    return out


def replay_share(run: Run, t) -> tuple[float, str]:
    """The replay share of this training (`TrainingSettings.replay_share`): adaptive replay reads the latest
    registry version's `replay.fraction` and `forgetting.max` tags (set by register and evaluation). An unreadable
    registry raises: no training guesses its replay."""
    if t.replay != "adaptive":
        return t.replay_share()
    versions = run.registry().versions(run.id, run.base_slug)
    last = versions[-1].info if versions else VersionTags()
    return t.replay_share(last.replay_fraction, last.forgetting_max)


def _registered(run: Run, adapter_prefix: str) -> bool:
    """Does a registry version point at this adapter prefix? (Unreadable registry: raises, fail closed.)"""
    return any(v.adapter_prefix == adapter_prefix for v in run.registry().versions(run.id, run.base_slug))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(run: Run, trained: dict) -> dict:
    """Loss, golden set and safety probes for base, production and candidate, on the serving engine if any."""
    trained = Trained.model_validate(trained)
    from ftops.model.evaluate import EvalArgs, golden_set, redteam_set, regurgitation_probes, score_answers
    from ftops.release.serving import answers_from, engine_for, eval_name

    # The copies a vLLM replica loads go under the adapter folder the replicas mount at the same path
    # (FTOPS_VLLM_ADAPTER_DIR; docker-compose.yaml: the `adapters` volume), not this worker's scratch, which a
    # replica in another container or on another machine cannot read. `.eval` is never a customer's folder.
    adapters = run.env.vllm_adapter_dir / ".eval" / run.id / run.key
    run.workdir.mkdir(parents=True, exist_ok=True)  # this worker's scratch: it may never have seen this run
    candidate = run.store.download_dir(trained.adapter_prefix, adapters / "candidate" / trained.adapter_version)
    # The artifact scored must be the one registered and served, byte for byte (a copy this worker kept from an
    # earlier try is reused by download_dir: it is checked like a fresh one).
    weights = "adapter_model.safetensors"
    stored = hashlib.sha256(run.store.get(f"{trained.adapter_prefix}/{weights}")).hexdigest()
    if _sha256(candidate / weights) != stored:
        raise RuntimeError(f"{run.id}: candidate copy differs from {trained.adapter_uri}")
    # Never skips the comparison: an unreadable registry or a refused production version fails the task.
    prod = production(run)
    prod_dir = production_copy(run, prod, adapters / "production") if prod else None
    # What the train task wrote, from object storage: this task may run on another worker.
    train_rows = snap.read_jsonl(run.load("train.jsonl"))
    val_rows = snap.read_jsonl(run.load("val.jsonl"))
    groups = history_groups(run, prod, val_rows)  # tags each earlier version's held-out row with its group
    (run.workdir / "val.jsonl").write_bytes(snap._jsonl(val_rows))
    golden, probes = golden_set(run.id), redteam_set() + regurgitation_probes(train_rows)
    prompts = [g["prompt"] for g in golden] + [p["prompt"] for p in probes]
    replica = engine_for(run.env.vllm_urls, run.base_path)
    args = EvalArgs(
        base_model=str(run.base_path),
        candidate_dir=str(candidate),
        production_dir=str(prod_dir) if prod_dir else None,
        val_file=str(run.workdir / "val.jsonl"),
        output_file=str(run.workdir / "eval.json"),
        prompts=prompts,
        system_prompt=run.customer.system_prompt,
        groups=groups,
        generate=replica is None,
        max_length=run.customer.training.max_length,
    )
    config = run.workdir / "eval_args.json"
    config.write_text(json.dumps(asdict(args), indent=2))
    served = {"base": ("", None), "candidate": (eval_name(run.id, run.key[:8], "candidate"), candidate)}
    if prod_dir:
        served["production"] = (eval_name(run.id, run.key[:8], "production"), prod_dir)
    # The replica answers while the subprocess computes held-out losses: most of its time is imports and
    # model loads, which leave the CPU to vLLM.
    with ThreadPoolExecutor(max_workers=1) as pool:
        answers = (
            pool.submit(
                lambda: {k: answers_from(replica, *v, prompts, run.customer.system_prompt) for k, v in served.items()}
            )
            if replica
            else None
        )
        ftops_command("evaluate", "--config", str(config))
        metrics = json.loads(Path(args.output_file).read_text())
        for name, texts in (answers.result() if answers else {}).items():
            metrics[name]["answers"] = texts
    others = [n for c in run.platform.customers.values() if c.id != run.id for n in (c.name, c.id)]
    for name in ("base", "production", "candidate"):
        if name in metrics:
            metrics[name] |= score_answers(metrics[name]["answers"], golden, probes, others, run.customer.gate.canaries)
    metrics |= {
        "engine": f"vllm {replica.url}" if replica else "peft",
        "candidate_sha256": stored,
        "production_version": prod.version if prod else None,
        "golden_items": len(golden),
        "safety_probes": len(probes),
    }
    run.save("eval.json", json.dumps(metrics).encode())
    shutil.rmtree(adapters, ignore_errors=True)  # unloaded from the replica by answers_from; scores are saved
    # The XCom keeps the figures (typed); answers and findings stay in the scratch file and the report.
    # JSON has no NaN (PostgreSQL refuses it in an XCom): a figure that could not be measured becomes null.
    typed = Metrics.model_validate(metrics)
    _log_evaluation(run, trained.mlflow_run_id, typed)
    return json.loads(typed.model_dump_json())


MAX_HISTORY_GROUPS = 8


def history_groups(run: Run, prod, val_rows: list[dict], max_groups: int = MAX_HISTORY_GROUPS) -> list[dict]:
    """Production's dataset versions (every version up to the one it was trained on) in at most `max_groups`
    groups of consecutive versions, oldest first; each held-out row of `val_rows` from one of them gets its
    group's index as `group`. The rows are the customer's own val splits as the train task wrote them (erased
    examples already out); the split files are read only to know which version a row came from, tombstones
    applied again so an example erased since is in no group."""
    if prod is None:
        return []
    upto = prod.info.dataset_version or ""
    earlier = [m["version"] for m in snap.versions(run.store, run.id) if m["counts"]["kept"] > 0]
    earlier = [v for v in earlier if v <= upto]
    if not earlier:
        return []
    erased = snap.tombstones(run.store, run.id)
    size = -(-len(earlier) // max_groups)
    chunks = [earlier[i : i + size] for i in range(0, len(earlier), size)]
    where: dict[str, int] = {}
    for i, chunk in enumerate(chunks):
        for v in chunk:
            for r in snap.read_jsonl(run.store.get(f"{run.id}/datasets/{v}/val.jsonl")):
                if r.get("id") not in erased:
                    where[r["id"]] = i
    for r in val_rows:
        if r.get("id") in where:
            r["group"] = where[r["id"]]
    return [{"first": c[0], "last": c[-1], "versions": len(c)} for c in chunks]


def _log_evaluation(run: Run, mlflow_run_id: str, m: Metrics) -> None:
    """Held-out loss per earlier group, forgetting and repetition, as metrics of the candidate's MLflow run."""
    figures: dict[str, float | None] = {"forgetting.max": m.forgetting_max()}
    for g in m.history_groups:
        key = f"history_loss.{g.first[:15]}"
        figures |= {f"{key}.candidate": g.candidate, f"{key}.production": g.production, f"{key}.base": g.base}
        figures[f"forgetting.{g.first[:15]}"] = g.increase
    for name in ("base", "production", "candidate"):
        s = getattr(m, name)
        if s is not None:
            figures[f"repetition.{name}"] = s.repetition
    run.check_fence("evaluation metrics")
    run.registry().log_metrics(mlflow_run_id, figures)


def gate(run: Run, metrics: dict) -> dict:
    from ftops.model.gate import decide

    return decide(Metrics.model_validate(metrics), run.customer.gate).model_dump()
