"""The release stage's Airflow tasks: register the candidate with its lineage, promote it when the gate passed,
and keep every vLLM replica serving what the registry says is in production."""

from __future__ import annotations

import json
import os

from ftops.config import Platform, Settings, load_platform, settings
from ftops.handoffs import Decision, Metrics, Promotion, Registration, Trained
from ftops.release.registry import model_name
from ftops.release.serving import Desired, Plan
from ftops.release.tags import VersionTags
from ftops.run import Run
from ftops.storage import Store


class GateFailed(RuntimeError):
    """The candidate did not pass the gate; production is unchanged. `gate`: the rules, what to do, and whether
    the customer is stuck (`ftops.operate.notify.gate_failure`), for the failure notification."""

    def __init__(self, message: str, gate: dict | None = None):
        super().__init__(message)
        self.gate = gate or {}


def _gate_failure(run: Run, version: str, d: Decision) -> dict:
    from ftops.model.gate import consecutive_failures
    from ftops.operate.notify import gate_failure
    from ftops.release.registry import RegistryError

    try:  # newest first: this failed version is among them, registered before promote runs
        versions = sorted(run.registry().versions(run.id, run.base_slug), key=lambda v: -int(v.version))
        failures, _ = consecutive_failures([(v.info.gate_decision or "", "") for v in versions])
    except (RegistryError, OSError, ValueError):  # the failure is still reported, without the count
        failures = None
    return gate_failure(run.id, version, d.failed_rules, failures, run.customer.gate.stuck_after)


def register(run: Run, trained: dict, metrics: dict, decision: dict) -> dict:
    """Register the candidate with its lineage (once per training run), record the gate's decision and report."""
    m, d, t = Metrics.model_validate(metrics), Decision.model_validate(decision), Trained.model_validate(trained)
    cand = m.candidate
    tags = VersionTags(
        **run.lineage(),
        base_model=run.base_slug,
        adapter_version=t.adapter_version,
        adapter_prefix=t.adapter_prefix,
        adapter_uri=t.adapter_uri,
        adapter_sha256=m.candidate_sha256,
        adapter_tree_sha256=_stored_tree(run, t.adapter_prefix),
        dataset_version=t.dataset_version,
        dataset_new_versions=t.new_versions,
        replay_examples=t.replayed,
        replay_share=round(t.replayed / max(t.train_examples, 1), 4),
        replay_fraction=t.replay_fraction,
        replay_mode=t.replay_mode,
        replay_reason=t.replay_reason,
        lora_r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_target_modules=t.lora.target_modules,
        candidate_val_loss=cand.val_loss,
        base_val_loss=m.base.val_loss,
        production_val_loss=m.production.val_loss if m.production else None,
        val_examples=m.val_examples,
        candidate_golden_chrf=cand.golden_chrf,
        candidate_checks_pass_rate=cand.checks_pass_rate,
        candidate_canary_leaks=cand.canary_leaks,
        candidate_repetition=cand.repetition,
        base_repetition=m.base.repetition,
        eval_engine=m.engine,
        **forgetting(m),
        **d.tags(),
        # What the serving engine answered at the gate: the reconciler checks a swap reproduces it.
        **(
            {"probe_prompt": cand.sample["prompt"], "probe_answer": cand.sample["answer"][:200]}
            if m.engine.startswith("vllm") and cand.sample
            else {}
        ),
    ).as_tags()
    run.check_fence("the registry version")
    reg = run.registry()
    v = reg.register(
        run.id,
        run.base_slug,
        t.adapter_artifact_uri,
        t.mlflow_run_id,
        tags,
        description="; ".join(d.reasons),
    )
    reg.set_tags(run.id, run.base_slug, v.version, d.as_tags())
    _log_report(run, t.mlflow_run_id, v.version, decision)
    return Registration(registry_version=v.version, model=model_name(run.id, run.base_slug)).model_dump()


def _stored_tree(run: Run, prefix: str) -> str:
    from ftops.release.serving import tree_sha256

    return tree_sha256({k[len(prefix) + 1 :]: run.store.get(k) for k in run.store.list(prefix)})


def forgetting(m: Metrics) -> dict:
    """`forgetting_max`: the worst earlier group's held-out loss increase vs production (nats; absent without
    production); `forgetting_groups`: every group's figures (at most 8 groups: well under the registry's
    5,000-character tag limit)."""
    if not m.history_groups:
        return {}
    groups = [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in g.model_dump(exclude={"diff_sd"}).items()}
        for g in m.history_groups
    ]
    return {"forgetting_max": m.forgetting_max(), "forgetting_groups": groups}


def _log_report(run: Run, mlflow_run_id: str, version: str, decision: dict) -> None:
    """The gate report and the raw evaluation, as artifacts of the candidate's training run."""
    from ftops.operate.report import render

    metrics = json.loads(run.load("eval.json"))
    page = render(run.id, version, metrics, decision)
    reports = run.workdir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "gate_report.html").write_text(page)
    (reports / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    (reports / "gate_decision.json").write_text(json.dumps(decision, indent=2))
    run.check_fence("the gate report")
    run.registry().log_artifacts(mlflow_run_id, str(reports), "gate")


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
        gate = _gate_failure(run, r.registry_version, d)
        raise GateFailed(
            f"{run.id}: version {r.registry_version} failed the gate: {'; '.join(d.reasons)}. Production is unchanged. "
            + gate["text"],
            gate,
        )
    if mode == "manual":
        out = Promotion(promoted=False, mode=mode, registry_version=r.registry_version, waiting_for="manual approval")
        return out.model_dump()
    run.check_fence("the production alias")
    v = run.registry().promote(run.id, run.base_slug, r.registry_version)
    out = Promotion(
        promoted=True,
        mode="auto",
        registry_version=r.registry_version,
        production=v.version,
        adapter_version=v.adapter_version,
    )
    return out.model_dump()


def plan_serving(platform: Platform, registry) -> Plan:
    """What every replica should serve, from the customers file and the registry. The registry being
    unreadable raises RegistryUnavailable before anything is decided (unknown is not absent); a version
    whose values fail the checks leaves its customer as served."""
    from ftops.release.registry import PRODUCTION, UntrustedVersion

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
                v.info.adapter_sha256,
                tree_sha256=v.info.adapter_tree_sha256 or "",
                rank=max(v.info.lora_r or 0, 0),
                probe_prompt=v.info.probe_prompt or "",
                probe_answer=v.info.probe_answer or "",
            )
        )
    return plan


def sync_serving(env: Settings | None = None) -> dict:
    """Reconcile every replica with the registry once; raises (the DAG run fails) on any error, after doing
    what could be done."""
    from ftops.release.registry import Registry
    from ftops.release.serving import ReconcileIncomplete, reconcile

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
