"""DAG integrity: every DAG file imports cleanly, one DAG per customer, tags and retries set, and no
heavy library is imported at parse time (the scheduler parses these files constantly)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from ftops.config import load_platform

DAGS = ROOT / "dags"
HEAVY = ["torch", "transformers", "mlflow", "peft", "trl", "datasets", "great_expectations", "pandas"]


@pytest.fixture(scope="module")
def dagbag():
    import os

    from airflow.dag_processing.dagbag import DagBag

    old = os.environ.pop("FTOPS_CUSTOMERS", None)  # the shipped customers file
    try:
        yield DagBag(dag_folder=str(DAGS))
    finally:
        if old is not None:
            os.environ["FTOPS_CUSTOMERS"] = old


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_one_dag_per_customer_plus_sync(dagbag):
    customers = load_platform(ROOT / "include" / "customers.yaml").customers
    assert set(dagbag.dag_ids) == {f"finetune_{c}" for c in customers} | {"sync_vllm_adapters"}


def test_tags_retries_and_no_catchup(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert "ftops" in dag.tags, dag_id
        assert dag.default_args.get("retries", 0) >= 1, dag_id
        assert dag.catchup is False and dag.max_active_runs == 1, dag_id
        assert all(t.execution_timeout is not None for t in dag.tasks), dag_id


def test_one_invalid_customer_keeps_the_other_dags_and_is_an_import_error(tmp_path, monkeypatch):
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    doc = yaml.safe_load((ROOT / "include" / "customers.yaml").read_text())
    valid = [c["id"] for c in doc["customers"]]
    doc["customers"].append({"id": "globex", "name": "Globex", "lora": {"r": "many"}})
    path = tmp_path / "customers.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("FTOPS_CUSTOMERS", str(path))
    bag = DagBag(dag_folder=str(DAGS))
    assert {f"finetune_{c}" for c in valid} <= set(bag.dag_ids) and "finetune_globex" not in bag.dag_ids
    [(file, error)] = bag.import_errors.items()
    assert file.endswith("customers_check.py") and "globex" in error and "lora.r" in error


def test_customer_dag_reads_as_the_pipeline(dagbag):
    dag = dagbag.dags["finetune_brightdesk"]
    order = ["ingest", "validate", "clean", "dedupe", "snapshot", "train", "evaluate", "gate", "register", "promote"]
    for up, down in zip(order, order[1:], strict=False):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert {"force", "dry_run", "promote", "epochs", "max_steps", "learning_rate"} <= set(dag.params)
    # The scratch is removed after every run, whatever happened, without changing the run's state.
    assert dag.get_task("cleanup").is_teardown and "cleanup" in dag.get_task("promote").downstream_task_ids
    assert all(dag.params.get_param(k).description for k in dag.params)  # the UI form explains each field


def test_every_task_sees_the_run_params_and_defaults_are_valid(dagbag):
    """The params join each DAG after its tasks (a parse-time saving): every task must still get them."""
    from airflow.sdk.definitions.param import ParamValidationError, process_params

    for dag_id, dag in dagbag.dags.items():
        if not dag_id.startswith("finetune_"):
            continue
        assert dag.params.validate()["dry_run"] is False, dag_id  # the form's defaults pass their own schemas
        for t in dag.tasks:
            assert process_params(dag, t, {"dry_run": True}, suppress_exception=False)["dry_run"] is True, t
        with pytest.raises(ParamValidationError, match="max_steps"):
            process_params(dag, dag.get_task("train"), {"max_steps": 0}, suppress_exception=False)


def test_staggered_weekly_schedules_plus_data_volume_trigger(dagbag):
    customers = {d_id: d for d_id, d in dagbag.dags.items() if d_id.startswith("finetune_")}
    crons = [d.timetable.timetable.expression for d in customers.values()]  # weekly, inside AssetOrTimeSchedule
    assert len(set(crons)) == len(crons)
    for dag_id, dag in customers.items():
        [watcher] = dag.timetable.asset_condition.watchers
        assert watcher.trigger.customer == dag_id.removeprefix("finetune_") and watcher.trigger.threshold >= 1


def test_train_task_is_capped_by_the_gpu_pool(dagbag):
    assert all(d.get_task("train").pool == "gpu" for i, d in dagbag.dags.items() if i.startswith("finetune_"))


def test_dag_files_import_no_heavy_library():
    code = (
        "import runpy, sys, json, pathlib\n"
        f"for f in sorted(pathlib.Path({str(DAGS)!r}).glob('*.py')): runpy.run_path(str(f))\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_weekly_slots_stay_between_01_and_07_utc_and_spread_500_tenants():
    """The slot of any customer id falls in the six hours from 01:00 UTC on its weekday; 500 tenants spread
    over most of the 360 minutes instead of starting together."""
    from airflow.timetables.trigger import CronTriggerTimetable
    from pendulum import datetime as pdt

    sys.path.insert(0, str(DAGS))
    from customer_finetune import weekly_cron

    start = pdt(2026, 11, 30, 0, 0, tz="UTC")  # a Monday, midnight
    minutes = set()
    for i in range(500):
        weekday = i % 7
        expression = weekly_cron(f"tenant-{i:03d}", weekday)
        fire = CronTriggerTimetable(expression, timezone="UTC")._get_next(start)  # the first slot after `start`
        assert fire.weekday() == weekday and 1 <= fire.hour < 7, (expression, fire)
        assert (fire - start).days < 7
        minutes.add(fire.hour * 60 + fire.minute)
    assert len(minutes) >= 250  # 500 draws over 360 minutes: ~270 distinct expected


def test_io_tasks_retry_with_exponential_backoff(dagbag):
    """The delay Airflow's scheduler computes before each retry (`TaskInstance.next_retry_datetime`) grows with
    every try. (Airflow 3 reads `retry_exponential_backoff` as a multiplier: `True` is 1.0, a constant delay.)"""
    from datetime import timedelta
    from types import SimpleNamespace

    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk import timezone

    dag = dagbag.dags["finetune_brightdesk"]
    for name in ("ingest", "validate", "clean", "dedupe", "snapshot", "register", "promote"):
        task = dag.get_task(name)
        assert task.retries >= 2, name

        def delay(try_number: int, task=task) -> timedelta:
            ti = SimpleNamespace(  # what next_retry_datetime reads of a task instance
                task=task,
                dag_id=dag.dag_id,
                task_id=task.task_id,
                logical_date=None,
                try_number=try_number,
                end_date=timezone.utcnow(),
                retry_delay_override=None,
                log=None,
            )
            return TaskInstance.next_retry_datetime(ti) - ti.end_date

        # Airflow adds a deterministic jitter: the n-th wait lies in [d * m^(n-1), 2 * d * m^(n-1))
        first, third = delay(1), delay(3)
        assert third >= 2 * first, (name, first, third)


def test_a_customer_enabled_after_its_slot_waits_for_the_next_one(dagbag, monkeypatch):
    """No catch-up, on any day: enabled an hour after this week's slot, the first run is next week's slot.
    (Airflow's clock is set by hand: whether the last slot is "recent" depends on when the test runs.)"""
    from datetime import timedelta

    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables import trigger
    from pendulum import datetime as pdt

    for dag_id, dag in dagbag.dags.items():
        if not dag_id.startswith("finetune_"):
            continue
        serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        weekly = getattr(serialized.timetable, "timetable", serialized.timetable)  # inside AssetOrTimeSchedule
        slot = weekly._get_next(pdt(2026, 11, 30, tz="UTC"))  # this week's slot
        monkeypatch.setattr(trigger, "utcnow", lambda slot=slot: slot + timedelta(hours=1))
        first = serialized.next_dagrun_info(last_automated_run_info=None).run_after
        assert first == slot + timedelta(days=7), (dag_id, slot, first)
