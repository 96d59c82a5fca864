"""Airflow event trigger for data-volume runs (a thin Airflow adapter, like `ftops.operate.notify`).

`InboxVolumeTrigger` runs in the triggerer (no worker slot is held while waiting): it polls a customer's
inbox (local folder or `s3://`), counts the *records* in files not yet ingested (by content hash, as
ingest does), and fires an asset event when they reach the customer's threshold. Files it has already
signalled are not counted again, so a burst of uploads makes one event, not ten; the customer DAG (one
active run at a time) consumes queued events in one run. Files are read as ingest reads them (same per-file
limits, `FTOPS_DATA_MAX_*`, no symlinks): a file ingest would refuse counts nothing, so junk never starts a run.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent


class InboxVolumeTrigger(BaseEventTrigger):
    def __init__(self, customer: str, storage_root: str, threshold: int, poll_interval: float = 30.0):
        super().__init__()
        self.customer, self.storage_root = customer, storage_root
        self.threshold, self.poll_interval = threshold, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "ftops.data.trigger.InboxVolumeTrigger",
            {
                "customer": self.customer,
                "storage_root": self.storage_root,
                "threshold": self.threshold,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self):
        from ftops.data.ingest import InboxCounter

        counter = InboxCounter(self.storage_root, self.customer)
        # A triggerer (re)start begins every customer's watcher at once: spread the first, full polls
        # over one interval, at a stable offset per customer.
        offset = int(hashlib.sha256(self.customer.encode()).hexdigest(), 16) % 1000 / 1000
        await asyncio.sleep(self.poll_interval * offset)
        while True:
            pending, files = await asyncio.to_thread(counter.pending)
            if pending >= self.threshold:
                counter.signalled |= files
                self.log.info("%s: %d new examples in %d files: starting a run", self.customer, pending, len(files))
                yield TriggerEvent({"customer": self.customer, "new_examples": pending, "files": len(files)})
            await asyncio.sleep(self.poll_interval)
