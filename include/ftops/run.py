"""One customer run: where it reads and writes (`Run`), the registry's production version it builds on, and
the `ftops` stage commands its heavy tasks start.

Each stage's Airflow task functions live with the stage (`ftops.data.tasks`, `ftops.model.tasks`,
`ftops.release.tasks`). They take and return small JSON-able dicts (Airflow passes them as XComs) and hand bulk
data to the next through the run's scratch prefix `<root>/<customer>/runs/<run_key>/` in object storage, so any
task can run on any worker and be retried. Versioned outputs (dataset versions, adapters, registry versions)
are write-once and looked up before being made, so a retried or re-run task never duplicates or overwrites
them. Heavy work (training, evaluation) runs as `ftops` subprocess commands.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from ftops.config import CustomerConfig, Platform, Settings, load_platform, settings
from ftops.release.registry import AdapterVersion
from ftops.storage import Fence, Fenced, Store


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
        task_id: str = "",
        try_number: int | None = None,
    ):
        self.env = env or settings()
        self.platform = platform or load_platform(self.env.customers_file)
        self.customer: CustomerConfig = self.platform.customer(customer_id)
        self.id = customer_id
        self.run_id, self.dag_id, self.started_at = run_id, dag_id, started_at
        self.key = hashlib.sha256(run_id.encode()).hexdigest()[:12]
        self.scratch = f"{customer_id}/runs/{self.key}"
        self.store: Store | Fenced = Store(self.env.storage_root)
        # Under Airflow every write of a task try goes through its fence (`claim` at the try's start): a lost try
        # still running somewhere cannot write over its retry's work. Outside Airflow (the CLI, tests) no fence.
        self.fence: Fence | None = None
        if task_id and try_number is not None:
            label = f"{customer_id} {dag_id or run_id} {task_id}"
            self.fence = Fence(self.store, f"{self.scratch}/tries/{task_id}", try_number, label)
            self.store = Fenced(self.store, self.fence)
        self.workdir = self.env.home / "work" / customer_id / self.key
        self.base_slug = self.customer.base_model
        self.base_path = self.env.base_model_path(self.platform, self.base_slug)

    def claim(self) -> Run:
        """Take the task's fence for this try (a try older than the holder raises StaleTry)."""
        if self.fence:
            self.fence.claim()
        return self

    def check_fence(self, what: str) -> None:
        """Before a write outside object storage (the registry): StaleTry unless this try holds the fence."""
        if self.fence:
            self.fence.check(what)

    def fence_args(self) -> dict:
        """The fence, for an `ftops` stage command this try starts (its writes are checked the same way)."""
        f = self.fence
        return {"fence_key": f.key, "fence_try": f.try_number, "fence_label": f.label} if f else {}

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
        from ftops.release.registry import Registry

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


def production(run: Run) -> AdapterVersion | None:
    """The customer's production version, its values checked; None only when the registry answered that
    there is none. An unreadable registry (RegistryUnavailable) or a refused version (UntrustedVersion)
    raises: training without replay or an evaluation without the comparison is never the fallback."""
    from ftops.release.registry import PRODUCTION

    v = run.registry().by_alias(run.id, run.base_slug, PRODUCTION)
    return v.checked(run.base_slug) if v else None


def production_copy(run: Run, prod: AdapterVersion, parent: Path) -> Path:
    """A local copy of production's adapter, verified against the sha256 recorded at its registration."""
    from ftops.release.serving import verified_copy

    label = f"{run.id}: production v{prod.version}"
    return verified_copy(
        run.store,
        prod.adapter_prefix,
        parent / prod.adapter_version,
        prod.info.adapter_sha256 or "",  # checked by AdapterVersion.checked: a version without one never gets here
        label,
        prod.info.adapter_tree_sha256 or "",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ftops_command(*args: str) -> None:
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
