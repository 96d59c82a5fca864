"""`sync_vllm_adapters`: keep every vLLM replica serving exactly the registry's production adapters.

Runs every five minutes and whenever a promotion or rollback emits the `ftops://registry/production`
asset. Idempotent: when replicas and registry agree it does nothing. The logic is `ftops.release.serving`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from ftops.config import PRODUCTION_ASSET_URI
from ftops.operate.notify import task_failed

PRODUCTION_CHANGED = Asset(PRODUCTION_ASSET_URI, group="ftops")


@dag(
    dag_id="sync_vllm_adapters",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/5 * * * *", timezone="UTC"), assets=PRODUCTION_CHANGED
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["ftops", "serving"],
    default_args={
        "on_failure_callback": task_failed,
        "retries": 3,
        "retry_delay": timedelta(seconds=10),
        "execution_timeout": timedelta(minutes=10),
    },
    doc_md=__doc__,
)
def sync_vllm_adapters():
    @task
    def reconcile() -> dict:
        """Load missing, swap changed, unload removed adapters on every replica."""
        from ftops.release.tasks import sync_serving

        return sync_serving()

    reconcile()


sync_vllm_adapters()
