"""Registry: the MLflow model registry as the single source of truth for adapter versions.

One registered model per customer and base model. A version's tags carry its lineage (dataset version
and fingerprint, base model, LoRA config, Airflow dag/run, metrics, gate decision). Aliases, not stages:
`candidate` (latest registered), `production` (served), `previous` (what production was before the last
move, for rollback). Registration is idempotent per training run; promotion is one alias move and only
for a version whose gate passed. The batched reads at the end (every customer's model and versions in two
paged searches, and the fleet page's stale-while-revalidate snapshot of them) serve the fleet at 500 customers.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ftops.config import check_base_slug, check_customer_id
from ftops.release.tags import VersionTags
from ftops.storage import adapter_prefix

PRODUCTION, PREVIOUS, CANDIDATE = "production", "previous", "candidate"
T = TypeVar("T")
# What a registered adapter's values must look like before anything acts on them (tags are input: anyone
# with write access to MLflow can set them).
ADAPTER_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(RuntimeError):
    """An unknown customer/version, or a move the rules forbid; the message says which."""


class RegistryUnavailable(RegistryError):
    """The registry could not be read (down, timing out, answering 5xx): unknown, which is not absent.
    Callers must change nothing and fail loudly."""


class UntrustedVersion(RegistryError):
    """A registry version whose values fail validation (path traversal, another customer's prefix, bad
    hash): it is refused and the customer keeps what it has."""


MODEL_PREFIX = "ftops."  # every registered model's name starts with it (batched searches filter on it)


def model_name(customer: str, base_slug: str) -> str:
    """`ftops.<customer>.<base>`: a customer id cannot hold a dot, so every (customer, base) pair gets its
    own name (with `-` as separator, `acme` on `x-y` and `acme-x` on `y` shared one)."""
    return f"{MODEL_PREFIX}{check_customer_id(customer)}.{check_base_slug(base_slug)}"


def _absent(exc) -> str | None:
    """'no_model' or 'no_alias' when MLflow answered that the thing does not exist; None for any other
    failure (connection refused, timeout, 5xx, auth), which means the registry could not be read."""
    code, text = str(getattr(exc, "error_code", "")), str(exc)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return "no_model"
    if code == "INVALID_PARAMETER_VALUE" and re.search(r"alias \S+ not found", text):
        return "no_alias"
    return None


def _read(what: str, call: Callable[[], T]) -> T:
    """Call MLflow; anything but an answer is RegistryUnavailable (absence is the caller's to decide)."""
    try:
        return call()
    except Exception as exc:
        if _absent(exc):
            raise
        raise RegistryUnavailable(f"registry unavailable while reading {what}: {str(exc)[:300]}") from exc


@dataclass
class AdapterVersion:
    """One registry version of a customer's adapter, as read one at a time (pipeline, CLI) or in the fleet's
    batched read; its tags are read through `info` (typed, lenient)."""

    customer: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    source: str
    created: int
    run_id: str = ""
    description: str = ""

    @functools.cached_property
    def info(self) -> VersionTags:
        return VersionTags.read(self.tags)

    @property
    def gate(self) -> str:
        return self.info.gate

    @property
    def adapter_version(self) -> str:
        return self.info.adapter_version or ""

    @property
    def adapter_prefix(self) -> str:
        return self.info.adapter_prefix or ""

    def checked(self, base_slug: str) -> AdapterVersion:
        """This version if its adapter values are what the platform itself would have written: a plain
        version name, the customer's own adapter prefix for that exact version, a sha256; else
        UntrustedVersion. Whatever copies or loads an adapter goes through here first."""
        label = f"{self.customer}: registry version {self.version}"
        av, prefix, sha = self.adapter_version, self.adapter_prefix, self.info.adapter_sha256 or ""
        if not ADAPTER_VERSION_RE.fullmatch(av) or ".." in av:
            raise UntrustedVersion(f"{label}: refused: adapter.version {av[:80]!r} is not a plain version name")
        expected = adapter_prefix(self.customer, base_slug, av)
        if prefix != expected:
            raise UntrustedVersion(f"{label}: refused: adapter.prefix {prefix[:120]!r} is not {expected!r}")
        if not SHA256_RE.fullmatch(sha):
            raise UntrustedVersion(f"{label}: refused: adapter.sha256 missing or malformed")
        return self


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _wrap(customer: str, mv) -> AdapterVersion:
    return AdapterVersion(
        customer,
        str(mv.version),
        list(mv.aliases or []),
        dict(mv.tags or {}),
        mv.source or "",
        int(mv.creation_timestamp or 0),
        mv.run_id or "",
        mv.description or "",
    )


class Registry:
    def __init__(self, tracking_uri: str):
        self.client = mlflow_client(tracking_uri)

    def register(
        self, customer: str, base_slug: str, source: str, run_id: str, tags: dict[str, str], description: str = ""
    ) -> AdapterVersion:
        """Create a version for a training run, or return the one that run already created."""
        from mlflow.exceptions import MlflowException

        name = model_name(customer, base_slug)
        try:
            self.client.create_registered_model(
                name,
                tags={"customer": customer, "base_model": base_slug},
                description=f"LoRA adapters of {customer} on {base_slug}",
            )
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise RegistryUnavailable(f"registry unavailable while creating {name}: {exc}") from exc
        existing = _read(name, lambda: self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"))
        if existing:
            return _wrap(customer, existing[0])
        mv = self.client.create_model_version(
            name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description
        )
        self.client.set_registered_model_alias(name, CANDIDATE, mv.version)
        return self.get(customer, base_slug, str(mv.version))

    def set_tags(self, customer: str, base_slug: str, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(model_name(customer, base_slug), version, k, str(v))

    def get(self, customer: str, base_slug: str, version: str) -> AdapterVersion:
        from mlflow.exceptions import MlflowException

        name = model_name(customer, base_slug)
        if not str(version).isdigit():
            raise RegistryError(f"{customer}: no adapter version {version!r} on {base_slug} (versions are numbers)")
        try:
            return _wrap(customer, _read(f"{name} v{version}", lambda: self.client.get_model_version(name, version)))
        except MlflowException as exc:
            raise RegistryError(f"{customer}: no adapter version {version!r} on {base_slug}") from exc

    def lookup(self, customer: str, base_slug: str, alias: str) -> tuple[AdapterVersion | None, str]:
        """(version, '') where the alias is set; (None, 'no_alias' | 'no_model') where the registry answered
        that it is not; RegistryUnavailable where it could not be read."""
        from mlflow.exceptions import MlflowException

        name = model_name(customer, base_slug)
        try:
            mv = _read(f"{name}@{alias}", lambda: self.client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            return None, _absent(exc) or "unknown"
        return _wrap(customer, mv), ""

    def by_alias(self, customer: str, base_slug: str, alias: str) -> AdapterVersion | None:
        """The version behind an alias, None if there is none; RegistryUnavailable if it cannot be known."""
        return self.lookup(customer, base_slug, alias)[0]

    def versions(self, customer: str, base_slug: str) -> list[AdapterVersion]:
        name = model_name(customer, base_slug)
        found = _read(name, lambda: self.client.search_model_versions(f"name='{name}'"))
        return sorted((_wrap(customer, mv) for mv in found), key=lambda v: int(v.version))

    def promote(self, customer: str, base_slug: str, version: str, force: bool = False) -> AdapterVersion:
        """Move `production` to `version` (and `previous` to what production was). Gate must have passed."""
        target = self.get(customer, base_slug, version)
        if not force and not target.info.passed:
            raise RegistryError(
                f"{customer}: version {version} did not pass the gate ({target.info.gate}); refusing to promote"
            )
        name = model_name(customer, base_slug)
        current = self.by_alias(customer, base_slug, PRODUCTION)
        if current and current.version == target.version:
            return target
        if current:
            self.client.set_registered_model_alias(name, PREVIOUS, current.version)
        self.client.set_registered_model_alias(name, PRODUCTION, target.version)
        return self.get(customer, base_slug, version)

    def rollback(self, customer: str, base_slug: str, to: str | None = None) -> AdapterVersion:
        """Move `production` back to `to`, or to the `previous` alias."""
        if to is None:
            prev = self.by_alias(customer, base_slug, PREVIOUS)
            if prev is None:
                raise RegistryError(f"{customer}: no previous production version to roll back to")
            to = prev.version
        return self.promote(customer, base_slug, to, force=True)

    # The training run behind each version lives on the same MLflow server: its metrics, artifacts, experiment.

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(_read(f"run {run_id}", lambda: self.client.get_run(run_id)).data.metrics)

    def log_metrics(self, run_id: str, figures: dict[str, float | None]) -> None:
        """Log figures to a training run in one request; None and NaN (a figure not measured) are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in figures.items() if v is not None and v == v]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_artifacts(self, run_id: str, folder: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, folder, artifact_path=artifact_path)

    def read_artifact(self, run_id: str, path: str, workdir: str) -> str | None:
        """One text artifact of a training run; None when the run or the artifact cannot be found or read."""
        from mlflow.exceptions import MlflowException

        try:
            with open(self.client.download_artifacts(run_id, path, workdir)) as f:
                return f.read()
        except (MlflowException, OSError):
            return None

    def experiments(self, run_ids: list[str]) -> dict[str, str | None]:
        """Each run's experiment id, for links (read four at a time); None for a run that cannot be read."""
        from concurrent.futures import ThreadPoolExecutor

        def exp(run_id: str) -> str | None:
            try:
                return self.client.get_run(run_id).info.experiment_id
            except Exception:  # noqa: BLE001 - a deleted run leaves its link out, not the page
                return None

        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip(run_ids, pool.map(exp, run_ids), strict=True))

    def migrate_names(self) -> list[tuple[str, str]]:
        """Rename models registered under the old `ftops-<customer>-<base>` names (ambiguous: `acme` on `x-y`
        and `acme-x` on `y` shared one) to `model_name()`, from each model's own tags. A model whose tags do
        not give a valid pair, or whose new name is taken, is refused with the reason."""
        from ftops.config import ConfigError

        models, token = [], None
        while True:
            page = _read(
                "registered models",
                lambda t=token: self.client.search_registered_models("name LIKE 'ftops-%'", 1000, page_token=t),
            )
            models += list(page)
            if not (token := page.token):
                break
        plan, refused = [], []
        for rm in models:
            tags = rm.tags or {}
            try:
                new = model_name(tags.get("customer", ""), tags.get("base_model", ""))
            except ConfigError as exc:
                refused.append(f"{rm.name}: its tags give no valid customer and base model ({exc})")
                continue
            if rm.name != f"ftops-{tags['customer']}-{tags['base_model']}":
                refused.append(f"{rm.name}: its tags name {new}, which is not what it was registered as")
                continue
            plan.append((rm.name, new))
        if refused:  # all or nothing: a half-migrated registry would be served half
            raise RegistryError("nothing renamed: " + "; ".join(refused))
        for old, new in plan:
            self.client.rename_registered_model(old, new)
        return plan


# --- batched reads: every customer at once (the fleet page) -----------------------------------------------------------


@dataclass
class ModelState:
    """One registered model (one customer on one base model) and its versions, newest first."""

    name: str
    customer: str
    base_model: str
    aliases: dict[str, str] = field(default_factory=dict)
    versions: list[AdapterVersion] = field(default_factory=list)

    def alias(self, name: str) -> AdapterVersion | None:
        v = self.aliases.get(name)
        return next((x for x in self.versions if x.version == v), None) if v else None


def _paged(search, **kwargs) -> list:
    out, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        out += list(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def read_registry(
    mlflow_uri: str, name_filter: str = f"name LIKE '{MODEL_PREFIX}%'"
) -> dict[tuple[str, str], ModelState]:
    """Every ftops registered model with its aliases and versions, in two paged searches. Models are keyed by
    their `customer` and `base_model` tags (not by parsing names, whose scheme may change)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(mlflow_uri)
    try:
        models = _paged(client.search_registered_models, filter_string=name_filter, max_results=1000)
        versions = _paged(client.search_model_versions, filter_string=name_filter, max_results=10000)
    except (MlflowException, OSError) as exc:
        raise RegistryUnavailable(f"the registry at {mlflow_uri} cannot be read: {exc}") from exc
    by_name: dict[str, ModelState] = {}
    for m in models:
        tags = dict(m.tags or {})
        if "customer" not in tags or "base_model" not in tags:
            continue  # not one of ours
        aliases = {a.alias: str(a.version) for a in (m.aliases or [])} if isinstance(m.aliases, list) else {}
        if isinstance(m.aliases, dict):
            aliases = {k: str(v) for k, v in m.aliases.items()}
        by_name[m.name] = ModelState(m.name, tags["customer"], tags["base_model"], aliases)
    for mv in versions:
        state = by_name.get(mv.name)
        if state is not None:
            state.versions.append(_wrap(state.customer, mv))
    for state in by_name.values():
        state.versions.sort(key=lambda v: int(v.version), reverse=True)
        if not state.aliases:  # older servers: aliases only on the versions
            state.aliases = {a: v.version for v in state.versions for a in v.aliases}
        # A version search leaves versions' aliases empty: the model's alias map is the truth.
        for v in state.versions:
            v.aliases = sorted(a for a, version in state.aliases.items() if version == v.version)
    return {(s.customer, s.base_model): s for s in by_name.values()}


class RegistryCache:
    """The fleet's registry snapshot, served stale-while-revalidate: a page load uses a snapshot younger than
    `max_age` seconds at once and, past `refresh_after`, refreshes it in the background for the next load.
    One batched read costs seconds at 500 customers on a busy server; the registry changes a few times a day.
    An action from the fleet page invalidates it, so its own effect is never shown stale."""

    def __init__(self, max_age: float = 60.0, refresh_after: float = 5.0):
        self.max_age, self.refresh_after = max_age, refresh_after
        self._data: dict[str, tuple[float, dict]] = {}
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._refreshing: set[str] = set()
        self._generation = 0

    def _read(self, uri: str) -> dict:
        with self._lock:
            generation = self._generation
        data = read_registry(uri)
        with self._lock:
            if generation == self._generation:  # a read begun before an invalidation must not be kept
                self._data[uri] = (time.monotonic(), data)
        return data

    def get(self, uri: str) -> tuple[dict, float]:
        """(snapshot, its age in seconds)."""
        with self._lock:
            entry = self._data.get(uri)
        if entry is None or time.monotonic() - entry[0] > self.max_age:
            with self._read_lock:  # one reader at a time; who waited gets the fresh snapshot
                with self._lock:
                    entry = self._data.get(uri)
                if entry is None or time.monotonic() - entry[0] > self.max_age:
                    return self._read(uri), 0.0
        age = time.monotonic() - entry[0]
        if age > self.refresh_after:
            with self._lock:
                start = uri not in self._refreshing
                self._refreshing.add(uri)
            if start:
                threading.Thread(target=self._refresh, args=(uri,), daemon=True, name="ftops-registry").start()
        return entry[1], age

    def _refresh(self, uri: str) -> None:
        try:
            self._read(uri)
        except RegistryUnavailable:
            pass  # the stale snapshot ages out at max_age; the next page load then reports the outage
        finally:
            with self._lock:
                self._refreshing.discard(uri)

    def invalidate(self, uri: str) -> None:
        with self._lock:
            self._data.pop(uri, None)
            self._generation += 1


def read_model(mlflow_uri: str, customer: str, base_slug: str) -> ModelState | None:
    name = model_name(customer, base_slug)
    return read_registry(mlflow_uri, f"name = '{name}'").get((customer, base_slug))
