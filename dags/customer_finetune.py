"""One fine-tuning DAG per customer in `include/customers.yaml`: `finetune_<customer>`.

The DAG body reads as the data flow; every task is a one-line call into its stage's `ftops.<stage>.tasks`
(data, model, release), where the logic lives. Only `ftops.config` (yaml + pydantic) is imported at parse
time: torch, transformers and mlflow load inside the tasks, and training and evaluation run as `ftops`
subprocesses.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    AssetWatcher,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    get_parsing_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from ftops.config import PRODUCTION_ASSET_URI, CustomerConfig, load_platform, settings
from ftops.data.trigger import InboxVolumeTrigger
from ftops.executors import train_executor, train_executor_config, train_queue
from ftops.operate.notify import task_failed

# A promotion or rollback emits this; `sync_vllm_adapters` is scheduled on it.
PRODUCTION_CHANGED = Asset(PRODUCTION_ASSET_URI, group="ftops")

DOC = """
### Fine-tune `{id}`: {name}

{description}

**ingest** the inbox → **validate** (Great Expectations) → **clean** (normalise, PII: `{pii}`) →
**dedupe** (exact + MinHash, against the whole history) → **snapshot** (immutable dataset version) →
**train** (TRL SFT + LoRA r={r}, replay {replay:.0%}) → **evaluate** (held-out loss vs production and base) →
**gate** → **register** (MLflow, lineage tags) → **promote** (`production` alias; mode `{promote}`) →
**cleanup** (a teardown: the run's scratch is removed however the run ended).

Trigger by hand with *Trigger DAG w/ config* to force a run with no new data, stop before training
(`dry_run`), override epochs, steps or learning rate, or the promotion mode, or start a full retrain
(`strategy: full`: a fresh adapter on every earlier example) when the customer is stuck on forgetting.
Runs weekly on its own staggered slot `{cron}` (UTC), and as soon as {trigger} new examples wait in the inbox.
"""


def weekly_cron(customer_id: str, weekday: int) -> str:
    """A stable slot in a 6-hour window from 01:00 on the customer's weekday, so tenants do not all start at once."""
    offset = int(hashlib.sha256(customer_id.encode()).hexdigest(), 16) % 360
    return f"{offset % 60} {1 + offset // 60} * * {(weekday + 1) % 7}"


def schedule(c: CustomerConfig, cron: str):
    """Weekly on the customer's slot, and (if configured) as soon as enough new examples wait in the inbox."""
    # run_immediately=0: Airflow 3.3 reads the default (False) as "run the last slot if it was less than a tenth
    # of the period ago" (16.8 h for a weekly cron), so a customer enabled on its weekday after its slot ran at
    # once; a zero window waits for the next slot.
    weekly = CronTriggerTimetable(cron, timezone="UTC", run_immediately=timedelta(0))
    if c.trigger_min_examples is None:
        return weekly
    trigger = InboxVolumeTrigger(c.id, settings().storage_root, c.trigger_min_examples, c.trigger_poll_seconds)
    inbox = Asset(f"ftops://inbox/{c.id}", group="ftops", watchers=[AssetWatcher(f"inbox_volume_{c.id}", trigger)])
    return AssetOrTimeSchedule(timetable=weekly, assets=inbox)


def run_params(c: CustomerConfig) -> dict[str, Param]:
    """The *Trigger DAG w/ config* form: each field validated before a run is created (HTTP 400 otherwise)."""
    return {
        "force": Param(False, type="boolean", description="Train even when no new examples arrived"),
        "dry_run": Param(False, type="boolean", description="Prepare and snapshot the data, stop before training"),
        "promote": Param(c.promote, enum=["auto", "manual"], description="Promotion mode for this run"),
        "strategy": Param(
            "default",
            enum=["default", "full"],
            description="full: a full retrain, a fresh adapter on every earlier example (for a customer stuck on "
            "forgetting); default: the customer's training settings",
        ),
        "epochs": Param(
            None, type=["null", "number"], exclusiveMinimum=0, maximum=100, description="Override epochs for this run"
        ),
        "max_steps": Param(
            None, type=["null", "integer"], minimum=1, description="Override training steps for this run"
        ),
        "learning_rate": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            maximum=1,
            description="Override the learning rate for this run",
        ),
    }


# The tasks are defined once and wired into every customer's DAG (defining them inside the DAG function
# repeats their signature inspection a thousand times). A task finds its customer from its DAG id.
def run():
    from ftops.run import Run

    ctx = get_current_context()
    dag_id, dag_run, ti = ctx["dag"].dag_id, ctx["dag_run"], ctx["ti"]
    r = Run(
        dag_id.removeprefix("finetune_"),
        dag_run.run_id,
        dag_id,
        started_at=dag_run.start_date,
        task_id=ti.task_id,
        try_number=ti.try_number,
    )
    return r.claim()  # this try's fence: a lost earlier try of this task can no longer write


# The key to the raw records between ingest and clean (ftops.data.tasks): an XCom of its own, because Airflow
# prints a task's return value in its log, and a key must not be there.
SCRATCH_KEY = "scratch_key"


def scratch_key() -> str:
    return get_current_context()["ti"].xcom_pull(task_ids="ingest", key=SCRATCH_KEY) or ""


@task
def ingest() -> dict:
    from ftops.data import tasks as data

    out = data.ingest(run())
    get_current_context()["ti"].xcom_push(key=SCRATCH_KEY, value=out.pop(SCRATCH_KEY, ""))
    return out


@task
def validate(_: dict) -> dict:
    from ftops.data import tasks as data
    from ftops.data.validate import ValidationFailed

    try:
        return data.validate(run(), scratch_key())
    except ValidationFailed as exc:
        raise AirflowFailException(str(exc)) from exc


@task
def clean(_: dict) -> dict:
    from ftops.data import tasks as data

    return data.clean(run(), scratch_key())


@task
def dedupe(_: dict) -> dict:
    from ftops.data import tasks as data

    return data.dedupe(run())


@task
def snapshot(_: dict) -> dict:
    from ftops.data import tasks as data

    return data.snapshot(run())


# The `gpu` pool caps concurrent trainings; the queue routes them to GPU workers under Celery, the executor
# config asks Kubernetes for a GPU (ftops.executors); LocalExecutor ignores both.
@task(
    execution_timeout=timedelta(hours=8),
    retries=1,
    pool="gpu",
    queue=train_queue(),
    executor_config=train_executor_config(),
    **({"executor": train_executor()} if train_executor() else {}),
)
def train(_: dict) -> dict:
    from ftops.model import tasks as model

    params = get_current_context()["params"]
    if params["dry_run"]:
        raise AirflowSkipException("dry run: stopping before training")
    try:
        overrides = {k: params[k] for k in ("epochs", "max_steps", "learning_rate") if params.get(k) is not None}
        return model.train(
            run(), force=params["force"], overrides=overrides, strategy=params.get("strategy") or "default"
        )
    except model.NothingToTrain as exc:
        raise AirflowSkipException(str(exc)) from exc


@task
def evaluate(trained: dict) -> dict:
    from ftops.model import tasks as model

    return model.evaluate(run(), trained)


@task(retries=0)
def gate(metrics: dict) -> dict:
    from ftops.model import tasks as model

    return model.gate(run(), metrics)


@task
def register(trained: dict, metrics: dict, decision: dict) -> dict:
    from ftops.release import tasks as release

    return release.register(run(), trained, metrics, decision)


@task
def require_gate(decision: dict) -> None:
    if not decision["passed"]:
        raise AirflowFailException("the candidate failed the gate; nothing to approve")


@task(outlets=[PRODUCTION_CHANGED])
def promote(registered: dict, decision: dict) -> dict:
    from ftops.release import tasks as release

    ctx = get_current_context()
    r = run()
    # After an approval step, reaching here means an operator approved in the UI.
    mode = release.promotion_mode(r, ctx["params"]["promote"], approved="approve" in ctx["dag"].task_ids)
    try:
        return release.promote(r, registered, decision, mode)
    except release.GateFailed as exc:
        raise AirflowFailException(str(exc)) from exc


# A teardown: it runs once the run is over, whatever happened (success, failed gate, crash), and does not
# change the run's state. It removes the run's scratch (training mix, checkpoints): no customer data waits
# in storage after a run; `expire_scratch` removes what a killed run could not.
@task
def cleanup() -> dict:
    from ftops.data import tasks as data

    return data.cleanup(run())


def customer_dag(c: CustomerConfig):
    cron = weekly_cron(c.id, c.schedule_weekday)

    @dag(
        dag_id=f"finetune_{c.id}",
        description=f"Fine-tune {c.name}'s LoRA adapter on {c.base_model}",
        doc_md=DOC.format(
            id=c.id,
            name=c.name,
            description=c.description,
            pii=c.data.pii,
            r=c.lora.r,
            replay=c.training.replay_fraction,
            promote=c.promote,
            cron=cron,
            trigger=c.trigger_min_examples or "(never: off)",
        ),
        schedule=schedule(c, cron),
        # No start_date: a newly enabled customer waits for its weekly slot instead of running at once
        # (with 500 customers, enabling every DAG must not start 500 trainings).
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(hours=12),
        tags=["ftops", "finetune", f"customer:{c.id}", *c.tags],
        default_args={
            "on_failure_callback": task_failed,
            "retries": 2,
            "retry_delay": timedelta(seconds=30),
            "retry_exponential_backoff": 2.0,  # a multiplier in Airflow 3 (True is 1.0: a constant delay)
            "execution_timeout": timedelta(hours=1),
        },
    )
    def finetune():
        trained = train(snapshot(dedupe(clean(validate(ingest())))))
        metrics = evaluate(trained)
        decision = gate(metrics)
        registered = register(trained, metrics, decision)
        if c.promote == "manual":
            # A human approves in the Airflow UI (Required actions), only after the gate passed.
            from airflow.providers.standard.operators.hitl import ApprovalOperator

            approve = ApprovalOperator(
                task_id="approve",
                subject=f"Promote {c.name}'s new adapter to production?",
                body="The candidate passed the gate. Its report is in MLflow (artifacts, `gate/`).",
                response_timeout=timedelta(days=7),
                execution_timeout=timedelta(days=7, minutes=5),
            )
            promoted = promote(registered, decision)
            registered >> require_gate(decision) >> approve >> promoted
        else:
            promoted = promote(registered, decision)
        # A teardown per DAG (the decorator form cannot be shared across DAGs: it edits its own arguments).
        promoted >> cleanup().as_teardown()

    built = finetune()
    # Params join the DAG once its tasks exist: each task built before would deep-copy every Param (four
    # times, apache/airflow#32434), 40% of parse time at 1000 customers. Tasks read them at run time from
    # the DAG (`process_params` merges DAG, task and run conf), so nothing is lost.
    built.params.update(run_params(c))
    return built


# A worker running one task needs one DAG: skip building the others (saves seconds at 1000 customers).
_only = get_parsing_context().dag_id
for _customer in load_platform().customers.values():
    if _only is None or _only == f"finetune_{_customer.id}":
        globals()[f"finetune_{_customer.id}"] = customer_dag(_customer)
