"""One customer run, step by step: what each task of the `finetune_<customer>` DAG calls.

Each step takes and returns small JSON-able dicts (Airflow passes them as XComs) and hands bulk data
to the next through the run's scratch prefix `<root>/<customer>/runs/<run_key>/` in object storage, so
any step can run on any worker and be retried. Versioned outputs (dataset versions, adapters, registry
versions) are write-once and looked up before being made, so a retried or re-run step never duplicates
or overwrites them. Heavy work (training, evaluation) runs as `ftops` subprocess commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from ftops import snapshot as snap
from ftops.config import CustomerConfig, Platform, Settings, load_platform, settings
from ftops.handoffs import Decision, Metrics, Promotion, Registration
from ftops.registry import AdapterVersion, RegistryError, model_name
from ftops.serving import Desired, Plan
from ftops.storage import Store


class NothingToTrain(Exception):
    """No new examples since the last trained dataset: the run ends early (Airflow marks it skipped)."""


class GateFailed(RuntimeError):
    """The candidate did not pass the gate; production is unchanged."""


class Run:
    """Where one run of one customer reads and writes."""

    def __init__(
        self,
        customer_id: str,
        run_id: str,
        dag_id: str = "",
        platform: Platform | None = None,
        env: Settings | None = None,
        started_at: datetime | None = None,
    ):
        self.env = env or settings()
        self.platform = platform or load_platform(self.env.customers_file)
        self.customer: CustomerConfig = self.platform.customer(customer_id)
        self.id = customer_id
        self.run_id, self.dag_id, self.started_at = run_id, dag_id, started_at
        self.key = hashlib.sha256(run_id.encode()).hexdigest()[:12]
        self.store = Store(self.env.storage_root)
        self.scratch = f"{customer_id}/runs/{self.key}"
        self.workdir = self.env.home / "work" / customer_id / self.key
        self.base_slug = self.customer.base_model
        self.base_path = self.env.base_model_path(self.platform, self.base_slug)

    @property
    def inbox(self) -> str:
        return f"{self.env.storage_root}/{self.id}/inbox"

    def save(self, name: str, data: bytes) -> None:
        self.store.put(f"{self.scratch}/{name}", data, overwrite=True)

    def load(self, name: str) -> bytes:
        return self.store.get(f"{self.scratch}/{name}")

    def lineage(self) -> dict[str, str]:
        return {"airflow.dag_id": self.dag_id, "airflow.run_id": self.run_id, "customer": self.id}

    def registry(self):
        from ftops.registry import Registry

        return Registry(self.env.mlflow_uri)

    def dataset_version(self) -> str:
        """The name of the dataset version this run writes: `<run start, UTC>-<run key>`, chosen by the first
        try and kept in the scratch, so every retry on any worker writes the same version. Names sort in the
        order runs started (one run at a time per customer); a name that would sort before the newest version
        (a back-dated run, a clock behind) takes the present time instead."""
        key = f"{self.scratch}/dataset-version"
        try:
            return self.store.get(key).decode()
        except FileNotFoundError:
            pass
        stamp = "{:%Y%m%dT%H%M%S%fZ}-" + self.key
        name = stamp.format((self.started_at or datetime.now(UTC)).astimezone(UTC))
        others = [v for v in self.store.children(f"{self.id}/datasets") if not v.endswith(f"-{self.key}")]
        newest = others[-1:]  # (what a lost try of this run left does not count)
        if newest and name <= newest[0]:
            name = stamp.format(datetime.now(UTC))
            if name <= newest[0]:
                raise RuntimeError(f"{self.id}: the clock is behind the newest dataset version {newest[0]}")
        try:
            self.store.put(key, name.encode())
        except FileExistsError:  # a concurrent try chose first: use its name
            return self.store.get(key).decode()
        return name


# --- data -----------------------------------------------------------------------------------------------


def _retention_s() -> float:
    hours = float(os.environ.get("FTOPS_SCRATCH_RETENTION_HOURS", "48"))
    if hours <= 0:
        raise ValueError("FTOPS_SCRATCH_RETENTION_HOURS must be positive")
    return hours * 3600


def prepare(
    store: Store,
    customer: str,
    files: list,
    policy,
    *,
    run: dict | None = None,
    spill_root: Path | str | None = None,
    chunk_size: int = 50_000,  # each chunk costs one Great Expectations run; 50k rows stay a few hundred MB
    limits=None,
    progress=None,
    version: str | None = None,
) -> dict:
    """The data chain, once: ingest → validate → clean → dedupe → snapshot, streamed in chunks of
    `chunk_size` examples (memory stays flat at any size; the dedupe history is on disk).

    `files`: `ingest.inbox_files(uri)` or `ingest.local_files(paths)`. Returns the counts of every stage
    (`stages`) and of the version written (`dataset_version` None when no new file arrived). Raises
    `ValidationFailed` (nothing written) when the batch breaks a batch-level expectation; PII drops under
    `pii: drop` count against `max_quarantine_share` like any other quarantined record. `version` names the
    version to write (a run's, so that a retry writes the same one); default: the clock and the content."""
    from ftops.clean import clean as scrub
    from ftops.dedupe import dedupe as drop_duplicates
    from ftops.ingest import chunks
    from ftops.validate import ValidationFailed, Validator

    if spill_root is not None:
        snap.expire_spill(spill_root, _retention_s())
    history, ingested, manifests = snap.load_history(store, customer)
    writer = snap.Writer(store, customer, policy.val_fraction, spill_root)
    stages: dict[str, dict] = {k: {"examples": 0, "dropped": {}} for k in ("ingest", "validate", "clean", "dedupe")}

    def count(stage: str, batch) -> None:
        st = stages[stage]
        st["examples"] += len(batch.examples)
        for reason, n in batch.dropped().items():
            st["dropped"][reason] = st["dropped"].get(reason, 0) + n

    try:
        validator = Validator(policy)
        for batch in chunks(files, ingested, limits, chunk_size, progress):
            count("ingest", batch)
            batch = validator.rows(batch)
            count("validate", batch)
            batch = scrub(batch, policy.pii)
            count("clean", batch)
            batch, keys, sigs = drop_duplicates(batch, history)
            count("dedupe", batch)
            writer.add(batch, keys, sigs)
        for st in stages.values():
            st["dropped"] = dict(sorted(st["dropped"].items()))
        sources = writer.sources
        stages["ingest"] |= {
            "new_files": [s["name"] for s in sources if not s["skipped"]],
            "skipped_files": {s["name"]: s["skipped"] for s in sources if s["skipped"]},
        }
        validation = validator.finish(writer.read, writer.dropped, docs_dir=writer.dir / "data_docs")
        out = writer.counts() | {"dataset_version": None, "stages": stages, "validation_success": validation.success}
        if not validation.success:
            err = ValidationFailed(f"{customer}: batch rejected before training: {'; '.join(validation.failures)}")
            err.summary = out
            raise err
        if any(s["skipped"] != "already_ingested" for s in sources):
            parent = manifests[-1]["version"] if manifests else None
            s = writer.publish(
                validation.result, validation.html, parent, run, docs=validation.docs, version=version, stages=stages
            )
            out |= {"dataset_version": s.version, "dataset_uri": s.uri, "fingerprint": s.manifest["fingerprint"]}
        return out
    finally:
        writer.discard()
        history.close()


def _prepared(run: Run) -> dict:
    return json.loads(run.load("prepare.json"))


def ingest(run: Run) -> dict:
    """Run the whole data chain (`prepare`) in this task, streaming, and keep only its counts in scratch:
    no bulk data, so nothing raw (no PII) waits in the run's scratch between tasks. The later data tasks
    report their stage's counts and fail where their stage failed. A retry reuses the counts once written."""
    from ftops.ingest import inbox_files
    from ftops.validate import ValidationFailed

    run.store.put(f"{run.scratch}/started", str(time.time()).encode(), overwrite=True)
    expire_scratch(run.store, run.id, run.env.home, keep=run.key)
    if not run.store.exists(f"{run.scratch}/prepare.json"):
        if published := _published(run):  # an earlier try wrote the version, then was lost before this
            out = _from_manifest(run, published)
        else:
            try:
                out = prepare(
                    run.store,
                    run.id,
                    inbox_files(run.inbox),
                    run.customer.data,
                    run=run.lineage(),
                    spill_root=run.env.home / "work" / "spill",
                    version=run.dataset_version(),
                )
            except ValidationFailed as exc:
                out = getattr(exc, "summary", {}) | {"failed": str(exc)}
        run.save("prepare.json", json.dumps(out).encode())
    out = _prepared(run)
    st = out.get("stages", {}).get("ingest", {})
    dropped = st.get("dropped", {})
    return {
        "read": out.get("read", 0),
        "examples": st.get("examples", 0),
        "quarantined": sum(dropped.values()),
        "new_files": st.get("new_files", []),
        "skipped_files": st.get("skipped_files", {}),
    }


def validate(run: Run) -> dict:
    from ftops.validate import ValidationFailed

    out = _prepared(run)
    if "failed" in out:
        raise ValidationFailed(out["failed"])
    st = out["stages"]["validate"]
    return {"success": True, "examples": st["examples"], "dropped": st["dropped"]}


def clean(run: Run) -> dict:
    out = _prepared(run)
    st = out["stages"]["clean"]
    return {"examples": st["examples"], "pii": out["pii"], "dropped": st["dropped"]}


def dedupe(run: Run) -> dict:
    st = _prepared(run)["stages"]["dedupe"]
    return {"examples": st["examples"], "dropped": st["dropped"]}


def snapshot(run: Run) -> dict:
    """The dataset version the chain wrote (once per run: a retry returns the same, also after `cleanup`
    removed the scratch: the version's manifest names its run)."""
    keys = ("read", "kept", "dropped", "pii", "dataset_version", "dataset_uri", "train", "val", "fingerprint")
    try:
        out = _prepared(run)
    except FileNotFoundError:
        if not (published := _published(run)):
            raise
        out = _from_manifest(run, published)
    return {k: out[k] for k in keys if k in out}


def _published(run: Run) -> dict | None:
    """The manifest of the dataset version this run wrote, if a try of it got that far."""
    mine = [m for m in snap.versions(run.store, run.id) if m["run"].get("airflow.run_id") == run.run_id]
    return mine[-1] if mine else None


def _from_manifest(run: Run, m: dict) -> dict:
    """`prepare`'s summary of a published version, rebuilt from its manifest."""
    return m["counts"] | {
        "stages": m.get("stages", {}),
        "validation_success": m.get("validation_success"),
        "dataset_version": m["version"],
        "dataset_uri": run.store.uri(f"{run.id}/datasets/{m['version']}"),
        "fingerprint": m["fingerprint"],
    }


def cleanup(run: Run) -> dict:
    """Remove the run's scratch (object storage) and work folder. Wire it as the DAG's last task with
    `trigger_rule="all_done"` so it runs after success and failure alike; `expire_scratch` catches what a
    killed run leaves."""
    removed = run.store.delete_prefix(run.scratch)
    shutil.rmtree(run.workdir, ignore_errors=True)
    return {"removed_objects": removed}


def expire_scratch(
    store: Store, customer: str, home: Path, keep: str = "", max_age_s: float | None = None
) -> list[str]:
    """Remove the scratch of this customer's runs started more than the retention ago
    (`FTOPS_SCRATCH_RETENTION_HOURS`, default 48: longer than any run), and their work folders."""
    max_age_s = _retention_s() if max_age_s is None else max_age_s
    expired = []
    for key in store.children(f"{customer}/runs"):
        if key == keep:
            continue
        marker = f"{customer}/runs/{key}/started"
        try:
            started = float(store.get(marker))
        except (FileNotFoundError, ValueError):
            # a run from before the marker (or not started through `ingest`): its age counts from now
            store.put(marker, str(time.time()).encode(), overwrite=True)
            continue
        if time.time() - started > max_age_s:
            store.delete_prefix(f"{customer}/runs/{key}")
            shutil.rmtree(home / "work" / customer / key, ignore_errors=True)
            expired.append(key)
    snap.expire_spill(home / "work" / "spill", max_age_s)
    return expired


# --- model ----------------------------------------------------------------------------------------------


def _ftops(*args: str) -> None:
    """Run an `ftops` stage command in a subprocess; its output goes to the task log."""
    from ftops.storage import subprocess_env

    env = subprocess_env() | {"PYTHONUNBUFFERED": "1"}  # S3 credentials from the Airflow connection, if set
    with subprocess.Popen(
        [sys.executable, "-m", "ftops.cli", *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        for line in proc.stdout:  # streamed, so the task log shows progress live
            print(line, end="")
    if proc.returncode != 0:
        raise RuntimeError(f"`ftops {' '.join(args)}` exited {proc.returncode}")


def train(run: Run, force: bool = False, overrides: dict | None = None) -> dict:
    """Train a candidate on the data not yet in production plus a replay sample of the customer's history."""
    from ftops.train import TrainArgs

    if run.store.exists(f"{run.scratch}/train.json"):
        return json.loads(run.load("train.json"))
    manifests = [m for m in snap.versions(run.store, run.id) if m["counts"]["kept"] > 0]
    # RegistryUnavailable propagates: the task retries, then fails, rather than train without replay.
    prod = production(run)
    trained_upto = prod.tags.get("dataset.version", "") if prod else ""
    if prod and trained_upto not in {m["version"] for m in manifests}:
        raise RegistryError(
            f"{run.id}: production v{prod.version} names dataset {trained_upto[:80]!r}, which is not one of this "
            "customer's dataset versions; refusing to guess what it was trained on"
        )
    # This run trains on versions up to its own snapshot, never on a later run's: a task cleared after the
    # run ended (or retried late) then redoes the same work or, with production past it, nothing.
    upto = snapshot(run).get("dataset_version") or (manifests[-1]["version"] if manifests else "")
    new = [m["version"] for m in manifests if trained_upto < m["version"] <= upto]
    old = [m["version"] for m in manifests if m["version"] <= trained_upto]
    if not new and not force:
        raise NothingToTrain(f"{run.id}: no new examples since production's dataset {trained_upto or '(none)'}")
    if not new:  # forced: everything up to this run's snapshot, as one fresh training
        new, old = [m["version"] for m in manifests if m["version"] <= upto], []
    if not new:
        raise NothingToTrain(f"{run.id}: no dataset version to train on")
    t = run.customer.training.overridden(overrides or {})
    rows, val, replayed = snap.training_mix(run.store, run.id, new, old, t.replay_fraction, t.seed)
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
    adapter_prefix = f"{run.id}/adapters/{run.base_slug}/{adapter_version}"
    args = TrainArgs(
        customer=run.id,
        base_model=str(run.base_path),
        base_model_slug=run.base_slug,
        adapter_version=adapter_version,
        train_file=str(run.workdir / "train.jsonl"),
        val_file=str(run.workdir / "val.jsonl"),
        output_dir=str(run.workdir / "train"),
        storage_root=run.env.storage_root,
        **run.customer.lora.model_dump(),
        # The customer's trainer settings carry over by name; replay and init are decided above.
        **t.model_dump(exclude={"replay_fraction", "init"}),
        init_adapter=init_adapter,
        checkpoint_prefix=f"{run.scratch}/checkpoints",
        result_key=f"{run.scratch}/train-result.json",
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
            "init": f"production v{prod.version}" if init_adapter else "fresh",
        },
    )
    config = run.workdir / "train.json"
    config.write_text(json.dumps(asdict(args), indent=2))
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
        _ftops("train", "--config", str(config))
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
    }
    run.save("train.json", json.dumps(out).encode())
    return out


def _registered(run: Run, adapter_prefix: str) -> bool:
    """Does a registry version point at this adapter prefix? (Unreadable registry: raises, fail closed.)"""
    return any(v.adapter_prefix == adapter_prefix for v in run.registry().versions(run.id, run.base_slug))


def production(run: Run) -> AdapterVersion | None:
    """The customer's production version, its values checked; None only when the registry answered that
    there is none. An unreadable registry (RegistryUnavailable) or a refused version (UntrustedVersion)
    raises: training without replay or an evaluation without the comparison is never the fallback."""
    from ftops.registry import PRODUCTION

    v = run.registry().by_alias(run.id, run.base_slug, PRODUCTION)
    return v.checked(run.base_slug) if v else None


def production_copy(run: Run, prod: AdapterVersion, parent: Path) -> Path:
    """A local copy of production's adapter, verified against the sha256 recorded at its registration."""
    from ftops.serving import verified_copy

    label = f"{run.id}: production v{prod.version}"
    tags = prod.tags
    return verified_copy(
        run.store,
        prod.adapter_prefix,
        parent / prod.adapter_version,
        tags["adapter.sha256"],
        label,
        tags.get("adapter.tree_sha256", ""),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(run: Run, trained: dict) -> dict:
    """Loss, golden set and safety probes for base, production and candidate, on the serving engine if any."""
    from ftops.evaluate import EvalArgs, golden_set, redteam_set, regurgitation_probes, score_answers
    from ftops.serving import answers_from, engine_for, eval_name

    # The copies a vLLM replica loads go under the adapter folder the replicas mount at the same path
    # (FTOPS_VLLM_ADAPTER_DIR; docker-compose.yaml: the `adapters` volume), not this worker's scratch, which a
    # replica in another container or on another machine cannot read. `.eval` is never a customer's folder.
    adapters = run.env.vllm_adapter_dir / ".eval" / run.id / run.key
    run.workdir.mkdir(parents=True, exist_ok=True)  # this worker's scratch: it may never have seen this run
    candidate = run.store.download_dir(trained["adapter_prefix"], adapters / "candidate" / trained["adapter_version"])
    # Never skips the comparison: an unreadable registry or a refused production version fails the task.
    prod = production(run)
    prod_dir = production_copy(run, prod, adapters / "production") if prod else None
    # The artifact scored must be the one registered and served, byte for byte.
    weights = "adapter_model.safetensors"
    stored = hashlib.sha256(run.store.get(f"{trained['adapter_prefix']}/{weights}")).hexdigest()
    if _sha256(candidate / weights) != stored:
        raise RuntimeError(f"{run.id}: candidate copy differs from {trained['adapter_uri']}")
    # What the train task wrote, from object storage: this task may run on another worker.
    train_rows = snap.read_jsonl(run.load("train.jsonl"))
    (run.workdir / "val.jsonl").write_bytes(run.load("val.jsonl"))
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
            pool.submit(lambda: {k: answers_from(replica, *v, prompts) for k, v in served.items()}) if replica else None
        )
        _ftops("evaluate", "--config", str(config))
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
    return json.loads(Metrics.model_validate(metrics).model_dump_json())


def gate(run: Run, metrics: dict) -> dict:
    from ftops.gate import decide

    return decide(Metrics.model_validate(metrics), run.customer.gate).model_dump()


def register(run: Run, trained: dict, metrics: dict, decision: dict) -> dict:
    """Register the candidate with its lineage (once per training run), record the gate's decision and report."""
    m, d = Metrics.model_validate(metrics), Decision.model_validate(decision)
    cand = m.candidate
    tags = (
        run.lineage()
        | d.as_tags()
        | {
            "adapter.version": trained["adapter_version"],
            "adapter.prefix": trained["adapter_prefix"],
            "adapter.uri": trained["adapter_uri"],
            "adapter.sha256": m.candidate_sha256,
            "adapter.tree_sha256": _stored_tree(run, trained["adapter_prefix"]),
            "dataset.version": trained["dataset_version"],
            "dataset.new_versions": ",".join(trained["new_versions"]),
            "replay.examples": trained["replayed"],
            "replay.share": round(trained["replayed"] / max(trained["train_examples"], 1), 4),
            "base_model": run.base_slug,
            "lora.r": trained["lora"]["r"],
            "lora.alpha": trained["lora"]["alpha"],
            "lora.target_modules": ",".join(trained["lora"]["target_modules"]),
            "metrics.candidate_val_loss": _tag(cand.val_loss),
            "metrics.base_val_loss": _tag(m.base.val_loss),
            "metrics.production_val_loss": _tag(m.production.val_loss if m.production else None),
            "metrics.val_examples": m.val_examples,
            "metrics.candidate_golden_chrf": _tag(cand.golden_chrf),
            "metrics.candidate_checks_pass_rate": _tag(cand.checks_pass_rate),
            "metrics.candidate_canary_leaks": _tag(cand.canary_leaks),
            "eval.engine": m.engine,
        }
        # What the serving engine answered at the gate: the reconciler checks a swap reproduces it.
        | (
            {"probe.prompt": cand.sample["prompt"], "probe.answer": cand.sample["answer"][:200]}
            if m.engine.startswith("vllm") and cand.sample
            else {}
        )
    )
    reg = run.registry()
    v = reg.register(
        run.id,
        run.base_slug,
        trained["adapter_artifact_uri"],
        trained["mlflow_run_id"],
        tags,
        description="; ".join(d.reasons),
    )
    reg.set_tags(run.id, run.base_slug, v.version, d.as_tags())
    _log_report(run, trained["mlflow_run_id"], v.version, decision)
    return Registration(registry_version=v.version, model=model_name(run.id, run.base_slug)).model_dump()


def _stored_tree(run: Run, prefix: str) -> str:
    from ftops.serving import tree_sha256

    return tree_sha256({k[len(prefix) + 1 :]: run.store.get(k) for k in run.store.list(prefix)})


def _tag(x: float | int | None) -> str:
    return "" if x is None else str(x)


def _log_report(run: Run, mlflow_run_id: str, version: str, decision: dict) -> None:
    """The gate report and the raw evaluation, as artifacts of the candidate's training run."""
    from ftops.report import render

    metrics = json.loads(run.load("eval.json"))
    page = render(run.id, version, metrics, decision)
    reports = run.workdir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "gate_report.html").write_text(page)
    (reports / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    (reports / "gate_decision.json").write_text(json.dumps(decision, indent=2))
    run.registry().client.log_artifacts(mlflow_run_id, str(reports), artifact_path="gate")


def promotion_mode(run: Run, requested: str | None, approved: bool = False) -> str:
    """The one place the promotion mode is decided. An operator's approval in the UI (the DAG's `approve`
    step, built for `promote: manual` customers) makes it `auto`; otherwise the run's form value, else the
    customer's setting. `manual` leaves the passed candidate for an operator (UI action or CLI)."""
    if approved:
        return "auto"
    return requested or run.customer.promote


def promote(run: Run, registered: dict, decision: dict, mode: str) -> dict:
    """Move `production` to the candidate if the gate passed; a failed gate fails the run visibly."""
    r, d = Registration.model_validate(registered), Decision.model_validate(decision)
    if not d.passed:
        raise GateFailed(
            f"{run.id}: version {r.registry_version} failed the gate: {'; '.join(d.reasons)}. Production is unchanged."
        )
    if mode == "manual":
        out = Promotion(promoted=False, mode=mode, registry_version=r.registry_version, waiting_for="manual approval")
        return out.model_dump()
    v = run.registry().promote(run.id, run.base_slug, r.registry_version)
    out = Promotion(
        promoted=True,
        mode="auto",
        registry_version=r.registry_version,
        production=v.version,
        adapter_version=v.adapter_version,
    )
    return out.model_dump()


# --- serving --------------------------------------------------------------------------------------------


def plan_serving(platform: Platform, registry) -> Plan:
    """What every replica should serve, from the customers file and the registry. The registry being
    unreadable raises RegistryUnavailable before anything is decided (unknown is not absent); a version
    whose values fail the checks leaves its customer as served."""
    from ftops.registry import PRODUCTION, UntrustedVersion

    plan = Plan(customers=set(platform.customers))
    for label, error in platform.invalid.items():
        plan.keep[label] = f"invalid entry in the customers file ({error})"
    if platform.invalid:
        plan.removal_blocked = "the customers file has invalid entries (removals wait until it is fixed)"
    for c in platform.customers.values():
        v, absent = registry.lookup(c.id, c.base_model, PRODUCTION)
        if v is None:
            if absent == "no_alias":  # the registry answered: production was deleted, an explicit removal
                plan.remove.add(c.id)
            else:  # no registered model: a new customer, unless a replica serves it (then: never on that basis)
                plan.unregistered.add(c.id)
            continue
        try:
            v.checked(c.base_model)
        except UntrustedVersion as exc:
            plan.keep[c.id] = str(exc)
            continue
        plan.serve.append(
            Desired(
                c.id,
                v.version,
                v.adapter_version,
                v.adapter_prefix,
                v.tags["adapter.sha256"],
                tree_sha256=v.tags.get("adapter.tree_sha256", ""),
                rank=int(v.tags["lora.r"]) if v.tags.get("lora.r", "").isdigit() else 0,
                probe_prompt=v.tags.get("probe.prompt", ""),
                probe_answer=v.tags.get("probe.answer", ""),
            )
        )
    return plan


def sync_serving(env: Settings | None = None) -> dict:
    """Reconcile every replica with the registry once; raises (the DAG run fails) on any error, after doing
    what could be done."""
    from ftops.registry import Registry
    from ftops.serving import ReconcileIncomplete, reconcile

    env = env or settings()
    platform = load_platform(env.customers_file)
    plan = plan_serving(platform, Registry(env.mlflow_uri))
    max_rank = int(os.environ["FTOPS_VLLM_MAX_LORA_RANK"]) if os.environ.get("FTOPS_VLLM_MAX_LORA_RANK") else None
    report = reconcile(plan, list(env.vllm_urls), env.vllm_adapter_dir, Store(env.storage_root), max_rank)
    result = {
        "desired": {d.customer: d.registry_version for d in plan.serve},
        "removed": sorted(plan.remove),
        "actions": report.actions,
        "errors": report.errors,
    }
    if report.errors:
        raise ReconcileIncomplete("serving reconcile incomplete: " + "; ".join(report.errors))
    return result
